"""``layerprune ppl``: token perplexity with a protocol card for every number."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_data_dir_arg, add_device_arg, add_dtype_arg, add_model_arg, add_verbose, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppl", help="perplexity (WikiText-2, PTB, or a text file) with protocol cards",
                       description="Token perplexity over non-overlapping (or strided) windows of a joined split. "
                                   "Presets: seed = 128-token windows, one BOS at the start (the seed, LLM-Pruner); "
                                   "gptq = 2048-token windows.")
    add_model_arg(p)
    p.add_argument("--peft", default=None, help="LoRA/PEFT adapter folder applied on top (not merged)")
    p.add_argument("--data", default="wikitext2",
                   help="comma-separated: wikitext2, ptb, or .jsonl/.txt files (default: %(default)s)")
    p.add_argument("--preset", default="seed", choices=("seed", "gptq"), help="protocol preset (default: seed)")
    p.add_argument("--seqlen", type=int, default=None, help="window length in tokens (overrides the preset)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: window length, i.e. non-overlapping)")
    p.add_argument("--bos", default=None, choices=("auto", "start", "always", "never"),
                   help="BOS policy: start = once before the text; always = every window; auto = always for the "
                        "Gemma family, else start (default: the preset's, start)")
    p.add_argument("--split", default=None, help="split (default: the preset's; test, seed uses PTB validation)")
    add_data_dir_arg(p)
    add_dtype_arg(p)
    add_device_arg(p, "cpu, cuda ... (default: cuda if available)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="use only the first N tokens (a quick look; the card marks the number partial)")
    p.add_argument("--run-dir", default=None,
                   help="run folder whose JSON records name the calibration data (the model folder is checked too)")
    p.add_argument("--force", action="store_true", help="report perplexity even on the calibration split")
    p.add_argument("--out", default=None, help="folder for ppl.json and ppl.md (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ppl.json")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.presets import resolve_data_dir
    from ..evaluation.perplexity import check_not_calibration, perplexity, resolve_protocol
    from ..io import check_results_target, write_results
    from ..models import load_for_eval, model_info

    if args.out:
        check_results_target(args.out, "ppl", args.overwrite)  # before the work
    data_dir = resolve_data_dir(args.data_dir)
    proto = resolve_protocol(args.preset, seq_len=args.seqlen, stride=args.stride, bos=args.bos)
    names = [d.strip() for d in args.data.split(",") if d.strip()]
    model_dir = Path(args.model) if Path(args.model).is_dir() else None
    overlaps = {}
    for name in names:  # refuse before loading anything
        split = args.split or proto.split_for(name)
        overlaps[name] = check_not_calibration(name, split, model_dir, args.run_dir, force=args.force)
    model, tok = load_for_eval(args.model, args.dtype, args.device, args.peft)
    results = []
    for name in names:
        r = perplexity(model, tok, name, proto, split=args.split, data_dir=data_dir, batch_size=args.batch_size,
                       max_tokens=args.max_tokens, progress=True)
        r["card"]["same_split_as_calibration"] = overlaps[name]
        results.append(r)
    lines = ["| dataset | split | ppl | preset | seq_len | stride | BOS | tokens | dtype |",
             "|---|---|---:|---|---:|---:|---|---:|---|"]
    for r in results:
        c = r["card"]
        lines.append(f"| {c['dataset']} | {c['split']} | {r['ppl']:.3f} | {c['preset']} | {c['seq_len']} | "
                     f"{c['stride']} | {c['bos_resolved']} | {c['tokens_scored']:,}{' (partial)' if c['partial'] else ''}"
                     f" | {c['dtype']} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        data = {"model": model_info(model, args.model, args.peft), "results": results}
        path = write_results(args.out, "ppl", data, f"# Perplexity: {args.model}\n\n{table}", args.overwrite)
        print(f"wrote {path}")
    return 0
