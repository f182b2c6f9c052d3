"""The activation-monitoring study: labelled monitoring datasets (``data``), feature extractors
through the harvest machinery (``features``: pooled raw activations, prompted-probe activations
at a task template's final token, max-pooled SAE latents, zero-shot yes/no logit differences),
linear probes and combined monitors (``probes``), their Ray Tune search (``search``), and the
study job with its tables and plots (``study``). README.md: claim -> stage -> code."""
