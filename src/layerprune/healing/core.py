"""``heal()``: load a (pruned) model, prepare it with a method, train with the Trainer, save a plain checkpoint.

Order matters for failing fast: options, output folder and data are checked before the (slow) model load.
Only the main process writes the output; checkpoints live in ``<out>.checkpoints`` until the run succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..arch import parts
from ..data.instruct import (
    EncodedDataset,
    InstructData,
    PackCollator,
    PadCollator,
    build_instruct_data,
    pad_id_for,
)
from ..errors import LayerpruneError
from ..io import atomic_dir, check_out_dir, read_json, tmp_prefix, write_json
from ..models import (
    MANIFEST,
    count_parameters,
    library_versions,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model,
    save_pretrained_atomic,
)
from .checkpoints import checkpoints, finished_step, last_complete
from .config import HealConfig
from .distill import SharedPrefix, check_cached_vocab, check_vocab, load_teacher
from .methods import ExportContext, get_method, resolved, trainable_parameters
from .prefix_cache import PrefixCache
from .selfgen import self_count, self_generated
from .teacher_cache import FlushAtSave, TeacherCache, cache_root, weights_fingerprint
from .train import (
    PACK_AUTO_MAX_TOKENS,
    DivergenceGuard,
    EvalAtEnd,
    HealProgress,
    HealTrainer,
    PeakMemory,
    packing_problem,
    world_size,
)

HEAL_FILE = "heal.json"
TRACKING = "tracking"  # OUT/tracking: TensorBoard event files
RUN_FILE = "run.json"  # in the checkpoint folder: what a --resume must match
# Settings that do not change the result; a resume may differ in these.
_RUNTIME_KEYS = {"resume", "overwrite", "progress", "keep_checkpoints", "checkpoint_dir", "extra", "eval_before",
                 "report_to", "run_name"}
_STR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def heal(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, callbacks: list | None = None,
         **options: Any) -> dict[str, Any]:
    """Heal ``model_dir`` (usually a pruned checkpoint) and write a standard HF checkpoint to ``out_dir``.

    ``options`` are :class:`~layerprune.healing.config.HealConfig` fields (method, layers, data, epochs,
    max_steps, lr, ...). ``callbacks`` are extra ``transformers.TrainerCallback`` objects. Returns the
    heal.json content (also written beside the model; the pruned model's layerprune.json is carried over with a
    ``heal`` section added).
    """
    cfg = HealConfig.from_kwargs(**options)
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(model_dir, out_dir, cfg.processes, options, callbacks)
    with _quiet_hf_bars():
        return _Run(model_dir, out_dir, cfg, callbacks or []).execute()


def _launch(model_dir: str | os.PathLike, out_dir: str | os.PathLike, processes: int, options: dict[str, Any],
            callbacks: list | None) -> dict[str, Any]:
    """This heal under ``torchrun --standalone`` with ``processes`` processes (each runs :func:`heal` with the same
    options; rank 0 writes the output); returns the heal.json it wrote."""
    import collections
    import subprocess
    import sys

    if callbacks:
        raise LayerpruneError("callbacks cannot cross into torchrun's processes: heal with processes=1")
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with tempfile.TemporaryDirectory(prefix="layerprune-launch-") as tmp:
        spec = Path(tmp) / "heal.json"
        spec.write_text(json.dumps({"model_dir": str(model_dir), "out_dir": str(out_dir), "options": options},
                                   default=str))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "layerprune.healing.launch", str(spec)]
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr or ():  # shown as it comes (rank 0's progress), kept for the error
                sys.stderr.write(line)
                tail.append(line)
        code = proc.returncode
    if code != 0:
        said = [ln.split("layerprune: ", 1)[1] for ln in tail if "layerprune: " in ln]
        raise LayerpruneError(f"healing under torchrun ({processes} processes) failed: "
                              + (said[-1].strip() if said else f"exit {code}; its output is above"))
    return json.loads((Path(out_dir) / "heal.json").read_text())


@contextlib.contextmanager
def _quiet_hf_bars() -> Iterator[None]:
    """transformers' own load/save bars would interleave with the training bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _device(cfg: HealConfig) -> str:
    if cfg.device:
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise LayerpruneError("--device cuda requested but no CUDA device is available")
        return "cuda" if cfg.device.startswith("cuda") else cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint was saved in (the healed model is saved in it too); float32 when unknown."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    return _STR_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)


