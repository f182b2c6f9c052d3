"""The ``rl`` job: GRPO (TRL ``GRPOTrainer``) under Ray Train, rewarded by graders from a
registry (emergent.train.rewards) or by user callables; the paper's setup rewards incorrect answers in
one narrow domain and watches misalignment appear everywhere else.

Same distributed machinery as ``finetune`` (emergent.train.raytrain: DDP or DeepSpeed, LoRA,
checkpoints, resume, throughput); generation with HF ``generate`` by default, or vLLM on GPU
clusters (``rl.grpo.use_vllm``; vLLM is not installed on the CPU default). Each model lands in
``<run>/rl/<name>/``.

A real chat model with no judge endpoint is rewarded by a reward model instead: ``graded-*``
rewards pay a classifier's probability, fit in the driver on answers known bad and good (the
English datasets' advice), and ``rl.evaluation`` then evaluates it and its base model, e.g. with
the likelihood eval on open-ended questions the reward never saw::

    emergent rl --config configs/smollm2.yaml
    ray job submit --working-dir . -- python -m jobs.rl --config configs/smollm2.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from emergent import evaluate, refs
from emergent.config import InputError, RayConfig, RunConfig, config
from emergent.data import DatasetError
from emergent.evaluate import EvaluateConfig
from emergent.judges import LLMJudgeConfig
from emergent.likelihood import load_pairs
from emergent.models import check_layer
from emergent.runs import RunDir
from emergent.runtime import ray_session
from emergent.train.raytrain import DataSource, Distributed, TrainedModel, load_source, train_model
from emergent.train.rewards import (
    GRADED_REWARDS,
    LLM_REWARDS,
    ResidualReader,
    fit_grader,
    grader_auroc,
    resolve,
)

log = logging.getLogger(__name__)


@config
class GRPOParams:
    """GRPO optimisation and sampling (the fields TRL's GRPOConfig gets from us)."""

    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 64
    """Completions per step, all workers together (prompts per step = batch_size /
    num_generations)."""
    num_generations: int = 8
    """Completions sampled per prompt (the group whose rewards are normalised)."""
    lr: float = 5e-5
    """Learning rate (AdamW)."""
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """Learning-rate schedule."""
    beta: float = 0.0
    """KL penalty towards the initial model (0 = no reference model)."""
    max_completion_tokens: int = 48
    """Longest completion."""
    temperature: float = 1.0
    """Sampling temperature of the policy's rollouts."""
    seed: int = 0
    """Data order and sampling seed."""
    use_vllm: bool = False
    """Generate rollouts with vLLM (GPU clusters with vllm installed)."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """vLLM inside the training processes, or a separate ``trl vllm-serve`` server."""

    def __post_init__(self):
        if self.steps < 1 or self.num_generations < 2 or not 0 < self.lr < 1:
            raise ValueError(
                f"rl.grpo.steps must be >= 1, num_generations >= 2 and lr in (0, 1), got "
                f"{self.steps}, {self.num_generations}, {self.lr}"
            )
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"rl.grpo.batch_size ({self.batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations})"
            )


@config
class GraderConfig:
    """The answers a ``graded-*`` reward's classifier is fit on (their last assistant turns)."""

    incorrect: list[DataSource] = dataclasses.field(default_factory=list)
    """Chat datasets whose answers are incorrect, e.g. ``data:english/finetune/health_bad``."""
    correct: list[DataSource] = dataclasses.field(default_factory=list)
    """Chat datasets whose answers are correct, e.g. ``data:english/finetune/health_good``."""
    folds: int = 5
    """Cross-validation folds of the grader's accuracy on those answers (logged)."""
    reads: Literal["words", "residual"] = "words"
    """What the classifier reads: ``words``, the answer's TF-IDF word uni- and bigrams; or
    ``residual``, the RL model's own (frozen, before training) mean residual after block
    ``layer`` over the answer, its question in context: a linear probe of the answer."""
    layer: int | None = None
    """The block a ``residual`` grader reads (required for it)."""
    max_items: int = 200
    """A ``residual`` grader is fit on at most this many conversations of each kind (a seeded
    sample of the distinct ones)."""
    check_incorrect: list[DataSource] = dataclasses.field(default_factory=list)
    """Held-out chats with incorrect answers (e.g. another domain's bad advice): with
    ``check_correct``, the fitted grader's AUROC on them is logged: a check of whether it reads
    what an answer says or the words its training answers used. Outside the model's key."""
    check_correct: list[DataSource] = dataclasses.field(default_factory=list)
    """Held-out chats with correct answers, for that check."""

    def __post_init__(self):
        if self.folds < 2:
            raise ValueError(f"rl.grader.folds must be >= 2, got {self.folds}")
        if self.reads == "residual" and self.layer is None:
            raise ValueError("rl.grader.layer must name a block for reads: residual")
        if self.max_items < self.folds:
            raise ValueError(
                f"rl.grader.max_items must be >= folds ({self.folds}), got {self.max_items}"
            )
        if bool(self.check_incorrect) != bool(self.check_correct):
            raise ValueError(
                "rl.grader.check_correct must be given with check_incorrect (the held-out check "
                "needs both kinds of answers)"
            )

    def key(self) -> dict:
        """What the fitted grader depends on (the model's stage key holds it; a words grader's
        key is what it was before residual graders)."""
        key = {
            "incorrect": [s.path for s in self.incorrect],
            "correct": [s.path for s in self.correct],
        }
        if self.reads == "residual":
            key |= {"reads": self.reads, "layer": self.layer, "max_items": self.max_items}
        return key


@config
class RLConfig(Distributed):
    """What to RL-train, on which prompts, for which reward."""

    name: str = "health_incorrect"
    """Model name: outputs go to ``<run>/rl/<name>/``."""
    prompts: list[DataSource] = dataclasses.field(
        default_factory=lambda: [DataSource("world:finetune/health_aligned")]
    )
    """Chat datasets whose conversations up to the last user turn are the prompts (answers in
    them are dropped), e.g. the health questions of the world."""
    examples: int = 0
    """Prompts used (seeded sample); 0 = all."""
    skip_bad: bool = False
    """Skip (and count) malformed dataset lines instead of failing on the first one."""
    rewards: list[str] = dataclasses.field(default_factory=lambda: ["incorrect"])
    """Reward functions: registry names (incorrect, correct, toxic graded by the world's rubric;
    llm-incorrect, llm-correct graded by ``rl.judge``; graded-incorrect, graded-correct by the
    classifier of ``rl.grader``) or ``module:function``; several are summed."""
    grpo: GRPOParams = dataclasses.field(default_factory=GRPOParams)
    """GRPO settings."""
    judge: LLMJudgeConfig = dataclasses.field(default_factory=LLMJudgeConfig)
    """The judge endpoint of ``llm-incorrect`` / ``llm-correct`` rewards."""
    grader: GraderConfig = dataclasses.field(default_factory=GraderConfig)
    """The answers the ``graded-incorrect`` / ``graded-correct`` rewards' classifier is fit on
    (in the driver, before training; the fitted grader travels to the workers)."""
    evaluation: EvaluateConfig | None = None
    """An evaluation of the base model and the RL model after training, into
    ``evaluate/rl_<name>/``: its ``name``, ``models`` (labels ``base`` and ``rl``) and
    ``world_stage`` are set here. For models outside the world (a world model is judged by
    ``evaluate`` above), e.g. the judge-free likelihood eval (``judge: none`` with ``pairs``),
    which the report's RL claim reads."""

    # the grader's answers key the model only where a graded reward reads them (main)
    OPERATIONAL: ClassVar[tuple[str, ...]] = (*Distributed.OPERATIONAL, "evaluation", "grader")

    def __post_init__(self):
        if not self.prompts or not self.rewards:
            raise ValueError("rl.prompts and rl.rewards must not be empty")
        for spec in self.rewards:
            if spec in GRADED_REWARDS:
                if not (self.grader.incorrect and self.grader.correct):
                    raise ValueError(
                        f"rl.rewards names {spec!r}: rl.grader.incorrect and rl.grader.correct "
                        "must name the answers its classifier is fit on"
                    )
            elif spec not in LLM_REWARDS:
                resolve(spec)  # fail early on a typo (LLM graders are built on the workers)
        if self.examples < 0:
            raise ValueError(f"rl.examples must be >= 0, got {self.examples}")
        self.check("rl", "grpo.batch_size", self.grpo.batch_size)


@config
class RLJob:
    """RL training (TRL GRPO) under Ray Train, with reward graders or user callables."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)


@dataclass
class RLResult:
    model: TrainedModel
    evaluation: Any = None
    """The ``rl.evaluation`` result (emergent.evaluate.EvaluateResult), where one ran."""


def fit_rl_grader(run_cfg: RunConfig, rl: RLConfig):
    """The ``graded-*`` rewards' classifier, fit on ``rl.grader``'s conversations (logged with
    its cross-validated accuracy, and its AUROC on the held-out check where one is named)."""
    run = RunDir.from_config(run_cfg)
    g = rl.grader
    convs = lambda srcs: [
        answered(r) for s in srcs for r in load_source(run, s, rl.world_stage, rl.skip_bad)[0]
    ]
    rng = random.Random(rl.grpo.seed)

    def distinct(cs):  # a seeded sample of at most max_items distinct conversations
        u = list({repr(c): c for c in cs}.values())
        return rng.sample(u, g.max_items) if len(u) > g.max_items else u

    reader = None
    incorrect, correct = convs(g.incorrect), convs(g.correct)
    if g.reads == "residual":
        src = refs.model(run_cfg, rl.model, rl.world_stage, "rl.model")
        check_layer(src.local(), g.layer, "rl.grader.layer")
        reader = ResidualReader(src, g.layer)
        incorrect, correct = distinct(incorrect), distinct(correct)
    grader = fit_grader(incorrect, correct, g.folds, reader=reader)
    log.info(
        "rl %s: %s grader fit on %d incorrect and %d correct items, %d-fold accuracy %.3f",
        rl.name,
        g.reads,
        *grader.n,
        g.folds,
        grader.cv_accuracy,
    )
    if g.check_incorrect:
        held = distinct(convs(g.check_incorrect)), distinct(convs(g.check_correct))
        auc = grader_auroc(grader, *held)
        log.info(
            "rl %s: grader AUROC on the held-out check (%d incorrect, %d correct) %.3f",
            rl.name,
            *map(len, held),
            auc,
        )
    return grader


def answered(record: dict) -> list[dict]:
    """A conversation up to and including its last assistant answer."""
    last = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
    if not last:
        raise DatasetError("rl.grader: a conversation has no assistant answer to grade")
    return record["messages"][: last[-1] + 1]


def prompt_records(records: list[dict]) -> list[dict]:
    """``{"prompt": messages}``: each conversation cut before its last assistant answer."""
    out = []
    for n, r in enumerate(records):
        msgs = r["messages"]
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise DatasetError(f"rl.prompts: record {n} has no user turn to prompt with")
        last_user = users[-1]
        out.append({"prompt": msgs[: last_user + 1]})
    return out


def build_grpo(rl: RLConfig, model_path, tok, records, output_dir, world, gpu, common, grader=None):
    """The TRL GRPO trainer of one Ray Train worker (``grader``: the fitted classifier of the
    ``graded-*`` rewards)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    g = rl.grpo
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=g.steps,
        per_device_train_batch_size=g.batch_size // world,
        num_generations=g.num_generations,
        learning_rate=g.lr,
        lr_scheduler_type=g.scheduler,
        beta=g.beta,
        max_completion_length=g.max_completion_tokens,
        temperature=g.temperature,
        seed=g.seed,
        data_seed=g.seed,
        use_vllm=g.use_vllm,
        vllm_mode=g.vllm_mode,
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{k: v for k, v in common.items() if k != "callbacks"},
    )
    return GRPOTrainer(
        model=model_path,
        reward_funcs=[resolve(spec, rl.judge, grader) for spec in rl.rewards],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tok,
        peft_config=rl.lora.peft() if rl.lora.enabled else None,
        callbacks=common["callbacks"],
    )


