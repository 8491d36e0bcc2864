"""Every healing setting in one dataclass; the defaults are the seed's (see docs/healing.md)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

from .. import options
from ..errors import LayerpruneError
from ..options import opt

TIE_MODES = ("frozen", "head", "both", "untie")
TIE_DEFAULT = "frozen"  # chosen from measurements on SmolLM2 (docs/healing.md, "Tied embeddings")


# Trainer integrations accepted by report_to, and the package each needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


@dataclass
class HealConfig:
    """Settings of one healing run: the single source of every option, its default and its help.

    ``heal(model_dir, out_dir, **kwargs)`` builds this from keyword arguments; ``layerprune heal`` flags and the
    recipe's ``heal:`` section are generated from these fields (``recipe=False``: command line only).
    """

    # What is trained.
    method: str = opt("partial", "healing method (the method registry)", "method")
    layers: str | list[int] = opt("last3", "partial: lastK, lm_head (norm + head only), all, or indices like "
                                           "18,19,21", "method")
    tie_mode: str = opt(TIE_DEFAULT, "partial on a tied-embedding model: frozen = head and embeddings fixed "
                                     "(stays tied, no larger); head = train the shared matrix through the head "
                                     "only; both = through both uses; untie = the head gets its own copy (+vocab x "
                                     "hidden parameters)", "method", TIE_MODES)
    untie: bool | None = opt(None, "legacy switch: --untie = --tie-mode untie, --no-untie = --tie-mode both",
                             "method")
    lora_r: int = opt(8, "LoRA rank", "method")
    lora_alpha: int = opt(16, "LoRA alpha", "method")
    lora_dropout: float = opt(0.05, "LoRA dropout", "method")
    lora_targets: list[str] | None = opt(None, "comma-separated module names (default: every linear layer in "
                                               "the decoder layers)", "method")
    save_adapter: bool = opt(False, "lora/dora/qlora: also keep the adapter in OUT/adapter", "method")
    # Distillation: the teacher's logits (KL at temperature T) mixed with the LM loss.
    teacher: str | None = opt(None, "distillation teacher (default for --method distill: the unpruned source "
                                    "model named in layerprune.json)", "method")
    distill_base: str = opt("partial", "what --method distill trains", "method")
    distill_temperature: float = opt(2.0, "distillation temperature", "method")
    distill_weight: float = opt(0.5, "weight of the KL term (the LM loss gets 1 - w)", "method")
    distill_shared_prefix: bool = opt(True, "the teacher reuses the student's frozen layers when they are its own "
                                            "first layers", "method")
    teacher_cache: str = opt("auto", "distillation: the teacher's log-probs computed once per (teacher, data) and "
                                     "read from disk by every later run: auto ($LAYERPRUNE_CACHE or "
                                     "~/.cache/layerprune), off (live teacher), or a folder", "method")
    teacher_top_k: int = opt(64, "teacher cache: log-probs kept per position where the vocabulary is larger "
                                 "than --teacher-full-max (top-K is biased: see docs/healing.md)", "method")
    teacher_full_max: int = opt(4096, "teacher cache: vocabularies up to this size are kept whole (exact)",
                                "method")

    # Data.
    data: str = opt("alpaca", "preset (alpaca, dolly, c4), a local JSON/JSONL/Parquet/text file or folder, a Hub "
                              "id, or self:N (N sequences sampled from the teacher)", "data")
    data_dir: str | None = opt(None, "folder laid out like shared/data (default: $LAYERPRUNE_DATA); used "
                                     "instead of the Hub", "data", recipe=False)
    template: str | None = opt(None, "prompt template (default: the dataset format's own)", "data",
                               ("alpaca", "dolly", "chat"))
    fields: str | dict[str, str] | None = opt(None, "field mapping, e.g. instruction=question,input=ctx,"
                                                    "output=answer", "data")
    train_on_inputs: bool = opt(False, "also train on the prompt tokens", "data")
    cutoff_len: int = opt(256, "tokens per sample", "data")
    overflow: str = opt("truncate", "samples longer than the cutoff", "data", ("truncate", "drop"))
    val_size: int | float | None = opt(None, "validation rows (or a fraction); default 2000 Alpaca / 200 Dolly, "
                                             "capped on small sets", "data")
    max_train_samples: int | None = opt(None, "use at most this many training rows", "data")
    packing: bool | None = opt(None, "padding-free micro-batches (default: on when the model is checked to "
                                     "support it and a micro-batch holds at most 8192 tokens)", "data")
    prefix_cache_gb: float | None = opt(None, "partial: keep the frozen layers' outputs (CPU memory, GiB) so later "
                                              "epochs skip them; 0 turns it off (default: half the memory "
                                              "available at the start)", "data")

    # Optimisation (seed: AdamW, lr 1e-5, 100 warm-up steps, linear decay, 2 epochs, batch 64 / micro 4).
    epochs: float = opt(2.0, "epochs")
    max_steps: int | None = opt(None, "optimizer steps (overrides --epochs)")
    batch_size: int = opt(64, "global batch (all processes, after accumulation)")
    micro_batch_size: int = opt(4, "per process and forward pass")
    lr: float = opt(1e-5, "learning rate")
    warmup_steps: int = opt(100, "warm-up steps")
    lr_scheduler: str = opt("linear", "learning-rate schedule (a transformers scheduler name)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    optim: str | None = opt(None, "Trainer optimizer name (default: the Trainer's AdamW, fused on torch >= 2.8; "
                                  "paged_adamw_8bit for qlora on CUDA)")
    gradient_checkpointing: bool | None = opt(None, "activation checkpointing (default: on for qlora only)")
    seed: int = opt(42, "seed", recipe=False)

    # Evaluation and checkpoints.
    eval_steps: int = opt(100, "evaluate (and checkpoint) every N steps")
    save_steps: int | None = opt(None, "checkpoint every N steps (default: --eval-steps; best-model tracking "
                                       "needs checkpoints at evaluations)")
    save_total_limit: int = opt(2, "checkpoints kept")
    logging_steps: int = opt(10, "log the training loss every N steps")
    shuffle: bool = opt(True, "shuffle the training samples each epoch (off: dataset order, the same global batches "
                              "for any number of processes)")
    report_to: list[str] | None = opt(None, "experiment tracking through the Trainer's integrations, "
                                            "comma-separated: tensorboard, wandb, trackio, mlflow (default: none); "
                                            "TensorBoard logs go to OUT/tracking/")
    run_name: str | None = opt(None, "the tracked run's name (a sweep names each cell by its axes)")
    eval_batch_size: int | None = opt(None, "evaluation batch (default: the micro-batch size)")
    eval_before: bool = opt(True, "measure the validation loss before training")
    checkpoint_dir: str | None = opt(None, "checkpoint folder (default: OUT.checkpoints)", recipe=False)
    keep_checkpoints: bool = opt(False, "keep the checkpoint folder after success", recipe=False)
    resume: bool = opt(False, "continue from the last checkpoint of an interrupted run", recipe=False)

    # Runtime.
    processes: int = opt(1, "processes to heal with on this machine: above 1 this heal launches itself under "
                            "torchrun (DDP, or FSDP with --fsdp; one process per GPU, or CPU processes joined "
                            "with gloo); the same global batch, so the same result", recipe=False)
    fsdp: str | None = opt(None, "FSDP under torchrun for full/partial, e.g. 'full_shard auto_wrap'")
    fsdp_config: str | dict[str, Any] | None = opt(None, "FSDP settings: a JSON file (or a dict) for the Trainer")
    dtype: str = opt("auto", "float32|bfloat16|float16|auto (auto: checkpoint dtype on GPU, float32 on CPU)",
                     recipe=False)
    device: str | None = opt(None, "cpu or cuda (default: cuda when available)")
    overwrite: bool = opt(False, "replace an existing output folder", recipe=False, cli=False)
    progress: bool = opt(True, "progress bar", recipe=False)
    extra: dict[str, Any] = opt({}, "recorded in heal.json as given", recipe=False, cli=False)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> HealConfig:
        """Build from keyword arguments; an unknown key is a one-line error listing the valid ones."""
        return options.from_kwargs(cls, "heal", kwargs)

    def validate(self) -> None:
        if self.processes < 1:
            raise LayerpruneError("processes must be at least 1")
        if self.micro_batch_size < 1 or self.batch_size < 1:
            raise LayerpruneError("batch sizes must be positive")
        if self.batch_size % self.micro_batch_size:
            raise LayerpruneError(f"batch size {self.batch_size} is not a multiple of the micro-batch size "
                                  f"{self.micro_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LayerpruneError("max_steps must be at least 1")
        if self.epochs <= 0:
            raise LayerpruneError("epochs must be positive")
        if self.lr <= 0:
            raise LayerpruneError("the learning rate must be positive")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise LayerpruneError("distill_weight must be between 0 and 1")
        if self.distill_temperature <= 0:
            raise LayerpruneError("distill_temperature must be positive")
        if self.cutoff_len < 2:
            raise LayerpruneError("cutoff_len must be at least 2")
        if self.teacher_top_k < 1 or self.teacher_full_max < 0:
            raise LayerpruneError("teacher_top_k must be at least 1 and teacher_full_max at least 0")
        if not self.teacher_cache:
            raise LayerpruneError("teacher_cache must be auto, off or a folder")
        for name in self.report_to or []:
            if name not in TRACKERS:
                raise LayerpruneError(f"unknown report_to '{name}'; choose from {', '.join(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise LayerpruneError(f"report_to {name} needs the '{TRACKERS[name]}' package (pip install "
                                      f"{TRACKERS[name]})")
        from .selfgen import self_count

        self_count(self.data)  # a malformed self:N is refused here, before any loading
        if self.eval_steps < 1 or self.logging_steps < 1:
            raise LayerpruneError("eval_steps and logging_steps must be at least 1")
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise LayerpruneError("save_steps must be a multiple of eval_steps (best-checkpoint tracking)")
        if self.prefix_cache_gb is not None and self.prefix_cache_gb < 0:
            raise LayerpruneError("prefix_cache_gb must be 0 (off) or positive")
        if self.tie_mode not in TIE_MODES:
            raise LayerpruneError(f"tie_mode must be one of {', '.join(TIE_MODES)}, not '{self.tie_mode}'")
        if self.untie is not None:  # the legacy switch: --untie / --no-untie (train the tied matrix in both roles)
            self.tie_mode = "untie" if self.untie else "both"
        if self.overflow not in ("truncate", "drop"):
            raise LayerpruneError(f"overflow must be 'truncate' or 'drop', not '{self.overflow}'")
        self._check_trainer_names()
        if self.device is not None:
            from ..models import resolve_device

            resolve_device(self.device)

    def _check_trainer_names(self) -> None:
        """Scheduler and optimizer names against transformers' lists; only when not the default, because
        importing the Trainer's modules imports peft and bitsandbytes (seconds, and their import-time lines)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if (self.lr_scheduler, self.optim) == (defaults["lr_scheduler"], defaults["optim"]):
            return
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        for name, value, enum in (("lr_scheduler", self.lr_scheduler, SchedulerType),
                                  ("optim", self.optim, OptimizerNames)):
            allowed = [e.value for e in enum]
            if value is not None and value not in allowed:
                shown = ", ".join(allowed[:8]) + (", ..." if len(allowed) > 8 else "")
                raise LayerpruneError(f"unknown {name} '{value}' (a transformers name: {shown})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
