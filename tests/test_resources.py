"""ldm_core.kube.resources: typed calls on one custom resource, and the "is it served?" probe,
against the emulated Kubernetes API on loopback (tests/harness/kube.py).

The launchers and the rollout build on these conventions: a missing object is None, a
create may race a restarted attempt (409 then means "already there"), a delete takes the
dependents first, only merge patches are sent, and every refusal raises the caller's own
error naming the call and the grant it needs.
"""

from __future__ import annotations

import json
import socket

import kubernetes
import pytest
import yaml

from ldm_core.errors import LdmError
from ldm_core.kube.client import api_client
from ldm_core.kube.resources import (
    PROBE_NAME,
    CustomObjects,
    CustomResource,
    api_served,
    cluster_serves,
)
from tests.harness.kube import KubeApi

NS = "team-a"
WIDGETS = CustomResource(
    "example.org",
    "v1",
    "widgets",
    "Widget",
    field_releases=(("spec.colour", "Widget of example v2+; set widget.version to v2"),),
)
SERVED = {"example.org/v1/widgets": "Widget"}
AGENT = "resources-under-test"


class WidgetError(LdmError):
    """The caller's own error type, which every failed call must raise."""


def _widget(name: str, **spec: object) -> dict:
    return {
        "apiVersion": WIDGETS.api_version,
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def api():
    with KubeApi(SERVED) as api:
        yield api


@pytest.fixture
def widgets(api) -> CustomObjects:
    return CustomObjects(api.client(AGENT), WIDGETS, NS, WidgetError)


def test_names_as_the_api_and_rbac_spell_them():
    assert WIDGETS.api_version == "example.org/v1"
    assert WIDGETS.rbac_name == "widgets.example.org"


# --------------------------------------------------------------------------- CustomObjects


def test_a_missing_object_is_none_and_a_created_one_reads_back(widgets):
    assert widgets.get("w1") is None
    widgets.create({**_widget("w1", size=3), "metadata": {"name": "w1", "namespace": "other"}})
    got = widgets.get("w1")
    assert got is not None and got["spec"] == {"size": 3}
    assert got["metadata"]["namespace"] == NS  # created where the objects live, not elsewhere


def test_a_create_that_races_another_is_none_only_when_asked(widgets):
    """A restarted attempt may find its object already created (409 AlreadyExists): with
    ``exist_ok`` that is an answer (None), without it an error naming the call."""
    assert widgets.create(_widget("w1")) is not None
    assert widgets.create(_widget("w1"), exist_ok=True) is None
    with pytest.raises(WidgetError, match=f"create widgets.example.org {NS}/w1: 409"):
        widgets.create(_widget("w1"))


def test_patch_is_a_json_merge_patch(api, widgets):
    widgets.create(_widget("w1", size=3, colour="red"))
    answer = widgets.patch("w1", {"spec": {"size": 4, "colour": None}})
    assert answer["spec"] == {"size": 4}
    assert widgets.get("w1")["spec"] == {"size": 4}
    (patch,) = [r for r in api.requests(AGENT) if r.method.value.upper() == "PATCH"]
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


def test_delete_takes_the_dependents_first_and_says_whether_there_was_anything(api, widgets):
    widgets.create(_widget("w1"))
    assert widgets.delete("w1") is True
    assert widgets.get("w1") is None
    assert widgets.delete("w1") is False
    deletes = [r for r in api.requests(AGENT) if r.method.value.upper() == "DELETE"]
    assert [r.data.get("propagationPolicy") for r in deletes] == ["Foreground", "Foreground"]


def test_a_refusal_raises_the_callers_error_naming_the_grant(api, widgets):
    api.emulator["get", f"/apis/example.org/v1/namespaces/{NS}/widgets/w1"] << 403
    with pytest.raises(WidgetError) as err:
        widgets.get("w1")
    text = str(err.value)
    assert text.startswith(f"get widgets.example.org {NS}/w1: the API server refused (403")
    assert f"allow 'get' on widgets.example.org in namespace {NS}" in text


def test_an_unreachable_api_names_the_host():
    closed = _closed_url()
    widgets = CustomObjects(api_client(closed), WIDGETS, NS, WidgetError)
    with pytest.raises(WidgetError, match=f"Kubernetes API at {closed} unreachable"):
        widgets.get("w1")


def test_creates_and_patches_ask_for_strict_field_validation(api, widgets):
    """Without it a real API server drops the fields its CRD lacks and answers 201: the
    object then silently lacks what was asked for."""
    widgets.create(_widget("w1", size=3))
    widgets.patch("w1", {"spec": {"size": 4}})
    writes = [r for r in api.requests(AGENT) if r.method.value.upper() in ("POST", "PATCH")]
    assert [r.params.get("fieldValidation") for r in writes] == ["Strict", "Strict"]
    assert all("dryRun" not in r.params for r in writes)


def _strict_refusal(*fields: str):
    """The API server's answer to a strict write with fields the CRD lacks (k8s.io/apiserver
    handlers: 400 BadRequest, the decoder's "strict decoding error")."""
    unknown = ", ".join(f'unknown field "{f}"' for f in fields)
    message = (
        f'Widget in version "v1" cannot be handled as a Widget: strict decoding error: {unknown}'
    )
    body = {"kind": "Status", "status": "Failure", "reason": "BadRequest", "code": 400}
    return json.dumps({**body, "message": message}).encode()


def test_an_unknown_field_names_the_releases_that_have_it(api, widgets):
    path = f"/apis/example.org/v1/namespaces/{NS}/widgets"
    api.emulator["post", path] << 400 << _strict_refusal("spec.colour", "spec.shape")
    with pytest.raises(WidgetError) as err:
        widgets.create(_widget("w1", colour="red", shape="round"))
    text = str(err.value)
    assert text.startswith(f"create widgets.example.org {NS}/w1: ")
    assert "spec.colour: unknown field (Widget of example v2+; set widget.version to v2)" in text
    assert "spec.shape: unknown field (not in the Widget CRD this cluster serves)" in text


def test_unknown_fields_asks_with_a_dry_run(api, widgets):
    """Which fields of an object the API server does not know, learnt with the ``create``
    grant and nothing stored: a server-side dry run with strict field validation."""
    assert widgets.unknown_fields(_widget("w1", size=3)) == []
    path = f"/apis/example.org/v1/namespaces/{NS}/widgets"
    api.emulator["post", path] << 400 << _strict_refusal("spec.colour")
    assert widgets.unknown_fields(_widget("w2", colour="red")) == ["spec.colour"]
    probes = [r for r in api.requests(AGENT) if r.method.value.upper() == "POST"]
    assert [(r.params.get("dryRun"), r.params.get("fieldValidation")) for r in probes] == [
        ("All", "Strict"),
        ("All", "Strict"),
    ]


# --------------------------------------------------------------------------- optimistic concurrency


def _status(err: kubernetes.client.ApiException) -> tuple[int, str, str]:
    body = json.loads(err.body)
    return err.status, body["reason"], body["message"]


def test_every_write_stores_a_new_resource_version(widgets):
    """The API server gives each stored version of an object its own resourceVersion (the
    etcd revision of the write), and answers every read and write with it."""
    created = widgets.create(_widget("w1", size=3))
    first = widgets.get("w1")["metadata"]["resourceVersion"]
    assert created["metadata"]["resourceVersion"] == first
    patched = widgets.patch("w1", {"spec": {"size": 4}})
    assert patched["metadata"]["resourceVersion"] not in ("", first)
    assert (
        widgets.get("w1")["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]
    )


def test_a_patch_computed_from_an_older_version_is_not_applied(api, widgets):
    """A merge patch that carries ``metadata.resourceVersion`` applies only to that version:
    the API server answers 409 Conflict once the object changed (k8s.io/apiserver, the
    registry's optimistic lock), and ``seen`` turns that answer into None."""
    widgets.create(_widget("w1", size=3))
    seen = widgets.get("w1")
    widgets.patch("w1", {"spec": {"size": 4}})  # someone else's write in between
    assert widgets.patch("w1", {"spec": {"size": 5}}, seen=seen) is None
    assert widgets.get("w1")["spec"] == {"size": 4}
    stale = [r for r in api.requests(AGENT) if r.method.value.upper() == "PATCH"][-1]
    assert stale.data["metadata"]["resourceVersion"] == seen["metadata"]["resourceVersion"]
    current = widgets.get("w1")
    assert widgets.patch("w1", {"spec": {"size": 5}}, seen=current)["spec"] == {"size": 5}

    custom = kubernetes.client.CustomObjectsApi(api.client("kubectl"))
    stale_patch = {"metadata": {"resourceVersion": seen["metadata"]["resourceVersion"]}}
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.patch_namespaced_custom_object("example.org", "v1", NS, "widgets", "w1", stale_patch)
    assert _status(err.value) == (
        409,
        "Conflict",
        'Operation cannot be fulfilled on widgets.example.org "w1": the object has been '
        "modified; please apply your changes to the latest version and try again",
    )


def test_a_delete_of_an_older_version_deletes_nothing(api, widgets):
    """A delete with preconditions (uid and resourceVersion of the object as read) deletes
    only that object at that version: 409 Conflict otherwise ("Precondition failed", the
    storage's check), which ``seen`` turns into False."""
    widgets.create(_widget("w1", size=3))
    seen = widgets.get("w1")
    widgets.patch("w1", {"spec": {"size": 4}})
    assert widgets.delete("w1", seen=seen) is False
    assert widgets.get("w1") is not None
    delete = [r for r in api.requests(AGENT) if r.method.value.upper() == "DELETE"][-1]
    meta = seen["metadata"]
    assert delete.data["preconditions"] == {
        "resourceVersion": meta["resourceVersion"],
        "uid": meta["uid"],
    }
    assert delete.data["propagationPolicy"] == "Foreground"

    # Gone and created again under the same name: another object (uid), not ours to delete.
    current = widgets.get("w1")
    assert widgets.delete("w1") is True
    widgets.create(_widget("w1", size=3))
    custom = kubernetes.client.CustomObjectsApi(api.client("kubectl"))
    options = kubernetes.client.V1DeleteOptions(
        preconditions=kubernetes.client.V1Preconditions(uid=current["metadata"]["uid"])
    )
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom.delete_namespaced_custom_object(
            "example.org", "v1", NS, "widgets", "w1", body=options
        )
    status, reason, message = _status(err.value)
    assert (status, reason) == (409, "Conflict")
    assert message.startswith('Operation cannot be fulfilled on widgets.example.org "w1": ')
    assert f"Precondition failed: UID in precondition: {current['metadata']['uid']}, " in message
    assert widgets.delete("w1", seen=widgets.get("w1")) is True
    assert widgets.get("w1") is None


# --------------------------------------------------------------------------- strict validation
# The emulated API server as a cluster with the Widget CRD installed: the refusals of a strict
# write the CustomObjects errors are built from.

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.org"},
    "spec": {
        "group": "example.org",
        "names": {"kind": "Widget", "plural": "widgets"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer"},
                                    "colour": {"type": "string"},
                                    "options": {"type": "object"},
                                    "labels": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "raw": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def crd_api(tmp_path):
    (tmp_path / "widgets.yaml").write_text(yaml.safe_dump(WIDGET_CRD))
    with KubeApi(SERVED, crds=tmp_path) as api:
        yield api


def _refusal(api: KubeApi, write) -> str:
    """The message of the 400 BadRequest a raw client's strict write got."""
    custom = kubernetes.client.CustomObjectsApi(api.client("kubectl"))
    with pytest.raises(kubernetes.client.ApiException) as err:
        write(custom)
    status, reason, message = _status(err.value)
    assert (status, reason) == (400, "BadRequest"), message
    return message


def _create(body: dict):
    def write(custom):
        custom.create_namespaced_custom_object(
            "example.org", "v1", NS, "widgets", body, field_validation="Strict"
        )

    return write


def test_a_strict_create_is_refused_as_the_api_server_words_it(crd_api):
    """k8s.io/apiserver handlers/create.go: the decoder's error behind "<Kind> in version
    <Go-quoted version> cannot be handled as a <Kind>"; nothing is stored."""
    message = _refusal(crd_api, _create(_widget("w1", size=3, shape="round")))
    assert message == (
        'Widget in version "v1" cannot be handled as a Widget: strict decoding error: '
        'unknown field "spec.shape"'
    )
    widgets = CustomObjects(crd_api.client(AGENT), WIDGETS, NS, WidgetError)
    with pytest.raises(WidgetError, match="spec.shape: unknown field"):
        widgets.create(_widget("w1", shape="round"))
    assert widgets.get("w1") is None


def test_a_strict_patch_is_refused_with_the_bare_decoding_error(crd_api):
    """k8s.io/apiserver handlers/patch.go decodes the patched object and answers BadRequest
    with the strict decoding error alone. A merge patch's null is a deletion, not a field."""
    widgets = CustomObjects(crd_api.client(AGENT), WIDGETS, NS, WidgetError)
    widgets.create(_widget("w1", size=3, colour="red"))

    def patch(custom):
        custom.patch_namespaced_custom_object(
            "example.org",
            "v1",
            NS,
            "widgets",
            "w1",
            {"spec": {"size": 4, "shape": "round", "tint": "blue", "colour": None}},
            field_validation="Strict",
        )

    assert _refusal(crd_api, patch) == (
        'strict decoding error: unknown field "spec.shape", unknown field "spec.tint"'
    )
    with pytest.raises(WidgetError) as err:
        widgets.patch("w1", {"spec": {"colour": "red", "shape": "round"}})
    assert str(err.value) == (
        f"patch widgets.example.org {NS}/w1: spec.shape: unknown field (not in the Widget "
        "CRD this cluster serves)"
    )
    assert widgets.get("w1")["spec"] == {"size": 3, "colour": "red"}
    assert widgets.patch("w1", {"spec": {"colour": None, "shape": None}})["spec"] == {"size": 3}


def test_an_object_schema_without_properties_keeps_no_field(crd_api):
    """apiextensions-apiserver pruning/algorithm.go: a ``type: object`` node without
    properties, additionalProperties or x-kubernetes-preserve-unknown-fields declares no
    field, so every key under it is unknown (pruned, or refused when strict); a map
    (additionalProperties) and a preserved node keep theirs."""
    body = _widget("w1", options={"a": 1, "b": {"c": 2}}, labels={"x": "y"}, raw={"any": [1]})
    message = _refusal(crd_api, _create(body))
    assert message.endswith(
        'strict decoding error: unknown field "spec.options.a", unknown field "spec.options.b"'
    )
    custom = kubernetes.client.CustomObjectsApi(crd_api.client("kubectl"))
    custom.create_namespaced_custom_object("example.org", "v1", NS, "widgets", body)  # Warn
    stored = custom.get_namespaced_custom_object("example.org", "v1", NS, "widgets", "w1")
    assert stored["spec"] == {"options": {}, "labels": {"x": "y"}, "raw": {"any": [1]}}


def test_unknown_metadata_fields_are_refused_too(crd_api):
    """The root ``metadata`` is decoded strictly into ObjectMeta (apiextensions-apiserver
    schema/objectmeta ``GetObjectMetaWithOptions``), its unknown fields reported first and
    under their path, on a create as on a patch; without Strict they are dropped."""
    body = _widget("w1", size=3, shape="round")
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u", "controler": True}
    body["metadata"] = {"name": "w1", "labelz": {"a": "b"}, "ownerReferences": [owner]}
    assert _refusal(crd_api, _create(body)).endswith(
        'strict decoding error: unknown field "metadata.labelz", '
        'unknown field "metadata.ownerReferences[0].controler", unknown field "spec.shape"'
    )
    custom = kubernetes.client.CustomObjectsApi(crd_api.client("kubectl"))
    custom.create_namespaced_custom_object("example.org", "v1", NS, "widgets", body)  # Warn
    stored = custom.get_namespaced_custom_object("example.org", "v1", NS, "widgets", "w1")
    assert "labelz" not in stored["metadata"]
    assert stored["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}
    ]

    def patch(custom):
        custom.patch_namespaced_custom_object(
            "example.org",
            "v1",
            NS,
            "widgets",
            "w1",
            {"metadata": {"annotationz": {"a": "b"}}},
            field_validation="Strict",
        )

    assert _refusal(crd_api, patch) == (
        'strict decoding error: unknown field "metadata.annotationz"'
    )


# --------------------------------------------------------------------------- api_served


def test_a_served_resource_answers_its_own_not_found(api):
    """The probe reads one object no one has; the apiserver's NotFound Status names the
    resource, so the answer is "served", with the one ``get`` the Role grants."""
    assert api_served(api.client(AGENT), WIDGETS, NS) == (True, "Widget API served")
    (probe,) = api.requests(AGENT)
    assert str(probe.url.path) == f"/apis/example.org/v1/namespaces/{NS}/widgets/{PROBE_NAME}"
    assert probe.method.value.upper() == "GET"


def test_an_unserved_resource_answers_page_not_found():
    with KubeApi() as api:  # no CRD installed: plain-text "404 page not found"
        served, why = api_served(api.client(AGENT), WIDGETS, NS)
    assert not served and why == "Widget API answered 404 Not Found"


def test_a_not_found_about_another_resource_is_not_served(api):
    """A 404 Status that names some other resource (a proxy, an aggregated API in front)
    says nothing about ours."""
    body = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
    body["details"] = {"name": PROBE_NAME, "kind": "gadgets"}
    path = f"/apis/example.org/v1/namespaces/{NS}/widgets/{PROBE_NAME}"
    api.emulator["get", path] << 404 << json.dumps(body).encode()
    assert api_served(api.client(AGENT), WIDGETS, NS)[0] is False


def test_a_refused_or_unreachable_probe_is_not_served(api):
    path = f"/apis/example.org/v1/namespaces/{NS}/widgets/{PROBE_NAME}"
    api.emulator["get", path] << 403
    assert api_served(api.client(AGENT), WIDGETS, NS) == (
        False,
        "Widget API answered 403 Forbidden",
    )
    served, why = api_served(api_client(_closed_url()), WIDGETS, NS)
    assert not served and why.startswith("Kubernetes API not reachable")


# --------------------------------------------------------------------------- cluster_serves


def _kubeconfig(monkeypatch, tmp_path, url: str) -> None:
    """Credentials from a kubeconfig whose context names namespace team-a."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": url}}],
                "users": [{"name": "t", "user": {"token": "x"}}],
                "contexts": [
                    {"name": "t", "context": {"cluster": "t", "user": "t", "namespace": NS}}
                ],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # The kubernetes client reads $KUBECONFIG once, at import (maybe in an earlier test).
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig)
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_cluster_serves_probes_the_current_context_and_namespace(api, tmp_path, monkeypatch):
    _kubeconfig(monkeypatch, tmp_path, api.url)
    assert cluster_serves(WIDGETS) == (True, "Widget API served")
    assert cluster_serves(WIDGETS, namespace="team-b")[0] is True
    paths = [str(r.url.path) for r in api.requests()]
    assert paths == [
        f"/apis/example.org/v1/namespaces/{NS}/widgets/{PROBE_NAME}",
        f"/apis/example.org/v1/namespaces/team-b/widgets/{PROBE_NAME}",
    ]


def test_cluster_serves_without_credentials_says_why_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing")
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    served, why = cluster_serves(WIDGETS)
    assert not served and why.startswith("no Kubernetes configuration")
