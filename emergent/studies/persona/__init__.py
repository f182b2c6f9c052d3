"""The persona-features study: model diffing with an SAE (``diffing``), steering along latents
and directions on Ray Tune (``steering``), prediction of misalignment across a fine-tuned family
(``predict``), the training-time early-warning latent monitor (``early_warning``), re-alignment
with a few benign samples (``realign``), and the study's pipeline and report (``pipeline``,
``report``)."""
