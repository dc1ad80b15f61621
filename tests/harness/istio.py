"""What an Istio sidecar answers a request, given the RequestAuthentications and
AuthorizationPolicies in force: a model of Istio's rules (1.24 to 1.28, the releases
Kubeflow 1.10.0 and 1.11.0 ship), so tests can ask of built manifests "does the deploy
step's smoke inference pass? does the profile owner's?" as tests/harness/netpol.py does for
NetworkPolicies.

Request authentication (istio/istio pilot/pkg/security/authn/policy_applier.go
``convertToEnvoyJwtConfig``: line 146 at tag 1.24.3 and 1.26.1, 147 at 1.28.0, the same
requirement tree in all three; Envoy's jwt_authn filter):

- every RequestAuthentication that selects the workload contributes its ``jwtRules``, one
  provider each: those of the workload's own namespace and of the root namespace
  ``istio-system`` whose selector matches its labels, or that have none (mesh-wide in the
  root namespace; pilot/pkg/model/authentication.go ``getConfigsForWorkload``, lines
  230-275 at 1.24.3); AuthorizationPolicies are chosen the same way;
- a provider's keys are its inline ``jwks``, else what istiod fetches from ``jwksUri`` (no
  ``jwksUri``: OpenID discovery at the issuer). With ``PILOT_JWT_ENABLE_REMOTE_JWKS`` at its
  default (false) istiod fetches them itself, with no credentials, trusting only the system
  roots and ``/cacerts/extra.pem``; when that fails it hands Envoy a fake JWKS, so every
  token of that provider fails (pilot/pkg/model/jwks_resolver.go, 1.24.3 lines 185-208 and
  275-283). What istiod can fetch is the :class:`Mesh`'s ``fetchable``: the API server's
  ``/openid/v1/jwks`` is not (its certificate is from the cluster's CA, and the path is not
  open to anonymous callers); Kubeflow's ``cluster-jwks-proxy`` serves it over plain HTTP;
- a provider reads its token from ``fromHeaders`` (name, prefix) and ``fromParams``; with
  neither, from ``Authorization: Bearer`` and the ``access_token`` query parameter;
- one provider: ``requires_any {provider, allow_missing}``: no token there passes
  unauthenticated; a token there that is not valid for the provider (another issuer: Envoy's
  "Jwt issuer is not configured"; a bad signature) is 401. Several providers: the request
  passes when one of them verifies a token, or when each one either verifies its token or
  finds none (the outer OR Istio adds for providers sharing a location);
- a verified token makes the request principal ``<iss>/<sub>``; its ``outputClaimToHeaders``
  set headers from its claims, and the token is passed on only with
  ``forwardOriginalToken`` (what the next hop, behind a gateway, gets).

Authorization (istio.io AuthorizationPolicy reference): DENY policies first (a match is
403); then, if any ALLOW policy selects the workload, a request no ALLOW rule matches is 403;
with none, it passes. A rule matches when one of its ``from`` sources, one of its ``to``
operations and all of its ``when`` conditions match (an absent part matches all). Values
match exactly, as a prefix (``abc*``), a suffix (``*abc``), or any present value (``*``); a
``notX`` field matches when ``X`` would not.

Tokens here are JWTs whose signature is an HMAC with a key per issuer (:func:`token`), and
an issuer's JWKS (:func:`jwks`) holds that key: enough to tell a token the issuer signed
from a forged one, and a provider that has its issuer's keys from one that does not. Not modelled: mTLS modes (PeerAuthentication), CUSTOM (ext-authz) policies, audiences
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
"""What each issuer signs with."""
KUBERNETES_JWKS_URI = f"{KUBERNETES_ISSUER}/openid/v1/jwks"
"""The API server's own JWKS endpoint: TLS from the cluster's CA, and not anonymous."""
CLUSTER_JWKS_PROXY_URI = "http://cluster-jwks-proxy.istio-system.svc.cluster.local/openid/v1/jwks"
"""Kubeflow's proxy of the API server's JWKS over plain HTTP (kubeflow/manifests
common/oauth2-proxy/components/cluster-jwks-proxy, v1.10.0 to v1.11.0)."""
DEX_JWKS_URI = f"{DEX_ISSUER}/keys"
GATEWAY_PRINCIPAL = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
CLUSTER_LOCAL_GATEWAY = {"app": "cluster-local-gateway", "istio": "cluster-local-gateway"}
"""The pods of Kubeflow's cluster-local gateway (istio-system), which Knative's
``knative-local-gateway`` selects (kubeflow/manifests common/knative/knative-serving/overlays/
gateways): a cluster-local Knative address, a canary's tag among them, goes through it."""
CLUSTER_LOCAL_GATEWAY_SOURCE_PRINCIPAL = (
    "cluster.local/ns/istio-system/sa/cluster-local-gateway-service-account"
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwks(issuer: str) -> str:
    """The JWKS document ``issuer`` publishes (for the API server: what
    ``kubectl get --raw /openid/v1/jwks`` prints): its one signing key, as an ``oct`` key."""
    key = {"kty": "oct", "alg": "HS256", "kid": issuer, "k": _b64(SIGNING_KEYS[issuer])}
    return json.dumps({"keys": [key]})


KUBEFLOW_JWKS = {DEX_JWKS_URI: jwks(DEX_ISSUER), DEX_ISSUER: jwks(DEX_ISSUER)}
"""What istiod can fetch on Kubeflow's example install (``m2m-dex-only``, the default at
v1.10.0, v1.10.2 and v1.11.0): Dex's keys over plain HTTP (by URI or by discovery at its
issuer), not the API server's."""
WITH_JWKS_PROXY = {**KUBEFLOW_JWKS, CLUSTER_JWKS_PROXY_URI: jwks(KUBERNETES_ISSUER)}
"""The same with Kubeflow's ``cluster-jwks-proxy`` installed (the ``m2m-dex-and-kind``
overlay, or the component alone)."""


def token(issuer: str, subject: str, key: bytes | None = None) -> str:
    """A JWT from ``issuer`` for ``subject``, signed with ``key`` (default: the issuer's)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": issuer, "sub": subject}).encode())
    sig = hmac.new(key or SIGNING_KEYS.get(issuer, b"?"), f"{head}.{body}".encode(), "sha256")
    return f"{head}.{body}.{_b64(sig.digest())}"


def _claims(jwt: str, keys: list[bytes]) -> dict[str, Any] | None:
    """The payload of a JWT signed with one of ``keys``; None otherwise."""
    try:
        head, body, sig = jwt.split(".")
        claims = json.loads(_unb64(body))
    except ValueError:
        return None
    for key in keys:
        expected = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
        if hmac.compare_digest(_b64(expected), sig):
            return claims
    return None


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
    with ``metadata.namespace`` set, as built), asked about requests to one workload.

    ``fetchable``: the JWKS documents istiod can fetch, by URI (for a provider with no
    ``jwksUri``: by its issuer, OpenID discovery); any other URI fails to fetch."""

    objects: list[Mapping[str, Any]] = field(default_factory=list)
    fetchable: Mapping[str, str] = field(default_factory=lambda: dict(KUBEFLOW_JWKS))

    def _selecting(self, kind: str, labels: Mapping[str, str], namespace: str) -> list[Any]:
        out = []
        for obj in self.objects:
            if obj.get("kind") != kind:
                continue
            ns = obj["metadata"].get("namespace")
            selector = (obj.get("spec") or {}).get("selector")
            if ns in (namespace, ROOT_NAMESPACE) and (
                selector is None or selects(selector, labels)
            ):
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
        return self.admit(labels, namespace, method, path, headers, source)[0]

    def admit(
        self,
        labels: Mapping[str, str],
        namespace: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        source: Source = Source(),
    ) -> tuple[int, dict[str, str]]:
        """:meth:`request`'s answer, and the headers the workload (a gateway) passes on."""
        req = _Request(method, path, {k.lower(): v for k, v in headers.items()}, source)
        rules = [
            rule
            for obj in self._selecting("RequestAuthentication", labels, namespace)
            for rule in obj["spec"].get("jwtRules") or []
        ]
        if not self._authenticate(req, rules):
            return 401, req.headers
        policies = self._selecting("AuthorizationPolicy", labels, namespace)
        by_action = {
            a: [p for p in policies if p["spec"].get("action", "ALLOW") == a]
            for a in ("DENY", "ALLOW")
        }
        if any(self._policy_matches(p, req) for p in by_action["DENY"]):
            return 403, req.headers
        if by_action["ALLOW"] and not any(self._policy_matches(p, req) for p in by_action["ALLOW"]):
            return 403, req.headers
        return 200, req.headers

    def _keys(self, rule: Mapping[str, Any]) -> list[bytes]:
        """The provider's keys: its inline ``jwks``, else what istiod fetched (none when the
        fetch failed: Envoy then holds istiod's fake JWKS, which verifies no token)."""
        document = rule.get("jwks") or self.fetchable.get(rule.get("jwksUri") or rule["issuer"])
        if not document:
            return []
        return [_unb64(k["k"]) for k in json.loads(document)["keys"] if k.get("kty") == "oct"]

    @staticmethod
    def _token_at(req: _Request, rule: Mapping[str, Any]) -> tuple[str, str] | None:
        """(header, token) where the provider finds a token, or None."""
        headers = rule.get("fromHeaders")
        params = rule.get("fromParams")
        if not headers and not params:
            headers = [{"name": "Authorization", "prefix": "Bearer "}]
        for where in headers or []:
            value = req.headers.get(where["name"].lower())
            prefix = where.get("prefix", "")
            if value is not None and value.startswith(prefix):
                return where["name"].lower(), value[len(prefix) :]
        return None  # query parameters: the model's requests carry none

    def _authenticate(self, req: _Request, rules: list[Mapping[str, Any]]) -> bool:
        """Envoy's verdict over the providers (see the module docstring); sets the principal
        and the headers passed on."""
        outcomes = []
        for rule in rules:
            found = self._token_at(req, rule)
            if found is None:
                outcomes.append("missing")
                continue
            header, jwt = found
            claims = _claims(jwt, self._keys(rule))
            ok = claims is not None and claims.get("iss") == rule["issuer"]
            outcomes.append("ok" if ok else "failed")
            if not ok:
                continue
            if req.principal is None:
                req.principal = f"{claims['iss']}/{claims['sub']}"
            for out in rule.get("outputClaimToHeaders") or []:
                req.headers[out["header"].lower()] = str(claims.get(out["claim"], ""))
            if not rule.get("forwardOriginalToken"):
                req.headers.pop(header, None)
        return "ok" in outcomes or all(o != "failed" for o in outcomes)

    def _policy_matches(self, policy: Mapping[str, Any], req: _Request) -> bool:
        return any(self._rule_matches(rule, req) for rule in policy["spec"].get("rules") or [])

    @staticmethod
    def _rule_matches(rule: Mapping[str, Any], req: _Request) -> bool:
        def holds(checks: Mapping[str, str | None], part: Mapping[str, Any]) -> bool:
            for key, value in checks.items():
                negated = f"not{key[0].upper()}{key[1:]}"
                if key in part and not _matches(value, part[key]):
                    return False
                if negated in part and _matches(value, part[negated]):
                    return False
            return True

        def source_ok(src: Mapping[str, Any]) -> bool:
            checks = {
                "principals": req.source.principal,
                "namespaces": req.source.namespace,
                "requestPrincipals": req.principal,
            }
            return holds(checks, src)

        def operation_ok(op: Mapping[str, Any]) -> bool:
            return holds({"methods": req.method, "paths": req.path}, op)

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
    in every profile namespace (kubeflow/kubeflow v1.10.0 components/profile-controller/
    controllers/profile_controller.go ``getAuthorizationPolicy``, lines 419-504): the owner,
    by the ``kubeflow-userid`` header, from the ingress gateway or the KFP UI only (a header
    is only worth what the peer that set it is); workloads of the same namespace; Knative's
    probe paths; the notebook controller's GET of ``*/api/kernels``."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "ns-owner-access-istio", "namespace": namespace},
        "spec": {
            "action": "ALLOW",
            "rules": [
                {
                    "when": [{"key": "request.headers[kubeflow-userid]", "values": [owner]}],
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    GATEWAY_PRINCIPAL,
                                    "cluster.local/ns/kubeflow/sa/ml-pipeline-ui",
                                ]
                            }
                        }
                    ],
                },
                {"when": [{"key": "source.namespace", "values": [namespace]}]},
                {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]},
                {
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    "cluster.local/ns/kubeflow/sa/notebook-controller-service-account"
                                ]
                            }
                        }
                    ],
                    "to": [{"operation": {"methods": ["GET"], "paths": ["*/api/kernels"]}}],
                },
            ],
        },
    }


