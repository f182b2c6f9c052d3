"""The SAE itself: sae-lens training modules by architecture, saving and loading in sae-lens'
inference format (the activation scale folded into the weights), and the training step as an
``nn.Module`` so DDP can wrap it."""

from __future__ import annotations

from typing import Literal

from emergent.config import config

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")


@config
class SAEParams:
    """Architecture and optimisation."""

    architecture: Literal["topk", "batchtopk", "standard", "jumprelu"] = "topk"
    """sae-lens training SAE class."""
    d_sae: int = 768
    """Latents."""
    k: int = 16
    """Active latents per token (topk, batchtopk)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty (standard)."""
    l0_coefficient: float = 1.0
    """Sparsity penalty (jumprelu)."""
    aux_coefficient: float = 1.0 / 32
    """Weight of the auxiliary loss that revives dead latents (topk, batchtopk)."""
    lr: float = 1e-3
    """Adam learning rate (constant after warm-up)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up."""
    batch_size: int = 1024
    """Activations per step, over all workers."""
    steps: int = 2000
    """Training steps (fewer when the data runs out first)."""
    dead_window: int = 200
    """A latent with no activation for this many steps counts as dead."""
    normalize: bool = True
    """Scale activations to mean norm sqrt(d_model) (folded into the saved SAE)."""
    norm_batches: int = 5
    """Batches per worker for the norm estimate."""
    seed: int = 0
    """Initialisation seed."""

    def __post_init__(self):
        if self.d_sae < 1 or self.k < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("sae.d_sae, k, batch_size and steps must be >= 1")


def make_sae(p: SAEParams, d_in: int):
    """A sae-lens training SAE (float32, CPU; moved by the caller)."""
    import sae_lens

    common = dict(d_in=d_in, d_sae=p.d_sae, normalize_activations="none")
    if p.architecture == "topk":
        cfg = sae_lens.TopKTrainingSAEConfig(
            k=p.k, aux_loss_coefficient=p.aux_coefficient, **common
        )
        return sae_lens.TopKTrainingSAE(cfg)
    if p.architecture == "batchtopk":
        cfg = sae_lens.BatchTopKTrainingSAEConfig(
            k=p.k, aux_loss_coefficient=p.aux_coefficient, **common
        )
        return sae_lens.BatchTopKTrainingSAE(cfg)
    if p.architecture == "standard":
        cfg = sae_lens.StandardTrainingSAEConfig(l1_coefficient=p.l1_coefficient, **common)
        return sae_lens.StandardTrainingSAE(cfg)
    cfg = sae_lens.JumpReLUTrainingSAEConfig(l0_coefficient=p.l0_coefficient, **common)
    return sae_lens.JumpReLUTrainingSAE(cfg)


def save_sae(sae, scale: float | None, path) -> None:
    """Save a training SAE in sae-lens' inference format, with the activation scaling factor
    (``None`` = none) folded into its weights: the saved SAE works on raw activations (and a
    TopK SAE's latent activations, taken along unit decoder directions, are in raw units: the
    training-time values divided by the scale)."""
    if scale is not None:
        sae.fold_activation_norm_scaling_factor(scale)
    sae.save_inference_model(str(path))


def load_sae(path: str, device: str = "cpu"):
    """A saved SAE, through sae-lens' own loader."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device=device)


def coefficients(sae) -> dict[str, float]:
    return {k: float(getattr(v, "value", v)) for k, v in sae.get_coefficients().items()}


def step_module(sae):
    """An nn.Module whose forward is sae-lens' training step, so DDP can wrap it."""
    import torch
    from sae_lens.saes.sae import TrainStepInput

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sae = sae
            self.coefficients = coefficients(sae)

        def forward(self, x, dead, step: int):
            out = self.sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients=self.coefficients,
                    dead_neuron_mask=dead,
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
            return out.loss, out.feature_acts, out.losses["mse_loss"]

    return Step()


def batch_fvu(sae, x) -> float:
    """Fraction of variance unexplained of ``sae`` on one batch ``x`` (n, d): the summed squared
    reconstruction error over the summed squared deviation from the batch mean (the held-out
    FVU of ``emergent.train.sae_eval``, on the batch in hand: the training view of it)."""
    import torch

    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
        spread = ((x - x.mean(0)) ** 2).sum()
        return float(((x - recon) ** 2).sum() / spread)
