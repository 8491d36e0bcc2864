"""Healing methods: one registry mapping a name to what is trainable and how the result becomes a checkpoint.

Each method prepares a loaded model in place (freezing, untying, wrapping with PEFT) and later exports the
trained model as a plain ``PreTrainedModel`` that ``save_pretrained`` writes as a standard HF checkpoint. Adding
a method means one class and one :func:`register_method` call; the training engine never looks at names.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import parts
from ..errors import LayerpruneError
from ..prune.surgery import parse_layer_list
from .config import HealConfig

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Prepared:
    """A prepared model and what the method did to it (recorded in heal.json)."""

    model: Any
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportContext:
    """What export may need besides the trained model."""

    source: str  # the model folder that was healed (qlora reloads it in full precision)
    save_dtype: torch.dtype
    adapter_dir: Path | None = None  # where to write the adapter (lora family, when kept)


class HealMethod:
    """Base class: a method decides the trainable parameters (``prepare``) and the saved model (``export``)."""

    name = "base"
    uses_peft = False
    # Load-time needs: qlora loads quantized weights.
    quantized = False

    def check(self, cfg: HealConfig, device: str) -> None:
        """Fail early (one line) when the method cannot run here."""

    def load_kwargs(self, cfg: HealConfig, device: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments."""
        return {}

    def prepare(self, model: Any, cfg: HealConfig) -> Prepared:
        raise NotImplementedError

    def export(self, model: Any, cfg: HealConfig, ctx: ExportContext) -> nn.Module:
        """The trained model as a plain transformers model in ``ctx.save_dtype``."""
        return model.to(ctx.save_dtype)


METHODS: dict[str, HealMethod] = {}


def register_method(method: HealMethod) -> HealMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> HealMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise LayerpruneError(f"unknown heal method '{name}'; choose one of {', '.join(METHODS)}") from None


# ------------------------------------------------------------------------------------------------- helpers


def trainable_parameters(model: Any) -> int:
    """Distinct trainable parameters (a tied tensor counts once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def upcast_trainable(model: Any) -> None:
    """Half-precision trainable weights become fp32 (AdamW updates of 1e-5 vanish in bf16); frozen weights
    keep their load dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in _HALF:
            p.data = p.data.float()


def run_without_grad(module: Any) -> None:
    """Run ``module``'s forward under ``torch.no_grad``: a frozen prefix then records no autograd graph and
    stores no activations for backward. Patched per instance so state dicts and wrappers are unaffected."""
    if getattr(module, "_layerprune_nograd", False):
        return
    fwd = module.forward

    @functools.wraps(fwd)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fwd(*args, **kwargs)

    module.forward = forward
    setattr(module, "_layerprune_nograd", True)  # noqa: B010 (torch types module attributes as Tensors)


