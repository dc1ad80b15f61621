"""Lineage: one record per bundle, built with it, extended by evaluate and deploy, readable
without a cluster (``ldm lineage``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm_core import bundle as bundle_mod
from ldm_core import figures, lineage
from ldm_core.cli import main
from ldm_core.errors import LdmError
from ldm_core.evaluate import evaluate
from ldm_core.io import DEPLOYMENT_JSON, LINEAGE_JSON, sha256_file
from ldm_core.models import build_autoencoder, build_unet
from tests.harness.configs import serve_config
from tests.harness.data import make_demo_cache, random_bundle


def _runs(tmp_path, cfg):
    """Finished-looking autoencoder and diffusion run directories, as training leaves them."""
    ae_dir, diff_dir = tmp_path / "ae", tmp_path / "diff"
    ae_dir.mkdir()
    diff_dir.mkdir()
    ae = {"state_dict": build_autoencoder(cfg).state_dict(), "scale_factor": 0.9}
    torch.save({**ae, "config": cfg.to_dict(), "steps": 7}, ae_dir / "autoencoder.pt")
    unet = {"state_dict": build_unet(cfg).state_dict(), "config": cfg.to_dict(), "steps": 13}
    torch.save(unet, diff_dir / "unet.pt")
    geometry = {
        "affine": np.diag([*cfg.data.spacing, 1.0]).tolist(),
        "spacing": list(cfg.data.spacing),
        "dataset_hash": "d" * 64,
    }
    (diff_dir / "data_geometry.json").write_text(json.dumps(geometry))
    return ae_dir, diff_dir


@pytest.fixture
def built(tmp_path):
    cfg = serve_config()
    ae_dir, diff_dir = _runs(tmp_path, cfg)
    return cfg, ae_dir, diff_dir, bundle_mod.build_bundle(ae_dir, diff_dir, tmp_path / "bundle")


def test_a_built_bundle_records_what_it_was_made_from(built):
    cfg, ae_dir, diff_dir, out = built
    record = json.loads((out / LINEAGE_JSON).read_text())
    assert record["bundle"]["digest"] == bundle_mod.digest(out)
    assert record["data"] == {"dataset_hash": "d" * 64}
    assert record["config"]["digest"] == lineage.config_digest(bundle_mod.config_for(out))
    assert record["checkpoints"] == {
        "autoencoder": {
            "file": "autoencoder.pt",
            "sha256": sha256_file(ae_dir / "autoencoder.pt"),
            "steps": 7,
        },
        "diffusion": {"file": "unet.pt", "sha256": sha256_file(diff_dir / "unet.pt"), "steps": 13},
    }
    assert record["evaluation"] is None and record["run"] is None
    assert bundle_mod.lineage(out) == record


def test_the_record_is_not_part_of_the_digest_it_records(built):
    *_, out = built
    before = bundle_mod.digest(out)
    (out / LINEAGE_JSON).unlink()
    assert bundle_mod.digest(out) == before
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + "\n")
    assert bundle_mod.digest(out) != before


def test_a_bundle_changed_after_it_was_built_says_so(built, caplog):
    *_, out = built
    built_as = bundle_mod.digest(out)
    (out / "unet.pt").write_bytes((out / "unet.pt").read_bytes() + b"\0")
    record = bundle_mod.lineage(out)
    assert record["bundle"]["digest"] == bundle_mod.digest(out) != built_as
    assert record["bundle"]["built_as"] == built_as
    assert "lineage.json: records bundle digest" in caplog.text and "changed after" in caplog.text


def test_the_config_digest_ignores_how_the_yaml_was_written():
    a, b = serve_config("serving.max_samples=3"), serve_config()
    assert lineage.config_digest(a) == lineage.config_digest(b)
    assert lineage.config_digest(serve_config("serving.max_samples=2")) != lineage.config_digest(b)


def test_a_bundle_built_before_records_were_kept_gets_one_from_its_files(tmp_path):
    out = random_bundle(tmp_path / "old", serve_config())
    (out / LINEAGE_JSON).unlink()
    record = bundle_mod.lineage(out)
    assert record["bundle"]["digest"] == bundle_mod.digest(out)
    assert record["checkpoints"] == {}  # save() was given no training steps
    assert lineage.rows(record)[0] == ("bundle.digest", bundle_mod.digest(out))


@pytest.mark.parametrize(
    "values, expected",
    [
        # KFP backend 2.4.1 hands the placeholder text through; 2.5.0+ and kfp.local resolve it.
        ({"run_id": "{{$.pipeline_job_uuid}}", "run_name": "{{$.pipeline_job_name}}"}, None),
        ({"run_id": "7f3c", "run_name": "{{$.pipeline_job_name}}"}, {"run_id": "7f3c"}),
        ({"run_id": "", "pipeline_name": "brain-ldm"}, {"pipeline_name": "brain-ldm"}),
    ],
)
def test_an_unresolved_kfp_placeholder_is_not_an_identity(values, expected):
    assert lineage.run_identity(values) == expected


def test_an_unknown_run_field_is_named():
    with pytest.raises(LdmError, match="run: job_id is not one of run_id"):
        lineage.run_identity({"job_id": "x"})


def test_an_evaluation_of_another_bundle_is_refused(built, tmp_path):
    cfg, *_, out = built
    record = bundle_mod.lineage(out)
    other = dict(record, bundle={"digest": "f" * 64})
    lineage.write(tmp_path, lineage.with_evaluation(other, {"mmd": 0.1}, {"passed": True}))
    with pytest.raises(
        LdmError, match=f"evaluates bundle {'f' * 64}, not {record['bundle']['digest']}"
    ):
        lineage.for_deploy(record, cfg, evaluation_dir=tmp_path)
    lineage.write(tmp_path, lineage.with_evaluation(record, {"mmd": 0.1}, {"passed": True}))
    deployed = lineage.for_deploy(record, cfg, evaluation_dir=tmp_path, run={"run_id": "r1"})
    assert deployed["evaluation"]["metrics"] == {"mmd": 0.1} and deployed["run"] == {"run_id": "r1"}
    assert deployed["images"]["serving"] == cfg.cluster.serving_image


def test_read_finds_the_record_in_a_deploy_output_and_refuses_a_newer_layout(built, tmp_path):
    *_, out = built
    record = lineage.with_deployment(bundle_mod.lineage(out), {"backend": "local", "url": "u"})
    (tmp_path / DEPLOYMENT_JSON).write_text(json.dumps({"url": "u", "lineage": record}))
    assert lineage.read(tmp_path) == record
    lineage.write(tmp_path / "l.json", {**record, "format_version": 2})
    with pytest.raises(LdmError, match="l.json: format_version 2, this version reads 1"):
        lineage.read(tmp_path / "l.json")
    with pytest.raises(LdmError, match="no lineage record"):
        lineage.read(tmp_path / "empty-dir-that-is-missing")


def test_the_annotation_round_trips_without_what_the_object_itself_says(built):
    *_, out = built
    record = lineage.with_deployment(bundle_mod.lineage(out), {"backend": "kserve", "name": "m"})
    text = lineage.annotation(record)
    assert "deployment" not in json.loads(text)
    assert lineage.from_annotation(text, "isvc") == bundle_mod.lineage(out)
    with pytest.raises(LdmError, match="isvc: annotation brain-ldm/lineage is not JSON"):
        lineage.from_annotation("{", "isvc")


def test_ldm_lineage_prints_a_bundle_and_an_evaluation(built, capsys):
    *_, out = built
    assert main(["lineage", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bundle.digest" in text and bundle_mod.digest(out) in text
    assert "checkpoints.diffusion.steps" in text and "evaluation" in text
    assert main(["lineage", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == bundle_mod.lineage(out)
    assert main(["lineage", str(out.parent / "nothing")]) == 1
    assert "ldm lineage: error:" in capsys.readouterr().err


def test_the_evaluation_writes_the_record_and_its_report_shows_it(tmp_path):
    cfg = serve_config("evaluation.num_samples=2", "evaluation.steps=2")
    out = random_bundle(tmp_path / "bundle", cfg)
    cache = make_demo_cache(tmp_path, n_subjects=3, shape=(16, 16, 16))
    result = evaluate(cfg, out, cache, tmp_path / "eval")
    record = lineage.read(tmp_path / "eval")
    assert record["bundle"]["digest"] == bundle_mod.digest(out)
    assert record["evaluation"]["gate"] == {
        "passed": result["gate"]["passed"],
        "reasons": result["gate"]["reasons"],
    }
    assert record["evaluation"]["metrics"]["mmd"] == pytest.approx(result["mmd"])
    html = (tmp_path / "eval" / "report.html").read_text()
    md = (tmp_path / "eval" / "report.md").read_text()
    for field, value in lineage.rows(record):
        assert f"<code>{field}</code>" in html and f"| `{field}` | `{value}` |" in md
    assert result["files"]["lineage"] == str(tmp_path / "eval" / LINEAGE_JSON)


def test_a_report_without_lineage_has_no_lineage_section(tmp_path):
    html, md = figures.write_reports(tmp_path, {"mmd": 0.1}, {"passed": True}, {}, {})
    assert "Lineage" not in html.read_text() and "Lineage" not in md.read_text()
