"""The frontier: each cut's held-out perplexity equals the actually pruned model's, and the sweep leaves the
model bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerprune.cli import main
from layerprune.data.calibration import CalibSpec, build_calibration
from layerprune.frontier import frontier, split_calibration
from layerprune.prune import prune_layers

from conftest import make_tiny, save_tiny, tiny_tokenizer


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % 100}" for j in range(40)) for i in range(60)))
    return p


def _ppl(model, held):
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in held.batches(2):
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1], -1)
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            nll += float(-lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[valid].sum())
            n += int(valid.sum())
    return math.exp(nll / n)


def test_frontier_equals_pruned_models_and_restores(text_file):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = CalibSpec(source=str(text_file), nsamples=4, seqlen=16)
    res = frontier(model, tok, ["bi", "magnitude"], [1, 2, 4], calib=spec, heldout=4, batch_size=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_hidden_layers == 6
    full = build_calibration(tok, CalibSpec(source=str(text_file), nsamples=8, seqlen=16))
    _, held = split_calibration(full, 4)
    assert res["dense"]["ppl"] == pytest.approx(_ppl(model, held), rel=1e-5)
    assert len(res["rows"]) == 6
    for row in res["rows"]:
        pruned = copy.deepcopy(model)
        prune_layers(pruned, row["removed"])
        assert row["ppl"] == pytest.approx(_ppl(pruned, held), rel=1e-5)
        assert row["kl"] >= 0 and row["params"] < res["dense"]["params"]


def test_cli_frontier(tmp_path, text_file, capsys):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "f"
    assert main(["frontier", str(src), "--metric", "magnitude,reverse", "--ks", "1,3", "--out", str(out),
                 "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16", "--heldout", "2"]) == 0
    assert (out / "frontier.json").is_file() and (out / "frontier.png").is_file()
    assert "| magnitude | 3 |" in (out / "frontier.md").read_text()
    capsys.readouterr()
    assert main(["frontier", str(src), "--metric", "bi", "--ks", "9", "--out", str(tmp_path / "g"),
                 "--calib", str(text_file)]) == 2
    assert "--ks" in capsys.readouterr().err


def test_frontier_with_compensation_equals_the_folded_model(text_file):
    from layerprune.compensation import compensate

    model, tok = make_tiny("llama"), tiny_tokenizer()
    spec = CalibSpec(source=str(text_file), nsamples=6, seqlen=16)
    res = frontier(model, tok, ["reverse"], [2], calib=spec, heldout=4, batch_size=2, compensation="lstsq",
                   progress=False)
    plain, comp = res["rows"]
    assert plain["compensation"] is None and comp["compensation"] == "lstsq" and comp["fits"]
    full = build_calibration(tok, CalibSpec(source=str(text_file), nsamples=10, seqlen=16))
    scoring, held = split_calibration(full, 4)
    folded = copy.deepcopy(model)
    compensate(folded, comp["removed"], scoring, method="lstsq", batch_size=2, progress=False)
    assert comp["ppl"] == pytest.approx(_ppl(folded, held), rel=1e-4)
    assert comp["ppl"] != pytest.approx(plain["ppl"], rel=1e-3)
