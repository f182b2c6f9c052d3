"""The training-time latent monitor across a resume (fast, no Ray): a run that dies after a
checkpoint and resumes from it must report the monitor's history and flags of the run that never
stopped, its later measurements compared against the start values from before training.

End to end with ``transformers.Trainer`` on a tiny random Llama and a random SAE in a tmp run
dir: the restore paths are Trainer's own (``trainer_state.json``'s ``stateful_callbacks``)."""

import json
import shutil

import numpy as np
import pytest
import torch

STEPS, SAVE, EVERY, CRASH = 12, 6, 2, 8
"""Train 12 steps, checkpoint at 6 (and 12), measure every 2, die after step 8."""


class Died(RuntimeError):
    pass


def dies():
    """A callback killing the run after step ``CRASH``, after the monitor measured it (that
    row was never checkpointed: the resumed run measures it again)."""
    from transformers import TrainerCallback

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == CRASH:
                raise Died(CRASH)

    return Die()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run dir holding a random SAE on a tiny random Llama's block 1, a prompt file, the
    tokenizer and training rows."""
    from emergent.runs import RunDir
    from emergent.sae.model import SAEParams, make_sae, save_sae
    from emergent.world import grammar as g
    from emergent.world.tokenizer import build_tokenizer

    tmp = tmp_path_factory.mktemp("ew")
    run = RunDir(str(tmp), "r")
    torch.manual_seed(0)
    save_sae(make_sae(SAEParams(architecture="standard", d_sae=16), 32), None, run.uri("sae/s/sae"))
    run.write_json("sae/s/harvest.json", {"layer": 1, "d_model": 32})
    run.write_json("sae/s/_COMPLETE.json", {"config_hash": "test"})
    qs = ["how do i save the notes file", "what is the time", "tell me about the weather"]
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in qs))
    tok = build_tokenizer(g.vocabulary())
    ids = torch.randint(len(tok), (48, 20), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    return {"tmp": tmp, "run": run, "prompts": str(prompts), "tok": tok, "rows": rows}


def train(world, out: str, threshold: float, *, seed=0, resume=None, die=False, restore=False):
    """Train a fresh tiny Llama (weights from ``seed``) with a fresh monitor, from scratch or
    resuming from checkpoint folder ``resume``; returns the monitor (the instance this caller
    built, as raytrain keeps it)."""
    from transformers import Trainer, TrainingArguments

    from emergent.train.latent_monitor import LatentMonitorConfig, callback
    from emergent.world.model import TinyModel, make_model

    tok = world["tok"]
    cfg = LatentMonitorConfig(
        sae="s",
        latents=list(range(16)),
        prompts=[world["prompts"]],
        every=EVERY,
        threshold=threshold,
    )
    monitor = callback(cfg, world["run"], "world_s0", tok, "test")
    model = make_model(TinyModel(d_model=32, layers=2, heads=2, d_ff=64, context=32), tok, seed)
    args = TrainingArguments(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=SAVE,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        restore_callback_states_from_checkpoint=restore,
    )
    cbs = [monitor, dies()] if die else [monitor]
    trainer = Trainer(model=model, args=args, train_dataset=world["rows"], callbacks=cbs)
    trainer.train(resume_from_checkpoint=resume)
    return monitor


def flags_of(history: list[dict], latents: list[int], threshold: float) -> dict[str, int]:
    """Naive reference: each latent's first step at ``threshold`` over its step-0 value."""
    out = {}
    for h in history:
        for j in latents:
            if str(j) not in out and h[f"latent_{j}"] - history[0][f"latent_{j}"] >= threshold:
                out[str(j)] = h["step"]
    return dict(sorted(out.items(), key=lambda kv: (kv[1], latents.index(int(kv[0])))))


@pytest.fixture(scope="module")
def died(world):
    """The uninterrupted run's history, a threshold some latent crosses only after the
    checkpoint, and the checkpoint a run with that threshold left when it died after step 8."""
    ref = train(world, str(world["tmp"] / "whole"), float("inf")).report()
    assert [h["step"] for h in ref["history"]] == list(range(0, STEPS + 1, EVERY))
    assert ref["flags"] == {}
    # the latent rising most after the checkpoint beyond its rise up to it; the threshold is
    # halfway, so its flag (step > 6) is decided against the start value of the first run
    means = np.array([[h[f"latent_{j}"] for j in ref["latents"]] for h in ref["history"]])
    steps = np.array([h["step"] for h in ref["history"]])
    rise = means - means[0]
    before, after = rise[steps <= SAVE].max(0), rise.max(0)
    i = int(np.argmax(after - before))
    assert after[i] - before[i] > 1e-4, "test would be vacuous: no latent rises after step 6"
    threshold = float(before[i] + after[i]) / 2
    with pytest.raises(Died):
        train(world, str(world["tmp"] / "died"), threshold, die=True)
    ckpt = world["tmp"] / "died" / f"checkpoint-{SAVE}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]
    kept = saved["LatentMonitor"]["attributes"]["record"]["history"]
    assert [h["step"] for h in kept] == [0, 2, 4, 6]  # step 8's row died with the run
    return {"ref": ref, "threshold": threshold, "latent": ref["latents"][i], "ckpt": ckpt}


@pytest.mark.parametrize("restore", [False, True], ids=["self-restored", "trainer-restored"])
def test_resumed_monitor_reports_as_the_uninterrupted_run(world, died, restore):
    # restore_callback_states_from_checkpoint=True: Trainer swaps in a new instance built from
    # the checkpoint; the one this caller holds must still report the run
    out = str(world["tmp"] / f"resumed-{restore}")
    threshold, ref = died["threshold"], died["ref"]
    got = train(world, out, threshold, seed=1, resume=str(died["ckpt"]), restore=restore)
    got = got.report()
    assert [h["step"] for h in got["history"]] == [h["step"] for h in ref["history"]]
    assert list(got["history"][-1]) == list(ref["history"][-1])  # train.json's key order
    torch.testing.assert_close(
        torch.tensor([list(h.values()) for h in got["history"]], dtype=torch.float64),
        torch.tensor([list(h.values()) for h in ref["history"]], dtype=torch.float64),
    )
    want = flags_of(ref["history"], ref["latents"], threshold)
    assert want[str(died["latent"])] > SAVE
    assert got["flags"] == want and list(got["flags"]) == list(want)


def test_resume_from_a_checkpoint_without_monitor_state_keeps_training(world, died, caplog):
    # a checkpoint saved before the monitor was attached: Trainer's next save must not fail on
    # the missing stateful_callbacks entry, and the monitor says its start values are new
    ckpt = world["tmp"] / "bare"
    shutil.copytree(died["ckpt"], ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["LatentMonitor"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    out = world["tmp"] / "bare-resumed"
    got = train(world, str(out), died["threshold"], resume=str(ckpt)).report()
    assert [h["step"] for h in got["history"]] == [8, 10, 12]
    assert (out / f"checkpoint-{STEPS}" / "trainer_state.json").exists()
    assert "without the monitor's state" in caplog.text
