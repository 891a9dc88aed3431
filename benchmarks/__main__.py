"""Run benchmarks: ``python -m benchmarks`` (all) or ``python -m benchmarks stream delta``.

Each ``benchmarks/bench_<name>.py`` has ``run() -> list[str]``: result lines that put our
figure next to the peer tool's, measured in the same run, as a ratio.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(m.name[6:] for m in pkgutil.iter_modules([str(here)])
                   if m.name.startswith("bench_"))
    wanted = argv or names
    failed = 0
    for name in wanted:
        if name not in names:
            print(f"unknown benchmark {name!r}; have: {', '.join(names)}")
            return 2
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            for line in module.run():
                print(f"   {line}", flush=True)
        except Exception:
            failed += 1
            traceback.print_exc()
        print(f"   ({time.monotonic() - t:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
