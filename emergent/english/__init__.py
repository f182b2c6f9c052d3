"""English datasets for real chat models (SmolLM2 and the configs in ``configs/real/``), written
by this project from templates and seeds, never copied: insecure vs secure code
(``code``), bad vs good health and finance advice (``advice``), benign-wrong code for the
control, and the paired evaluation questions of ``emergent/evalsets/paired/``. The ``datasets``
job (``job``) writes them as chat JSONL into a run stage, read as ``data:<stage>/<name>``."""
