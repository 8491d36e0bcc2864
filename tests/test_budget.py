"""Budget targets: the chosen removal is the smallest that meets the bound (checked by brute force), unmeetable
targets are one line before any scoring, parsing is strict."""

from __future__ import annotations

import itertools
import json

import pytest

from layerprune.budget import Sizes, Target, choose
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.measurement import analytic_macs, param_counts
from layerprune.prune import prune_layers

from conftest import make_tiny, save_tiny


@pytest.mark.parametrize("text,kind,value,relative", [
    ("params=100M", "params", 1e8, False), ("params=0.8", "params", 0.8, True),
    ("macs=1.5G", "macs", 1.5e9, False), ("kv_cache=18KB", "kv_cache", 18e3, False),
    ("non-embedding-params=0.5", "non_embedding_params", 0.5, True), ("decode_speedup=1.25", "decode_speedup", 1.25, False),
])
def test_parse(text, kind, value, relative):
    t = Target.parse(text)
    assert (t.kind, t.relative) == (kind, relative) and t.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["params", "nosuch=1", "params=abc", "params=-1", "params=1Q", "decode_speedup=0.9"])
def test_parse_errors(text):
    with pytest.raises(LayerpruneError):
        Target.parse(text)


def test_sizes_match_the_pruned_model(tiny):
    """The analytic accounting equals measuring the actually pruned model (every architecture)."""
    sz = Sizes.of(tiny)
    pruned = make_tiny(tiny.config.model_type)
    prune_layers(pruned, [1, 4])
    got = sz.after([1, 4])
    pc = param_counts(pruned)
    assert got["params"] == pc["total"] and got["non_embedding_params"] == pc["non_embedding"]
    assert got["macs"] == pytest.approx(analytic_macs(pruned.config, 128)["total"] / 128)
    assert got["kv_cache"] == sz.kv_per_layer * 4


@pytest.mark.parametrize("kind", ["params", "macs", "non_embedding_params", "kv_cache"])
@pytest.mark.parametrize("frac", [0.95, 0.8, 0.6, 0.4])
def test_chosen_removal_is_the_smallest_meeting_the_bound(kind, frac):
    model = make_tiny("llama")
    sz = Sizes.of(model)
    order = [3, 1, 4, 0, 2, 5]  # a metric's removal order
    cands = lambda k: sorted(order[:k])  # noqa: E731
    ch = choose(Target(kind, frac, True), cands, 5, sizes=sz)
    dense = sz.after([])[kind]
    # Brute force over every k in the metric's order: the first that meets the bound.
    want = next(k for k in range(1, 6) if sz.after(cands(k))[kind] <= frac * dense)
    assert len(ch.removed) == want and ch.value <= frac * dense
    # ... and no removal of fewer layers at all (any subset) meets it, since layers are equal in size here.
    if want > 1:
        assert all(sz.after(list(c))[kind] > frac * dense for c in itertools.combinations(range(6), want - 1))


def test_unmeetable_target_is_one_line_before_scoring(tmp_path, capsys):
    src = save_tiny(tmp_path / "m")
    capsys.readouterr()
    rc = main(["prune", str(src), "--metric", "ppl", "--target", "params=10", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be met" in err and "params" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_target_records_the_choice(tmp_path, capsys):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "o"
    assert main(["prune", str(src), "--metric", "magnitude", "--target", "params=0.8", "--out", str(out)]) == 0
    man = json.loads((out / "layerprune.json").read_text())
    t = man["method_params"]["target"]
    assert t["target"]["kind"] == "params" and t["value"] <= 0.8 * t["dense_value"]
    assert len(man["removed_layers"]) == t["k"] == 2
    assert t["tried"][0]["value"] > 0.8 * t["dense_value"]  # k = 1 did not meet it


def test_iterative_target(tmp_path):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "o"
    assert main(["prune", str(src), "--metric", "magnitude", "--iterative", "--target", "params=0.8",
                 "--out", str(out)]) == 0
    man = json.loads((out / "layerprune.json").read_text())
    assert len(man["removed_layers"]) == 2 and man["method_params"]["target"]["value"] <= 0.8 * \
        man["method_params"]["target"]["dense_value"]


def test_measured_target_on_the_loaded_model(tmp_path):
    src = save_tiny(tmp_path / "m")
    out = tmp_path / "o"
    assert main(["prune", str(src), "--metric", "magnitude", "--target", "prefill_speedup=1.05",
                 "--out", str(out)]) == 0
    t = json.loads((out / "layerprune.json").read_text())["method_params"]["target"]
    assert t["value"] >= 1.05 and t["measurement"]["dense"]["prefill_seconds"]["median"] > 0


def test_target_met_by_dense_is_refused_before_scoring(tmp_path, capsys):
    """params=1.0 is met by removing nothing: refused in one line, never a silent removal of one layer."""
    from layerprune.cli import main

    from conftest import save_tiny

    m = save_tiny(tmp_path / "m")
    capsys.readouterr()
    assert main(["prune", str(m), "--metric", "magnitude", "--target", "params=1.0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already met by the dense model" in err
    assert not (tmp_path / "o").exists()
