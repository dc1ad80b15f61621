"""A Kubeflow Model Registry REST server on 127.0.0.1, held to the registry's own OpenAPI spec.

One release's spec (``tests/openapi/model-registry-<tag>/model-registry.yaml``, copied from
kubeflow/model-registry at that tag) drives it: a request is matched to the spec's operation,
its query parameters and JSON body are checked against the operation's parameters and
request schema, and every answer, errors included, is checked against the response schema
the spec gives for its status. Anything a client sends that the spec does not describe is a
*violation*; tests assert there are none, so a client that talks to this server talks to
that release.

What the real server does, and this one too (kubeflow/model-registry, same tags):

- a JSON body is decoded with ``DisallowUnknownFields``: a field the release does not know
  is a 400 (internal/server/openapi/api_model_registry_service.go, every create/update
  handler; error.go ``DefaultErrorHandler``: a ``ParsingError`` is a 400);
- errors carry the spec's ``Error`` body (internal/server/openapi/helpers.go
  ``ErrorResponse``): v0.2.15.3 and v0.2.19 set only its ``message`` (lines 27-31; the code
  goes out empty), v0.3.4 also its ``code``, the HTTP status text. The status is
  pkg/api/error.go ``ErrToStatus``'s: not found 404, bad request 400, and a name that exists
  409 (v0.2.x: ML Metadata's ``AlreadyExists``; v0.3.4: internal/core/registered_model.go and
  model_version.go map a duplicate key to ``api.ErrConflict``); a store that is down is a 503
  in v0.2.x (ML Metadata's gRPC ``Unavailable``) and a 500 in v0.3.4 (a database error
  matches none of its cases, lines 14-27);
- registered model names are unique, version names are unique within their registered
  model, ids are decimal strings, times are milliseconds since the epoch as strings;
- an update replaces the custom properties it is given as a whole.

Only the operations a client needs to register models are served; any other operation of
the spec answers 501 and is recorded as a violation (the harness lacks it, the release does
not).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from openapi_schema_validator import OAS30Validator

SPECS = Path(__file__).resolve().parents[1] / "openapi"
VERSIONS = ("v0.2.15.3", "v0.2.19", "v0.3.4")
"""The registry releases Kubeflow 1.10.0, 1.10.2 and 1.11.0 install."""
BASE = "/api/model_registry/v1alpha3"


@functools.cache
def spec(version: str) -> dict[str, Any]:
    return yaml.safe_load((SPECS / f"model-registry-{version}" / "model-registry.yaml").read_text())


def _resolve(version: str, node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        parts = node["$ref"].lstrip("#/").split("/")
        node = functools.reduce(lambda d, k: d[k], parts, spec(version))
    return node


def _schema_fields(version: str, schema: dict[str, Any]) -> set[str]:
    """The property names an object schema allows, through ``$ref`` and ``allOf``."""
    schema = _resolve(version, schema)
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        names |= _schema_fields(version, part)
    return names


def _errors(version: str, schema: dict[str, Any], value: Any) -> list[str]:
    root = {**schema, "components": spec(version)["components"]}
    return [e.message for e in OAS30Validator(root).iter_errors(value)]


class _Conflict(Exception):
    pass


class _NotFound(Exception):
    pass


class _BadRequest(Exception):
    pass


def _now() -> str:
    return str(int(time.time() * 1000))


class Store:
    """The registry's records: registered models, model versions, model artifacts."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self.artifacts_of: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def _new(self, body: dict[str, Any], **defaults: Any) -> dict[str, Any]:
        stamp = _now()
        record = {"customProperties": {}, **defaults, **copy.deepcopy(body)}
        record.update(id=str(next(self.ids)), createTimeSinceEpoch=stamp)
        record["lastUpdateTimeSinceEpoch"] = stamp
        return record

    def create_model(self, body: dict[str, Any]) -> dict[str, Any]:
        if any(m["name"] == body["name"] for m in self.models.values()):
            raise _Conflict(f"registered model with name {body['name']} already exists: conflict")
        record = self._new(body, state="LIVE")
        self.models[record["id"]] = record
        return record

    def create_version(self, body: dict[str, Any]) -> dict[str, Any]:
        parent = body["registeredModelId"]
        if parent not in self.models:
            raise _NotFound(f"no registered model found for id {parent}: not found")
        if any(
            v["name"] == body["name"] and v["registeredModelId"] == parent
            for v in self.versions.values()
        ):
            raise _Conflict(f"model version with name {body['name']} already exists: conflict")
        record = self._new(body, state="LIVE")
        self.versions[record["id"]] = record
        self.artifacts_of[record["id"]] = []
        return record

    def add_artifact(self, version_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if version_id not in self.versions:
            raise _NotFound(f"no model version found for id {version_id}: not found")
        if body.get("id"):
            return 200, self.update(self.artifacts, body["id"], body)
        names = {self.artifacts[a].get("name") for a in self.artifacts_of[version_id]}
        if body.get("name") in names:
            raise _Conflict(f"model artifact with name {body['name']} already exists: conflict")
        record = self._new(body, state="UNKNOWN")
        self.artifacts[record["id"]] = record
        self.artifacts_of[version_id].append(record["id"])
        return 201, record

    def update(self, table: dict[str, Any], key: str, body: dict[str, Any]) -> dict[str, Any]:
        if key not in table:
            raise _NotFound(f"no entity found for id {key}: not found")
        table[key].update(copy.deepcopy(body))
        table[key]["lastUpdateTimeSinceEpoch"] = _now()
        return table[key]

    @staticmethod
    def find(table: dict[str, Any], what: str, **match: str | None) -> dict[str, Any]:
        wanted = {k: v for k, v in match.items() if v is not None}
        if not wanted:
            raise _BadRequest("invalid parameters used to retrieve " + what)
        for record in table.values():
            if all(record.get(k) == v for k, v in wanted.items()):
                return record
        raise _NotFound(f"no {what} found for {wanted}: not found")


class ModelRegistryServer:
    """A registry of release ``version`` on a free 127.0.0.1 port (``url``).

    ``requests`` lists ``(method, path, query, body)`` as received; ``violations`` what was
    sent or answered that the release's spec does not allow. ``down()`` makes every request
    answer as the release does when the store behind it is unreachable; ``before(method, path,
    action)`` runs ``action()`` when such a request arrives, before it is served: another
    client writing at the same moment.
    """

    def __init__(self, version: str) -> None:
        self.version = version
        self.store = Store()
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.violations: list[str] = []
        self.unavailable = False
        self.hooks: list[tuple[str, str, Callable[[], None]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ModelRegistryServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def down(self) -> None:
        self.unavailable = True

    def before(self, method: str, path: str, action: Callable[[], None]) -> None:
        self.hooks.append((method, BASE + path, action))

    # ---- matching and checking

    def _operation(self, method: str, path: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        for template, item in spec(self.version)["paths"].items():
            pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            found = re.match(pattern, path)
            if found and method.lower() in item:
                return template, item, found.groupdict()
        raise LookupError(path)

    def _check_query(self, item: dict[str, Any], op: dict[str, Any], query: dict[str, Any]) -> None:
        params = [
            _resolve(self.version, p) for p in item.get("parameters", []) + op.get("parameters", [])
        ]
        known = {p["name"]: p for p in params if p["in"] == "query"}
        for name, values in query.items():
            if name not in known:
                self.violations.append(
                    f"{op['operationId']}: query parameter {name!r} is not in {self.version}'s "
                    "spec; the server ignores it"
                )
                continue
            schema = _resolve(self.version, known[name].get("schema", {}))
            for problem in _errors(self.version, schema, values[0]):
                raise _BadRequest(f"query parameter {name}: {problem}")
        for name, param in known.items():
            if param.get("required") and name not in query:
                raise _BadRequest(f"query parameter {name} is required")

    def _check_body(self, op: dict[str, Any], body: Any) -> None:
        content = (op.get("requestBody") or {}).get("content", {}).get("application/json")
        if content is None:
            return
        schema = content["schema"]
        target = _resolve(self.version, schema)
        if isinstance(body, dict) and "oneOf" not in target:
            unknown = sorted(set(body) - _schema_fields(self.version, schema))
            if unknown:
                raise _BadRequest(f'json: unknown field "{unknown[0]}"')
        problems = _errors(self.version, schema, body)
        if problems:
            raise _BadRequest(problems[0])

    def _check_answer(self, op: dict[str, Any], status: int, body: Any) -> None:
        responses = op.get("responses", {})
        if str(status) not in responses:
            self.violations.append(
                f"{op['operationId']}: {status} is not an answer {self.version} gives"
            )
            return
        content = _resolve(self.version, responses[str(status)]).get("content", {})
        schema = (content.get("application/json") or {}).get("schema")
        if schema is not None:
            for problem in _errors(self.version, schema, body):
                self.violations.append(f"{op['operationId']}: answer {status}: {problem}")

    # ---- serving

    def _error(self, status: int, message: str) -> dict[str, str]:
        """The release's Error body for ``status``."""
        code = HTTPStatus(status).phrase if self.version == "v0.3.4" else ""
        return {"code": code, "message": message}

    def _store_down(self) -> tuple[int, dict[str, str]]:
        """The answer while the store behind the server is unreachable."""
        if self.version == "v0.3.4":
            return 500, self._error(500, "dial tcp 10.96.0.12:3306: connect: connection refused")
        return 503, self._error(503, "rpc error: code = Unavailable desc = connection error")

    def serve(self, method: str, url: str, raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        body = json.loads(raw) if raw else None
        self.requests.append((method, parts.path, query, body))
        try:
            template, item, path_args = self._operation(method, parts.path)
        except LookupError:
            return 404, "404 page not found\n"
        op = item[method.lower()]
        for hook_method, hook_path, action in self.hooks:
            if hook_method == method and hook_path == parts.path:
                action()
        try:
            if self.unavailable:
                status, answer = self._store_down()
            else:
                self._check_query(item, op, query)
                self._check_body(op, body)
                with self.store.lock:
                    status, answer = self._dispatch(method, template, path_args, query, body)
        except _BadRequest as exc:
            self.violations.append(f"{op['operationId']}: 400 {exc}")
            status, answer = 400, self._error(400, str(exc))
        except _NotFound as exc:
            status, answer = 404, self._error(404, str(exc))
        except _Conflict as exc:
            status, answer = 409, self._error(409, str(exc))
        if status == 501:
            self.violations.append(f"{op['operationId']}: not served by this test server")
        else:
            self._check_answer(op, status, answer)
        return status, answer

    def _dispatch(
        self, method: str, template: str, args: dict[str, str], query: dict[str, Any], body: Any
    ) -> tuple[int, Any]:
        s, q = self.store, {k: v[0] for k, v in query.items()}
        route = (method, template.removeprefix(BASE))
        if route == ("GET", "/registered_models"):
            return 200, _page(list(s.models.values()), q)
        if route == ("POST", "/registered_models"):
            return 201, s.create_model(body)
        if route == ("GET", "/registered_model"):
            return 200, s.find(
                s.models, "registered models", name=q.get("name"), externalId=q.get("externalId")
            )
        if route == ("GET", "/registered_models/{registeredmodelId}"):
            return 200, s.find(s.models, "registered model", id=args["registeredmodelId"])
        if route == ("PATCH", "/registered_models/{registeredmodelId}"):
            return 200, s.update(s.models, args["registeredmodelId"], body)
        if route == ("GET", "/registered_models/{registeredmodelId}/versions"):
            s.find(s.models, "registered model", id=args["registeredmodelId"])
            mine = [
                v
                for v in s.versions.values()
                if v["registeredModelId"] == args["registeredmodelId"]
            ]
            return 200, _page(mine, q)
        if route == ("POST", "/model_versions"):
            return 201, s.create_version(body)
        if route == ("GET", "/model_version"):
            if q.get("name") is not None and q.get("parentResourceId") is None:
                raise _BadRequest("a version name needs parentResourceId")
            return 200, s.find(
                s.versions,
                "model versions",
                name=q.get("name"),
                registeredModelId=q.get("parentResourceId"),
                externalId=q.get("externalId"),
            )
        if route == ("GET", "/model_versions/{modelversionId}"):
            return 200, s.find(s.versions, "model version", id=args["modelversionId"])
        if route == ("PATCH", "/model_versions/{modelversionId}"):
            return 200, s.update(s.versions, args["modelversionId"], body)
        if route == ("POST", "/model_versions/{modelversionId}/artifacts"):
            return s.add_artifact(args["modelversionId"], body)
        if route == ("GET", "/model_versions/{modelversionId}/artifacts"):
            s.find(s.versions, "model version", id=args["modelversionId"])
            return 200, _page([s.artifacts[a] for a in s.artifacts_of[args["modelversionId"]]], q)
        if route == ("GET", "/model_artifact"):
            owned = s.artifacts
            if q.get("parentResourceId") is not None:
                ids = s.artifacts_of.get(q["parentResourceId"], [])
                owned = {a: s.artifacts[a] for a in ids}
            return 200, s.find(
                owned, "model artifacts", name=q.get("name"), externalId=q.get("externalId")
            )
        return 501, self._error(500, f"{method} {template} is not served by the test server")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = registry.serve(self.command, self.path, raw)
                text = answer if isinstance(answer, str) else json.dumps(answer)
                data = text.encode()
                self.send_response(status)
                kind = "text/plain" if isinstance(answer, str) else "application/json"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _page(items: list[dict[str, Any]], q: dict[str, str]) -> dict[str, Any]:
    size = int(q.get("pageSize") or 100)
    return {"items": items[:size], "size": len(items[:size]), "pageSize": size, "nextPageToken": ""}


@contextmanager
def model_registry(version: str) -> Iterator[ModelRegistryServer]:
    """A :class:`ModelRegistryServer` of ``version``, served for the block."""
    with ModelRegistryServer(version) as server:
        yield server
