"""A safe rollout of one KServe InferenceService: a small state machine over the
Kubernetes API, in the deployment mode KServe reports (:func:`isvc_status.is_raw`):

    absent  -> create -> wait for the revision -> smoke inference -> done
    Serverless (Knative), present -> patch the predictor with ``canaryTrafficPercent`` ->
               wait for the NEW revision -> smoke inference through the canary's own
               cluster-local tag address -> promote (drop the canary, 100%) or, on failure
               or timeout, roll back: pin all traffic to the previous revision
               (``canaryTrafficPercent: 0``), restore the previous predictor spec under
               the pin, and drop the pin once the restored revision is ready
    RawDeployment (``Standard``), present -> no canary (a Deployment has no traffic split):
               patch -> wait until the Deployment carries the new spec (pod template, HPA)
               and has rolled it out -> smoke inference through the predictor's Service ->
               done, or roll back by re-applying the previous predictor spec

Why the pin: without ``canaryTrafficPercent`` KServe routes 100% to the latest *ready*
revision (kserve reconcilers/knative/ksvc_reconciler.go ``createKnativeService``, v0.14.1
lines 119-150, v0.15.2 lines 115-147): the canary that just failed, until the restored
revision is up. With ``canaryTrafficPercent: 0`` the last rolled-out revision takes 100%.

What counts as the new revision being ready, failed or awaited is read by the pure
functions of :mod:`ldm_core.kube.isvc_status` through :mod:`ldm_core.kube.isvc_watch`; the
revision promoted is the one smoke-tested, or the rollout fails. A refusal of what KServe
writes (a Warning event on the InferenceService: a webhook's, the API server's) ends the
wait at once with that message. Before an update, what is known to fail is warned about up
front: in Serverless mode a podspec feature flag of Knative's that the spec needs and that
is off (read when RBAC allows), in RawDeployment mode a change of ``deploymentStrategy`` to
Recreate.

The labels and annotations the deploy writes (the bundle's lineage, the Model Registry's
ids) go in the same write as the spec, and a roll back restores them in the same write as
the previous spec: KServe copies both into the pod template of the revision it makes. A
rerun whose spec is unchanged but whose metadata is not is an update (KServe makes a new
revision of it). The API calls and their write form are :mod:`ldm_core.kube.isvc_api`'s;
the clock and sleep are injected.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kubernetes

from ldm_core.errors import LdmError
from ldm_core.kube import isvc_api, knative
from ldm_core.kube.isvc_api import InferenceServiceApi, merge_patch
from ldm_core.kube.isvc_status import (
    RevisionState,
    canary_split_state,
    deployment_mode,
    is_raw,
    model_failure,
    pinned_state,
    predictor_status,
    promotion_state,
    revision_state,
    service_url,
)
from ldm_core.kube.isvc_watch import RevisionWatch, Written

log = logging.getLogger(__name__)

RBAC_RULES = isvc_api.RBAC_RULES
"""Every (apiGroup, resource, verbs) the rollout calls (all through
:class:`ldm_core.kube.isvc_api.InferenceServiceApi`); the pipeline runner's Role in manifests/
grants exactly the union of the kube modules' rules (tests/test_rbac.py), and
tests/test_isvc_rollout.py holds the rollout's real requests to this list."""
METADATA = ("labels", "annotations")
"""The parts of the InferenceService's metadata a deploy writes with the spec."""


class RolloutError(LdmError):
    """The InferenceService did not become a verified, serving revision."""


class RolloutTimeout(RolloutError):
    """Waited longer than allowed; the message says for what."""


class RolloutFailed(RolloutError):
    """KServe reported the revision failed, or the smoke inference through it failed."""


SmokeFn = Callable[[str], dict[str, Any]]
"""The smoke inference: called with the URL to send it to, it returns what it measured, or
raises LdmError when the answer is wrong (see :func:`ldm_core.smoke.smoke_check`)."""


