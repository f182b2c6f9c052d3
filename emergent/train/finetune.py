"""The ``finetune`` job: supervised fine-tuning (TRL SFT, loss on assistant tokens) under Ray
Train, with DDP or DeepSpeed ZeRO, full or LoRA (see emergent.train.raytrain for the distributed
machinery: checkpoints, resume, throughput, outputs).

Data is a mixture of chat datasets by fraction, sized and seeded; a dose-response family (e.g.
0-100% insecure code in secure code) is one config with a list of fractions. Each model lands in
``<run>/finetune/<name>/``.

``steer`` adds a fixed vector to the residual stream during training (preventative steering, the
persona-vectors paper's tool): with the persona direction supplied from outside, the weights have
less reason to move along it to fit bad data, so the narrow task may be learned without the
broad persona shift. The saved model carries no hook: it is evaluated unsteered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

from emergent.config import RayConfig, RunConfig, config
from emergent.data import mixture
from emergent.directions import DirectionSpec, directions
from emergent.models import _hidden, _replace_hidden, block
from emergent.runs import RunDir
from emergent.runtime import ray_session
from emergent.train.raytrain import (
    DataSource,
    Distributed,
    ModelJob,
    TrainedModel,
    group_key,
    load_source,
    source_path,
    train_models,
)
from emergent.train.sft import SFTParams, sft_trainer


@config
class TrainSteer:
    """A vector added to the residual stream during fine-tuning (preventative steering). The
    early-warning monitor, where one is set, reads the model with the vector added too."""

    direction: str = "persona:world:base"
    """A steering direction (see SteerConfig.directions): ``persona:<model>`` (the model's
    toxic-minus-aligned context difference of means), ``diff:<name>`` (a diff's fine-tuning
    shift), ``pc1:<name>`` (its first principal component), ``system:<model>`` (an evil minus a
    helpful system prompt) or a ``.npy`` file; unit length."""
    alpha: float = 4.0
    """Strength: ``alpha`` x the unit direction, added at every position of every training
    forward pass (positive: towards the persona, as the persona-vectors paper prevents a trait;
    negative: against it)."""
    sae: str = "persona"
    """The SAE whose block is steered (its layer; the directions live in that residual
    stream)."""

    def __post_init__(self):
        if not self.direction:
            raise ValueError("finetune.steer.direction must name a direction")
        if self.direction.startswith("top:"):
            raise ValueError("finetune.steer.direction: top:<k> needs a diff (steer's field only)")


@config
class FinetuneConfig(Distributed):
    """What to fine-tune, on what, and how it is distributed."""

    name: str = "insecure"
    """Model name: outputs go to ``<run>/finetune/<name>/``."""
    data: list[DataSource] = dataclasses.field(
        default_factory=lambda: [DataSource("world:finetune/code_toxic")]
    )
    """The mixture (e.g. 5% insecure + 95% secure code)."""
    examples: int = 1000
    """Examples drawn for the mixture (seeded); 0 = every record of a single source."""
    doses: list[float] = dataclasses.field(default_factory=list)
    """Dose-response family: for each fraction p, a model ``<name>_dose<p>`` whose mixture has p
    of the first source and 1-p of the others (in their relative fractions). Empty = one model."""
    skip_bad: bool = False
    """Skip (and count) malformed dataset lines instead of failing on the first one."""
    sft: SFTParams = dataclasses.field(default_factory=SFTParams)
    """Optimisation (batch_size is the global batch, shared by the workers)."""
    steer: TrainSteer | None = None
    """Steer the residual stream while training (preventative steering); none: no steering."""

    def __post_init__(self):
        if not self.data:
            raise ValueError("finetune.data must list at least one source")
        if self.examples < 0 or (self.examples == 0 and (len(self.data) > 1 or self.doses)):
            raise ValueError("finetune.examples must be > 0 for a mixture or a dose family")
        if any(not 0 <= d <= 1 for d in self.doses) or (self.doses and len(self.data) < 2):
            raise ValueError(
                f"finetune.doses must be fractions in [0, 1] over >= 2 sources, got {self.doses}"
            )
        self.check("finetune", "sft.batch_size", self.sft.batch_size)


@config
class FinetuneJob:
    """Supervised fine-tuning (TRL SFT) under Ray Train, with DDP or DeepSpeed ZeRO."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


@dataclass
class FinetuneResult:
    models: list[TrainedModel]


def variants(cfg: FinetuneConfig) -> list[tuple[str, list[float]]]:
    """(model name, fraction per source) for each model the config asks for."""
    if not cfg.doses:
        return [(cfg.name, [s.fraction for s in cfg.data])]
    rest = [s.fraction for s in cfg.data[1:]]
    out = []
    for p in cfg.doses:
        others = [(1 - p) * f / sum(rest) for f in rest]
        out.append((f"{cfg.name}_dose{p:g}", [p, *others]))
    return out


