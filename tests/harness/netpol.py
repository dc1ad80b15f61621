"""Which connections a set of Kubernetes NetworkPolicies admits.

A model of the API's semantics (kubernetes.io/docs/concepts/services-networking/
network-policies/, and the NetworkPolicy type's field docs in k8s.io/api/networking/v1),
so tests can ask of a built manifest "may a pipeline step reach MinIO on 9000?" instead of
matching YAML shapes:

- A pod is isolated for egress (ingress) when some policy in its namespace selects it and
  lists Egress (Ingress) in ``policyTypes``; a missing ``policyTypes`` means Ingress, plus
  Egress when the policy has an ``egress`` section. An isolated pod's connections are those
  some rule of some selecting policy allows (policies are additive, never deny).
- A connection needs both ends: the source's egress and the destination's ingress.
- A rule with no ``to``/``from`` matches every peer, with no ``ports`` every port. Peers in
  one rule are ORed; ``namespaceSelector`` and ``podSelector`` in the same peer are ANDed; a
  ``podSelector`` alone means pods of the policy's own namespace. ``ipBlock`` matches
  addresses (``except`` carved out); a port may be a number or a named container port
  (resolved on the destination pod), with an optional ``endPort``; the protocol defaults
  to TCP.
- Every namespace carries ``kubernetes.io/metadata.name`` (set by the API server).
- A connection to a Service is a connection to one of its pods on the ``targetPort``:
  kube-proxy (or the CNI's own service implementation) rewrites the ClusterIP and Service
  port before policies see the packet, and policies name pods and pod ports, never Services
  (NetworkPolicyPort.port: "a numerical or named port on a pod"; ServicePort.targetPort:
  "Number or name of the port to access on the pods targeted by the service"; and
  projectcalico/calico#2088: "k8s NP is defined in terms of pods, not services"). So a rule
  for the Service port admits nothing when the targetPort differs.

Not modelled: what a CNI adds beyond the API (node traffic, host-network pods), which
these tests do not rely on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    """A pod as policies see it: its namespace (and that namespace's labels), its labels,
    and its named container ports."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)

    def all_namespace_labels(self) -> dict[str, str]:
        return {**self.namespace_labels, "kubernetes.io/metadata.name": self.namespace}


@dataclass(frozen=True)
class Address:
    """An endpoint no pod selector can match: the API server, NodeLocal DNSCache, the
    internet."""

    ip: str


@dataclass(frozen=True)
class Service:
    """A ClusterIP Service as clients meet it: its namespace, ``ports`` (Service port ->
    targetPort, a number or a named container port) and the ``pods`` its selector picks
    (each must carry the selector's labels). Any of them may get a connection."""

    namespace: str
    selector: Mapping[str, str]
    ports: Mapping[int, int | str]
    pods: tuple[Pod, ...]

    def __post_init__(self) -> None:
        if not self.pods:
            raise ValueError("a Service with no pods behind it takes no connection")
        for pod in self.pods:
            if pod.namespace != self.namespace or not selects(
                {"matchLabels": self.selector}, pod.labels
            ):
                raise ValueError(f"{pod} is not selected by the Service's {dict(self.selector)}")

    def backends(self, port: int) -> list[tuple[Pod, int]]:
        """(pod, pod port) for a connection to the Service's ``port``."""
        if port not in self.ports:
            raise ValueError(f"the Service exposes {sorted(self.ports)}, not {port}")
        target = self.ports[port]
        out = []
        for pod in self.pods:
            number = pod.ports.get(target) if isinstance(target, str) else target
            if number is None:
                raise ValueError(f"{pod} has no container port named {target!r}")
            out.append((pod, number))
        return out


Endpoint = Pod | Address


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions all hold; ``{}`` matches all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        held = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }
        if op not in held:
            raise ValueError(f"matchExpressions operator {op!r} is not a Kubernetes operator")
        if not held[op]:
            return False
    return True


def _policy_types(spec: Mapping[str, Any]) -> set[str]:
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if "egress" in spec else set())


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not isinstance(other, Address):
            return False
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        inside = ip in ipaddress.ip_network(block["cidr"])
        carved = any(ip in ipaddress.ip_network(c) for c in block.get("except") or [])
        return inside and not carved
    if not isinstance(other, Pod):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.all_namespace_labels()):
            return False
    elif other.namespace != policy_ns:
        return False
    return selects(peer.get("podSelector"), other.labels)


def _port_matches(
    rule_ports: Iterable[Mapping[str, Any]], dest: Endpoint, port: int, proto: str
) -> bool:
    rule_ports = list(rule_ports)
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != proto:
            continue
        want = entry.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = dest.ports.get(want) if isinstance(dest, Pod) else None
            if want is None:
                continue
        if want <= port <= entry.get("endPort", want):
            return True
    return False


def _side_allows(
    policies: list[Mapping[str, Any]],
    pod: Pod,
    direction: str,
    peer: Endpoint,
    dest: Endpoint,
    port: int,
    proto: str,
) -> bool:
    """Whether ``pod``'s policies of one direction allow the connection to/from ``peer``."""
    kind, rules_key, peers_key = {
        "Egress": ("Egress", "egress", "to"),
        "Ingress": ("Ingress", "ingress", "from"),
    }[direction]
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace") == pod.namespace
        and kind in _policy_types(p["spec"])
        and selects(p["spec"].get("podSelector"), pod.labels)
    ]
    if not selecting:
        return True  # not isolated in this direction
    for policy in selecting:
        ns = policy["metadata"]["namespace"]
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key) or []
            if peers and not any(_peer_matches(p, ns, peer) for p in peers):
                continue
            if _port_matches(rule.get("ports") or [], dest, port, proto):
                return True
    return False


def admits(
    policies: Iterable[Mapping[str, Any]],
    src: Endpoint,
    dst: Endpoint | Service,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether a new ``protocol`` connection from ``src`` to ``dst``:``port`` is allowed:
    the source's egress policies and the destination's ingress policies must both admit it.
    To a Service, ``port`` is the Service port and every pod behind it must be reachable on
    its targetPort (the client does not choose which one it gets).
    ``policies`` are NetworkPolicy objects with ``metadata.namespace`` set (as built)."""
    policies = [p for p in policies if p.get("kind") == "NetworkPolicy"]
    if isinstance(dst, Service):
        return all(
            admits(policies, src, pod, pod_port, protocol) for pod, pod_port in dst.backends(port)
        )
    out_ok = not isinstance(src, Pod) or _side_allows(
        policies, src, "Egress", dst, dst, port, protocol
    )
    in_ok = not isinstance(dst, Pod) or _side_allows(
        policies, dst, "Ingress", src, dst, port, protocol
    )
    return out_ok and in_ok
