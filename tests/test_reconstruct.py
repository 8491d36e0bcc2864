"""``reconstruct``: never worse than its lstsq start, layer by layer equals in memory, the written checkpoint
reloads with plain transformers on every tested architecture, spans planned as documented, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch

from layerprune.arch import parts
from layerprune.cli import main
from layerprune.compensation import CompensationConfig, compensate, compensate_checkpoint
from layerprune.compensation.methods import ReconSpec, make_method
from layerprune.compensation.reconstruct import Span, plan_spans
from layerprune.errors import LayerpruneError
from test_compensation import TEST_IDS, _calib, _write_calib

from conftest import ARCHS, make_tiny, save_tiny


def _removed(arch: str) -> list[int]:
    return [2, 3] if arch != "gemma3_text" else [3, 4]


def test_plan_spans():
    assert plan_spans([3, 4], 8, "before") == [Span((2,), 4, "3-4", False)]
    assert plan_spans([3, 4], 8, "after") == [Span((5,), 5, "3-4", False)]
    assert plan_spans([3, 4], 8, "both") == [Span((2, 5), 5, "3-4", False)]
    # A tail block has no kept layer after it: its span is the layer before, measured after the final norm.
    assert plan_spans([6, 7], 8, "after") == [Span((5,), 7, "6-7", True)]
    # A block at layer 0 has none before it.
    assert plan_spans([0, 1], 8, "before") == [Span((2,), 2, "0-1", False)]
    # Spans that would share a layer merge (one span, the later target).
    assert plan_spans([3, 5], 8, "both") == [Span((2, 4, 6), 6, "3,5", False)]
    assert plan_spans([3, 5], 8, "before") == [Span((2,), 3, "3", False), Span((4,), 5, "5", False)]
    # depth: that many kept layers on each chosen side (a tail block's two layers before it).
    assert plan_spans([6, 7], 8, "before", depth=2) == [Span((4, 5), 7, "6-7", True)]
    assert plan_spans([3, 4], 8, "both", depth=2) == [Span((1, 2, 5, 6), 6, "3-4", False)]
    assert plan_spans([0], 8, "before", depth=2) == [Span((1, 2), 2, "0", False)]
    assert plan_spans([3, 5], 8, "before", depth=2) == [Span((1, 2, 4), 5, "3,5", False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_reconstruct_lowers_the_fit_and_reloads(arch, tmp_path):
    """The trained layer's loss is never above the lstsq start (and here strictly below); the checkpoint
    written by the CLI path reloads with plain transformers and gives the in-memory model's logits."""
    from transformers import AutoModelForCausalLM

    model = make_tiny(arch)
    spec = ReconSpec(steps=30, lr=1e-3)
    out = compensate(model, _removed(arch), _calib(), method=make_method("reconstruct", recon=spec), progress=False)
    reps = out["compensation"]["reconstruct"]
    assert reps and all(r["loss_after"] < r["loss_before"] and r["kept_training"] for r in reps)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(TEST_IDS).logits, model.eval()(TEST_IDS).logits, atol=1e-4)


def test_training_that_does_not_help_is_undone():
    """A learning rate that wrecks the layer: the lstsq start is restored, bit for bit."""
    a, b = make_tiny("llama"), make_tiny("llama")
    compensate(a, [2, 3], _calib(), method="lstsq", progress=False)
    out = compensate(b, [2, 3], _calib(), progress=False,
                     method=make_method("reconstruct", recon=ReconSpec(steps=5, lr=50.0)))
    rep = out["compensation"]["reconstruct"][0]
    assert not rep["kept_training"] and rep["loss_after"] == rep["loss_before"]
    assert [t["lr"] for t in rep["tried"]] == [50.0, 12.5] and rep["lr"] is None  # retried once, smaller
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(ta, tb), ka


def test_a_failed_rate_is_retried_smaller(monkeypatch):
    """The retry starts from the restored start and keeps its result when it lowers the fit."""
    import layerprune.compensation.reconstruct as rc

    monkeypatch.setattr(rc, "RETRY_DIVISOR", 5e4)  # 50 wrecks the layer, 1e-3 trains it
    out = compensate(make_tiny("llama"), [2, 3], _calib(), progress=False,
                     method=make_method("reconstruct", recon=ReconSpec(steps=20, lr=50.0)))
    rep = out["compensation"]["reconstruct"][0]
    assert rep["kept_training"] and rep["lr"] == pytest.approx(1e-3) and len(rep["tried"]) == 2
    assert rep["tried"][0]["loss_after"] > rep["loss_before"] > rep["loss_after"]


@pytest.mark.parametrize("arch,removed", [("qwen2", [4, 5]), ("gpt2", [1, 2, 4]), ("gemma3_text", [2, 4, 5]),
                                          ("llama", [1, 5])])
