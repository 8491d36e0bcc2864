"""``layerprune export``: a (pruned) checkpoint as GGUF for llama.cpp, through llama.cpp's own converter."""

from __future__ import annotations

import argparse
import json

from .common import add_verbose, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from ..export import LLAMA_CPP_PYTHON, OUTTYPES

    p = sub.add_parser("export", epilog="example:\n  layerprune export runs/demo/model --gguf smollm2-23l-f16.gguf --outtype f16 --check",
                       formatter_class=argparse.RawDescriptionHelpFormatter, help="convert a checkpoint to GGUF (llama.cpp's converter) and check it",
                       description="Write OUT.gguf with convert_hf_to_gguf.py of the llama.cpp vendored by "
                                   f"llama-cpp-python {LLAMA_CPP_PYTHON}; --check loads it with llama-cpp-python "
                                   "and compares its greedy tokens with transformers'.")
    p.add_argument("model", nargs="?", help="local model folder or 'default'")
    p.add_argument("--gguf", metavar="OUT.gguf", help="output file (written atomically)")
    p.add_argument("--fetch-converter", action="store_true",
                   help=f"download llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist from the package index once and keep "
                        "its converter in the cache (make setup does it); nothing is downloaded otherwise")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="tensor type (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    p.add_argument("--check", action="store_true",
                   help="load the GGUF with llama-cpp-python and compare greedy tokens (pip install "
                        "'layerprune[gguf]')")
    p.add_argument("--prompt", default="The capital of France is", help="prompt of --check")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens compared by --check (default: 16)")
    add_verbose(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from ..errors import LayerpruneError
    from ..export import check_gguf, export_gguf

    if args.fetch_converter:
        from ..export import converter_dir

        print(f"llama.cpp converter: {converter_dir(fetch=True)}")
        if args.model is None:
            return 0
    if args.model is None or args.gguf is None:
        raise LayerpruneError("give MODEL and --gguf OUT.gguf (or only --fetch-converter)")
    if args.check and importlib.util.find_spec("llama_cpp") is None:  # before converting anything
        raise LayerpruneError("--check needs llama-cpp-python: pip install 'layerprune[gguf]'")
    res = export_gguf(args.model, args.gguf, outtype=args.outtype, overwrite=args.overwrite)
    print(f"wrote {res['gguf']} ({res['bytes'] / 1e6:.1f} MB, {res['outtype']}) with {res['converter']}")
    if args.check:
        c = check_gguf(args.gguf, args.model, args.prompt, args.new_tokens)
        print(f"greedy agreement with transformers: {c['agreement']:.0%} of {len(c['transformers'])} tokens "
              f"(first {c['matching_prefix']} identical)")
        print(json.dumps({"transformers": c["transformers_text"], "llama_cpp": c["llama_cpp_text"]},
                         ensure_ascii=False))
    return 0
