"""Task configs for lm-eval: the built-in zero-shot suite, online (Hub) or offline (local ``eval/`` files).

Offline tasks are the built-in task YAMLs with only the data source swapped: for every requested task a small
YAML is generated into a temporary include folder that ``include:``\\ s the installed built-in file and overrides
``dataset_path: json`` + ``dataset_kwargs.data_files`` and the split keys. Prompts (``doc_to_text``), choices,
targets, ``process_docs``, metrics and group aggregation therefore come from lm-eval itself. Task and group
names stay the built-in ones, so results read the same online and offline.

Start-up cost: building lm-eval's full task index parses every YAML it ships (seconds). The task manager here
indexes only the folders the requested tasks live in (online) or the generated folder (offline).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LayerpruneError

# The seed's zero-shot suite, in the order its tables use.
SUITE: tuple[str, ...] = ("mmlu", "cmmlu", "piqa", "openbookqa", "winogrande", "hellaswag", "arc_easy",
                          "arc_challenge")


@dataclass(frozen=True)
class TaskSpec:
    """Where a built-in task lives in lm-eval and where its local copy lives in a data folder.

    ``files`` maps split name -> path relative to the data folder; ``{s}`` is the subject for groups.
    ``split_keys`` are the config keys that name the splits (set on the offline config; everything else is
    taken from the built-in YAML unchanged).
    """

    name: str
    builtin_dir: str                      # folder under lm_eval/tasks holding the task (or group) YAMLs
    builtin_yaml: str                     # the task's (or group's) own YAML in that folder
    files: dict[str, str]
    split_keys: dict[str, str | None]
    group: bool = False
    subtask_prefix: str = ""              # group members are <prefix><subject>.yaml
    optional_splits: tuple[str, ...] = field(default=())   # splits needed only for few-shot


SPECS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa", "piqa", "piqa.yaml", {"validation": "eval/piqa/validation.jsonl"},
                     {"validation_split": "validation"}),
    "arc_easy": TaskSpec("arc_easy", "arc", "arc_easy.yaml", {"test": "eval/arc_easy/test.jsonl"},
                         {"test_split": "test"}),
    "arc_challenge": TaskSpec("arc_challenge", "arc", "arc_challenge.yaml",
                              {"test": "eval/arc_challenge/test.jsonl"}, {"test_split": "test"}),
    "openbookqa": TaskSpec("openbookqa", "openbookqa", "openbookqa.yaml", {"test": "eval/openbookqa/test.jsonl"},
                           {"test_split": "test"}),
    "winogrande": TaskSpec("winogrande", "winogrande", "default.yaml",
                           {"validation": "eval/winogrande/validation.jsonl"}, {"validation_split": "validation"}),
    "hellaswag": TaskSpec("hellaswag", "hellaswag", "hellaswag.yaml",
                          {"validation": "eval/hellaswag/validation.jsonl"}, {"validation_split": "validation"}),
    "mmlu": TaskSpec("mmlu", "mmlu/default", "_mmlu.yaml",
                     {"test": "eval/mmlu/test/{s}.jsonl", "dev": "eval/mmlu/dev/{s}.jsonl"},
                     {"test_split": "test", "fewshot_split": "dev"}, group=True, subtask_prefix="mmlu_",
                     optional_splits=("dev",)),
    # Generative (generate_until): lm-eval's own prompt, answer extraction (strict / flexible) and exact match.
    "gsm8k": TaskSpec("gsm8k", "gsm8k", "gsm8k.yaml", {"test": "eval/gsm8k/test.jsonl", "train": "eval/gsm8k/train.jsonl"},
                      {"test_split": "test", "training_split": "train", "fewshot_split": "train"},
                      optional_splits=("train",)),
    "cmmlu": TaskSpec("cmmlu", "cmmlu", "_cmmlu.yaml",
                      {"test": "eval/cmmlu/test/{s}.jsonl", "dev": "eval/cmmlu/dev/{s}.jsonl"},
                      {"test_split": "test", "fewshot_split": "dev"}, group=True, subtask_prefix="cmmlu_",
                      optional_splits=("dev",)),
}


def lm_eval_tasks_dir() -> Path:
    """The ``lm_eval/tasks`` folder of the installed lm-eval (found without importing lm_eval)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LayerpruneError("evaluation needs lm-eval: pip install 'lm_eval[hf]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """'mmlu,piqa' or a list -> a list of task names without duplicates (None -> the 8-task suite)."""
    if tasks is None:
        return list(SUITE)
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for t in items:
        t = str(t).strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise LayerpruneError("no tasks given")
    return out


def check_tasks(tasks: str | Sequence[str] | None, data_dir: str | os.PathLike | None = None,
                num_fewshot: int = 0) -> list[str]:
    """The task list, refused before any model work when a name is unknown or its local files are missing
    (offline: file checks only; online: lm-eval's task index)."""
    names = parse_tasks(tasks)
    if data_dir is not None:
        for n in names:
            if not Path(n).is_file():
                local_files(n, Path(data_dir), num_fewshot)
    else:
        with TaskSource(names, None, num_fewshot):
            pass
    return names


def subjects(name: str) -> list[str]:
    """Subjects of a group task (``mmlu``/``cmmlu``), read from the built-in subtask YAML file names."""
    spec = SPECS[name]
    folder = lm_eval_tasks_dir() / spec.builtin_dir
    subs = sorted(p.stem[len(spec.subtask_prefix):] for p in folder.glob(f"{spec.subtask_prefix}*.yaml"))
    if not subs:
        raise LayerpruneError(f"lm-eval has no subtasks for '{name}' under {folder}")
    return subs


def local_files(name: str, data_dir: Path, num_fewshot: int = 0) -> dict[str, dict[str, Path]]:
    """Local files per (sub)task: ``{task_name: {split: path}}``; a missing file is a one-line error."""
    if name not in SPECS:
        known = ", ".join(sorted(SPECS))
        raise LayerpruneError(f"task '{name}' has no offline layout (known: {known}); run it online or pass "
                              "a YAML path")
    spec = SPECS[name]
    units: list[tuple[str, str | None]] = (
        [(f"{spec.subtask_prefix}{s}", s) for s in subjects(name)] if spec.group else [(name, None)])
    out: dict[str, dict[str, Path]] = {}
    for task_name, subject in units:
        files: dict[str, Path] = {}
        for split, rel in spec.files.items():
            path = data_dir / (rel.format(s=subject) if subject else rel)
            if not path.is_file():
                if split in spec.optional_splits and num_fewshot == 0:
                    continue
                raise LayerpruneError(f"task {name}: local data file missing: {path} "
                                      f"(expected the layout of shared/data: {rel})")
            files[split] = path
        out[task_name] = files
    return out


def _offline_override(spec: TaskSpec, files: dict[str, Path]) -> dict[str, Any]:
    keys: dict[str, Any] = {"training_split": None, "validation_split": None, "test_split": None}
    for k, split in spec.split_keys.items():
        keys[k] = split if split in files else None
    return {"dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}}, **keys}


def write_offline_configs(tasks: Iterable[str], data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          num_fewshot: int = 0) -> Path:
    """Write lm-eval YAMLs for ``tasks`` reading ``data_dir`` into ``out_dir`` (an lm-eval include path).

    Each task (or group member) YAML is ``include: <built-in yaml>`` plus the data-source overrides; group
    YAMLs include the built-in group files unchanged. Usable from the lm-eval CLI too:
    ``lm_eval --include_path OUT_DIR --tasks mmlu ...``.
    """
    import yaml

    data_dir = Path(data_dir).resolve()
    out = Path(out_dir)
    root = lm_eval_tasks_dir()
    for name in tasks:
        files_by_task = local_files(name, data_dir, num_fewshot)  # an unknown task is a one-line error
        spec = SPECS[name]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        src = root / spec.builtin_dir
        if spec.group:
            # Group and subgroup YAMLs (e.g. _mmlu.yaml, _mmlu_stem.yaml) carry no data source: include as-is.
            for g in sorted(src.glob("_*.yaml")):
                (folder / g.name).write_text(yaml.safe_dump({"include": str(g)}), encoding="utf-8")
            for task_name, files in files_by_task.items():
                body = {"include": str(src / f"{task_name}.yaml"), **_offline_override(spec, files)}
                (folder / f"{task_name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
        else:
            files = files_by_task[name]
            body = {"include": str(src / spec.builtin_yaml), **_offline_override(spec, files)}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return out


def fingerprint(tasks: Iterable[str], data_dir: str | os.PathLike, num_fewshot: int = 0) -> dict[str, Any]:
    """Per task: the local files used and one SHA-256 over their bytes (in sorted path order)."""
    data_dir = Path(data_dir).resolve()
    out: dict[str, Any] = {}
    for name in tasks:
        paths = sorted(p for files in local_files(name, data_dir, num_fewshot).values() for p in files.values())
        h = hashlib.sha256()
        for p in paths:
            h.update(p.relative_to(data_dir).as_posix().encode())
            h.update(p.read_bytes())
        rels = [p.relative_to(data_dir).as_posix() for p in paths]
        out[name] = {"files": rels if len(rels) <= 4 else f"{len(rels)} files under {Path(rels[0]).parts[0]}/"
                     f"{Path(rels[0]).parts[1]}/", "sha256": h.hexdigest()}
    return out


class TaskSource:
    """A TaskManager that indexes only what ``tasks`` need; offline when ``data_dir`` is given.

    Use as a context manager: the generated include folder (offline) is removed on exit.
    """

    def __init__(self, tasks: Sequence[str], data_dir: str | os.PathLike | None = None, num_fewshot: int = 0,
                 config_dir: str | os.PathLike | None = None) -> None:
        self.tasks = list(tasks)
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.num_fewshot = num_fewshot
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._config_dir = Path(config_dir) if config_dir is not None else None
        self.manager: Any = None

    @property
    def offline(self) -> bool:
        return self.data_dir is not None

    def __enter__(self) -> TaskSource:
        try:
            return self._open()
        except BaseException:
            self.__exit__()  # __exit__ is not called when __enter__ raises: remove the temporary folder here
            raise

    def _open(self) -> TaskSource:
        from lm_eval.tasks import TaskManager

        if self.offline:
            if self._config_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="layerprune-tasks-")
                self._config_dir = Path(self._tmp.name)
            write_offline_configs(self.tasks, str(self.data_dir), str(self._config_dir), self.num_fewshot)
            self.manager = TaskManager(include_path=str(self._config_dir), include_defaults=False)
        else:
            self.manager = TaskManager(include_path=self._online_paths(), include_defaults=False)
        missing = [t for t in self.tasks if t not in self.manager.all_tasks and not Path(t).is_file()]
        if missing:
            raise LayerpruneError(f"unknown lm-eval task(s): {', '.join(missing)}")
        return self

    def _online_paths(self) -> list[str]:
        root = lm_eval_tasks_dir()
        dirs: list[str] = []
        for t in self.tasks:
            if t in SPECS:
                d = str(root / SPECS[t].builtin_dir)
            elif Path(t).is_file():
                continue
            else:
                # Unknown to us: index everything once (slow, but general).
                return [str(root)]
            if d not in dirs:
                dirs.append(d)
        return dirs

    def load(self) -> dict[str, Any]:
        """``TaskManager.load`` of the requested tasks: ``{"tasks", "groups", "group_map"}``."""
        try:
            return self.manager.load(self.tasks)
        except (FileNotFoundError, ConnectionError, OSError) as e:
            where = f"local data in {self.data_dir}" if self.offline else "the Hugging Face Hub"
            raise LayerpruneError(f"cannot load task data from {where}: {str(e).splitlines()[0]}") from None

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
