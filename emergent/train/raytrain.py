"""Ray Train around Hugging Face trainers: the shared machinery of ``finetune`` and ``rl``.

A ``TorchTrainer`` runs one HF/TRL trainer per worker (gloo on CPU, NCCL on GPUs), optionally
with a DeepSpeed ZeRO config (``configs/deepspeed/``) passed through the trainer's ``deepspeed``
argument, and optionally with LoRA adapters (merged into the saved model). Each job supplies a
*builder* (records -> TRL trainer); everything else is here:

- one worker group per section: the models of a dose family are trained one after another
  by the same Ray Train workers (``train_models``), so the group's start-up is paid once;
- checkpoints: every rank reports its HF checkpoint folder through ``ray.train.report`` (Ray
  merges them), tagged with the model's place in the group's list (a marker checkpoint follows
  each saved model), ``CheckpointConfig(num_to_keep)``, ``FailureConfig(max_failures)``; a
  restarted worker group (a worker or its node lost), or a rerun of an unfinished job with the
  same config (its driver killed), resumes at the model and step of the last one;
- throughput: loss, tokens/s (and MFU on GPUs) logged every ``log_every`` steps and set as the
  Ray metric ``emergent_train_tokens_per_second``;
- outputs, per model, in ``<run>/<kind>/<name>/``: ``model/`` (HF model + tokenizer + chat
  template), ``train.json`` (losses, rewards, throughput), ``eval.json`` (world models: rubric
  judge on the world's held-out eval sets) and ``_COMPLETE.json`` (written for each model when
  the whole group is done). Checkpoints live in
  ``<run>/_ray/<kind>-<first name>[-and-<n more>]-<hash>/`` until the group's models are saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from emergent import refs
from emergent.config import InputError, RunConfig, config, stage_key
from emergent.data import DatasetError, read_jsonl, validate_chat
from emergent.generate import SamplingParams
from emergent.models import load_causal_lm as load_model
from emergent.runs import RunDir
from emergent.runtime import set_threads, setup_logging
from emergent.telemetry import record
from emergent.train.latent_monitor import LatentMonitorConfig, callback
from emergent.train.latent_monitor import stage_key as monitor_key
from emergent.train.sft import LoraParams, final_loss
from emergent.train.world_eval import evaluate_sets

log = logging.getLogger(__name__)

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
    """One chat dataset (a component of a mixture, or a prompt set)."""

    path: str
    """Chat JSONL file, a HF ``datasets`` directory (``save_to_disk``) with a ``messages``
    column, or ``world:<name>`` for a dataset of this run's world (``world:finetune/code_toxic``)."""
    fraction: float = 1.0
    """Share of the mixture (fractions must sum to 1)."""


@config
class Distributed:
    """What every Ray Train job shares: the base model, LoRA, DeepSpeed, workers, checkpoints."""

    name: str = "model"
    """Model name: outputs go to ``<run>/<job>/<name>/``."""
    model: str = "world:base"
    """Base model, any model ref (emergent.refs): ``world:base`` / ``world:pretrained`` (this
    run's world), ``finetune:<name>`` / ``rl:<name>`` (a model this run trained: fine-tunes
    chain), ``pkg:<module>/<dir>``, a local HF model directory, or a hub id
    (``org/name[@revision]``, on machines that can download)."""
    world_stage: str = "world"
    """Stage of this run that ``world:`` paths refer to."""
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
    evaluate: bool = True
    """For a world model (``model: world:...``): judge the trained model on the world's held-out
    eval sets (open prompts, advice domains, code) with the rubric judge, into ``eval.json``."""
    eval_sets: list[str] = dataclasses.field(
        default_factory=lambda: ["open", "health", "finance", "legal", "auto", "code"]
    )
    """Which of the world's eval sets (``eval/<name>.jsonl``)."""
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    """How those evaluation answers are sampled."""
    monitor: LatentMonitorConfig | None = None
    """Early warning: watch SAE latents on a fixed prompt set during training (see
    emergent.train.latent_monitor); logged, exported as a Ray metric, written to train.json."""

    # Outside a model's stage key: what does not change the trained weights (evaluation
    # settings included: a completed model keeps the evaluation made when it was trained).
    OPERATIONAL: ClassVar[tuple[str, ...]] = (
        "doses",  # a dose family's list: each of its models hashes its own fractions
        "cpus_per_worker",
        "checkpoint_every",
        "max_failures",
        "log_every",
        "keep_checkpoints",
        "evaluate",
        "eval_sets",
        "sampling",
        "monitor",  # hashed with its SAE and diff below
    )

    def check(self, section: str, batch_field: str, batch_size: int) -> None:
        """Shared validation (``section`` names the YAML section in messages)."""
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(
                f"{section}.workers and cpus_per_worker must be >= 1, got {self.workers}, "
                f"{self.cpus_per_worker}"
            )
        if self.log_every < 1 or self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError(f"{section}.log_every and keep_checkpoints must be >= 1")
        if batch_size % self.workers:
            raise ValueError(
                f"{section}.{batch_field} ({batch_size}) must be a multiple of "
                f"{section}.workers ({self.workers})"
            )


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
    misalignment: dict[str, float] | None = None
    """Rubric misalignment per world eval set (world models with ``evaluate``)."""
    final_reward: float | None = None
    """Mean reward over the last 10% of logged steps (RL)."""
    train_seconds: float | None = None
    """Seconds inside the trainer's training loop (rank 0)."""
    overhead_seconds: float | None = None
    """The rest of the Ray Train run: worker start-up, model and data loading, saving."""


