"""``layerprune chat``: a local web page to talk to a pruned model next to the dense one."""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import LayerpruneError
from .common import add_device_arg, add_dtype_arg, add_model_arg, add_verbose, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", epilog="example:\n  layerprune chat runs/demo/model --compare default     # then open http://127.0.0.1:7860/",
                       formatter_class=argparse.RawDescriptionHelpFormatter, help="a local Gradio page: the same prompt to the model and --compare DENSE",
                       description="Serve a page on 127.0.0.1 that streams every model's reply to the same prompt "
                                   "(chat template, greedy or seeded sampling) with tokens/s and layer counts. "
                                   "Needs: pip install 'layerprune[ui]'.")
    add_model_arg(p)
    p.add_argument("--compare", metavar="DENSE", default=None, help="a second model shown beside it (the dense one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine)")
    p.add_argument("--port", type=port_arg, default=7860, help="port, 1-65535 (default: %(default)s)")
    add_device_arg(p)
    add_dtype_arg(p)
    add_verbose(p)
    p.set_defaults(func=run)


def port_arg(text: str) -> int:
    """argparse type: a TCP port number."""
    v = positive_int(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {v}")
    return v


def check_port_free(host: str, port: int) -> None:
    """Bind and release ``host:port`` now, so a taken port or an unknown host is one line before the load."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        raise LayerpruneError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or "
                              "--host)") from None


def run(args: argparse.Namespace) -> int:
    from ..chat import UI_HINT, launch, load_chat_model
    from ..models import resolve_model

    if importlib.util.find_spec("gradio") is None:
        raise LayerpruneError(UI_HINT)
    paths = [args.model] + ([args.compare] if args.compare else [])
    for p in paths:
        resolve_model(p)  # a wrong path fails before any load
    check_port_free(args.host, args.port)
    models = [load_chat_model(p, args.dtype, args.device) for p in paths]
    print(f"layerprune chat on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    launch(models, host=args.host, port=args.port)
    return 0
