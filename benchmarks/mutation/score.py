"""mutmut over the targets, and each target's score.

mutmut 3 copies ``[tool.mutmut] source_paths`` (the ``ldm_core`` package), ``also_copy``,
``tests/`` and ``pyproject.toml`` into ``mutants/``, rewrites every function of the
``only_mutate`` modules into a trampoline over its mutants, and runs pytest in ``mutants/``
in process: once with every selected test to learn which tests call which function, then
each mutant against only those tests, the mutant chosen by the ``MUTANT_UNDER_TEST``
environment variable. Our tests start subprocesses (the model server, a launcher process)
with ``sys.executable`` and ``PYTHONPATH``: running mutmut with ``PYTHONPATH=mutants`` makes
them import the mutated code too, and the variable they inherit switches the same mutant
on there. mutmut's interpreter is ``.venv-mutmut``'s, which reaches ``.venv``'s packages
through a ``.pth`` file (the Makefile writes it), so those subprocesses import
everything they need.

Each run starts from an empty ``mutants/``: mutmut keeps verdicts across runs and retests
a mutant only when its function changed, never when a test did.
(https://mutmut.readthedocs.io, and mutmut 3.8.1's ``__main__.py`` / ``runners/harness.py``)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from benchmarks.mutation.targets import ROOT, TARGETS, Target

MUTANTS = ROOT / "mutants"
LOG = MUTANTS / "mutation-run.log"

#: mutmut's verdict for a worker's exit code (mutmut 3.8.1, ``stats.status_by_exit_code``),
#: folded into the columns reported here; anything else is ``other`` (suspicious, segfault).
_STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    5: "no_tests",
    33: "no_tests",
    None: "not_checked",
}
COLUMNS = ("killed", "survived", "timeout", "no_tests", "other", "not_checked")


def run_mutmut(mutmut: Path, jobs: int, timeout_s: float) -> dict[str, Any]:
    """A fresh ``mutmut run`` over every target's mutants; stopped after ``timeout_s``
    (what finished by then is scored, the rest is ``not_checked``)."""
    shutil.rmtree(MUTANTS, ignore_errors=True)
    MUTANTS.mkdir()  # on PYTHONPATH from the start: an absent entry is never searched again
    globs = [glob for target in TARGETS for glob in target.mutant_globs()]
    argv = [str(mutmut), "run", "--max-children", str(jobs), *globs]
    env = {**os.environ, "PYTHONPATH": str(MUTANTS)}
    started = time.monotonic()
    with LOG.open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            returncode = None
    return {
        "returncode": returncode,
        "timed_out": returncode is None,
        "seconds": round(time.monotonic() - started, 1),
        "log": str(LOG.relative_to(ROOT)),
    }


def _verdicts(mutants: Path, target: Target) -> dict[str, int | None]:
    """Exit code per mutant of ``target`` from mutmut's ``<module>.meta`` file."""
    meta = mutants / f"{target.path}.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    globs = target.mutant_globs()
    return {key: code for key, code in codes.items() if any(fnmatch(key, g) for g in globs)}


def score(mutants: Path = MUTANTS) -> list[dict[str, Any]]:
    """Per target: the counts of ``COLUMNS``, ``total`` and ``score``, the killed share
    (timeouts count as killed, as in mutmut) of the mutants that were checked."""
    rows = []
    for target in TARGETS:
        counts = dict.fromkeys(COLUMNS, 0)
        for code in _verdicts(mutants, target).values():
            counts[_STATUS.get(code, "other")] += 1
        total = sum(counts.values())
        checked = total - counts["not_checked"]
        caught = counts["killed"] + counts["timeout"]
        rows.append(
            {
                "target": target.name,
                "module": target.path,
                "functions": list(target.functions) or "all",
                **counts,
                "total": total,
                "score": round(caught / checked, 3) if checked else None,
            }
        )
    return rows