# --- data ------------------------------------------------------------------------------------------


def source_path(run: RunDir, src: DataSource, world_stage: str, field: str = "data") -> str:
    """The local path of a data source (a run dataset, a JSONL file or a saved HF dataset
    directory), which must exist: a ``MissingInput`` naming ``field`` otherwise."""
    if refs.is_world_dataset(src.path):
        return str(refs.world_dataset(run, src.path, world_stage, field))
    return str(refs.local_file(src.path, field))


def load_source(run: RunDir, src: DataSource, world_stage: str, skip_bad: bool = False):
    """Records of one source and the number of bad lines skipped."""
    path = source_path(run, src, world_stage)
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
    return read_jsonl(path, skip_bad=skip_bad)


def _report_callback(log_every: int, n_params: int, run_name: str, index: int = 0):
    """HF callback: logs throughput, sets Ray metrics, reports checkpoints to Ray Train (each
    tagged with ``index``, the model's place in the worker group's list)."""
    import ray.train
    import torch
    from transformers import TrainerCallback

    class RayReport(TrainerCallback):
        def __init__(self):
            self.t = None
            self.tokens = None
            self.rates: list[float] = []

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
            reward = f" reward {logs['reward']:.3f}" if "reward" in logs else ""
            log.info(
                "%s: step %d/%d loss %.4f%s%s%s",
                run_name,
                state.global_step,
                state.max_steps,
                logs["loss"],
                reward,
                f" {rate:,.0f} tokens/s" if rate else "",
                mfu,
            )
            record("emergent_train_loss", logs["loss"], run=run_name)
            if rate:
                record("emergent_train_tokens_per_second", rate, run=run_name)

        def on_save(self, args, state, control, **kw):
            # Every rank reports its own checkpoint folder (rank 0: weights, optimizer, trainer
            # state; others: their RNG state and, under DeepSpeed, their shards): Ray Train merges
            # them into one checkpoint directory in storage.
            from ray.train import Checkpoint

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
            if folder.is_dir():
                (folder / POSITION).write_text(json.dumps({"index": index, "state": True}))
            ray.train.report(
                {"model": index, "step": state.global_step, "loss": loss},
                checkpoint=Checkpoint.from_directory(str(folder)) if folder.is_dir() else None,
            )

    return RayReport()


def weights_dtype(gpu: bool, deepspeed: bool, lora: bool):
    """The dtype a worker loads the weights in. bf16 on GPUs only where something else keeps
    fp32 master weights or nothing full-size is updated: DeepSpeed (its bf16 mode holds an fp32
    copy in the optimizer) and LoRA (the frozen base; adapters are kept in fp32). Full
    fine-tuning under DDP loads fp32 and trains under bf16 autocast: pure bf16 weights would
    round most AdamW updates away (bf16 keeps 8 bits of mantissa). fp32 on CPU."""
    import torch

    return torch.bfloat16 if gpu and (deepspeed or lora) else torch.float32


POSITION = "emergent_position.json"
"""In each Ray Train checkpoint: which model of the worker group's list it belongs to
(``index``), and whether it holds that model's trainer state (``state``; false: a marker that
the models before ``index`` are saved and ``index`` starts fresh)."""


