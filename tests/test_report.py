"""Report, model card and exports from synthetic run manifests: content, embedded plots, optional sections."""

from __future__ import annotations

import base64
import json
import re

import pytest
import yaml

from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.report import (
    contiguous_runs,
    llama_cpp_prune_list,
    mergekit_yaml,
    model_card,
    write_exports,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
L = 12
REMOVED = [3, 7, 8, 11]
KEPT = [i for i in range(L) if i not in REMOVED]


def _stage(params, acc, ppl, card_seq=256):
    return {"params": params, "non_embedding_params": params - 1000, "macs": params * 64, "prefill_ms": 12.5,
            "decode_tok_s": 40.0, "avg_acc": acc,
            "ppl": {"wikitext2": {"ppl": ppl, "card": {"dataset": "wikitext2", "split": "test", "seq_len": card_seq,
                                                       "stride": card_seq, "tokens_scored": 4096,
                                                       "tokenizer": f"/runs/{params}"}}},
            "zero_shot": {"piqa": {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc + 0.01, "acc_norm_stderr": 0.01},
                          "arc_easy": {"acc": acc - 0.05, "acc_stderr": 0.02, "acc_norm": None,
                                       "acc_norm_stderr": None}}}


def full_manifest() -> dict:
    return {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "recipe": {"name": "best-practice", "prune": {"metric": "reverse", "ratio": 0.25},
                   "heal": {"method": "partial", "layers": "last3", "data": "alpaca", "epochs": 2}},
        "original_num_layers": L, "removed_layers": REMOVED, "kept_layers": KEPT,
        "scores": {"bi": {"scores": [float(i % 5) / 5 for i in range(L)], "direction": "higher_is_more_important",
                          "removal_order": REMOVED, "params": {"samples": 8}},
                   "taylor": {"scores": [None if i == 0 else i * 0.1 for i in range(L)],
                              "direction": "higher_is_more_important", "removal_order": [0, 1, 2, 3]}},
        "similarity": {"cka": [[1.0 if i == j else 0.5 for j in range(L)] for i in range(L)]},
        "heal": {"method": "partial", "trainable_params": 1_234_567, "steps": 40, "final_train_loss": 2.1,
                 "final_val_loss": 2.3, "tokens_per_s": 850.0, "wall_s": 321.0,
                 "log_history": [{"step": s, "loss": 3.0 - s / 40} for s in range(1, 41)]
                 + [{"step": s, "eval_loss": 3.1 - s / 40} for s in (10, 20, 30, 40)]},
        "results": {"dense": _stage(134_515_008, 0.62, 14.2), "pruned": _stage(106_000_000, 0.48, 40.1),
                    "healed": _stage(106_000_000, 0.55, 19.7)},
        "timings": {"score": 12.0, "prune": 1.5, "heal": 321.0, "evaluate": 3700.0},
        "library_versions": {"torch": "2.13.0", "transformers": "5.24.0"},
        "rounds": [{"round": 1, "removed_layers": [11], "val_loss": 2.5}, {"round": 2, "removed_layers": [8]}],
    }


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_full_report(tmp_path):
    m = full_manifest()
    written = write_report(tmp_path, m)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert written["report.md"] == tmp_path / "report.md" and written["report.html"] == tmp_path / "report.html"
    # removed/kept layers, the summary table with its three stages, ppl with protocol, zero-shot with stderr
    assert "[3, 7, 8, 11]" in md and "[0, 1, 2, 4, 5, 6, 9, 10]" in md
    assert "|  | dense | pruned | healed |" in md
    for text in ("Parameters", "134.52M", "MACs", "Prefill latency (ms)", "Decode (tokens/s)", "PPL wikitext2",
                 "Avg Acc", "seq_len=256", "0.6200 ± 0.0100", "acc_norm", "Healing", "Iterative rounds",
                 "Timings", "Environment", "Recipe", "best-practice", "1.23M"):
        assert text in md, text
    assert "(-21.2%)" in md  # params change against dense
    assert "WARNING" not in md  # checkpoint paths in the cards differ, the protocol does not
    # plots: files referenced in markdown, embedded (and only embedded) in the HTML
    pngs = ["plots/layer_scores.png", "plots/similarity_cka.png", "plots/accuracy.png", "plots/loss.png"]
    for rel in pngs:
        assert f"]({rel})" in md
        assert (tmp_path / rel).read_bytes().startswith(PNG_MAGIC)
        assert written[rel] == tmp_path / rel
    embedded = _embedded_pngs(html)
    assert len(embedded) == len(pngs) and all(b.startswith(PNG_MAGIC) for b in embedded)
    assert "plots/" not in html
    assert "<table>" in html and "[3, 7, 8, 11]" in html


def test_protocol_mismatch_is_flagged(tmp_path):
    m = full_manifest()
    m["results"]["healed"] = _stage(106_000_000, 0.55, 19.7, card_seq=2048)
    write_report(tmp_path, m)
    assert "WARNING: the protocol differs" in (tmp_path / "report.md").read_text()


OPTIONAL = ["recipe", "original_num_layers", "scores", "similarity", "heal", "results", "timings",
            "library_versions", "rounds"]


@pytest.mark.parametrize("drop", OPTIONAL)
def test_each_optional_section_missing(tmp_path, drop):
    m = full_manifest()
    del m[drop]
    write_report(tmp_path, m)
    md = (tmp_path / "report.md").read_text()
    assert "[3, 7, 8, 11]" in md and "skipped" not in md


def test_minimal_and_partial_manifests(tmp_path):
    minimal = {"model": "some/model", "removed_layers": [5], "kept_layers": [0, 1, 2, 3, 4]}
    written = write_report(tmp_path / "a", minimal)
    assert set(written) == {"report.md", "report.html"}
    assert "`[5]`" in (tmp_path / "a" / "report.md").read_text()
    assert "data:image/png" not in (tmp_path / "a" / "report.html").read_text()
    # half-filled stages, empty containers, NaN scores: sections shrink, never crash
    partial = dict(minimal, results={"pruned": {"params": 10, "ppl": {}, "zero_shot": {}}},
                   scores={"bi": {"scores": [float("nan")] * 6}}, similarity={"cka": [[1.0, 0.2]]},
                   heal={"log_history": []}, timings={"score": None}, rounds=[])
    write_report(tmp_path / "b", partial)
    md = (tmp_path / "b" / "report.md").read_text()
    assert "| Parameters | 10 |" in md and "skipped" not in md
    with pytest.raises(LayerpruneError, match="lacks"):
        write_report(tmp_path / "c", {"model": "x"})


def test_malformed_section_does_not_break_report(tmp_path):
    m = full_manifest()
    m["similarity"] = {"cka": [[1.0, "x"], [0.3, 1.0]]}  # strings become gaps, no crash
    m["scores"] = {"bi": {"scores": "not a list"}}  # ignored
    m["results"]["dense"]["zero_shot"] = {"piqa": "garbage"}
    write_report(tmp_path, m)
    assert "[3, 7, 8, 11]" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("kept", [[0, 1, 2, 4, 5, 6, 9, 10], [0], [5, 6, 7], list(range(30)), [0, 2, 4, 6]])
def test_mergekit_slices_reproduce_kept(kept):
    cfg = yaml.safe_load(mergekit_yaml("org/model", kept, "bf16"))
    assert cfg["merge_method"] == "passthrough" and cfg["dtype"] == "bfloat16"
    rebuilt = []
    for sl in cfg["slices"]:
        (src,) = sl["sources"]
        assert src["model"] == "org/model"
        start, end = src["layer_range"]
        assert end > start  # end-exclusive, never empty
        rebuilt += range(start, end)
    assert rebuilt == kept
    assert len(cfg["slices"]) == len(contiguous_runs(kept))


def test_mergekit_odd_paths_and_errors():
    path = 'C:\\models\\a "b": c #d'
    assert yaml.safe_load(mergekit_yaml(path, [0, 1]))["slices"][0]["sources"][0]["model"] == path
    assert "dtype" not in yaml.safe_load(mergekit_yaml("m", [0], None))
    for bad in ([], [1, 1], [-1], [0.5]):
        with pytest.raises(LayerpruneError):
            mergekit_yaml("m", bad)
    with pytest.raises(LayerpruneError, match="dtype"):
        mergekit_yaml("m", [0], "int8")


def test_llama_cpp_list():
    assert llama_cpp_prune_list(REMOVED) == "3,7,8,11"
    assert llama_cpp_prune_list([11, 3]) == "3,11"
    assert llama_cpp_prune_list([]) == ""


def test_model_card():
    card = model_card(full_manifest())
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "transformers"
    assert set(front["tags"]) >= {"layerprune", "pruned", "depth-pruning"}
    for text in ("[3, 7, 8, 11]", "[0, 1, 2, 4, 5, 6, 9, 10]", "AutoModelForCausalLM.from_pretrained", "2411.15558",
                 "Reassessing Layer Pruning", "| PPL wikitext2 |", "partial", "seq_len=256"):
        assert text in card, text
    # a local path is not a Hub id: no base_model then; "default" maps to the Hub repository it came from
    local = model_card({"model": "/tmp/some/folder", "removed_layers": [1], "kept_layers": [0, 2]})
    assert "base_model" not in yaml.safe_load(local.split("---\n")[1])
    assert "[1]" in local
    dflt = model_card({"model": "default", "removed_layers": [1], "kept_layers": [0, 2]})
    assert yaml.safe_load(dflt.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_exports(tmp_path):
    written = write_exports(tmp_path, full_manifest())
    ex = tmp_path / "exports"
    assert set(written) == {f"exports/{n}" for n in ("mergekit.yaml", "llama_cpp_prune_layers.txt", "model_card.md",
                                                      "README.md")}
    cfg = yaml.safe_load((ex / "mergekit.yaml").read_text())
    assert [i for s in cfg["slices"] for i in range(*s["sources"][0]["layer_range"])] == KEPT
    assert (ex / "llama_cpp_prune_layers.txt").read_text().strip() == "3,7,8,11"
    readme = (ex / "README.md").read_text()
    assert "llama-quantize --prune-layers 3,7,8,11 " in readme and "mergekit-yaml" in readme


def test_cli_report(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "layerprune.json").write_text(json.dumps(full_manifest()))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "mergekit.yaml" in out
    assert (run / "report.md").is_file() and (run / "exports" / "mergekit.yaml").is_file()
    assert "exports/mergekit.yaml" in (run / "report.md").read_text()
    # missing manifest: one line, exit 2
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerprune: error:") and "\n" not in err


def test_cli_report_on_prune_manifest(tmp_path, capsys):
    """`layerprune prune` writes source_model (not model) and its own scores shape: the report still works."""
    run = tmp_path / "ckpt"
    run.mkdir()
    (run / "layerprune.json").write_text(json.dumps({
        "source_model": "default", "original_num_layers": 6, "removed_layers": [4, 5], "kept_layers": [0, 1, 2, 3],
        "method": "reverse", "method_params": {"k": 2}, "scores": None, "params_before": 100, "params_after": 80}))
    assert main(["report", str(run)]) == 0
    assert "`[4, 5]`" in (run / "report.md").read_text()
