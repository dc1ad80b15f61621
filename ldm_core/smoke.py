"""The smoke inference: one real V2 request that proves a deployed model answers.

"Deployed" means "answered a request": both deploy backends end with :func:`smoke_check`
against the endpoint they brought up, and the InferenceService rollout smoke-tests each new
revision before it promotes it. The answer must be a finite volume of the model's shape and
affine, served by the bundle that was deployed (its digest), not merely an HTTP 200.
Inside a Kubeflow profile the predictor only answers callers its Istio AuthorizationPolicy
admits, so the request carries the step's service account token (:func:`smoke_headers`).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ldm_core import bundle as bundle_mod
from ldm_core.errors import DeployError
from ldm_core.io import BUNDLE_JSON

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
"""Where the kubelet mounts a pod's service account token (rotated in place)."""
SMOKE_TOKEN_HEADER = "x-brain-ldm-smoke-token"
"""The header the smoke inference carries the step's token in, the one the opt-in
RequestAuthentication reads (manifests/components/kubeflow-istio-smoke): not
``Authorization``, where Kubeflow's gateway forwards the signed-in user's Dex token."""


class SmokeTestError(DeployError):
    """The endpoint is up but its answer to a real inference was wrong or missing."""


def _decode_v2(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """V2 response (JSON or JSON + binary data extension) -> (its JSON head, {name: array})."""
    body = response.content
    header_len = response.headers.get("inference-header-content-length")
    head = json.loads(body[: int(header_len)] if header_len else body)
    offset = int(header_len) if header_len else 0
    tensors: dict[str, Any] = {}
    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
    for out in head.get("outputs", []):
        shape = [int(x) for x in out["shape"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[offset : offset + int(size)]
            offset += int(size)
            if out["datatype"] == "BYTES":
                items, pos = [], 0
                while pos < len(raw):
                    (n,) = struct.unpack_from("<I", raw, pos)
                    items.append(raw[pos + 4 : pos + 4 + n])
                    pos += 4 + n
                tensors[out["name"]] = items
            else:
                tensors[out["name"]] = np.frombuffer(raw, dtype=dtypes[out["datatype"]]).reshape(
                    shape
                )
        elif out["datatype"] == "BYTES":
            tensors[out["name"]] = list(out["data"])
        else:
            tensors[out["name"]] = np.asarray(out["data"], dtype=dtypes[out["datatype"]]).reshape(
                shape
            )
    return head, tensors


def _is_loopback(url: str) -> bool:
    """Loopback traffic must not go to a proxy named in the environment."""
    return httpx.URL(url).host in ("127.0.0.1", "localhost", "::1")


def _cluster_local(url: str) -> bool:
    """``<service>.<namespace>.svc[.<cluster domain>]``: a name only the cluster resolves."""
    labels = httpx.URL(url).host.split(".")
    return len(labels) >= 3 and labels[2] == "svc"


def smoke_headers(
    url: str, token_file: str | Path | None = SERVICE_ACCOUNT_TOKEN
) -> dict[str, str]:
    """The credentials a smoke inference to ``url`` carries: the pod's service account token,
    read afresh (the kubelet rotates it), and only to a cluster-local service.

    In a Kubeflow profile namespace every workload has an Istio sidecar and the profile's
    ``ns-owner-access-istio`` AuthorizationPolicy admits only the owner's requests through
    the ingress gateway (``kubeflow-userid`` header) and mesh peers of the same namespace.
    A KFP step runs without a sidecar, so it has no mesh identity; what it can prove is its
    service account, by its token, sent twice:

    - in :data:`SMOKE_TOKEN_HEADER`, for the predictor: the opt-in component
      ``manifests/components/kubeflow-istio-smoke`` validates it there (RequestAuthentication,
      issuer ``https://kubernetes.default.svc.cluster.local``, that header only, so the
      users' own tokens in ``Authorization`` are not judged by it) and allows its principal;
    - as ``Authorization: Bearer``, for the cluster-local gateway a canary's tag address goes
      through: Kubeflow 1.11's optional ``common/istio/cluster-local-gateway/overlays/m2m-auth``
      denies there every request without a principal from that header. At the predictor
      nothing reads it: Kubeflow's own RequestAuthentications select its gateways only
      (``dex-jwt`` and ``m2m-token-issuer`` the ingress gateway, ``m2m-auth``'s the
      cluster-local one), and the component's reads its own header.

    The token never goes to a name outside the cluster (an external URL, a ``smoke_url`` on
    the internet): it is the step's API credential. No token file (not in a pod) or
    ``token_file=None``: no header.
    """
    if token_file is None or not _cluster_local(url):
        return {}
    try:
        token = Path(token_file).read_text().strip()
    except OSError:
        return {}
    if not token:
        return {}
    return {SMOKE_TOKEN_HEADER: token, "Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class DeployedBundle:
    """What a smoke answer must match: the bundle that was deployed, not just any model.

    A server that loaded the wrong bundle (a stale storageUri, a revision that never
    rolled) answers finite volumes too; only its geometry and digest tell it apart.
    """

    digest: str
    """``ldm_core.bundle.digest`` of the deployed bundle."""
    image_shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def read(cls, bundle_dir: str | Path) -> DeployedBundle:
        """From ``bundle.json`` and the files' digest (no model is loaded)."""
        root = Path(bundle_dir)
        try:
            info = json.loads((root / BUNDLE_JSON).read_text())
            shape = tuple(int(x) for x in info["image_shape"])
            affine = np.asarray(info["affine"], dtype=np.float64).reshape(4, 4)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DeployError(
                f"{root / BUNDLE_JSON}: no usable image_shape/affine ({exc})"
            ) from None
        return cls(bundle_mod.digest(root), shape, affine)  # type: ignore[arg-type]


def _served_digest(meta: dict[str, Any], answer: dict[str, Any]) -> str | None:
    """The bundle digest the server reports: the inference's own parameters (that very
    answer's bundle) first, else the model metadata's."""
    for source in (answer, meta):
        value = (source.get("parameters") or {}).get("bundle_digest")
        if value:
            return str(value)
    return None


def _check_answer(
    url: str,
    tensors: dict[str, Any],
    metadata_shape: list[int],
    bundle: DeployedBundle | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The volume and affine of a smoke answer, or SmokeTestError naming what is wrong."""
    volume, affine = tensors.get("volume"), tensors.get("affine")
    if volume is None or affine is None:
        raise SmokeTestError(f"{url}: response lacks 'volume' or 'affine' (got {sorted(tensors)})")
    expected = [1, 1, *metadata_shape[2:]]
    if list(volume.shape) != expected:
        raise SmokeTestError(f"{url}: volume shape {list(volume.shape)}, metadata says {expected}")
    if bundle is not None and list(volume.shape[2:]) != list(bundle.image_shape):
        raise SmokeTestError(
            f"{url}: volume shape {list(volume.shape)}, the deployed bundle's image_shape is "
            f"{list(bundle.image_shape)}: the server runs another bundle"
        )
    if not np.isfinite(volume).all():
        raise SmokeTestError(f"{url}: volume has non-finite values")
    if (
        affine.shape != (4, 4)
        or not np.isfinite(affine).all()
        or abs(np.linalg.det(affine[:3, :3])) < 1e-9
    ):
        raise SmokeTestError(
            f"{url}: affine is not a finite invertible 4x4 matrix: {affine.tolist()}"
        )
    if bundle is not None and not np.allclose(affine, bundle.affine, rtol=1e-5, atol=1e-4):
        raise SmokeTestError(
            f"{url}: affine {affine.tolist()} differs from the deployed bundle's "
            f"{bundle.affine.tolist()}: the server runs another bundle"
        )
    return volume, affine


def smoke_check(
    base_url: str,
    model_name: str,
    *,
    bundle: DeployedBundle | None = None,
    steps: int = 2,
    seed: int = 0,
    timeout_s: float = 300.0,
    headers: dict[str, str] | None = None,
    client: httpx.Client | None = None,
) -> dict[str, Any]:
    """One real V2 inference (one seed, few steps, binary output) and sanity checks on it:
    a finite ``[1, 1, D, H, W]`` volume with D, H, W as the model's metadata says, and a
    finite, invertible affine. Given the deployed ``bundle``, the answer must also come from
    it: its image shape, its affine, and its digest (``parameters.bundle_digest`` of the
    answer or of ``GET /v2/models/{name}``; a server that reports none fails, since server
    and deploy ship together). Returns what it measured; raises SmokeTestError otherwise."""
    url = base_url.rstrip("/")
    own = client is None
    http = client or httpx.Client(timeout=timeout_s, trust_env=not _is_loopback(url))
    try:
        meta_r = http.get(f"{url}/v2/models/{model_name}", headers=headers)
        if meta_r.status_code != 200:
            raise SmokeTestError(
                f"GET {url}/v2/models/{model_name}: HTTP {meta_r.status_code} {meta_r.text[:200]}"
            )
        meta = meta_r.json()
        outputs = {o["name"]: o for o in meta.get("outputs", [])}
        if "volume" not in outputs:
            raise SmokeTestError(f"{url}: model {model_name} metadata lists no 'volume' output")
        request = {
            "inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]}],
            "parameters": {"steps": steps, "output": "volume", "binary_data_output": True},
        }
        started = time.monotonic()
        r = http.post(
            f"{url}/v2/models/{model_name}/infer",
            json=request,
            headers={"content-type": "application/json", **(headers or {})},
            timeout=timeout_s,
        )
        latency = time.monotonic() - started
    except httpx.HTTPError as exc:
        raise SmokeTestError(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        if own:
            http.close()
    if r.status_code != 200:
        raise SmokeTestError(
            f"POST {url}/v2/models/{model_name}/infer: HTTP {r.status_code} {r.text[:300]}"
        )
    try:
        head, tensors = _decode_v2(r)
    except (ValueError, KeyError, struct.error) as exc:
        raise SmokeTestError(f"{url}: unreadable V2 response: {exc}") from None
    volume, affine = _check_answer(url, tensors, outputs["volume"]["shape"], bundle)
    served = _served_digest(meta, head)
    if bundle is not None and served != bundle.digest:
        raise SmokeTestError(
            f"{url}: parameters.bundle_digest is {served or 'missing'} (in the answer and in "
            f"GET /v2/models/{model_name}), the deployed bundle's is {bundle.digest}"
            + ("" if served else ": the server is older than this deploy step")
        )
    return {
        "ok": True,
        "latency_s": round(latency, 3),
        "shape": list(volume.shape),
        "steps": steps,
        "mean": float(volume.mean()),
        "affine": affine.tolist(),
        "bundle_digest": served,
    }
