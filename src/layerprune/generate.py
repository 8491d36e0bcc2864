"""Text generation for a quick look at a (pruned) model: greedy by default, the tokenizer's own chat template and
stop tokens (never the hard-coded ids of one model family)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LayerpruneError


@dataclass
class Generation:
    """One generated reply and how it was produced."""

    text: str
    prompt_text: str  # what the model actually saw (after the chat template)
    new_tokens: int
    stopped: bool  # ended on a stop token rather than at max_new_tokens
    seconds: float
    chat: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _ids(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x if i is not None]


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """The tokenizer's eos and pad ids, plus any eos ids in the model's generation config (chat models often
    list their end-of-turn token there, e.g. Llama-3's <|eot_id|>)."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None)) + _ids(getattr(tokenizer, "pad_token_id", None))
    gen_cfg = getattr(model, "generation_config", None)
    ids += _ids(getattr(gen_cfg, "eos_token_id", None))
    return list(dict.fromkeys(ids))


def build_prompt(tokenizer: Any, prompt: str, chat: bool | None = None) -> tuple[str, bool]:
    """The text to tokenize and whether the chat template was used.

    ``chat=None`` uses the template when the tokenizer has one; ``True`` requires it; ``False`` never uses it.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise LayerpruneError("the tokenizer has no chat template (use --no-chat-template)")
    if chat is False or not has_template:
        return prompt, False
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text, True


def _prepare(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, do_sample: bool, temperature: float,
             top_p: float, top_k: int | None, chat: bool | None) -> tuple[dict[str, Any], Any, str, bool, list[int]]:
    """Encoded prompt, generation config, prompt text, whether the chat template was used, stop ids."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise LayerpruneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise LayerpruneError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    text, used_chat = build_prompt(tokenizer, prompt, chat)
    # The chat template already writes the BOS/special tokens it wants; a raw prompt gets the tokenizer's own.
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not used_chat)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    # Values set here win over the checkpoint's generation_config (which only fills the unset ones), so a
    # checkpoint that defaults to sampling still decodes greedily unless asked.
    sampling: dict[str, Any] = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    if do_sample and top_k is not None:
        sampling["top_k"] = top_k
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=stops or None,
                               pad_token_id=pad, **sampling)
    return enc, gen_cfg, text, used_chat, stops


def _seeded_generate(model: Any, enc: dict[str, Any], gen_cfg: Any, seed: int, **kw: Any) -> Any:
    device = next(model.parameters()).device
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
        torch.manual_seed(seed)  # the caller's RNG state is restored on exit
        return model.generate(**enc, generation_config=gen_cfg, **kw)


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int = 0,
             chat: bool | None = None) -> Generation:
    """Generate a reply to ``prompt``; see :func:`generate_text`. Returns text plus token count and timing."""
    enc, gen_cfg, text, used_chat, stops = _prepare(model, tokenizer, prompt, max_new_tokens, do_sample,
                                                    temperature, top_p, top_k, chat)
    start = time.perf_counter()
    out = _seeded_generate(model, enc, gen_cfg, seed)
    seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = bool(new) and new[-1] in stops
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_text=text,
                      new_tokens=len(new), stopped=stopped, seconds=seconds, chat=used_chat)


def greedy_ids(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, chat: bool | None = None
               ) -> list[int]:
    """The greedy continuation's token ids (chat template when the tokenizer has one)."""
    enc, gen_cfg, _, _, _ = _prepare(model, tokenizer, prompt, max_new_tokens, False, 1.0, 1.0, None, chat)
    out = _seeded_generate(model, enc, gen_cfg, 0)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def stream(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int = 0,
           chat: bool | None = None) -> Iterator[Generation]:
    """:func:`generate`, yielding the reply so far after every new token (for a UI); the last item is final."""
    from transformers import TextIteratorStreamer

    enc, gen_cfg, text, used_chat, stops = _prepare(model, tokenizer, prompt, max_new_tokens, do_sample,
                                                    temperature, top_p, top_k, chat)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["out"] = _seeded_generate(model, enc, gen_cfg, seed, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e
            streamer.end()

    start = time.perf_counter()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    reply, pieces = "", 0
    for piece in streamer:
        reply += piece
        pieces += 1
        yield Generation(reply, text, pieces, False, time.perf_counter() - start, used_chat)
    thread.join()
    if "error" in result:
        raise result["error"]
    seconds = time.perf_counter() - start
    new = result["out"][0, enc["input_ids"].shape[1]:].tolist()
    yield Generation(tokenizer.decode(new, skip_special_tokens=True), text, len(new),
                     bool(new) and new[-1] in stops, seconds, used_chat)


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, chat: bool | None = None) -> str:
    """The model's reply to ``prompt`` (new text only, special tokens stripped).

    Greedy unless ``do_sample``; sampling is reproducible through ``seed`` and leaves the global RNG untouched.
    ``chat=None`` wraps the prompt in the tokenizer's chat template (with the generation prompt) when it has one.
    Decoding stops at the tokenizer's eos/pad ids or after ``max_new_tokens`` new tokens.
    """
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, seed=seed, chat=chat).text


__all__ = ["Generation", "build_prompt", "generate", "generate_text", "greedy_ids", "stop_token_ids", "stream"]
