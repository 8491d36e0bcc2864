"""Layer-by-layer scoring from safetensors: one decoder layer's weights in memory at a time.

:class:`LayerwiseModel` loads the model WITHOUT its decoder layers (embeddings, final norm, head, rotary
embedding: transformers loads them from a config with zero layers, so checkpoint key conversions and weight
tying are handled as usual) and builds the decoder layers on the meta device from the config. A recording
pass runs the real model forward with lightweight recorder modules in place of the layers: it captures the
embeddings output ``X_0`` and the exact arguments (causal/sliding masks, rotary cos/sin, position ids) the
model gives each layer. :meth:`LayerwiseModel.sweep` then, for l = 0..L-1, reads layer l's tensors with
``safetensors.safe_open``, materialises the layer, pushes every calibration batch through it, hands inputs
and outputs to the metric consumers, and puts the layer back on the meta device.

Memory (see docs/scoring.md): non-layer weights + one decoder layer + the calibration hidden states
(``nsamples x seqlen x hidden``), plus per metric: ``ppl`` keeps one hidden-state copy per already-passed
layer (``L x nsamples x seqlen x hidden``), ``angular`` keeps the unit-normalised states of every layer in
float32 (``(L+1) x tokens x hidden``), ``bi``/``cka``/``magnitude`` keep O(L) numbers.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import adapter_for_type, layer_count, parts, sliced_config
from ..errors import LayerpruneError
from ._forward import (
    LayerCall,
    StopForward,
    call_layer,
    finish_fn,
    model_inputs,
    nll_from_hidden,
    record_call,
)
from .base import Metric, MetricResult, ScoreContext

INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading without the layers makes transformers report every layer tensor as unexpected: silence it."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


class _Recorder(nn.Module):
    """Stands in for decoder layer ``pos`` during the recording pass: records its call, returns its input."""

    def __init__(self, pos: int, owner: LayerwiseModel, template: nn.Module):
        super().__init__()
        self.pos = pos
        self.owner = owner  # a plain object: not registered as a submodule
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(template, attr) and not isinstance(getattr(template, attr), nn.Module):
                setattr(self, attr, getattr(template, attr))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = args[0] if args else kwargs["hidden_states"]
        rec = self.owner._recording
        if self.pos == 0:
            rec["x0"].append(h)
        elif h.shape != rec["x0"][-1].shape:
            raise LayerpruneError("layer-by-layer mode does not support this architecture's layer interface; "
                                  "use --mode memory or --mode dispatch")
        rec["calls"][self.pos].append(record_call(args, kwargs))
        if self.pos == self.owner.num_layers - 1:
            raise StopForward
        return h


@dataclass
class Prepared:
    """Calibration batches, the embeddings output per batch, and each layer's recorded arguments."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    x0: list[torch.Tensor]
    calls: list[list[LayerCall]]


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file."""
    index = path / INDEX_FILE
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LayerpruneError(f"layer-by-layer mode needs safetensors weights; none in {path}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[k] = f
    return out


def setattr_path(root: nn.Module, path: str, value: nn.Module) -> None:
    """``root.a.b.c = value`` for the dotted ``path``."""
    *head, last = path.split(".")
    obj: Any = root
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def resolve_local(model: str | Path) -> Path:
    """A local folder for ``model`` (a Hub id is downloaded when the Hub is reachable)."""
    from ..data.presets import hub_reachable
    from ..models import resolve_model

    p = Path(resolve_model(model))
    if p.is_dir():
        return p
    if not hub_reachable():
        raise LayerpruneError(f"layer-by-layer mode needs a local checkpoint folder: {model}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


class LayerwiseModel:
    """A causal LM whose decoder layers stay on disk until :meth:`layer` materialises one of them."""

    def __init__(self, model: str | Path, dtype: Any = "auto", device: str | torch.device | None = None,
                 attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..models import check_checkpoint_tensors, parse_dtype, read_config, resolve_device

        self.path = resolve_local(model)
        self.device = torch.device(resolve_device(str(device) if device is not None else None))
        self.num_layers = layer_count(read_config(self.path))  # not a library default for a missing count
        check_checkpoint_tensors(self.path)  # a layer read from disk must not lack a tensor
        cfg = AutoConfig.from_pretrained(self.path)
        self.config = cfg
        self.adapter = adapter_for_type(cfg.model_type)
        changes = sliced_config(cfg.to_dict(), [], self.adapter)
        zero = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(zero, k, v)
        kw: dict[str, Any] = {"dtype": parse_dtype(dtype)}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        try:
            with _quiet_transformers():
                # transformers loads the non-layer weights (key conversions, tying) into a 0-layer model...
                donor = AutoModelForCausalLM.from_pretrained(self.path, config=zero, **kw)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise LayerpruneError(f"cannot load {model} without its layers: {str(e).splitlines()[0]}") from None
        attn = donor.config._attn_implementation
        # ...which are moved into the full model built on the meta device (buffers such as rotary inv_freq are
        # computed for real): its forward then sees the full config (layer types, masks, rotary variants).
        with init_empty_weights(include_buffers=False), _quiet_transformers():
            shell = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn,
                                                     dtype=donor.dtype)
        _missing, unexpected = shell.load_state_dict(donor.state_dict(), strict=False, assign=True)
        if unexpected:
            raise LayerpruneError(f"layer-by-layer mode: unexpected non-layer tensors {unexpected[:3]}")
        if parts(donor).tied:
            p = parts(shell)
            p.head.weight = p.embed.weight
        del donor
        p = parts(shell)
        self.layers = p.layers
        left = [n for n, t in shell.named_parameters() if t.device.type == "meta"
                and not n.startswith(self.adapter.layers + ".")]
        if left:
            raise LayerpruneError(f"layer-by-layer mode: weights not found in the checkpoint: {left[:3]}")
        for layer in self.layers:
            layer.eval()
        # The shell's own ModuleList gets recorders; the real (meta) layers live on in self.layers.
        setattr_path(shell, self.adapter.layers, nn.ModuleList(
            [_Recorder(pos, self, self.layers[pos]) for pos in range(self.num_layers)]))
        self.shell = shell.to(self.device).eval()
        self.dtype = parts(self.shell).embed.weight.dtype
        self.files = _weight_files(self.path)
        self.prefix = self.adapter.layers + "."
        self._recording: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------- weights

    def layer_tensor_names(self, pos: int) -> dict[str, str]:
        """Name relative to the layer -> name in the checkpoint."""
        pre = f"{self.prefix}{pos}."
        return {k[len(pre):]: k for k in self.files if k.startswith(pre)}

    @contextlib.contextmanager
    def layer(self, pos: int) -> Iterator[nn.Module]:
        """Decoder layer ``pos`` with its weights read from disk onto the device; freed on exit."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        mod = self.layers[pos]
        names = self.layer_tensor_names(pos)
        expected = set(mod.state_dict().keys())
        if set(names) != expected:
            missing = sorted(expected - set(names))[:3]
            extra = sorted(set(names) - expected)[:3]
            raise LayerpruneError(f"layer-by-layer mode cannot map the checkpoint tensors of layer {pos} "
                                  f"(missing {missing}, unexpected {extra}); use --mode memory or dispatch")
        by_file: dict[Path, list[str]] = {}
        for rel, full in names.items():
            by_file.setdefault(self.files[full], []).append(rel)
        try:
            for f, rels in by_file.items():
                with safe_open(str(f), "pt", device="cpu") as fh:
                    for rel in rels:
                        t = fh.get_tensor(names[rel])
                        if t.is_floating_point():
                            t = t.to(self.dtype)
                        set_module_tensor_to_device(mod, rel, self.device, value=t)
            yield mod
        finally:
            for rel in names:
                set_module_tensor_to_device(mod, rel, "meta")

    # --------------------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def prepare(self, calib: Any, batch_size: int | None = None) -> Prepared:
        """The recording pass: embeddings output and every layer's arguments, per batch."""
        batches = calib.batches(batch_size)
        self._recording = {"x0": [], "calls": [[] for _ in range(self.num_layers)]}
        for ids, mask in batches:
            with contextlib.suppress(StopForward):
                self.shell(**model_inputs(self.shell, ids, mask))
        rec = self._recording
        self._recording = {}
        return Prepared(batches, rec["x0"], rec["calls"])

    def finish(self) -> Any:
        return finish_fn(self.shell)

    @torch.no_grad()
    def sweep(self, consumers: list[Consumer], calib: Any = None, batch_size: int | None = None,
              progress: bool = True) -> None:
        """Read each layer once, run the calibration batches through it, feed every consumer."""
        forward = any(c.needs_forward for c in consumers)
        if forward and calib is None:
            raise LayerpruneError("these metrics need calibration data")
        prep = self.prepare(calib, batch_size) if forward else None
        xs = list(prep.x0) if prep is not None else []
        todo = range(self.num_layers) if any(c.needs_layers for c in consumers) else range(0)
        for pos in tqdm(todo, desc="layer by layer", disable=not progress, leave=False):
            with self.layer(pos) as layer:
                out = [call_layer(layer, x, prep.calls[pos][b]) for b, x in enumerate(xs)] if prep else []
                for c in consumers:
                    c.on_layer(pos, layer, xs, out, prep)
            xs = out
        finish = self.finish()
        for c in consumers:
            c.on_end(xs, prep, finish)


