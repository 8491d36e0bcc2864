"""Reliability: every user mistake is one line and exit 2 before any work, with nothing written; no silent
damage to a model; every kill recoverable (see README, "Guarantees")."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerprune.cli import main

from conftest import REPO, save_tiny, save_tiny_smol


class _Evil:
    """A pickle that would run code when loaded (torch's weights_only loader must refuse it)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def w(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Models and files with one defect each."""
    root = tmp_path_factory.mktemp("world")
    ok = save_tiny(root / "ok")
    out: dict[str, Path] = {"ok": ok, "root": root, "tied": save_tiny(root / "tied", tie_word_embeddings=True)}

    def variant(name: str) -> Path:
        shutil.copytree(ok, root / name)
        out[name] = root / name
        return root / name

    sd = load_file(ok / "model.safetensors")
    miss = {k: v for k, v in sd.items() if k != "model.layers.2.mlp.down_proj.weight"}
    save_file(miss, variant("miss") / "model.safetensors", metadata={"format": "pt"})
    save_file({**sd, "model.layers.9.extra.weight": torch.zeros(2)}, variant("extra") / "model.safetensors",
              metadata={"format": "pt"})
    cfg = json.loads((ok / "config.json").read_text())
    (variant("nolayers") / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                                  if k != "num_hidden_layers"}))
    (variant("badjson") / "config.json").write_text("{not json")
    (variant("listjson") / "config.json").write_text("[1, 2]")
    p = variant("pickled")
    (p / "model.safetensors").unlink()
    with open(p / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, f)
    (root / "notamodel").mkdir()
    (root / "afile.txt").write_text("x")
    (root / "empty.yaml").write_text("")
    (root / "badyaml.yaml").write_text("prune: [unclosed\n")
    (root / "badtask.yaml").write_text(f"model: {ok}\nevaluate:\n  tasks: [nosuch_task]\n")
    (root / "badmetric.yaml").write_text(f"model: {ok}\nprune:\n  metric: nosuch\n")
    (root / "badmethod.yaml").write_text(f"model: {ok}\nheal:\n  method: nosuch\n")
    (root / "badkey.yaml").write_text(f"model: {ok}\nprune:\n  metrik: bi\n")
    (root / "badppl.yaml").write_text(f"model: {ok}\nevaluate:\n  ppl: [nosuch_corpus]\n  tasks: []\n")
    (root / "calib_fields.jsonl").write_text('{"id": "a1", "content": "some words here"}\n' * 5)
    (root / "calib_badline.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    (root / "ppl_bad.jsonl").write_text('{"text": "fine"}\n\n{oops\n')
    (root / "notrun").mkdir()
    (root / "notrun" / "layerprune.json").write_text(json.dumps({"removed_layers": [1]}))
    (root / "notrun" / "config.json").write_text((ok / "config.json").read_text())
    out.update({k: root / f for k, f in [("empty", "empty.yaml"), ("badyaml", "badyaml.yaml"),
                                          ("badtask", "badtask.yaml"), ("badmetric", "badmetric.yaml"),
                                          ("badmethod", "badmethod.yaml"), ("badkey", "badkey.yaml"),
                                          ("badppl", "badppl.yaml"), ("calib_fields", "calib_fields.jsonl"),
                                          ("calib_badline", "calib_badline.jsonl"), ("ppl_bad", "ppl_bad.jsonl"),
                                          ("notamodel", "notamodel"), ("afile", "afile.txt"),
                                          ("notrun", "notrun")]})
    (root / "good.yaml").write_text(f"model: {ok}\nevaluate:\n  tasks: []\n  ppl: []\n")
    (root / "empty.json").write_text("[]")
    (root / "empty.jsonl").write_text("")
    out.update({"good": root / "good.yaml", "emptyjson": root / "empty.json", "emptyjsonl": root / "empty.jsonl"})
    (root / "existing").mkdir()
    for name in ("eval", "ppl", "compare", "bench"):
        (root / "existing" / f"{name}.json").write_text("{}")
    (root / "full").mkdir()
    (root / "full" / "x").write_text("x")
    out["existing"], out["full"] = root / "existing", root / "full"
    out["data"] = data_dir
    return out


MODEL_DEFECTS = ["miss", "extra", "nolayers", "badjson", "listjson", "notamodel", "afile", "pickled", "nosuch"]
# Every sub-command that takes a model, as the argv after the model path ({o}: the output under the case folder).
MODEL_COMMANDS = {
    "info": ["info", "{m}"],
    "score": ["score", "{m}", "--metric", "magnitude", "--out", "{o}"],
    "prune": ["prune", "{m}", "--remove", "1", "--out", "{o}"],
    "prune-streaming": ["prune", "{m}", "--remove", "1", "--out", "{o}", "--streaming"],
    "prune-metric": ["prune", "{m}", "--metric", "magnitude", "--num", "1", "--out", "{o}"],
    "compensate": ["compensate", "{m}", "--remove", "4", "--out", "{o}", "--calib", "{d}/calibration/c4_demo.jsonl"],
    "heal": ["heal", "{m}", "--out", "{o}", "--layers", "last1", "--max-steps", "1", "--data-dir", "{d}"],
    "eval": ["eval", "{m}", "--tasks", "piqa", "--limit", "2", "--data-dir", "{d}"],
    "ppl": ["ppl", "{m}", "--data-dir", "{d}", "--max-tokens", "64"],
    "compare": ["compare", "{m}", "--teacher", "{ok}", "--data-dir", "{d}", "--max-tokens", "64"],
    "bench": ["bench", "{m}", "--no-timing"],
    "generate": ["generate", "{m}", "--prompt", "hi", "--max-new-tokens", "2"],
}
DEVICE_COMMANDS = {k: v for k, v in MODEL_COMMANDS.items() if k not in ("info", "prune", "prune-streaming")}

CASES: list[tuple[str, list[str], str]] = []  # (id, argv template, expected message fragment)
for defect in MODEL_DEFECTS:
    for cmd, argv in MODEL_COMMANDS.items():
        CASES.append((f"{cmd}-{defect}", [a.replace("{m}", "{" + defect + "}") for a in argv], ""))
for cmd, argv in DEVICE_COMMANDS.items():
    for dev, frag in (("cuda", "no CUDA"), ("cuda:3", "no CUDA"), ("foo", "unknown device"), ("xla", "device")):
        CASES.append((f"{cmd}-device-{dev}", [a.replace("{m}", "{ok}") for a in argv] + ["--device", dev], frag))
CASES += [
    # argparse: missing and malformed arguments (one line, not usage + error)
    ("no-command", [], "required"),
    ("unknown-command", ["nosuch"], "invalid choice"),
    ("prune-no-out", ["prune", "{ok}", "--remove", "1"], "--out"),
    ("prune-both", ["prune", "{ok}", "--remove", "1", "--tail", "1", "--out", "{o}"], "not allowed with"),
    ("prune-neither", ["prune", "{ok}", "--out", "{o}"], ""),
    ("prune-remove-range", ["prune", "{ok}", "--remove", "9", "--out", "{o}"], ""),
    ("prune-remove-all", ["prune", "{ok}", "--remove", "0-5", "--out", "{o}"], ""),
    ("prune-remove-text", ["prune", "{ok}", "--remove", "a,b", "--out", "{o}"], ""),
    ("prune-remove-negative", ["prune", "{ok}", "--remove", "-3", "--out", "{o}"], ""),
    ("prune-tail-all", ["prune", "{ok}", "--tail", "6", "--out", "{o}"], "--tail"),
    ("prune-tail-zero", ["prune", "{ok}", "--tail", "0", "--out", "{o}"], ""),
    ("prune-tail-text", ["prune", "{ok}", "--tail", "x", "--out", "{o}"], ""),
    ("prune-out-full", ["prune", "{ok}", "--remove", "1", "--out", "{full}"], "not empty"),
    ("prune-out-file", ["prune", "{ok}", "--remove", "1", "--out", "{afile}"], "not a folder"),
    ("prune-bad-dtype", ["prune", "{ok}", "--remove", "1", "--out", "{o}", "--dtype", "fp13"], "dtype"),
    ("prune-metric-unknown", ["prune", "{ok}", "--metric", "nosuch", "--num", "1", "--out", "{o}"], "metric"),
    ("prune-metric-num-all", ["prune", "{ok}", "--metric", "bi", "--num", "6", "--out", "{o}"], ""),
    ("prune-metric-ratio", ["prune", "{ok}", "--metric", "bi", "--ratio", "1.5", "--out", "{o}"], ""),
    ("prune-metric-step", ["prune", "{ok}", "--metric", "bi", "--num", "2", "--iterative", "--step", "0",
                           "--out", "{o}"], ""),
    ("prune-metric-nsamples", ["prune", "{ok}", "--metric", "bi", "--num", "1", "--nsamples", "0", "--out", "{o}"],
     ""),
    ("prune-compensate-unknown", ["prune", "{ok}", "--remove", "1", "--compensate", "nosuch", "--out", "{o}"], ""),
    ("prune-compensate-layer0-tied", ["prune", "{tied}", "--remove", "0", "--compensate", "lstsq", "--out", "{o}",
                                      "--comp-calib", "{d}/calibration/c4_demo.jsonl"], ""),
    ("score-no-metric", ["score", "{ok}", "--out", "{o}"], "--metric"),
    ("score-unknown-metric", ["score", "{ok}", "--metric", "nosuch", "--out", "{o}"], "metric"),
    ("score-bad-mode", ["score", "{ok}", "--metric", "bi", "--mode", "nosuch", "--out", "{o}"], ""),
    ("score-bad-calib", ["score", "{ok}", "--metric", "bi", "--calib", "/nonexistent/x.jsonl", "--out", "{o}"], ""),
    ("score-calib-fields", ["score", "{ok}", "--metric", "bi", "--calib", "{calib_fields}", "--out", "{o}"],
     "--calib-field"),
    ("score-calib-badfield", ["score", "{ok}", "--metric", "bi", "--calib", "{calib_fields}", "--calib-field",
                              "nosuch", "--out", "{o}"], "nosuch"),
    ("score-calib-badline", ["score", "{ok}", "--metric", "bi", "--calib", "{calib_badline}", "--out", "{o}"],
     "line 2"),
    ("score-calib-eval-overlap", ["score", "{ok}", "--metric", "bi", "--calib", "wikitext2", "--calib-split",
                                  "test", "--data-dir", "{d}", "--out", "{o}"], ""),
    ("score-seqlen-zero", ["score", "{ok}", "--metric", "bi", "--seqlen", "0", "--out", "{o}"], ""),
    ("score-remove-too-many", ["score", "{ok}", "--metric", "magnitude", "--remove", "6", "--out", "{o}"], ""),
    ("score-out-full", ["score", "{ok}", "--metric", "magnitude", "--out", "{full}"], "not empty"),
    ("compensate-no-remove", ["compensate", "{ok}", "--out", "{o}"], ""),
    ("compensate-bad-method", ["compensate", "{ok}", "--remove", "4", "--method", "nosuch", "--out", "{o}"], ""),
    ("compensate-layer0-tied", ["compensate", "{tied}", "--remove", "0", "--out", "{o}", "--calib",
                                "{d}/calibration/c4_demo.jsonl"], ""),
    ("compensate-few-tokens", ["compensate", "{ok}", "--remove", "4", "--out", "{o}", "--nsamples", "1",
                               "--seqlen", "4", "--calib", "{d}/calibration/c4_demo.jsonl"], ""),
    ("compensate-bad-mode", ["compensate", "{ok}", "--remove", "4", "--mode", "nosuch", "--out", "{o}"], ""),
    ("compensate-negative-ridge", ["compensate", "{ok}", "--remove", "4", "--ridge", "-1", "--out", "{o}"], ""),
    ("heal-bad-layers", ["heal", "{ok}", "--out", "{o}", "--layers", "last99", "--data-dir", "{d}"], "--layers"),
    ("heal-bad-layers-text", ["heal", "{ok}", "--out", "{o}", "--layers", "some", "--data-dir", "{d}"], ""),
    ("heal-bad-method", ["heal", "{ok}", "--out", "{o}", "--method", "nosuch"], ""),
    ("heal-bad-optim", ["heal", "{ok}", "--out", "{o}", "--optim", "nosuch"], "optim"),
    ("heal-bad-scheduler", ["heal", "{ok}", "--out", "{o}", "--lr-scheduler", "nosuch"], "lr_scheduler"),
    ("heal-lr-zero", ["heal", "{ok}", "--out", "{o}", "--lr", "0"], "learning rate"),
    ("heal-lr-text", ["heal", "{ok}", "--out", "{o}", "--lr", "fast"], ""),
    ("heal-batch-mismatch", ["heal", "{ok}", "--out", "{o}", "--batch-size", "5", "--micro-batch-size", "2"], ""),
    ("heal-max-steps-zero", ["heal", "{ok}", "--out", "{o}", "--max-steps", "0"], ""),
    ("heal-epochs-negative", ["heal", "{ok}", "--out", "{o}", "--epochs", "-1"], ""),
    ("heal-distill-weight", ["heal", "{ok}", "--out", "{o}", "--distill-weight", "2"], ""),
    ("heal-save-steps", ["heal", "{ok}", "--out", "{o}", "--eval-steps", "3", "--save-steps", "4"], ""),
    ("heal-tie-mode", ["heal", "{ok}", "--out", "{o}", "--tie-mode", "nosuch"], ""),
    ("heal-bad-data", ["heal", "{ok}", "--out", "{o}", "--data", "/nonexistent.jsonl"], ""),
    ("heal-out-full", ["heal", "{ok}", "--out", "{full}"], "not empty"),
    ("heal-resume-nothing-different", ["heal", "{ok}", "--out", "{o}", "--overflow", "nosuch"], ""),
    ("eval-bad-task", ["eval", "{ok}", "--tasks", "nosuch_task", "--data-dir", "{d}"], "nosuch_task"),
    ("eval-batch-text", ["eval", "{ok}", "--tasks", "piqa", "--batch-size", "abc"], "batch size"),
    ("eval-batch-zero", ["eval", "{ok}", "--tasks", "piqa", "--batch-size", "0"], ""),
    ("eval-limit-fraction", ["eval", "{ok}", "--tasks", "piqa", "--limit", "2.5", "--data-dir", "{d}"], ""),
    ("eval-existing-out", ["eval", "{ok}", "--tasks", "piqa", "--data-dir", "{d}", "--out", "{existing}"], "exists"),
    ("eval-peft-missing", ["eval", "{ok}", "--tasks", "piqa", "--data-dir", "{d}", "--peft", "/nonexistent"], ""),
    ("eval-peft-not-adapter", ["eval", "{ok}", "--tasks", "piqa", "--data-dir", "{d}", "--peft", "{notamodel}"],
     "adapter"),
    ("eval-model-args", ["eval", "{ok}", "--tasks", "piqa", "--model-args", "novalue"], "key=value"),
    ("ppl-negative-tokens", ["ppl", "{ok}", "--max-tokens", "-5"], ">= 1"),
    ("ppl-zero-batch", ["ppl", "{ok}", "--batch-size", "0"], ""),
    ("ppl-bad-preset", ["ppl", "{ok}", "--preset", "nosuch"], ""),
    ("ppl-bad-bos", ["ppl", "{ok}", "--bos", "sometimes"], ""),
    ("ppl-bad-stride", ["ppl", "{ok}", "--data-dir", "{d}", "--stride", "1000"], "stride"),
    ("ppl-unknown-data", ["ppl", "{ok}", "--data", "nosuch_corpus", "--data-dir", "{d}"], ""),
    ("ppl-bad-jsonl", ["ppl", "{ok}", "--data", "{ppl_bad}"], "line 3"),
    ("ppl-existing-out", ["ppl", "{ok}", "--data-dir", "{d}", "--out", "{existing}"], "exists"),
    ("ppl-peft-not-adapter", ["ppl", "{ok}", "--data-dir", "{d}", "--peft", "{notamodel}"], "adapter"),
    ("ppl-seqlen-zero", ["ppl", "{ok}", "--data-dir", "{d}", "--seqlen", "0"], ""),
    ("compare-no-teacher", ["compare", "{ok}"], "--teacher"),
    ("compare-negative-tokens", ["compare", "{ok}", "--teacher", "{ok}", "--max-tokens", "-1"], ">= 1"),
    ("compare-bad-task", ["compare", "{ok}", "--teacher", "{ok}", "--tasks", "nosuch_task", "--data-dir", "{d}"],
     "nosuch_task"),
    ("compare-task-limit", ["compare", "{ok}", "--teacher", "{ok}", "--task-limit", "0"], ""),
    ("compare-existing-out", ["compare", "{ok}", "--teacher", "{ok}", "--data-dir", "{d}", "--out", "{existing}"],
     "exists"),
    ("compare-teacher-missing", ["compare", "{ok}", "--teacher", "{miss}", "--data-dir", "{d}"], "missing"),
    ("bench-bad-batch", ["bench", "{ok}", "--batch", "a,b"], "--batch"),
    ("bench-existing-out", ["bench", "{ok}", "--no-timing", "--out", "{existing}"], "exists"),
    ("bench-compare-missing", ["bench", "{ok}", "--compare", "/nonexistent/model", "--no-timing"], ""),
    ("generate-no-prompt", ["generate", "{ok}"], "--prompt"),
    ("generate-compare-missing", ["generate", "{ok}", "--prompt", "hi", "--compare", "/nonexistent/m"], ""),
    ("run-missing-recipe", ["run", "/nonexistent/recipe.yaml", "--out", "{o}"], "not found"),
    ("run-empty-recipe", ["run", "{empty}", "--out", "{o}"], "empty"),
    ("run-bad-yaml", ["run", "{badyaml}", "--out", "{o}"], "YAML"),
    ("run-bad-task", ["run", "{badtask}", "--out", "{o}", "--data-dir", "{d}"], "nosuch_task"),
    ("run-bad-metric", ["run", "{badmetric}", "--out", "{o}", "--data-dir", "{d}"], "metric"),
    ("run-bad-method", ["run", "{badmethod}", "--out", "{o}", "--data-dir", "{d}"], "method"),
    ("run-bad-key", ["run", "{badkey}", "--out", "{o}", "--data-dir", "{d}"], "metrik"),
    ("run-bad-ppl", ["run", "{badppl}", "--out", "{o}", "--data-dir", "{d}"], ""),
    ("run-bad-set", ["run", "{badtask}", "--set", "novalue", "--out", "{o}"], "key=value"),
    ("run-bad-set-type", ["run", "{badtask}", "--set", "heal.lr=fast", "--out", "{o}"], "heal.lr"),
    ("run-bad-workers", ["run", "{badtask}", "--set", "workers=0", "--out", "{o}"], "workers"),
    ("run-missing-model", ["run", "{badtask}", "--model", "/nonexistent/m", "--out", "{o}", "--data-dir", "{d}"], ""),
    ("run-out-full", ["run", "{badtask}", "--set", "evaluate.tasks=[]", "--out", "{full}", "--data-dir", "{d}"],
     "not empty"),
    ("report-missing", ["report", "/nonexistent/run"], ""),
    ("report-model-folder", ["report", "{notrun}"], "model folder"),
    ("report-bad-json", ["report", "{badjson}/config.json"], ""),
    ("export-missing-model", ["export", "/nonexistent/m", "--gguf", "{o}.gguf"], "not found"),
    ("export-not-gguf", ["export", "{ok}", "--gguf", "{o}.bin"], ".gguf"),
    ("export-bad-outtype", ["export", "{ok}", "--gguf", "{o}.gguf", "--outtype", "q3"], "invalid choice"),
    ("export-bad-json", ["export", "{badjson}", "--gguf", "{o}.gguf"], "invalid JSON"),
    ("chat-missing-model", ["chat", "/nonexistent/m"], ""),
    ("chat-bad-port", ["chat", "{ok}", "--port", "0"], ">= 1"),
    ("frontier-bad-ks", ["frontier", "{ok}", "--metric", "bi", "--ks", "9", "--out", "{o}"], "--ks"),
    ("frontier-bad-metric", ["frontier", "{ok}", "--metric", "nosuch", "--ks", "1", "--out", "{o}"], "metric"),
    ("frontier-ks-text", ["frontier", "{ok}", "--metric", "bi", "--ks", "a", "--out", "{o}"], "--ks"),
    ("prune-target-bad", ["prune", "{ok}", "--metric", "bi", "--target", "params", "--out", "{o}"], "KIND=VALUE"),
    ("prune-target-kind", ["prune", "{ok}", "--metric", "bi", "--target", "nosuch=1", "--out", "{o}"], "kind"),
    ("prune-target-unmeetable", ["prune", "{ok}", "--metric", "bi", "--target", "params=10", "--out", "{o}"],
     "cannot be met"),
    ("prune-target-no-metric", ["prune", "{ok}", "--target", "params=0.8", "--out", "{o}"], "--metric"),
    ("score-stability-one", ["score", "{ok}", "--metric", "bi", "--num", "1", "--stability", "1", "--out", "{o}"],
     "resamples"),
    ("download-bad-id", ["download", "bad//id..x", "--out", "{o}"], "invalid repository id"),
    ("download-bad-type", ["download", "a/b", "--repo-type", "nosuch", "--out", "{o}"], ""),
    ("download-offline", ["download", "a/b", "--out", "{o}"], ""),
]


# Options and recipe keys added since the last reliability sweep: compensation (reconstruct included), budget
# targets, stability, frontier, search, healing (teacher cache, self-generated data), generation agreement,
# chat, the recipe's sections. (id, argv template, fragment of the one error line)
_C4 = "{d}/calibration/c4_demo.jsonl"
_COMP = ["compensate", "{ok}", "--remove", "4", "--out", "{o}", "--calib", _C4]
for flag, values in {
    "--nsamples": [("0", "nsamples"), ("-2", "nsamples"), ("x", "invalid int")],
    "--seqlen": [("1", "seqlen"), ("0", "seqlen"), ("x", "invalid int")],
    "--batch-size": [("0", "batch_size"), ("x", "invalid int")],
    "--ridge": [("-0.5", "ridge"), ("x", "invalid float")],
    "--steps": [("-1", "steps"), ("x", "invalid int")],
    "--lr": [("0", "lr > 0"), ("-1", "lr > 0"), ("x", "invalid float")],
    "--max-tokens": [("0", "max_tokens"), ("x", "invalid int")],
    "--recon-steps": [("-1", "--recon-steps"), ("x", "invalid int")],
    "--recon-lr": [("0", "--recon-lr"), ("-1e-3", "--recon-lr"), ("x", "invalid float")],
    "--recon-batch": [("0", "--recon-batch"), ("x", "invalid int")],
    "--recon-layers": [("middle", "invalid choice")],
    "--recon-loss": [("l1", "invalid choice")],
    "--method": [("nosuch", "invalid choice"), ("", "invalid choice")],
    "--mode": [("dispatch", "invalid choice")],
}.items():
    for value, frag in values:
        method = [] if flag == "--method" else ["--method", "reconstruct"]
        CASES.append((f"compensate{flag}={value or 'empty'}", _COMP + method + [flag, value], frag))
CASES += [
    ("compensate-out-is-input", ["compensate", "{ok}", "--remove", "4", "--out", "{ok}", "--overwrite"], "input"),
    ("compensate-out-inside-input", ["compensate", "{ok}", "--remove", "4", "--out", "{ok}/sub"], "input"),
    ("compensate-calib-eval", _COMP[:-1] + ["{d}/ppl/ptb/test.jsonl"], "evaluation"),
    ("compensate-calib-empty", _COMP[:-1] + ["{emptyjsonl}"], ""),
    ("compensate-tail-all", ["compensate", "{ok}", "--tail", "6", "--out", "{o}"], "--tail"),
    ("compensate-tail-zero", ["compensate", "{ok}", "--tail", "0", "--out", "{o}"], ""),
    ("compensate-remove-range", ["compensate", "{ok}", "--remove", "7", "--out", "{o}"], "out of range"),
    ("compensate-missing-model", ["compensate", "/nonexistent/m", "--remove", "1", "--out", "{o}"], ""),
    ("compensate-layerwise-bin", ["compensate", "{pickled}", "--remove", "4", "--mode", "layerwise", "--out", "{o}"],
     ""),
    ("prune-comp-recon-steps", ["prune", "{ok}", "--remove", "4", "--compensate", "reconstruct", "--comp-recon-steps",
                                "-1", "--out", "{o}"], "--recon-steps"),
    ("prune-comp-recon-lr", ["prune", "{ok}", "--remove", "4", "--compensate", "reconstruct", "--comp-recon-lr",
                             "0", "--out", "{o}"], "--recon-lr"),
    ("prune-comp-recon-layers", ["prune", "{ok}", "--remove", "4", "--compensate", "reconstruct",
                                 "--comp-recon-layers", "x", "--out", "{o}"], "invalid choice"),
    ("prune-comp-nsamples", ["prune", "{ok}", "--remove", "4", "--compensate", "lstsq", "--comp-nsamples", "0",
                             "--out", "{o}"], "nsamples"),
    ("prune-out-is-input", ["prune", "{ok}", "--remove", "1", "--out", "{ok}", "--overwrite"], "input"),
    ("prune-streaming-out-is-input", ["prune", "{ok}", "--remove", "1", "--streaming", "--out", "{ok}",
                                      "--overwrite"], "input"),
    ("prune-out-contains-input", ["prune", "{ok}", "--remove", "1", "--out", "{root}", "--overwrite"], "input"),
    ("prune-target-dense-meets", ["prune", "{ok}", "--metric", "bi", "--target", "params=1.0", "--out", "{o}"],
     "dense"),
    ("prune-target-zero", ["prune", "{ok}", "--metric", "bi", "--target", "params=0", "--out", "{o}"], ""),
    ("prune-target-negative", ["prune", "{ok}", "--metric", "bi", "--target", "params=-1", "--out", "{o}"], ""),
    ("prune-target-text", ["prune", "{ok}", "--metric", "bi", "--target", "params=x", "--out", "{o}"], ""),
    ("prune-target-and-num", ["prune", "{ok}", "--metric", "bi", "--target", "params=0.8", "--num", "1",
                              "--out", "{o}"], ""),
    ("score-stability-zero", ["score", "{ok}", "--metric", "bi", "--num", "1", "--stability", "0", "--out", "{o}"],
     ""),
    ("score-stability-huge", ["score", "{ok}", "--metric", "bi", "--num", "1", "--stability", "100000000",
                              "--out", "{o}"], ""),
    ("score-stability-text", ["score", "{ok}", "--metric", "bi", "--num", "1", "--stability", "x", "--out", "{o}"],
     "invalid int"),
    ("score-stability-empty-calib", ["score", "{ok}", "--metric", "bi", "--num", "1", "--stability", "3",
                                     "--calib", _C4, "--calib", "{emptyjsonl}", "--out", "{o}"], ""),
    ("score-stability-no-num", ["score", "{ok}", "--metric", "bi", "--stability", "3", "--out", "{o}"], ""),
    ("score-out-is-input", ["score", "{ok}", "--metric", "magnitude", "--out", "{ok}", "--overwrite"], "input"),
    ("score-out-around-input", ["score", "{ok}", "--metric", "magnitude", "--out", "{root}", "--overwrite"],
     "input"),
    ("run-out-is-model", ["run", "{good}", "--out", "{ok}", "--overwrite", "--data-dir", "{d}"], "input"),
    ("frontier-compensate-reconstruct", ["frontier", "{ok}", "--metric", "bi", "--ks", "1", "--compensate",
                                         "reconstruct", "--out", "{o}"], "invalid choice"),
    ("frontier-compensate-nosuch", ["frontier", "{ok}", "--metric", "bi", "--ks", "1", "--compensate", "nosuch",
                                    "--out", "{o}"], "invalid choice"),
    ("frontier-ks-zero", ["frontier", "{ok}", "--metric", "bi", "--ks", "0", "--out", "{o}"], "--ks"),
    ("frontier-ks-negative", ["frontier", "{ok}", "--metric", "bi", "--ks", "-1", "--out", "{o}"], "--ks"),
    ("frontier-ks-empty", ["frontier", "{ok}", "--metric", "bi", "--ks", "", "--out", "{o}"], "--ks"),
    ("frontier-out-is-input", ["frontier", "{ok}", "--metric", "bi", "--ks", "1", "--out", "{ok}", "--overwrite"],
     "input"),
    ("frontier-missing-model", ["frontier", "/nonexistent/m", "--metric", "bi", "--ks", "1", "--out", "{o}"], ""),
    ("compare-generate-zero", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "0"], ""),
    ("compare-generate-negative", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "-2"], ""),
    ("compare-generate-text", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "x"], "whole number"),
    ("compare-generate-empty-prompts", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "2", "--prompts",
                                        "{emptyjson}", "--data-dir", "{d}"], ""),
    ("compare-generate-missing-prompts", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "2", "--prompts",
                                          "/nonexistent/p.json", "--data-dir", "{d}"], ""),
    ("compare-gen-tokens-zero", ["compare", "{ok}", "--teacher", "{ok}", "--generate", "2", "--gen-tokens", "0"],
     ""),
    ("chat-port-huge", ["chat", "{ok}", "--port", "99999"], "65535"),
    ("chat-port-negative", ["chat", "{ok}", "--port", "-1"], ""),
    ("chat-port-text", ["chat", "{ok}", "--port", "x"], ""),
    ("chat-port-65536", ["chat", "{ok}", "--port", "65536"], "65535"),
]
_SEARCH = ["search", "{ok}", "--target", "params=0.8", "--out", "{o}", "--no-heal"]
for flag, value, frag in [
    ("--target", "params", "KIND=VALUE"), ("--target", "nosuch=1", "kind"), ("--target", "params=10", ""),
    ("--target", "params=1.0", "dense"), ("--metrics", "nosuch", "nosuch"), ("--metrics", "", ""),
    ("--iterative", "nosuch", "nosuch"), ("--random", "-1", "random"), ("--random", "x", "invalid int"),
    ("--protect-first", "-1", "protect"), ("--protect-last", "-1", "protect"), ("--protect-first", "6", ""),
    ("--nsamples", "0", "nsamples"), ("--heldout", "0", "heldout"), ("--seqlen", "1", "seqlen"),
    ("--batch-size", "0", "batch"), ("--compensation", "nosuch", "compensation"),
    ("--compensate-top", "-1", "compensate"), ("--fit-nsamples", "0", "fit"), ("--fit-seqlen", "1", "fit"),
    ("--probe-top", "-1", "probe"), ("--probe-steps", "0", "probe"), ("--probe-prompts", "-1", "probe"),
    ("--probe-new-tokens", "0", "probe"), ("--final", "nosuch", "invalid choice"),
    ("--budget-minutes", "0", "budget"), ("--budget-minutes", "-5", "budget"), ("--budget-minutes", "x", "invalid"),
    ("--calib", "/nonexistent/c.jsonl", ""), ("--calib", "{d}/ppl/ptb/test.jsonl", "evaluation"),
    ("--heal-method", "nosuch", "invalid choice"), ("--heal-lr", "0", ""), ("--heal-max-steps", "0", ""),
    ("--heal-data", "self:0", "self:N"), ("--heal-teacher-top-k", "0", "teacher_top_k"),
]:
    base = _SEARCH[:-1] if flag.startswith("--heal") else _SEARCH  # heal flags need the heal on
    CASES.append((f"search{flag}={value or 'empty'}", base + [flag, value], frag))
