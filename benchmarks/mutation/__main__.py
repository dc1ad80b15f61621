"""``make mutation``: the named mutations, then mutmut's scores; one JSON result.

    python -m benchmarks.mutation [--part named|score|all] [--jobs N] [--timeout S]
                                  [--case-timeout S] [--mutmut PATH]

Prints the result, appends it to ``benchmarks/results.jsonl`` and a row to the table in
``benchmarks/README.md``. Exits 1 when a named mutation is not killed (a fast test is
missing: that is a failure); the scores are a measurement and never fail the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import record
from benchmarks.mutation import named, score
from benchmarks.mutation.targets import ROOT


def _summary(result: dict[str, Any]) -> str:
    parts = []
    if "named" in result:
        cases = result["named"]["cases"]
        missed = [c["name"] for c in cases if c["status"] != "killed"]
        if not cases:
            parts.append(f"named: baseline {result['named']['baseline']['outcome']}")
        else:
            parts.append(
                f"named {len(cases) - len(missed)}/{len(cases)} killed"
                + (f" (not: {', '.join(missed)})" if missed else "")
            )
    if "score" in result:
        rows = "; ".join(
            f"{r['target']} {r['killed']}k/{r['survived']}s/{r['timeout']}t"
            f"/{r['no_tests']}n of {r['total']}"
            + (f" ({r['not_checked']} unchecked)" if r["not_checked"] else "")
            for r in result["score"]["targets"]
        )
        stopped = ", stopped at the time limit" if result["score"]["run"]["timed_out"] else ""
        parts.append(f"mutmut {result['score']['run']['seconds']:.0f} s{stopped}: {rows}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__)
    parser.add_argument("--part", choices=("named", "score", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=2, help="tests run side by side (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=10800, help="seconds for the mutmut run (default 3 h)"
    )
    parser.add_argument(
        "--case-timeout", type=float, default=1800, help="seconds per named case's pytest run"
    )
    parser.add_argument(
        "--mutmut", type=Path, default=ROOT / ".venv-mutmut" / "bin" / "mutmut", help="mutmut"
    )
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if args.part in ("named", "all"):
        result["named"] = named.run_named(args.jobs, args.case_timeout)
    if args.part in ("score", "all"):
        run = score.run_mutmut(args.mutmut, args.jobs, args.timeout)
        result["score"] = {"run": run, "targets": score.score()}
    record("mutation", result, _summary(result))
    return 0 if result.get("named", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
