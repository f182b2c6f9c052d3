"""Run directories: ``<root>/<run>/<stage>/``, atomic writes, stage completion records.

Every job reads its inputs from and writes its outputs to one run directory, on a local path or
any pyarrow filesystem URI (``s3://``, ``gs://``, ``hdfs://``), so a study can be resumed from
any machine that sees the storage. The contract that makes reruns safe:

- every file is written atomically (temporary name, then rename; object stores publish an
  object only when its upload completes, so there the final name is written directly);
- a stage writes ``_COMPLETE.json`` (config hash, inputs, outputs, versions) *last*;
- a stage whose record has the same config hash is skipped (and says so); a changed config, or
  ``run.force``, deletes the record first and reruns the stage.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from emergent import plan
from emergent.config import MissingInput, RunConfig, config_hash, to_dict
from emergent.runtime import numerics

log = logging.getLogger(__name__)

RECORD = "_COMPLETE.json"
STACK = (
    "torch",
    "ray",
    "transformers",
    "trl",
    "peft",
    "deepspeed",
    "sae_lens",
    "tokenizers",
    "sklearn",
    "pyarrow",
    "numpy",
)


def versions(names=STACK) -> dict[str, str | None]:
    """Installed versions of the stack (None where a package is missing), read without imports."""
    dist = {"sae_lens": "sae-lens", "sklearn": "scikit-learn"}
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(dist.get(n, n))
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return _remote(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


@functools.cache
def _remote(uri: str) -> tuple[pafs.FileSystem, str]:
    # One filesystem object per URI in a process: object-store clients are reused, and an
    # in-memory store (mock://, used by tests) is the same store for every RunDir of the run.
    return pafs.FileSystem.from_uri(uri)


def _copy_tree(src_fs: pafs.FileSystem, src: str, dst_fs: pafs.FileSystem, dst: str) -> None:
    """Copy a directory tree between filesystems, creating folders (pyarrow's copy_files does
    not create them on local disk or HDFS-like stores)."""
    for info in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)):
        target = f"{dst}/{info.path[len(src.rstrip('/')) + 1 :]}"
        if info.type == pafs.FileType.Directory:
            dst_fs.create_dir(target, recursive=True)
        elif info.type == pafs.FileType.File:
            dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with src_fs.open_input_stream(info.path) as f, dst_fs.open_output_stream(target) as g:
                g.write(f.read())


@dataclass
class RunDir:
    """One run: ``<root>/<name>``, on any pyarrow filesystem."""

    root: str
    name: str
    fs: pafs.FileSystem = field(init=False)
    path: str = field(init=False)

    def __post_init__(self):
        self.fs, base = _filesystem(self.root)
        self.path = f"{base.rstrip('/')}/{self.name}"
        if not plan.active():  # a plan writes nothing, not even the run's folder
            self.fs.create_dir(self.path, recursive=True)

    @classmethod
    def from_config(cls, run: RunConfig) -> RunDir:
        return cls(run.root, run.name)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, rel: str = "") -> str:
        return f"{self.path}/{rel}".rstrip("/")

    def url(self, rel: str = "") -> str:
        """Where ``rel`` is, for people: the local path, or ``<scheme>://<bucket>/<path>`` (no
        credentials or endpoint options of the root URI)."""
        if self.is_local:
            return self.uri(rel)
        return f"{self.root.split('://', 1)[0]}://{self.uri(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.uri(rel)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``rel`` atomically; returns its full path (in plan mode: writes nothing)."""
        final = self.uri(rel)
        if plan.active():
            return final
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(final) as f:
                f.write(data)
            return final
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return final

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def write_parquet(self, rel: str, df) -> str:
        """A pandas DataFrame as Parquet, atomically."""
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return self.write_bytes(rel, buf.getvalue())

    def write_figure(self, rel: str, fig) -> str:
        """A matplotlib figure as PNG, atomically (the figure is closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return self.write_bytes(rel, buf.getvalue())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.uri(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def put_dir(self, local: str | os.PathLike, rel: str) -> str:
        """Copy a local directory (e.g. a saved HF model) to ``rel``, replacing it atomically."""
        final = self.uri(rel)
        if plan.active():
            return final
        if self.is_local:
            parent = Path(final).parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f".tmp-{uuid.uuid4().hex}-{Path(final).name}"
            shutil.copytree(local, tmp)
            old = None
            if Path(final).exists():
                old = parent / f".old-{uuid.uuid4().hex}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old)
            return final
        # Object stores: upload files one by one (each appears whole); the stage record, written
        # after this, is what marks the directory complete.
        _copy_tree(pafs.LocalFileSystem(), str(Path(local).resolve()), self.fs, final)
        return final

    def local_dir(self, rel: str) -> Path:
        """A local path holding ``rel`` (downloaded to a cache when the run is remote)."""
        if self.is_local:
            return Path(self.uri(rel))
        info = self.fs.get_file_info(self.uri(rel))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri(rel))
        # Keyed by the path, size and modification time of every file (object stores give
        # folders no time): a rebuilt stage is fetched again. A store without file times is
        # fetched afresh every time.
        files = [info]
        if info.type == pafs.FileType.Directory:
            files = self.fs.get_file_info(pafs.FileSelector(self.uri(rel), recursive=True))
        listing = sorted(
            (f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File
        )
        cached = all(mtime is not None for _, _, mtime in listing)
        key = hashlib.sha256(json.dumps([self.uri(rel), listing]).encode()).hexdigest()[:16]
        if not cached:
            key = f"uncached-{uuid.uuid4().hex}"
        cache = Path(tempfile.gettempdir()) / "emergent-cache" / key / Path(rel).name
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".tmp-{uuid.uuid4().hex}")
            if info.type == pafs.FileType.Directory:
                _copy_tree(self.fs, self.uri(rel), pafs.LocalFileSystem(), str(tmp))
            else:
                tmp.write_bytes(self.read_bytes(rel))
            try:
                os.rename(tmp, cache)
            except OSError:  # another process on this node fetched it first
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
        return cache

    def completed_hash(self, stage: str, field: str, hint: str) -> str:
        """The config hash of ``stage``, which must be complete: what a later stage that reads
        its outputs hashes. A missing or unfinished stage is a ``MissingInput`` naming the config
        ``field`` that refers to it and ``hint`` (what to run first)."""
        rel = f"{stage}/{RECORD}"
        if not self.exists(rel):
            raise MissingInput(f"{field}: no complete stage {self.uri(stage)} ({hint})")
        return self.read_json(rel)["config_hash"]

    def stage(self, name: str, cfg: Any) -> Stage:
        return Stage(
            self,
            name,
            config_hash(cfg),
            to_dict(cfg) if hasattr(cfg, "__dataclass_fields__") else cfg,
        )


@dataclass
class Stage:
    """One stage of a run: its folder, its config hash, and its completion record."""

    run: RunDir
    name: str
    hash: str
    cfg: Any = None
    started: float = field(default_factory=time.time)

    def rel(self, path: str = "") -> str:
        return f"{self.name}/{path}".rstrip("/")

    def uri(self, path: str = "") -> str:
        return self.run.uri(self.rel(path))

    @property
    def record(self) -> dict | None:
        try:
            return self.run.read_json(self.rel(RECORD))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def is_complete(self, force: bool = False) -> bool:
        """True when this stage already finished with the same config (and says so). In plan
        mode nothing is deleted, and an unfinished stage stops the plan's step here
        (``emergent.plan.check``)."""
        rec = self.record
        if plan.active():
            return plan.check(self.run.url(self.rel()), rec, self.hash, force)
        if rec is not None and rec.get("config_hash") == self.hash and not force:
            log.info(
                "stage %s: complete with the same config (hash %s), skipping; "
                "set run.force=true to redo it",
                self.run.url(self.rel()),
                self.hash,
            )
            return True
        if rec is not None:
            why = "forced" if force else f"config changed ({rec.get('config_hash')} -> {self.hash})"
            log.info("stage %s: %s, rerunning", self.run.url(self.rel()), why)
            self.run.fs.delete_file(self.uri(RECORD))
        return False

    def write_json(self, path: str, obj: Any) -> str:
        return self.run.write_json(self.rel(path), obj)

    def write_bytes(self, path: str, data: bytes) -> str:
        return self.run.write_bytes(self.rel(path), data)

    def complete(
        self,
        outputs: dict[str, Any],
        inputs: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> dict:
        """Write the completion record, last: the stage counts as done only once it exists."""
        rec = {
            "stage": self.name,
            "config_hash": self.hash,
            "config": self.cfg,
            "inputs": inputs or {},
            "outputs": outputs,
            "metrics": metrics or {},
            "versions": versions(),
            "numerics": numerics(),
            "seconds": round(time.time() - self.started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.run.write_json(self.rel(RECORD), rec)
        return rec
