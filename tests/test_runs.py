import json
import os

import pytest

from emergent.runs import RECORD, RunDir


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path), "r")
    run.write_text("a/b.txt", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        run.write_text("a/b.txt", "new")
    monkeypatch.undo()
    assert (tmp_path / "r/a/b.txt").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "r/a").iterdir()) == ["b.txt"]


def test_put_dir_replaces_whole(tmp_path):
    run = RunDir(str(tmp_path), "r")
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("1")
    run.put_dir(src, "stage/model")
    (src / "x").write_text("2")
    (src / "y").write_text("3")
    run.put_dir(src, "stage/model")
    dst = tmp_path / "r/stage/model"
    assert sorted(p.name for p in dst.iterdir()) == ["x", "y"] and (dst / "x").read_text() == "2"
    assert [p.name for p in (tmp_path / "r/stage").iterdir()] == ["model"]


def test_skip_on_rerun_and_rerun_on_change(tmp_path, caplog):
    run = RunDir(str(tmp_path), "r")
    cfg = {"lr": 1e-4}
    st = run.stage("world", cfg)
    assert not st.is_complete()
    st.write_json("out.json", {"v": 1})
    st.complete(outputs={"out": st.uri("out.json")})
    rec = json.loads((tmp_path / "r/world" / RECORD).read_text())
    assert rec["config_hash"] == st.hash and rec["versions"]["torch"]

    with caplog.at_level("INFO"):
        assert run.stage("world", {"lr": 1e-4}).is_complete()
    assert "skipping" in caplog.text
    assert not run.stage("world", {"lr": 1e-4}).is_complete(force=True)
    # forcing removed the record: an interrupted rerun cannot look complete
    assert not (tmp_path / "r/world" / RECORD).exists()
    st.complete(outputs={})
    changed = run.stage("world", {"lr": 2e-4})
    assert not changed.is_complete() and changed.record is None


def test_pyarrow_uri(tmp_path):
    # any pyarrow filesystem URI works; file:// exercises the non-local code path too
    run = RunDir(f"file://{tmp_path}", "r")
    run.write_json("s/x.json", {"a": 1})
    assert run.read_json("s/x.json") == {"a": 1}
    assert run.exists("s/x.json") and not run.exists("s/y.json")


def test_remote_filesystem_paths(tmp_path):
    # pyarrow's in-memory "mock://" filesystem runs the non-local code paths (no rename)
    run = RunDir("mock:///bucket/runs", "r")
    assert not run.is_local
    run.write_json("w/data/x.json", {"a": 1})
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    run.put_dir(src, "w/base")
    st = run.stage("w", {"k": 1})
    st.complete(outputs={"base": run.uri("w/base")})
    assert run.stage("w", {"k": 1}).is_complete()
    local = run.local_dir("w/base")
    assert (local / "config.json").read_text() == "{}"
    assert run.local_dir("w/base") == local  # cached
    assert json.loads(run.local_dir("w/data/x.json").read_text()) == {"a": 1}
