"""``layerprune generate``: a quick look at what a (pruned) model writes, optionally next to another model."""

from __future__ import annotations

import argparse
import shutil
import textwrap

from ..generate import Generation, generate
from ..models import load_model, load_tokenizer
from .common import add_device_arg, add_dtype_arg, add_model_arg, add_verbose


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (greedy by default), optionally comparing models",
                       description="Generate a reply to --prompt. Uses the tokenizer's chat template when it has "
                                   "one and stops at the tokenizer's eos/pad tokens.")
    add_model_arg(p)
    p.add_argument("--prompt", required=True, help="the user message / text to continue")
    p.add_argument("--compare", metavar="OTHER_MODEL", help="also generate with this model (e.g. the dense one)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: the model's, else 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--side-by-side", action="store_true", help="with --compare: two columns instead of one after the other")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    add_device_arg(p, "cpu, cuda, cuda:1, mps (default: cpu)")
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def _run_one(name: str, args: argparse.Namespace) -> Generation:
    model = load_model(name, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(name)
    return generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                    chat=False if args.no_chat_template else None)


def _header(name: str, g: Generation) -> str:
    end = "stop token" if g.stopped else "max tokens"
    how = "chat template" if g.chat else "raw prompt"
    return f"=== {name} ({how}; {g.new_tokens} tokens, {g.tokens_per_s:.1f} tok/s, ended at {end}) ==="


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 120) -> str:
    """Two texts in two wrapped columns, each titled."""
    col = (width - 3) // 2
    cols = []
    for title, text in (left, right):
        lines = textwrap.wrap(title, col, break_on_hyphens=False) + ["-" * col]
        for para in text.splitlines() or [""]:
            lines += textwrap.wrap(para, col) or [""]
        cols.append(lines)
    n = max(len(c) for c in cols)
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in zip(*(c + [""] * (n - len(c)) for c in cols)))


def run(args: argparse.Namespace) -> int:
    first = _run_one(args.model, args)
    if not args.compare:
        print(first.text)
        return 0
    second = _run_one(args.compare, args)  # loaded after the first is freed: one model in memory at a time
    print(f"prompt: {args.prompt}\n")
    if args.side_by_side:
        width = max(60, shutil.get_terminal_size((120, 24)).columns)
        print(side_by_side((_header(args.model, first), first.text), (_header(args.compare, second), second.text),
                           width))
        return 0
    for name, g in ((args.model, first), (args.compare, second)):
        print(_header(name, g))
        print(g.text.rstrip())
        print()
    return 0
