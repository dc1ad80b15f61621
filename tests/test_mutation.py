"""make mutation's set-up holds together: mutmut's config, the targets, the named cases.

The mutation run itself is hours (``make mutation``); these checks are what can go stale in
between: a renamed function a target names, a test file moved, a named case whose text the
code no longer contains, a ``[tool.mutmut]`` that mutates or selects something else.
"""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path

import pytest

from benchmarks.mutation import named, score
from benchmarks.mutation.targets import ROOT, TARGETS, selected_tests


def _mutmut_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def _functions(path: Path) -> set[str]:
    """Top-level functions and ``Class.method`` names of a module."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef)
            }
    return names


def test_mutmut_mutates_the_targets_and_selects_their_selected_tests():
    cfg = _mutmut_config()
    assert cfg["source_paths"] == ["ldm_core"]
    assert sorted(cfg["only_mutate"]) == sorted(t.path for t in TARGETS)
    assert sorted(cfg["pytest_add_cli_args_test_selection"]) == sorted(selected_tests())
    for path in [*selected_tests(), *cfg["also_copy"]]:
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_a_target_names_functions_its_module_has(target):
    assert set(target.functions) <= _functions(ROOT / target.path)


def test_mutant_globs_use_mutmuts_names():
    """mutmut names a mutant ``<module>.x_<function>__mutmut_<n>``, and a method's
    ``x\u01c1<Class>\u01c1<method>`` (mutmut 3.8.1, ``utils/format_utils.make_mutant_key``)."""
    smoke = next(t for t in TARGETS if t.name == "smoke check")
    assert "ldm_core.smoke.x_smoke_check__mutmut_*" in smoke.mutant_globs()
    assert "ldm_core.smoke.x\u01c1DeployedBundle\u01c1read__mutmut_*" in smoke.mutant_globs()
    rollout = next(t for t in TARGETS if t.name == "rollout")
    assert rollout.mutant_globs() == ["ldm_core.kube.isvc_rollout.*"]


@pytest.mark.parametrize("mutation", named.MUTATIONS, ids=lambda m: m.name)
def test_a_named_mutation_still_applies_to_the_tree(mutation):
    """A case whose text the code lost would report nothing: it must be updated with it."""
    source = (ROOT / mutation.path).read_text()
    mutated = mutation.apply(source)
    assert mutated is not None, f"{mutation.name}: its text is no longer in {mutation.path}"
    assert mutated != source
    ast.parse(mutated)
    for test in mutation.tests:
        assert (ROOT / test).exists(), test


def test_every_area_has_named_mutations_under_unique_names():
    assert {m.point for m in named.MUTATIONS} == set("abcde")
    assert len({m.name for m in named.MUTATIONS}) == len(named.MUTATIONS)


def test_score_counts_each_targets_mutants_from_mutmuts_meta_file(tmp_path):
    """A target counts its module's mutants, only those of its functions where it names
    some; exit codes fold as mutmut's ``status_by_exit_code`` does (1 killed, 0 survived,
    36 timeout, 33 no tests)."""

    def meta(module: str, codes: dict) -> None:
        path = tmp_path / f"{module}.meta"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"exit_code_by_key": codes}))

    meta(
        "ldm_core/gate.py",
        {
            "ldm_core.gate.x_gate__mutmut_1": 1,
            "ldm_core.gate.x_gate__mutmut_2": 0,
            "ldm_core.gate.x_gate__mutmut_3": 36,
            "ldm_core.gate.x_gate__mutmut_4": 33,
            "ldm_core.gate.x_gate__mutmut_5": None,
        },
    )
    meta(
        "ldm_core/smoke.py",
        {
            "ldm_core.smoke.x_smoke_check__mutmut_1": 1,
            "ldm_core.smoke.x_smoke_headers__mutmut_1": 0,
        },
    )
    rows = {r["target"]: r for r in score.score(tmp_path)}
    gate = rows["gate"]
    assert (gate["killed"], gate["survived"], gate["timeout"], gate["no_tests"]) == (1, 1, 1, 1)
    assert (gate["not_checked"], gate["total"]) == (1, 5)
    assert gate["score"] == pytest.approx(2 / 4)
    smoke = rows["smoke check"]
    assert (smoke["killed"], smoke["survived"], smoke["total"]) == (1, 0, 1)
    assert rows["rollout"]["total"] == 0 and rows["rollout"]["score"] is None


_GATE_TEST = "tests/test_evaluate.py::test_gate_fails_when_a_metric_is_missing_or_nan"


@pytest.mark.slow
def test_a_named_case_is_killed_only_when_a_test_fails():
    """The runner applies the case to a copy, runs the tests there and tells the outcomes
    apart: the gate without its mmd check fails the NaN test (killed), a docstring edit
    fails nothing (survived), text that is not there is stale."""
    dropped = named.Mutation(
        "gate-without-mmd",
        "a",
        "ldm_core/gate.py",
        '        ("mmd", "<=", "gate_max_mmd"),\n',
        "",
        (_GATE_TEST,),
    )
    killed = named.check(dropped, timeout_s=600)
    assert killed["status"] == "killed", killed
    assert killed["failed_tests"] == [_GATE_TEST]
    harmless = named.Mutation(
        "docstring", "a", "ldm_core/gate.py", "Deploy or not:", "Deploy, or not:", (_GATE_TEST,)
    )
    assert named.check(harmless, timeout_s=600)["status"] == "survived"
    gone = named.Mutation("gone", "a", "ldm_core/gate.py", "no such text", "", (_GATE_TEST,))
    assert named.check(gone, timeout_s=600)["status"] == "stale"
    assert (ROOT / "ldm_core" / "gate.py").read_text().count('("mmd", "<="') == 1
