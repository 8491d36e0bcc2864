"""Shared-prefix scoring gives lm-eval's own log-likelihoods, on every tested architecture."""

from __future__ import annotations

import pytest

from layerprune.evaluation.harness import evaluate, make_lm
from layerprune.evaluation.tasks import TaskSource

from conftest import ARCHS, make_tiny, tiny_tokenizer

TASKS = ["arc_easy", "hellaswag", "winogrande", "piqa"]


@pytest.fixture(scope="module")
def requests_sample(data_dir):
    """Real log-likelihood requests (shared contexts, multi-token continuations, varied contexts)."""
    with TaskSource(TASKS, data_dir) as src:
        loaded = src.load()
    out = []
    for name in TASKS:
        task = loaded["tasks"][name]
        task.build_all_requests(limit=3, rank=0, world_size=1)
        out.extend(task.instances)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_equals_lm_eval(arch, requests_sample):
    # Long sliding windows would hide the cache's window handling: keep the tiny configs' 5-token windows.
    model, tok = make_tiny(arch), tiny_tokenizer()
    # lm-eval's logits cache (reuse across requests with equal context + continuation[:-1]) is off: with the
    # word-level test tokenizer many rows become all-<unk> and collide across documents, where that reuse
    # gives a different number for one request of gpt2 than lm-eval computes for it alone.
    ref = make_lm(model, tok, batch_size=4, scoring="lm-eval", model_args={"logits_cache": False}).loglikelihood(
        requests_sample, disable_tqdm=True)
    fast_lm = make_lm(model, tok, batch_size=3, scoring="shared-prefix")
    got = fast_lm.loglikelihood(requests_sample, disable_tqdm=True)
    assert not getattr(fast_lm, "_no_shared_prefix", False)  # the fast path really ran
    assert len(got) == len(ref)
    for (ll_r, g_r), (ll_f, g_f) in zip(ref, got, strict=True):
        assert ll_f == pytest.approx(ll_r, rel=1e-4, abs=1e-4)
        assert g_f == g_r


def test_auto_scoring_choice_and_same_metrics(data_dir):
    model, tok = make_tiny("llama"), tiny_tokenizer()
    assert type(make_lm(model, tok)).__name__ == "SharedPrefixHFLM"  # CPU
    assert type(make_lm(model, tok, scoring="lm-eval")).__name__ == "HFLM"
    a = evaluate(model, tok, ["arc_easy", "piqa"], data_dir=data_dir, limit=4, scoring="lm-eval")
    b = evaluate(model, tok, ["arc_easy", "piqa"], data_dir=data_dir, limit=4, scoring="shared-prefix")
    assert a["tasks"] == b["tasks"] and b["config"]["scoring"] == "shared-prefix"