class Consumer:
    """Receives each layer (materialised) with the hidden states entering and leaving it."""

    needs_forward = True
    needs_layers = True

    def on_layer(self, pos: int, layer: nn.Module, xs_in: list[torch.Tensor], xs_out: list[torch.Tensor],
                 prep: Prepared | None) -> None:
        pass

    def on_end(self, xs_final: list[torch.Tensor], prep: Prepared | None, finish: Any) -> None:
        pass

    def results(self) -> list[MetricResult]:
        raise NotImplementedError


class CollectorConsumer(Consumer):
    """bi / angular / cka: the same collectors as the in-memory hooks, fed layer-major."""

    def __init__(self, metrics: list[Metric], ctx: ScoreContext, calib: Any):
        self.metrics, self.ctx, self.calib = metrics, ctx, calib
        self.cols = [m.collector(ctx.num_layers) for m in metrics]  # type: ignore[attr-defined]

    def on_layer(self, pos: int, layer: nn.Module, xs_in: list[torch.Tensor], xs_out: list[torch.Tensor],
                 prep: Prepared | None) -> None:
        assert prep is not None
        for b, (x_in, x_out) in enumerate(zip(xs_in, xs_out)):
            for c in self.cols:
                c.update(pos, b, x_in, x_out, prep.batches[b][1])

    def results(self) -> list[MetricResult]:
        return [m.finalize(c, self.ctx, self.calib) for m, c in zip(self.metrics, self.cols)]  # type: ignore


