"""The ``train-sae`` job: a sparse autoencoder (sae-lens architectures) on a model's residual
stream, trained by Ray Train workers from activations harvested on Ray Data.

Data: ``source: stream`` harvests while training (the activation dataset of emergent.harvest is
split across the workers with ``ray.train.get_dataset_shard``; nothing touches disk) and
``source: cache`` trains on the Parquet shards of the ``harvest`` job (run first if missing,
reused otherwise). Either way each worker draws from a local shuffle buffer, so a batch mixes
many documents. Runs are reproducible: the harvest keeps document order, the split across
workers is ordered (each rank gets the same rows every run) and every shuffle is seeded; two
cache-mode trainings of the same config give bit-identical weights.

Training: the SAE module and its losses are sae-lens' (``TopKTrainingSAE`` by default, also
BatchTopK, standard ReLU + L1, JumpReLU), in a small loop of ours: DDP (gradients all-reduced),
Adam with gradient clipping, activations scaled so their mean norm is sqrt(d_model) (factor
estimated on the first batches of every worker, averaged; folded into the saved weights), the
TopK decoder effectively unit-norm (sae-lens rescales activations by decoder norms), dead
latents (no activation for ``dead_window`` steps on any worker) fed to TopK's auxiliary loss.
Checkpoints every ``checkpoint_every`` steps; a restarted worker group resumes from the last one
(in stream mode the data stream restarts; SAE steps continue from the checkpoint).

Outputs in ``<run>/sae/<name>/``: ``sae/`` in sae-lens format (``SAE.load_from_disk``; works on
raw activations), ``norm.json``, ``harvest.json`` (what was harvested), ``train.json`` (loss
curve, throughput), ``metrics.json`` (held-out FVU, L0, dead and dense fractions, CE increase
when the reconstruction is spliced into the model vs zero-ablation) and ``top_examples.parquet``
(each latent's top activations with their token contexts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from emergent import harvest as harvest_job
from emergent import refs
from emergent.config import RayConfig, RunConfig, config, stage_key
from emergent.harvest import (
    HarvestConfig,
    activations,
    corpus,
)
from emergent.models import check_layer
from emergent.runs import RunDir
from emergent.runtime import ray_session, set_threads, setup_logging
from emergent.sae.model import SAEParams, batch_fvu, make_sae, save_sae, step_module
from emergent.telemetry import record
from emergent.train.sae_eval import evaluate_task

log = logging.getLogger(__name__)


@config
class TrainSAEConfig:
    """Which activations, which SAE, and how training is distributed."""

    name: str = "base"
    """Outputs go to ``<run>/sae/<name>/``."""
    source: Literal["stream", "cache"] = "stream"
    """``stream``: harvest while training; ``cache``: train on the ``harvest`` job's shards."""
    harvest: HarvestConfig = dataclasses.field(default_factory=HarvestConfig)
    """The activations (model, layer, corpus, positions; see ``emergent harvest --help``)."""
    sae: SAEParams = dataclasses.field(default_factory=SAEParams)
    """The SAE."""
    workers: int = 2
    """Ray Train workers (DDP)."""
    cpus_per_worker: float = 0.5
    """CPUs per worker (fractional so stream-mode harvest actors fit beside them)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL)."""
    shuffle_buffer: int = 16_384
    """Rows in each worker's local shuffle buffer."""
    checkpoint_every: int = 250
    """Checkpoint every this many steps (0 = never)."""
    max_failures: int = 1
    """Worker-group restarts from the last checkpoint before the job fails."""
    log_every: int = 100
    """Log losses and activations/s every this many steps."""
    top_examples: int = 10
    """Top-activating held-out tokens kept per latent."""
    epochs: int = 1
    """Passes over the activations; training stops at ``sae.steps`` or when the data ends."""
    memory_mb: int = 2048
    """Keep the activations in the workers' memory after the first pass when they fit in this
    many MiB (all workers together); else every pass re-reads (cache) or re-harvests (stream)."""

    # outside the stage key; memory_mb is keyed below when epochs > 1 (it decides whether later
    # passes replay the first pass's order or draw a new one)
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "cpus_per_worker",
        "checkpoint_every",
        "max_failures",
        "log_every",
        "memory_mb",
    )

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"train_sae.epochs must be >= 1, got {self.epochs}")
        if self.workers < 1 or self.sae.batch_size % self.workers:
            raise ValueError(
                f"sae.batch_size ({self.sae.batch_size}) must be a multiple of workers ({self.workers})"
            )