def written_metadata(obj: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The labels and annotations of ``obj`` a deploy writes (all of a desired object's)."""
    meta = obj.get("metadata") or {}
    return {part: dict(meta.get(part) or {}) for part in METADATA}


def metadata_undo(
    before: dict[str, Any], written: dict[str, dict[str, str]]
) -> dict[str, dict[str, str | None]]:
    """The merge patch that gives the keys of ``written`` back their values in ``before``
    (the object before the write), removing those it did not have."""
    meta = before.get("metadata") or {}
    return {part: {k: (meta.get(part) or {}).get(k) for k in written[part]} for part in METADATA}


class InferenceServiceRollout:
    """Create or update one InferenceService and verify it serves before trusting it.

    Args:
        api_client: the API to use (see :func:`ldm_core.kube.client.api_client`).
        timeout_s: how long each wait (first revision, new revision, promotion) may take.
        poll_s: seconds between two reads of the InferenceService.
        clock: monotonic seconds, for deadlines (tests pass a fake one).
        sleep: waits between polls (tests pass one that advances their clock).
    """

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        timeout_s: float = 900.0,
        poll_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = InferenceServiceApi(api_client, RolloutError)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep
        self._advice: list[str] = []
        self._watch = RevisionWatch(self.api, clock, poll_s)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService as stored, or None when there is none of that name."""
        return self.api.get(namespace, name)

    def ensure_serving_runtime(self, runtime: dict[str, Any]) -> str:
        """:meth:`ldm_core.kube.isvc_api.InferenceServiceApi.ensure_serving_runtime`."""
        return self.api.ensure_serving_runtime(runtime)

    # ---- before writing

    def _knative_advice(
        self, desired: dict[str, Any], existing: dict[str, Any] | None
    ) -> list[str]:
        """Podspec feature flags the spec needs and Knative has off (Serverless mode only),
        logged as warnings before the write; [] when none, or when they cannot be read."""
        if is_raw(existing or desired):
            return []
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        predictor = desired["spec"]["predictor"]
        runtime_name = (predictor.get("model") or {}).get("runtime")
        runtime = self.api.runtime(ns, runtime_name) if runtime_name else None
        needed = knative.needed_flags(predictor, (runtime or {}).get("spec"))
        if not needed:
            return []
        features, source = knative.read_features(self.api.api_client)
        if features is None:
            log.info("Knative podspec feature flags not checked: %s", source)
            return []
        advice = knative.missing_flags(features, needed)
        for line in advice:
            log.warning("InferenceService %s/%s: %s", ns, name, line)
        return advice

    def _strategy_advice(self, desired: dict[str, Any], existing: dict[str, Any]) -> list[str]:
        """RawDeployment: a change of ``deploymentStrategy`` to Recreate, which KServe 0.14.1
        and 0.15.0 cannot carry out (their strategic merge keeps the old ``rollingUpdate``
        beside the Recreate, which the API server refuses); logged as a warning before the
        write. The way back is carried out: a RollingUpdate comes with its own
        ``rollingUpdate`` (deployment_reconciler.go ``setDefaultDeploymentSpec``)."""
        if not is_raw(existing):
            return []
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        kinds = [
            ((obj.get("spec") or {}).get("predictor") or {}).get("deploymentStrategy") or {}
            for obj in (existing, desired)
        ]
        was, wants = (k.get("type", "RollingUpdate") for k in kinds)
        if was == wants or wants != "Recreate":
            return []
        line = (
            f"spec.predictor.deploymentStrategy changes from {was} to {wants}: KServe 0.14.1 "
            "and 0.15.0 merge the new Deployment over the old one, and the API server refuses "
            "the result; there, delete the InferenceService (kubectl -n "
            f"{ns} delete inferenceservice {name}) and deploy again, or upgrade KServe to 0.15.2"
        )
        log.warning("InferenceService %s/%s: %s", ns, name, line)
        return [line]

    # ---- waiting

    def _state(self, obj: dict[str, Any], written: Written) -> RevisionState:
        """:meth:`RevisionWatch.state`; in RawDeployment mode with the advice given before
        the write on a refusal (a webhook's refusal in Serverless mode names its field)."""
        state = self._watch.state(obj, written)
        if state.phase == "failed" and state.revision is None and is_raw(obj):
            notes = "".join(f"; note: {line}" for line in self._advice)
            return RevisionState("failed", f"{state.detail}{notes}")
        return state

    def _wait(
        self, ns: str, name: str, check: Callable[[dict[str, Any]], RevisionState], what: str
    ) -> tuple[RevisionState, dict[str, Any]]:
        deadline = self.clock() + self.timeout_s
        state = RevisionState("waiting", "the InferenceService to exist")
        while True:
            obj = self.get(ns, name)
            if obj is not None:
                state = check(obj)
                if state.phase != "waiting":
                    return state, obj
            if self.clock() >= deadline:
                advice = "".join(f"; note: {line}" for line in self._advice)
                raise RolloutTimeout(
                    f"InferenceService {ns}/{name}: {what} not done after {self.timeout_s:g} s; "
                    f"still waiting for {state.detail}{advice}"
                )
            self.sleep(self.poll_s)

    # ---- the state machine

    def rollout(
        self,
        desired: dict[str, Any],
        smoke: SmokeFn,
        *,
        canary_percent: int | None = 10,
        url_override: str | None = None,
    ) -> dict[str, Any]:
        """Create or update ``desired`` (built without canaryTrafficPercent) and verify it;
        an update in Serverless mode goes through a ``canary_percent`` canary (1..99), one in
        RawDeployment mode and a first deploy take none.

        Returns a dict with ``action`` (created | updated | unchanged | promoted: the same
        spec was left as a canary by an interrupted rollout), ``url``, ``revision``,
        ``smoke`` (what ``smoke(url)`` returned), ``canary_percent`` (None in RawDeployment
        mode, which has no canary) and ``mode`` (Serverless | RawDeployment).
        Raises RolloutFailed / RolloutTimeout; an update that fails is rolled back first.
        """
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        predictor = desired["spec"]["predictor"]
        if "canaryTrafficPercent" in predictor:
            raise RolloutError(
                "desired InferenceService must not set canaryTrafficPercent; pass canary_percent"
            )
        self._advice = []  # said again in a timeout's message; this rollout's only
        self._watch = RevisionWatch(self.api, self.clock, self.poll_s)
        existing = self.get(ns, name)
        if existing is None:
            self._advice = self._knative_advice(desired, None)
            return self._first_deploy(desired, smoke, url_override)
        current = copy.deepcopy((existing.get("spec") or {}).get("predictor") or {})
        leftover_canary = current.pop("canaryTrafficPercent", None)
        written = written_metadata(desired)
        if current == predictor and metadata_undo(existing, written) == written:  # all stored
            return self._resume(existing, leftover_canary, smoke, url_override)
        raw = is_raw(existing)
        if not raw and not (canary_percent is not None and 0 < canary_percent < 100):
            raise RolloutError(
                f"InferenceService {ns}/{name}: canary_percent {canary_percent} for an update in "
                "Serverless mode; give 1..99. Without a canary KServe sends all traffic to the "
                "new revision once it is ready and records it as rolled out, so a roll back "
                "could not move the traffic off it until the restored revision is ready"
            )
        self._advice = [
            *self._knative_advice(desired, existing),
            *self._strategy_advice(desired, existing),
        ]
        return self._update(existing, desired, smoke, None if raw else canary_percent, url_override)

    def _resume(
        self,
        existing: dict[str, Any],
        canary: int | None,
        smoke: SmokeFn,
        url_override: str | None,
    ) -> dict[str, Any]:
        """The stored spec is the desired one: verify what KServe made of it, writing no spec.

        Writing the same spec again would make no new revision to wait for. The stored spec's
        revision may still be starting (an earlier deploy was interrupted, or runs now), or be
        a ``canary`` percent left by an interrupted rollout of this very spec: wait for it,
        smoke-test it (a canary through its own address) and promote a canary.

        A canary's split shows when KServe has reconciled the spec. Without a canary nothing
        in the status does: in the moment between another writer's spec change and KServe's
        first reconcile of it, the previous revision is verified (KServe's
        ``status.observedGeneration`` is its child's, see :func:`revision_state`).
        """
        ns, name = existing["metadata"]["namespace"], existing["metadata"]["name"]
        canary = None if is_raw(existing) else canary
        stored = copy.deepcopy((existing.get("spec") or {}).get("predictor") or {})
        stored.pop("canaryTrafficPercent", None)
        before = Written(
            None,
            None,
            datetime.now(UTC),
            stored,
            written_metadata(existing),
            model_failure(existing),
            self.clock(),
        )

        def check(obj: dict[str, Any]) -> RevisionState:
            state = self._state(obj, before)
            if state.phase != "ready" or canary is None:
                return state
            return canary_split_state(obj, state, canary)

        state, obj = self._wait(ns, name, check, "the unchanged spec's revision ready")
        if state.phase == "failed":
            where = (
                f"; its {canary}% canary share goes to the last ready revision meanwhile"
                if canary is not None
                else ""
            )
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: revision {state.revision or ''} of the unchanged "
                f"spec failed: {state.detail}{where}. Nothing was written: the same spec again "
                "would not retry it; deploy a fixed bundle, or delete the InferenceService "
                f"(kubectl -n {ns} delete inferenceservice {name}) and deploy again"
            )
        action = "unchanged" if canary is None else "promoted"
        return {"action": action, **self._verify(obj, state, smoke, canary, url_override, None)}

    def _verify(
        self,
        obj: dict[str, Any],
        state: RevisionState,
        smoke: SmokeFn,
        canary: int | None,
        url_override: str | None,
        rollback: Callable[[str, RevisionState], str] | None,
    ) -> dict[str, Any]:
        """Smoke-test the ready revision of ``state`` (a canary through its own address),
        promote a canary, and return the rollout result's keys but ``action``."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        url = url_override or service_url(obj, canary=canary is not None)
        result = self._smoke(ns, name, smoke, url, state, rollback=rollback)
        if canary is not None:
            self._promote(ns, name, state.revision)
            obj = self.get(ns, name) or obj
        return {
            "url": url_override or service_url(obj),
            "revision": state.revision,
            "smoke": result,
            "canary_percent": canary,
            "mode": deployment_mode(obj),
        }

    def _promote(self, ns: str, name: str, revision: str | None) -> None:
        """Drop canaryTrafficPercent (100% to the latest revision) and wait until it is so."""
        self.api.patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": None}}})
        state, _ = self._wait(ns, name, lambda o: promotion_state(o, revision), "promotion to 100%")
        if state.phase == "failed":
            raise RolloutFailed(f"InferenceService {ns}/{name}: not promoted: {state.detail}")
        log.info("promoted InferenceService %s/%s revision %s to 100%%", ns, name, revision)

    def _first_deploy(
        self, desired: dict[str, Any], smoke: SmokeFn, url_override: str | None
    ) -> dict[str, Any]:
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        before = self._watch.written(None, desired["spec"]["predictor"], written_metadata(desired))
        self.api.create(desired)
        log.info("created InferenceService %s/%s", ns, name)
        state, obj = self._wait(ns, name, lambda o: self._state(o, before), "first revision ready")
        if state.phase == "failed":
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: first revision failed: {state.detail}; left in place "
                f"for inspection (kubectl -n {ns} describe inferenceservice {name})"
            )
        return {"action": "created", **self._verify(obj, state, smoke, None, url_override, None)}

    def _rollback(
        self, previous: dict[str, Any], written: Written, raw: bool
    ) -> Callable[[str, RevisionState], str]:
        """A function that restores ``previous`` (the object before the update: its predictor
        spec and the values of the labels and annotations ``written``) after ``state`` (what
        the new spec came to) and says what it did."""
        ns, name = previous["metadata"]["namespace"], previous["metadata"]["name"]
        metadata = metadata_undo(previous, written.metadata)

        def rollback(reason: str, state: RevisionState) -> str:
            old = copy.deepcopy((previous.get("spec") or {}).get("predictor") or {})
            if raw or state.revision is None:
                # No new revision serves anything: restoring the spec moves no traffic.
                how = (
                    "re-applied the previous predictor spec: the Deployment rolls back to its "
                    "pod template (RawDeployment mode has no canary to drop)"
                    if raw
                    else "restored the previous predictor spec"
                )
                self._restore(ns, name, old, metadata)
            else:
                how = self._pin_and_restore(ns, name, old, metadata)
            log.warning("rolled back InferenceService %s/%s (%s): %s", ns, name, how, reason)
            return f"rolled back: {how}"

        return rollback

    def _restore(
        self, ns: str, name: str, predictor: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        """One write of the previous ``predictor`` spec and ``metadata`` values."""
        current = self.get(ns, name) or {}
        undo = merge_patch((current.get("spec") or {}).get("predictor") or {}, predictor)
        self.api.patch(ns, name, {"metadata": metadata, "spec": {"predictor": undo}})

    def _pin_and_restore(
        self, ns: str, name: str, old: dict[str, Any], metadata: dict[str, Any]
    ) -> str:
        """Serverless, after a new revision exists: pin, restore under the pin, unpin. The
        update went through a canary, so the last rolled-out revision is the previous one."""
        obj = self.get(ns, name) or {}
        rolled = predictor_status(obj).get("latestRolledoutRevision")
        if rolled is None:  # KServe ignores a canary percent without a rolled-out revision
            self._restore(ns, name, old, metadata)
            return "restored the previous predictor spec (no rolled-out revision to pin)"
        self.api.patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": 0}}})
        try:
            self._wait(ns, name, lambda o: pinned_state(o, rolled), "pinning the previous revision")
        except RolloutTimeout:
            pass  # the pin is in the spec: KServe applies it with the restored spec
        created = predictor_status(self.get(ns, name) or {}).get("latestCreatedRevision")
        self._restore(ns, name, {**old, "canaryTrafficPercent": 0}, metadata)
        pinned = (
            f"pinned all traffic to revision {rolled} (canaryTrafficPercent 0), "
            "restored the previous predictor spec"
        )
        try:
            state, _ = self._wait(
                ns, name, lambda o: revision_state(o, created), "the restored revision ready"
            )
        except RolloutTimeout as exc:
            return f"{pinned}; the pin stays until its revision is ready ({exc})"
        if state.phase != "ready":
            return f"{pinned}; the pin stays: its revision {state.revision} failed: {state.detail}"
        self.api.patch(ns, name, {"spec": {"predictor": {"canaryTrafficPercent": None}}})
        dropped = f"{pinned}, then dropped the pin once its revision {state.revision} was ready"
        try:
            check = lambda o: promotion_state(o, state.revision)  # noqa: E731
            self._wait(ns, name, check, "the restored revision at 100%")
        except RolloutTimeout as exc:
            return f"{dropped} ({exc})"
        return dropped

    def _update(
        self,
        existing: dict[str, Any],
        desired: dict[str, Any],
        smoke: SmokeFn,
        canary: int | None,
        url_override: str | None,
    ) -> dict[str, Any]:
        """Write ``desired`` over ``existing`` (Serverless: as a ``canary`` percent), wait for
        its revision, smoke-test it, promote it, or roll back."""
        ns, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        raw = is_raw(existing)
        new_predictor = copy.deepcopy(desired["spec"]["predictor"])
        before = self._watch.written(existing, new_predictor, written_metadata(desired))
        previous_revision = (
            before.deployment_revision
            if raw
            else predictor_status(existing).get("latestReadyRevision") or before.revision
        )
        if raw:
            log.info(
                "InferenceService %s/%s runs in RawDeployment mode: no canary (a Deployment "
                "has no traffic split); rolling update, smoke inference, roll back on failure",
                ns,
                name,
            )
        if canary is not None:
            new_predictor["canaryTrafficPercent"] = canary
        current = (existing.get("spec") or {}).get("predictor") or {}
        body = {
            "metadata": before.metadata,
            "spec": {"predictor": merge_patch(current, new_predictor)},
        }
        self.api.patch(ns, name, body)
        log.info(
            "patched InferenceService %s/%s (%s, canary %s%%)",
            ns,
            name,
            deployment_mode(existing),
            canary if canary is not None else 100,
        )
        rollback = self._rollback(existing, before, raw)
        try:
            state, obj = self._wait(
                ns, name, lambda o: self._state(o, before), "new revision ready"
            )
        except RolloutTimeout as exc:
            obj = self.get(ns, name) or {}
            late = revision_state(obj, before.revision) if not raw else RevisionState("", "")
            raise RolloutTimeout(
                f"{exc}; {rollback(str(exc), late)} (revision {previous_revision or 'unknown'})"
            ) from None
        if state.phase == "failed":
            raise RolloutFailed(
                f"InferenceService {ns}/{name}: new revision {state.revision or ''} failed: {state.detail}; "
                f"{rollback(state.detail, state)} (revision {previous_revision or 'unknown'})"
            )
        return {
            "action": "updated",
            "previous_revision": previous_revision,
            **self._verify(obj, state, smoke, canary, url_override, rollback),
        }

    def _smoke(
        self,
        ns: str,
        name: str,
        smoke: SmokeFn,
        url: str | None,
        state: RevisionState,
        rollback: Callable[[str, RevisionState], str] | None,
    ) -> dict[str, Any]:
        if not url:
            reason = (
                "no URL in status (status.address.url / status.url, or the canary's "
                "traffic tag) to send a smoke inference to"
            )
        else:
            try:
                return smoke(url)
            except LdmError as exc:
                reason = f"smoke inference through {url} failed: {exc}"
        if rollback is None:
            raise RolloutFailed(f"InferenceService {ns}/{name}: {reason}")
        raise RolloutFailed(f"InferenceService {ns}/{name}: {reason}; {rollback(reason, state)}")