CASES += [
    ("search-out-is-input", ["search", "{ok}", "--target", "params=0.8", "--out", "{ok}", "--overwrite"], "input"),
    ("search-no-target", ["search", "{ok}", "--out", "{o}"], "--target"),
    ("search-missing-model", ["search", "/nonexistent/m", "--target", "params=0.8", "--out", "{o}"], ""),
    ("search-out-full", ["search", "{ok}", "--target", "params=0.8", "--out", "{full}"], "not empty"),
]
_HEAL = ["heal", "{ok}", "--out", "{o}", "--data-dir", "{d}"]
for flag, value, frag in [
    ("--teacher-top-k", "0", "teacher_top_k"), ("--teacher-top-k", "x", "invalid int"),
    ("--teacher-full-max", "-1", "teacher_full_max"), ("--teacher-cache", "", "teacher_cache"),
    ("--data", "self:0", "self:N"), ("--data", "self:x", "self:N"), ("--data", "self:", "self:N"),
    ("--data", "self:999999999", "self:N"), ("--data", "{d}/ppl/ptb/test.jsonl", "evaluation"),
    ("--data", "{d}/eval/piqa/validation.jsonl", "evaluation"), ("--data", "{emptyjsonl}", ""),
    ("--distill-temperature", "0", "temperature"), ("--distill-temperature", "-1", "temperature"),
    ("--distill-weight", "-0.1", "distill_weight"), ("--cutoff-len", "1", "cutoff"),
    ("--eval-steps", "0", "eval_steps"), ("--logging-steps", "0", "logging_steps"),
    ("--prefix-cache-gb", "-1", "prefix_cache_gb"), ("--micro-batch-size", "0", "batch"),
    ("--teacher", "/nonexistent/t", ""), ("--distill-base", "distill", "invalid choice"),
]:
    CASES.append((f"heal{flag}={value or 'empty'}", _HEAL + [flag, value], frag))
