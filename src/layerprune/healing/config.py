"""Every healing setting in one dataclass; the defaults are the seed's (see docs/healing.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import LayerpruneError

TIE_MODES = ("head", "both", "frozen", "untie")
TIE_DEFAULT = "head"  # chosen from measurements on SmolLM2 (docs/healing.md, "Tied embeddings")


@dataclass
class HealConfig:
    """Settings of one healing run. ``heal(model_dir, out_dir, **kwargs)`` builds this from its keyword args."""

    # What is trained.
    method: str = "partial"  # partial | lora | dora | qlora | full | distill
    layers: str | list[int] = "last3"  # partial: lastK, lm_head (= norm_lmhead), all, or explicit indices
    # partial on a tied-embedding model: "head" trains the shared matrix through the head only (the input-side
    # lookup detached; the checkpoint stays tied and no larger), "both" through both uses (backward reaches the
    # first layer), "frozen" keeps head and embeddings fixed, "untie" gives the head its own copy (+V*d params).
    tie_mode: str = TIE_DEFAULT
    untie: bool | None = None  # legacy switch: True = tie_mode "untie", False = the default tied mode
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # leaf module names; None = every linear layer in the decoder layers
    save_adapter: bool = False  # also keep the adapter (out/adapter) next to the merged model
    # Distillation: the teacher's logits (KL at temperature T) mixed with the LM loss.
    teacher: str | None = None  # None with method=distill: the manifest's source model (the unpruned one)
    distill_base: str = "partial"  # trainable-parameter choice under method=distill
    distill_temperature: float = 2.0
    distill_weight: float = 0.5  # weight of the KL term; the LM loss gets 1 - distill_weight
    # The teacher reuses the student's frozen prefix when it is exactly the teacher's first layers.
    distill_shared_prefix: bool = True

    # Data.
    data: str = "alpaca"  # preset (alpaca, dolly), local file/folder, or Hub id
    data_dir: str | None = None
    template: str | None = None  # alpaca | dolly | chat; None = the format's own
    fields: str | dict[str, str] | None = None
    train_on_inputs: bool = False
    cutoff_len: int = 256
    overflow: str = "truncate"  # truncate | drop
    val_size: int | float | None = None  # None: 2000 (Alpaca) / 200 (Dolly), capped on small datasets
    max_train_samples: int | None = None
    # Padding-free micro-batches (samples concatenated, positions restarting per sample). None: on when the
    # model is checked to honour it and a micro-batch holds at most 8192 tokens; True: required; False: padded.
    packing: bool | None = None
    # Frozen-prefix cache (partial, packed): after the first epoch the frozen layers are not run again; their
    # outputs are kept on the CPU up to this many GiB. None: half the memory available when the run starts; 0: off.
    prefix_cache_gb: float | None = None

    # Optimisation (seed: AdamW, lr 1e-5, 100 warm-up steps, linear decay, 2 epochs, batch 64 / micro 4).
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 64  # global batch (all processes, after accumulation)
    micro_batch_size: int = 4  # per process and forward pass
    lr: float = 1e-5
    warmup_steps: int = 100
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str | None = None  # None: the Trainer's AdamW (fused on torch >= 2.8; paged_adamw_8bit for qlora on CUDA)
    gradient_checkpointing: bool | None = None  # None: on for qlora only
    seed: int = 42

    # Evaluation and checkpoints.
    eval_steps: int = 100
    save_steps: int | None = None  # None = eval_steps (best-model tracking needs checkpoints at eval steps)
    save_total_limit: int = 2
    logging_steps: int = 10
    eval_batch_size: int | None = None  # None = micro_batch_size
    eval_before: bool = True  # measure the validation loss before training (reported in heal.json)
    checkpoint_dir: str | None = None  # None: <out>.checkpoints
    keep_checkpoints: bool = False
    resume: bool = False

    # Runtime.
    fsdp: str | None = None  # Trainer FSDP option under torchrun, e.g. "full_shard auto_wrap" (full/partial)
    fsdp_config: str | dict[str, Any] | None = None  # Trainer fsdp_config: a JSON file or a dict
    dtype: str = "auto"  # auto: checkpoint dtype on GPU, float32 on CPU
    device: str | None = None  # None: cuda when available, else cpu
    overwrite: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in heal.json as given

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> HealConfig:
        """Build from keyword arguments; an unknown key is a one-line error listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise LayerpruneError(f"unknown heal option(s) {unknown}; valid: {', '.join(sorted(names))}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
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
        if self.eval_steps < 1 or self.logging_steps < 1:
            raise LayerpruneError("eval_steps and logging_steps must be at least 1")
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise LayerpruneError("save_steps must be a multiple of eval_steps (best-checkpoint tracking)")
        if self.prefix_cache_gb is not None and self.prefix_cache_gb < 0:
            raise LayerpruneError("prefix_cache_gb must be 0 (off) or positive")
        if self.tie_mode not in TIE_MODES:
            raise LayerpruneError(f"tie_mode must be one of {', '.join(TIE_MODES)}, not '{self.tie_mode}'")
        if self.untie is not None:
            want = "untie" if self.untie else (TIE_DEFAULT if self.tie_mode == "untie" else self.tie_mode)
            self.tie_mode = want
        if self.overflow not in ("truncate", "drop"):
            raise LayerpruneError(f"overflow must be 'truncate' or 'drop', not '{self.overflow}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
