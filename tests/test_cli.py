"""The ``ldm`` parser: every verb of the contract, the common config arguments, table choices."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ldm_core.cli import VERBS, build_parser, main
from ldm_core.samplers import ALL_SAMPLERS
from tests.harness.configs import NO_SNR, serve_config
from tests.harness.data import random_bundle

CONTRACT_VERBS = (
    "download",
    "preprocess",
    "train-autoencoder",
    "train-diffusion",
    "bundle",
    "sample",
    "evaluate",
    "lineage",
    "serve",
)


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_every_contract_verb_takes_the_common_config_arguments(capsys):
    assert tuple(verb.name for verb in VERBS) == CONTRACT_VERBS
    top = _help(capsys)
    listed = re.findall(r"^ {4}(\S+)", top, flags=re.MULTILINE)  # one verb per help row
    assert listed == list(CONTRACT_VERBS), top
    for name in CONTRACT_VERBS:
        text = _help(capsys, name)
        for flag in ("--config CONFIG", "--preset", "--set KEY=VALUE", "--debug"):
            assert flag in text, (name, flag)


def test_sampler_choices_are_the_sampler_table(capsys):
    assert "--sampler {" + ",".join(ALL_SAMPLERS) + "}" in _help(capsys, "sample")


def test_repeated_set_accumulates():
    args = build_parser().parse_args(
        ["sample", "--bundle", "b", "--output", "o", "--set", "a=1", "--set", "b=2"]
    )
    assert args.set == ["a=1", "b=2"] and args.verb == "sample"


def test_a_sampler_the_objective_refuses_is_one_line_naming_the_field(tmp_path, capsys):
    random_bundle(tmp_path / "b", serve_config())
    argv = ["sample", "--bundle", str(tmp_path / "b"), "--output", str(tmp_path / "o")]
    rc = main([*argv, "--sampler", "rflow", "--steps", "2", "--num", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("ldm sample: error: sampler 'rflow' cannot sample")
    assert "model.scheduler.objective" in err[-1]


def test_an_unknown_sampler_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sample", "--bundle", "b", "--output", "o", "--sampler", "x"])
    assert info.value.code == 2
    assert "invalid choice: 'x'" in capsys.readouterr().err


def test_help_and_the_sampler_table_import_neither_torch_nor_monai():
    # ``ldm --help`` and config validation read the sampler table; MONAI's schedulers take
    # seconds to import, so the table must not pull them in.
    code = "import sys, ldm_core.cli; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sample_takes_the_bundles_own_config_so_an_rflow_model_samples_without_flags(tmp_path):
    """The default sampler comes from the bundle's objective, not from the default preset
    (whose ddim cannot sample a rectified-flow model)."""
    cfg = serve_config("model.scheduler.objective=rflow", "sampling.sampler=rflow", NO_SNR)
    bundle = random_bundle(tmp_path / "rflow-bundle", cfg)
    out = tmp_path / "samples"
    assert main(["sample", "--bundle", str(bundle), "--output", str(out), "--num", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000.nii.gz", "sample_0000.png"]


def test_sample_names_a_directory_that_is_not_a_bundle(tmp_path, capsys):
    assert main(["sample", "--bundle", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert f"{tmp_path}: not a model bundle (no bundle.json)" in capsys.readouterr().err
