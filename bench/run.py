"""``make bench``: run every ``bench/bench_*.py`` (or the named ones) and print their figures.

A benchmark module defines ``run() -> dict[str, object]`` (sync; it may call asyncio.run)
returning named figures. Ratios are against a baseline measured in the same run.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    names = argv or sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                           if m.name.startswith("bench_"))
    results: dict[str, dict] = {}
    failed = False
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            figures = module.run()
        except Exception as exc:  # one broken benchmark must not hide the others
            failed = True
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"   {key:<48} {shown}", flush=True)
        print(f"   ({time.monotonic() - started:.1f}s)", flush=True)
        results[name] = figures
    out = Path(".bench-results.json")
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"figures written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
