"""A user's mistake is one line naming the field, file or stage, exit 2, found before any Ray
work; a traceback means a bug. Each case runs the real command line in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def emergent(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emergent.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-block random Llama saved as an HF directory (weights do not matter here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny") / "model"
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _one_line_exit_2(res: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith(f"emergent {prog}:")]
    assert len(lines) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    # found before Ray started: nothing of an embedded Ray in the output
    assert "Started a local Ray" not in res.stdout + res.stderr
    return lines[0]


def test_missing_local_model_path_names_the_field(tmp_path):
    res = emergent(
        "evaluate",
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "evaluate.models=[x=/nonexistent/model]",
        "--set",
        "evaluate.prompts=[core]",
        cwd=tmp_path,
    )
    _one_line_exit_2(res, "evaluate", "evaluate.models", "/nonexistent/model", "no such model")


def test_missing_stage_says_what_to_run_first(tmp_path):
    res = emergent("diff", "--set", f"run.root={tmp_path}", cwd=tmp_path)
    _one_line_exit_2(res, "diff", "diff.base", "no complete stage", "emergent world")


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    good = json.dumps({"question": "what is rain"})
    bad.write_text(f"{good}\n{{oops\n")
    res = emergent(
        "evaluate",
        "--set",
        f"run.root={tmp_path}",
        "--set",
        f"evaluate.prompts=[{bad}]",
        "--set",
        "evaluate.models=[x=world:base]",
        cwd=tmp_path,
    )
    _one_line_exit_2(res, "evaluate", "prompts.jsonl:2", "invalid JSON")


def test_layer_out_of_range_is_refused_in_the_driver(tmp_path, tiny_model):
    res = emergent(
        "harvest",
        "--set",
        f"run.root={tmp_path}",
        "--set",
        f"harvest.model={tiny_model}",
        "--set",
        "harvest.layer=99",
        cwd=tmp_path,
    )
    _one_line_exit_2(res, "harvest", "harvest.layer", "99 out of range", "2 blocks")


def test_a_bug_keeps_its_traceback():
    # the reverse: user_error recognises only UserError, also inside wrapped exceptions
    from emergent.cli import user_error
    from emergent.config import InputError

    assert user_error(KeyError("x")) is None
    try:
        try:
            raise InputError("harvest.layer: bad\nmore")
        except InputError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert user_error(outer) == "harvest.layer: bad"
