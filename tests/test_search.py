"""``layerprune search``: the proxy equals the pruned model it stands for, a planted redundant block wins on
every architecture, the probe and final heal produce a vanilla checkpoint with the record, bad input is one
line before any work."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from layerprune.arch import parts
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.prune import prune_layers
from layerprune.search import SearchConfig, search, search_cut
from layerprune.search.core import split_windows
from layerprune.search.proxy import FitCapture, Proxy, fit_maps

from conftest import ARCHS, FAST, ROWS, make_tiny, save_tiny, tiny_tokenizer

SMALL = dict(nsamples=2, heldout=4, fit_nsamples=6, seqlen=16, fit_seqlen=24, batch_size=2, probe_prompts=2,
             probe_new_tokens=3)
PLANT = (2, 3)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(" ".join(f"w{(i * 7 + j * 3) % 100}" for j in range(40)) for i in range(80)))
    return p


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def planted(arch: str, **kw):
    """A tiny model whose layers PLANT are exactly the identity (every parameter zero: each branch adds 0)."""
    m = make_tiny(arch, **kw)
    with torch.no_grad():
        for i in PLANT:
            for p in parts(m).layers[i].parameters():
                p.zero_()
    return m


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt"])
def test_proxy_equals_the_pruned_model(arch, text_file):
    """A cut evaluated from the cached dense states (and with compensation hooks) equals the pruned model's
    own forward — with the compensation folded into its weights."""
    from layerprune.compensation.core import fold_in_memory
    from layerprune.compensation.methods import make_method

    model, tok = make_tiny(arch), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SearchConfig(calib=str(text_file), **SMALL)
    _, held, fit = split_windows(tok, cfg, None)
    proxy = Proxy(model, held, 2)
    assert proxy.dense["kl"] == pytest.approx(0.0, abs=1e-6)
    for removed in ([4, 5], [1, 3]):
        pruned = copy.deepcopy(model)
        prune_layers(pruned, removed)
        a, b = proxy.cut(removed), proxy.other(pruned)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-6) and a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)
        maps, fits = fit_maps(model, removed, fit, make_method("lstsq", ridge=1e-3), 2)
        if maps is None:
            continue
        folded = copy.deepcopy(model)
        fold_in_memory(folded, fits, removed)
        prune_layers(folded, removed)
        c, d = proxy.cut(removed, maps), proxy.other(folded)
        assert c["kl"] == pytest.approx(d["kl"], rel=1e-3, abs=1e-5)
        # The first block fitted from the shared recording of the fitting windows: the same maps.
        shared_maps, _ = fit_maps(model, removed, fit, make_method("lstsq", ridge=1e-3), 2, FitCapture(model, fit, 2))
        assert shared_maps is not None
        for (_, _, t), (_, _, u) in zip(maps, shared_maps):
            assert torch.allclose(t, u, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_redundant_block_wins(arch, text_file, tmp_path):
    """On every tested architecture the proxy finds the two identity layers (KL 0), whatever the metrics say."""
    model, tok = planted(arch), tiny_tokenizer()
    cfg = SearchConfig(calib=str(text_file), **SMALL)
    rec = search_cut(model, tok, "tiny", "params=0.8", cfg, tmp_path / "w", progress=False)
    assert rec["k"] == 2 and rec["winner"]["removed"] == list(PLANT)
    best = rec["candidates"][0]
    assert best["proxy_rank"] == 1 and best["best"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert any("block 2-3" == s for s in best["sources"])
    assert rec["reverse"] is not None and rec["reverse"]["plain"]["tokens"] == best["plain"]["tokens"]
    keys = [tuple(c["removed"]) for c in rec["candidates"]]
    assert len(keys) == len(set(keys))  # deduplicated


def test_search_end_to_end_heals_the_winner(tmp_path, text_file, data_file):
    """Probe and final heal: a vanilla checkpoint with the record, the planted block chosen, the work folder
    gone; a tied model's layer-0 candidates stay, uncompensated, and say why."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "m"
    model = planted("llama", tie_word_embeddings=True)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    heal = {**{k: v for k, v in FAST.items() if k != "progress"}, "data": str(data_file)}
    cfg = SearchConfig(calib=str(text_file), compensate_top=30, probe_top=2, probe_steps=2, **SMALL)
    out = tmp_path / "best"
    rec = search(str(src), out, "params=0.8", config=cfg, heal=heal, progress=False)
    assert rec["winner"]["removed"] == list(PLANT)
    assert len(rec["probes"]) == 2 and sorted(p["probe_rank"] for p in rec["probes"]) == [1, 2]
    assert all(p["agreement"] is not None for p in rec["probes"])
    refused = [c for c in rec["candidates"] if 0 in c["removed"]]
    assert refused and all("layer 0" in c["compensation_refused"] for c in refused)
    man = json.loads((out / "layerprune.json").read_text())
    assert man["removed_layers"] == list(PLANT) and man["search"]["winner"]["why"]
    assert (out / "search.md").is_file() and (out / "search.png").is_file() and (out / "heal.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    assert not (tmp_path / "best.search").exists()


def test_cli_search_and_refusals(tmp_path, text_file, capsys):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "o"
    common = ["--calib", str(text_file), "--nsamples", "2", "--heldout", "4", "--fit-nsamples", "6", "--seqlen", "16",
              "--fit-seqlen", "24", "--batch-size", "2"]
    assert main(["search", str(src), "--target", "params=0.8", "--out", str(out), "--no-heal", *common]) == 0
    assert "Winner" in capsys.readouterr().out and (out / "config.json").is_file()
    for bad, msg in ((["--target", "params=0.8", "--metrics", "nope"], "unknown metric"),
                     (["--target", "size=3"], "unknown target kind"),
                     (["--target", "params=1.0"], "already met by the dense model"),
                     (["--target", "params=0.8", "--iterative", "taylor", "--metrics", "bi"], "not among"),
                     (["--target", "params=0.8", "--heal-lr-scheduler", "nope"], "unknown lr_scheduler")):
        capsys.readouterr()
        assert main(["search", str(src), "--out", str(tmp_path / "x"), *common, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
        assert not (tmp_path / "x").exists()
    assert main(["search", str(src), "--target", "params=0.8", "--out", str(src / "inside"), *common]) == 2
    assert "is the input" in capsys.readouterr().err


def test_recipe_search_section_is_checked():
    from layerprune.recipe.schema import validate

    ok = validate({"prune": {"metric": "search", "target": "params=0.8"}, "search": {"probe_top": 2}})
    assert ok["search"]["probe_top"] == 2 and ok["search"]["compensation"] == "lstsq"
    for data, msg in (({"prune": {"metric": "search"}}, "needs prune.target"),
                      ({"prune": {"metric": "search", "target": "params=0.8"}, "search": {"probe_top": -1}},
                       "probe_top must be >= 0"),
                      ({"prune": {"metric": "search", "target": "params=0.8"}, "search": {"bogus": 1}},
                       "unknown key 'search.bogus'"),
                      ({"prune": {"metric": "search", "target": "params=0.8"}, "compensate": {"method": "lstsq"}},
                       "search.compensation")):
        with pytest.raises(LayerpruneError, match=msg):
            validate(data)


@pytest.mark.parametrize("extra", [{"final": "continue"}, {"budget_minutes": 0.5}])
def test_final_heal_continue_and_time_budget(tmp_path, text_file, data_file, extra):
    """``final: continue`` heals on from the probe for the steps the final budget has left; a time budget turns
    the time left after the search into steps at the probe's measured seconds per step."""
    src = save_tiny(tmp_path / "m")
    heal = {**{k: v for k, v in FAST.items() if k != "progress"}, "data": str(data_file), "max_steps": 6}
    cfg = SearchConfig(calib=str(text_file), probe_top=1, probe_steps=2, **{**SMALL, "probe_prompts": 1}, **extra)
    rec = search(str(src), tmp_path / "o", "params=0.8", config=cfg, heal=heal, progress=False)
    healed = json.loads((tmp_path / "o" / "heal.json").read_text())
    if "final" in extra:
        assert rec["final"]["mode"] == "continue" and rec["final"]["steps"] == 4 and healed["steps"] == 4
        assert rec["final"]["from"].endswith(rec["probes"][0]["healed"].rsplit("/", 1)[-1])
    else:
        b = rec["budget"]
        assert b["final_steps"] >= 1 and healed["steps"] == b["final_steps"] == rec["final"]["steps"]
        assert b["final_steps"] == max(1, int((30 - rec["seconds"]["total"]) / b["seconds_per_step"]))


def test_proxy_reference_stays_dense_without_the_log_prob_cache(text_file, monkeypatch):
    """With the dense log-probs recomputed (large vocabularies), a probed model's own final norm must never be
    applied to the dense reference: the KL equals the cached path's."""
    import layerprune.search.proxy as px

    model, tok = make_tiny("llama"), tiny_tokenizer()
    other = copy.deepcopy(model)
    with torch.no_grad():
        parts(other).norm.weight.mul_(1.5)
    _, held, _ = split_windows(tok, SearchConfig(calib=str(text_file), **SMALL), None)
    cached = Proxy(model, held, 2).other(other)
    monkeypatch.setattr(px, "DENSE_CACHE_BYTES", 0)
    recomputed = Proxy(model, held, 2).other(other)
    assert cached["kl"] > 1e-4
    assert recomputed["kl"] == pytest.approx(cached["kl"], rel=1e-5)