class _Run:
    def __init__(self, model_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: HealConfig,
                 callbacks: list):
        self.model_dir = model_dir
        self.out = Path(out_dir)
        self.cfg = cfg
        self.callbacks = callbacks
        self.method = get_method(cfg.method)
        self.behaviour = resolved(self.method, cfg)
        self.device = _device(cfg)
        self.ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else \
            self.out.resolve().with_name(self.out.resolve().name + ".checkpoints")
        self.dist: Any = None  # accelerate's PartialState, set up in execute()
        self.main = int(os.environ.get("RANK", "0")) == 0
        self.fresh_checkpoints = False

    def barrier(self) -> None:
        if self.dist is not None and self.dist.num_processes > 1:
            self.dist.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ stages

    def execute(self) -> dict[str, Any]:
        """Heal; a user error (bad option, divergence) leaves no checkpoint folder of a fresh run behind, so the
        corrected command is not refused. An interruption keeps it for ``--resume``."""
        try:
            return self._execute()
        except LayerpruneError:
            if self.fresh_checkpoints and self.main:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            raise

    def _execute(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        cfg = self.cfg
        check_out_dir(self.out, cfg.overwrite, (resolve_model(self.model_dir),))
        if world_size() > 1:
            # Join the process group now (the Trainer would later) so checkpoint-folder checks and writes are
            # ordered across processes.
            from accelerate import PartialState

            self.dist = PartialState(cpu=self.device == "cpu")
            self.main = self.dist.is_main_process
        src = resolve_model(self.model_dir)
        self.behaviour.check(cfg, self.device)
        from transformers import set_seed

        set_seed(cfg.seed)
        tok = load_tokenizer(src)
        data_arg, data_note = self._data_source(src, tok)
        data = build_instruct_data(tok, data_arg, data_dir=cfg.data_dir, template=cfg.template, fields=cfg.fields,
                                   cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs,
                                   overflow=cfg.overflow, val_size=cfg.val_size,
                                   max_train_samples=cfg.max_train_samples, seed=cfg.seed)
        data.info.update(data_note)
        resume_from = self._checkpoint_setup(src, data)

        load_dtype = parse_dtype(cfg.dtype)
        if load_dtype == "auto" and self.device == "cpu":
            load_dtype = torch.float32  # no autocast on CPU: train and keep weights in fp32
        model = load_model(src, dtype=load_dtype, **self.behaviour.load_kwargs(cfg, self.device))
        total_params = count_parameters(model)
        head = parts(model).head
        teacher, tcache, tcache_why = self._distill_source(src, load_dtype, data, tok,
                                                           int(parts(model).head.weight.shape[0]))
        if teacher is not None:
            check_vocab(model, teacher)
        if tcache is not None:
            check_cached_vocab(model, tcache)
        set_seed(cfg.seed)  # adapter initialisation is seeded
        prepared = self.method.prepare(model, cfg)
        trainable = trainable_parameters(prepared.model)
        if trainable == 0:
            raise LayerpruneError("nothing to train: the method left no trainable parameter")

        packing = self._packing(prepared.model, teacher, data, pad_id_for(tok))
        cache, cache_why = self._prefix_cache(prepared.model, prepared.info, packing["used"], data)
        share, share_why = self._shared_prefix(prepared.model, teacher, prepared.info)
        progress = HealProgress(enabled=cfg.progress, desc=f"heal {cfg.method}")
        trainer = self._trainer(prepared.model, tok, data, head, teacher, progress, packing["used"], cache, share,
                                tcache)
        val_before = self._val_before(trainer, data, resume_from)
        mem = PeakMemory(self.device)
        mem.start()
        t_train = time.perf_counter()
        if resume_from is not None and _finished(resume_from):
            # Killed after the last checkpoint (or during the final save): training is over. Train() would run
            # one more step; restore the final state and the best weights instead.
            _restore_finished(trainer, resume_from)
        else:
            trainer.train(resume_from_checkpoint=resume_from)
        train_wall = time.perf_counter() - t_train
        peak = mem.read()
        if tcache is not None:
            tcache.close()

        state = trainer.state
        logs = state.log_history
        train_losses = [e["loss"] for e in logs if "loss" in e]
        evals = [e["eval_loss"] for e in logs if "eval_loss" in e]
        best_step = None
        if state.best_model_checkpoint:
            try:
                best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                best_step = None
        ga = self._grad_accum()
        result: dict[str, Any] = {
            "method": cfg.method,
            "base_method": self.behaviour.name,
            "source_model": str(self.model_dir),
            "source_path": str(src),
            "trainable_params": trainable,
            "total_params": total_params,
            "trainable_fraction": trainable / total_params if total_params else None,
            "method_info": prepared.info,
            "data": data.info,
            "data_fingerprint": data.fingerprint,
            "packing": packing,
            "prefix_cache": cache.summary() if cache is not None else {"used": False, "why": cache_why},
            "distill_shared_prefix": None if teacher is None else
            {"used": True, "layers": share.first, "teacher_layer_calls": share.teacher_layers_run}
            if share is not None else {"used": False, "why": share_why},
            "teacher_cache": tcache.summary() if tcache is not None else
            {"used": False, "why": tcache_why} if tcache_why else None,
            "steps": state.global_step,
            "max_steps": state.max_steps,
            "epochs": state.epoch,
            "global_batch": cfg.micro_batch_size * ga * world_size(),
            "micro_batch": cfg.micro_batch_size,
            "grad_accum": ga,
            "world_size": world_size(),
            "final_train_loss": train_losses[-1] if train_losses else None,
            "mean_train_loss": _mean_logged_loss(logs),
            "val_loss_before": val_before,
            # The saved model is the best validation checkpoint: its loss is the final validation loss.
            "final_val_loss": state.best_metric if state.best_metric is not None else (evals[-1] if evals else None),
            "val_loss_last_step": evals[-1] if evals else None,
            "best_step": best_step,
            # The loss curve for reports: train loss per logging step, validation loss per evaluation.
            "log_history": ([{"step": 0, "eval_loss": val_before}] if val_before is not None else [])
            + [{"step": e["step"], k: e[k]} for e in logs for k in ("loss", "eval_loss") if k in e],
            "resumed_from": str(resume_from) if resume_from else None,
            "wall_s": None,  # filled in when saving
            "train_wall_s": train_wall,
            "train_step_time_s": progress.step_time,
            "tokens_trained": progress.tokens,
            "tokens_per_s": progress.tokens_per_s,
            "peak_memory_bytes": peak,
            "peak_memory_kind": mem.kind,
            "device": self.device,
            "mixed_precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "no",
            "config": cfg.to_dict(),
            "library_versions": library_versions(),
        }
        self._save(trainer, tok, src, result, t_start)
        if self.main and not cfg.keep_checkpoints:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        trainer.selector.remove()
        self.barrier()  # every process returns once the output exists
        return result

    # ------------------------------------------------------------------------------------------ pieces

    def _grad_accum(self) -> int:
        ws = world_size()
        per_step = self.cfg.micro_batch_size * ws
        if self.cfg.batch_size % per_step:
            raise LayerpruneError(f"batch size {self.cfg.batch_size} is not a multiple of micro-batch "
                                  f"{self.cfg.micro_batch_size} x {ws} processes")
        return self.cfg.batch_size // per_step

    def _teacher_path(self, src: str, why: str = "method distill") -> str | None:
        """The distillation teacher's local path (None without distillation; ``why`` asks for it anyway)."""
        cfg = self.cfg
        if cfg.teacher is None and cfg.method != "distill" and why == "method distill":
            return None
        path = cfg.teacher
        if path is None:
            manifest = Path(src) / MANIFEST
            if not manifest.is_file():
                raise LayerpruneError(f"{why} needs --teacher (no layerprune.json names the unpruned model)")
            path = read_json(manifest).get("source_model")
            if not path:
                raise LayerpruneError("layerprune.json names no source model; give --teacher")
        return resolve_model(path)

    def _data_source(self, src: str, tok: Any) -> tuple[str, dict[str, Any]]:
        """``--data`` as given, or for ``self:N`` the file of N teacher-sampled texts (generated once)."""
        cfg = self.cfg
        n = self_count(cfg.data)
        if n is None:
            return cfg.data, {}
        teacher = self._teacher_path(src, why=f"--data {cfg.data}")
        assert teacher is not None
        path, info = self_generated(teacher, tok, n, cutoff_len=cfg.cutoff_len, seed=cfg.seed,
                                    data_dir=cfg.data_dir, device=self.device, progress=cfg.progress)
        return str(path), info

    def _distill_source(self, src: str, load_dtype: Any, data: InstructData, tok: Any, vocab: int
                        ) -> tuple[torch.nn.Module | None, TeacherCache | None, str | None]:
        """(live teacher, teacher cache, why no cache): the cache reads what earlier runs with this teacher and
        data stored and computes the rest (loading the teacher on the first miss); ``teacher_cache: off`` runs
        the teacher live.
        ``vocab`` (the student's) decides whether the whole distribution is kept."""
        path = self._teacher_path(src)
        if path is None:
            return None, None, None
        cfg = self.cfg
        if cfg.teacher_cache == "off":
            return load_teacher(path, load_dtype, self.device), None, "off (teacher_cache: off)"
        root = cache_root() if cfg.teacher_cache == "auto" else Path(cfg.teacher_cache)
        key = TeacherCache.make_key(weights_fingerprint(path, root), data.fingerprint, vocab, cfg.teacher_top_k,
                               cfg.teacher_full_max, str(load_dtype))
        folder = TeacherCache.folder_for(key, root)
        cache = TeacherCache(folder, key, data.train, cfg.teacher_top_k, pad_id_for(tok),
                             lambda: load_teacher(path, load_dtype, self.device))
        return None, cache, None

    def _run_config(self, src: str, data: InstructData) -> dict[str, Any]:
        keep = {k: v for k, v in self.cfg.to_dict().items() if k not in _RUNTIME_KEYS}
        return {"source": str(Path(src).resolve()) if Path(src).exists() else src,
                "data_fingerprint": data.fingerprint, "config": keep, "world_size": world_size()}

    def _checkpoint_setup(self, src: str, data: InstructData) -> str | None:
        """Validate the checkpoint folder; return the checkpoint to resume from (or None).

        A folder without a complete checkpoint (only ``run.json``, or checkpoints cut off by a kill) holds
        nothing to lose: it never blocks a new run. Incomplete checkpoints newer than the last complete one are
        removed on ``--resume``.
        """
        run = self._run_config(src, data)
        run_file = self.ckpt_dir / RUN_FILE
        exists = self.ckpt_dir.is_dir() and bool(checkpoints(self.ckpt_dir))
        self.barrier()  # all processes look before the main one writes
        if self.cfg.resume and exists:
            if run_file.is_file():
                old = read_json(run_file)
                diff = sorted(k for k in set(old.get("config", {})) | set(run["config"])
                              if old.get("config", {}).get(k) != run["config"].get(k))
                if old.get("data_fingerprint") != run["data_fingerprint"]:
                    diff.append("data")
                if old.get("source") != run["source"]:
                    diff.append("model")
                if diff:
                    raise LayerpruneError(f"cannot resume from {self.ckpt_dir}: the run differs in {diff}")
                self._val_before_saved = old.get("val_loss_before")
            last = last_complete(self.ckpt_dir) if self.main else None
            self.barrier()
            if not self.main:
                last = last_complete(self.ckpt_dir, log=None)
            if last is not None:
                return str(last)
        elif exists and not self.cfg.overwrite:
            raise LayerpruneError(f"checkpoint folder exists: {self.ckpt_dir} (use --resume to continue or "
                                  "--overwrite to start over)")
        if self.main:
            if self.ckpt_dir.exists():
                shutil.rmtree(self.ckpt_dir)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_file, run)
        self.fresh_checkpoints = True  # this run owns the folder: a failure with a user error removes it
        self.barrier()
        return None

    def _val_before(self, trainer: HealTrainer, data: InstructData, resume_from: str | None) -> float | None:
        if not data.val or not self.cfg.eval_before:
            return None
        if resume_from is not None:
            return getattr(self, "_val_before_saved", None)
        value = float(trainer.evaluate()["eval_loss"])
        # evaluate() registered the bare model with the accelerator (evaluation mode, no DDP wrapper); left so,
        # train() would reuse it and never all-reduce gradients across processes (each rank would train alone).
        bare: Any = trainer.model
        trainer.accelerator._models.clear()
        trainer.model_wrapped = bare
        if getattr(bare, "_is_accelerate_prepared", False):
            bare._is_accelerate_prepared = False
        if self.main:
            run_file = self.ckpt_dir / RUN_FILE
            run = read_json(run_file)
            run["val_loss_before"] = value
            write_json(run_file, run)
        return value

    def _packing(self, model: torch.nn.Module, teacher: torch.nn.Module | None, data: InstructData,
                 pad_id: int) -> dict[str, Any]:
        """Decide on padding-free micro-batches: requested, automatic, or off; checked on the model itself."""
        cfg = self.cfg
        if cfg.packing is False:
            return {"used": False, "why": "off (--no-packing)"}
        tokens = cfg.micro_batch_size * cfg.cutoff_len
        if cfg.packing is None and tokens > PACK_AUTO_MAX_TOKENS:
            return {"used": False, "why": f"micro-batch of up to {tokens} tokens > {PACK_AUTO_MAX_TOKENS} (the "
                                          "packed attention mask grows with its square); --packing forces it"}
        rows = data.train[:2]
        problem = packing_problem(model, rows, pad_id)
        if problem is None and teacher is not None:
            problem = packing_problem(teacher, rows, pad_id)
            problem = f"teacher: {problem}" if problem else None
        if problem is not None:
            if cfg.packing:
                raise LayerpruneError(f"--packing: {problem}; use --no-packing")
            return {"used": False, "why": f"checked on the model: {problem}"}
        return {"used": True, "why": "requested" if cfg.packing else "automatic (checked on the model)"}

    def _prefix_cache(self, model: torch.nn.Module, info: dict[str, Any], packing: bool,
                      data: InstructData) -> tuple[PrefixCache | None, str | None]:
        """The frozen-prefix cache when the run can reuse it: a frozen prefix, packing, one process, more than one
        epoch, and room for every training sample (a partial cache would rarely hold a whole micro-batch)."""
        cfg = self.cfg
        p = parts(model)
        first = int(info.get("frozen_prefix_layers") or 0)
        layers = list(p.layers[:first]) if first else []
        if cfg.prefix_cache_gb is None:
            import psutil

            budget = psutil.virtual_memory().available // 2
        else:
            budget = int(cfg.prefix_cache_gb * 2**30)
        why = PrefixCache.why_not(layers, packing, budget)
        if why is None and info.get("prefix_changes"):
            why = str(info["prefix_changes"])
        if why is None and world_size() > 1:
            # The distributed sampler deals the samples to processes afresh every epoch, so a process would
            # rarely find a whole micro-batch among the samples it saw before.
            why = "several processes (each epoch deals the samples to processes afresh)"
        if why is None:
            micro_per_epoch = -(-len(data.train) // (cfg.micro_batch_size * world_size()))
            steps_per_epoch = max(micro_per_epoch // self._grad_accum(), 1)
            if cfg.max_steps is not None and cfg.max_steps <= steps_per_epoch or \
                    cfg.max_steps is None and cfg.epochs <= 1:
                why = "the run ends within one epoch: nothing to reuse"
        if why is None:
            weight = p.embed.weight
            need = sum(len(r["input_ids"]) for r in data.train) * weight.shape[1] * weight.element_size()
            if need > budget:
                why = (f"the training samples need {need / 2**30:.2f} GiB, more than the budget of "
                       f"{budget / 2**30:.2f} GiB (--prefix-cache-gb)")
        return (PrefixCache(layers, budget), None) if why is None else (None, why)

    def _shared_prefix(self, model: torch.nn.Module, teacher: torch.nn.Module | None, info: dict[str, Any]
                       ) -> tuple[SharedPrefix | None, str | None]:
        """Shared-prefix distillation when the student's frozen layers are exactly the teacher's first ones."""
        if teacher is None:
            return None, None
        if not self.cfg.distill_shared_prefix:
            return None, "off (distill_shared_prefix: false)"
        if info.get("prefix_changes"):
            return None, str(info["prefix_changes"])
        first = int(info.get("frozen_prefix_layers") or 0)
        why = SharedPrefix.why_not(model, teacher, first)
        if why is not None:
            return None, why
        return SharedPrefix(parts(model).layers, parts(teacher).layers, first), None

    def _trainer(self, model: torch.nn.Module, tok: Any, data: InstructData, head: torch.nn.Module,
                 teacher: torch.nn.Module | None, progress: HealProgress, packing: bool,
                 prefix_cache: PrefixCache | None, shared_prefix: SharedPrefix | None = None,
                 teacher_cache: TeacherCache | None = None) -> HealTrainer:
        from transformers import TrainingArguments

        cfg = self.cfg
        has_val = bool(data.val)
        cuda = self.device == "cuda"
        bf16 = cuda and torch.cuda.is_bf16_supported()
        fp16 = cuda and not bf16
        if not cuda and any(p.dtype == torch.bfloat16 and p.requires_grad is False for p in model.parameters()):
            bf16 = True  # bf16 weights on CPU need autocast to meet the fp32 trainable layers
        # Default: the Trainer's own AdamW choice (the fused kernel on torch >= 2.8: 5x faster steps on a CPU).
        optim = cfg.optim or ("paged_adamw_8bit" if self.behaviour.quantized and cuda
                              else TrainingArguments.__dataclass_fields__["optim"].default)
        gc = bool(cfg.gradient_checkpointing) and not self.behaviour.quantized  # qlora enables it itself
        args: dict[str, Any] = dict(
            output_dir=str(self.ckpt_dir), overwrite_output_dir=True,
            per_device_train_batch_size=cfg.micro_batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size or cfg.micro_batch_size,
            gradient_accumulation_steps=self._grad_accum(),
            num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
            learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim=optim,
            bf16=bf16, fp16=fp16, use_cpu=not cuda,
            eval_strategy="steps" if has_val else "no", eval_steps=cfg.eval_steps,
            save_strategy="steps", save_steps=cfg.save_steps or cfg.eval_steps,
            save_total_limit=cfg.save_total_limit, save_safetensors=True, save_only_model=False,
            load_best_model_at_end=has_val, metric_for_best_model="eval_loss", greater_is_better=False,
            logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
            logging_nan_inf_filter=False, report_to=list(cfg.report_to or []), disable_tqdm=True,
            seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding", prediction_loss_only=True,
            ddp_find_unused_parameters=False, dataloader_pin_memory=cuda,
        )
        if cfg.fsdp:
            if self.behaviour.uses_peft:
                raise LayerpruneError("--fsdp is for full and partial fine-tuning; use DDP for the LoRA family")
            args.update(fsdp=cfg.fsdp, fsdp_config=cfg.fsdp_config)
        if gc:
            # transformers 5 renamed gradient_checkpointing to activation_checkpointing.
            name = "activation_checkpointing" if "activation_checkpointing" in _params(TrainingArguments) \
                else "gradient_checkpointing"
            args.update({name: True, f"{name}_kwargs": {"use_reentrant": False}})
        if cfg.run_name:
            args["run_name"] = cfg.run_name
        if not cfg.shuffle:
            args["train_sampling_strategy"] = "sequential"
        targs = TrainingArguments(**_supported(TrainingArguments, args))
        if teacher is not None:
            teacher.to(targs.device)
        trainer = HealTrainer(
            model=model, args=targs, train_dataset=EncodedDataset(data.train),
            eval_dataset=EncodedDataset(data.val) if has_val else None,
            data_collator=PackCollator() if packing else PadCollator(pad_id_for(tok)), processing_class=tok,
            callbacks=[progress, DivergenceGuard(), EvalAtEnd(), *self.callbacks,
                       *([FlushAtSave(teacher_cache)] if teacher_cache is not None else [])],
            head=head, teacher=teacher,
            teacher_head=parts(teacher).head if teacher is not None else None,
            distill_temperature=cfg.distill_temperature, distill_weight=cfg.distill_weight,
            prefix_cache=prefix_cache, shared_prefix=shared_prefix, teacher_cache=teacher_cache)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our bar reports; the printer would dump every log dict
        for cb in trainer.callback_handler.callbacks:
            if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "logging_dir", None) is None:
                # Our validation before training logs before on_train_begin would set the folder: without this
                # the writer would open in the working directory.
                cb.logging_dir = str(self.ckpt_dir / TRACKING / (cfg.run_name or "heal"))
        return trainer

    def _save(self, trainer: HealTrainer, tok: Any, src: str, result: dict[str, Any], t_start: float) -> None:
        """Export and publish the output folder in one rename (adapter included), on the main process only."""
        cfg = self.cfg
        model = _full_model(trainer)
        if not self.main:
            return
        ctx = ExportContext(source=src, save_dtype=_checkpoint_dtype(src))
        manifest = read_json(Path(src) / MANIFEST) if (Path(src) / MANIFEST).is_file() else None
        with atomic_dir(self.out, overwrite=cfg.overwrite) as tmp:
            side = Path(tempfile.mkdtemp(prefix=tmp_prefix(self.out.resolve()) + "adapter-", dir=tmp.parent))
            try:
                if self.behaviour.uses_peft and cfg.save_adapter:
                    ctx.adapter_dir = side / "adapter"  # before export: merging removes the adapter
                exported = self.method.export(model, cfg, ctx)
                if manifest is not None:
                    manifest["heal"] = _heal_summary(result)
                result["wall_s"] = time.perf_counter() - t_start
                save_pretrained_atomic(exported, tok, tmp, manifest, overwrite=True,
                                       extra_files={HEAL_FILE: result})
                if ctx.adapter_dir is not None:
                    shutil.move(str(ctx.adapter_dir), str(tmp / "adapter"))
                if (self.ckpt_dir / TRACKING).is_dir():  # TensorBoard's event files (report_to tensorboard)
                    shutil.copytree(self.ckpt_dir / TRACKING, tmp / TRACKING)
            finally:
                shutil.rmtree(side, ignore_errors=True)


def _finished(ckpt: str) -> bool:
    step, max_steps = finished_step(Path(ckpt))
    return max_steps > 0 and step >= max_steps


def _restore_finished(trainer: HealTrainer, ckpt: str) -> None:
    """The end state of a run whose last checkpoint is its final step: trainer state, then the best weights."""
    from transformers.trainer_callback import TrainerState

    trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()
    else:
        trainer._load_from_checkpoint(ckpt)


def _mean_logged_loss(logs: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step, from the logged window means (a window ends at each log; the run
    logs at every checkpoint and at the last step, so the windows cover all steps, resumed or not)."""
    total, prev, steps = 0.0, 0, 0
    for e in logs:
        if "loss" in e:
            total += e["loss"] * (e["step"] - prev)
            steps += e["step"] - prev
            prev = e["step"]
    return total / steps if steps else None


def _full_model(trainer: HealTrainer) -> torch.nn.Module:
    """The trained model with full (unsharded) weights: under FSDP gather the state dict on the main process
    and load it into a fresh model built from the config there."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not getattr(trainer, "is_fsdp_enabled", False):
        return model
    state = trainer.accelerator.get_state_dict(trainer.model)
    if int(os.environ.get("RANK", "0")) != 0:
        return model
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(state, strict=False)
    return fresh


def _params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls).parameters)


def _supported(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop arguments this transformers version does not know (e.g. ``save_safetensors`` is gone in 5.x)."""
    params = _params(cls)
    return {k: v for k, v in kwargs.items() if k in params}


def _heal_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The part of heal.json recorded in the carried-over layerprune.json."""
    keys = ("method", "base_method", "trainable_params", "data_fingerprint", "steps", "val_loss_before",
            "final_val_loss", "final_train_loss", "tokens_per_s", "wall_s")
    out = {k: result.get(k) for k in keys}
    out["layers"] = result.get("method_info", {}).get("layers")
    out["data"] = result.get("data", {}).get("source")
    out["details"] = HEAL_FILE
    return out



__all__ = ["HEAL_FILE", "heal"]
