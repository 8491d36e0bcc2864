"""Agreement of a pruned model with its dense teacher on held-out text and on multiple-choice answers.

Token level (same windows as :mod:`.perplexity`): mean KL(teacher ‖ pruned) of the next-token distributions
per scored token, in nats, and the fraction of positions where both models' top-1 next token agree.
Task level: the fraction of lm-eval multiple-choice documents whose picked answer changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerpruneError
from .perplexity import load_text, resolve_bos, resolve_protocol, windows


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_agreement(pruned: nn.Module, teacher: Any, ids: torch.Tensor, spans: list[tuple[int, int, int]],
                    bos_id: int | None, batch_size: int = 1, progress: bool = True) -> dict[str, float]:
    """KL(teacher‖pruned), top-1 agreement and both models' NLL over the scored tokens of ``spans``."""
    kl_sum = agree = nll_t = nll_p = 0.0
    count = 0
    bar = tqdm(total=len(spans), desc="compare", unit="win", disable=not progress)
    off = 1 if bos_id is not None else 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        rows = []
        for start, end, _ in batch:
            seg = ids[start:end]
            if bos_id is not None:
                seg = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), seg])
            rows.append(seg)
        inp = torch.stack(rows)
        lt = teacher(input_ids=inp.to(_device(teacher)), use_cache=False).logits.float().cpu()
        lp = pruned(input_ids=inp.to(_device(pruned)), use_cache=False).logits.float().cpu()
        for r, (start, end, first) in enumerate(batch):
            lo, hi = first - start + off, end - start + off
            pt = torch.log_softmax(lt[r, lo - 1:hi - 1], dim=-1)
            pp = torch.log_softmax(lp[r, lo - 1:hi - 1], dim=-1)
            tgt = inp[r, lo:hi].unsqueeze(-1)
            # KL(p_t || p_p) = sum p_t (log p_t - log p_p), exact per position (no sampling).
            kl_sum += float((pt.exp() * (pt - pp)).sum())
            agree += float((pt.argmax(-1) == pp.argmax(-1)).sum())
            nll_t -= float(pt.gather(-1, tgt).sum())
            nll_p -= float(pp.gather(-1, tgt).sum())
            count += hi - lo
        bar.update(len(batch))
    bar.close()
    return {"kl_teacher_pruned": kl_sum / count, "top1_agreement": agree / count, "tokens": count,
            "teacher_nll": nll_t / count, "pruned_nll": nll_p / count}


def choice_changes(pruned: nn.Module, teacher: Any, tokenizer: Any, tasks: Sequence[str], *,
                   limit: int | None = 100, data_dir: str | os.PathLike | None = None,
                   batch_size: int | str = "auto") -> dict[str, Any]:
    """Per task: fraction of documents whose multiple-choice pick (by ``acc`` and ``acc_norm``) changed."""
    from .harness import evaluate, predictions

    res_t = evaluate(teacher, tokenizer, tasks, limit=limit, data_dir=data_dir, batch_size=batch_size,
                     log_samples=True, bootstrap_iters=0)
    res_p = evaluate(pruned, tokenizer, tasks, limit=limit, data_dir=data_dir, batch_size=batch_size,
                     log_samples=True, bootstrap_iters=0)
    pt, pp = predictions(res_t), predictions(res_p)
    out: dict[str, Any] = {}
    for task in tasks:
        # A group's leaves are pooled into the group's number.
        leaves = [t for t in pt if t == task or t.startswith(f"{task}_")] if task not in pt else [task]
        changed = {"acc": 0, "acc_norm": 0}
        total = {"acc": 0, "acc_norm": 0}
        for leaf in leaves:
            for doc, pick_t in pt[leaf].items():
                pick_p = pp.get(leaf, {}).get(doc)
                if pick_p is None:
                    continue
                for k in changed:
                    if k in pick_t and k in pick_p:
                        total[k] += 1
                        changed[k] += int(pick_t[k] != pick_p[k])
        out[task] = {"documents": total["acc"],
                     "changed_fraction": changed["acc"] / total["acc"] if total["acc"] else None,
                     "changed_fraction_norm": (changed["acc_norm"] / total["acc_norm"]
                                               if total["acc_norm"] else None),
                     "teacher_acc": res_t["tasks"].get(task, {}).get("acc"),
                     "pruned_acc": res_p["tasks"].get(task, {}).get("acc")}
    return out


