"""The boundaries the design promises, held by tests.

- The engine - every module of ``ldm_core`` outside ``kube/``, ``deploy.py`` and ``serve`` -
  imports neither kfp, kubernetes nor kserve. Checked for real (each module imported in a
  fresh process holding no ldm_core, then ``sys.modules`` read) and statically (every import
  statement, function-level ones included, with the few lazy crossings listed below, each with
  its reason).
- ML code (``train/``, ``models.py``, ``sample.py``, ``data/`` and the evaluation: ``measures.py``,
  ``metrics.py``, ``fid.py``, ``gate.py``, ``evaluate.py``) never crosses, not even lazily.
- A component body imports only ``ldm_core.stages``, calls one stage and holds no branches.
- Every third-party import is declared in ``pyproject.toml`` for the side that runs it (base
  dependencies = the engine, ``pipeline``, ``serve``), so the images that install one extra
  can import what they run; and the extras stay apart: ``serve`` does not pull kfp,
  ``pipeline`` does not pull kserve.

Modules are found with pkgutil, so a new module is covered without touching this file.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.harness.scripts import installed_size

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "brain-ldm"
FOREIGN = ("kfp", "kubernetes", "kserve")
# ldm_core's own modules that talk to a cluster or run the model server: importing one of them
# brings its foreign packages along, so for the engine they are as foreign as kfp itself.
OUTSIDE_ENGINE = ("ldm_core.kube", "ldm_core.deploy", "ldm_core.serve")
ML_CODE = (
    "ldm_core.train",
    "ldm_core.models",
    "ldm_core.sample",
    "ldm_core.data",
    "ldm_core.measures",
    "ldm_core.metrics",
    "ldm_core.fid",
    "ldm_core.gate",
    "ldm_core.evaluate",
)
FIRST_PARTY = ("ldm_core", "components", "pipelines")

# The only places where the engine reaches across, always inside a function so that importing
# the engine never loads them: (importing module, what it imports) -> why.
LAZY_CROSSINGS = {
    ("ldm_core.cli", "ldm_core.serve"): "the `ldm serve` verb starts the model server; "
    "no other verb loads it",
    ("ldm_core.cli", "ldm_core.kube"): "`ldm lineage --isvc` reads an InferenceService "
    "through the Kubernetes API; no other verb loads it",
    ("ldm_core.stages", "ldm_core.kube"): "the kubeflow backend (PyTorchJob launcher and API "
    "probe), loaded only when a training stage runs on a cluster",
    ("ldm_core.stages", "ldm_core.deploy"): "the deploy stage; no other stage loads it",
}

# Declared requirements no module imports by name: (distribution) -> what needs it at run time.
RUNTIME_ONLY = {
    "einops": "monai's AutoencoderKL and DiffusionModelUNet load it through optional_import",
    "tensorboard": "torch.utils.tensorboard.SummaryWriter (ldm_core/train/metrics_log.py) needs it",
}


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def discover(directory: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (in ``directory``) and its file, found without importing."""
    found = {package: directory / "__init__.py"}
    for info in pkgutil.iter_modules([str(directory)]):
        name = f"{package}.{info.name}"
        if info.ispkg:
            found.update(discover(directory / info.name, name))
        else:
            found[name] = directory / f"{info.name}.py"
    return found


MODULES = discover(ROOT / "ldm_core", "ldm_core")
ENGINE = sorted(m for m in MODULES if not _within(m, OUTSIDE_ENGINE))
ML = sorted(m for m in MODULES if _within(m, ML_CODE))


