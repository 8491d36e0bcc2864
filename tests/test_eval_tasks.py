"""Offline lm-eval task configs: same requests as the built-in tasks, one-line errors, a small task index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from layerprune.errors import LayerpruneError
from layerprune.evaluation.tasks import SPECS, SUITE, TaskSource, lm_eval_tasks_dir, local_files, subjects

# (reported task, leaf task whose requests are compared, built-in YAML relative to lm_eval/tasks, local file)
CASES = [
    ("piqa", "piqa", "piqa/piqa.yaml", "eval/piqa/validation.jsonl"),
    ("arc_easy", "arc_easy", "arc/arc_easy.yaml", "eval/arc_easy/test.jsonl"),
    ("arc_challenge", "arc_challenge", "arc/arc_challenge.yaml", "eval/arc_challenge/test.jsonl"),
    ("openbookqa", "openbookqa", "openbookqa/openbookqa.yaml", "eval/openbookqa/test.jsonl"),
    ("winogrande", "winogrande", "winogrande/default.yaml", "eval/winogrande/validation.jsonl"),
    ("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", "eval/hellaswag/validation.jsonl"),
    ("mmlu", "mmlu_anatomy", "mmlu/default/mmlu_anatomy.yaml", "eval/mmlu/test/anatomy.jsonl"),
    ("mmlu", "mmlu_high_school_physics", "mmlu/default/mmlu_high_school_physics.yaml",
     "eval/mmlu/test/high_school_physics.jsonl"),
    ("cmmlu", "cmmlu_anatomy", "cmmlu/cmmlu_anatomy.yaml", "eval/cmmlu/test/anatomy.jsonl"),
]
N_ROWS = 6


def _rows(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


def _builtin_task(rel_yaml: str, rows: list[dict]):
    """The installed built-in task definition applied to ``rows`` (its Hub download replaced by the rows)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_eval_tasks_dir() / rel_yaml, resolve_func=True)
    for k in ("tag", "group", "task_list"):
        cfg.pop(k, None)
    assert "/" in cfg["dataset_path"] or cfg["dataset_path"] != "json"  # really the Hub definition

    class Injected(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            # Every split the built-in config names gets the same rows (only the evaluation split is scored).
            names = {self.config.training_split, self.config.validation_split, self.config.test_split,
                     self.config.fewshot_split} - {None}
            self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in names})

    return Injected(config=cfg)


def _requests(task, n: int) -> list[tuple]:
    task.build_all_requests(limit=n, rank=0, world_size=1)
    return sorted((i.doc_id, i.idx, i.request_type, tuple(i.args)) for i in task.instances)


@pytest.fixture(scope="module")
def offline_tasks(data_dir):
    names = sorted({c[0] for c in CASES})
    with TaskSource(names, data_dir) as src:
        yield src.load()


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_offline_requests_equal_builtin(case, offline_tasks, data_dir):
    _, leaf, rel_yaml, rel_file = case
    ours = offline_tasks["tasks"][leaf]
    assert ours.config.dataset_path == "json"
    theirs = _builtin_task(rel_yaml, _rows(data_dir / rel_file, N_ROWS))
    req_ours, req_theirs = _requests(ours, N_ROWS), _requests(theirs, N_ROWS)
    assert len(req_ours) >= 2 * N_ROWS  # every doc has at least two choices
    assert req_ours == req_theirs
    # Same gold answers and metrics, too.
    docs_o = [d for _, d in ours.doc_iterator(limit=N_ROWS)]
    docs_t = [d for _, d in theirs.doc_iterator(limit=N_ROWS)]
    assert [ours.doc_to_target(d) for d in docs_o] == [theirs.doc_to_target(d) for d in docs_t]
    assert sorted(ours._metric_fn_list) == sorted(theirs._metric_fn_list)


def test_groups_keep_builtin_structure(offline_tasks):
    groups = offline_tasks["groups"]
    assert {"mmlu", "cmmlu", "mmlu_stem", "mmlu_humanities"} <= set(groups)
    assert len(groups["mmlu"].get_all_tasks()) == 57
    assert len(groups["cmmlu"].get_all_tasks()) == 67
    assert len(subjects("mmlu")) == 57 and len(subjects("cmmlu")) == 67


def _copy_layout(src: Path, dst: Path, rows: int = 2) -> None:
    """A data folder with the first ``rows`` lines of every eval file (the shared layout, tiny)."""
    for f in (src / "eval").rglob("*.jsonl"):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with f.open(encoding="utf-8") as fh:
            out.write_text("".join(next(fh) for _ in range(rows)), encoding="utf-8")


def test_missing_file_is_one_line_error(tmp_path, data_dir):
    _copy_layout(data_dir, tmp_path)
    (tmp_path / "eval/piqa/validation.jsonl").unlink()
    with pytest.raises(LayerpruneError) as e:
        with TaskSource(["arc_easy", "piqa"], tmp_path):
            pass
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "eval/piqa/validation.jsonl") in msg
    (tmp_path / "eval/mmlu/test/anatomy.jsonl").unlink()
    with pytest.raises(LayerpruneError, match="anatomy.jsonl"):
        local_files("mmlu", tmp_path)


def test_dev_split_only_needed_for_fewshot(tmp_path, data_dir):
    _copy_layout(data_dir, tmp_path)
    shutil.rmtree(tmp_path / "eval/mmlu/dev")
    files = local_files("mmlu", tmp_path, num_fewshot=0)
    assert all(set(f) == {"test"} for f in files.values())
    with pytest.raises(LayerpruneError, match="dev"):
        local_files("mmlu", tmp_path, num_fewshot=5)


def test_unknown_offline_task_is_error(data_dir):
    with pytest.raises(LayerpruneError, match="no offline layout"):
        with TaskSource(["boolq"], data_dir):
            pass


def test_online_index_covers_only_requested_folders():
    src = TaskSource(list(SUITE))
    paths = src._online_paths()
    root = lm_eval_tasks_dir()
    assert len(paths) == len({SPECS[t].builtin_dir for t in SUITE})
    assert all(Path(p).is_relative_to(root) and Path(p) != root for p in paths)
    with TaskSource(["arc_easy", "mmlu"]) as s:
        assert {"arc_easy", "mmlu", "mmlu_anatomy"} <= set(s.manager.all_tasks)
        assert "gsm8k" not in s.manager.all_tasks  # the full index was not built


def test_failed_open_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    with pytest.raises(LayerpruneError):
        with TaskSource(["piqa"], tmp_path / "empty_data"):
            pass
    assert list((tmp_path / "t").iterdir()) == []
