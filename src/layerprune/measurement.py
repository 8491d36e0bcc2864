"""Efficiency measurement: parameters, analytic MACs, memory, prefill latency and decode throughput.

MACs (multiply-accumulates) for one sequence of ``T`` tokens, counted from the config (see docs/evaluation.md):

    per layer  = T·h·(n_q·d)  + 2·T·h·(n_kv·d)  + T·(n_q·d)·h       q, k, v (GQA-sized), o projections
               + m·T·h·i                                            MLP; m = 3 gated (SwiGLU/GeGLU), 2 plain
               + 2·n_q·T²·d                                         scores Q·Kᵀ and weights·V (dense T×T)
    total      = L·(per layer) + T·h·V                              + lm_head on every position

with h hidden size, d head dim, n_q / n_kv query / key-value heads, i MLP width, V vocabulary, L layers.
Norms, activations, rotary embeddings, softmax, biases and residual adds are element-wise and not counted
(a few tenths of a percent); embedding look-ups are not MACs. Attention is counted dense (T×T) because the
eager/SDPA kernels compute the full product and mask afterwards; causal or sliding masks do not reduce it.
The count is cross-checked against ``torch.utils.flop_counter`` in the tests (within 1%).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LayerpruneError

# ---------------------------------------------------------------------------------------------------------------
# Parameters and weight memory

def param_counts(model: Any) -> dict[str, int]:
    """Total, embedding and non-embedding parameter counts (tied weights counted once).

    ``embedding`` = token (+ learned position) embeddings; ``head`` = an untied output head (0 when tied);
    ``non_embedding`` = total − embedding − head, i.e. the decoder layers and norms (Kaplan et al.).
    """
    from .models import count_parameters

    total = count_parameters(model)
    emb_params: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb_params[id(m.weight)] = m.weight.numel()
    head = 0
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    if out is not None and getattr(out, "weight", None) is not None and id(out.weight) not in emb_params:
        head = out.weight.numel() + (out.bias.numel() if getattr(out, "bias", None) is not None else 0)
    embedding = sum(emb_params.values())
    layers = 0
    try:
        from .arch import parts

        layers = sum(p.numel() for p in parts(model).layers.parameters())
    except LayerpruneError:
        pass
    return {"total": total, "embedding": embedding, "head": head, "non_embedding": total - embedding - head,
            "layers": layers}


def weight_bytes(model: Any) -> int:
    """Bytes held by distinct parameters and buffers (what stays resident while serving)."""
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


# ---------------------------------------------------------------------------------------------------------------
# Analytic MACs

def _cfg(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def shape_of(config: Any) -> dict[str, Any]:
    """The dimensions the MAC formula needs, read from a HF config (text config for multimodal ones)."""
    c = _cfg(config)
    if isinstance(c.get("text_config"), dict) and "hidden_size" not in c:
        c = c["text_config"]
    mtype = str(c.get("model_type", ""))
    h = c.get("hidden_size", c.get("n_embd", c.get("d_model")))
    n_q = c.get("num_attention_heads", c.get("n_head"))
    L = c.get("num_hidden_layers", c.get("n_layer"))
    if h is None or n_q is None or L is None:
        raise LayerpruneError(f"config of type '{mtype}' lacks hidden size / heads / layers for the MAC count")
    n_kv = c.get("num_key_value_heads") or n_q
    d = c.get("head_dim") or h // n_q
    i = c.get("intermediate_size") or c.get("ffn_dim") or c.get("n_inner") or 4 * h
    from .arch import ADAPTERS

    known = ADAPTERS[mtype].gated_mlp if mtype in ADAPTERS else None
    gated = known if known is not None else str(c.get("hidden_act", "")).endswith("glu")
    return {"model_type": mtype, "hidden": int(h), "heads": int(n_q), "kv_heads": int(n_kv), "head_dim": int(d),
            "intermediate": int(i), "layers": int(L), "vocab": int(c["vocab_size"]), "gated_mlp": bool(gated),
            "proj_dim": c.get("word_embed_proj_dim") if mtype == "opt" else None}


def analytic_macs(config: Any, seq_len: int, batch: int = 1, num_layers: int | None = None) -> dict[str, int]:
    """MACs of one forward pass over ``batch`` sequences of ``seq_len`` tokens (formula in the module doc).

    Returns the breakdown per layer (``attn_proj``, ``attn_scores``, ``mlp``), ``per_layer``, ``layers``,
    ``lm_head`` and ``total``. ``num_layers`` overrides the config's layer count.
    """
    s = shape_of(config)
    T, h, d, nq, nkv = seq_len, s["hidden"], s["head_dim"], s["heads"], s["kv_heads"]
    L = s["layers"] if num_layers is None else num_layers
    attn_proj = T * h * nq * d + 2 * T * h * nkv * d + T * nq * d * h
    attn_scores = 2 * nq * T * T * d
    mlp = (3 if s["gated_mlp"] else 2) * T * h * s["intermediate"]
    per_layer = attn_proj + attn_scores + mlp
    head_in = h
    extra = 0
    if s["proj_dim"] and s["proj_dim"] != h:   # OPT-350m style projections around the decoder
        head_in = s["proj_dim"]
        extra = 2 * T * h * s["proj_dim"]
    lm_head = T * head_in * s["vocab"]
    total = L * per_layer + lm_head + extra
    out = {"attn_proj": attn_proj, "attn_scores": attn_scores, "mlp": mlp, "per_layer": per_layer,
           "layers": L * per_layer, "lm_head": lm_head, "other": extra, "total": total}
    return {k: v * batch for k, v in out.items()}


def decode_macs(config: Any, context: int, num_layers: int | None = None) -> int:
    """MACs to generate one token with a KV cache holding ``context`` tokens (batch 1)."""
    s = shape_of(config)
    h, d, nq, nkv = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"]
    L = s["layers"] if num_layers is None else num_layers
    per_layer = h * nq * d + 2 * h * nkv * d + nq * d * h + 2 * nq * (context + 1) * d \
        + (3 if s["gated_mlp"] else 2) * h * s["intermediate"]
    return L * per_layer + (s["proj_dim"] or h) * s["vocab"]


@torch.no_grad()
def profiled_macs(model: Any, seq_len: int, batch: int = 1) -> int:
    """MACs of one forward pass measured with ``torch.utils.flop_counter`` (FLOPs / 2; matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(3, max(4, vocab), (batch, seq_len), device=device,
                        generator=torch.Generator(device="cpu").manual_seed(0) if device.type == "cpu" else None)
    # The flop counter cannot size SDPA with grouped KV heads (enable_gqa): count the eager path, whose
    # matmuls are the same products, and restore the model's attention implementation afterwards.
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as fc:
            model(input_ids=ids, use_cache=False)
    finally:
        if switch:
            model.set_attn_implementation(before)
    return int(fc.get_total_flops() // 2)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory

class _RssPeak:
    """Peak resident memory of this process while active, sampled from /proc every ``period`` seconds (CPU)."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.period)

    def __enter__(self) -> _RssPeak:
        self.base = self.peak = _rss()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], tuple[float, float]]:
    """A function timing ``fn()``: (elapsed seconds, process CPU seconds). CUDA: CUDA events."""
    if device.type == "cuda":
        def run(fn: Callable[[], Any]) -> tuple[float, float]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            c = time.process_time()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0, time.process_time() - c
    else:
        def run(fn: Callable[[], Any]) -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - t, time.process_time() - c
    return run


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0], xs[0], xs[0]]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "iqr": q[2] - q[0],
            "rel_spread": (xs[-1] - xs[0]) / statistics.median(xs) if statistics.median(xs) else 0.0,
            "n": len(xs)}


def _inputs(model: Any, batch: int, seq_len: int) -> torch.Tensor:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(1234)
    # Ids above the usual special-token range so no BOS/EOS/pad shows up by accident.
    return torch.randint(min(10, vocab - 1), vocab, (batch, seq_len), generator=g).to(device)


@torch.no_grad()
def bench_speed(model: Any, *, seq_len: int = 64, batch: int = 1, new_tokens: int = 128, warmup: int = 2,
                repeats: int = 5, progress: bool = True) -> dict[str, Any]:
    """Prefill latency and decode throughput of ``model`` for ``batch`` random sequences of ``seq_len`` tokens.

    Prefill: one forward pass with a KV cache, as generation starts. Decode: ``generate`` greedy with
    ``min_new_tokens = max_new_tokens = new_tokens`` (fixed length, EOS cannot stop it early); decode time is
    the generate time minus the prefill time, and decode tokens/s counts the ``new_tokens − 1`` tokens that
    needed their own forward pass. Each run also records the process CPU time (``*_cpu_seconds``), the
    robust clock on a shared CPU when torch runs single-threaded. Each measurement: ``warmup`` untimed runs, then ``repeats`` timed ones
    (median and spread). CUDA times use CUDA events; peak memory is ``torch.cuda.max_memory_allocated`` on
    CUDA and the sampled resident-set peak above the pre-run level on CPU.
    """
    model.eval()
    device = next(model.parameters()).device
    ids = _inputs(model, batch, seq_len)
    mask = torch.ones_like(ids)
    timer = _timer(device)
    cfg = model.config
    pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                      pad_token_id=pad, use_cache=True)

    def prefill() -> None:
        model(input_ids=ids, attention_mask=mask, use_cache=True)

    def generate() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        if out.shape[1] != seq_len + new_tokens:  # pragma: no cover - guards the fixed-length premise
            raise LayerpruneError(f"generate produced {out.shape[1] - seq_len} tokens, expected {new_tokens}")

    total = (warmup + repeats) * 2
    bar = tqdm(total=total, desc=f"bench b={batch} T={seq_len}", disable=not progress, leave=False)
    res: dict[str, Any] = {"batch": batch, "seq_len": seq_len, "new_tokens": new_tokens, "warmup": warmup,
                           "repeats": repeats, "device": str(device)}
    for name, fn in (("prefill", prefill), ("generate", generate)):
        for _ in range(warmup):
            fn()
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times, cpu_times = [], []
        with _RssPeak() if device.type == "cpu" else _nullctx() as rss:
            for _ in range(repeats):
                wall, cpu = timer(fn)
                times.append(wall)
                cpu_times.append(cpu)
                bar.update(1)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            res[f"{name}_peak_memory_bytes"] = int(peak)
            res[f"{name}_activation_bytes"] = int(peak - base)
        else:
            assert rss is not None
            res[f"{name}_peak_memory_bytes"] = int(rss.peak)
            res[f"{name}_activation_bytes"] = int(max(0, rss.peak - rss.base))
        res[f"{name}_seconds"] = _stats(times)
        # Process CPU time: on a shared CPU with one thread this is the time the run would take alone.
        res[f"{name}_cpu_seconds"] = _stats(cpu_times)
    bar.close()
    pre = res["prefill_seconds"]["median"]
    gen = res["generate_seconds"]["median"]
    decode_time = max(gen - pre, 1e-9)
    res["prefill_tokens_per_s"] = batch * seq_len / pre
    res["decode_seconds"] = decode_time
    res["decode_tokens_per_s"] = batch * max(new_tokens - 1, 1) / decode_time
    res["generate_tokens_per_s"] = batch * new_tokens / gen
    res["memory_method"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "sampled RSS (/proc)"
    return res


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _threads() -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def measure(model: Any, *, seq_len: int = 64, batches: tuple[int, ...] = (1, 8), new_tokens: int = 128,
            warmup: int = 2, repeats: int = 5, timing: bool = True, progress: bool = True) -> dict[str, Any]:
    """Parameters, MACs (analytic for ``seq_len`` tokens, batch 1), weight memory and, with ``timing``, the
    prefill/decode benchmark for every batch size."""
    cfg = model.config
    n_layers = None
    try:
        from .arch import parts

        n_layers = parts(model).num_layers
    except LayerpruneError:
        pass
    macs = analytic_macs(cfg, seq_len, 1, n_layers)
    dtype = next(model.parameters()).dtype
    out: dict[str, Any] = {
        "model_type": str(getattr(cfg, "model_type", "")), "num_layers": n_layers,
        "dtype": str(dtype).replace("torch.", ""), "params": param_counts(model),
        "macs": {"seq_len": seq_len, "batch": 1, **macs,
                 "decode_per_token_at_context": {"context": seq_len + new_tokens // 2,
                                                 "macs": decode_macs(cfg, seq_len + new_tokens // 2, n_layers)}},
        "weight_memory_bytes": weight_bytes(model), "threads": _threads(),
    }
    if timing:
        out["speed"] = [bench_speed(model, seq_len=seq_len, batch=b, new_tokens=new_tokens, warmup=warmup,
                                    repeats=repeats, progress=progress) for b in batches]
    return out


def speedup(dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """Measured speedups of ``pruned`` over ``dense`` next to the analytic bounds (dense MACs / pruned MACs)."""
    bound_prefill = dense["macs"]["total"] / pruned["macs"]["total"]
    bound_decode = (dense["macs"]["decode_per_token_at_context"]["macs"]
                    / pruned["macs"]["decode_per_token_at_context"]["macs"])
    rows = []
    for d, p in zip(dense.get("speed", []), pruned.get("speed", []), strict=False):
        pre = d["prefill_seconds"]["median"] / p["prefill_seconds"]["median"]
        dec = p["decode_tokens_per_s"] / d["decode_tokens_per_s"]
        rows.append({"batch": d["batch"], "seq_len": d["seq_len"], "prefill_speedup": pre,
                     "prefill_bound": bound_prefill, "prefill_ratio_to_bound": pre / bound_prefill,
                     "decode_speedup": dec, "decode_bound": bound_decode, "decode_ratio_to_bound": dec / bound_decode})
    return {"analytic_bound_prefill": bound_prefill, "analytic_bound_decode": bound_decode,
            "params_ratio": dense["params"]["total"] / pruned["params"]["total"], "per_batch": rows}


def markdown(result: dict[str, Any], compare: dict[str, Any] | None = None, sp: dict[str, Any] | None = None) -> str:
    """bench results as markdown tables (one column per model when ``compare`` is given)."""
    cols = [("model", result)] + ([("dense", compare)] if compare is not None else [])

    def g(x: float) -> str:
        return f"{x / 1e9:.3f} G"

    def mb(x: float) -> str:
        return f"{x / 2**20:.1f} MiB"

    lines = ["| | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    rows = [("layers", lambda r: str(r["num_layers"])), ("params (total)", lambda r: f"{r['params']['total']:,}"),
            ("params (non-embedding)", lambda r: f"{r['params']['non_embedding']:,}"),
            (f"MACs ({result['macs']['seq_len']} tokens)", lambda r: g(r["macs"]["total"])),
            ("weight memory", lambda r: mb(r["weight_memory_bytes"]))]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r) for _, r in cols) + " |")
    for i, s in enumerate(result.get("speed", [])):
        b = s["batch"]
        entries = [
            (f"prefill latency b={b} (median, spread)",
             lambda r, i=i: f"{r['speed'][i]['prefill_seconds']['median'] * 1e3:.1f} ms "
                            f"(±{r['speed'][i]['prefill_seconds']['rel_spread'] * 50:.0f}%)"),
            (f"decode tokens/s b={b}", lambda r, i=i: f"{r['speed'][i]['decode_tokens_per_s']:.1f}"),
            (f"peak memory prefill b={b}", lambda r, i=i: mb(r['speed'][i]['prefill_peak_memory_bytes'])),
            (f"peak memory decode b={b}", lambda r, i=i: mb(r['speed'][i]['generate_peak_memory_bytes'])),
        ]
        for label, fn in entries:
            lines.append(f"| {label} | " + " | ".join(fn(r) if len(r.get("speed", [])) > i else "" for _, r in cols)
                         + " |")
    text = "\n".join(lines) + "\n"
    if sp:
        text += ("\n| batch | prefill speedup | bound | ratio | decode speedup | bound | ratio |\n"
                 "|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in sp["per_batch"]:
            text += (f"| {r['batch']} | {r['prefill_speedup']:.3f} | {r['prefill_bound']:.3f} | "
                     f"{r['prefill_ratio_to_bound']:.3f} | {r['decode_speedup']:.3f} | {r['decode_bound']:.3f} | "
                     f"{r['decode_ratio_to_bound']:.3f} |\n")
    return text
