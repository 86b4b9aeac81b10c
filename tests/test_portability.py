"""Claims that rest on training, random draws or timing hold under other CPU kernels.

The book build runs every chapter with the best vector kernels this CPU has (AVX2 or
AVX-512 on most machines). Each level rounds differently, and a training trajectory can
change with it: chapter 5 once asserted a result that held with no SIMD and failed with
AVX2 and AVX-512. So the notebooks listed in ``tools/portability.py``'s ``MEASURED``
run a second time here under ``ATEN_CPU_CAPABILITY=default``, PyTorch's plainest
kernels, which differ from the build's on any machine with AVX2. The full matrix (every
level, 1 and 2 threads, oldest torch) is ``python tools/portability.py [--oldest]``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("portability", ROOT / "tools" / "portability.py")
portability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(portability)


def _run_plain(name: str) -> tuple[bool, float, str]:
    """Run one notebook under the plainest kernels, in a process of its own."""
    code = (
        "import json, sys; from pathlib import Path; "
        f"sys.path.insert(0, {str(ROOT / 'tools')!r}); import portability; "
        f"print(json.dumps(portability.run_one(Path({str(ROOT / name)!r}), 'default', "
        "threads=1, timeout=900)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return False, 0.0, done.stderr.strip().splitlines()[-1:]
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def plain_runs() -> dict[str, tuple[bool, float, str]]:
    """All of MEASURED, two at a time: each notebook runs on one thread, so the two
    cores of a CI machine each take one (the two longest notebooks start first)."""
    long = ("book/07_", "book/09_")  # the two longest start first, one per core
    names = sorted(portability.MEASURED, key=lambda n: not n.startswith(long))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(_run_plain, names)))
    return results


@pytest.mark.parametrize("name", portability.MEASURED)
def test_measured_notebook_passes_with_the_plainest_kernels(name, plain_runs):
    ok, seconds, why = plain_runs[name]
    assert ok, f"{name} fails under ATEN_CPU_CAPABILITY=default after {seconds:.0f} s: {why}"


def test_every_measured_notebook_exists():
    assert all((ROOT / name).exists() for name in portability.MEASURED)


def test_a_claim_true_on_one_kernel_level_only_fails(tmp_path):
    """Guard: the run really uses the level asked for, so such a claim is caught."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import torch\nprint('level', torch.backends.cpu.get_cpu_capability())"
        + "\n" * 10  # line 12: IPython marks it "--->", not "---->"
        + "assert torch.backends.cpu.get_cpu_capability() != 'DEFAULT'"
    )]
    path = tmp_path / "claim.ipynb"
    nbformat.write(nb, path)
    ok, _, why = portability.run_one(path, "default", threads=1, timeout=60)
    assert not ok and "AssertionError" in why
    assert "get_cpu_capability() != 'DEFAULT'" in why, why  # the report names the line
    assert why.endswith("it printed: level DEFAULT"), why  # and what the cell printed
