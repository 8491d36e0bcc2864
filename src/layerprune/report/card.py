"""The Hugging Face model card (README.md) of a pruned / compensated / healed checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..run_manifest import RunManifest
from .document import Bullets, render_markdown
from .format import CITATION, DEFAULT_BASE_MODEL, _layers, _num
from .tables import (
    _check_manifest,
    _describe_heal,
    _describe_method,
    _model_name,
    _num_layers,
    _results,
    compensation_table,
    ppl_blocks,
    summary_table,
    zero_shot_blocks,
)

# --------------------------------------------------------------------------------------------------------------


def _looks_like_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not Path(s).exists()


def _base_model(m: dict) -> str | None:
    if m.get("base_model"):
        return str(m["base_model"])
    name = _model_name(m)
    if name == "default":
        return DEFAULT_BASE_MODEL
    return name if _looks_like_hub_id(name) else None


def model_card(manifest: RunManifest | dict[str, Any], repo_id: str | None = None) -> str:
    """A Hugging Face model card (``README.md``) for the pruned / healed checkpoint, with YAML front matter.

    ``repo_id``: where the checkpoint will live, used in the loading example (a placeholder otherwise).
    """
    m = _check_manifest(manifest)
    removed, kept = _layers(m.get("removed_layers")), _layers(m.get("kept_layers"))
    n = _num_layers(m)
    base = _base_model(m)
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": ["layerprune", "pruned", "depth-pruning"]})
    name = _model_name(m)
    parts = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {Path(name).name if not base else base.split('/')[-1]}, depth-pruned with layerprune", ""]
    parts.append(f"This model is `{base or name}` with {len(removed)} of its {n or '?'} decoder layers removed "
                 f"({len(kept)} remain). It is a plain `transformers` checkpoint: no custom code, the layer count "
                 "and per-layer config entries already match the remaining layers.\n")
    parts += ["## What was removed", "",
              f"- Removed layers (0-based indices in the original model): `{removed}`",
              f"- Kept layers, in order: `{kept}`"]
    if n:
        parts.append(f"- Depth: {n} → {len(kept)} ({len(removed) / n:.1%} removed)")
    parts.append("")
    method = _describe_method(m)
    if method:
        parts += ["## Method", "", *[f"- {x}" for x in method], ""]
    ct = compensation_table(m)
    if ct:
        parts += ["## Compensation", "", render_markdown([ct]).rstrip(), ""]
    heal = _describe_heal(m)
    parts += ["## Healing", ""] + ([f"- {x}" for x in heal] if heal else ["No healing (fine-tuning) after pruning."])
    parts.append("")
    table = summary_table(m)
    zs = zero_shot_blocks(m)
    if table or zs:
        parts += ["## Results", ""]
        if table:
            parts += [render_markdown([table]).rstrip(), ""]
        if zs:
            parts += [render_markdown(zs[1:]).rstrip(), ""]
    load_id = repo_id or "PATH_OR_REPO_ID"
    parts += ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{load_id}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
              'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}],',
              '                                       add_generation_prompt=True, return_tensors="pt",',
              '                                       return_dict=True)',
              "out = model.generate(**inputs, max_new_tokens=64)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "", "(Use plain `tokenizer(...)` instead of the chat template if the tokenizer has none.)", ""]
    notes = ["Layer indices are 0-based and refer to the original model throughout.",
             "Zero-shot accuracies come from lm-evaluation-harness; Avg Acc is the mean accuracy over the listed "
             "tasks (the paper's summary number)."]
    ppl = ppl_blocks(m)
    for b in ppl:
        if isinstance(b, Bullets):
            notes += [f"Perplexity protocol: {x}" for x in b.items]
    if any(_num(r.get("prefill_ms")) is not None or _num(r.get("decode_tok_s")) is not None
           for r in _results(m).values()):
        notes.append("Latency and throughput depend on the hardware they were measured on; compare ratios, "
                     "not absolute numbers.")
    versions = m.get("library_versions")
    if isinstance(versions, dict) and versions:
        notes.append("Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    parts += ["## Protocol notes", "", *[f"- {x}" for x in notes], ""]
    parts += ["## Citation", "", "The pruning and healing recipes follow Lu et al. (2024), *Reassessing Layer "
              "Pruning in LLMs: New Insights and Methods*, arXiv:2411.15558.", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Exports: mergekit and llama.cpp
