"""Layer-importance metrics: hand computations, known rankings, prefix reuse == naive, masking, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layerprune.arch import parts
from layerprune.data.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.metrics import (
    HIGHER,
    METRICS,
    Magnitude,
    RandomOrder,
    make_metric,
    remove_one_nll_naive,
    remove_one_nll_prefix,
)
from layerprune.metrics.magnitude import weight_rows
from layerprune.scoring import score

from conftest import ARCHS, make_tiny

# Output projections (weights and biases) whose zeroing removes a layer's residual contribution.
_OUT_PROJ = ("o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense", "dense_4h_to_h")


def zero_residual(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, mod in layer.named_modules():
            if name.split(".")[-1] in _OUT_PROJ:
                for p in mod.parameters(recurse=False):
                    p.zero_()


def calib(n: int = 4, s: int = 24, seed: int = 0, pad_row: int | None = 1, pad_from: int = 17) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (n, s), generator=g)
    mask = torch.ones_like(ids)
    if pad_row is not None:
        mask[pad_row, pad_from:] = 0
        ids[pad_row, pad_from:] = 0
    return Calibration(ids, mask)


def layer_states(model, cal: Calibration) -> list[torch.Tensor]:
    """X_0..X_L (layer inputs, then the last output) by hooks, independent of the library's plumbing."""
    layers = parts(model).layers
    ins, outs = {}, {}

    def hook(i: int):
        def f(mod, args, kwargs, out) -> None:
            ins[i] = args[0] if args else kwargs["hidden_states"]
            outs[i] = out if torch.is_tensor(out) else out[0]
        return f

    hs = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask)
    for h in hs:
        h.remove()
    return [ins[i] for i in range(len(layers))] + [outs[len(layers) - 1]]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt", "gpt_neox", "qwen3"])
def test_zero_residual_layer_is_identity_and_least_important(arch):
    model = make_tiny(arch)
    zero_residual(parts(model).layers[2])
    cal = calib()
    st = layer_states(model, cal)
    assert torch.equal(st[2], st[3])  # the layer really is an identity now
    r = score(model, ["bi", "angular", "cka"], cal, progress=False)
    for name in ("bi", "angular", "cka"):
        res = r[name]
        assert res.direction == HIGHER
        assert len(res.scores) == 6 and all(v is not None for v in res.scores)  # every layer, last included
        assert res.removal_order()[0] == 2, (name, res.scores)
        assert abs(res.scores[2]) < 1e-6
    assert r["angular"].block_scores[1][2] == 0.0  # exact: angle from |u - v|, not arccos


