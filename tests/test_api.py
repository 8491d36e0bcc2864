"""The public API: every name is the same object on every access, and no public name is also a submodule."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import layerprune


def test_every_public_name_is_stable_in_a_fresh_interpreter():
    code = (
        "import layerprune as lp, importlib\n"
        "for n in lp.__all__:\n"
        "    a = getattr(lp, n)\n"
        "    importlib.import_module('layerprune.' + lp._API[n])  # importing the defining module again\n"
        "    b = getattr(lp, n)\n"
        "    assert a is b, n\n"
        "    assert not type(a).__name__ == 'module', n\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_public_name_is_a_submodule():
    subs = {m.name for m in pkgutil.iter_modules(layerprune.__path__)}
    assert not set(layerprune.__all__) & subs


def test_repeated_calls_work():
    import torch

    from layerprune.data.calibration import Calibration

    from conftest import make_tiny

    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cal = Calibration(ids, torch.ones_like(ids))
    for _ in range(2):
        res = layerprune.score(make_tiny("llama"), ["bi"], cal, progress=False)
        assert len(res.results["bi"].scores) == 6
    for _ in range(2):
        m = layerprune.measure(make_tiny("llama"), seq_len=8, batches=(1,), new_tokens=2, repeats=1)
        assert m["params"]["total"] > 0
    assert callable(layerprune.heal) and callable(layerprune.evaluate) and callable(layerprune.run_recipe)
