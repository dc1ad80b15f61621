"""What the mutation checks cover: the code under test and the fast tests that guard it.

One table for both parts. ``pyproject.toml``'s ``[tool.mutmut]`` names the same files and
test files (mutmut reads only its own section); ``tests/test_mutation.py`` holds
the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: mutmut's name for a method ``read`` of class ``C`` is ``xǁCǁread``; a function's ``x_f``.
_CLASS_SEPARATOR = "ǁ"


@dataclass(frozen=True)
class Target:
    """Part of one module, scored on its own.

    Args:
        name: what the report calls it.
        path: the module, relative to the repository root.
        functions: the functions (``Class.method`` for a method) whose mutants count;
            empty: every function of the module.
        tests: its fast test files, relative to the repository root.
    """

    name: str
    path: str
    functions: tuple[str, ...]
    tests: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def mutant_globs(self) -> list[str]:
        """mutmut mutant-name patterns (``mutmut run PATTERN…``) for this target."""
        if not self.functions:
            return [f"{self.module}.*"]
        return [f"{self.module}.{_mangled(f)}__mutmut_*" for f in self.functions]


def _mangled(function: str) -> str:
    cls, _, name = function.rpartition(".")
    return f"x{_CLASS_SEPARATOR}{cls}{_CLASS_SEPARATOR}{name}" if cls else f"x_{name}"


TARGETS: tuple[Target, ...] = (
    Target(
        "InferenceService objects",
        "ldm_core/kube/isvc_build.py",
        (),
        ("tests/test_isvc_build.py", "tests/test_isvc_rollout.py"),
    ),
    Target(
        "revision state",
        "ldm_core/kube/isvc_status.py",
        (),
        ("tests/test_isvc_status.py", "tests/test_isvc_rollout.py"),
    ),
    Target("rollout", "ldm_core/kube/isvc_rollout.py", (), ("tests/test_isvc_rollout.py",)),
    Target(
        "launcher",
        "ldm_core/kube/pytorchjob.py",
        (),
        ("tests/test_pytorchjob.py", "tests/test_training_jobs.py"),
    ),
    Target("gate", "ldm_core/gate.py", (), ("tests/test_evaluate.py",)),
    Target(
        "smoke check",
        "ldm_core/smoke.py",
        (
            "smoke_check",
            "_check_answer",
            "_served_digest",
            "_decode_v2",
            "_is_loopback",
            "DeployedBundle.read",
        ),
        ("tests/test_deploy_local.py", "tests/test_isvc_rollout.py"),
    ),
    Target(
        "samplers",
        "ldm_core/samplers.py",
        (),
        ("tests/test_samplers.py", "tests/test_sample.py", "tests/test_sample_trained.py"),
    ),
)


def selected_tests() -> list[str]:
    """Every target's test files, each once, in table order."""
    return list(dict.fromkeys(t for target in TARGETS for t in target.tests))