def test_ppl_ranks_zero_residual_layer_least_important():
    """On a briefly trained tiny model (a copy task needs every layer) with layer 2 an identity."""
    torch.manual_seed(0)
    model = make_tiny("llama", num_hidden_layers=4)
    lay = parts(model).layers[2]
    zero_residual(lay)
    lay.self_attn.o_proj.weight.requires_grad_(False)
    lay.mlp.down_proj.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)

    def copy_task(n: int) -> torch.Tensor:
        half = torch.randint(3, 100, (n, 12), generator=g)
        return torch.cat([half, half], 1)

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(200):
        x = copy_task(16)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = copy_task(8)
    res = score(model, ["ppl"], Calibration(x, torch.ones_like(x)), progress=False)["ppl"]
    assert res.removal_order()[0] == 2
    # Removing an identity layer leaves the model unchanged: its score is the full model's perplexity.
    assert res.scores[2] == pytest.approx(res.extra["baseline_ppl"], rel=1e-6)
    assert all(res.scores[i] > res.extra["baseline_ppl"] * 1.02 for i in (0, 1, 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_ppl_prefix_reuse_equals_naive_loop(arch):
    model = make_tiny(arch)
    cal = calib(n=5)
    a_nll, a_n, base, how = remove_one_nll_prefix(model, cal, batch_size=2, progress=False)
    b_nll, b_n, _, how_b = remove_one_nll_naive(model, cal, batch_size=2, progress=False)
    assert how == "prefix-reuse" and how_b == "naive" and a_n == b_n == cal.num_target_tokens()
    for x, y in zip(a_nll, b_nll):
        assert abs(x - y) <= 1e-5 * abs(y)
    # The baseline equals the model's own causal-LM loss (padding ignored).
    ids = cal.input_ids.clone()
    labels = ids.masked_fill(cal.attention_mask == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=cal.attention_mask, labels=labels).loss
    assert base / a_n == pytest.approx(float(loss), rel=1e-5)


def test_ppl_naive_is_a_real_remove_one_model():
    """Skipping a layer in place gives the same perplexity as a model physically pruned of it."""
    from layerprune.prune import prune_layers

    model = make_tiny("llama")
    cal = calib(pad_row=None)
    nll, n, _, _ = remove_one_nll_prefix(model, cal, progress=False)
    pruned = make_tiny("llama")
    prune_layers(pruned, [3])
    with torch.no_grad():
        loss = pruned(input_ids=cal.input_ids, labels=cal.input_ids).loss
    assert nll[3] / n == pytest.approx(float(loss), rel=1e-5)


def test_bi_and_angular_equal_hand_computation_with_padding():
    model = make_tiny("llama")
    cal = calib()
    st = layer_states(model, cal)
    m = cal.attention_mask.bool()
    r = score(model, ["bi", "angular"], cal, progress=False)
    for layer in range(6):
        a, b = st[layer][m].double(), st[layer + 1][m].double()
        assert r["bi"].scores[layer] == pytest.approx(1 - F.cosine_similarity(a, b, dim=-1).mean().item(), abs=1e-9)
    for start in range(6):
        for n in range(0, 7 - start):
            a, b = st[start][m].double(), st[start + n][m].double()
            cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
            want = (torch.arccos(cos) / math.pi).mean().item()
            assert r["angular"].block_scores[n][start] == pytest.approx(want, abs=1e-5)
    assert all(v == 0.0 for v in r["angular"].block_scores[0] if v is not None)  # n = 0 is 0


def test_bi_seed_compat_is_one_global_cosine():
    model = make_tiny("gpt2")
    cal = calib(pad_row=None)
    st = layer_states(model, cal)
    res = score(model, [make_metric("bi", seed_compat=True)], cal, progress=False)["bi"]
    for layer in range(6):
        a, b = st[layer].double().flatten(), st[layer + 1].double().flatten()
        assert res.scores[layer] == pytest.approx(1 - (a @ b / (a.norm() * b.norm())).item(), abs=1e-9)
    assert res.params == {"seed_compat": True}


def test_cka_equals_seed_formula():
    model = make_tiny("llama")
    cal = calib(n=5, pad_row=None)
    st = layer_states(model, cal)
    res = score(model, ["cka"], cal, progress=False)["cka"]

    def hsic(k: torch.Tensor, lk: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        return torch.trace(k @ h @ lk @ h) / (n - 1) ** 2

    def cka(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x.double().flatten(1), y.double().flatten(1)
        kx, ky = x @ x.T, y @ y.T
        return float(hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky)))

    mat = res.extra["matrix"]
    for i in range(6):
        for j in range(6):
            assert mat[i][j] == pytest.approx(cka(st[i + 1], st[j + 1]), abs=1e-9)
        assert res.scores[i] == pytest.approx(1 - cka(st[i], st[i + 1]), abs=1e-9)


def test_padding_is_masked():
    model = make_tiny("qwen2")
    a = calib()
    b = Calibration(a.input_ids.clone(), a.attention_mask.clone())
    b.input_ids[1, 17:] = 77  # different junk under the padding
    unmasked = Calibration(a.input_ids.clone(), torch.ones_like(a.attention_mask))
    names = ["bi", "angular", "cka", "ppl"]
    ra, rb, ru = (score(model, names, c, progress=False) for c in (a, b, unmasked))
    for n in names:
        assert ra[n].scores == pytest.approx(rb[n].scores, rel=1e-6, abs=1e-9), n
        assert ra[n].scores != pytest.approx(ru[n].scores, rel=1e-6, abs=1e-9), n


def _set_layer(layer: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.fill_(1.0 if "norm" in name else value)


def test_magnitude_equals_hand_computation():
    model = make_tiny("llama")
    layer = parts(model).layers[1]
    _set_layer(layer, -0.5)
    mats = [p for n, p in layer.named_parameters() if p.dim() == 2]
    norms = [p for n, p in layer.named_parameters() if p.dim() == 1]
    assert len(mats) == 7 and len(norms) == 2
    for p_ord in (1, 2):
        published = sum((m.numel() * 0.5 ** p_ord) ** (1 / p_ord) for m in mats) + \
            sum(v.numel() ** (1 / p_ord) for v in norms)
        seed = sum(m.numel() * 0.5 ** p_ord for m in mats) + sum(v.numel() for v in norms)
        got = score(model, [make_metric("magnitude", p=p_ord)], None, progress=False)["magnitude"].scores[1]
        got_seed = score(model, [make_metric("magnitude", p=p_ord, seed_compat=True)], None,
                         progress=False)["magnitude"].scores[1]
        assert got == pytest.approx(published, rel=1e-12)
        assert got_seed == pytest.approx(seed, rel=1e-12)
    # mean over outputs, max over matrices, without norms: max_k mean_o sum_in |w|  (p = 1)
    got = score(model, [Magnitude(p=1, weight_reduction="mean", block_reduction="max", include_norms=False)],
                None, progress=False)["magnitude"].scores[1]
    assert got == pytest.approx(max(m.shape[1] * 0.5 for m in mats), rel=1e-12)
    # prod is reported as a log: sum over matrices of log prod_o r_o (p = 1, no root)
    got = score(model, [Magnitude(p=1, weight_reduction="prod", include_norms=False)], None,
                progress=False)["magnitude"]
    want = math.log(sum(math.exp(m.shape[0] * math.log(m.shape[1] * 0.5)) for m in mats))
    assert got.extra["log_scale"] is True
    assert got.scores[1] == pytest.approx(want, rel=1e-9)


def test_magnitude_counts_conv1d_outputs_and_skips_biases():
    model = make_tiny("gpt2")
    layer = parts(model).layers[0]
    names = [n for n, _, _ in weight_rows(layer)]
    assert names == ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                     "mlp.c_proj.weight"]
    w = layer.mlp.c_fc.weight  # Conv1D: [in=32, out=128]
    with torch.no_grad():
        w.zero_()
        w[:, 5] = 1.0  # one OUTPUT with 32 unit weights
    rows = dict((n, r) for n, _, r in weight_rows(layer))["mlp.c_fc.weight"]
    assert rows.shape == (128, 32) and rows[5].sum() == 32 and rows.abs().sum() == 32


def test_scaled_up_layer_ranks_highest_for_magnitude():
    model = make_tiny("qwen2")
    with torch.no_grad():
        for p in parts(model).layers[4].parameters():
            p.mul_(3.0)
    for name in ("magnitude_l1", "magnitude_l2"):
        res = score(model, [name], None, progress=False)[name]
        assert res.removal_order()[-1] == 4 and res.params["p"] == int(name[-1])


def test_taylor_equals_direct_autograd():
    model = make_tiny("llama")
    cal = calib(n=5)
    res = score(model, ["taylor"], cal, batch_size=2, progress=False)["taylor"]  # 3 batches
    ids = cal.input_ids
    labels = ids.masked_fill(cal.attention_mask == 0, -100)
    model.zero_grad()
    model(input_ids=ids, attention_mask=cal.attention_mask, labels=labels).loss.backward()
    for i, layer in enumerate(parts(model).layers):
        want = 0.0
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                continue
            s = (p.detach() * p.grad).abs().double()
            want += s.sum().item()  # p = 1, sum over outputs and inputs, sum over matrices (+ norms)
        assert res.scores[i] == pytest.approx(want, rel=1e-4)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # the metric left no gradients behind


def test_taylor_restores_requires_grad_and_accumulates_bf16_in_fp32():
    model = make_tiny("llama").to(torch.bfloat16)
    model.lm_head.weight.requires_grad_(False)
    res = score(model, ["taylor"], calib(), batch_size=2, progress=False)["taylor"]
    assert all(math.isfinite(v) and v > 0 for v in res.scores)
    assert model.lm_head.weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "lm_head.weight")


def test_random_and_reverse():
    rnd = RandomOrder(seed=42)
    # The seed's random draw: seed 42 removes {5,6,10,11,15,22,25,26} of 32 and {6,9,12,16,19,25} of 26.
    from layerprune.metrics.base import ScoreContext
    from layerprune.select import select_layers

    for n, k, want in ((32, 8, [5, 6, 10, 11, 15, 22, 25, 26]), (26, 6, [6, 9, 12, 16, 19, 25])):
        res = RandomOrder.run([rnd], None, None, ScoreContext(n, list(range(n))))[0]
        assert select_layers(res, k, protect_first=3) == want  # protection does not apply to random
    a = RandomOrder.run([RandomOrder(seed=1)], None, None, ScoreContext(10, list(range(10))))[0]
    b = RandomOrder.run([RandomOrder(seed=1)], None, None, ScoreContext(10, list(range(10))))[0]
    c = RandomOrder.run([RandomOrder(seed=2)], None, None, ScoreContext(10, list(range(10))))[0]
    assert a.scores == b.scores and a.scores != c.scores
    rev = score(make_tiny("llama"), ["reverse"], None, progress=False)["reverse"]
    assert rev.removal_order() == [5, 4, 3, 2, 1, 0]


def test_scores_deterministic_for_fixed_seed(tmp_path):
    from layerprune.data.calibration import CalibSpec, build_calibration

    from conftest import tiny_tokenizer

    p = tmp_path / "c.txt"
    g = torch.Generator().manual_seed(0)
    p.write_text("\n".join(" ".join(f"w{int(t)}" for t in torch.randint(0, 100, (40,), generator=g))
                           for _ in range(12)))
    model = make_tiny("llama")
    runs = [score(model, ["bi", "angular", "ppl", "taylor"],
                  build_calibration(tiny_tokenizer(), CalibSpec(str(p), nsamples=4, seqlen=16, seed=5)),
                  progress=False) for _ in range(2)]
    for n in ("bi", "angular", "ppl", "taylor"):
        assert runs[0][n].scores == runs[1][n].scores


def test_registry_has_no_gaps_and_rejects_unknown():
    for name, (cls, _preset) in METRICS.items():
        m = make_metric(name)
        assert m.label == name and m.direction == HIGHER and cls.group
    with pytest.raises(LayerpruneError, match="unknown metric"):
        make_metric("nope")
    with pytest.raises(LayerpruneError, match="bad parameters"):
        make_metric("magnitude", p=3)
    assert make_metric("magnitude_l1", p=2).p == 1  # an alias's preset wins over a shared option
