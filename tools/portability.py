"""Run the notebooks under every CPU kernel level and thread count: the portability matrix.

A claim that rests on a training run, a random draw or a timing must hold on the reader's
machine, not only on ours. PyTorch picks its vectorised CPU kernels at start-up (no SIMD,
AVX2 or AVX-512), and each level rounds differently, so a training trajectory that one
level produces can differ on another. This tool runs each notebook in a fresh kernel per
setting and prints one line per notebook and setting; it exits 1 if any run failed.

    python tools/portability.py                      # every book/ and solutions/ notebook
    python tools/portability.py --only 05 06         # notebooks whose name starts so
    python tools/portability.py --measured           # those whose claims rest on training,
                                                     # random draws or timing (MEASURED)
    python tools/portability.py --kernels default --threads 2
    python tools/portability.py --only 02 --seeds 1 2 3   # other global seeds
    python tools/portability.py --oldest             # the same, on the oldest torch we
                                                     # accept (a venv made once, .venv-oldest)

Settings: ``ATEN_CPU_CAPABILITY`` = default, avx2, avx512 (a level the CPU lacks is
reported and skipped), times ``OMP_NUM_THREADS`` = 1 and 2. A notebook that pins its own
thread count (``torch.set_num_threads``) keeps it: that is what a reader runs too. An
injected first cell checks that the level asked for is the level PyTorch uses.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["default", "avx2", "avx512"]
# Notebooks whose asserted claims rest on a training run, a random draw or a timing. CI
# (tests/test_portability.py) runs these a second time under the plainest kernels. A
# chapter that adds such a claim adds itself here.
MEASURED = [
    "book/03_multi_head_attention.ipynb",
    "book/05_residual_connections.ipynb",
    "book/06_layernorm_vs_batchnorm.ipynb",
    "book/07_full_transformer.ipynb",
    "book/08_fast_decoding.ipynb",
    "book/09_gpt.ipynb",
    "solutions/07_full_transformer.ipynb",
]
OLDEST = ["torch==2.2.2", "numpy<2"]


def notebooks(only: list[str] | None, measured: bool = False) -> list[Path]:
    if measured:
        found = [ROOT / name for name in MEASURED]
    else:
        found = sorted((ROOT / "book").glob("*.ipynb")) + sorted(
            (ROOT / "solutions").glob("*.ipynb")
        )
    if only:
        found = [p for p in found if any(p.name.startswith(prefix) for prefix in only)]
    return found


def cpu_levels() -> list[str]:
    """The levels this CPU can run, as ATEN_CPU_CAPABILITY spells them."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    best = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=dict(os.environ, ATEN_CPU_CAPABILITY="")).stdout
    best = best.strip().lower()
    return LEVELS[: LEVELS.index(best) + 1] if best in LEVELS else ["default"]


def describe_failure(error: BaseException, nb=None) -> str:
    """One line for a notebook that failed: the cell's error, the line that raised it and,
    given the executed notebook, the last lines the failing cell printed (the figures a
    measured claim prints before it asserts them)."""
    from nbclient.exceptions import CellExecutionError

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # no terminal colours
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if not isinstance(error, CellExecutionError):
        # a timeout or a dead kernel: the first line says so; the rest of a timeout's
        # text previews the cell's source, whose lines are no error
        return first
    what = next((line for line in reversed(lines) if "Error" in line), first)
    # IPython marks the failing line with an arrow: "----> 7", or "---> 12"
    where = next((line for line in reversed(lines) if re.match(r"-+>\s*\d+", line)), "")
    where = re.sub(r"^-+>\s*\d*\s*", "", where)
    described = f"{what} (at: {where})" if where else what
    printed = printed_before_failure(nb) if nb is not None else ""
    return f"{described}; it printed: {printed}" if printed else described


def printed_before_failure(nb, lines: int = 3) -> str:
    """The last non-empty lines of standard output of the first cell that raised, joined by
    ' / '; '' when it printed nothing."""
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        if any(out.get("output_type") == "error" for out in outputs):
            text = "".join(out.get("text", "") for out in outputs
                           if out.get("output_type") == "stream" and out.get("name") == "stdout")
            shown = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
            return " / ".join(shown)
    return ""


def run_one(
    path: Path, level: str, threads: int, timeout: int, seed: int | None = None
) -> tuple[bool, float, str]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell(
        "import torch as _t\n"  # torch before 2.3 calls the plainest level "NO AVX"
        "_level = _t.backends.cpu.get_cpu_capability().lower().replace('no avx', 'default')\n"
        f"assert _level == {level!r}, _level\n"
        "del _t, _level"
    )
    if seed is not None:  # another draw of the notebook's global random stream
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.source = cell.source.replace("torch.manual_seed(0)",
                                                  f"torch.manual_seed({seed})")
    nb.cells.insert(0, probe)
    env = dict(os.environ, MPLBACKEND="Agg", ATEN_CPU_CAPABILITY=level,
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute(env=env, cwd=str(path.parent), stderr=subprocess.DEVNULL)
    except (CellExecutionError, CellTimeoutError, DeadKernelError, TimeoutError) as error:
        return False, time.perf_counter() - start, describe_failure(error, nb)[:600]
    return True, time.perf_counter() - start, ""


def oldest_python() -> Path:
    venv = ROOT / ".venv-oldest"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv.name} with {' '.join(OLDEST)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
        reqs = [r for r in reqs if r and not r.startswith(("torch==", "numpy=="))]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *OLDEST, *reqs, "-e", str(ROOT)],
                       check=True)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 05 06")
    parser.add_argument("--measured", action="store_true",
                        help="only the notebooks whose claims rest on training or timing")
    parser.add_argument("--kernels", nargs="*", default=LEVELS, choices=LEVELS)
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--seeds", nargs="*", type=int, default=[None],
                        help="replace the notebooks' torch.manual_seed(0) by each of these")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--oldest", action="store_true",
                        help=f"run on the oldest supported torch ({' '.join(OLDEST)})")
    args = parser.parse_args(argv)

    if args.oldest:
        python = oldest_python()
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--oldest"]
        return subprocess.run([str(python), str(Path(__file__).resolve()), *rest]).returncode

    import torch

    paths = notebooks(args.only, args.measured)
    if not paths:
        print(f"no notebook in book/ or solutions/ starts with {' or '.join(args.only or [])}")
        return 2
    available = cpu_levels()
    print(f"torch {torch.__version__}; this CPU runs levels: {', '.join(available)}", flush=True)
    failures = 0
    for path in paths:
        for level in args.kernels:
            if level not in available:
                print(f"{path.parent.name}/{path.name:<40} {level:>8}   -  skipped: CPU lacks it")
                continue
            for threads in args.threads:
                for seed in args.seeds:
                    ok, seconds, why = run_one(path, level, threads, args.timeout, seed)
                    failures += not ok
                    verdict = "pass" if ok else "FAIL"
                    drawn = "" if seed is None else f" seed {seed}"
                    print(f"{path.parent.name}/{path.name:<40} {level:>8} {threads}t{drawn} "
                          f"{verdict} {seconds:6.1f} s  {why}", flush=True)
    print(f"{failures} failed" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