def test_zero_steps_equals_lstsq(arch, removed):
    """reconstruct's first block is fitted from its own recording pass (not lstsq's dense pass): with no
    training the model must equal lstsq's, every block and fold site alike."""
    a, b = make_tiny(arch), make_tiny(arch)
    compensate(a, removed, _calib(), method="lstsq", progress=False)
    compensate(b, removed, _calib(), method=make_method("reconstruct", recon=ReconSpec(steps=0)), progress=False)
    with torch.no_grad():
        assert torch.allclose(a(TEST_IDS).logits, b(TEST_IDS).logits, atol=1e-5)


@pytest.mark.parametrize("arch,layers", [("llama", "before"), ("gemma3_text", "both"), ("gpt2", "after")])
def test_layerwise_equals_in_memory(arch, layers, tmp_path):
    src = save_tiny(tmp_path / "dense", arch)
    cfg = dict(method="reconstruct", nsamples=4, seqlen=16, batch_size=2, calib=str(_write_calib(tmp_path)),
               recon_steps=10, recon_lr=1e-3, recon_layers=layers, recon_batch=2)
    removed = [1, 2, 4] if arch != "gemma3_text" else [2, 4, 5]
    a = compensate_checkpoint(src, tmp_path / "mem", remove=removed, config=CompensationConfig(**cfg),
                              dtype="float32", progress=False)
    b = compensate_checkpoint(src, tmp_path / "lw", remove=removed,
                              config=CompensationConfig(**cfg, mode="layerwise"), dtype="float32", progress=False)
    from transformers import AutoModelForCausalLM

    # Adam turns rounding-level gradient differences into lr-sized steps on near-zero gradients: compare
    # what the models compute, not each weight.
    ma, mb = (AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval() for d in ("mem", "lw"))
    with torch.no_grad():
        la, lb = ma(TEST_IDS).logits, mb(TEST_IDS).logits
    assert torch.allclose(la, lb, atol=1e-3, rtol=1e-3), (la - lb).abs().max()
    ra, rb = a["compensation"]["reconstruct"], b["compensation"]["reconstruct"]
    assert [r["trained_layers"] for r in ra] == [r["trained_layers"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss_after"] == pytest.approx(y["loss_after"], rel=1e-3)
        assert x["loss_after"] <= x["loss_before"]
    man = json.loads((tmp_path / "lw" / "layerprune.json").read_text())
    assert man["compensation"]["method"] == "reconstruct"
    assert man["compensation"]["params"]["layers"] == layers


def test_config_refuses_bad_training_settings():
    for bad in ({"recon_steps": -1}, {"recon_lr": 0.0}, {"recon_batch": 0}, {"recon_layers": "middle"},
                {"recon_loss": "l1"}):
        with pytest.raises(LayerpruneError):
            CompensationConfig(method="reconstruct", **bad).validate()


def _refused(capsys, needle, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own choice check: usage + one error line, status 2
        assert e.code == 2 and needle in capsys.readouterr().err
        return
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("argv,needle", [
    (["--recon-steps", "-1"], "--recon-steps >= 0"),
    (["--recon-lr", "0"], "--recon-lr > 0"),
    (["--recon-layers", "middle"], "invalid choice"),
])
def test_cli_refuses_before_loading(argv, needle, tmp_path, capsys):
    src = save_tiny(tmp_path / "dense", "llama")
    capsys.readouterr()
    _refused(capsys, needle, "compensate", str(src), "--tail", "2", "--method", "reconstruct",
             "--out", str(tmp_path / "o"), *argv)
    assert not (tmp_path / "o").exists()


def test_frontier_refuses_a_training_method(capsys, tmp_path):
    src = save_tiny(tmp_path / "dense", "llama")
    capsys.readouterr()
    _refused(capsys, "invalid choice", "frontier", str(src), "--metric", "bi", "--ks", "1", "--compensate",
             "reconstruct", "--out", str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_search_trains_the_written_cut(tmp_path):
    """The search proxy ranks by the lstsq maps; the cut it writes is trained (reports in its manifest)."""
    from layerprune.compensation.core import fit_in_memory
    from layerprune.data.calibration import Calibration
    from layerprune.search.core import Folded, materialize

    from conftest import tiny_tokenizer

    src = save_tiny(tmp_path / "dense", "llama")
    model = make_tiny("llama")
    cal: Calibration = _calib()
    method = make_method("reconstruct", recon=ReconSpec(steps=10, lr=1e-3))
    fits = fit_in_memory(model, [2, 3], cal, method, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = materialize(model, tiny_tokenizer(), str(src), [2, 3], Folded(fits, method, cal), tmp_path / "cut", {})
    man = json.loads((out / "layerprune.json").read_text())
    rep = man["method_params"]["reconstruct"][0]
    assert rep["trained_layers"] == [1] and rep["loss_after"] < rep["loss_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the loaded model untouched
    assert parts(model).num_layers == 6
