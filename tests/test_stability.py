"""Ranking stability: a planted dead layer is always removed, tau of a metric with itself is 1, the bootstrap
is deterministic under its seed, and per-window statistics re-weighted by all-ones equal plain scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerprune.cli import main
from layerprune.data.calibration import CalibSpec, build_calibration
from layerprune.scoring import score
from layerprune.stability import kendall_tau, ranking_stability

from conftest import make_tiny, save_tiny, tiny_tokenizer


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % 100}" for j in range(40)) for i in range(60)))
    return p


def _dead(model, layer: int):
    """Zero the residual writes of one layer: its output equals its input."""
    with torch.no_grad():
        m = model.model.layers[layer]
        m.self_attn.o_proj.weight.zero_()
        m.mlp.down_proj.weight.zero_()
    return model


def test_planted_dead_layer_is_stably_removed(text_file):
    model, tok = _dead(make_tiny("llama"), 3), tiny_tokenizer()
    st = ranking_stability(model, tok, ["bi", "angular", "taylor"], 1,
                           calib=CalibSpec(source=str(text_file), nsamples=6, seqlen=16), resamples=8, seed=1,
                           progress=False)
    for name in ("bi", "angular", "taylor"):
        m = st["metrics"][name]
        assert m["removed_frequency"][3] == 1.0 and m["stable_set"] == [3], (name, m)
        assert m["rank_interval_90"][3] == [0.0, 0.0]
    assert "re-weight" in st["metrics"]["bi"]["cost"] and "re-run" in st["metrics"]["taylor"]["cost"]
    tau = st["kendall_tau_metrics"]["matrix"]
    assert all(tau[i][i] == pytest.approx(1.0) for i in range(3))


def test_deterministic_under_seed_and_varies_with_it(text_file):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    spec = CalibSpec(source=str(text_file), nsamples=6, seqlen=16)
    a = ranking_stability(model, tok, ["bi"], 2, calib=spec, resamples=6, seed=3, progress=False)
    b = ranking_stability(model, tok, ["bi"], 2, calib=spec, resamples=6, seed=3, progress=False)
    for st in (a, b):
        for m in st["metrics"].values():
            m.pop("seconds")  # wall time, the one thing that may differ
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = ranking_stability(model, tok, ["bi"], 2, calib=spec, resamples=6, seed=4, progress=False)
    assert c["metrics"]["bi"]["mean_rank"] != a["metrics"]["bi"]["mean_rank"] or \
        c["metrics"]["bi"]["rank_interval_90"] != a["metrics"]["bi"]["rank_interval_90"]


def test_per_window_statistics_equal_plain_scoring(text_file):
    """With every window weighted once the bootstrap's full-sample result is the plain score."""
    from layerprune.stability import _per_window

    model, tok = make_tiny("llama"), tiny_tokenizer()
    cal = build_calibration(tok, CalibSpec(source=str(text_file), nsamples=5, seqlen=16))
    for name in ("bi", "angular"):
        from layerprune.metrics import make_metric

        m = make_metric(name)
        plain = score(model, [m], cal, tokenizer=tok, cache=False, batch_size=2, progress=False).results[m.label]
        full, res = _per_window(model, [m], cal, [np.arange(5)], 2, False)[m.label]
        np.testing.assert_allclose(full.scores, plain.scores, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res[0].scores, plain.scores, rtol=1e-9, atol=1e-12)  # each window once


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_cli_stability(tmp_path, text_file, capsys):
    src = save_tiny(tmp_path / "m")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(" ".join(f"w{(i * 11 + j) % 100}" for j in range(40)) for i in range(60)))
    out = tmp_path / "s"
    assert main(["score", str(src), "--metric", "bi,magnitude", "--num", "2", "--out", str(out), "--calib",
                 str(text_file), "--calib", str(other), "--nsamples", "4", "--seqlen", "16", "--stability", "5"]) == 0
    data = json.loads((out / "scores.json").read_text())
    st = data["stability"]
    assert st["resamples"] == 5 and len(st["sources"]) == 2 and set(st["metrics"]) == {"bi", "magnitude"}
    assert st["kendall_tau_sources"]["magnitude"][0][1] == pytest.approx(1.0)  # data-free: the same ranking
    assert (out / "stability.png").is_file()
    capsys.readouterr()
    assert main(["prune", str(src), "--metric", "bi", "--num", "1", "--out", str(tmp_path / "p"), "--calib",
                 str(text_file), "--calib", str(other)]) == 2
    assert "several times" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [(["--stability", "100000000"], "2 to 1000 resamples"),
                                       (["--stability", "3", "--calib", "{empty}"], "has no text"),
                                       (["--stability", "3"], "needs the removal count")])
def test_cli_stability_refusals_before_scoring(tmp_path, text_file, capsys, extra, msg):
    """Refused in one line before any scoring, and nothing written (was: a scores.json without stability)."""
    src = save_tiny(tmp_path / "m")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "s"
    args = ["score", str(src), "--metric", "bi", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16",
            "--out", str(out)] + [a.format(empty=empty) for a in extra]
    if "needs the removal count" not in msg:
        args += ["--num", "2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
    assert not out.exists()
