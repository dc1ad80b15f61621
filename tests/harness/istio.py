"""What an Istio sidecar answers a request, given the RequestAuthentications and
AuthorizationPolicies in force: a model of Istio's rules (1.24 to 1.28, the releases
Kubeflow 1.10.0 and 1.11.0 ship), so tests can ask of built manifests "does the deploy
step's smoke inference pass? does the profile owner's?" as tests/harness/netpol.py does for
NetworkPolicies.

Request authentication (istio/istio pilot/pkg/security/authn/policy_applier.go
``convertToEnvoyJwtConfig``: line 146 at tag 1.24.3 and 1.26.1, 147 at 1.28.0, the same
requirement tree in all three; Envoy's jwt_authn filter):

- every RequestAuthentication that selects the workload contributes its ``jwtRules``, one
  provider each: the workload's own namespace (selector matching its labels, or none), and
  the root namespace ``istio-system`` without a selector (mesh-wide);
- a provider reads its token from ``fromHeaders`` (name, prefix) and ``fromParams``; with
  neither, from ``Authorization: Bearer`` and the ``access_token`` query parameter;
- one provider: ``requires_any {provider, allow_missing}``: no token there passes
  unauthenticated; a token there that is not valid for the provider (another issuer: Envoy's
  "Jwt issuer is not configured"; a bad signature) is 401. Several providers: the request
  passes when one of them verifies a token, or when each one either verifies its token or
  finds none (the outer OR Istio adds for providers sharing a location);
- a verified token makes the request principal ``<iss>/<sub>``.

Authorization (istio.io AuthorizationPolicy reference): DENY policies first (a match is
403); then, if any ALLOW policy selects the workload, a request no ALLOW rule matches is 403;
with none, it passes. A rule matches when one of its ``from`` sources, one of its ``to``
operations and all of its ``when`` conditions match (an absent part matches all). Values
match exactly, as a prefix (``abc*``), a suffix (``*abc``), or any present value (``*``).

Tokens here are JWTs whose signature is an HMAC with a key per issuer (:func:`token`):
enough to tell a token the issuer signed from a forged one, which is all the model asks of
a JWKS. Not modelled: mTLS modes (PeerAuthentication), CUSTOM (ext-authz) policies, audiences
and expiry, claims other than ``iss`` and ``sub``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.harness.netpol import selects

ROOT_NAMESPACE = "istio-system"
KUBERNETES_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEX_ISSUER = "http://dex.auth.svc.cluster.local:5556/dex"
"""The issuer of the ID tokens Kubeflow's oauth2-proxy puts in ``Authorization: Bearer``
(kubeflow/manifests common/oauth2-proxy/base/oauth2_proxy.cfg line 60,
``set_authorization_header = true``, v1.10.0 and v1.11.0); the gateway's ``dex-jwt`` RequestAuthentication forwards it to the
backend (``forwardOriginalToken: true``, components/istio-external-auth)."""
SIGNING_KEYS = {KUBERNETES_ISSUER: b"api-server-key", DEX_ISSUER: b"dex-key"}
"""What each issuer signs with; the model's stand-in for their JWKS."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(issuer: str, subject: str, key: bytes | None = None) -> str:
    """A JWT from ``issuer`` for ``subject``, signed with ``key`` (default: the issuer's)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": issuer, "sub": subject}).encode())
    sig = hmac.new(key or SIGNING_KEYS.get(issuer, b"?"), f"{head}.{body}".encode(), "sha256")
    return f"{head}.{body}.{_b64(sig.digest())}"


def _claims(jwt: str) -> dict[str, Any] | None:
    """The payload of a JWT whose signature its issuer made; None otherwise."""
    try:
        head, body, sig = jwt.split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return None
    key = SIGNING_KEYS.get(claims.get("iss"))
    if key is None:
        return None
    expected = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return claims if hmac.compare_digest(_b64(expected), sig) else None


@dataclass(frozen=True)
class Source:
    """Who sends: its mesh identity (mTLS peer principal and namespace), if it has one."""

    principal: str = ""
    namespace: str = ""


def _matches(value: str | None, patterns: Iterable[str]) -> bool:
    if value is None:
        return False
    for p in patterns:
        if p == "*" and value:
            return True
        if p.endswith("*") and value.startswith(p[:-1]):
            return True
        if p.startswith("*") and value.endswith(p[1:]):
            return True
        if p == value:
            return True
    return False


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    source: Source
    principal: str | None = None


@dataclass
class Mesh:
    """The Istio objects of a cluster (RequestAuthentication and AuthorizationPolicy dicts
    with ``metadata.namespace`` set, as built), asked about requests to one workload."""

    objects: list[Mapping[str, Any]] = field(default_factory=list)

    def _selecting(self, kind: str, labels: Mapping[str, str], namespace: str) -> list[Any]:
        out = []
        for obj in self.objects:
            if obj.get("kind") != kind:
                continue
            ns = obj["metadata"].get("namespace")
            selector = (obj.get("spec") or {}).get("selector")
            if ns == namespace and (selector is None or selects(selector, labels)):
                out.append(obj)
            elif ns == ROOT_NAMESPACE and selector is None:
                out.append(obj)
        return out

    def request(
        self,
        labels: Mapping[str, str],
        namespace: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        source: Source = Source(),
    ) -> int:
        """200, 401 or 403: what the sidecar of the workload (``labels`` in ``namespace``)
        answers; ``source`` is the caller's mesh identity (none: a pod without a sidecar)."""
        req = _Request(method, path, {k.lower(): v for k, v in headers.items()}, source)
        rules = [
            rule
            for obj in self._selecting("RequestAuthentication", labels, namespace)
            for rule in obj["spec"].get("jwtRules") or []
        ]
        if not self._authenticate(req, rules):
            return 401
        policies = self._selecting("AuthorizationPolicy", labels, namespace)
        by_action = {
            a: [p for p in policies if p["spec"].get("action", "ALLOW") == a]
            for a in ("DENY", "ALLOW")
        }
        if any(self._policy_matches(p, req) for p in by_action["DENY"]):
            return 403
        if by_action["ALLOW"] and not any(self._policy_matches(p, req) for p in by_action["ALLOW"]):
            return 403
        return 200

    @staticmethod
    def _token_at(req: _Request, rule: Mapping[str, Any]) -> str | None:
        headers = rule.get("fromHeaders")
        params = rule.get("fromParams")
        if not headers and not params:
            headers = [{"name": "Authorization", "prefix": "Bearer "}]
        for where in headers or []:
            value = req.headers.get(where["name"].lower())
            prefix = where.get("prefix", "")
            if value is not None and value.startswith(prefix):
                return value[len(prefix) :]
        return None  # query parameters: the model's requests carry none

    def _authenticate(self, req: _Request, rules: list[Mapping[str, Any]]) -> bool:
        """Envoy's verdict over the providers (see the module docstring); sets the principal."""
        outcomes = []
        for rule in rules:
            jwt = self._token_at(req, rule)
            if jwt is None:
                outcomes.append("missing")
                continue
            claims = _claims(jwt)
            ok = claims is not None and claims.get("iss") == rule["issuer"]
            outcomes.append("ok" if ok else "failed")
            if ok and req.principal is None:
                req.principal = f"{claims['iss']}/{claims['sub']}"
        return "ok" in outcomes or all(o != "failed" for o in outcomes)

    def _policy_matches(self, policy: Mapping[str, Any], req: _Request) -> bool:
        return any(self._rule_matches(rule, req) for rule in policy["spec"].get("rules") or [])

    @staticmethod
    def _rule_matches(rule: Mapping[str, Any], req: _Request) -> bool:
        def source_ok(src: Mapping[str, Any]) -> bool:
            checks = {
                "principals": req.source.principal,
                "namespaces": req.source.namespace,
                "requestPrincipals": req.principal,
            }
            return all(_matches(checks[k], src[k]) for k in checks if k in src)

        def operation_ok(op: Mapping[str, Any]) -> bool:
            checks = {"methods": req.method, "paths": req.path}
            return all(_matches(checks[k], op[k]) for k in checks if k in op)

        def condition_ok(cond: Mapping[str, Any]) -> bool:
            key = cond["key"]
            if key.startswith("request.headers[") and key.endswith("]"):
                value = req.headers.get(key[len("request.headers[") : -1].lower())
            elif key == "source.namespace":
                value = req.source.namespace
            elif key == "request.auth.principal":
                value = req.principal
            else:
                raise ValueError(f"condition key {key!r} is not modelled")
            return _matches(value, cond.get("values") or [])

        sources = [f["source"] for f in rule.get("from") or []]
        operations = [t["operation"] for t in rule.get("to") or []]
        return (
            (not sources or any(source_ok(s) for s in sources))
            and (not operations or any(operation_ok(o) for o in operations))
            and all(condition_ok(c) for c in rule.get("when") or [])
        )


def profile_policy(namespace: str, owner: str) -> dict[str, Any]:
    """The AuthorizationPolicy ``ns-owner-access-istio`` Kubeflow's profile controller puts
    in every profile namespace (kubeflow/kubeflow components/profile-controller/controllers/
    profile_controller.go ``getAuthorizationPolicy``): the owner (by the ``kubeflow-userid``
    header the gateway sets from the verified token), workloads of the same namespace, and
    Knative's probe paths."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ns-owner-access-istio", "namespace": namespace},
        "spec": {
            "action": "ALLOW",
            "rules": [
                {"when": [{"key": "request.headers[kubeflow-userid]", "values": [owner]}]},
                {"when": [{"key": "source.namespace", "values": [namespace]}]},
                {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]},
            ],
        },
    }
