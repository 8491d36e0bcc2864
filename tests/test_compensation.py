"""Compensation: folded weights equal the hooked map, the fit is the least-squares solution, streaming and
layer-by-layer equal in memory, bad input is refused before any work."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from layerprune.arch import parts
from layerprune.cli import main
from layerprune.compensation import CompensationConfig, compensate, compensate_checkpoint
from layerprune.compensation.core import fit_in_memory, fold_in_memory
from layerprune.compensation.fold import map_hooks
from layerprune.compensation.methods import Stats, make_method
from layerprune.data.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.metrics._forward import skipped
from layerprune.prune.surgery import prune_layers

from conftest import ARCHS, make_tiny, save_tiny, tiny_tokenizer


def _calib(n: int = 6, t: int = 24, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, t), generator=g)
    return Calibration(ids, torch.ones_like(ids))


TEST_IDS = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(1))


def _hooked_logits(model, removed, fits):
    p = parts(model)
    with torch.no_grad(), contextlib.ExitStack() as st:
        for i in removed:
            st.enter_context(skipped(p.layers, i))
        st.enter_context(map_hooks(model, p.layers, [(f.block, f.site, f.tensor()) for f in fits]))
        return model(TEST_IDS).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lstsq", "scale"])
def test_fold_equals_hook_after_reload(arch, method, tmp_path):
    """The folded, pruned, saved checkpoint reloaded with plain transformers gives the hooked model's logits."""
    from transformers import AutoModelForCausalLM

    removed = [1, 3, 4] if arch not in ("gemma", "gemma2", "gemma3_text") else [2, 3, 5]
    model = make_tiny(arch)
    fits = fit_in_memory(model, removed, _calib(), make_method(method, ridge=1e-4), batch_size=2, progress=False)
    ref = _hooked_logits(model, removed, fits)
    plain = _hooked_logits(model, removed, [])
    fold_in_memory(model, fits, removed)
    prune_layers(model, removed)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = back(TEST_IDS).logits
    # Scale folds through norms: exact up to their eps.
    tol = 1e-4 if method == "lstsq" else 2e-3
    assert torch.allclose(got, ref, atol=tol * float(ref.abs().max()), rtol=0), float((got - ref).abs().max())
    assert not torch.allclose(plain, ref, atol=1e-3), "the map must change the output"


def test_lstsq_equals_direct_solve():
    """The O(d²) normal-equation solution equals torch.linalg.lstsq on all tokens."""
    model = make_tiny("llama")
    cal = _calib(8)
    removed = [3, 4]
    fit = fit_in_memory(model, removed, cal, make_method("lstsq"), batch_size=3, progress=False)[0]
    p = parts(model)
    got: dict[str, torch.Tensor] = {}
    h1 = p.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: got.__setitem__("m", o))
    h2 = p.layers[2].register_forward_hook(lambda m, a, o: got.__setitem__("h", o))
    h3 = p.layers[4].register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
    with torch.no_grad():
        model(cal.input_ids)
    for h in (h1, h2, h3):
        h.remove()
    m, h, y = (got[k].reshape(-1, 32).double() for k in ("m", "h", "y"))
    direct = torch.linalg.lstsq(m, m + y - h).solution
    assert torch.allclose(fit.fit.matrix(), direct, atol=1e-6)


def test_stats_batches_equal_one_batch():
    model = make_tiny("qwen2")
    cal = _calib(6)
    a = fit_in_memory(model, [4], cal, make_method("lstsq"), batch_size=1, progress=False)[0]
    b = fit_in_memory(model, [4], cal, make_method("lstsq"), batch_size=None, progress=False)[0]
    assert torch.allclose(a.fit.delta, b.fit.delta, atol=1e-8)
    assert a.fit.report["mse_after"] == pytest.approx(b.fit.report["mse_after"], rel=1e-9)


