"""``layerprune chat``: a local Gradio page that sends the same prompt to a pruned model and the dense one.

Each model streams its reply through its tokenizer's chat template (:func:`layerprune.generate.stream`), one
model after the other so each one's tokens/s is its own; every message starts a new conversation, so both models
see exactly the same input. Greedy by default; sampling is seeded. Needs the optional extra:
``pip install 'layerprune[ui]'`` (gradio).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LayerpruneError

UI_HINT = "layerprune chat needs the UI extra: pip install 'layerprune[ui]'"


@dataclass
class ChatModel:
    """One model on the page: its name, weights, tokenizer and what the page says about it."""

    name: str
    model: Any
    tokenizer: Any
    num_layers: int
    note: str  # e.g. "pruned: layers 23–29 of 30 removed (layerprune.json)"


def describe(path: str, model: Any) -> tuple[int, str]:
    """Layer count and the "pruned layers" note from ``layerprune.json`` (when the folder has one)."""
    from .arch import parts

    n = parts(model).num_layers
    manifest = Path(path) / "layerprune.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            removed = m.get("removed_layers") or []
            total = m.get("original_num_layers") or n + len(removed)
            note = f"pruned: layers {removed} of {total} removed ({m.get('method', 'manual')})"
            if m.get("heal"):
                note += f", healed ({m['heal'].get('method')})"
            return n, note
        except (ValueError, OSError):
            pass
    return n, "not pruned by layerprune (no layerprune.json)"


def load_chat_model(path: str, dtype: str = "auto", device: str | None = None) -> ChatModel:
    from .models import load

    model, tok = load(path, dtype=dtype, device=device)
    n, note = describe(path, model)
    return ChatModel(Path(path).name or path, model, tok, n, note)


def respond(models: list[ChatModel], prompt: str, mode: str = "greedy", temperature: float = 0.7,
            top_p: float = 0.95, max_new_tokens: int = 128, seed: int = 0) -> Iterator[list[str]]:
    """Stream every model's reply: yields ``[reply_1, ..., reply_n, speed_1, ..., speed_n]`` as it grows."""
    from .generate import stream

    if not prompt or not prompt.strip():
        raise LayerpruneError("empty prompt")
    replies = [""] * len(models)
    speeds = ["" for _ in models]
    for i, cm in enumerate(models):
        speeds[i] = "generating ..."
        for g in stream(cm.model, cm.tokenizer, prompt, max_new_tokens=int(max_new_tokens),
                        do_sample=mode == "sample", temperature=float(temperature), top_p=float(top_p),
                        seed=int(seed)):
            replies[i] = g.text
            yield [*replies, *speeds]
        speeds[i] = (f"{g.new_tokens} tokens in {g.seconds:.1f} s: **{g.tokens_per_s:.1f} tokens/s** · "
                     f"{cm.num_layers} layers · {'stop token' if g.stopped else 'max tokens'}")
        yield [*replies, *speeds]


def build_app(models: list[ChatModel]) -> Any:
    """The Gradio Blocks page (not launched)."""
    try:
        import gradio as gr
    except ImportError:
        raise LayerpruneError(UI_HINT) from None
    with gr.Blocks(title="layerprune chat") as app:
        gr.Markdown("## layerprune chat — the same prompt to every model\nEach message starts a new "
                    "conversation (the tokenizer's chat template), so the models see identical inputs.")
        outs, speeds = [], []
        with gr.Row():
            for i, cm in enumerate(models):
                with gr.Column():
                    gr.Markdown(f"### {cm.name}\n{cm.num_layers} layers — {cm.note}", elem_id=f"head-{i}")
                    outs.append(gr.Textbox(label=cm.name, lines=12, interactive=False, elem_id=f"out-{i}"))
                    speeds.append(gr.Markdown("", elem_id=f"speed-{i}"))
        prompt = gr.Textbox(label="Prompt", placeholder="Ask something ...", lines=2, elem_id="prompt")
        with gr.Row():
            mode = gr.Radio(["greedy", "sample"], value="greedy", label="decoding", elem_id="mode")
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top-p")
            max_new = gr.Slider(1, 1024, value=128, step=1, label="max new tokens", elem_id="max-new")
            seed = gr.Number(value=0, precision=0, label="seed")
        send = gr.Button("Send", variant="primary", elem_id="send")

        def run(p: str, m: str, t: float, tp: float, mx: float, s: float) -> Iterator[list[str]]:
            try:
                yield from respond(models, p, m, t, tp, int(mx), int(s))
            except LayerpruneError as e:
                raise gr.Error(str(e)) from None

        send.click(run, inputs=[prompt, mode, temperature, top_p, max_new, seed], outputs=[*outs, *speeds],
                   api_name="respond")
    return app


def launch(models: list[ChatModel], host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the page on ``host:port`` (local only by default; never a public share link)."""
    app = build_app(models)
    app.queue()
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
               quiet=True)
    return app


__all__ = ["UI_HINT", "ChatModel", "build_app", "describe", "launch", "load_chat_model", "respond"]