CASES += [
    ("heal-out-is-input", ["heal", "{ok}", "--out", "{ok}", "--overwrite"], "input"),
    ("heal-out-inside-input", ["heal", "{ok}", "--out", "{ok}/healed"], "input"),
    ("heal-distill-no-teacher", ["heal", "{ok}", "--out", "{o}", "--method", "distill", "--data-dir", "{d}"],
     "--teacher"),
    ("heal-self-no-teacher", ["heal", "{ok}", "--out", "{o}", "--data", "self:4", "--data-dir", "{d}"],
     "--teacher"),
]
# Every recipe section's keys, through --set on a valid recipe: refused before the first stage.
for key, value, frag in [
    ("compensate.method", "nosuch", "compensat"), ("compensate.nsamples", "0", "nsamples"),
    ("compensate.recon_steps", "-1", "recon"), ("compensate.recon_lr", "0", "recon"),
    ("compensate.recon_layers", "middle", "recon-layers"), ("compensate.recon_loss", "l1", "recon-loss"),
    ("compensate.recon_batch", "0", "recon"), ("compensate.ridge", "-1", "ridge"),
    ("compensate.mode", "nosuch", "mode"), ("compensate.seqlen", "1", "seqlen"),
    ("compensate.nosuch", "1", "nosuch"),
    ("heal.teacher_top_k", "0", "teacher_top_k"), ("heal.teacher_full_max", "-1", "teacher_full_max"),
    ("heal.data", "self:0", "self:N"), ("heal.distill_weight", "2", "distill_weight"),
    ("heal.distill_temperature", "0", "temperature"), ("heal.lr", "0", "learning rate"),
    ("heal.max_steps", "0", "max_steps"), ("heal.cutoff_len", "1", "cutoff"), ("heal.nosuch", "1", "nosuch"),
    ("heal.method", "nosuch", "method"), ("heal.tie_mode", "nosuch", "tie_mode"),
    ("evaluate.generative.agreement", "-1", "agreement"), ("evaluate.generative.new_tokens", "0", "new_tokens"),
    ("evaluate.generative.limit", "-1", "limit"), ("evaluate.generative.nosuch", "1", "nosuch"),
    ("evaluate.limit", "-1", "limit"), ("evaluate.batch_size", "0", "batch"),
    ("evaluate.ppl", "[nosuch_corpus]", ""), ("evaluate.nosuch", "1", "nosuch"),
    ("prune.target", "params=0", ""), ("prune.target", "nosuch=1", "kind"), ("prune.num", "-1", ""),
    ("prune.metric", "nosuch", "metric"), ("prune.nosuch", "1", "nosuch"),
    ("search.probe_top", "-1", "probe"), ("search.metrics", "[nosuch]", "nosuch"),
    ("search.compensation", "nosuch", "compensation"), ("search.final", "nosuch", "final"),
    ("search.budget_minutes", "0", "budget"), ("search.nosuch", "1", "nosuch"),
    ("measure.batch", "0", "batch"), ("measure.nosuch", "1", "nosuch"),
    ("workers", "-1", "workers"), ("seed", "x", "seed"), ("nosuch", "1", "nosuch"),
]:
    CASES.append((f"recipe-{key}={value}", ["run", "{good}", "--set", f"{key}={value}", "--out", "{o}",
                                             "--data-dir", "{d}"], frag))


