"""What KServe made of one write of an InferenceService: the identities the write must
replace (:class:`Written`), and each reading after it (:meth:`RevisionWatch.state`) from the
status, the predictor's Deployment and HPA (RawDeployment mode), and the Warning events
KServe records when what it writes is refused.

A refusal never shows in the status: KServe's reconcile fails, no new revision or template
appears, and it records the error as a Warning event on the InferenceService and retries.
Such an event ends the wait when it is about this write: an admission webhook's denial
(:data:`ldm_core.kube.knative.DENIED_BY_WEBHOOK`), the API server's validation refusing the
child KServe wrote (:data:`REFUSED_BY_API_SERVER`), or, while the status still shows an
InvalidSpec from before the write, KServe's refusal of this spec's runtime
(:func:`ldm_core.kube.isvc_status.refusal_patterns`). Any other failed reconcile (an update
conflict) is retried by KServe and is not the write's failure.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ldm_core.kube import deployment_status, knative
from ldm_core.kube.isvc_api import InferenceServiceApi
from ldm_core.kube.isvc_status import (
    RevisionState,
    invalid_spec,
    is_raw,
    model_failure,
    predictor_status,
    raw_revision_state,
    refusal_patterns,
    revision_state,
)

EVENTS_EVERY_S = 2.0
"""How often, at most, a wait lists the InferenceService's events for a refusal (a list
weighs more than a get, and KServe repeats the event on every retry anyway)."""
REFUSED_BY_API_SERVER = " is invalid: "
"""In the message of the API server's validation refusal (``<Kind>.<group> "<name>" is
invalid: <field>: <why>``), which KServe records when a child it wrote is refused: on KServe
0.14.1 and 0.15.0 a Deployment whose ``deploymentStrategy`` changed to Recreate keeps the old
``rollingUpdate`` (their update is a strategic merge over the current object), and is."""


@dataclass(frozen=True)
class Written:
    """One write and what served before it: the new revision must differ from these, and
    only events after ``written_at`` are about the write."""

    revision: str | None
    """Serverless: the predictor's latestCreatedRevision."""
    deployment_revision: str | None
    """RawDeployment: the predictor Deployment's rollout revision."""
    written_at: datetime
    predictor: dict[str, Any]
    """The predictor spec written (RawDeployment: what the Deployment and HPA must carry)."""
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    """The labels and annotations written (KServe copies them into the pod template)."""
    refused: tuple[str, str, str] | None = None
    """KServe's InvalidSpec report before the write (:func:`model_failure`)."""
    clock: float = 0.0
    """The rollout's clock at the write."""


class RevisionWatch:
    """Readings of what one rollout's writes came to.

    Args:
        api: the rollout's API calls.
        clock: monotonic seconds (the rollout's).
        poll_s: seconds between two readings.
    """

    def __init__(self, api: InferenceServiceApi, clock: Callable[[], float], poll_s: float) -> None:
        self.api = api
        self.clock = clock
        self.poll_s = poll_s
        self._events_due = clock()

    def written(
        self,
        obj: dict[str, Any] | None,
        predictor: dict[str, Any],
        metadata: dict[str, dict[str, str]] | None = None,
    ) -> Written:
        """What a write of ``predictor`` and ``metadata`` now must replace, read from
        ``obj`` (None: a first deploy)."""
        revision = deployment_revision = refused = None
        if obj is not None:
            revision = predictor_status(obj).get("latestCreatedRevision")
            refused = model_failure(obj)
            if is_raw(obj):
                ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
                deployment_revision = deployment_status.revision(self.api.deployment(ns, name))
        # Event times have whole seconds: a margin keeps an event of this very second.
        now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        return Written(
            revision,
            deployment_revision,
            now,
            copy.deepcopy(predictor),
            copy.deepcopy(metadata or {}),
            refused,
            self.clock(),
        )

    def state(self, obj: dict[str, Any], written: Written) -> RevisionState:
        """Where the revision of ``written`` stands in ``obj`` (failed on a refusal of it)."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        refused = invalid_spec(obj)
        if refused and model_failure(obj) != written.refused:
            return RevisionState("failed", f"no new revision; {refused}")
        if is_raw(obj):
            dep, hpa = self.api.deployment(ns, name), self.api.hpa(ns, name)
            budget = deployment_status.startup_budget_s(written.predictor) or 0.0
            state = raw_revision_state(
                obj,
                dep,
                hpa,
                written.predictor,
                written.metadata,
                deadline_counts=self.clock() - written.clock >= budget,
            )
        else:
            state = revision_state(obj, written.revision)
        if state.phase != "waiting" or state.revision is not None:
            return state
        if self.clock() < self._events_due:
            return state
        self._events_due = self.clock() + max(self.poll_s, EVENTS_EVERY_S)
        # An InvalidSpec from before the write: only KServe's refusal of this spec says it
        # is still refused (the status shows the old report until KServe reconciles).
        ours = refusal_patterns(written.refused, written.predictor) if refused else ()
        patterns = (knative.DENIED_BY_WEBHOOK, REFUSED_BY_API_SERVER, *ours)
        event = self.api.warning(ns, name, written.written_at, patterns)
        if event is None:
            return state
        mine = any(re.search(p, event) for p in ours)
        why = f"{refused}; {event}" if mine else f"KServe reported {event}"
        return RevisionState("failed", f"no new revision; {why}")