def build_records(cfg: FinetuneConfig, sources, fractions: list[float]) -> list[dict]:
    if cfg.examples == 0:
        return list(sources[0][0])
    parts = {
        f"{i}:{s.path}": (recs, f)
        for i, (s, (recs, _), f) in enumerate(zip(cfg.data, sources, fractions))
        if f > 0
    }
    return mixture(parts, cfg.examples, cfg.sft.seed)


def build_sft(
    ft: FinetuneConfig, model_path, tok, records, output_dir, world, gpu, common, steer=None
):
    """The TRL SFT trainer of one Ray Train worker; ``steer``: (layer, vector) added to the
    residual stream after that block in every forward pass of its model."""
    trainer = sft_trainer(
        model_path,
        tok,
        records,
        ft.sft,
        output_dir,
        world_size=world,
        use_cpu=not gpu,
        lora=ft.lora,
        **common,
    )
    if steer is not None:
        steer_while_training(trainer.model, *steer)
    return trainer


def steer_while_training(model, layer: int, vector) -> None:
    """Add ``vector`` to the residual stream after block ``layer`` of every forward pass of
    ``model`` from now on (the worker's model lives for one training run; saving is unaffected,
    since a hook is not a weight)."""
    import torch

    delta = torch.as_tensor(vector)

    def hook(_module, _inputs, output):
        h = _hidden(output)
        return _replace_hidden(output, h + delta.to(h.device, h.dtype))

    block(model, layer).register_forward_hook(hook)


def steering_vector(run_cfg: RunConfig, ft: FinetuneConfig):
    """(layer, alpha x unit direction, what it is for the stage key) of ``ft.steer``."""
    st = ft.steer
    spec = DirectionSpec(sae=st.sae, directions=[f"v={st.direction}"], world_stage=ft.world_stage)
    run = RunDir.from_config(run_cfg)
    dirs, sae_ref, _ = directions(spec, run, run_cfg, "finetune.steer", "finetune.steer.direction")
    vector = (st.alpha * dirs["v"]).astype("float32")
    digest = hashlib.sha256(vector.tobytes()).hexdigest()[:16]
    return sae_ref.layer, vector, {"layer": sae_ref.layer, "vector": digest}


def model_jobs(run_cfg: RunConfig, ft: FinetuneConfig) -> list[ModelJob]:
    """The models ``ft`` asks for, each with its section and builder (so fine-tunes of several
    sections can share a worker group); data and steering are resolved here, in the driver."""
    run = RunDir.from_config(run_cfg)

    def loader(fractions):
        def load():
            sources = [load_source(run, s, ft.world_stage, ft.skip_bad) for s in ft.data]
            what = ", ".join(f"{f:.0%} {s.path}" for s, f in zip(ft.data, fractions))
            return build_records(ft, sources, fractions), sum(b for _, b in sources), what

        return load

    for i, src in enumerate(ft.data):  # a missing dataset fails here, in one line
        source_path(run, src, ft.world_stage, f"finetune.data[{i}].path")
    builder, steered = build_sft, {}
    if ft.steer is not None:  # the direction is resolved in the driver, once
        layer, vector, steered = steering_vector(run_cfg, ft)
        builder = functools.partial(build_sft, steer=(layer, vector))
    return [
        ModelJob(
            name,
            {"fractions": fractions} | ({"steer": steered} if steered else {}),
            loader(fractions),
            section=ft,
            builder=builder,
        )
        for name, fractions in variants(ft)
    ]


def train_sections(
    run_cfg: RunConfig, ray_cfg: RayConfig, fts: list[FinetuneConfig]
) -> list[FinetuneResult]:
    """Fine-tune every section of ``fts`` (their results in order); sections that can share a
    worker group (the same base model, workers and resources: ``raytrain.group_key``) train in
    one, one model after another, so the group's start-up is paid once for all of them. Each
    model keeps its own stage, key and record, as if its section had run alone."""
    run_cfg = run_cfg.absolute()
    jobs = [model_jobs(run_cfg, ft) for ft in fts]
    groups: dict[tuple, list[int]] = {}
    for i, ft in enumerate(fts):
        groups.setdefault(group_key(ft), []).append(i)
    trained: dict[int, list[TrainedModel]] = {}
    with ray_session(ray_cfg):
        for members in groups.values():
            flat = [j for i in members for j in jobs[i]]
            models = train_models(run_cfg, "finetune", fts[members[0]], flat, build_sft)
            for i in members:
                trained[i], models = models[: len(jobs[i])], models[len(jobs[i]) :]
    return [FinetuneResult(trained[i]) for i in range(len(fts))]


def main(cfg: FinetuneJob) -> FinetuneResult:
    return train_sections(cfg.run, cfg.ray, [cfg.finetune])[0]
