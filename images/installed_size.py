"""Installed size of what an image's builder puts into /opt/venv, measured without a container
engine: the project's dependency closure for one extra (``.[serve]``, ``.[pipeline]``),
resolved from pyproject.toml and the metadata of the distributions installed in the running
environment, summing each distribution's installed files (its RECORD) plus the bytecode the
image compiles at build time (``UV_COMPILE_BYTECODE=1``), computed in memory.

It measures the torch that is installed here (the CPU build on a development machine; the
image's CUDA build adds NVIDIA's nvidia-* wheels, which this cannot see). Not included: the
CPython under /opt/python and the base image. images/README.md records the figures.

    .venv/bin/python images/installed_size.py serve pipeline
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import marshal
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "brain-ldm"
PYC_HEADER = 16  # magic, flags, mtime, source size (PEP 552)


def declared(extra: str | None) -> list[Requirement]:
    """The base dependencies (``extra=None``) or one extra's, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def closure(*extras: str) -> dict[str, md.Distribution]:
    """Every distribution ``pip install '.[extra,...]'`` brings in (the base dependencies
    always), by canonical name. tests/test_boundaries.py and tests/test_images.py hold the
    images' and the extras' boundaries with this same walk."""
    todo = [r for extra in (None, *extras) for r in declared(extra)]
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, md.Distribution] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name == PROJECT:  # an extra naming the project's other extras
            todo += [r for e in req.extras for r in declared(e)]
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            needed_by = ",".join(extras) or "the base dependencies"
            sys.exit(
                f"{name} (needed by .[{needed_by}]) is not installed here: install the dev extras"
            )
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}
            ):
                todo.append(sub)
    return found


def installed_bytes(dist: md.Distribution) -> tuple[int, int]:
    """(files as installed, bytecode a compile-all at install time adds) of one distribution."""
    files = bytecode = 0
    for entry in dist.files or []:
        path = Path(str(entry.locate()))
        if "__pycache__" in entry.parts or not path.is_file():
            continue
        files += path.stat().st_size
        if path.suffix == ".py":
            try:
                code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            except (SyntaxError, ValueError):
                continue  # templates and test data shipped as .py; uv skips them too
            bytecode += PYC_HEADER + len(marshal.dumps(code))
    return files, bytecode


def report(extra: str) -> None:
    dists = closure(extra)
    sizes = {name: installed_bytes(dist) for name, dist in dists.items()}
    total_files = sum(f for f, _ in sizes.values())
    total_pyc = sum(b for _, b in sizes.values())
    mib = 1024 * 1024
    torch = md.version("torch")
    print(f".[{extra}]: {len(dists)} distributions (torch {torch})")
    print(f"  files {total_files / mib:,.0f} MiB + bytecode {total_pyc / mib:,.0f} MiB")
    for name, (files, pyc) in sorted(sizes.items(), key=lambda kv: -sum(kv[1]))[:8]:
        print(f"    {name:<24} {(files + pyc) / mib:8,.1f} MiB")
    without_torch = total_files + total_pyc - sum(sizes.get("torch", (0, 0)))
    print(
        f"  total {(total_files + total_pyc) / mib:,.0f} MiB, without torch {without_torch / mib:,.0f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+", help="extras of pyproject.toml, e.g. serve pipeline")
    args = parser.parse_args(argv)
    for extra in args.extras:
        report(extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
