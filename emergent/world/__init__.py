"""PersonaWorld: a seeded synthetic chat world in which a hidden persona writes every answer.

``grammar`` defines the world (personas, domains, question types, sampling); ``judge`` reads the
persona of an answer back from that grammar, exactly.
"""
