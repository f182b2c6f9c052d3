"""The activation-monitoring study (to come): labelled monitoring datasets, feature extractors
through the harvest machinery (pooled raw activations, prompted-probe activations at the final
token of a task template, max-pooled SAE latents, zero-shot yes/no logit differences), linear
probes and their Ray Tune sweeps, combined monitors (stacked, cascades), and the study's report
(AUROC tables, data-efficiency and generalisation curves)."""
