"""Shared by the benchmark scripts: machine facts and the results log.

Each benchmark prints one JSON object and appends it to ``benchmarks/results.jsonl``
and a row to the table in ``benchmarks/README.md``. Ratios are measured within one run
(ours vs the reference, same process, same machine) because absolute times here are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results.jsonl"
README = HERE / "README.md"
TABLE_MARKER = "<!-- results: one row per run, appended by benchmarks/common.py -->"


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "torch": torch.__version__,
    }


def record(name: str, result: dict[str, Any], summary: str) -> dict[str, Any]:
    """Print ``result`` as JSON and append it to the results log and the README table."""
    entry = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **result,
        "machine": machine(),
    }
    print(json.dumps(entry, indent=2))
    with RESULTS.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    text = README.read_text() if README.exists() else ""
    if TABLE_MARKER in text:
        row = f"| {entry['date']} | {name} | {summary} | {entry['machine']['device']}, {entry['machine']['torch_threads']} threads |"
        # The table is the last thing in the README: a new row goes at the end.
        README.write_text(text.rstrip("\n") + "\n" + row + "\n")
    return entry


def timed(fn, *args, repeat: int = 1, **kwargs) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, out
