"""``python -m pipelines.submit``: parameters checked against the compiled pipeline, and a
real upload + run against a stand-in KFP v2beta1 API server on loopback."""

from __future__ import annotations

import json
import re
import socket
import threading
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from pipelines import submit

PACKAGE = Path(submit.__file__).with_name("brain_ldm.yaml")


class FakeKfp:
    """The v2beta1 endpoints ``kfp.Client`` calls for upload + run, with in-memory state."""

    def __init__(self) -> None:
        self.token: str | None = None
        """When set, every request without ``Authorization: Bearer <token>`` gets 401, as
        behind Kubeflow's auth proxy (oauth2-proxy in front of the KFP API)."""
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: list[dict] = []
        self.runs: list[dict] = []
        self.uploads: list[bytes] = []
        self.calls: list[str] = []

    def handle(
        self, method: str, url: str, body: bytes, ctype: str, auth: str = ""
    ) -> tuple[int, dict]:
        parsed = urlparse(url)
        path, query = parsed.path, parse_qs(parsed.query)
        self.calls.append(f"{method} {path}")
        if self.token is not None and auth != f"Bearer {self.token}":
            return 401, {"error": "Unauthorized"}
        if method == "GET" and path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and path == "/apis/v2beta1/pipelines":
            name = _filter_name(query)
            found = [p for p in self.pipelines.values() if p["display_name"] == name]
            return 200, {"pipelines": found} if found else {}
        if method == "POST" and path in (
            "/apis/v2beta1/pipelines/upload",
            "/apis/v2beta1/pipelines/upload_version",
        ):
            self.uploads.append(_multipart_file(body, ctype))
            name = query["name"][0]
            if path.endswith("/upload"):
                pid = f"p{len(self.pipelines) + 1}"
                self.pipelines[pid] = {"pipeline_id": pid, "display_name": name}
                self.versions[pid] = []
            else:
                pid = query["pipelineid"][0]
                if any(v["display_name"] == name for v in self.versions[pid]):
                    return 409, {"error": "version exists", "code": 6}
            version = {
                "pipeline_id": pid,
                "pipeline_version_id": f"v{sum(map(len, self.versions.values())) + 1}",
                "display_name": name,
            }
            self.versions[pid].append(version)
            return 200, version if path.endswith("upload_version") else self.pipelines[pid]
        m = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", path)
        if method == "GET" and m:
            return 200, {"pipeline_versions": self.versions[m.group(1)]}
        if method == "GET" and path == "/apis/v2beta1/experiments":
            name = _filter_name(query)
            found = [e for e in self.experiments if e["display_name"] == name]
            return 200, {"experiments": found} if found else {}
        if method == "POST" and path == "/apis/v2beta1/experiments":
            exp = {**json.loads(body), "experiment_id": f"e{len(self.experiments) + 1}"}
            self.experiments.append(exp)
            return 200, exp
        if method == "POST" and path == "/apis/v2beta1/runs":
            run = {**json.loads(body), "run_id": f"r{len(self.runs) + 1}"}
            self.runs.append(run)
            return 200, run
        return 404, {"error": f"not found: {method} {path}"}


def _filter_name(query: dict) -> str:
    return json.loads(query["filter"][0])["predicates"][0]["stringValue"]


def _multipart_file(body: bytes, ctype: str) -> bytes:
    msg = BytesParser(policy=email_policy).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    return next(part.get_payload(decode=True) for part in msg.iter_parts())