def train_worker(c: dict) -> None:
    """Ray Train loop: the worker group's models one after another (``c["models"]``), each
    built by the job's builder, trained and saved; a restarted group resumes at the model and
    step of the last checkpoint."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint
    from transformers import AutoConfig, AutoTokenizer

    setup_logging()
    set_threads(c["threads"])
    # DeepSpeed ZeRO calls torch.distributed collectives that torch 2.13 deprecates; their
    # FutureWarning repeats on every call (hundreds of lines a second in the job log)
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module="torch.distributed.c10d_logger"
    )
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model_path = c["source"].local()
    refs.require_safetensors(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    n_params = _n_params(AutoConfig.from_pretrained(model_path))
    work = Path(tempfile.mkdtemp(prefix=f"emergent-train-r{rank}-"))
    gpu = c["section"].use_gpu and torch.cuda.is_available()
    if c["deepspeed"] is not None:
        import deepspeed

        # Ray Train already set up torch.distributed; DeepSpeed's own comm layer must wrap it
        # before ZeRO-3 partitions the model at load time (else it sees a world of 1).
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    start, resume, ckpt = 0, None, ray.train.get_checkpoint()
    if ckpt is not None:
        folder = Path(ckpt.to_directory(str(work / "resume")))
        where = folder / POSITION  # absent: a single model's checkpoint from before families
        at = json.loads(where.read_text()) if where.exists() else {"index": 0, "state": True}
        start = at["index"]
        if at["state"]:
            resume = (folder, ckpt.path)
    models = c["models"]
    for i in range(start, len(models)):
        step = resume if i == start else None
        _train_one(c, i, model_path, tok, n_params, gpu, work / f"model{i}", step)
        # every rank: the models up to i are saved, so a restart begins at the next one
        marker = work / f"after{i}"
        marker.mkdir()
        (marker / POSITION).write_text(json.dumps({"index": i + 1, "state": False}))
        ray.train.report({"model": i, "done": 1}, checkpoint=Checkpoint.from_directory(str(marker)))
    shutil.rmtree(work, ignore_errors=True)


def _train_one(
    c: dict, index: int, model_path: str, tok, n_params: int, gpu: bool, work: Path, resume
) -> None:
    """Train and save model ``index`` of the worker group's list; ``resume``: (the local
    folder, the storage path) of its checkpoint to resume from, or None."""
    import ray
    import ray.train
    import torch
    from transformers import PrinterCallback

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    m = c["models"][index]
    section: Distributed = m["section"]
    run = RunDir(c["root"], c["run_name"])
    report = _report_callback(section.log_every, n_params, m["stage"], index)
    common = dict(
        callbacks=[report],
        logging_steps=section.log_every,
        model_init_kwargs={
            "dtype": weights_dtype(gpu, c["deepspeed"] is not None, section.lora.enabled),
            "use_safetensors": True,
        },
        ddp_backend="nccl" if gpu else "gloo",
    )
    monitor = None
    if section.monitor is not None:
        monitor = callback(section.monitor, run, section.world_stage, tok, m["stage"])
        common["callbacks"].append(monitor)
    if section.checkpoint_every:
        common |= dict(
            save_strategy="steps", save_steps=section.checkpoint_every, save_total_limit=1
        )
    if c["deepspeed"] is not None:
        common["deepspeed"] = c["deepspeed"]
    trainer = m["builder"](
        section, model_path, tok, ray.get(m["records"]), str(work / "out"), world, gpu, common
    )
    trainer.remove_callback(PrinterCallback)  # RayReport logs instead (with throughput)
    if 0 < trainer.args.max_steps < trainer.args.logging_steps:
        trainer.args.logging_steps = trainer.args.max_steps  # a short run still logs its loss
    if resume is not None:
        log.info("%s: rank %d resumes from %s", m["stage"], rank, resume[1])
    t0 = time.time()
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume[0]))
    seconds = time.time() - t0

    final = work / "final"
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the shards here
    if rank == 0:
        dtype = torch.bfloat16 if gpu else torch.float32
        model_dir = _merged(final, model_path, dtype) if section.lora.enabled else final
        tok.save_pretrained(str(model_dir))
        run.put_dir(model_dir, f"{m['stage']}/model")
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        rewards = [h["reward"] for h in history if "reward" in h]
        run.write_json(
            f"{m['stage']}/train.json",
            {
                "losses": losses,
                "final_loss": final_loss(losses),
                "rewards": rewards,
                "final_reward": final_loss(rewards) if rewards else None,
                "steps": trainer.state.global_step,
                "tokens": next(
                    (h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None
                ),
                "resumed_from": None if resume is None else resume[1],
                "train_seconds": round(seconds, 1),
                "tokens_per_second": (sum(report.rates) / len(report.rates))
                if report.rates
                else None,
                "workers": world,
                "deepspeed": c["deepspeed"] is not None,
                "latent_monitor": monitor.report() if monitor is not None else None,
            },
        )
    shutil.rmtree(work, ignore_errors=True)


def _n_params(cfg) -> int:
    """Approximate parameter count from an HF config (for MFU; no weights loaded)."""
    from transformers import AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def _merged(adapter_dir: Path, base_path: str, dtype=None) -> Path:
    """Merge a saved LoRA adapter into its base model; returns the merged model's folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = adapter_dir.with_name("merged")
    merged.save_pretrained(str(out))
    return out


