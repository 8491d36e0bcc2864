"""``layerprune info``: what the adapter finds in a model."""

from __future__ import annotations

import argparse
import json

from ..arch import parts, per_layer_fields
from ..models import count_parameters, load_model
from .common import add_model_arg, add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, layer count, parameters and per-layer config fields")
    add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_verbose(p)
    p.set_defaults(func=run)


def describe(model) -> dict:
    """A JSON-able description of ``model`` as the adapter sees it."""
    pt = parts(model)
    cfg = model.config.to_dict()
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in pt.layers]
    return {
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "adapter": pt.adapter.name,
        "adapter_notes": pt.adapter.notes,
        "num_layers": pt.num_layers,
        "layers_path": pt.adapter.layers,
        "embed_path": pt.adapter.embed,
        "norm_path": pt.adapter.norm,
        "head_path": pt.adapter.head,
        "tied_embeddings": pt.tied,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": count_parameters(model),
        "parameters_per_layer": layer_params[0] if len(set(layer_params)) == 1 else layer_params,
        "per_layer_config": {k: cfg[k] for k in per_layer_fields(cfg, pt.adapter)},
    }


def run(args: argparse.Namespace) -> int:
    info = describe(load_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "per_layer_config":
            print("per_layer_config:" if v else "per_layer_config: (none)")
            for fk, fv in v.items():
                print(f"  {fk}: {fv}")
        else:
            print(f"{k}: {v}")
    return 0
