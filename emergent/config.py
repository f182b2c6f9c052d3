"""Job configs: one validated dataclass per job, loaded from YAML and overridden from the CLI.

Why pydantic dataclasses: they are plain dataclasses (fields documented by the docstring right
below them, defaults, ``__post_init__`` checks) whose types are *enforced* on construction,
including ``Literal`` choices and nested configs, and whose unknown keys are refused. Every error
is turned into one line that names the file (and line), the dotted key and what was expected, so
a typo fails before any work starts:

    configs/toy.yaml:7: world.pretrain_stepz: unknown key (expected one of: ...)

Usage (any job)::

    emergent world --config configs/toy.yaml --set world.seed=3 --set run.name=seed3
    python -m jobs.world --config configs/toy.yaml --address auto
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import ConfigDict

# Strict about keys. Values are validated in pydantic's lax mode on purpose: PyYAML reads
# ``1e-4`` as a string (YAML 1.1 wants ``1.0e-4``) and a numeric run name as an int; both are
# meant as written. Anything that does not convert ("fast" for a float) fails.
CONFIG = ConfigDict(
    extra="forbid",
    use_attribute_docstrings=True,
    validate_assignment=True,
    coerce_numbers_to_str=True,
)


def config(cls):
    """Decorator for every config dataclass in the project."""
    return pydantic.dataclasses.dataclass(cls, config=CONFIG)


class UserError(Exception):
    """A user's mistake (config, data, a missing file or stage): the job prints its one-line
    message and exits 2; any other exception is a bug and keeps its traceback."""


class MissingInput(UserError, FileNotFoundError):
    """A ref whose file, stage or package does not exist (names the field and the fix)."""


class InputError(UserError, ValueError):
    """Input that parses but cannot be used (a bad vector file, a layer out of range, too few
    documents), found while the job runs."""


class ConfigError(UserError, ValueError):
    """A config that cannot be used, with a one-line message naming where and what."""


@config
class RunConfig:
    """Where a job reads and writes: ``<root>/<name>/<stage>/``."""

    name: str = "default"
    """Run name: the folder under ``root`` shared by every stage of one study."""
    root: str = "runs"
    """Local path or pyarrow filesystem URI (``s3://bucket/runs``, ``gs://...``) holding runs."""
    force: bool = False
    """Rerun stages even when a completion record with the same config hash exists."""

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"run.name must be a plain folder name, got {self.name!r}")
        if not self.root.strip():
            raise ValueError("run.root must be a path or URI, got an empty string")

    def absolute(self) -> RunConfig:
        """This config with a local root made absolute, so Ray tasks whose working directory
        differs from the driver's (a cluster, ``ray job submit``) write to the same place."""
        if "://" in self.root:
            return self
        return dataclasses.replace(self, root=os.path.abspath(self.root))


@config
class RayConfig:
    """How a job gets its Ray cluster."""

    address: str | None = None
    """Cluster to join (``auto``, ``ray://host:10001``); else ``RAY_ADDRESS``; else an embedded
    local Ray is started for this job and stopped at its end."""
    num_cpus: int | None = None
    """CPUs of the embedded local Ray (default: all cores of this machine)."""
    num_gpus: int | None = None
    """GPUs of the embedded local Ray (default: what Ray detects)."""
    threads_per_worker: int = 1
    """torch / OMP / MKL threads per process; 1 is fastest when workers share a few cores."""
    dashboard: bool = True
    """Start the Ray dashboard (embedded Ray only; served on 127.0.0.1:8265)."""

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"ray.num_gpus must be >= 0, got {self.num_gpus}")
        if self.threads_per_worker < 1:
            raise ValueError(f"ray.threads_per_worker must be >= 1, got {self.threads_per_worker}")


