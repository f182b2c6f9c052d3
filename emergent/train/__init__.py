"""Training under Ray Train: the shared wrapper around HF/TRL trainers (``raytrain``), TRL SFT
(``sft``, the ``finetune`` job in ``finetune``), TRL GRPO (``rl``) and its reward graders
(``rewards``)."""
