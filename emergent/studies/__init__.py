"""The studies, one package each and independent of one another (import-linter checks it):
``world`` (EM across PersonaWorld seeds and controls), ``persona`` (the persona-features study:
diff, steer, predict, flag, re-align, report) and ``monitor`` (activation monitoring). What two
studies need lives in a lower layer."""