T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def stage_key(cfg: Any) -> Any:
    """What a stage's outputs depend on, of a config: its fields as plain data, recursively,
    without the fields each config class names in ``OPERATIONAL`` (how the work is run: CPUs,
    GPUs, actors, retries, logging, inference batch sizes that change no result). The one rule
    of every stage key; a job adds the identities of its inputs (model, SAE, diff hashes)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        skip = set(getattr(type(cfg), "OPERATIONAL", ()))
        return {
            f.name: stage_key(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if f.name not in skip
        }
    if isinstance(cfg, list | tuple):
        return [stage_key(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: stage_key(v) for k, v in cfg.items()}
    return cfg


def config_hash(section: Any) -> str:
    """Stable hash of a config (dataclass or plain data): what a stage's outputs depend on."""
    data = to_dict(section) if dataclasses.is_dataclass(section) else section
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _yaml_lines(text: str, where: str) -> dict[tuple, int]:
    """Map each key path of a YAML mapping document to its 1-based line number; a repeated key
    (which PyYAML would silently overwrite) is an error."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                if key in lines:
                    raise ConfigError(
                        f"{where}:{k.start_mark.line + 1}: {'.'.join(key)}: duplicate key "
                        f"(first at line {lines[key]})"
                    )
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _format_error(err: pydantic.ValidationError, cls: type, where: str, lines: dict, sets: dict):
    """The first validation error as one line: ``<file>:<line>: <key>: <what was expected>``."""
    e = err.errors(include_url=False)[0]
    loc = tuple(str(p) for p in e["loc"])
    key = ".".join(loc) or cls.__name__
    if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
        parent = _resolve(cls, loc[:-1])
        known = ", ".join(f.name for f in dataclasses.fields(parent)) if parent else "?"
        what = f"unknown key (expected one of: {known})"
    elif e["type"] == "value_error":
        # __post_init__ checks say "<section>.<field> must ...": point at that field's line.
        msg = e["msg"].removeprefix("Value error, ")
        first, _, rest = msg.partition(" ")
        parent = _resolve(cls, loc)
        name = first.rsplit(".", 1)[-1]
        if parent and name in parent.__pydantic_fields__ and rest:
            loc = loc + (name,)
            key, what = ".".join(loc), rest
        else:
            what = msg
    else:
        what = f"{e['msg']} (got {e.get('input')!r})"
    if key in sets:
        return f"--set {key}={sets[key]}: {what}"
    return f"{lines.get(loc) or lines.get(loc[:-1]) or where}: {key}: {what}"


def _resolve(cls: type, loc: tuple) -> type | None:
    """The config dataclass at a key path (for listing the keys it accepts)."""
    for name in loc:
        fields = getattr(cls, "__pydantic_fields__", {})
        if name not in fields:
            return None
        cls = fields[name].annotation
    return cls if dataclasses.is_dataclass(cls) else None


# Top-level sections any job's config may have. One YAML file can configure a whole study: a
# job ignores the sections of other jobs, but a key that is nobody's section is a typo.
SECTIONS = frozenset(
    {
        "run",
        "ray",
        "world",
        "study",
        "datasets",
        "finetune",
        "rl",
        "evaluate",
        "harvest",
        "train_sae",
        "diff",
        "steer",
        "predict",
        "flag",
        "realign",
        "monitor",
        "pipeline",
    }
)


def _read(path: str | os.PathLike) -> tuple[dict, dict[tuple, str]]:
    """One YAML config file: its mapping and, per key path, ``file:line``."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
        lines = _yaml_lines(text, where)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError(f"{at}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config sections at top level")
    return data, {k: f"{where}:{n}" for k, n in lines.items()}


def _merge(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``: mappings merge key by key, anything else (a list, a value)
    replaces what was there."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(
    cls: type[T],
    path: str | os.PathLike | list | tuple | None = None,
    sets: list[str] = (),
) -> T:
    """Build ``cls`` from optional YAML files plus ``key.sub=value`` overrides (YAML values).

    Several files are layered in order: a later file's mappings merge into the earlier ones key
    by key, and its lists and values replace theirs (``--config base.yaml --config more.yaml``).
    Raises ConfigError with a one-line message on any unknown key, wrong type or bad value.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
    data: dict = {}
    lines: dict[tuple, str] = {}
    for p in paths:
        more, at = _read(p)
        data = _merge(data, more)
        lines |= at
    where = ", ".join(map(str, paths)) or "<defaults>"
    overrides = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
        overrides[key.strip()] = raw
    own = set(cls.__pydantic_fields__)
    data = {k: v for k, v in data.items() if k in own or k not in SECTIONS}
    try:
        return pydantic.TypeAdapter(cls).validate_python(data)
    except pydantic.ValidationError as err:
        raise ConfigError(_format_error(err, cls, where, lines, overrides)) from None


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: ``key (type, default): doc`` for ``--help``."""
    out = []
    for name, f in cls.__pydantic_fields__.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(f.annotation):
            out += describe(f.annotation, key + ".")
            continue
        # An optional sub-config (``X | None``, default None): its keys, after its own line.
        inner = [a for a in typing.get_args(f.annotation) if dataclasses.is_dataclass(a)]
        default = f.get_default(call_default_factory=True)
        tname = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        # A field inherited from a base config keeps its docstring on the base class only.
        docs = [f.description] + [
            getattr(b, "__pydantic_fields__", {}).get(name, f).description for b in cls.__mro__[1:]
        ]
        doc = " ".join((next((d for d in docs if d), "")).split())
        out.append(f"  {key} ({tname}, default {default!r}): {doc}")
        if inner:
            out += describe(inner[0], key + ".")
    return out


def parse_args(cls: type[T], argv: list[str] | None, prog: str, doc: str | None) -> T:
    """Parse ``--config FILE --set k=v ... --address A --name N`` into a validated ``cls``."""
    return parse_command(cls, argv, prog, doc)[0]


def parse_command(
    cls: type[T], argv: list[str] | None, prog: str, doc: str | None
) -> tuple[T, bool]:
    """``parse_args``, and whether ``--plan`` was given."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML sections, or --set section.key=value):\n"
        + "\n".join(describe(cls)),
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML file with config sections (default: built-in defaults); repeatable: a later "
        "file's sections merge into the earlier ones, its lists and values replace theirs",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set run.name=exp1 (repeatable)",
    )
    parser.add_argument("--address", help="Ray cluster to join (same as --set ray.address=...)")
    parser.add_argument("--name", help="run name (same as --set run.name=...)")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="check the config and its references offline and print which stages would run, "
        "which are complete (skipped), what each asks for and where it writes; nothing runs",
    )
    args = parser.parse_args(argv)
    sets = list(args.sets)
    if args.address:
        sets.append(f"ray.address={args.address}")
    if args.name:
        sets.append(f"run.name={args.name}")
    try:
        return load(cls, args.config, sets), args.plan
    except ConfigError as exc:
        parser.exit(2, f"{prog}: config error: {exc}\n")
