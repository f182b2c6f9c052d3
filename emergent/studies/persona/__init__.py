"""The persona-features study: model diffing with an SAE (``diffing``), steering along latents
and directions on Ray Tune (``steering``, ``strengths``), prediction of misalignment across a
fine-tuned family (``predict``), data flagging before training (``flagging``), re-alignment with
a few benign samples (``realign``), and the claim table and report (``report``, ``seeds`` for
the table over seeds). The training-time latent monitor is ``emergent.train.latent_monitor``;
the pipeline that runs the study is ``emergent.pipeline``. README.md: claim -> stage -> code."""