class PerplexityConsumer(Consumer):
    """Remove-one perplexity in one sweep: branch i (layer i skipped) starts as layer i's input and is then
    carried through every later layer while that layer is in memory. Same layer calls as prefix reuse."""

    def __init__(self, metrics: list[Metric], ctx: ScoreContext, calib: Any):
        self.metrics, self.ctx, self.calib = metrics, ctx, calib
        self.branches: dict[int, list[torch.Tensor]] = {}
        self.nll: list[float] = []
        self.base = 0.0
        self.count = 0

    def on_layer(self, pos: int, layer: nn.Module, xs_in: list[torch.Tensor], xs_out: list[torch.Tensor],
                 prep: Prepared | None) -> None:
        assert prep is not None
        for i, hs in self.branches.items():
            self.branches[i] = [call_layer(layer, h, prep.calls[pos][b]) for b, h in enumerate(hs)]
        self.branches[pos] = list(xs_in)

    def on_end(self, xs_final: list[torch.Tensor], prep: Prepared | None, finish: Any) -> None:
        assert prep is not None
        for b, h in enumerate(xs_final):
            v, c = nll_from_hidden(finish, h, *prep.batches[b])
            self.base += v
            self.count += c
        for i in range(self.ctx.num_layers):
            hs = self.branches.pop(i)
            self.nll.append(sum(nll_from_hidden(finish, h, *prep.batches[b])[0] for b, h in enumerate(hs)))

    def results(self) -> list[MetricResult]:
        return [m.from_nll(self.nll, self.count, self.base, self.ctx, self.calib, "layerwise-prefix-reuse")  # type: ignore
                for m in self.metrics]


class MagnitudeConsumer(Consumer):
    needs_forward = False

    def __init__(self, metrics: list[Metric], ctx: ScoreContext):
        self.metrics, self.ctx = metrics, ctx
        self.vals: list[list[float]] = [[] for _ in metrics]
        self.names: list[str] = []

    def on_layer(self, pos: int, layer: nn.Module, xs_in: list[torch.Tensor], xs_out: list[torch.Tensor],
                 prep: Prepared | None) -> None:
        for k, m in enumerate(self.metrics):
            v, self.names = m.score_layer(layer)  # type: ignore[attr-defined]
            self.vals[k].append(v)

    def results(self) -> list[MetricResult]:
        return [m.finish(v, self.names, self.ctx) for m, v in zip(self.metrics, self.vals)]  # type: ignore


class StaticConsumer(Consumer):
    needs_forward = False
    needs_layers = False

    def __init__(self, cls: Any, metrics: list[Metric], ctx: ScoreContext):
        self.cls, self.metrics, self.ctx = cls, metrics, ctx

    def results(self) -> list[MetricResult]:
        return self.cls.run(self.metrics, None, None, self.ctx)

