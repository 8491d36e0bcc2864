"""The README's screenshot of `layerprune chat`: the demo's pruned+healed SmolLM2 next to the dense one, driven
in headless chromium (the browser test's own driver). Run after `make demo`:

    python scripts/chat_screenshot.py [--pruned runs/demo/model] [--out docs/img/chat.png]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pruned", default=str(ROOT / "runs" / "demo" / "model"))
    ap.add_argument("--dense", default="default")
    ap.add_argument("--prompt", default="Give me three tips for staying healthy.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "chat.png"))
    args = ap.parse_args()

    from layerprune.chat import launch, load_chat_model
    from test_chat import drive

    models = [load_chat_model(args.pruned), load_chat_model(args.dense)]
    models[1].name = "SmolLM2-135M-Instruct (dense)"
    models[0].name = "demo: pruned + compensated + healed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(models, port=port, block=False)
    try:
        # The page's slider default is 128 new tokens; the screenshot keeps the default.
        replies = drive(f"http://127.0.0.1:{port}/", args.prompt, Path(args.out), timeout=600)
    finally:
        app.close()
    for m, r in zip(models, replies):
        print(f"--- {m.name}\n{r}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