def generation_agreement(pruned: nn.Module, teacher: Any, tokenizer: Any, prompts: Sequence[str], *,
                         new_tokens: int = 64, samples: int = 3, progress: bool = True,
                         memo: dict[tuple[str, int], list[int]] | None = None) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` by the teacher (dense) and the pruned model: exact-match rate, mean
    common-prefix length in tokens, and ROUGE-L (F1, ``rouge-score``) of the pruned text against the dense.

    ``memo``: the teacher's continuations by (prompt, new_tokens), filled on first use, so that several models
    compared with one teacher (the search's probes) generate the teacher's side once."""
    from rouge_score import rouge_scorer

    from ..generate import greedy_ids

    if not prompts:
        raise LayerpruneError("generation agreement needs at least one prompt")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    exact, prefix, rouge = [], [], []
    shown: list[dict[str, str]] = []
    for p in tqdm(prompts, desc="generation agreement", disable=not progress, leave=False):
        d = memo.get((p, new_tokens)) if memo is not None else None
        if d is None:
            d = greedy_ids(teacher, tokenizer, p, new_tokens)
            if memo is not None:
                memo[(p, new_tokens)] = d
        q = greedy_ids(pruned, tokenizer, p, new_tokens)
        common = next((i for i, (a, b) in enumerate(zip(d, q)) if a != b), min(len(d), len(q)))
        dt = tokenizer.decode(d, skip_special_tokens=True)
        qt = tokenizer.decode(q, skip_special_tokens=True)
        exact.append(float(d == q))
        prefix.append(float(common))
        rouge.append(scorer.score(dt, qt)["rougeL"].fmeasure if dt.strip() or qt.strip() else 1.0)
        if len(shown) < samples:
            shown.append({"prompt": p, "dense": dt, "pruned": qt})
    n = len(prompts)
    return {"prompts": n, "new_tokens": new_tokens, "exact_match": sum(exact) / n,
            "mean_common_prefix_tokens": sum(prefix) / n, "rouge_l": sum(rouge) / n, "samples": shown,
            "decoding": "greedy, chat template when the tokenizer has one"}


def compare(pruned: nn.Module, teacher: Any, tokenizer: Any, dataset: str = "wikitext2", *,
            split: str | None = None, data_dir: str | os.PathLike | None = None, protocol: str = "seed",
            seq_len: int | None = None, bos: str | None = None, max_tokens: int | None = 16384,
            batch_size: int = 1, tasks: Sequence[str] | None = None, task_limit: int | None = 100,
            progress: bool = True) -> dict[str, Any]:
    """Teacher agreement of ``pruned`` on held-out text (and optionally on lm-eval ``tasks``).

    The text windows follow the perplexity ``protocol`` (default: the seed's 128-token windows); only the
    first ``max_tokens`` tokens of the split are used (None = all). Both models must share the tokenizer.
    """
    vt = int(teacher.get_output_embeddings().weight.shape[0])
    vp = int(pruned.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    if vt != vp:
        raise LayerpruneError(f"teacher and pruned model have different vocabularies ({vt} vs {vp})")
    proto = resolve_protocol(protocol, seq_len=seq_len, bos=bos)
    split = split or proto.split_for(dataset)
    text, source = load_text(dataset, split, data_dir, proto.join_for(dataset))
    policy, bos_id = resolve_bos(proto.bos, teacher, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = ([bos_id] if policy == "start" else []) + list(enc)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    ids = torch.tensor(stream, dtype=torch.long)
    spans = windows(len(ids), proto.seq_len, None, policy == "always")
    if not spans:
        raise LayerpruneError(f"{dataset} {split}: too few tokens for one {proto.seq_len}-token window")
    tok = token_agreement(pruned, teacher, ids, spans, bos_id if policy == "always" else None, batch_size, progress)
    out: dict[str, Any] = {
        "text": {**tok, "dataset": dataset, "split": split, **source, "seq_len": proto.seq_len,
                 "bos_resolved": policy, "windows": len(spans), "max_tokens": max_tokens},
    }
    if tasks:
        out["multiple_choice"] = choice_changes(pruned, teacher, tokenizer, list(tasks), limit=task_limit,
                                                data_dir=data_dir)
    return out
