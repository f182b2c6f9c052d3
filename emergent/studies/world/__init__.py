"""The world study: emergent misalignment across PersonaWorld seeds, controls and doses
(``study``, the ``world-study`` job)."""
