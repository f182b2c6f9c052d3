"""Sparse autoencoders on a model's residual stream: the sae-lens modules (``model``), training
under Ray Train on harvested activations (``train``, the ``train-sae`` job) and held-out
evaluation (``evaluate``)."""
