"""Run every benchmark in this folder in turn (`make bench`), each with its defaults.

Each script prints its own table of ratios measured side by side in one run; this only
runs them one after another so they never compete for the CPU, and lists any that failed.

    python benchmarks/run_all.py                 # all (about an hour on a 2-core CPU)
    python benchmarks/run_all.py loader eval     # only bench_loader.py and bench_eval.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
        if not scripts:
            print(
                f"no benchmark named {names}; have: {[s.stem.removeprefix('bench_') for s in HERE.glob('bench_*.py')]}"
            )
            return 2
    failed = []
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        start = time.perf_counter()
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
        print(f"=== {script.name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
