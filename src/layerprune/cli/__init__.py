"""The ``layerprune`` command: one sub-command per stage; each lives in its own module with ``register``.

The modules parse flags, call the Python API and print; they hold no logic of their own. A user error
(:class:`~layerprune.errors.LayerpruneError`) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import warnings
from typing import Any, NoReturn

from ..errors import LayerpruneError

# Every module in this package with a ``register(subparsers)`` function is a sub-command; they are listed in
# pipeline order first, any others after.
PIPELINE_ORDER = ("info", "download", "score", "prune", "frontier", "search", "compensate", "heal", "eval", "ppl", "compare",
                  "bench", "generate", "chat", "export", "run", "sweep")


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("common",)}
    return [n for n in PIPELINE_ORDER if n in found] + sorted(found - set(PIPELINE_ORDER))


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line on stderr, ``layerprune: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        cmd = self.prog.removeprefix("layerprune").strip()
        where = f"{cmd}: " if cmd else ""
        hint = f" (see 'layerprune {cmd} --help')" if cmd else " (see 'layerprune --help')"
        self.exit(2, f"layerprune: error: {where}{message}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="layerprune", description="Depth (layer) pruning of HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _command_modules():
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerprune")
    except PackageNotFoundError:
        return "dev"


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: every atomic output removes its temporary folder on the way out."""


_sigterm = threading.Event()  # set on SIGTERM: a library that re-raises Ctrl-C as its own (Ray) loses the class


def _on_sigterm(signum: int, frame: Any) -> None:
    _sigterm.set()
    raise Terminated()


def _quiet_libraries() -> None:
    """Keep library chatter off stderr, so a user mistake is exactly one line: transformers' load reports and
    bars, and warnings that libraries log without a handler of their own (Python would print them through
    ``logging.lastResort``; e.g. ``kernels`` skipping a publisher check offline when bitsandbytes is imported)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())


def is_main_rank() -> bool:
    """Rank 0, or not launched by torchrun / accelerate launch (both set RANK)."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    _sigterm.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    if not verbose:
        _quiet_libraries()
    main_rank = is_main_rank()
    try:
        # Under torchrun every rank runs the command; only rank 0 reports (its lines, its error).
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            if not main_rank:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            if not verbose:
                warnings.simplefilter("ignore")
            rc = args.func(args)
        return int(rc or 0)
    except LayerpruneError as e:
        one_line = " ".join(str(e).split())  # the contract: exactly one line
        if main_rank:
            print(f"layerprune: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _sigterm.is_set():
            print("layerprune: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
            return 143
        print("layerprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
