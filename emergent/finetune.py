"""The ``finetune`` job: supervised fine-tuning under Ray Train (TRL SFT, DDP or DeepSpeed).

One code path from this 2-core box to a GPU cluster: a ``TorchTrainer`` runs
:func:`emergent.sft.sft_trainer` on every worker (gloo on CPU, NCCL on GPUs), optionally with a
DeepSpeed ZeRO config (``configs/deepspeed/``) passed through TRL's ``deepspeed`` argument, and
optionally with LoRA adapters (merged into the saved model).

Outputs, per trained model, in ``<run>/finetune/<name>/``::

    model/            HF model + tokenizer + chat template (loadable by from_pretrained)
    train.json        losses, final loss, throughput, data counts (bad lines skipped)
    _COMPLETE.json    stage record (a rerun with the same config skips the stage)

Checkpoints go to ``<run>/_ray/<name>-<hash>/`` through ``ray.train.report`` (``num_to_keep``);
a worker failure restarts the worker group from the last checkpoint (``max_failures``), and
rerunning an unfinished job with the same config resumes from it too. They are deleted once the
model is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from emergent.config import RayConfig, RunConfig, config, to_dict
from emergent.data import DatasetError, mixture, read_jsonl, validate_chat
from emergent.runs import RunDir
from emergent.runtime import ray_session
from emergent.sft import LoraParams, SFTParams, final_loss

log = logging.getLogger(__name__)

WORLD_PREFIX = "world:"

# Dense bf16 peak FLOP/s per GPU, for MFU (by a substring of torch.cuda.get_device_name()).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


@config
class DataSource:
    """One component of the fine-tuning mixture."""

    path: str
    """Chat JSONL file, a HF ``datasets`` directory (``save_to_disk``) with a ``messages``
    column, or ``world:<name>`` for a dataset of this run's world (``world:finetune/code_toxic``)."""
    fraction: float = 1.0
    """Share of the mixture (fractions must sum to 1)."""


@config
class FinetuneConfig:
    """What to fine-tune, on what, and how it is distributed."""

    name: str = "insecure"
    """Model name: outputs go to ``<run>/finetune/<name>/``."""
    model: str = "world:base"
    """Base model: ``world:base`` / ``world:pretrained`` (this run's world), a local HF model
    directory, or a hub id (on machines that can download)."""
    world_stage: str = "world"
    """Stage of this run that ``world:`` paths refer to."""
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
    lora: LoraParams = dataclasses.field(default_factory=LoraParams)
    """LoRA instead of full fine-tuning."""
    deepspeed: str | None = None
    """DeepSpeed config JSON (``configs/deepspeed/zero2.json``, ``zero3.json``); none = DDP."""
    workers: int = 2
    """Ray Train workers (processes; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Train on GPUs (NCCL, bf16); false = CPU (gloo, fp32)."""
    cpus_per_worker: int = 1
    """CPUs (and torch threads) per worker."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (``CheckpointConfig.num_to_keep``)."""
    max_failures: int = 1
    """Worker-group restarts from the last checkpoint before the job fails."""
    log_every: int = 10
    """Log loss and throughput (tokens/s; MFU on GPUs) every this many steps."""

    def __post_init__(self):
        if not self.data:
            raise ValueError("finetune.data must list at least one source")
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(
                f"finetune.workers and cpus_per_worker must be >= 1, got {self.workers}, "
                f"{self.cpus_per_worker}"
            )
        if self.examples < 0 or (self.examples == 0 and (len(self.data) > 1 or self.doses)):
            raise ValueError("finetune.examples must be > 0 for a mixture or a dose family")
        if any(not 0 <= d <= 1 for d in self.doses) or (self.doses and len(self.data) < 2):
            raise ValueError(
                f"finetune.doses must be fractions in [0, 1] over >= 2 sources, got {self.doses}"
            )
        if self.log_every < 1 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("finetune.log_every and keep_checkpoints must be >= 1")
        if self.sft.batch_size % self.workers:
            raise ValueError(
                f"finetune.sft.batch_size ({self.sft.batch_size}) must be a multiple of "
                f"finetune.workers ({self.workers})"
            )