@config
class TrainSAEJob:
    """Train a sparse autoencoder on residual-stream activations under Ray Train."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    train_sae: TrainSAEConfig = dataclasses.field(default_factory=TrainSAEConfig)


@dataclass
class SAEResult:
    path: str
    """The SAE in sae-lens format."""
    metrics: dict
    skipped: bool


# --- the Ray Train loop ----------------------------------------------------------------------------


def _batches(c: dict):
    """This worker's shuffled activation batches (float32 tensors).

    The first pass streams the shard through a local shuffle buffer; when the shard fits in
    ``memory_mb``, later passes are fresh permutations of the rows kept in memory (no second
    harvest in stream mode, no Parquet re-read and split in cache mode: on a small corpus
    that restart cost would dominate each pass)."""
    import ray.train
    import torch

    cfg = c["cfg"]
    shard = ray.train.get_dataset_shard("train")
    per = cfg.sae.batch_size // c["world"]
    kept: list | None = []
    budget = cfg.memory_mb * 2**20 / c["world"]
    for b in shard.iter_torch_batches(
        batch_size=per,
        local_shuffle_buffer_size=cfg.shuffle_buffer,
        local_shuffle_seed=cfg.sae.seed + c["rank"],
        drop_last=True,
    ):
        x = b["act"].float()
        if kept is not None:
            kept.append(x)
            if len(kept) * x.numel() * 4 > budget:
                kept = None
        yield x
    rows = torch.cat(kept) if kept else None
    for epoch in range(1, cfg.epochs):
        if rows is None:  # too big to keep: each pass re-executes the dataset
            for b in shard.iter_torch_batches(
                batch_size=per,
                local_shuffle_buffer_size=cfg.shuffle_buffer,
                local_shuffle_seed=cfg.sae.seed + 1000 * epoch + c["rank"],
                drop_last=True,
            ):
                yield b["act"].float()
            continue
        g = torch.Generator().manual_seed(cfg.sae.seed + 1000 * epoch + c["rank"])
        perm = torch.randperm(len(rows), generator=g)
        for i in range(0, len(rows) - per + 1, per):
            yield rows[perm[i : i + per]]


class SAELoop:
    """Our training loop around a sae-lens training SAE: Adam with warm-up and gradient
    clipping, DDP when ``distributed`` (gradients all-reduced), dead-latent tracking agreed
    across workers (fed to TopK's auxiliary loss)."""

    def __init__(self, p: SAEParams, d_in: int, device, distributed: bool = False):
        import torch

        torch.manual_seed(p.seed)
        self.p, self.distributed = p, distributed
        self.sae = make_sae(p, d_in).to(device)
        module = step_module(self.sae)
        if distributed:
            import ray.train.torch

            module = ray.train.torch.prepare_model(module)
        self.module = module
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=p.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, p.warmup_steps))
        )
        self.since_fired = torch.zeros(p.d_sae, device=device)
        self.step = 0

    def train_step(self, x):
        """One optimisation step on a (scaled) batch; returns (loss, feature acts, mse)."""
        import torch
        import torch.distributed as dist

        dead = self.since_fired >= self.p.dead_window
        loss, acts, mse = self.module(x, dead, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            fired = (acts > 0).any(0).float()
            if self.distributed:
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            self.since_fired += 1
            self.since_fired[fired > 0] = 0
        self.step += 1
        return loss, acts, mse

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.p.dead_window).float().mean())

    def state_dict(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "since_fired": self.since_fired.cpu(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.since_fired = state["since_fired"].to(self.since_fired.device)
        self.step = state["step"]


def sae_worker(c: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    setup_logging()
    set_threads(c["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    c = c | {"rank": rank, "world": world}
    cfg: TrainSAEConfig = c["cfg"]
    p = cfg.sae
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    loop = SAELoop(p, c["d_model"], device, distributed)
    scale, history = 1.0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        loop.load_state_dict(state)
        scale, history = state["scale"], state["history"]
        log.info("train-sae %s: rank %d resumes at step %d", c["stage"], rank, loop.step)

    def all_mean(x: float) -> float:
        if not distributed:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / world

    it = _batches(c)
    first = []
    if ckpt is None and p.normalize:
        first = [b for _, b in zip(range(p.norm_batches), it)]
        local = torch.cat(first).norm(dim=1).mean().item() if first else 1.0
        scale = math.sqrt(c["d_model"]) / all_mean(local)
    pending = iter(first)
    t0, seen, rates = time.time(), 0, []
    while loop.step < p.steps:
        x = next(pending, None)
        if x is None:
            x = next(it, None)
        # every worker stops as soon as one runs out (they all-reduce every step)
        if all_mean(0.0 if x is None else 1.0) < 1.0:
            log.info("train-sae: the data ran out at step %d of %d", loop.step, p.steps)
            break
        loss, acts, mse = loop.train_step(x.to(device) * scale)
        step = loop.step
        seen += len(x)
        if step % cfg.log_every == 0 or step == p.steps:
            rate = seen * world / (time.time() - t0)
            rates.append(rate)
            row = {
                "step": step,
                "loss": all_mean(loss.item()),
                "mse": all_mean(mse.item()),
                "fvu": all_mean(batch_fvu(loop.sae, x.to(device) * scale)),
                "l0": all_mean((acts > 0).float().sum(1).mean().item()),
                "dead_fraction": loop.dead_fraction(),
                "activations_per_second": rate,
            }
            history.append(row)
            if rank == 0:
                for key in ("fvu", "l0", "dead_fraction", "activations_per_second"):
                    record(f"emergent_sae_{key}", row[key], sae=c["stage"])
                log.info(
                    "train-sae step %d/%d: loss %.4f, FVU %.3f, L0 %.1f, dead %.3f, "
                    "%.0f activations/s",
                    step,
                    p.steps,
                    row["loss"],
                    row["fvu"],
                    row["l0"],
                    row["dead_fraction"],
                    rate,
                )
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < p.steps:
            _report(c, rank, step, loop.state_dict() | {"scale": scale, "history": history})
    step = loop.step
    sae = loop.sae
    if rank == 0:
        run = RunDir(c["root"], c["run_name"])
        out = Path(tempfile.mkdtemp(prefix="emergent-sae-"))
        save_sae(sae.cpu(), scale if p.normalize else None, out / "sae")
        run.put_dir(out / "sae", f"{c['stage']}/sae")
        run.write_json(
            f"{c['stage']}/norm.json",
            {
                "scaling_factor": scale,
                "folded": p.normalize,
                "target_norm": math.sqrt(c["d_model"]),
            },
        )
        run.write_json(
            f"{c['stage']}/train.json",
            {
                "history": history,
                "steps": step,
                "workers": world,
                "seconds": round(time.time() - t0, 1),
                "activations_per_second": rates[-1] if rates else None,
                "resumed": ckpt is not None,
            },
        )
        shutil.rmtree(out, ignore_errors=True)
    ray.train.report({"step": step, "done": 1})


def _report(c: dict, rank: int, step: int, state: dict) -> None:
    """Report a checkpoint (rank 0 writes it; every rank reports)."""
    import ray.train
    import torch

    if rank != 0:
        ray.train.report({"step": step})
        return
    d = Path(tempfile.mkdtemp(prefix="emergent-sae-ckpt-"))
    torch.save(state, d / "state.pt")
    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
    shutil.rmtree(d, ignore_errors=True)


# --- the job ---------------------------------------------------------------------------------------


def sae_key(ts: TrainSAEConfig, identity: str) -> dict:
    """The SAE stage's key: the config's output fields, the harvest's key on the model
    ``identity``, and ``memory_mb`` when epochs > 1 (in-memory passes replay the first pass's
    order; re-read passes draw a new one)."""
    return stage_key(ts) | {
        "harvest": ts.harvest.key(identity),
        "memory_mb": ts.memory_mb if ts.epochs > 1 else None,
    }


def main(cfg: TrainSAEJob) -> SAEResult:
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    ts = cfg.train_sae
    hv = ts.harvest
    run = RunDir.from_config(cfg.run)
    source = refs.model(cfg.run, hv.model, hv.world_stage, "train_sae.harvest.model")
    model_d = check_layer(source.local(), hv.layer, "train_sae.harvest.layer")
    stage = run.stage(f"sae/{ts.name}", sae_key(ts, source.identity))
    if stage.is_complete(cfg.run.force):
        return SAEResult(stage.uri("sae"), run.read_json(stage.rel("metrics.json")), True)
    with ray_session(cfg.ray):
        if ts.source == "cache":
            hres = harvest_job.main(harvest_job.HarvestJob(run=cfg.run, ray=cfg.ray, harvest=hv))
            ds = (
                ray.data.read_parquet(hres.path, filesystem=None if run.is_local else run.fs)
                .select_columns(["act"])  # pushed down into the read
                .randomize_block_order(seed=ts.sae.seed)
            )
            manifest = run.read_json(f"harvest/{hv.name}/manifest.json")
            held = run.read_json(f"harvest/{hv.name}/eval_docs.json")
            d_model = manifest["d_model"]
        else:
            train, held = corpus(hv, run)
            ds = activations(train, source, hv)
            d_model = model_d
            manifest = hv.manifest(source, train, held, d_model, mode="stream")
        ray_name = f"sae-{ts.name.replace('/', '_')}-{stage.hash[:8]}"
        if cfg.run.force and run.exists(f"_ray/{ray_name}"):  # start over, not resume
            run.fs.delete_dir(run.uri(f"_ray/{ray_name}"))
        trainer = TorchTrainer(
            sae_worker,
            train_loop_config={
                "cfg": ts,
                "d_model": d_model,
                "root": cfg.run.root,
                "run_name": cfg.run.name,
                "stage": stage.rel(),
                "threads": max(1, int(ts.cpus_per_worker)),
            },
            torch_config=TorchConfig(backend="nccl" if ts.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=ts.workers,
                use_gpu=ts.use_gpu,
                resources_per_worker={"CPU": ts.cpus_per_worker}
                | ({"GPU": 1} if ts.use_gpu else {}),
            ),
            datasets={"train": ds},
            dataset_config=DataConfig(execution_options=_ordered()),
            run_config=RayRunConfig(
                name=ray_name,
                storage_path=run.uri("_ray"),
                storage_filesystem=None if run.is_local else run.fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=ts.max_failures),
            ),
        )
        trainer.fit()
        # held-out evaluation in a task of a worker's size, not in the driver
        task = ray.remote(num_cpus=ts.cpus_per_worker, num_gpus=1 if ts.use_gpu else 0)(
            evaluate_task
        )
        metrics, top = ray.get(
            task.remote(
                cfg.run.root,
                cfg.run.name,
                stage.rel("sae"),
                source,
                hv,
                held,
                ts.top_examples,
                max(1, int(ts.cpus_per_worker)),
            )
        )
    stats = run.read_json(stage.rel("train.json"))
    metrics |= {
        "train_steps": stats["steps"],
        "activations_per_second": stats["activations_per_second"],
        "workers": stats["workers"],
    }
    run.write_json(stage.rel("harvest.json"), manifest)
    run.write_parquet(stage.rel("top_examples.parquet"), top)
    run.write_json(stage.rel("metrics.json"), metrics)
    stage.complete(
        outputs={
            "sae": stage.uri("sae"),
            "metrics": stage.uri("metrics.json"),
            "top_examples": stage.uri("top_examples.parquet"),
        },
        inputs={"model": source.identity},
        metrics=metrics,
    )
    if run.exists(f"_ray/{ray_name}"):
        run.fs.delete_dir(run.uri(f"_ray/{ray_name}"))
    log.info(
        "train-sae %s: %s",
        ts.name,
        {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    )
    return SAEResult(stage.uri("sae"), metrics, False)


def _ordered():
    """Ray Data options that make the split across workers reproducible: blocks reach the
    split in dataset order and go to the worker with the fewest rows (no locality hints), so
    each rank sees the same rows, in the same order, run after run (the block order is
    shuffled with a seed, the local shuffle buffers are seeded per rank)."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts
