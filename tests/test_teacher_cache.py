"""The teacher cache: a hit reproduces the live teacher's losses (whole distribution) without loading the
teacher; top-K is the renormalised KL; keys follow the teacher's weights and the data; heal.json says what
happened; a killed build leaves nothing."""

from __future__ import annotations

import json

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.healing import heal
from layerprune.healing.distill import kd_loss_sum
from layerprune.healing.teacher_cache import (
    TeacherCache,
    loss_positions,
    weights_fingerprint,
)
from test_heal import Logs

from conftest import FAST, save_tiny

STEPS = dict(FAST, max_steps=4)


@pytest.fixture
def pruned(tmp_path):
    from layerprune.prune import prune_checkpoint

    src = save_tiny(tmp_path / "src", "llama")
    prune_checkpoint(str(src), tmp_path / "pruned", tail=2)
    return tmp_path / "pruned"


def _heal(pruned, out, data_file, **opts):
    logs = Logs()
    r = heal(pruned, out, callbacks=[logs], method="distill", distill_weight=0.7, data=str(data_file),
             **{**STEPS, **opts})
    return r, logs.losses


@pytest.mark.parametrize("packing", [True, False])
def test_hit_equals_live_teacher_and_never_loads_it(pruned, tmp_path, data_file, monkeypatch, packing):
    cache = tmp_path / "cache"
    live, l_live = _heal(pruned, tmp_path / "live", data_file, teacher_cache="off", packing=packing)
    miss, l_miss = _heal(pruned, tmp_path / "miss", data_file, teacher_cache=str(cache), packing=packing)
    import layerprune.healing.core as core

    def no_teacher(*a, **k):
        raise AssertionError("a cache hit must not load the teacher")

    monkeypatch.setattr(core, "load_teacher", no_teacher)
    hit, l_hit = _heal(pruned, tmp_path / "hit", data_file, teacher_cache=str(cache), packing=packing)
    assert live["teacher_cache"] == {"used": False, "why": "off (teacher_cache: off)"}
    assert miss["teacher_cache"]["hit"] is False and hit["teacher_cache"]["hit"] is True
    assert hit["teacher_cache"]["kept"] == "full" and hit["teacher_cache"]["bytes"] > 0
    assert miss["teacher_cache"]["rows_computed"] > 0 and hit["teacher_cache"]["rows_computed"] == 0
    assert l_live[0] > 1e-3  # a pruned student: the KL term is not zero
    assert l_miss == pytest.approx(l_live, rel=1e-5, abs=1e-6)
    assert l_hit == pytest.approx(l_live, rel=1e-5, abs=1e-6)
    assert hit["final_val_loss"] == pytest.approx(live["final_val_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "hit" / "heal.json").read_text())
    assert saved["teacher_cache"]["hit"] is True


def test_top_k_cache(pruned, tmp_path, data_file):
    r, losses = _heal(pruned, tmp_path / "k", data_file, teacher_cache=str(tmp_path / "c"), teacher_full_max=0,
                      teacher_top_k=8)
    assert r["teacher_cache"]["kept"] == "top-8" and r["teacher_cache"]["k"] == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    meta = json.loads((next((tmp_path / "c").glob("*/meta.json"))).read_text())
    assert meta["vocab"] == 128 and meta["k"] == 8


def test_cached_top_k_loss_is_the_renormalised_kl():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    temp = 2.0
    t_logp = torch.log_softmax(t, -1)
    # Whole distribution: the live definition.
    live = torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1),
                                      log_target=True, reduction="sum") * temp * temp
    assert torch.allclose(kd_loss_sum(s, t_logp, temp), live, atol=1e-5)
    # Top-3: the teacher renormalised over its kept tokens, the student's full log-probs gathered there.
    v, ix = t_logp.topk(3, -1)
    pt = torch.softmax(v / temp, -1)
    ls = torch.log_softmax(s / temp, -1).gather(-1, ix)
    manual = (pt * (pt.log() - ls)).sum() * temp * temp
    assert torch.allclose(kd_loss_sum(s, v, temp, ix), manual, atol=1e-5)


def test_kd_gradient_is_the_kl_divs():
    """kd_loss_sum splits the KL into the teacher's constant part and a cross term: same gradient as kl_div."""
    torch.manual_seed(0)
    t = torch.randn(6, 50)
    for temp in (1.0, 2.0):
        a = torch.randn(6, 50, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        kd_loss_sum(a, torch.log_softmax(t, -1), temp).backward()
        ref = torch.nn.functional.kl_div(torch.log_softmax(b / temp, -1), torch.log_softmax(t / temp, -1),
                                         log_target=True, reduction="sum") * temp * temp
        ref.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_keys_follow_weights_and_data(tmp_path):
    a = save_tiny(tmp_path / "a", "llama")
    b = save_tiny(tmp_path / "b", "llama", seed=1)
    c = save_tiny(tmp_path / "c", "llama")
    root = tmp_path / "root"
    fa, fb, fc = (weights_fingerprint(p, root) for p in (a, b, c))
    assert fa == fc != fb  # content, not the folder's name
    assert (root / "hashes.json").is_file()
    k1 = TeacherCache.make_key(fa, "data1", 128, 64, 4096, "float32")
    assert TeacherCache.folder_for(k1, root) != TeacherCache.folder_for({**k1, "data": "data2"}, root)
    assert TeacherCache.make_key(fa, "d", 50000, 64, 4096, "float32")["kept"] == "top-64"


def test_loss_positions():
    assert loss_positions([-100, -100, 5, 6, -100]) == [1, 2]
    assert loss_positions([1, 2, 3]) == [0, 1]


def test_a_failed_write_leaves_only_whole_shards(pruned, tmp_path, data_file, monkeypatch):
    """A write killed mid-way leaves no shard and no temporary file; the next run computes those rows again."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def boom(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        _heal(pruned, tmp_path / "o", data_file, teacher_cache=str(tmp_path / "c"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    leftovers = [p.name for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name not in ("meta.json", "hashes.json")]
    assert leftovers == []
    r, _ = _heal(pruned, tmp_path / "o2", data_file, teacher_cache=str(tmp_path / "c"))
    assert r["teacher_cache"]["hit"] is False and r["teacher_cache"]["rows_computed"] > 0


def test_bad_settings_refused():
    from layerprune.healing import HealConfig

    for bad in ({"teacher_top_k": 0}, {"teacher_full_max": -1}, {"teacher_cache": ""}):
        with pytest.raises(LayerpruneError):
            HealConfig(**bad).validate()