def untie_head(model: Any) -> bool:
    """Give the output head its own copy of a tied embedding matrix; returns whether it was tied.

    The config says ``tie_word_embeddings=False`` afterwards and transformers' tied-key map is cleared, so
    ``save_pretrained`` writes both tensors and ``from_pretrained`` does not tie them again.
    """
    p = parts(model)
    if not p.tied:
        return False
    p.head.weight = nn.Parameter(p.head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if getattr(model, "all_tied_weights_keys", None):
        model.all_tied_weights_keys = {}
    return True


def select_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """Layer indices (of the model being healed) named by ``lastK``, ``lm_head``/``norm_lmhead``, ``all`` or a
    list such as ``18,19,21`` / ``18-21``."""
    if isinstance(spec, (list, tuple)):
        idx = [int(i) for i in spec]
    else:
        s = str(spec).strip().lower()
        if s in ("lm_head", "norm_lmhead", "head", "none", ""):
            return []
        if s == "all":
            return list(range(num_layers))
        m = re.fullmatch(r"last(\d+)", s)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= num_layers:
                raise LayerpruneError(f"--layers last{k}: the model has {num_layers} layers")
            return list(range(num_layers - k, num_layers))
        if not re.fullmatch(r"[\d,\s-]+", s):
            raise LayerpruneError(f"--layers '{spec}': use lastK, lm_head, all, or indices like 18,19,21")
        idx = parse_layer_list(s)
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise LayerpruneError(f"layer indices {bad} out of range: the model has {num_layers} layers "
                              f"(0..{num_layers - 1})")
    if len(set(idx)) != len(idx):
        raise LayerpruneError(f"duplicate layer indices in --layers: {spec}")
    return sorted(idx)


def linear_leaf_names(model: Any) -> list[str]:
    """Names (last path component) of the linear projections inside the decoder layers, from the modules
    themselves: nn.Linear (and its quantized subclasses) and GPT-2 style Conv1D."""
    from transformers.pytorch_utils import Conv1D

    names: set[str] = set()
    for layer in parts(model).layers:
        for name, mod in layer.named_modules():
            if name and isinstance(mod, (nn.Linear, Conv1D)):
                names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise LayerpruneError("no linear projections found in the decoder layers; give --lora-targets")
    return sorted(names)


def lora_target_regex(model: Any, names: list[str] | None = None) -> tuple[str, list[str]]:
    """A PEFT ``target_modules`` regex matching ``names`` only inside the decoder layer list (so a head or a
    vision tower with the same leaf name is never adapted)."""
    names = sorted(names) if names else linear_leaf_names(model)
    layers_path = parts(model).adapter.layers
    alts = "|".join(re.escape(n) for n in names)
    regex = rf"{re.escape(layers_path)}\.\d+\.(?:[^.]+\.)*(?:{alts})"
    hits = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    if not hits:
        raise LayerpruneError(f"LoRA targets {names} match no module inside the decoder layers")
    return regex, names


# ------------------------------------------------------------------------------------------------- methods


class PartialMethod(HealMethod):
    """The seed's partial-layer fine-tuning: final norm + head + the chosen decoder layers; all else frozen."""

    name = "partial"

    def prepare(self, model: Any, cfg: HealConfig) -> Prepared:
        p = parts(model)
        chosen = select_layers(cfg.layers, p.num_layers)
        was_tied = p.tied
        mode = cfg.tie_mode if was_tied else "untied"
        untied = untie_head(model) if mode == "untie" else False
        p = parts(model)
        model.requires_grad_(False)
        trainable: list[nn.Module] = ([p.head] if mode != "frozen" else []) + ([p.norm] if p.norm is not None else [])
        trainable += [p.layers[i] for i in chosen]
        for mod in trainable:
            mod.requires_grad_(True)
        # "both": the embedding lookup carries a gradient, so every layer below needs a backward pass.
        trains_embeddings = mode == "both"
        first = chosen[0] if chosen else p.num_layers
        if not trains_embeddings:
            # Embeddings and the layers below the first trained one need no gradient: run them without autograd
            # so no activation of the prefix is kept. Under "head" this also detaches the input-side lookup of
            # the shared matrix, which then trains through the head only.
            run_without_grad(p.embed)
            for i in range(first):
                run_without_grad(p.layers[i])
        upcast_trainable(model)
        if not trainable or trainable_parameters(model) == 0:
            raise LayerpruneError("nothing to train: --layers selects no layer and the head is frozen")
        # The frozen layers' outputs stay the same across epochs only when the embeddings do not train.
        moving = "the shared embedding matrix trains through the head, so the frozen layers' inputs change" \
            if mode == "head" else None
        info = {"layers": chosen, "layers_spec": cfg.layers if isinstance(cfg.layers, str) else list(cfg.layers),
                "tied_embeddings": was_tied, "tie_mode": mode, "untied": untied,
                "untie_extra_params": p.head.weight.numel() if untied else 0,
                "trains_input_embeddings": trains_embeddings or mode == "head",
                "frozen_prefix_layers": 0 if trains_embeddings else first,
                "prefix_changes": moving}
        return Prepared(model, info)


class FullMethod(HealMethod):
    """Every parameter trainable (a tied embedding/head matrix stays tied and is trained once)."""

    name = "full"

    def prepare(self, model: Any, cfg: HealConfig) -> Prepared:
        model.requires_grad_(True)
        upcast_trainable(model)
        return Prepared(model, {"tied_embeddings": parts(model).tied})


class LoraMethod(HealMethod):
    """LoRA via PEFT on every linear projection of the decoder layers; merged into the weights at export."""

    name = "lora"
    uses_peft = True
    use_dora = False

    def lora_config(self, model: Any, cfg: HealConfig) -> tuple[Any, list[str]]:
        from peft import LoraConfig

        regex, names = lora_target_regex(model, cfg.lora_targets)
        conf = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          task_type="CAUSAL_LM", target_modules=regex, use_dora=self.use_dora)
        return conf, names

    def prepare(self, model: Any, cfg: HealConfig) -> Prepared:
        from peft import get_peft_model

        conf, names = self.lora_config(model, cfg)
        self._before_peft(model, cfg)
        peft_model = get_peft_model(model, conf)
        return Prepared(peft_model, {"targets": names, "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                     "dropout": cfg.lora_dropout, "dora": self.use_dora})

    def _before_peft(self, model: Any, cfg: HealConfig) -> None:
        model.requires_grad_(False)

    def export(self, model: Any, cfg: HealConfig, ctx: ExportContext) -> nn.Module:
        if ctx.adapter_dir is not None:
            model.save_pretrained(ctx.adapter_dir)
        return model.merge_and_unload().to(ctx.save_dtype)


class DoraMethod(LoraMethod):
    """Weight-decomposed LoRA (PEFT ``use_dora``)."""

    name = "dora"
    use_dora = True


class QLoraMethod(LoraMethod):
    """LoRA over a 4-bit NF4 base (double quantisation, bf16 compute) via bitsandbytes.

    Export reloads the base in full precision and merges the trained adapter into it: merging into 4-bit
    weights would round the result to the 4-bit grid.
    """

    name = "qlora"
    quantized = True

    def check(self, cfg: HealConfig, device: str) -> None:
        probe_bitsandbytes(device)

    def load_kwargs(self, cfg: HealConfig, device: str) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        return {"quantization_config": q, "device_map": {"": 0 if device == "cuda" else device}}

    def _before_peft(self, model: Any, cfg: HealConfig) -> None:
        from peft import prepare_model_for_kbit_training

        disable_cpu_packing(model)
        gc = True if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})

    def export(self, model: Any, cfg: HealConfig, ctx: ExportContext) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        from ..models import load_model

        if ctx.adapter_dir is not None:
            model.save_pretrained(ctx.adapter_dir)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(model).items()}
        base = load_model(ctx.source, dtype=torch.float32)
        conf, _ = self.lora_config(base, cfg)
        fresh = get_peft_model(base, conf)
        result = set_peft_model_state_dict(fresh, state)
        if getattr(result, "unexpected_keys", None):
            raise LayerpruneError(f"adapter does not fit the full-precision base: {result.unexpected_keys[:3]}")  # type: ignore[attr-defined]
        return fresh.merge_and_unload().to(ctx.save_dtype)


