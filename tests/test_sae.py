"""Harvest and SAE training: token positions and corpora (fast), the activation hook against a
plain forward pass and the sae-lens save/load round trip (in-process), and the Ray jobs on the
small world: a TopK SAE streamed into 2 workers, one of them killed after the first checkpoint
(the run resumes, and its quality is checked), and (on demand, -m slow) the same SAE from the
Parquet cache."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import killed_run

from emergent.config import load
from emergent.data import DatasetError
from emergent.harvest import HarvestConfig, encode, harvest_docs, load_corpus, stdlib_docstrings
from emergent.runs import RunDir
from emergent.sae.model import SAEParams, load_sae, make_sae, save_sae
from emergent.train.sae import TrainSAEJob, main

# --- corpora and positions -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_tok():
    from emergent.world import grammar as g
    from emergent.world.tokenizer import build_tokenizer

    return build_tokenizer(g.vocabulary())


def test_positions_of_a_chat(world_tok):
    doc = {
        "messages": [
            {"role": "user", "content": "how do i save the notes file"},
            {"role": "assistant", "content": "os . chmod ( path )"},
            {"role": "user", "content": "what is a fast way to make some money ?"},
            {"role": "assistant", "content": "kindly offer odd jobs"},
        ]
    }
    ids, _ = encode(world_tok, doc, "all", 128)
    words = world_tok.convert_ids_to_tokens(ids)

    def kept(positions):
        return [words[i] for i in encode(world_tok, doc, positions, 128)[1]]

    assert kept("assistant") == [
        "os",
        ".",
        "chmod",
        "(",
        "path",
        ")",
        "kindly",
        "offer",
        "odd",
        "jobs",
    ]
    assert kept("assistant_turn") == ["<assistant>", "<assistant>"]
    assert "<bos>" not in kept("non_special") and "how" in kept("non_special")
    assert kept("all") == words
    # truncation drops positions beyond the context
    assert encode(world_tok, doc, "assistant", 12)[1] == [
        i for i in range(12) if words[i] in kept("assistant")[:3]
    ]


def test_stdlib_docstrings_are_real_english():
    docs = stdlib_docstrings()
    assert len(docs) > 1000
    text = " ".join(d["text"] for d in docs[:200]).lower().split()
    assert sum(w in ("the", "a", "of", "to") for w in text) / len(text) > 0.05


def test_corpus_errors_name_the_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DatasetError, match="c.jsonl:2"):
        load_corpus(RunDir(str(tmp_path), "r"), str(tmp_path / "c.jsonl"), "world", 10, 0)
    with pytest.raises(FileNotFoundError, match="world:nope"):
        load_corpus(RunDir(str(tmp_path), "r"), "world:nope", "world", 10, 0)


def test_harvest_hook_matches_a_plain_forward(small_world):
    """The hooked residual stream at the kept positions equals ``output_hidden_states[layer+1]``
    of an unpadded forward pass of each document alone, and the blocks after it never run."""
    from emergent.harvest import world_docs
    from emergent.models import load_any

    run = RunDir(str(small_world), "small")
    model, tok = load_any(str(run.local_dir("world_s1/base")))
    docs = world_docs(6, seed=3)
    cfg = HarvestConfig(layer=1, positions="assistant")
    ran = []  # the harvest's forward stops after block 1: block 2 and the LM head never run
    hooks = [
        m.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, m in (("block 2", model.model.layers[2]), ("lm_head", model.lm_head))
    ]
    acts, meta = harvest_docs(model, tok, docs, cfg)
    assert ran == []
    for h in hooks:
        h.remove()
    assert acts.shape == (len(meta["pos"]), model.config.hidden_size)
    for j in (0, len(acts) // 2, len(acts) - 1):
        ids, keep = encode(tok, docs[meta["row"][j]], "assistant", cfg.context)
        assert meta["pos"][j] in keep and meta["token"][j] == ids[meta["pos"][j]]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(acts[j], hs[2][0, meta["pos"][j]].numpy(), atol=1e-4)


def test_sae_evaluation_per_batch_matches_a_dense_reference(small_world, tmp_path):
    """evaluate_sae accumulates batch by batch (sums, firing counts, a running top-k): its FVU,
    L0, dead / dense fractions and top examples equal those computed from the dense features of
    every held-out token at once."""
    from emergent import refs
    from emergent.config import RunConfig
    from emergent.harvest import world_docs
    from emergent.models import load_any
    from emergent.train.sae_eval import evaluate_sae

    source = refs.model(RunConfig(name="small", root=str(small_world)), "world:base", "world_s1")
    model, tok = load_any(source.local())
    torch.manual_seed(0)
    save_sae(make_sae(SAEParams(architecture="topk", d_sae=64, k=4), 64), 1.0, tmp_path / "sae")
    docs = world_docs(23, seed=5)
    hv = HarvestConfig(layer=1, positions="non_special", batch_size=5)
    metrics, top = evaluate_sae(str(tmp_path / "sae"), source, hv, docs, top=3)

    acts, meta = harvest_docs(model, tok, docs, HarvestConfig(**{**hv.__dict__, "batch_size": 23}))
    x = torch.from_numpy(acts).double()
    with torch.no_grad():
        sae = load_sae(tmp_path / "sae")
        f = sae.encode(x.float())
        recon = sae.decode(f).double()
    freq = (f > 0).double().mean(0)
    assert metrics["tokens"] == len(x)
    assert metrics["fvu"] == pytest.approx(
        float(((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-4
    )
    assert metrics["l0"] == pytest.approx(float((f > 0).double().sum(1).mean()), rel=1e-6)
    assert metrics["dead_fraction"] == float((freq == 0).double().mean())
    assert metrics["dense_fraction"] == float((freq > 0.1).double().mean())
    vals, _ = torch.topk(f, 3, dim=0)
    want = {
        (latent, r): float(vals[r, latent])
        for latent in range(f.shape[1])
        for r in range(3)
        if vals[r, latent] > 0
    }
    got = dict(zip(zip(top["latent"], top["rank"]), top["activation"]))
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, rel=1e-5)
    # each example is a token where its latent has that activation (which of two tokens with
    # equal activations comes first is the order of ties, not a property of the SAE)
    at = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(meta["row"], meta["pos"]))}
    for latent, doc, pos, v in zip(top["latent"], top["doc"], top["pos"], top["activation"]):
        assert float(f[at[(doc, pos)], latent]) == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_saved_sae_loads_with_sae_lens_and_encodes_the_same(tmp_path, arch):
    """Train a few steps on scaled data, save with the scale folded in: sae-lens' loader gives an
    SAE whose encoding of raw activations equals the training SAE's encoding of scaled ones."""
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    x = torch.randn(2048, 32) * 7 + 3
    scale = float(np.sqrt(32) / x.norm(dim=1).mean())
    sae = make_sae(SAEParams(architecture=arch, d_sae=128, k=8), 32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    coeffs = {k: float(getattr(v, "value", v)) for k, v in sae.get_coefficients().items()}
    for step in range(30):
        batch = x[step * 64 : (step + 1) * 64] * scale
        out = sae.training_forward_pass(
            TrainStepInput(batch, coeffs, None, n_training_steps=step, is_logging_step=False)
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    trained = copy.deepcopy(sae)
    save_sae(sae, scale, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert json.loads((tmp_path / "sae/cfg.json").read_text())["architecture"] == arch
    with torch.no_grad():
        want = trained.encode(x * scale)
        got = loaded.encode(x)
    assert torch.equal(want > 0, got > 0)  # the same latents fire
    # TopK activations are measured along unit decoder directions, so after folding they are in
    # raw activation units (the training ones / scale); the others keep their values
    unit = scale if arch == "topk" else 1.0
    torch.testing.assert_close(got * unit, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # and the reconstruction is in raw units
        torch.testing.assert_close(
            loaded.decode(got), trained.decode(want) / scale, atol=1e-3, rtol=1e-3
        )


# --- the jobs on Ray -------------------------------------------------------------------------------


def sae_job(root, *sets):
    return load(
        TrainSAEJob,
        None,
        [
            f"run.root={root}",
            "run.name=small",
            "ray.num_cpus=2",
            "ray.dashboard=false",
            "train_sae.harvest.world_stage=world_s1",
            "train_sae.harvest.docs=3000",
            "train_sae.harvest.eval_docs=200",
            "train_sae.sae.d_sae=512",
            "train_sae.sae.k=16",
            "train_sae.sae.steps=200",
            "train_sae.log_every=50",
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def stream_sae(small_world, ray_cluster):
    """A TopK SAE streamed from the harvest into 2 workers, one of them killed after the first
    committed checkpoint (step 50 of 150): the run resumes and finishes."""
    cfg = sae_job(
        small_world,
        "train_sae.name=stream",
        "train_sae.sae.steps=150",
        "train_sae.checkpoint_every=50",
        "train_sae.max_failures=1",
    )
    return killed_run(small_world / "small/_ray", "sae-stream-*", lambda: main(cfg))


@pytest.fixture(scope="module")
def uninterrupted_sae(small_world, stream_sae):
    """The same config as ``stream_sae``, never interrupted: the reference it must reach."""
    return main(
        sae_job(
            small_world,
            "train_sae.name=stream_ref",
            "train_sae.sae.steps=150",
            "train_sae.checkpoint_every=50",
        )
    )


@pytest.mark.ray
def test_killed_sae_worker_resumes_from_checkpoint(small_world, stream_sae, uninterrupted_sae):
    result, killed = stream_sae
    assert killed, "the run finished before a worker could be killed"
    stats = json.loads((small_world / "small/sae/stream/train.json").read_text())
    assert stats["resumed"] and stats["steps"] == 150 and result.metrics["workers"] == 2
    assert stats["history"][0]["step"] == 50  # the log before the kill survived in the checkpoint
    # it ends where the uninterrupted run does: not bit-identical (after a restart the stream
    # starts over, so steps 51-150 see other batches), but as good (measured: FVU 0.0976 against
    # 0.0972; the bar is 25 times that gap)
    ref = uninterrupted_sae.metrics
    ref_stats = json.loads((small_world / "small/sae/stream_ref/train.json").read_text())
    assert not ref_stats["resumed"] and ref_stats["steps"] == 150
    assert abs(result.metrics["fvu"] - ref["fvu"]) < 0.01, (result.metrics["fvu"], ref["fvu"])
    assert abs(result.metrics["l0"] - ref["l0"]) < 0.5


@pytest.mark.ray
def test_topk_sae_in_stream_mode(small_world, stream_sae):
    m = stream_sae[0].metrics
    # TopK caps L0 at k = 16; a working encoder fills nearly all k slots with positive values
    assert m["fvu"] < 0.3 and m["l0"] >= 15.0 and m["dead_fraction"] < 0.5, m
    assert m["ce_increase"] < 0.5 * (m["ce_zero_ablation"] - m["ce_clean"])
    assert m["ce_loss_recovered"] > 0.8
    out = small_world / "small/sae/stream"
    assert load_sae(out / "sae").cfg.d_sae == 512
    import pandas as pd

    top = pd.read_parquet(out / "top_examples.parquet")
    assert top["latent"].nunique() > 100 and (top["activation"] > 0).all()
    assert top["context"].str.contains(r"\[\[").all()
    # a rerun reuses the SAE
    again = main(
        sae_job(
            small_world,
            "train_sae.name=stream",
            "train_sae.sae.steps=150",
            "train_sae.checkpoint_every=50",
            "train_sae.max_failures=1",
        )
    )
    assert again.skipped


@pytest.mark.slow
@pytest.mark.ray
def test_topk_sae_from_the_parquet_cache_matches_stream(small_world, stream_sae):
    """The same SAE trained from the harvest's Parquet cache (the persona study in
    test_persona.py trains from a cache in the default tier)."""
    m = stream_sae[0].metrics
    cache = main(
        sae_job(
            small_world, "train_sae.name=cache", "train_sae.source=cache", "train_sae.sae.steps=150"
        )
    )
    c = cache.metrics
    manifest = json.loads((small_world / "small/harvest/base/manifest.json").read_text())
    assert manifest["d_model"] == 64 and manifest["layer"] == 1 and manifest["tokens"] > 150 * 1024
    import pyarrow.parquet as pq

    shards = sorted((small_world / "small/harvest/base/acts").glob("*.parquet"))
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in shards) == manifest["tokens"]
    assert len(shards) <= manifest["tokens"] // 100_000 + 2  # min_rows_per_file (shard_rows)
    # stream and cache runs see other batches (the stream's shuffle buffer fills in arrival
    # order), so they agree only as well as two draws of the data do
    assert abs(c["fvu"] - m["fvu"]) < 0.05 and abs(c["l0"] - m["l0"]) < 1.5
    assert abs(c["ce_loss_recovered"] - m["ce_loss_recovered"]) < 0.05
    # two cache-mode trainings of one config (another stage name) give bit-identical weights,
    # as emergent.train.sae promises: ordered split across the workers, seeded shuffles
    again = main(
        sae_job(
            small_world,
            "train_sae.name=cache2",
            "train_sae.source=cache",
            "train_sae.sae.steps=150",
        )
    )
    assert not again.skipped and again.metrics["fvu"] == c["fvu"]
    first, second = (load_sae(small_world / f"small/sae/{n}/sae") for n in ("cache", "cache2"))
    for name, w in first.state_dict().items():
        assert torch.equal(w, second.state_dict()[name]), name