def test_exactly_linear_target_recovered():
    """When the dense residual after the block is an exact linear function of the fold site's output, the map
    is recovered exactly (here: a removed layer whose branches write nothing, so T = I)."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    fit = fit_in_memory(model, [3], _calib(), make_method("lstsq"), progress=False)[0]
    assert float(fit.fit.delta.abs().max()) < 1e-8
    assert fit.fit.report["mse_after"] < 1e-12
    # And a synthetic exact map: y − h = M·K.
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, 16, generator=g)
    k = torch.randn(16, 16, generator=g)
    h = torch.randn(500, 16, generator=g)
    st = Stats(16)
    st.update(m, h, h + m @ k)
    f = make_method("lstsq").fit(st, "matrix", "synthetic")
    assert torch.allclose(f.delta, k.double(), atol=1e-8)


@pytest.mark.parametrize("method", ["lstsq", "cosine"])
def test_never_raises_its_loss(method):
    for arch in ("llama", "gemma2", "gpt2"):
        model = make_tiny(arch)
        removed = [2, 3]
        for f in fit_in_memory(model, removed, _calib(), make_method(method, steps=30), progress=False):
            rep = f.fit.report
            assert rep["mse_after"] <= rep["mse_before"] * (1 + 1e-9)
            if method == "cosine":
                assert rep["cosine_distance_after"] <= rep["cosine_distance_before"] + 1e-12


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_layerwise_equals_in_memory(arch, tmp_path):
    src = save_tiny(tmp_path / "dense", arch)
    cfg = dict(method="lstsq", nsamples=4, seqlen=16, batch_size=2, calib=str(_write_calib(tmp_path)))
    removed = [1, 2, 4] if arch != "gemma3_text" else [2, 4, 5]
    a = compensate_checkpoint(src, tmp_path / "mem", remove=removed, config=CompensationConfig(**cfg),
                              dtype="float32", progress=False)
    b = compensate_checkpoint(src, tmp_path / "lw", remove=removed,
                              config=CompensationConfig(**cfg, mode="layerwise"), dtype="float32", progress=False)
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "mem" / "model.safetensors"), load_file(tmp_path / "lw" / "model.safetensors")
    assert set(ta) - {"lm_head.weight"} == set(tb) - {"lm_head.weight"}
    for k in tb:
        assert torch.allclose(ta[k], tb[k], atol=1e-5, rtol=1e-4), k
    for x, y in zip(a["compensation"]["blocks"], b["compensation"]["blocks"]):
        assert x["fit"]["mse_after"] == pytest.approx(y["fit"]["mse_after"], rel=1e-4)
    man = json.loads((tmp_path / "lw" / "layerprune.json").read_text())
    assert man["compensation"]["mode"] == "layerwise" and man["removed_layers"] == removed


def _write_calib(tmp_path):
    words = [f"w{i}" for i in range(100)]
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(words[j] for j in torch.randint(0, 100, (40,), generator=g).tolist()) for _ in range(12)]
    p = tmp_path / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return p


def test_api_compensate_prunes_in_place():
    model = make_tiny("mistral")
    out = compensate(model, [4, 5], _calib(), method="lstsq", progress=False)
    assert parts(model).num_layers == 4 and out["record"].removed_layers == [4, 5]
    block = out["compensation"]["blocks"][0]
    assert block["fold_point"] == "model.layers.3.mlp.down_proj"
    assert block["fit"]["relative_error_after"] < block["fit"]["relative_error_before"]


def test_gemma2_folds_a_diagonal_and_says_so():
    model = make_tiny("gemma2")
    out = compensate(model, [3], _calib(), method="lstsq", progress=False)
    b = out["compensation"]["blocks"][0]
    assert b["map"] == "diag" and "diagonal" in b["note"]
    assert b["fold_point"].endswith("post_feedforward_layernorm")


def test_block_at_layer_zero_untied_folds_into_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama", tie_word_embeddings=False)
    fits = fit_in_memory(model, [0, 1], _calib(), make_method("lstsq"), progress=False)
    assert fits[0].site.kind == "embed"
    ref = _hooked_logits(model, [0, 1], fits)
    fold_in_memory(model, fits, [0, 1])
    prune_layers(model, [0, 1])
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(TEST_IDS).logits, ref, atol=1e-4)


def _cli(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize("argv,needle", [
    (["--tail", "1", "--nsamples", "1", "--seqlen", "8"], "at least as many calibration tokens"),
    (["--remove", "0,1"], "starts at layer 0 and the input embeddings are tied"),
    (["--tail", "1", "--method", "nosuch"], "invalid choice"),
    (["--tail", "1", "--ridge", "-1"], "ridge"),
    (["--remove", "9"], "out of range"),
])
def test_cli_bad_input_one_line_nothing_written(argv, needle, tmp_path, capsys):
    src = save_tiny(tmp_path / "dense", "gemma")  # tied embeddings
    out = tmp_path / "out"
    capsys.readouterr()
    try:
        rc, err = _cli(capsys, "compensate", str(src), "--out", str(out), *argv)
    except SystemExit as e:  # argparse's own choice check: usage + one error line, status 2
        assert e.code == 2 and needle in capsys.readouterr().err
    else:
        assert rc == 2 and len(err) == 1 and err[0].startswith("layerprune: error:") and needle in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_unknown_fold_point_names_supported(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2_moe", vocab_size=128, hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    tiny_tokenizer().save_pretrained(tmp_path / "moe")
    capsys.readouterr()
    rc, err = _cli(capsys, "compensate", str(tmp_path / "moe"), "--tail", "1", "--out", str(tmp_path / "o"))
    assert rc == 2 and "no compensation fold point known for 'qwen2_moe'" in err[0] and "llama" in err[0]
    assert not (tmp_path / "o").exists()


def test_nan_statistics_refused():
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(LayerpruneError, match="NaN or inf"):
        fit_in_memory(model, [3], _calib(), make_method("lstsq"), progress=False)


def test_prune_streaming_compensate_equals_memory(tmp_path, capsys):
    src = save_tiny(tmp_path / "dense", "llama")
    calib = str(_write_calib(tmp_path))
    common = ["--remove", "2,3", "--compensate", "lstsq", "--comp-nsamples", "4", "--comp-seqlen", "16",
              "--comp-calib", calib]
    assert main(["prune", str(src), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["prune", str(src), "--out", str(tmp_path / "b"), "--streaming", *common]) == 0
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in tb:
        assert torch.allclose(ta[k], tb[k], atol=1e-5), k
    assert json.loads((tmp_path / "b" / "layerprune.json").read_text())["compensation"]["mode"] == "layerwise"
