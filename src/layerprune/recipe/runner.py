"""Execute a recipe: score -> select -> prune -> heal -> evaluate -> measure -> report, resumable.

Run-directory layout (every folder is one stage's atomic output; ``state.json`` holds fingerprints)::

    RUN/recipe.yaml          the validated recipe with every default filled in
    RUN/score/               scores.json, scores.csv, scores.png, similarity.png   (one-shot)
    RUN/pruned/              pruned checkpoint + layerprune.json
    RUN/model/               the final model (healed, or the pruned one when heal.method is none) + README.md
    RUN/rounds/round-NN/     iterative mode: score/, pruned/, healed/ of each round
    RUN/eval-{dense,pruned,healed}/   eval.json (zero-shot + perplexity with protocol cards)
    RUN/measure/             bench.json (dense and pruned) and the speedup
    RUN/layerprune.json      the run manifest;  RUN/report.md, report.html, plots/, exports/
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import LayerpruneError
from ..io import check_out_dir, link_or_copy, read_json, write_json
from ..models import MANIFEST, library_versions, resolve_model
from ..run_manifest import COMPENSATED, DENSE, HEALED, PRUNED, STAGES, RunManifest
from .schema import GIVEN, SEARCH, load_recipe
from .state import RunState, folder_fingerprint

if TYPE_CHECKING:
    from .cores import CoreShare

FINAL = "model"
BACKGROUND = ".background"  # worker processes write here; the stage then moves the files in
NO_HEAL = "none"


def _layer_count(path: str) -> int:
    from ..arch import layer_count
    from ..models import read_config

    return layer_count(read_config(path))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a checkpoint folder's files (free), falling back to a copy across file systems."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            link_or_copy(f, dst / f.name)


def _flatten(ckpt: Path) -> None:
    """Move a checkpoint written to ``stage_tmp/ckpt`` up into the stage folder itself."""
    for f in ckpt.iterdir():
        f.rename(ckpt.parent / f.name)
    ckpt.rmdir()


def _text_datasets(e: dict[str, Any]) -> list[str]:
    """The held-out text the evaluation reads: perplexity and agreement datasets, once each."""
    return list(dict.fromkeys(e["ppl"] + e["compare"]))


def _check_ppl_data(e: dict[str, Any], run_dir: str | os.PathLike) -> None:
    """Refuse to report perplexity on text this run calibrated on (before loading or computing anything)."""
    from ..evaluation import check_not_calibration, resolve_protocol

    for ds in _text_datasets(e):
        check_not_calibration(ds, resolve_protocol("seed").split_for(ds), run_dir)


def evaluate_model(e: dict[str, Any], model_path: str, dtype: str, data_dir: str | None,
                   run_dir: str | os.PathLike | None, out: str | os.PathLike, dense_path: str | None = None,
                   heal_data: str = "alpaca") -> dict[str, Any]:
    """The recipe's evaluation of one model (perplexity with protocol cards, then zero-shot tasks) into
    ``out/eval.json``. Module-level so that a worker process can run it (``workers`` > 1); there ``run_dir`` is
    None: the main process checks the calibration overlap (the worker would race with its stage renames).
    ``dense_path``: the dense model, for generation agreement (``evaluate.generative.agreement``)."""
    from ..evaluation import evaluate, perplexity
    from ..models import load

    if run_dir is not None:
        _check_ppl_data(e, run_dir)
    model, tok = load(model_path, dtype=dtype)
    res: dict[str, Any] = {"ppl": {}}
    for ds in e["ppl"]:
        # Every window has the same length, so batching them changes nothing but the speed.
        res["ppl"][ds] = perplexity(model, tok, ds, "seed", data_dir=data_dir, seq_len=e["ppl_seqlen"],
                                    max_tokens=e["ppl_max_tokens"], batch_size=e["batch_size"])
    if e["tasks"]:
        res["zero_shot"] = evaluate(model, tok, e["tasks"], num_fewshot=e["num_fewshot"], limit=e["limit"],
                                    limits=e["task_limits"] or None, batch_size=e["batch_size"], data_dir=data_dir)
    g = e["generative"]
    if g["tasks"]:
        res["generative"] = evaluate(model, tok, g["tasks"], num_fewshot=e["num_fewshot"], limit=g["limit"],
                                     batch_size=e["batch_size"], data_dir=data_dir)
    if e["compare"] and dense_path is not None:
        from ..evaluation.agreement import compare

        dense = load(dense_path, dtype=dtype)[0]
        res["compare"] = {ds: compare(model, dense, tok, ds, data_dir=data_dir, max_tokens=e["compare_max_tokens"],
                                      batch_size=e["batch_size"], progress=False)["text"] for ds in e["compare"]}
        del dense
    if g["agreement"] and dense_path is not None:
        from ..data.instruct import heldout_prompts
        from ..evaluation.agreement import generation_agreement

        teacher = load(dense_path, dtype=dtype)[0]
        res["generation"] = generation_agreement(model, teacher, tok, heldout_prompts(heal_data, g["agreement"],
                                                                                      data_dir=data_dir),
                                                 new_tokens=g["new_tokens"])
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "eval.json", res)
    return res


def _timed_evaluate_model(*args: Any) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    return evaluate_model(*args), time.perf_counter() - t0


def _worker_init(threads: int | None = None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    # Worker output would interleave with the main process's progress bars (lm-eval passes disable=False to
    # its bars, so TQDM_DISABLE alone is not enough): the main process reports the job, and a worker's error
    # comes back to it as the job's exception. Its stderr goes nowhere.
    import logging
    import signal
    import sys
    import warnings

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which terminates the pool


def _start_pool(processes: int, threads: int | None = None) -> Any:
    """A spawn-context pool whose workers show no progress bars (tqdm reads TQDM_DISABLE when imported) and
    use ``threads`` torch threads each (None: torch's default)."""
    import multiprocessing

    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the workers inherit the environment at start
    try:
        return multiprocessing.get_context("spawn").Pool(processes, _worker_init, (threads,))
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


class RecipeRun:
    """One execution of a recipe in a run directory."""

    def __init__(self, recipe: dict[str, Any], run_dir: Path, *, resume: bool = False,
                 log: Callable[[str], None] = print, shared: Path | None = None, heal_processes: int = 1) -> None:
        self.r = recipe
        self.dir = run_dir
        self.heal_processes = heal_processes  # a resource, not part of the recipe: the same result
        self.log = log
        self.state = RunState(run_dir, resume, log, shared)
        from ..data.presets import require_data_source, resolve_data_dir

        dd = resolve_data_dir(recipe["data_dir"])
        require_data_source(dd)  # before anything slow: no data means stop at once, in one line
        self.data_dir = str(dd) if dd else None
        self.source = resolve_model(recipe["model"])
        self.source_fp = folder_fingerprint(self.source)
        self.n0 = _layer_count(self.source)
        p = recipe["prune"]
        from ..select import resolve_k

        self.target: Any = None  # a budget.Target (prune.target)
        if p["target"] is not None:
            from ..budget import Sizes, Target, check_reachable

            self.target = Target.parse(p["target"])
            self.sizes = Sizes.of_checkpoint(self.source, recipe["dtype"])
            self.k = self.n0 - 1 - p["protect_first"] - p["protect_last"]  # the most that may go
            check_reachable(self.target, self.sizes, self.k)
        elif p["remove"]:
            from ..prune import validate_removal

            self.k = len(validate_removal(p["remove"], self.n0))  # out-of-range layers: refused before any work
        else:
            self.k = resolve_k(self.n0, p["num_layers"], None if p["num_layers"] is not None else p["ratio"])
        self._check_inputs()
        self.heal_stage: str | None = None  # the stage whose heal.json the manifest reports (None: FINAL)
        self._pool: Any = None  # multiprocessing pool for evaluations beside the main path (workers > 1)
        self._jobs: dict[str, Any] = {}
        self._cores: CoreShare | None = None  # the main process's share of recipe.cores (workers > 1)

    def _check_inputs(self) -> None:
        """What later stages read, checked before the first one runs: task names and files, perplexity text,
        healing data (a bad task name must not surface only after score, prune and heal)."""
        e = self.r["evaluate"]
        from ..evaluation.tasks import check_tasks

        for tasks in (e["tasks"], e["generative"]["tasks"]):
            if tasks:
                check_tasks(tasks, self.data_dir, e["num_fewshot"])
        if e["generative"]["agreement"]:
            from ..data.instruct import resolve_source

            resolve_source(self.r["heal"]["data"], self.data_dir)
        from ..evaluation.perplexity import load_text, resolve_protocol

        proto = resolve_protocol("seed")
        for ds in _text_datasets(e):
            load_text(ds, proto.split_for(ds), self.data_dir, proto.join_for(ds))
        if self.r["heal"]["method"] != NO_HEAL:
            from ..data.instruct import resolve_source

            resolve_source(self.r["heal"]["data"], self.data_dir)

    def _target_met(self, removed: list[int]) -> bool:
        from ..budget import target_met

        assert self.target is not None
        v, dense = self.sizes.after(removed)[self.target.kind], self.sizes.after([])[self.target.kind]
        return target_met(self.target, v, dense)

    # ---- stages -------------------------------------------------------------------------------------------
    def _score(self, model_path: str, name: str, k: int, inputs: dict, layer_map: list[int] | None = None
               ) -> dict[str, Any]:
        """Score ``model_path`` with the recipe's metric and select ``k`` layers (original indices)."""
        p = self.r["prune"]

        def fn(tmp: Path) -> dict[str, Any]:
            from ..data.calibration import CalibSpec
            from ..pipeline import score_and_select

            spec = CalibSpec(source=p["calib"], nsamples=p["nsamples"], seqlen=p["seqlen"], seed=self.r["seed"],
                             split=p["calib_split"], data_dir=self.data_dir)
            metric = (p["metric"], dict(p["metric_params"])) if p["metric_params"] else p["metric"]
            metrics: list[Any] = [metric]
            if p["similarity"] and layer_map is None and p["metric"] != "cka":
                metrics.append("cka")  # the report's similarity heat map; shares the forward of bi/angular
            protect = {"protect_first": p["protect_first"], "protect_last": p["protect_last"]}
            if layer_map is not None:
                from ..models import load

                model, tok = load(model_path, dtype=self.r["dtype"])
                res, sel = score_and_select(model, metrics, k, spec, tokenizer=tok, layer_map=layer_map,
                                            num_layers=self.n0, cache=False, **protect)
            else:
                res, sel = score_and_select(model_path, metrics, k, spec, dtype=self.r["dtype"], **protect)
            label = next(iter(res.results))
            target = None
            if self.target is not None and layer_map is None:
                from ..budget import choose
                from ..select import select_one_shot

                r0, m0 = res.results[label], res.metric_objects.get(label)
                ch = choose(self.target, lambda kk: select_one_shot(r0, kk, metric=m0, **protect).removed, k,
                            sizes=self.sizes)
                sel = select_one_shot(r0, len(ch.removed), metric=m0, **protect)
                target = ch.to_dict()
            res.write(tmp, k=None, overwrite=True)
            # Highlight what was actually removed (iterative rounds select among the remaining layers).
            data = read_json(tmp / "scores.json")
            data["metrics"][label]["selected"] = sel.removed
            write_json(tmp / "scores.json", data)
            sim = next((m["extra"]["matrix"] for m in data["metrics"].values()
                        if (m.get("extra") or {}).get("matrix") is not None), None)
            stability = None
            if p["stability"] and layer_map is None:
                from ..models import load
                from ..plots import plot_stability
                from ..stability import ranking_stability

                model, tok = load(model_path, dtype=self.r["dtype"])
                extra = [CalibSpec(**{**spec.to_dict(), "source": src}) for src in p["stability_calib"]]
                stability = ranking_stability(model, tok, [metric], len(sel.removed), calib=[spec, *extra],
                                              resamples=p["stability"], seed=self.r["seed"], **protect)
                data["stability"] = stability
                write_json(tmp / "scores.json", data)
                plot_stability(stability, tmp / "stability.png")
            return {"metric": label, "removed": sorted(sel.removed), "scores": data["metrics"][label],
                    "calibration": data.get("calibration"), "similarity": sim, "target": target,
                    "stability": stability}

        return self.state.run(name, inputs, fn)

    def _search(self, inputs: dict) -> dict[str, Any]:
        """The search stage (prune.metric: search): candidates, proxy and probe on the loaded source model; the
        winner's cut and whether to compensate it go on to the prune, compensate and heal stages."""
        h = {k: v for k, v in self.r["heal"].items() if v is not None}

        def fn(tmp: Path) -> dict[str, Any]:
            from ..models import load
            from ..search import SearchConfig, search_cut
            from ..search.core import write_report

            cfg = SearchConfig.from_kwargs(**{**self.r["search"], "seed": self.r["seed"]})
            model, tok = load(self.source, dtype=self.r["dtype"])
            heal_cfg = None
            if h["method"] != NO_HEAL:
                heal_cfg = {**h, **({"teacher": self.source} if h["method"] == "distill" and not h.get("teacher")
                                    else {})}
            rec = search_cut(model, tok, self.source, self.r["prune"]["target"], cfg,
                             self.dir / ".search-work", heal_cfg=heal_cfg, data_dir=self.data_dir)
            rec.pop("_fits")
            write_report(rec, tmp)
            shutil.rmtree(self.dir / ".search-work", ignore_errors=True)
            w = rec["winner"]
            return {"metric": SEARCH, "removed": sorted(w["removed"]), "compensate": w["compensated"],
                    "scores": {"winner": w, "candidates": len(rec["candidates"])}, "target": {"target":
                    rec["target"], "k": rec["k"]}, "stability": None, "similarity": None}

        return self.state.run("search", inputs, fn)

    def _cut_label(self) -> str:
        """What chose the cut, as the checkpoints record it."""
        return GIVEN if self.r["prune"]["remove"] else self.r["prune"]["metric"]

    def _prune(self, model_path: str, remove_positions: list[int], name: str, inputs: dict) -> dict[str, Any]:
        def fn(tmp: Path) -> dict[str, Any]:
            from ..prune import prune_checkpoint

            rec = prune_checkpoint(model_path, tmp / "ckpt", remove=remove_positions, dtype=self.r["dtype"],
                                   method=self._cut_label())
            _flatten(tmp / "ckpt")
            return rec.to_dict()

        return self.state.run(name, inputs, fn)

    def _compensate(self, removed: list[int], inputs: dict) -> dict[str, Any]:
        c = dict(self.r["compensate"])
        if self.r["prune"]["metric"] == SEARCH:  # the search chose to compensate this cut, with its method
            c["method"] = self.r["search"]["compensation"]

        def fn(tmp: Path) -> dict[str, Any]:
            from ..compensation import CompensationConfig, compensate_checkpoint

            man = compensate_checkpoint(self.source, tmp / "ckpt", remove=removed,
                                        config=CompensationConfig.from_kwargs(**c), calib_data_dir=self.data_dir,
                                        seed=self.r["seed"], dtype=self.r["dtype"],
                                        method_name=self._cut_label())
            _flatten(tmp / "ckpt")
            return man["compensation"]

        return self.state.run(COMPENSATED, inputs, fn)

    def _heal(self, model_path: str, name: str, inputs: dict) -> dict[str, Any]:
        h = self.r["heal"]

        def fn(tmp: Path) -> dict[str, Any]:
            from ..healing import heal

            opts = {k: v for k, v in h.items() if v is not None}
            if opts["method"] == "distill" and not opts.get("teacher"):
                opts["teacher"] = self.source
            res = heal(model_path, tmp / "ckpt", data_dir=self.data_dir, seed=self.r["seed"],
                       checkpoint_dir=str(self.dir / f".{name.replace('/', '_')}.checkpoints"),
                       resume=True, processes=self.heal_processes, **opts)
            _flatten(tmp / "ckpt")
            return res

        return self.state.run(name, inputs, fn)

    def _dense_for(self, which: str) -> str | None:
        return None if which == DENSE else self.source

    def _busy_workers(self) -> int:
        """Workers running an evaluation now (queued jobs wait for a free worker)."""
        running = sum(not job.ready() for job in self._jobs.values())
        return min(running, self.r["workers"] - 1)

    def _eval_inputs(self, fp: str) -> dict[str, Any]:
        """What one model's evaluation depends on: not on which other models the recipe evaluates, so runs that
        list different ``evaluate.models`` (a sweep's cells) share the evaluation of the same model."""
        e = self.r["evaluate"]
        inputs = {"model": fp, "evaluate": {k: v for k, v in e.items() if k != "models"}, "dtype": self.r["dtype"],
                  "data_dir": self.data_dir}
        if e["generative"]["agreement"]:  # its prompts are held out of the healing data
            inputs["prompts"] = self.r["heal"]["data"]
        return inputs

    def _submit_eval(self, which: str, model_path: str | None, fp: str | None) -> None:
        """Start ``which``'s evaluation in the background pool (``workers`` > 1) unless it is current."""
        if self._pool is None or not model_path or not fp or which not in self.r["evaluate"]["models"]:
            return
        name = f"eval-{which}"
        if self.state.current(name, self._eval_inputs(fp)) or self.state.published(name, self._eval_inputs(fp)):
            return
        out = self.dir / BACKGROUND / name
        if out.exists():
            shutil.rmtree(out)
        self.log(f"[bg  ] {name} (in a worker process)")
        self._jobs[which] = self._pool.apply_async(
            _timed_evaluate_model, (self.r["evaluate"], model_path, self.r["dtype"], self.data_dir, None, str(out),
                                    self._dense_for(which), self.r["heal"]["data"]))

    def _evaluate(self, which: str, model_path: str, fp: str) -> dict[str, Any]:
        name = f"eval-{which}"
        job = self._jobs.pop(which, None)
        worker_s: list[float] = []

        def fn(tmp: Path) -> dict[str, Any]:
            _check_ppl_data(self.r["evaluate"], self.dir)  # also for a job started before calibration ran
            if job is None:
                return evaluate_model(self.r["evaluate"], model_path, self.r["dtype"], self.data_dir, None, tmp,
                                      self._dense_for(which), self.r["heal"]["data"])
            res, seconds = job.get()  # re-raises the worker's error here, inside the stage
            worker_s.append(seconds)
            for f in (self.dir / BACKGROUND / name).iterdir():
                f.rename(tmp / f.name)
            return res

        out = self.state.run(name, self._eval_inputs(fp), fn)
        if worker_s:  # the stage's time is the worker's, not the wait for it
            self.state.stages[name].update(seconds=round(worker_s[0], 2), background=True)
            self.state.save()
        return out

    def _measure(self, paths: dict[str, str], fps: dict[str, str]) -> dict[str, Any]:
        m = self.r["measure"]
        inputs = {"models": fps, "measure": m}

        def fn(tmp: Path) -> dict[str, Any]:
            from ..measurement import measure, speedup
            from ..models import load_model
            out: dict[str, Any] = {}
            with self._cores.paused() if self._cores else contextlib.nullcontext():  # timings at the process's own threads
                for which, path in paths.items():
                    model = load_model(path, dtype=self.r["dtype"])
                    out[which] = measure(model, seq_len=m["seqlen"], batches=tuple(m["batch"]),
                                         new_tokens=m["new_tokens"], repeats=m["repeats"])
                    del model
            final = HEALED if HEALED in out else PRUNED
            if DENSE in out and final in out:
                out["speedup"] = speedup(out[DENSE], out[final])
            write_json(tmp / "bench.json", out)
            return out

        return self.state.run("measure", inputs, fn)

    def _gguf(self, final_fp: str) -> dict[str, Any]:
        """The final model as GGUF through llama.cpp's converter (RUN/gguf/model-<type>.gguf)."""
        outtype = self.r["export"]["gguf"]

        def fn(tmp: Path) -> dict[str, Any]:
            from ..export import export_gguf

            res = export_gguf(self.dir / FINAL, tmp / f"model-{outtype}.gguf", outtype=outtype)
            res["gguf"] = str(self.dir / "gguf" / f"model-{outtype}.gguf")
            res["command"] = res["command"].replace(str(tmp), str(self.dir / "gguf"))
            return res

        return self.state.run("gguf", {"model": final_fp, "outtype": outtype}, fn)

    # ---- pipeline -----------------------------------------------------------------------------------------
    def execute(self) -> RunManifest:
        """Run every stage not already current; with ``workers`` > 1 the evaluations of dense, pruned and
        compensated run in worker processes beside compensation and healing (measurement waits for them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / BACKGROUND, ignore_errors=True)  # a killed run's leftovers
        workers, cores = self.r["workers"], self.r["cores"]
        worker_threads = max(1, cores // workers) if cores else None
        if workers > 1:
            self._pool = _start_pool(workers - 1, worker_threads)
        done = False
        try:
            if cores:
                from .cores import CoreShare

                with CoreShare(cores, self._busy_workers, worker_threads=worker_threads or 1) as self._cores:
                    manifest = self._execute()
            else:
                manifest = self._execute()
            done = True
            return manifest
        finally:
            self._cores = None
            if self._pool is not None:
                # After success the workers exit on their own, running their finalizers (a terminated worker
                # leaves its semaphores to the resource tracker, which warns about them at exit); after a
                # failure or Ctrl-C nothing is left running.
                if done:
                    self._pool.close()
                else:
                    self._pool.terminate()
                self._pool.join()
                self._pool = None
            shutil.rmtree(self.dir / BACKGROUND, ignore_errors=True)

    def _execute(self) -> RunManifest:
        t0 = time.perf_counter()
        (self.dir / "recipe.yaml").write_text(yaml.safe_dump(self.r, sort_keys=False))
        p, h = self.r["prune"], self.r["heal"]
        searching = p["metric"] == SEARCH
        if not searching:  # beside scoring; a search is longer and on the critical path: dense waits for it
            self._submit_eval(DENSE, self.source, self.source_fp)
        heal_on = h["method"] != NO_HEAL
        comp_on = self.r["compensate"]["method"] != "none"
        comp_path: str | None = None
        compensation: dict[str, Any] | None = None
        scores: dict[str, Any] = {}
        rounds: list[dict[str, Any]] = []

        if not p["iterative"]:
            base = {"model": self.source_fp, "prune": p, "seed": self.r["seed"], "dtype": self.r["dtype"],
                    "k": self.k, "data_dir": self.data_dir}
            if searching:
                sc = self._search({**base, "search": self.r["search"], "heal": h})
            elif p["remove"]:
                sc = {"metric": GIVEN, "removed": sorted(p["remove"]), "scores": {"removed": sorted(p["remove"])}}
            else:
                sc = self._score(self.source, "score", self.k, base)
            if searching:
                comp_on = sc["compensate"]
                self._submit_eval(DENSE, self.source, self.source_fp)
            removed = sc["removed"]
            target_info = sc.get("target")
            stability = sc.get("stability")
            similarity = sc.get("similarity")
            scores[sc["metric"]] = sc["scores"]
            pr = self._prune(self.source, removed, PRUNED, {**base, "removed": removed})
            pruned_path = str(self.dir / PRUNED)
            pruned_fp = self.state.stages[PRUNED]["fingerprint"]
            self._submit_eval(PRUNED, pruned_path, pruned_fp)
            final_fp = pruned_fp
            heal_from, heal_fp = pruned_path, pruned_fp
            if comp_on:
                compensation = self._compensate(removed, {**base, "removed": removed,
                                                          "compensate": self.r["compensate"]})
                comp_path = str(self.dir / COMPENSATED)
                heal_from = comp_path
                heal_fp = final_fp = self.state.stages[COMPENSATED]["fingerprint"]
                self._submit_eval(COMPENSATED, comp_path, heal_fp)
            if heal_on:
                self._heal(heal_from, FINAL, {"pruned": heal_fp, "heal": h, "seed": self.r["seed"],
                                              "data_dir": self.data_dir})
                final_fp = self.state.stages[FINAL]["fingerprint"]
            kept = pr["kept_layers"]
        else:
            removed, kept, current, cur_fp = [], list(range(self.n0)), self.source, self.source_fp
            target_info = stability = None
            similarity = None
            pruned_path, pruned_fp = None, None
            r = 0
            while len(removed) < self.k and not (self.target and removed and self._target_met(removed)):
                r += 1
                step = min(p["step"], self.k - len(removed))
                rd = f"rounds/round-{r:02d}"
                base = {"model": cur_fp, "prune": p, "seed": self.r["seed"], "kept": kept, "step": step,
                        "data_dir": self.data_dir}
                sc = self._score(current, f"{rd}/score", step, base, layer_map=kept)
                chosen = sc["removed"]
                positions = [kept.index(i) for i in chosen]
                self._prune(current, positions, f"{rd}/pruned", {**base, "removed": chosen})
                current = str(self.dir / rd / "pruned")
                cur_fp = self.state.stages[f"{rd}/pruned"]["fingerprint"]
                if heal_on:
                    self.heal_stage = f"{rd}/{HEALED}"
                    self._heal(current, self.heal_stage, {"pruned": cur_fp, "heal": h, "seed": self.r["seed"],
                                                          "data_dir": self.data_dir})
                    current = str(self.dir / rd / "healed")
                    cur_fp = self.state.stages[f"{rd}/healed"]["fingerprint"]
                removed = sorted(removed + chosen)
                kept = [i for i in kept if i not in set(chosen)]
                scores[f"{sc['metric']}@round{r}"] = sc["scores"]
                rounds.append({"round": r, "removed_layers": chosen, "kept_layers": list(kept)})
            if self.target is not None and not self._target_met(removed):
                raise LayerpruneError(f"target {self.target.describe()} not met after removing {len(removed)} "
                                      "layers")
            # The final model of the last round becomes RUN/model (hard links, no copy). Iterative mode has no
            # "all k layers removed, never healed" model, so only dense and final are evaluated.
            final_fp = cur_fp
            if (self.dir / FINAL).exists():
                shutil.rmtree(self.dir / FINAL)
            _link_or_copy(Path(current), self.dir / FINAL)
        if not heal_on and not p["iterative"]:
            if (self.dir / FINAL).exists():
                shutil.rmtree(self.dir / FINAL)
            _link_or_copy(Path(comp_path) if comp_path else self.dir / PRUNED, self.dir / FINAL)

        # Evaluation and measurement.
        paths = {DENSE: self.source, PRUNED: pruned_path, COMPENSATED: comp_path, HEALED: str(self.dir / FINAL)}
        fps = {DENSE: self.source_fp, PRUNED: pruned_fp,
               COMPENSATED: self.state.stages[COMPENSATED]["fingerprint"] if comp_path else None,
               HEALED: final_fp}
        if not heal_on:  # the final model is the pruned one
            paths.pop(HEALED)
            if p["iterative"]:
                paths[PRUNED], fps[PRUNED] = str(self.dir / FINAL), final_fp
        evals = {w: (path, fp) for w in self.r["evaluate"]["models"] if (path := paths.get(w)) and (fp := fps.get(w))}
        # A model another run (a sweep's other cell) is evaluating now goes last: this run evaluates its own
        # models meanwhile, then links the published evaluation instead of idling on its lock.
        later = [w for w, (_, fp) in evals.items() if self.state.claimed(f"eval-{w}", self._eval_inputs(fp))]
        results: dict[str, Any] = {}
        for which in [w for w in evals if w not in later] + later:
            results[which] = {"eval": self._evaluate(which, *evals[which])}
        results = {w: results[w] for w in evals}
        bench = None
        if self.r["measure"]["enabled"]:
            # Healing can change the size (an untied head), so every model is measured on its own.
            # A compensated model has the pruned model's shapes: measured once, as the pruned one.
            todo = {k: v for k, v in paths.items() if v and k != COMPENSATED}
            bench = self._measure(todo, {k: fps[k] for k in todo})

        gguf = self._gguf(final_fp) if self.r["export"]["gguf"] else None
        manifest = self._manifest(removed, kept, scores, rounds, results, bench, similarity)
        manifest["compensation"] = compensation
        manifest["gguf"] = gguf
        if stability is not None:
            manifest["stability"] = stability
        if self.target is not None:
            manifest["target"] = target_info or {"target": self.target.describe(),
                                                 "value": self.sizes.after(removed)[self.target.kind],
                                                 "dense_value": self.sizes.after([])[self.target.kind]}
        manifest["timings"]["total_s"] = round(time.perf_counter() - t0, 1)
        self._finish(manifest)
        return manifest

    # ---- outputs ------------------------------------------------------------------------------------------
    def _manifest(self, removed: list[int], kept: list[int], scores: dict[str, Any], rounds: list[dict],
                  results: dict[str, Any], bench: dict[str, Any] | None,
                  similarity: list[list[float]] | None) -> RunManifest:
        out_results: dict[str, Any] = {}
        for which, r in results.items():
            ev = r["eval"]
            row: dict[str, Any] = {"ppl": {ds: {"ppl": v["ppl"], "ppl_stderr": v.get("ppl_stderr"), "card": v["card"]}
                                          for ds, v in ev["ppl"].items()}}
            zs = ev.get("zero_shot")
            if zs:
                row["zero_shot"] = zs["tasks"]
                row["avg_acc"] = zs.get("mean_acc")
            if ev.get("generative"):
                row["generative"] = ev["generative"]["tasks"]
            if ev.get("generation"):
                row["generation"] = ev["generation"]
            if ev.get("compare"):
                row["compare"] = {ds: {k: c.get(k) for k in ("kl_teacher_pruned", "top1_agreement", "tokens")}
                                  for ds, c in ev["compare"].items()}
            out_results[which] = row
        if bench:
            for which in STAGES:
                b = bench.get(PRUNED if which == COMPENSATED else which)
                if b is not None and (which != COMPENSATED or which in out_results):
                    sp = (b.get("speed") or [{}])[0]
                    out_results.setdefault(which, {}).update({
                        "params": b["params"]["total"], "non_embedding_params": b["params"].get("non_embedding"),
                        "macs": b["macs"]["total"],
                        "prefill_ms": sp.get("prefill_seconds", {}).get("median", math.nan) * 1000,
                        "decode_tok_s": sp.get("decode_tokens_per_s")})
        heal_stage = self.state.stages.get(self.heal_stage or FINAL, {}).get("result") \
            if self.r["heal"]["method"] != NO_HEAL else None
        return {
            "model": self.r["model"], "source_model": self.source, "recipe": self.r,
            "original_num_layers": self.n0, "removed_layers": sorted(removed), "kept_layers": kept,
            "scores": scores, "similarity": {"cka": similarity} if similarity else None, "heal": heal_stage, "results": out_results,
            "measure": bench, "rounds": rounds or None,
            "stages": {k: {"fingerprint": v["fingerprint"], "seconds": v["seconds"], "inputs": v["inputs"]}
                       for k, v in self.state.stages.items()},
            "timings": {k: v["seconds"] for k, v in self.state.stages.items()},
            "library_versions": library_versions(), "final_model": str(self.dir / FINAL),
        }

    def _finish(self, manifest: RunManifest) -> None:
        from ..report import model_card, write_exports, write_report

        write_json(self.dir / MANIFEST, manifest)
        final = self.dir / FINAL
        # The final model's own manifest speaks in original indices of the source model.
        mf = final / MANIFEST
        m = read_json(mf) if mf.is_file() else {}
        m.update({"source_model": self.r["model"], "original_num_layers": self.n0,
                  "removed_layers": manifest["removed_layers"], "kept_layers": manifest["kept_layers"],
                  "recipe": self.r["name"]})
        if mf.is_file():
            mf.unlink()  # may be a hard link shared with a round folder: never write through it
        write_json(mf, m)
        card = final / "README.md"
        if card.exists():
            card.unlink()
        card.write_text(model_card(manifest), encoding="utf-8")
        write_report(self.dir, manifest)
        write_exports(self.dir, manifest)


def run_recipe(recipe: str | os.PathLike | dict[str, Any], out_dir: str | os.PathLike | None = None, *,
               overrides: list[str] | None = None, resume: bool = False, overwrite: bool = False,
               log: Callable[[str], None] = print, shared: str | os.PathLike | None = None,
               heal_processes: int = 1) -> RunManifest:
    """Run a recipe file (or an already validated dict) into ``out_dir`` (default ``runs/<name>``).

    ``shared``: a folder of stage outputs shared with other runs (a sweep's cells): the stages that depend on
    their inputs only (score, dense evaluation, pruned and compensated models) are computed once per
    fingerprint across every run using it. ``heal_processes`` > 1 heals under torchrun with that many processes
    (one per GPU), at the recipe's global batch: the same stage, the same fingerprint."""
    from .schema import apply_overrides, validate

    rec = validate(apply_overrides(recipe, overrides or [])) if isinstance(recipe, dict) else \
        load_recipe(recipe, overrides)
    out = Path(out_dir or Path("runs") / rec["name"])
    if out.is_dir() and not (out / "state.json").exists() and \
            {f.name for f in out.iterdir()} <= {"recipe.yaml", BACKGROUND}:
        shutil.rmtree(out)  # a run that failed before its first stage finished holds nothing to keep
    if not resume:
        from ..models import resolve_model

        check_out_dir(out, overwrite, (resolve_model(rec["model"]),) if rec.get("model") else ())
        if out.exists():
            shutil.rmtree(out)
    if heal_processes < 1:
        raise LayerpruneError("heal processes must be at least 1")
    return RecipeRun(rec, out, resume=resume, log=log, shared=Path(shared) if shared else None,
                     heal_processes=heal_processes).execute()
