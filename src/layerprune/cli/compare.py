"""``layerprune compare``: agreement of a pruned model with its dense teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_data_dir_arg, add_device_arg, add_dtype_arg, add_model_arg, add_verbose, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="KL and top-1 agreement with the dense teacher; changed MC answers",
                       description="Mean KL(teacher || pruned) per token and top-1 next-token agreement on held-out "
                                   "text; optionally the fraction of lm-eval multiple-choice answers that changed.")
    add_model_arg(p, "pruned")
    p.add_argument("--teacher", required=True, help="the dense model (folder, Hub id or 'default')")
    p.add_argument("--data", default="wikitext2", help="held-out text: wikitext2, ptb or a .jsonl/.txt file")
    p.add_argument("--split", default=None, help="split (default: test; PTB validation under the seed preset)")
    p.add_argument("--seqlen", type=int, default=128, help="window length (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=16384,
                   help="tokens of held-out text to use; 0 = all (default: %(default)s)")
    p.add_argument("--tasks", default=None, help="lm-eval tasks whose multiple-choice picks are compared, "
                                                 "e.g. arc_easy,hellaswag (default: none)")
    p.add_argument("--task-limit", type=positive_int, default=100, help="documents per task (default: %(default)s)")
    p.add_argument("--generate", type=positive_int, default=None, metavar="N",
                   help="generation agreement: greedy continuations of N held-out prompts (the Alpaca validation "
                        "instructions healing never trains on): exact match, common prefix, ROUGE-L")
    p.add_argument("--gen-tokens", type=positive_int, default=64, help="new tokens per prompt (default: 64)")
    p.add_argument("--prompts", default="alpaca", help="instruction data of --generate (default: alpaca)")
    add_data_dir_arg(p)
    add_dtype_arg(p)
    add_device_arg(p, "cpu, cuda ... (default: cuda if available)")
    p.add_argument("--run-dir", default=None, help="run folder with calibration records (see ppl)")
    p.add_argument("--force", action="store_true", help="allow held-out text that was used for calibration")
    p.add_argument("--out", default=None, help="folder for compare.json and compare.md (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing compare.json")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.presets import resolve_data_dir
    from ..evaluation.agreement import compare
    from ..evaluation.perplexity import PRESETS, check_not_calibration
    from ..evaluation.tasks import check_tasks
    from ..io import check_results_target, write_results
    from ..models import load_for_eval, model_info

    data_dir = resolve_data_dir(args.data_dir)
    split = args.split or PRESETS["seed"].split_for(args.data)
    model_dir = Path(args.pruned) if Path(args.pruned).is_dir() else None
    overlap = check_not_calibration(args.data, split, model_dir, args.run_dir, force=args.force)
    tasks = check_tasks(args.tasks, data_dir) if args.tasks else None  # before the KL pass, not after it
    prompts = None
    if args.generate:
        from ..data.instruct import heldout_prompts

        prompts = heldout_prompts(args.prompts, args.generate, data_dir=data_dir)
    if args.out:
        check_results_target(args.out, "compare", args.overwrite)
    teacher, tok = load_for_eval(args.teacher, args.dtype, args.device)
    pruned, _ = load_for_eval(args.pruned, args.dtype, args.device)
    res = compare(pruned, teacher, tok, args.data, split=split, data_dir=data_dir, seq_len=args.seqlen,
                  max_tokens=args.max_tokens or None, tasks=tasks, task_limit=args.task_limit)
    res["text"]["same_split_as_calibration"] = overlap
    if prompts:
        from ..evaluation.agreement import generation_agreement

        res["generation"] = generation_agreement(pruned, teacher, tok, prompts, new_tokens=args.gen_tokens)
    res["pruned"] = model_info(pruned, args.pruned)
    res["teacher"] = model_info(teacher, args.teacher)
    t = res["text"]
    lines = ["| metric | value |", "|---|---:|",
             f"| mean KL(teacher‖pruned) per token [nats] | {t['kl_teacher_pruned']:.4f} |",
             f"| top-1 next-token agreement | {t['top1_agreement']:.4f} |",
             f"| teacher NLL / pruned NLL | {t['teacher_nll']:.4f} / {t['pruned_nll']:.4f} |",
             f"| tokens ({t['dataset']} {t['split']}, seq {t['seq_len']}) | {t['tokens']:,} |"]
    for task, r in (res.get("multiple_choice") or {}).items():
        frac = r["changed_fraction"]
        lines.append(f"| {task}: changed MC answers ({r['documents']} docs) | "
                     f"{'n/a' if frac is None else f'{frac:.4f}'} |")
    g = res.get("generation")
    if g:
        lines += [f"| generation: exact match ({g['prompts']} prompts, {g['new_tokens']} tokens) | {g['exact_match']:.4f} |",
                  f"| generation: mean common prefix [tokens] | {g['mean_common_prefix_tokens']:.1f} |",
                  f"| generation: ROUGE-L vs dense | {g['rouge_l']:.4f} |"]
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.out:
        path = write_results(args.out, "compare", res, f"# Teacher agreement: {args.pruned} vs {args.teacher}\n\n"
                            f"{table}", args.overwrite)
        print(f"wrote {path}")
    return 0
