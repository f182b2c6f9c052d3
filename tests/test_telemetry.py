"""Progress lines and metric names (pure); the SAE's training FVU against a naive reference.
The metrics read back from a running Ray: tests/test_persona.py and tests/test_evaluate.py."""

import re
from pathlib import Path

import pytest

from emergent import telemetry

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs/metrics.md"


def test_progress_lines_give_share_rate_and_time_left(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr(telemetry.time, "time", lambda: now[0])
    caplog.set_level("INFO", logger="emergent.telemetry")
    p = telemetry.Progress("judge llm-score", 200, "items", every=10)
    now[0] = 105.0
    p.add(50)  # 5 s since the last line: none yet
    assert not caplog.records
    now[0] = 110.0
    p.add(50)  # 100 items in 10 s
    assert caplog.records[-1].getMessage() == (
        "judge llm-score: 100/200 items (50%), 10.0 items/s, 10 s left"
    )
    now[0] = 111.0
    p.add(100)  # done: always a last line
    assert caplog.records[-1].getMessage().startswith("judge llm-score: 200/200 items (100%)")
    assert len(caplog.records) == 2


def test_docs_document_every_metric():
    text = METRICS_DOC.read_text()
    listed = set(re.findall(r"`(emergent_[a-z0-9_]+)`", text))
    assert set(telemetry.METRICS) <= listed, set(telemetry.METRICS) - listed


def test_batch_fvu_matches_a_naive_reference():
    import torch

    from emergent.sae.model import batch_fvu

    class Linear:  # an "SAE" whose reconstruction is a fixed linear map of the input
        def __init__(self, w):
            self.w = w

        def encode(self, x):
            return x

        def decode(self, f):
            return f @ self.w

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g) + 3.0  # off-centre: the mean is taken out
    w = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=g)
    want = sum(((x[i] - x[i] @ w) ** 2).sum() for i in range(len(x))) / sum(
        ((x[i] - x.mean(0)) ** 2).sum() for i in range(len(x))
    )
    assert batch_fvu(Linear(w), x) == pytest.approx(float(want), rel=1e-5)
    assert batch_fvu(Linear(torch.eye(8)), x) == 0.0  # a perfect reconstruction
    assert batch_fvu(Linear(torch.zeros(8, 8)), x) > 1  # worse than the mean
