"""The score stage: layer-by-layer and dispatched modes equal in-memory scores, cache, outputs, CLI."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from layerprune.arch import parts
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.models import load_model
from layerprune.scoring import ScoreCache, model_fingerprint, score
from test_metrics import calib, zero_residual

from conftest import make_tiny, tiny_tokenizer

CALIB_METRICS = ["bi", "angular", "cka", "ppl"]
ALL = CALIB_METRICS + ["magnitude", "magnitude_l1", "random", "reverse"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))


def _save(tmp_path, arch: str, **kw) -> str:
    path = tmp_path / arch
    model = make_tiny(arch)
    model.save_pretrained(path, **kw)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _close(xs, ys, rel):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=rel, abs=1e-7)), (xs, ys)


def _assert_same(a, b, names, rel=1e-5):
    for n in names:
        _close(a[n].scores, b[n].scores, rel)
        if a[n].block_scores is not None:
            for size, vals in a[n].block_scores.items():
                _close(vals, b[n].block_scores[size], rel)
        if "matrix" in a[n].extra:
            for ra, rb in zip(a[n].extra["matrix"], b[n].extra["matrix"]):
                _close(ra, rb, rel)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_layerwise_equals_in_memory(tmp_path, arch):
    # Small shards so the layer reader follows the index across files.
    path = _save(tmp_path, arch, max_shard_size="20KB")
    assert (tmp_path / arch / "model.safetensors.index.json").is_file()
    cal = calib()
    mem = score(load_model(path, dtype="float32"), ALL, cal, batch_size=3, progress=False)
    lw = score(path, ALL, cal, mode="layerwise", batch_size=3, dtype="float32", cache=False, progress=False)
    _assert_same(mem, lw, ALL)
    assert lw.mode == "layerwise" and lw["ppl"].extra["method"] == "layerwise-prefix-reuse"
    assert lw["ppl"].extra["baseline_ppl"] == pytest.approx(mem["ppl"].extra["baseline_ppl"], rel=1e-6)


def test_layerwise_holds_one_layer_at_a_time(tmp_path):
    from layerprune.metrics.layerwise import LayerwiseModel

    lw = LayerwiseModel(_save(tmp_path, "llama"), dtype="float32", device="cpu")
    assert all(p.device.type == "meta" for p in lw.layers.parameters())
    seen = []

    class Probe:
        needs_forward = False
        needs_layers = True

        def on_layer(self, pos, layer, xs_in, xs_out, prep):
            seen.append(sum(p.device.type != "meta" for lay in lw.layers for p in lay.parameters()))

        def on_end(self, *a):
            pass

    lw.sweep([Probe()], progress=False)
    per_layer = sum(1 for _ in lw.layers[0].parameters())
    assert seen == [per_layer] * 6  # exactly one layer materialised at each step
    assert all(p.device.type == "meta" for p in lw.layers.parameters())


def test_layerwise_refuses_taylor(tmp_path):
    with pytest.raises(LayerpruneError, match="no layer-by-layer mode"):
        score(_save(tmp_path, "llama"), ["taylor"], calib(), mode="layerwise", progress=False)


def test_dispatched_with_disk_offload_equals_in_memory(tmp_path):
    path = _save(tmp_path, "llama")
    cal = calib()
    names = ["bi", "angular", "ppl", "magnitude"]
    mem = score(load_model(path, dtype="float32"), names, cal, progress=False)
    off = score(path, names, cal, mode="dispatch", dtype="float32", offload_folder=str(tmp_path / "off"),
                max_memory={"cpu": 60_000}, cache=False, progress=False)
    _assert_same(mem, off, names)
    dispatched = load_model(path, dtype="float32", device_map="auto", offload_folder=str(tmp_path / "off2"),
                            max_memory={"cpu": 60_000})
    assert any(p.device.type == "meta" for p in parts(dispatched).layers.parameters())  # really offloaded
    with pytest.raises(LayerpruneError, match="taylor needs the decoder-layer weights resident"):
        score(dispatched, ["taylor"], cal, progress=False)


def test_cache_hit_miss_and_invalidation(tmp_path):
    path = _save(tmp_path, "llama")
    cal = calib()
    first = score(path, ["bi", "magnitude"], cal, progress=False)
    assert not first["bi"].cached
    again = score(path, ["bi", "magnitude"], cal, progress=False)
    assert again["bi"].cached and again["magnitude"].cached
    assert again["bi"].scores == first["bi"].scores and again["bi"].removal_order() == first["bi"].removal_order()
    assert len(list(ScoreCache().root.glob("*.json"))) == 2
    # Other parameters or other calibration data: recomputed.
    assert not score(path, [("bi", {"seed_compat": True})], cal, progress=False)["bi"].cached
    assert not score(path, ["bi"], calib(seed=1), progress=False)["bi"].cached
    # Calibration does not enter the key of a data-free metric.
    assert score(path, ["magnitude"], calib(seed=1), progress=False)["magnitude"].cached
    # Prefix reuse on/off gives equal scores, so it shares the entry.
    assert score(path, [("ppl", {"reuse_prefix": True})], cal, progress=False)["ppl"].cached is False
    assert score(path, [("ppl", {"reuse_prefix": False})], cal, progress=False)["ppl"].cached is True
    # Rewritten weights (new mtime) change the fingerprint.
    fp = model_fingerprint(path)
    w = tmp_path / "llama" / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_fingerprint(path) != fp
    assert not score(path, ["bi"], cal, progress=False)["bi"].cached


def test_write_outputs(tmp_path):
    path = _save(tmp_path, "llama")
    res = score(path, ["bi", "angular", "cka", "magnitude"], calib(), progress=False)
    out = res.write(tmp_path / "out", k=2, protect_first=1)
    data = json.loads((out / "scores.json").read_text())
    assert data["num_layers"] == 6 and data["selection"] == {"k": 2, "protect_first": 1, "protect_last": 0}
    bi = data["metrics"]["bi"]
    assert bi["direction"] == "higher_is_more_important" and len(bi["scores"]) == 6
    assert bi["calibration"] == data["calibration"]["fingerprint"] and bi["params"] == {"seed_compat": False}
    assert sorted(bi["removal_order"]) == list(range(6)) and 0 not in bi["selected"] and len(bi["selected"]) == 2
    assert data["metrics"]["magnitude"]["calibration"] is None
    ang = data["metrics"]["angular"]
    assert set(ang["block_scores"]) == {str(n) for n in range(7)}
    assert len(data["metrics"]["cka"]["extra"]["matrix"]) == 6
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 6 and float(rows[3]["bi"]) == pytest.approx(bi["scores"][3])
    assert rows[bi["removal_order"][0]]["bi_rank"] == "1"
    for f in ("scores.png", "similarity.png"):
        assert (out / f).stat().st_size > 1000
    only = score(path, ["magnitude"], None, progress=False).write(tmp_path / "out2")
    assert not (only / "similarity.png").exists()


def _calib_file(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "calib.txt"
    p.write_text("\n".join(" ".join(f"w{int(t)}" for t in torch.randint(0, 100, (40,), generator=g))
                           for _ in range(20)))
    return str(p)


def test_cli_score_and_prune_by_metric(tmp_path, capsys):
    path = _save(tmp_path, "llama")
    cf = _calib_file(tmp_path)
    common = ["--calib", cf, "--nsamples", "4", "--seqlen", "16"]
    assert main(["score", path, "--metric", "bi,angular", "--metric", "cka", "--out", str(tmp_path / "s"),
                 "--remove", "2", *common]) == 0
    data = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert list(data["metrics"]) == ["bi", "angular", "cka"] and data["selection"]["k"] == 2
    assert data["calibration"]["nsamples"] == 4 and data["calibration"]["source"] == cf
    assert (tmp_path / "s" / "similarity.png").is_file()

    assert main(["prune", path, "--metric", "taylor", "--remove", "2", "--protect-last", "1",
                 "--out", str(tmp_path / "p"), *common]) == 0
    man = json.loads((tmp_path / "p" / "layerprune.json").read_text())
    assert man["method"] == "taylor" and len(man["removed_layers"]) == 2 and 5 not in man["removed_layers"]
    assert man["method_params"]["k"] == 2 and man["method_params"]["metric_params"]["p"] == 1
    assert man["scores"]["removed"] == man["removed_layers"] and len(man["scores"]["metric_scores"]["scores"]) == 6
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_hidden_layers"] == 4
    assert (tmp_path / "p" / "tokenizer.json").is_file()

    assert main(["prune", path, "--metric", "bi", "--ratio", "0.5", "--iterative", "--step", "2",
                 "--out", str(tmp_path / "it"), *common]) == 0
    man = json.loads((tmp_path / "it" / "layerprune.json").read_text())
    assert man["method_params"]["iterative"] and [len(s["removed"]) for s in man["scores"]["steps"]] == [2, 1]

    assert main(["prune", path, "--metric", "angular", "--num", "2", "--score-mode", "layerwise", "--streaming",
                 "--out", str(tmp_path / "st"), *common]) == 0
    man = json.loads((tmp_path / "st" / "layerprune.json").read_text())
    a, b = man["removed_layers"]
    assert b == a + 1 and man["method_params"]["score_mode"] == "layerwise"

    capsys.readouterr()
    assert main(["prune", path, "--metric", "taylor", "--remove", "2,3", "--out", str(tmp_path / "x")]) == 2
    assert "NUMBER of layers" in capsys.readouterr().err
    assert main(["prune", path, "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["prune", path, "--metric", "bi", "--num", "2", "--iterative", "--streaming",
                 "--out", str(tmp_path / "x"), *common]) == 2
    # Dispatch with disk offload from the command line gives the in-memory ranking.
    assert main(["score", path, "--metric", "bi", "--mode", "dispatch", "--max-memory", "cpu=60000",
                 "--offload-folder", str(tmp_path / "off"), "--out", str(tmp_path / "d"), "--no-cache",
                 *common]) == 0
    d_scores = json.loads((tmp_path / "d" / "scores.json").read_text())["metrics"]["bi"]["scores"]
    assert d_scores == pytest.approx(data["metrics"]["bi"]["scores"], rel=1e-6)
    assert main(["score", path, "--metric", "bi", "--max-memory", "cpu", "--out", str(tmp_path / "e")]) == 2
    # Without --metric, --remove is still an index list.
    assert main(["prune", path, "--remove", "1,2", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "layerprune.json").read_text())["removed_layers"] == [1, 2]


def test_smollm2_zeroed_layer_least_important(smollm2_path, data_dir):
    """The real model: a layer with zeroed output projections is ranked last by bi, angular and cka."""
    from layerprune.data.calibration import CalibSpec, build_calibration
    from layerprune.models import load

    model, tok = load(smollm2_path, dtype="float32")
    zero_residual(parts(model).layers[12])
    cal = build_calibration(tok, CalibSpec("c4", nsamples=4, seqlen=64, data_dir=str(data_dir)))
    res = score(model, ["bi", "angular", "cka"], cal, progress=False)
    for n in ("bi", "angular", "cka"):
        assert res[n].removal_order()[0] == 12, (n, res[n].scores)
        assert len(res[n].scores) == 30
    # BI is high at the first layer on a trained model (ShortGPT's shape).
    assert res["bi"].scores[0] == max(res["bi"].scores)


@pytest.mark.slow
def test_smollm2_ppl_zeroed_layer_and_layerwise(smollm2_path, data_dir, tmp_path):
    import shutil

    from layerprune.data.calibration import CalibSpec, build_calibration
    from layerprune.models import load

    model, tok = load(smollm2_path, dtype="float32")
    zero_residual(parts(model).layers[12])
    cal = build_calibration(tok, CalibSpec("c4", nsamples=4, seqlen=64, data_dir=str(data_dir)))
    mem = score(model, ["ppl", "bi", "angular"], cal, progress=False)
    assert mem["ppl"].removal_order()[0] == 12
    # The same checkpoint on disk, scored layer by layer.
    path = tmp_path / "z"
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_path / f).is_file():
            shutil.copy(smollm2_path / f, path / f)
    lw = score(str(path), ["ppl", "bi", "angular"], cal, mode="layerwise", dtype="float32", cache=False,
               progress=False)
    _assert_same(mem, lw, ["ppl", "bi", "angular"], rel=1e-4)