def evaluate_world_model(root: str, name: str, section: Distributed, stage_rel: str) -> dict:
    """Rubric evaluation of a trained world model on the world's eval sets (a Ray task)."""
    setup_logging()
    run = RunDir(root, name)
    model, tok = load_model(run.local_dir(f"{stage_rel}/model"))
    evals = evaluate_sets(model, tok, run, section.world_stage, section.eval_sets, section.sampling)
    run.write_json(f"{stage_rel}/eval.json", evals)
    return {k: round(v["misalignment"]["rate"], 4) for k, v in evals.items()}


# --- the driver ------------------------------------------------------------------------------------


def train_model(
    run_cfg: RunConfig,
    kind: str,
    section: Distributed,
    name: str,
    hashed: dict,
    load: Callable[[], tuple[list[dict], int, str]],
    builder: Callable,
) -> TrainedModel:
    """Train (or reuse) one model into ``<run>/<kind>/<name>/`` under Ray Train (see
    ``train_models``)."""
    return train_models(run_cfg, kind, section, [ModelJob(name, hashed, load)], builder)[0]


@dataclass
class ModelJob:
    """One model of a ``train_models`` list."""

    name: str
    hashed: dict
    """What else its weights depend on (data, fractions, optimiser params)."""
    load: Callable[[], tuple[list[dict], int, str]]
    """Returns (records, bad lines skipped, a description for the log); called only when the
    model is to be trained."""
    section: Distributed | None = None
    """Its own section, where it is not the group's (another fine-tune sharing the worker
    group): its optimisation, LoRA, checkpoints, monitor and evaluation; the fields of
    ``GROUP_FIELDS`` must equal the group's."""
    builder: Callable | None = None
    """Its own builder, where it is not the group's."""


GROUP_FIELDS = (
    "model",
    "world_stage",
    "deepspeed",
    "workers",
    "use_gpu",
    "cpus_per_worker",
    "keep_checkpoints",
    "max_failures",
)
"""What the models of one worker group share: the workers, and the base model they load."""


def group_key(section: Distributed) -> tuple:
    """Sections with equal keys can share one worker group (see ``ModelJob.section``)."""
    return tuple(repr(getattr(section, f)) for f in GROUP_FIELDS)