@pytest.fixture()
def kfp_server():
    state = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = state.handle(
                self.command,
                self.path,
                body,
                self.headers.get("Content-Type", ""),
                self.headers.get("Authorization", ""),
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _isolated_kfp_context(tmp_path, monkeypatch):
    # kfp.Client reads ~/.config/kfp/context.json; keep the user's out of the test.
    monkeypatch.setenv("HOME", str(tmp_path))


def test_params_are_typed_and_checked_against_the_compiled_pipeline():
    inputs = submit.pipeline_inputs(submit.read_package(PACKAGE))
    assert {"source", "preset", "overrides", "nproc", "gate_max_mmd"} <= set(inputs)
    params = submit.parse_params(
        [
            "nproc=4",
            "preset=gpu-16g",
            "overrides=[train.amp=bf16]",
            "gate_max_mmd=0.2",
            "source=s3://b/x",
        ],
        inputs,
    )
    assert params == {
        "nproc": 4,
        "preset": "gpu-16g",
        "overrides": ["train.amp=bf16"],
        "gate_max_mmd": 0.2,
        "source": "s3://b/x",
    }
    with pytest.raises(submit.SubmitError, match="nprocs.*did you mean 'nproc'"):
        submit.parse_params(["nprocs=4"], inputs)
    with pytest.raises(submit.SubmitError, match="nproc: expected NUMBER_INTEGER"):
        submit.parse_params(["nproc=four"], inputs)
    with pytest.raises(submit.SubmitError, match="expected NAME=VALUE"):
        submit.parse_params(["nproc"], inputs)


def test_missing_package_is_one_clear_line(tmp_path, capsys):
    rc = submit.main(["--host", "http://127.0.0.1:9", "--package", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert (
        rc == 1 and "nope.yaml: compiled pipeline not found" in err and len(err.splitlines()) == 1
    )


def test_unreachable_host_fails_fast_in_one_line(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = submit.main(["--host", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith(
        f"submit: error: cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"
    )
    assert len(err.splitlines()) == 1


def test_upload_and_run_then_resubmit_reuses_the_pipeline(kfp_server, capsys):
    host, state = kfp_server
    rc = submit.main(
        [
            "--host",
            host,
            "--experiment",
            "exp-a",
            "--param",
            "nproc=2",
            "--param",
            "overrides=[a.b=1]",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    result = json.loads(out[out.index("{") :])
    assert result["run_id"] == "r1" and result["experiment_id"] == "e1"
    assert state.uploads == [PACKAGE.read_bytes()]  # the checked-in compiled YAML, as is
    run = state.runs[0]
    assert run["pipeline_version_reference"] == {
        "pipeline_id": result["pipeline_id"],
        "pipeline_version_id": result["version_id"],
    }
    assert run["runtime_config"]["parameters"] == {"nproc": 2, "overrides": ["a.b=1"]}
    assert run["experiment_id"] == "e1"
    assert run["service_account"] == "pipeline-runner"  # the account the Role is bound to
    assert state.pipelines[result["pipeline_id"]]["display_name"] == "brain-ldm"

    # Same package again: same pipeline, a version named by content (created once), same experiment.
    assert submit.main(["--host", host, "--experiment", "exp-a"]) == 0
    assert submit.main(["--host", host, "--experiment", "exp-a"]) == 0
    assert len(state.pipelines) == 1 and len(state.experiments) == 1 and len(state.runs) == 3
    names = [v["display_name"] for v in state.versions[result["pipeline_id"]]]
    assert len(names) == 2 and names[1].startswith("brain-ldm-")
    assert (
        state.runs[2]["pipeline_version_reference"]["pipeline_version_id"]
        == state.versions[result["pipeline_id"]][1]["pipeline_version_id"]
    )


def test_behind_the_auth_proxy_the_token_reaches_every_call(kfp_server, capsys):
    """Kubeflow's auth proxy answers 401 to a call without the bearer token: the health
    check before the upload must send it too, or a run could never be submitted."""
    host, state = kfp_server
    state.token = "s3cr3t-token"
    assert submit.main(["--host", host]) == 1
    assert "HTTP 401; pass --token" in capsys.readouterr().err
    assert submit.main(["--host", host, "--token", "s3cr3t-token"]) == 0
    out = capsys.readouterr()
    assert len(state.runs) == 1
    assert "s3cr3t-token" not in out.out + out.err
