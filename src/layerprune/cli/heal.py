"""``layerprune heal``: fine-tune or distil a pruned model and save a standard HF checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..errors import LayerpruneError
from ..healing.config import TIE_DEFAULT, TIE_MODES
from .common import add_data_dir_arg, add_dtype_arg, add_model_arg, add_out_args, add_verbose

_METHODS = ("partial", "lora", "dora", "qlora", "full", "distill")


def _val_size(text: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    return v if 0 < v < 1 else int(v)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heal", help="recover a pruned model: partial-layer / LoRA / DoRA / QLoRA / full fine-tuning, distillation",
        description="Fine-tune (or distil into) a pruned model on instruction data and save a standard HF "
                    "checkpoint with heal.json. Defaults follow the seed: AdamW, lr 1e-5, 100 warm-up steps, "
                    "2 epochs, batch 64 (micro 4), eval every 100 steps, best validation checkpoint kept.")
    add_model_arg(p)
    add_out_args(p)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="partial", choices=_METHODS, help="default: %(default)s")
    g.add_argument("--layers", default="last3",
                   help="partial: lastK, lm_head (norm + head only), all, or indices like 18,19,21 "
                        "(default: %(default)s)")
    g.add_argument("--tie-mode", default=TIE_DEFAULT, choices=TIE_MODES,
                   help="partial on a tied-embedding model: head = train the shared matrix through the head only "
                        "(stays tied, no larger); both = through both uses; frozen = head fixed; untie = the "
                        "head gets its own copy (+vocab x hidden parameters) (default: %(default)s)")
    g.add_argument("--untie", action=argparse.BooleanOptionalAction, default=None,
                   help="same as --tie-mode untie (--no-untie: the default tied mode)")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated module names (default: every linear layer in the decoder layers)")
    g.add_argument("--save-adapter", action="store_true", help="lora/dora/qlora: also keep the adapter in OUT/adapter")
    g.add_argument("--teacher", default=None,
                   help="distillation teacher (default for --method distill: the unpruned source model)")
    g.add_argument("--distill-base", default="partial", choices=[m for m in _METHODS if m != "distill"],
                   help="what --method distill trains (default: %(default)s)")
    g.add_argument("--distill-temperature", type=float, default=2.0)
    g.add_argument("--distill-weight", type=float, default=0.5, help="weight of the KL term (LM loss: 1 - w)")
    g.add_argument("--distill-shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="the teacher reuses the student's frozen layers when they are its own first layers "
                        "(default: on)")

    d = p.add_argument_group("data")
    d.add_argument("--data", default="alpaca",
                   help="preset (alpaca, dolly), local JSON/JSONL/Parquet file or folder, or Hub id "
                        "(default: %(default)s)")
    add_data_dir_arg(d)
    d.add_argument("--template", default=None, choices=("alpaca", "dolly", "chat"),
                   help="prompt template (default: the dataset format's own)")
    d.add_argument("--fields", default=None, help="field mapping, e.g. instruction=question,input=ctx,output=answer")
    d.add_argument("--train-on-inputs", action="store_true", help="also train on the prompt tokens")
    d.add_argument("--cutoff-len", type=int, default=256)
    d.add_argument("--overflow", default="truncate", choices=("truncate", "drop"),
                   help="samples longer than the cutoff (default: %(default)s)")
    d.add_argument("--val-size", type=_val_size, default=None,
                   help="validation rows (or a fraction); default 2000 Alpaca / 200 Dolly, capped on small sets")
    d.add_argument("--max-train-samples", type=int, default=None)
    d.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="padding-free micro-batches (default: on when the model is checked to support it and a "
                        "micro-batch holds at most 8192 tokens)")
    d.add_argument("--prefix-cache-gb", type=float, default=None,
                   help="partial: keep the frozen layers' outputs (CPU memory, GiB) so later epochs skip them; "
                        "0 turns it off (default: half the memory available at the start)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=2.0)
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=64, help="global batch (default: %(default)s)")
    t.add_argument("--micro-batch-size", type=int, default=4, help="per process and pass (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--lr-scheduler", default="linear")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--optim", default=None, help="Trainer optimizer name (default: the Trainer's AdamW, fused on torch >= 2.8; "
                                                 "paged_adamw_8bit for qlora on CUDA)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--eval-steps", type=int, default=100)
    t.add_argument("--save-steps", type=int, default=None, help="default: --eval-steps")
    t.add_argument("--save-total-limit", type=int, default=2)
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--eval-batch-size", type=int, default=None)
    t.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip measuring the validation loss before training")
    t.add_argument("--checkpoint-dir", default=None, help="default: OUT.checkpoints")
    t.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint folder after success")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint of an interrupted run")
    t.add_argument("--fsdp", default=None,
                   help="FSDP under torchrun for full/partial, e.g. 'full_shard auto_wrap' (see docs/healing.md)")
    t.add_argument("--fsdp-config", default=None, help="FSDP settings JSON file passed to the Trainer")
    add_dtype_arg(t)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_verbose(p)
    p.set_defaults(func=run)


_OPTION_KEYS = ("method", "layers", "tie_mode", "untie", "lora_r", "lora_alpha", "lora_dropout", "save_adapter", "teacher",
                "distill_base", "distill_temperature", "distill_weight", "distill_shared_prefix", "data", "data_dir", "template", "fields",
                "train_on_inputs", "cutoff_len", "overflow", "val_size", "max_train_samples", "packing", "prefix_cache_gb", "epochs",
                "max_steps", "batch_size", "micro_batch_size", "lr", "warmup_steps", "lr_scheduler",
                "weight_decay", "max_grad_norm", "optim", "gradient_checkpointing", "seed", "eval_steps",
                "save_steps", "save_total_limit", "logging_steps", "eval_batch_size", "eval_before",
                "checkpoint_dir", "keep_checkpoints", "resume", "fsdp", "fsdp_config", "dtype", "device", "overwrite",
                "progress")


def run(args: argparse.Namespace) -> int:
    from ..healing import heal

    opts = {k: getattr(args, k) for k in _OPTION_KEYS}
    if args.lora_targets:
        opts["lora_targets"] = [s.strip() for s in args.lora_targets.split(",") if s.strip()]
    if args.method != "distill" and args.teacher is None and args.distill_base != "partial":
        raise LayerpruneError("--distill-base applies to --method distill only")
    try:
        r = heal(args.model, args.out, **opts)
    except KeyboardInterrupt:
        print("layerprune: heal stopped; the same command with --resume continues from the last checkpoint",
              file=sys.stderr)
        raise

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(f"healed with {r['method']}: {r['trainable_params']:,} trainable parameters, {r['steps']} steps, "
          f"{r['tokens_per_s']:.0f} tokens/s")
    print(f"validation loss {f(r['val_loss_before'])} -> {f(r['final_val_loss'])} (best, step {r['best_step']})"
          f" -> {args.out}")
    return 0
