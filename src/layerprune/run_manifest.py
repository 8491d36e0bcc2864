"""The run manifest (``RUN/layerprune.json``) as a type: what the recipe runner writes and the report, the model
card and ``scripts/`` read. Stage names are constants here so no reader parses folder names back."""

from __future__ import annotations

from typing import Any, TypedDict

DENSE = "dense"
PRUNED = "pruned"
COMPENSATED = "compensated"
HEALED = "healed"
# The models a run can evaluate, in pipeline order (the report's column order).
STAGES = (DENSE, PRUNED, COMPENSATED, HEALED)


class StageResult(TypedDict, total=False):
    """Measurements of one model of the run."""

    ppl: dict[str, Any]  # dataset -> {"ppl", "card"}
    zero_shot: dict[str, Any]  # task -> {acc, acc_stderr, ...}
    avg_acc: float | None
    generative: dict[str, Any]  # generative task -> {exact_match, exact_match_flexible, ...}
    generation: dict[str, Any]  # greedy agreement with dense: exact_match, mean_common_prefix_tokens, rouge_l
    params: int
    non_embedding_params: int | None
    macs: int
    prefill_ms: float
    decode_tok_s: float | None


class RunManifest(TypedDict, total=False):
    """Keys of a run manifest; all but ``model``, ``removed_layers`` and ``kept_layers`` may be absent."""

    model: str
    source_model: str
    recipe: dict[str, Any]
    original_num_layers: int
    removed_layers: list[int]
    kept_layers: list[int]
    scores: dict[str, Any]
    similarity: dict[str, Any] | None
    compensation: dict[str, Any] | None  # layerprune.compensation's summary: method, blocks with fit errors
    target: dict[str, Any] | None  # a budget target (prune.target) and the removal that met it
    gguf: dict[str, Any] | None  # export.gguf: the GGUF file and the converter command line used
    stability: dict[str, Any] | None  # layerprune.stability.ranking_stability (prune.stability > 0)
    heal: dict[str, Any] | None  # heal.json of the final healing stage
    results: dict[str, StageResult]  # keyed by STAGES
    measure: dict[str, Any] | None
    rounds: list[dict[str, Any]] | None
    stages: dict[str, Any]
    timings: dict[str, float]
    library_versions: dict[str, str]
    final_model: str


__all__ = ["COMPENSATED", "DENSE", "HEALED", "PRUNED", "STAGES", "RunManifest", "StageResult"]