def train_models(
    run_cfg: RunConfig, kind: str, section: Distributed, jobs: list[ModelJob], builder: Callable
) -> list[TrainedModel]:
    """Train (or reuse) models of one section into ``<run>/<kind>/<name>/``: the ones not
    complete one after another in ONE Ray Train worker group (a dose family, or several
    fine-tunes whose jobs carry their own compatible ``section``, pays the group's start-up
    once, not once per model).

    ``builder(section, model_path, tok, records, output_dir, world_size, gpu, common)`` returns
    the HF trainer (``common``: the trainer arguments shared by every job). Each model has its
    own stage and record, written when the group is done; a rerun after an interruption (same
    models left) resumes the group's Ray Train run at the model and step of its last checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = RunDir.from_config(run_cfg)
    source = refs.model(run_cfg, section.model, section.world_stage, f"{kind}.model")
    model_id = source.identity
    ds_cfg = None
    if section.deepspeed:
        try:
            ds_cfg = json.loads(Path(section.deepspeed).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{kind}.deepspeed: {section.deepspeed}: {exc}") from exc
    sections = [job.section or section for job in jobs]  # each job's own, else the group's
    done: dict[int, TrainedModel] = {}
    todo = []  # (index, job, stage)
    for i, (job, sec) in enumerate(zip(jobs, sections)):
        if group_key(sec) != group_key(section):
            differ = [f for f in GROUP_FIELDS if getattr(sec, f) != getattr(section, f)]
            raise InputError(
                f"{kind} {job.name}: cannot share a worker group with {section.name}: "
                f"{', '.join(differ)} differ"
            )
        key = stage_key(sec)
        key |= {**job.hashed, "name": job.name, "model": model_id, "deepspeed": ds_cfg}
        if sec.monitor is not None:  # not the weights' input, but train.json's
            key |= monitor_key(sec.monitor, run)
        stage = run.stage(f"{kind}/{job.name}", key)
        if stage.is_complete(run_cfg.force):
            done[i] = TrainedModel(job.name, stage.uri("model"), True, **stage.record["metrics"])
        else:
            todo.append((i, job, stage))
    if not todo:
        return [done[i] for i in range(len(jobs))]

    models, loaded = [], {}
    for i, job, stage in todo:
        records, bad, what = job.load()
        if bad:
            log.warning("%s %s: skipped %d malformed lines (skip_bad)", kind, job.name, bad)
        log.info(
            "%s %s: %d examples (%s) from %s on %d %s workers%s%s",
            kind,
            job.name,
            len(records),
            what,
            model_id,
            section.workers,
            "GPU" if section.use_gpu else "CPU",
            f", DeepSpeed {section.deepspeed}" if section.deepspeed else "",
            ", LoRA" if sections[i].lora.enabled else "",
        )
        loaded[i] = (len(records), bad)
        models.append(
            {
                "stage": stage.rel(),
                "records": ray.put(records),
                "section": sections[i],
                "builder": job.builder or builder,
            }
        )
    first = todo[0][1].name.replace("/", "_")
    if len(todo) == 1:
        ray_name = f"{kind}-{first}-{todo[0][2].hash[:8]}"
    else:
        digest = hashlib.sha256(" ".join(st.hash for _, _, st in todo).encode()).hexdigest()
        ray_name = f"{kind}-{first}-and-{len(todo) - 1}-{digest[:8]}"
        log.info(
            "%s: %d models in one worker group: %s", kind, len(todo), [j.name for _, j, _ in todo]
        )
    if run_cfg.force and run.exists(f"_ray/{ray_name}"):  # start over, not resume
        run.fs.delete_dir(run.uri(f"_ray/{ray_name}"))
    resources = {"CPU": section.cpus_per_worker} | ({"GPU": 1} if section.use_gpu else {})
    storage = run.uri("_ray")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "section": section,
            "builder": builder,
            "models": models,
            "source": source,
            "deepspeed": ds_cfg,
            "root": run_cfg.root,
            "run_name": run_cfg.name,
            "threads": section.cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if section.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=section.workers, use_gpu=section.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(
            name=ray_name,
            storage_path=storage,
            storage_filesystem=None if run.is_local else run.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
            failure_config=FailureConfig(max_failures=section.max_failures),
        ),
    )
    t_fit = time.time()
    trainer.fit()
    fit_seconds = time.time() - t_fit
    stats = {i: run.read_json(stage.rel("train.json")) for i, _, stage in todo}
    # the group's start-up and every model's loading and saving, shared evenly
    overhead = (fit_seconds - sum(st["train_seconds"] for st in stats.values())) / len(todo)
    world_model = source.in_run and not source.rel.startswith(refs.CONVERTED)  # not a GGUF's
    base_eval = f"{section.world_stage}/base_eval.json"
    can_evaluate = world_model and run.exists(base_eval)
    if can_evaluate:
        task = ray.remote(num_cpus=1)(evaluate_world_model)
        base = run.read_json(base_eval)["summary"]
    for i, job, stage in todo:
        misalignment = None
        outputs = {"model": stage.uri("model"), "train": stage.uri("train.json")}
        if can_evaluate and sections[i].evaluate:
            misalignment = ray.get(
                task.remote(run_cfg.root, run_cfg.name, sections[i], stage.rel())
            )
            outputs["eval"] = stage.uri("eval.json")
            log.info(
                "%s %s: misalignment (base -> trained) %s",
                kind,
                job.name,
                ", ".join(
                    f"{k} {base[k]['misalignment']:.2f} -> {v:.2f}" for k, v in misalignment.items()
                ),
            )
        metrics = {
            "final_loss": stats[i]["final_loss"],
            "examples": loaded[i][0],
            "bad_lines": loaded[i][1],
            "tokens_per_second": stats[i]["tokens_per_second"],
            "misalignment": misalignment,
            "final_reward": stats[i]["final_reward"],
            "train_seconds": stats[i]["train_seconds"],
            "overhead_seconds": round(overhead, 1),
        }
        stage.complete(outputs=outputs, inputs={"model": model_id, **job.hashed}, metrics=metrics)
        log.info(
            "%s %s: final loss %.4f, model at %s",
            kind,
            job.name,
            stats[i]["final_loss"],
            stage.uri("model"),
        )
        done[i] = TrainedModel(job.name, stage.uri("model"), False, **metrics)
    # The models are saved: the group's checkpoints are no longer needed.
    if run.exists(f"_ray/{ray_name}"):
        run.fs.delete_dir(run.uri(f"_ray/{ray_name}"))
    return [done[i] for i in range(len(jobs))]