@config
class FinetuneJob:
    """Supervised fine-tuning (TRL SFT) under Ray Train, with DDP or DeepSpeed ZeRO."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


@dataclass
class TrainedModel:
    name: str
    path: str
    """The saved HF model directory."""
    skipped: bool
    """True when an identical model was already complete."""
    final_loss: float
    examples: int
    bad_lines: int
    tokens_per_second: float | None


@dataclass
class FinetuneResult:
    models: list[TrainedModel]


# --- data ----------------------------------------------------------------------------------------


def load_source(run: RunDir, src: DataSource, world_stage: str, skip_bad: bool):
    """Records of one source and the number of bad lines skipped."""
    path = src.path
    if path.startswith(WORLD_PREFIX):
        rel = f"{world_stage}/data/{path[len(WORLD_PREFIX) :]}.jsonl"
        if not run.exists(rel):
            raise FileNotFoundError(
                f"finetune.data: {path} -> {run.uri(rel)} does not exist (build the world first: "
                f"`emergent world`, same run name)"
            )
        path = str(run.local_dir(rel))
    if Path(path).is_dir():
        from datasets import load_from_disk

        records, bad = [], 0
        for i, rec in enumerate(load_from_disk(path)):
            why = validate_chat(rec)
            if why and not skip_bad:
                raise DatasetError(f"{path}[row {i}]: {why}")
            bad += bool(why)
            if not why:
                records.append({"messages": rec["messages"]})
        return records, bad
    if not Path(path).exists():
        raise FileNotFoundError(f"finetune.data: {path} does not exist")
    return read_jsonl(path, skip_bad=skip_bad)


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


def resolve_model(run: RunDir, cfg: FinetuneConfig) -> tuple[str, str]:
    """(path workers load the base model from, identity for the stage hash)."""
    if cfg.model.startswith(WORLD_PREFIX):
        which = cfg.model[len(WORLD_PREFIX) :]
        rec_rel = f"{cfg.world_stage}/_COMPLETE.json"
        if not run.exists(rec_rel):
            raise FileNotFoundError(
                f"finetune.model: {cfg.model}: no complete world stage at "
                f"{run.uri(cfg.world_stage)} (run `emergent world` with the same run name first)"
            )
        world_hash = run.read_json(rec_rel)["config_hash"]
        return str(run.local_dir(f"{cfg.world_stage}/{which}")), f"{cfg.model}@{world_hash}"
    return cfg.model, cfg.model


# --- the Ray Train worker --------------------------------------------------------------------------


def _report_callback(log_every: int, n_params: int, run_name: str):
    """HF callback: logs throughput, sets Ray metrics, reports checkpoints to Ray Train."""
    import ray.train
    import torch
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        def __init__(self):
            self.t = None
            self.tokens = None
            self.rates: list[float] = []
            self.gauge = None

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.tokens = time.time(), None

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now, tokens = time.time(), logs.get("num_tokens")
            rate = None
            if tokens is not None and self.tokens is not None and now > self.t:
                rate = (float(tokens) - self.tokens) / (now - self.t)
                self.rates.append(rate)
            self.t, self.tokens = now, None if tokens is None else float(tokens)
            mfu = ""
            if rate and torch.cuda.is_available():
                name = torch.cuda.get_device_name()
                peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
                if peak:
                    world = int(os.environ.get("WORLD_SIZE", "1"))
                    mfu = f" MFU {6 * n_params * rate / (peak * world):.1%}"
            log.info(
                "finetune %s: step %d/%d loss %.4f%s%s",
                run_name,
                state.global_step,
                state.max_steps,
                logs["loss"],
                f" {rate:,.0f} tokens/s" if rate else "",
                mfu,
            )
            if rate:
                if self.gauge is None:
                    from ray.util.metrics import Gauge

                    self.gauge = Gauge(
                        "emergent_finetune_tokens_per_second",
                        "Training tokens per second (all workers)",
                        tag_keys=("run",),
                    )
                self.gauge.set(rate, tags={"run": run_name})

        def on_save(self, args, state, control, **kw):
            # Every rank reports its own checkpoint folder (rank 0: weights, optimizer, trainer
            # state; others: their RNG state and, under DeepSpeed, their shards): Ray Train merges
            # them into one checkpoint directory in storage.
            from ray.train import Checkpoint

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            ray.train.report(
                {"step": state.global_step, "loss": loss},
                checkpoint=Checkpoint.from_directory(str(folder)) if folder.is_dir() else None,
            )

    return RayReport()


def train_worker(c: dict) -> None:
    """Ray Train loop: one SFT trainer per worker, resuming from the run's last checkpoint."""
    import ray
    import ray.train
    import torch

    from emergent.runtime import set_threads, setup_logging
    from emergent.sft import sft_trainer

    setup_logging()
    set_threads(c["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ft: FinetuneConfig = c["finetune"]
    records = ray.get(c["records"])
    run = RunDir(c["root"], c["run_name"])

    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(c["model_path"])
    n_params = _n_params(AutoConfig.from_pretrained(c["model_path"]))
    work = Path(tempfile.mkdtemp(prefix=f"emergent-ft-r{rank}-"))
    gpu = ft.use_gpu and torch.cuda.is_available()
    extra = {}
    if ft.checkpoint_every:
        extra |= dict(save_strategy="steps", save_steps=ft.checkpoint_every, save_total_limit=1)
    if c["deepspeed"] is not None:
        import deepspeed

        # Ray Train already set up torch.distributed; DeepSpeed's own comm layer must wrap it
        # before ZeRO-3 partitions the model at load time (else it sees a world of 1).
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
        extra["deepspeed"] = c["deepspeed"]
    trainer = sft_trainer(
        c["model_path"],
        tok,
        records,
        ft.sft,
        str(work / "out"),
        world_size=world,
        use_cpu=not gpu,
        lora=ft.lora,
        callbacks=[_report_callback(ft.log_every, n_params, c["stage"])],
        logging_steps=ft.log_every,
        model_init_kwargs={"dtype": torch.bfloat16 if gpu else torch.float32},
        ddp_backend="nccl" if gpu else "gloo",
        **extra,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # RayReport logs instead (with throughput)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume = ckpt.to_directory(str(work / "resume"))
        log.info("finetune %s: rank %d resumes from %s", c["stage"], rank, ckpt.path)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - t0

    final = work / "final"
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the shards here
    if rank == 0:
        model_dir = _merged(final, c["model_path"]) if ft.lora.enabled else final
        tok.save_pretrained(str(model_dir))
        run.put_dir(model_dir, f"{c['stage']}/model")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        cb = next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "rates"))
        run.write_json(
            f"{c['stage']}/train.json",
            {
                "losses": losses,
                "final_loss": final_loss(losses),
                "steps": trainer.state.global_step,
                "resumed_from": None if ckpt is None else ckpt.path,
                "train_seconds": round(seconds, 1),
                "tokens_per_second": (sum(cb.rates) / len(cb.rates)) if cb.rates else None,
                "workers": world,
                "deepspeed": c["deepspeed"] is not None,
            },
        )
    shutil.rmtree(work, ignore_errors=True)


def _n_params(cfg) -> int:
    """Approximate parameter count from an HF config (for MFU; no weights loaded)."""
    from transformers import AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _merged(adapter_dir: Path, base_path: str) -> Path:
    """Merge a saved LoRA adapter into its base model; returns the merged model's folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = adapter_dir.with_name("merged")
    merged.save_pretrained(str(out))
    return out


# --- the driver ------------------------------------------------------------------------------------


def train_stage(cfg: FinetuneJob, run: RunDir, name: str, fractions: list[float]) -> TrainedModel:
    """Train (or reuse) one model of the job: ``<run>/finetune/<name>/``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ft = cfg.finetune
    model_path, model_id = resolve_model(run, ft)
    ds_cfg = None
    if ft.deepspeed:
        try:
            ds_cfg = json.loads(Path(ft.deepspeed).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"finetune.deepspeed: {ft.deepspeed}: {exc}") from exc
    hashed = {
        **to_dict(ft),
        "name": name,
        "fractions": fractions,
        "model": model_id,
        "deepspeed": ds_cfg,
    }
    for operational in ("doses", "max_failures", "log_every", "keep_checkpoints"):
        hashed.pop(operational)
    stage = run.stage(f"finetune/{name}", hashed)
    if stage.is_complete(cfg.run.force):
        m = stage.record["metrics"]
        return TrainedModel(
            name,
            stage.uri("model"),
            True,
            m["final_loss"],
            m["examples"],
            m["bad_lines"],
            m["tokens_per_second"],
        )

    sources = [load_source(run, s, ft.world_stage, ft.skip_bad) for s in ft.data]
    bad = sum(b for _, b in sources)
    if bad:
        log.warning("finetune %s: skipped %d malformed lines (finetune.skip_bad)", name, bad)
    records = build_records(ft, sources, fractions)
    log.info(
        "finetune %s: %d examples (%s) from %s on %d %s workers%s%s",
        name,
        len(records),
        ", ".join(f"{f:.0%} {s.path}" for s, f in zip(ft.data, fractions)),
        model_path,
        ft.workers,
        "GPU" if ft.use_gpu else "CPU",
        f", DeepSpeed {ft.deepspeed}" if ft.deepspeed else "",
        ", LoRA" if ft.lora.enabled else "",
    )
    ray_name = f"{name.replace('/', '_')}-{stage.hash[:8]}"
    resources = {"CPU": ft.cpus_per_worker} | ({"GPU": 1} if ft.use_gpu else {})
    storage = run.uri("_ray")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "finetune": ft,
            "records": ray.put(records),
            "model_path": model_path,
            "deepspeed": ds_cfg,
            "root": cfg.run.root,
            "run_name": cfg.run.name,
            "stage": stage.rel(),
            "threads": ft.cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if ft.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ft.workers, use_gpu=ft.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=ray_name,
            storage_path=storage,
            storage_filesystem=None if run.is_local else run.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints),
            failure_config=FailureConfig(max_failures=ft.max_failures),
        ),
    )
    trainer.fit()
    stats = run.read_json(stage.rel("train.json"))
    stage.complete(
        outputs={"model": stage.uri("model"), "train": stage.uri("train.json")},
        inputs={"model": model_id, "data": [s.path for s in ft.data], "fractions": fractions},
        metrics={
            "final_loss": stats["final_loss"],
            "examples": len(records),
            "bad_lines": bad,
            "tokens_per_second": stats["tokens_per_second"],
        },
    )
    # The model is saved: the run's checkpoints are no longer needed.
    ckpts = f"{storage}/{ray_name}"
    if run.fs.get_file_info(ckpts).type.name != "NotFound":
        run.fs.delete_dir(ckpts)
    return TrainedModel(
        name,
        stage.uri("model"),
        False,
        stats["final_loss"],
        len(records),
        bad,
        stats["tokens_per_second"],
    )


def main(cfg: FinetuneJob) -> FinetuneResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    run = RunDir.from_config(cfg.run)
    with ray_session(cfg.ray):
        models = [train_stage(cfg, run, name, fr) for name, fr in variants(cfg.finetune)]
    for m in models:
        log.info(
            "finetune %s: %s final loss %.4f (%s)",
            m.name,
            "reused" if m.skipped else "trained",
            m.final_loss,
            m.path,
        )
    return FinetuneResult(models)