def _fill(argv: list[str], w: dict[str, Path], out: Path) -> list[str]:
    subs = {"{o}": str(out), "{d}": str(w["data"]), "{nosuch}": str(w["root"] / "nosuch-model")}
    subs.update({"{" + k + "}": str(v) for k, v in w.items()})
    res = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        res.append(a)
    return res


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the SHA-256 of its content (folders: "dir")."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_at_least_350_bad_inputs():
    assert len(CASES) >= 350 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv, fragment, w, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(w["data"]))
    case = tmp_path / "case"
    case.mkdir()
    world_before = _snapshot(w["root"])
    code = None
    try:
        code = main(_fill(argv, w, case / "out"))
    except SystemExit as e:  # argparse exits
        code = e.code
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code == 2, (code, cap.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("layerprune: error:"), cap.err[-2000:]
    assert "Traceback" not in cap.err + cap.out
    assert fragment in lines[0], lines[0]
    assert _listing(case) == [], "a failed command left files behind"
    assert _snapshot(w["root"]) == world_before, "a failed command changed its inputs (by content hash)"


def test_real_entry_point_one_line(w):
    """The installed console script too (no in-process shortcuts): one line, exit 2."""
    r = subprocess.run([str(Path(sys.executable).with_name("layerprune")), "prune", str(w["miss"]), "--remove", "1",
                        "--out", str(w["root"] / "never")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "down_proj" in r.stderr, r.stderr
    assert not (w["root"] / "never").exists()


# ------------------------------------------------------------------------------------------- kills and resumes

_HARNESS = textwrap.dedent("""
    import os, signal, sys
    point = os.environ["KILL_AT"]
    calls = {"n": 0}

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "prune-save":
        import safetensors.torch as st
        real = st.save_file
        def partial(tensors, filename, *a, **k):
            open(filename, "wb").write(b"x" * 100)  # a half-written shard, then the kill
            die()
        st.save_file = partial
        import transformers.modeling_utils as mu
        if hasattr(mu, "safe_save_file"):
            mu.safe_save_file = partial
    elif point == "stream-shard":
        import layerprune.prune.streaming as s
        real = s._write_shard
        def shard(path, *a, **k):
            open(path, "wb").write(b"x" * 100)
            die()
        s._write_shard = shard
    elif point.startswith("heal-ckpt-"):
        # Kill during the checkpoint save at step N: the folder exists, its optimizer.pt is empty.
        step = int(point.rsplit("-", 1)[1])
        from transformers import Trainer
        real = Trainer._save_optimizer_and_scheduler
        def save(self, output_dir):
            if self.state.global_step == step:
                os.makedirs(output_dir, exist_ok=True)
                open(os.path.join(output_dir, "optimizer.pt"), "wb").close()
                die()
            return real(self, output_dir)
        Trainer._save_optimizer_and_scheduler = save
    elif point == "heal-after-last-ckpt":
        from transformers import Trainer
        real = Trainer._save_checkpoint
        def after(self, *a, **k):
            real(self, *a, **k)
            if self.state.global_step >= self.state.max_steps:
                die()
        Trainer._save_checkpoint = after
    elif point == "heal-final-save":
        import layerprune.healing.core as core
        real = core.save_pretrained_atomic
        def final(model, tok, out, *a, **k):
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "model.safetensors"), "wb").write(b"x" * 100)
            die()
        core.save_pretrained_atomic = final
    elif point.startswith("run-after-"):
        # Kill at a stage boundary of a recipe run: the stage is finished and recorded, the next not begun.
        stage = point[len("run-after-"):]
        import layerprune.recipe.state as rs
        real = rs.RunState.run
        def run(self, name, *a, **k):
            out = real(self, name, *a, **k)
            if name == stage:
                die()
            return out
        rs.RunState.run = run
    elif point.startswith("at:"):
        # at:MODULE:ATTR[.ATTR]:SIGNAL:N -- the process signals itself on the Nth call of MODULE.ATTR.
        import importlib, time
        _, mod, attr, sig, nth = point.split(":")
        owner = importlib.import_module(mod)
        *path, name = attr.split(".")
        for a in path:
            owner = getattr(owner, a)
        real = getattr(owner, name)
        def hit(*a, **k):
            calls["n"] += 1
            if calls["n"] == int(nth):
                os.kill(os.getpid(), getattr(signal, sig))
                time.sleep(5)  # SIGTERM's handler interrupts this
            return real(*a, **k)
        setattr(owner, name, hit)
    from layerprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_signalled(point: str, argv: list[str], sig: str, env_extra: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess that sends itself ``sig`` at ``point`` (``at:...``); asserts how it ended:
    killed by SIGKILL, or exit 143 with one 'terminated' line for SIGTERM."""
    env = {**os.environ, "KILL_AT": f"{point}:{sig}:1" if point.count(":") == 2 else point, "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    r = subprocess.run([sys.executable, "-c", _HARNESS, *argv], env=env, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    if sig == "SIGKILL":
        assert r.returncode == -signal.SIGKILL, f"not killed at {point} (exit {r.returncode}): {r.stderr[-3000:]}"
    else:
        assert r.returncode == 143, f"not terminated at {point} (exit {r.returncode}): {r.stderr[-3000:]}"
        assert "terminated" in r.stderr.strip().splitlines()[-1]
    return r


def _run_killed(point: str, argv: list[str], env_extra: dict[str, str] | None = None) -> int:
    """Run the CLI in a subprocess that SIGKILLs itself at ``point``; asserts that it did."""
    env = {**os.environ, "KILL_AT": point, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run([sys.executable, "-c", _HARNESS, *argv], env=env, capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == -signal.SIGKILL, f"not killed at {point} (exit {r.returncode}): {r.stderr[-3000:]}"
    return r.returncode


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} of {len(ta)} tensors differ: {diff[:3]}"


@pytest.mark.parametrize("streaming", [False, True])
def test_prune_killed_while_saving_recovers(w, tmp_path, streaming):
    out = tmp_path / "out"
    argv = ["prune", str(w["ok"]), "--remove", "2", "--out", str(out)] + (["--streaming"] if streaming else [])
    rc = _run_killed("stream-shard" if streaming else "prune-save", argv)
    assert rc == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert leftovers, "the kill should leave the temporary folder (the test checks its cleanup)"
    assert main(argv) == 0  # the corrected/re-run command is not blocked, and cleans the dead run's leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    ref = tmp_path.parent / f"ref-{streaming}"
    assert main(["prune", str(w["ok"]), "--remove", "2", "--out", str(ref)] + (["--streaming"] if streaming else [])
                ) == 0
    _same_weights(out, ref)


def _json_numbers(path: Path, drop: tuple[str, ...] = ()) -> Any:
    """A JSON file without its timing and path fields (what two equal runs may differ in)."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop and not k.endswith(("_s", "seconds", "time"))}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(json.loads(path.read_text()))


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_score_stability_killed_leaves_nothing_and_reruns_equal(w, tmp_path, sig):
    """Killed during a resample: no scores.json without its stability (nothing at all); the re-run equals an
    uninterrupted run."""
    out = tmp_path / "out"
    argv = ["score", str(w["ok"]), "--metric", "bi", "--num", "1", "--stability", "3", "--calib",
            str(w["data"] / "calibration" / "c4_demo.jsonl"), "--nsamples", "4", "--seqlen", "16", "--out", str(out),
            "--no-cache"]
    _run_signalled("at:layerprune.stability:_per_window", argv, sig)
    assert not out.exists()
    assert main(argv) == 0 and [p.name for p in tmp_path.iterdir()] == ["out"]
    ref = tmp_path.parent / f"ref-score-{sig}"
    assert main([str(ref) if a == str(out) else a for a in argv]) == 0
    drop = ("model", "path", "source_path")
    assert _json_numbers(out / "scores.json", drop) == _json_numbers(ref / "scores.json", drop)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_frontier_killed_reruns_clean_and_equal(w, tmp_path, sig):
    out = tmp_path / "out"
    argv = ["frontier", str(w["ok"]), "--metric", "bi,reverse", "--ks", "1,2", "--calib",
            str(w["data"] / "calibration" / "c4_demo.jsonl"), "--nsamples", "4", "--seqlen", "16",
            "--heldout", "2", "--out", str(out)]
    _run_signalled("at:layerprune.frontier:_quality", argv, sig)
    assert not (out / "frontier.json").exists()
    assert main(argv) == 0  # not blocked by anything the killed run left
    ref = tmp_path.parent / f"ref-frontier-{sig}"
    assert main(argv[:-1] + [str(ref)]) == 0
    assert _json_numbers(out / "frontier.json") == _json_numbers(ref / "frontier.json")


def _fake_converter(folder: Path) -> Path:
    """A stand-in for llama.cpp's converter: writes the output in slow pieces (a kill lands mid-write)."""
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text(textwrap.dedent("""
        import sys, time
        out = sys.argv[sys.argv.index("--outfile") + 1]
        with open(out, "wb") as f:
            for i in range(20):
                f.write(b"GGUF" * 1000)
                f.flush()
                print(f"writing tensor {i}", flush=True)
                time.sleep(0.05)
    """))
    return folder


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_export_killed_during_conversion(w, tmp_path, sig):
    """No .gguf and, once the next export ran, no temporary file; the converter does not outlive us."""
    conv = _fake_converter(tmp_path / "conv")
    out = tmp_path / "o" / "m.gguf"
    argv = ["export", str(w["ok"]), "--gguf", str(out)]
    env = {"LAYERPRUNE_LLAMA_CPP": str(conv)}
    _run_signalled("at:tqdm.auto:tqdm.update:" + sig + ":3", argv, sig, env)
    import time

    time.sleep(1.5)  # a converter that outlived the kill would finish writing in about a second
    assert not out.exists()
    left = list(out.parent.iterdir())
    assert all(p.stat().st_size < 80_000 for p in left), "the converter went on writing after the kill"
    r = subprocess.run([sys.executable, "-m", "layerprune", *argv], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"] and out.stat().st_size == 80_000


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_compensate_killed_during_calibration(w, tmp_path, sig):
    out = tmp_path / "out"
    argv = ["compensate", str(w["ok"]), "--remove", "3,4", "--calib", str(w["data"] / "calibration" / "c4_demo.jsonl"),
            "--nsamples", "8", "--seqlen", "16", "--batch-size", "2", "--ridge", "0.01", "--out", str(out)]
    _run_signalled("at:layerprune.compensation.methods:Stats.update:" + sig + ":2", argv, sig)
    assert not out.exists()
    assert main(argv) == 0 and [p.name for p in tmp_path.iterdir()] == ["out"]
    ref = tmp_path.parent / f"ref-comp-{sig}"
    assert main(argv[:-1] + [str(ref)]) == 0
    _same_weights(out, ref)


def test_stale_tmp_of_a_live_process_is_kept(tmp_path):
    """Only leftovers whose process is gone are removed: a concurrent writer's folder stays."""
    from layerprune.io import clean_stale_tmp, tmp_prefix

    out = tmp_path / "out"
    live = tmp_path / (tmp_prefix(out.resolve()) + "abc")  # this very process: alive
    live.mkdir()
    other = tmp_path / ".other.tmp-host-1-abc"
    other.mkdir()
    assert clean_stale_tmp(out.resolve()) == []
    assert live.exists() and other.exists()


def test_sigterm_is_handled_like_ctrl_c(w, tmp_path):
    """SIGTERM during a save: exit 143 and no temporary folder left behind."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        import safetensors.torch as st
        real = st.save_file
        def slow(tensors, filename, *a, **k):
            open(filename, "wb").write(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            return real(tensors, filename, *a, **k)
        st.save_file = slow
        import transformers.modeling_utils as mu
        if hasattr(mu, "safe_save_file"):
            mu.safe_save_file = slow
        from layerprune.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "prune", str(w["ok"]), "--remove", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 143, r.stderr[-1000:]
    assert "terminated" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_folders_follow_the_umask(w, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["prune", str(w["ok"]), "--remove", "1", "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_disk_full_is_one_line_and_writes_nothing(w, tmp_path, capsys, monkeypatch):
    import errno

    import layerprune.io as lio

    class Usage:
        free = 10_000

    monkeypatch.setattr(lio.shutil, "disk_usage", lambda p: Usage())
    for extra in ([], ["--streaming"]):
        out = tmp_path / f"o{len(extra)}"
        assert main(["prune", str(w["ok"]), "--remove", "1", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "not enough disk space" in err and "nothing was written" in err and err.count("\n") == 1
    monkeypatch.undo()
    # ENOSPC in the middle of a write (the free-space estimate was wrong): same promise.
    import safetensors.torch as st

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    import transformers.modeling_utils as mu

    if hasattr(mu, "safe_save_file"):
        monkeypatch.setattr(mu, "safe_save_file", full)
    assert main(["prune", str(w["ok"]), "--remove", "1", "--out", str(tmp_path / "o9")]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "nothing was written" in err and "needs about" in err
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_place(w, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real(p, m))
    assert main(["prune", str(w["ok"]), "--remove", "1", "--out", str(ro / "o")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert list(ro.iterdir()) == []


# ------------------------------------------------------------------------------------------------- healing

HEAL = ["--layers", "last1", "--max-steps", "12", "--batch-size", "2", "--micro-batch-size", "2", "--eval-steps",
        "4", "--val-size", "4", "--max-train-samples", "40", "--warmup-steps", "1", "--cutoff-len", "48",
        "--no-progress"]


@pytest.fixture(scope="module")
def heal_ref(tiny_smol_rel, tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("healref") / "ref"
    os.environ["LAYERPRUNE_DATA"] = str(data_dir)
    assert main(["heal", str(tiny_smol_rel), "--out", str(out), *HEAL]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_smol_rel(tmp_path_factory, smollm2_path):
    return save_tiny_smol(tmp_path_factory.mktemp("tinyrel") / "m", smollm2_path)


def _history(folder: Path) -> tuple[list, int, float]:
    h = json.loads((folder / "heal.json").read_text())
    return h["log_history"], h["steps"], h["mean_train_loss"]


@pytest.mark.parametrize("point", ["heal-ckpt-8", "heal-ckpt-12", "heal-after-last-ckpt", "heal-final-save"])
def test_heal_killed_anywhere_resumes_bit_identical(point, heal_ref, tiny_smol_rel, tmp_path, data_dir):
    out = tmp_path / "out"
    argv = ["heal", str(tiny_smol_rel), "--out", str(out), *HEAL]
    rc = _run_killed(point, argv, {"LAYERPRUNE_DATA": str(data_dir)})
    assert rc == -signal.SIGKILL
    assert not out.exists()
    assert main([*argv, "--resume"]) == 0
    _same_weights(out, heal_ref)
    assert _history(out) == _history(heal_ref)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # checkpoints and temporary folders are gone


def test_heal_user_error_leaves_nothing_that_blocks_the_fix(tiny_smol_rel, tmp_path, capsys, data_dir,
                                                           monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_DATA", str(data_dir))
    out = tmp_path / "out"
    argv = ["heal", str(tiny_smol_rel), "--out", str(out), *HEAL]
    bad = [a if a != "last1" else "last99" for a in argv]
    assert main(bad) == 2
    assert list(tmp_path.iterdir()) == []
    # Diverged (exploding weights): refused, nothing saved, and the lower-lr command runs.
    assert main([*argv, "--lr", "1e6"]) == 2
    assert "diverged" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(argv) == 0


def _recipe_file(model: Path, folder: Path) -> Path:
    r = {"name": "tiny", "model": str(model),
         "prune": {"metric": "reverse", "num_layers": 2},
         "compensate": {"method": "lstsq", "nsamples": 4, "seqlen": 32},
         "heal": {"method": "partial", "layers": "last1", "max_steps": 4, "batch_size": 2, "micro_batch_size": 2,
                  "eval_steps": 2, "val_size": 4, "max_train_samples": 16, "warmup_steps": 1, "cutoff_len": 48},
         "evaluate": {"tasks": [], "ppl": ["wikitext2"], "ppl_max_tokens": 256, "batch_size": 4},
         "measure": {"enabled": False}}
    import yaml

    f = folder / "tiny.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


@pytest.fixture(scope="module")
def run_ref(tiny_smol_rel, tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("runref")
    os.environ["LAYERPRUNE_DATA"] = str(data_dir)
    assert main(["run", str(_recipe_file(tiny_smol_rel, root)), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.mark.parametrize("point", ["run-after-score", "run-after-compensated", "run-after-model",
                                   "run-after-eval-pruned", "heal-ckpt-4"])
def test_run_killed_at_a_stage_boundary_resumes_to_the_same_result(point, run_ref, tiny_smol_rel, tmp_path,
                                                                     data_dir):
    recipe = _recipe_file(tiny_smol_rel, tmp_path)
    argv = ["run", str(recipe), "--out", str(tmp_path / "run")]
    assert _run_killed(point, argv, {"LAYERPRUNE_DATA": str(data_dir)}) == -signal.SIGKILL
    assert main([*argv, "--resume"]) == 0
    _same_weights(tmp_path / "run" / "model", run_ref / "model")
    a = json.loads((tmp_path / "run" / "layerprune.json").read_text())
    b = json.loads((run_ref / "layerprune.json").read_text())
    assert a["results"]["healed"]["ppl"]["wikitext2"]["ppl"] == b["results"]["healed"]["ppl"]["wikitext2"]["ppl"]
    assert a["heal"]["log_history"] == b["heal"]["log_history"]
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name or p.name.endswith(".checkpoints")]
