"""The layout's promises: stages import only downward (no import cycle, function-level imports included) and
architecture facts live in arch/."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "layerprune"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> layerprune modules it imports anywhere (module level or inside functions)."""
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                    if cand in mods and cand != name:
                        deps.add(cand)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods and a.name != name}
        graph[name] = deps
    return graph


def _stage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_stages():
    graph = import_graph()
    stages: dict[str, set[str]] = {}
    for m, deps in graph.items():
        stages.setdefault(_stage(m), set()).update(_stage(d) for d in deps if _stage(d) != _stage(m))
    assert _cycle(stages) is None, " -> ".join(_cycle(stages) or [])


def test_no_import_cycle_between_modules():
    # A package's __init__ re-exporting its own modules is not a cycle of stages; everything else is.
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and d == _stage(m))} for m, deps in import_graph().items()}
    cyc = _cycle(graph)
    assert cyc is None, " -> ".join(cyc or [])


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_tested_architectures_are_the_test_configs():
    from layerprune.arch import TESTED_TYPES

    from conftest import TINY_CONFIGS

    assert set(TESTED_TYPES) == set(TINY_CONFIGS)


def test_adapter_facts_match_the_models():
    """Gated-MLP flags and fold points in the adapters agree with the modules of every tested architecture."""
    from layerprune.arch import get_module, parts

    from conftest import ARCHS, make_tiny

    for arch in ARCHS:
        p = parts(make_tiny(arch))
        layer = p.layers[0]
        names = {n.rsplit(".", 1)[-1] for n, _ in layer.named_modules()}
        assert p.adapter.gated_mlp is bool(names & {"gate_proj", "gate_up_proj"}), arch
        for path in (p.adapter.mlp_out, p.adapter.attn_out, p.adapter.mlp_post_norm, p.adapter.attn_post_norm):
            assert path is None or get_module(layer, path) is not None, (arch, path)
        assert p.adapter.mlp_out and p.adapter.attn_out, arch


def test_no_model_type_lists_outside_arch():
    """Architecture facts are adapter data: no module outside arch/ keeps a list of model types."""
    import re

    offenders = []
    for path in ROOT.rglob("*.py"):
        if "arch" in path.relative_to(ROOT).parts:
            continue
        text = path.read_text()
        if re.search(r'\(\s*"(llama|gemma|gpt2|qwen2)"\s*,\s*"', text) or re.search(r'\{\s*"(llama|gemma)"\s*,', text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_options_have_one_source():
    """CLI flags and recipe keys are generated from the stage configs and the metric classes."""
    import dataclasses

    from layerprune.cli import build_parser
    from layerprune.compensation import CompensationConfig
    from layerprune.healing.config import HealConfig
    from layerprune.healing.methods import METHODS
    from layerprune.metrics.base import metric_options
    from layerprune.recipe.schema import SCHEMA

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    dests = {name: {a.dest: a for a in p._actions} for name, p in sub.items()}
    heal_fields = [f for f in dataclasses.fields(HealConfig)]
    assert {f.name for f in heal_fields if f.metadata.get("cli") is not False} <= set(dests["heal"])
    assert set(SCHEMA["heal"]) == {f.name for f in heal_fields if f.metadata.get("recipe") is not False}
    assert SCHEMA["heal"]["lr"][1] == HealConfig().lr and SCHEMA["heal"]["tie_mode"][1] == HealConfig().tie_mode
    assert tuple(dests["heal"]["method"].choices) == tuple(METHODS)
    assert {f.name for f in dataclasses.fields(CompensationConfig)} <= set(dests["compensate"])
    assert set(SCHEMA["compensate"]) == {f.name for f in dataclasses.fields(CompensationConfig)}
    assert set(metric_options()) <= set(dests["score"]) and set(metric_options()) <= set(dests["prune"])
