"""``layerprune eval``: the lm-eval zero-shot suite in process, online or from a local data folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LayerpruneError
from .common import (
    add_data_dir_arg,
    add_device_arg,
    add_dtype_arg,
    add_model_arg,
    add_verbose,
    batch_size_arg,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot lm-eval suite (MMLU, CMMLU, PIQA, OBQA, WinoGrande, HellaSwag, ARC)",
                       description="Run lm-evaluation-harness in process on the loaded model. With --data-dir (or "
                                   "$LAYERPRUNE_DATA) the built-in tasks read local files and need no network.")
    add_model_arg(p)
    p.add_argument("--peft", default=None, help="LoRA/PEFT adapter folder applied on top (not merged)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks/groups (default: mmlu,cmmlu,piqa,openbookqa,winogrande,"
                        "hellaswag,arc_easy,arc_challenge)")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default: %(default)s)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per requested task; a group (MMLU/CMMLU) spreads them over its subtasks. "
                        "A value < 1 is a fraction")
    p.add_argument("--limit-per-subtask", action="store_true",
                   help="apply --limit to every subtask, as lm-eval's own --limit does (MMLU 100 -> 5,700 docs)")
    p.add_argument("--batch-size", default="auto", type=batch_size_arg,
                   help="int or 'auto' (lm-eval's detection on GPU; 8 on CPU) (default: %(default)s)")
    add_data_dir_arg(p)
    add_dtype_arg(p)
    add_device_arg(p, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--parallelize", action="store_true",
                   help="let lm-eval load the model itself split over all visible GPUs (HF device_map); "
                        "for data parallelism run under 'accelerate launch $(which layerprune) eval ...' instead")
    p.add_argument("--model-args", default=None,
                   help="extra HFLM arguments when lm-eval loads the model, e.g. "
                        "'max_memory_per_gpu=20GB,offload_folder=/tmp/off' (implies lm-eval loading)")
    p.add_argument("--scoring", default="auto", choices=("auto", "lm-eval", "shared-prefix"),
                   help="log-likelihood loop: lm-eval's batched one, or shared-prefix (each context once on a KV "
                        "cache; same numbers to float rounding); auto = shared-prefix on CPU (default: auto)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document records in eval.json")
    p.add_argument("--out", default=None, help="folder for eval.json and eval.md (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing eval.json")
    add_verbose(p)
    p.set_defaults(func=run)


def _parse_model_args(text: str | None) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise LayerpruneError(f"--model-args entry '{part}' is not key=value")
        k, v = part.split("=", 1)
        low = v.strip().lower()
        out[k.strip()] = True if low == "true" else False if low == "false" else v.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from ..data.presets import resolve_data_dir
    from ..evaluation.harness import evaluate, markdown_table
    from ..evaluation.tasks import check_tasks
    from ..io import check_results_target, write_results
    from ..models import check_checkpoint_tensors, default_device, load_for_eval, model_info, resolve_model

    data_dir = resolve_data_dir(args.data_dir)
    if args.out:
        check_results_target(args.out, "eval", args.overwrite)  # before the evaluation, not after it
    check_tasks(args.tasks, data_dir, args.num_fewshot)
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise LayerpruneError("--limit >= 1 must be a whole number of documents")
        limit = int(limit)
    model_args = _parse_model_args(args.model_args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    lm_eval_loads = bool(args.parallelize or model_args or distributed)
    if lm_eval_loads:
        # lm-eval must load the model itself to shard it or to run one copy per process.
        model_args.setdefault("dtype", args.dtype)
        if args.parallelize:
            model_args["parallelize"] = True
        if args.peft:
            model_args["peft"] = args.peft
        if not args.parallelize:
            model_args.setdefault("device", args.device or default_device())
        model, tok = resolve_model(args.model), None
        if Path(model).is_dir():
            check_checkpoint_tensors(model)  # lm-eval's loader would re-initialise a missing tensor silently
        info = {"source": args.model, "peft": args.peft, "loaded_by": "lm-eval", "model_args": model_args}
    else:
        model, tok = load_for_eval(args.model, args.dtype, args.device, args.peft)
        info = model_info(model, args.model, args.peft)
    summary = evaluate(model, tok, args.tasks, num_fewshot=args.num_fewshot, limit=limit,
                       limit_per_subtask=args.limit_per_subtask, batch_size=args.batch_size, data_dir=data_dir,
                       model_args=model_args if lm_eval_loads else None, log_samples=args.log_samples,
                       scoring=args.scoring, verbose=args.verbose)
    if summary.get("rank"):  # other processes of a data-parallel launch stay silent
        return 0
    summary["model"] = info
    table = markdown_table(summary)
    print(table, end="")
    if args.out:
        path = write_results(args.out, "eval", summary, f"# Zero-shot evaluation: {args.model}\n\n{table}",
                            args.overwrite)
        print(f"wrote {path}")
    return 0