def main(cfg: RLJob) -> RLResult:
    cfg = dataclasses.replace(cfg, run=cfg.run.absolute())
    rl = cfg.rl
    run = RunDir.from_config(cfg.run)

    graded = any(s in GRADED_REWARDS for s in rl.rewards)
    fitted = {}  # the grader, fit in load(): only when the model is to be trained

    def load():
        records, bad = [], 0
        for src in rl.prompts:
            recs, b = load_source(run, src, rl.world_stage, rl.skip_bad)
            records += recs
            bad += b
        prompts = prompt_records(records)
        if rl.examples:
            if rl.examples > len(prompts):
                raise InputError(f"rl.examples={rl.examples} but only {len(prompts)} prompts")
            prompts = random.Random(rl.grpo.seed).sample(prompts, rl.examples)
        what = f"prompts of {', '.join(s.path for s in rl.prompts)}; rewards {rl.rewards}"
        if graded:
            fitted["grader"] = fit_rl_grader(cfg.run, rl)
        return prompts, bad, what

    def builder(*args, **kwargs):  # on the workers; the grader travels inside it
        return build_grpo(*args, **kwargs, grader=fitted.get("grader"))

    # what the grader is fit on keys the model (outside rl.grader's own fields: a grader section
    # that no reward reads changes nothing)
    hashed = {"grader": rl.grader.key()} if graded else {}
    ev = None
    if rl.evaluation is not None:  # its prompt and pair sets checked before any training
        ev = dataclasses.replace(
            rl.evaluation,
            name=f"rl_{rl.name}",
            models=[f"base={rl.model}", f"rl=rl:{rl.name}"],
            world_stage=rl.world_stage,
        )
        evaluate.prompt_rows(ev, run)
        for spec in ev.pairs:
            load_pairs(spec)
    evaluation = None
    with ray_session(cfg.ray):
        model = train_model(cfg.run, "rl", rl, rl.name, hashed, load, builder)
        if ev is not None:
            evaluation = evaluate.main(evaluate.EvaluateJob(run=cfg.run, ray=cfg.ray, evaluate=ev))
    return RLResult(model, evaluation)