def disable_cpu_packing(model: Any) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weight on the first CPU forward in eval mode (AVX512-BF16
    machines) and from then on uses a kernel with no autograd support: after one evaluation pass, gradients
    stop flowing through the frozen 4-bit layers and the adapters below them silently get none. Returns the
    number of layers changed.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            state = getattr(mod.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                weight: Any = mod.weight  # bitsandbytes' Params4bit carries the quant_state
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            n += 1
    return n


def probe_bitsandbytes(device: str) -> None:
    """Quantize a small tensor on ``device`` with bitsandbytes; any failure becomes one clear line."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise LayerpruneError(f"qlora needs bitsandbytes (pip install 'layerprune[qlora]'): "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                              ) from None
    dev = "cuda" if device.startswith("cuda") else device
    try:
        # What training does: an NF4 layer (double quant, bf16 compute) forward and backward on the device.
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
        layer = layer.to(dev)
        x = torch.randn(2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient through a 4-bit layer")
    except Exception as e:  # bitsandbytes raises RuntimeError/NotImplementedError/... per backend
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayerpruneError(f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit layers on "
                              f"{dev}: {msg}") from None


class DistillMethod(HealMethod):
    """Knowledge distillation from the unpruned teacher; trains what ``distill_base`` trains."""

    name = "distill"

    def base(self, cfg: HealConfig) -> HealMethod:
        if cfg.distill_base == "distill":
            raise LayerpruneError("distill_base cannot be 'distill'")
        return get_method(cfg.distill_base)

    def check(self, cfg: HealConfig, device: str) -> None:
        self.base(cfg).check(cfg, device)

    def load_kwargs(self, cfg: HealConfig, device: str) -> dict[str, Any]:
        return self.base(cfg).load_kwargs(cfg, device)

    def prepare(self, model: Any, cfg: HealConfig) -> Prepared:
        prep = self.base(cfg).prepare(model, cfg)
        prep.info["base_method"] = cfg.distill_base
        return prep

    def export(self, model: Any, cfg: HealConfig, ctx: ExportContext) -> nn.Module:
        return self.base(cfg).export(model, cfg, ctx)


def resolved(method: HealMethod, cfg: HealConfig) -> HealMethod:
    """The method whose behaviour applies (distill delegates to its base)."""
    return method.base(cfg) if isinstance(method, DistillMethod) else method


for _m in (PartialMethod(), LoraMethod(), DoraMethod(), QLoraMethod(), FullMethod(), DistillMethod()):
    register_method(_m)

__all__ = ["METHODS", "ExportContext", "HealMethod", "Prepared", "get_method", "linear_leaf_names",
           "disable_cpu_packing", "lora_target_regex", "probe_bitsandbytes", "register_method", "resolved", "run_without_grad",
           "select_layers", "trainable_parameters", "untie_head", "upcast_trainable"]