# ---------------------------------------------------------------- imports, read from the source


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    name: str  # what it imports, absolute ("from kfp import dsl" gives kfp and kfp.dsl)
    function: str | None  # the enclosing function; None when it runs at import time
    line: int


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")[: None if is_package else -1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _names(module: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node)
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    # importlib.import_module("x") and __import__("x") with a literal name import too.
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports(module: str, path: Path) -> list[Import]:
    """Every import in ``path``: top level, inside functions and classes, and literal
    ``import_module`` calls, each with the function it runs in."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name if function is None else f"{function}.{child.name}"
            for name in _names(module, is_package, child):
                found.append(Import(module, name, function, child.lineno))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def crossing(name: str) -> str | None:
    """The boundary ``name`` lies beyond, if any: a foreign package or a non-engine module."""
    top = name.split(".")[0]
    if top in FOREIGN:
        return top
    return next((p for p in OUTSIDE_ENGINE if _within(name, [p])), None)


def crossings(module: str) -> list[Import]:
    return [imp for imp in imports(module, MODULES[module]) if crossing(imp.name)]


def _where(imp: Import) -> str:
    place = f"in {imp.function}()" if imp.function else "at import time"
    return f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line} imports {imp.name} {place}"


# ---------------------------------------------------------------- the engine boundary


@pytest.mark.parametrize("module", ENGINE)
def test_engine_module_crosses_only_where_listed_and_lazily(module):
    for imp in crossings(module):
        key = (module, crossing(imp.name))
        assert key in LAZY_CROSSINGS, (
            f"{_where(imp)}: the engine must not import {key[1]} (add a reason to "
            "LAZY_CROSSINGS only if it runs solely on the cluster or serving side)"
        )
        assert imp.function is not None, f"{_where(imp)}: listed crossings must be lazy"


def test_every_listed_crossing_still_exists():
    """The list only shrinks: an exception nothing needs any more is removed, not kept."""
    used = {(m, crossing(imp.name)) for m in ENGINE for imp in crossings(m)}
    assert not set(LAZY_CROSSINGS) - used, sorted(set(LAZY_CROSSINGS) - used)


@pytest.mark.parametrize("module", ML)
def test_ml_code_never_crosses_even_lazily(module):
    assert not any(_within(m, ML_CODE) for m, _ in LAZY_CROSSINGS)
    found = crossings(module)
    assert not found, "\n".join(_where(imp) for imp in found)


def third_party(modules: Iterable[str]) -> list[str]:
    """The third-party modules ``modules`` import (the boundary's crossings left out)."""
    names = set()
    for module in modules:
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
    return sorted(n for n in names if distribution(n) and not crossing(n))


# A new interpreter first imports the third-party libraries the engine uses, then forks one
# child per module: each child imports its module into an interpreter holding no ldm_core and
# reports the foreign modules it then holds. A fresh interpreter per module would pay torch's
# and MONAI's import about thirty times (two minutes on two cores); a fork pays it once, and
# what the libraries load by themselves is reported too, so nothing hides in the shared part.
PROBE = """
import importlib, json, os, sys
root, foreign, preload, modules = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4:]
sys.path.insert(0, root)
def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in foreign)
for name in preload:
    importlib.import_module(name)
assert not any(m == "ldm_core" or m.startswith("ldm_core.") for m in sys.modules)
report = {"preloaded": loaded(), "modules": {}}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            answer = loaded()
        except BaseException as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        os.write(write, json.dumps(answer).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report["modules"][module] = json.loads(pipe.read())
    os.waitpid(pid, 0)
print(json.dumps(report))
"""
CONTROL = "ldm_core.kube.client"  # outside the engine: proves the probe sees a foreign import
IMPORTABLE = [m for m in ENGINE if not m.endswith(".__main__")]  # a __main__ runs a program


@pytest.fixture(scope="module")
def probe() -> dict:
    """``preloaded``: the foreign modules the libraries loaded by themselves; ``modules``:
    module -> the foreign modules importing it loaded, or ``{"error": ...}``."""
    preload = " ".join(third_party(ENGINE))
    argv = [sys.executable, "-c", PROBE, str(ROOT), " ".join(FOREIGN), preload]
    proc = subprocess.run(
        [*argv, *IMPORTABLE, CONTROL], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_libraries_the_engine_uses_load_no_kfp_kubernetes_or_kserve(probe):
    assert probe["preloaded"] == []


@pytest.mark.parametrize("module", IMPORTABLE)
def test_importing_an_engine_module_loads_no_kfp_kubernetes_or_kserve(module, probe):
    loaded = probe["modules"][module]
    assert isinstance(loaded, list), f"import {module} failed: {loaded}"
    assert not loaded, (
        f"import {module} loads {loaded[:5]}; find who imports them with "
        f"`python -X importtime -c 'import {module}' 2>&1 | grep -E '{'|'.join(FOREIGN)}'`"
    )


def test_the_probe_sees_a_foreign_import(probe):
    """The import test above is not vacuous: the same probe on a kube module finds kubernetes."""
    assert "kubernetes" in probe["modules"][CONTROL]


def test_the_engine_is_most_of_ldm_core():
    """Guards the discovery: a rename that emptied ENGINE would pass every test above."""
    for module in ("ldm_core.config", "ldm_core.stages", "ldm_core.train.loop", "ldm_core.io"):
        assert module in ENGINE
    assert not any(_within(m, OUTSIDE_ENGINE) for m in ENGINE)
    assert "ldm_core.kube.client" in MODULES and "ldm_core.models" in ML


# ---------------------------------------------------------------- KFP components


def _components() -> dict[str, ast.FunctionDef]:
    found = {}
    for path in sorted((ROOT / "components").glob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "component"
                for d in node.decorator_list
            ):
                found[f"{path.name}:{node.name}"] = node
    return found


COMPONENTS = _components()
BRANCHES = (ast.If, ast.IfExp, ast.While, ast.Try, ast.With, ast.Match, ast.Raise)


def test_every_stage_has_a_component():
    assert len(COMPONENTS) == 7, sorted(COMPONENTS)  # configure + the six stages


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_body_only_calls_one_stage(component):
    """KFP ships a component's body as source; anything worth testing belongs in ldm_core."""
    body = COMPONENTS[component]
    nodes = [n for stmt in body.body for n in ast.walk(stmt)]
    imported: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            assert isinstance(node, ast.ImportFrom) and node.module == "ldm_core.stages", (
                f"{component}:{node.lineno}: a component body imports only from ldm_core.stages"
            )
            imported |= {alias.asname or alias.name for alias in node.names}
        assert not isinstance(node, BRANCHES + (ast.FunctionDef, ast.ClassDef, ast.Lambda)), (
            f"{component}:{node.lineno}: {type(node).__name__} in a component body; move the "
            "logic into ldm_core.stages"
        )
    called = [n.func.id for n in nodes if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    stages = [name for name in called if name in imported and name.endswith("_stage")]
    assert len(stages) == 1, f"{component} calls {stages or 'no'} stage; it calls exactly one"
    others = {name for name in called if name not in imported and not hasattr(builtins, name)}
    assert not others, f"{component} calls {sorted(others)}, neither ldm_core nor builtins"


# ---------------------------------------------------------------- declared dependencies


def declared(extra: str | None) -> set[str]:
    """The names pyproject.toml declares for the base (``extra=None``) or one extra."""
    requirements = installed_size().declared(extra)
    return {canonicalize_name(r.name) for r in requirements} - {PROJECT}


@functools.cache
def _owners() -> dict[str, str]:
    """Importable module name -> the installed distribution whose files hold it."""
    owners = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or ():
            parts = file.parts
            if file.suffix not in (".py", ".so", ".pyd") or ".." in parts:
                continue
            stem = parts[-1].split(".")[0]
            module = parts[:-1] if stem == "__init__" else (*parts[:-1], stem)
            owners.setdefault(".".join(module), name)
    return owners


def distribution(name: str) -> str | None:
    """The distribution ``name`` comes from; None for the standard library and this project."""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in FIRST_PARTY:
        return None
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        owner = _owners().get(".".join(parts[:end]))
        if owner:
            return owner
    pytest.fail(f"{name}: no installed distribution holds it (install the dev extras)")


def side(module: str) -> str | None:
    """The extra whose image runs ``module`` (None: the engine, the base dependencies)."""
    if _within(module, ["ldm_core.serve"]):
        return "serve"
    if _within(module, ["ldm_core.registry"]):
        return "registry"
    if _within(
        module, ["ldm_core.kube", "ldm_core.deploy", "ldm_core.smoke", "components", "pipelines"]
    ):
        return "pipeline"
    return None


def _sources() -> Iterator[tuple[str, Path]]:
    yield from MODULES.items()
    for package in ("components", "pipelines"):
        yield from discover(ROOT / package, package).items()


def third_party_imports() -> Iterator[tuple[Import, str]]:
    """Every import of a third-party module in the product code, with its distribution. The
    engine's lazy crossings are left to the boundary tests above."""
    for module, path in _sources():
        for imp in imports(module, path):
            dist = distribution(imp.name)
            if dist and not (side(module) is None and crossing(imp.name)):
                yield imp, dist


def test_every_import_is_declared_for_the_side_that_runs_it():
    missing = []
    for imp, dist in third_party_imports():
        extra = side(imp.module)
        allowed = declared(None) | (declared(extra) if extra else set())
        if dist not in allowed:
            where = f"{imp.module}:{imp.line} imports {imp.name}"
            missing.append(f"{where}: add {dist} to {extra or 'dependencies'} in pyproject.toml")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("extra", [None, "pipeline", "serve"])
def test_every_declared_dependency_is_imported_by_its_side(extra):
    """An image installs only what it runs: nothing sits in an extra (or the base) unused."""
    used = {dist for imp, dist in third_party_imports() if side(imp.module) == extra}
    unused = declared(extra) - used - set(RUNTIME_ONLY)
    assert not unused, f"{extra or 'dependencies'} declares {sorted(unused)}, imported by none"
    assert set(RUNTIME_ONLY) <= declared(None), "RUNTIME_ONLY lists what nothing declares"


def closure(*extras: str) -> set[str]:
    """The distributions installing this project with ``extras`` brings in (the base
    dependencies always), resolved from the installed metadata by the walk that
    images/installed_size.py measures: the dev environment holds the exact versions
    constraints.txt pins."""
    return set(installed_size().closure(*extras))


KFP = {"kfp", "kfp-kubernetes", "kfp-pipeline-spec", "kfp-server-api"}


def test_the_engine_pulls_no_kfp_kubernetes_or_kserve():
    pulled = closure() & (KFP | {"kubernetes", "kserve"})
    assert not pulled, f"the base dependencies pull {sorted(pulled)}"


def test_the_serve_extra_pulls_no_kfp():
    pulled = closure("serve")
    assert "kserve" in pulled and not pulled & KFP, f"serve pulls {sorted(pulled & KFP)}"


def test_the_pipeline_extra_pulls_no_kserve():
    pulled = closure("pipeline")
    assert KFP <= pulled, f"pipeline lacks {sorted(KFP - pulled)}"
    assert "kserve" not in pulled, "pipeline pulls kserve"


def test_dev_installs_everything():
    """make demo / make test install '.[dev]': every extra, so every test can run."""
    assert closure("pipeline", "serve") <= closure("dev")
