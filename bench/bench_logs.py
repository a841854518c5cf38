"""Log masking is linear: the worst inputs of 100 KB (one request field) against 100 times the
same input of 1 KB, measured in the same run. A quadratic masker shows a ratio near 100
(issue 14: a 100 KB field stalled the agent ~10 s); a linear one stays near 1."""
from __future__ import annotations

import time

from kvmagent.core.logs import mask_text

SIZE = 100_000
SMALL = 1_000

# Shapes that made the regex masker backtrack: long scheme-character runs, many almost-URLs,
# URLs whose password never ends, key=value keys without values.
SHAPES = {
    "letters": "a",
    "almost_urls": "a://b:",
    "separators": "://",
    "url_then_at": "redis://u:p/",
    "keys_no_value": "password ",
}


def _best_of(func, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def run() -> dict[str, object]:
    figures: dict[str, object] = {}
    worst_ratio = 0.0
    worst_ms = 0.0
    for name, unit in SHAPES.items():
        big = (unit * (SIZE // len(unit) + 1))[:SIZE] + "@h"
        small = (unit * (SMALL // len(unit) + 1))[:SMALL] + "@h"
        big_s = _best_of(lambda big=big: mask_text(big))
        small_s = _best_of(lambda small=small: [mask_text(small) for _ in range(SIZE // SMALL)])
        ratio = big_s / small_s
        figures[f"{name}: 100KB ms / 100x1KB ms"] = f"{big_s * 1000:.2f} / {small_s * 1000:.2f}"
        worst_ratio = max(worst_ratio, ratio)
        worst_ms = max(worst_ms, big_s * 1000)
    figures["worst 100KB field, ms"] = worst_ms
    figures["worst ratio 100KB vs 100x1KB (linear ~1, quadratic ~100)"] = worst_ratio
    return figures