def _at_cluster_local_gateway(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ROOT_NAMESPACE},
        "spec": {"selector": {"matchLabels": dict(CLUSTER_LOCAL_GATEWAY)}, **spec},
    }


KNATIVE_PROBE_PATHS = [
    "/healthz",
    "/ready",
    "/wait-for-drain",
    "/metrics",
    "/stats/prometheus",
    "*/healthz",
    "*/ready",
]


def cluster_local_gateway_policies(m2m_auth: bool) -> list[dict[str, Any]]:
    """The policies at Kubeflow's cluster-local gateway: its base allows everything
    (kubeflow/manifests common/istio/cluster-local-gateway/base/gateway-authorizationpolicy.yaml,
    v1.10.0 and v1.11.0); v1.11.0's optional ``overlays/m2m-auth`` validates Kubernetes
    service account tokens in ``Authorization`` (through ``cluster-jwks-proxy``, forwarded,
    ``sub`` into ``kubeflow-userid``), denies a request without a principal except on
    Knative's probe paths, and narrows the ALLOW to principals and those paths."""
    if not m2m_auth:
        return [
            _at_cluster_local_gateway(
                "AuthorizationPolicy",
                "cluster-local-gateway",
                {
                    "action": "ALLOW",
                    "rules": [{}],
                },
            )
        ]
    sa_rule = {
        "jwksUri": CLUSTER_JWKS_PROXY_URI,
        "forwardOriginalToken": True,
        "outputClaimToHeaders": [{"header": "kubeflow-userid", "claim": "sub"}],
        "fromHeaders": [{"name": "Authorization", "prefix": "Bearer "}],
    }
    issuers = (KUBERNETES_ISSUER, "https://kubernetes.default.svc")
    return [
        _at_cluster_local_gateway(
            "RequestAuthentication",
            "cluster-local-gateway-jwt",
            {
                "jwtRules": [{"issuer": issuer, **sa_rule} for issuer in issuers],
            },
        ),
        _at_cluster_local_gateway(
            "AuthorizationPolicy",
            "cluster-local-gateway-require-jwt",
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"notRequestPrincipals": ["*"]}}],
                        "to": [{"operation": {"notPaths": KNATIVE_PROBE_PATHS}}],
                    }
                ],
            },
        ),
        _at_cluster_local_gateway(
            "AuthorizationPolicy",
            "cluster-local-gateway",
            {
                "action": "ALLOW",
                "rules": [
                    {"from": [{"source": {"requestPrincipals": ["*"]}}]},
                    {"to": [{"operation": {"paths": KNATIVE_PROBE_PATHS}}]},
                ],
            },
        ),
    ]
