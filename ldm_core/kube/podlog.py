"""Copy a pod's log to the component's stdout while the pod runs.

The pipeline UI shows a component's own log, not the training pods'. A follower thread
streams the master pod's log (``follow=true``) into the component's stdout, so a training
run can be watched where the pipeline runs, and keeps its last lines for the error that
reports a failure.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from datetime import datetime
from typing import Any, TextIO

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _parse_ts(text: str) -> tuple[int, int] | None:
    """RFC3339(Nano) -> (epoch seconds, nanoseconds). Older kubelets trim trailing zeros, so
    the strings do not sort lexically; and containerd stamps lines in the node's local time
    with its offset (``+01:00``), which the kubelet keeps, so the zone is read too."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not match:
        return None
    zone = "+00:00" if match[3] == "Z" else match[3]
    seconds = int(datetime.fromisoformat(match[1] + zone).timestamp())
    return seconds, int((match[2] or "0").ljust(9, "0")[:9])


class PodLogFollower(threading.Thread):
    """Follows one pod's log and copies it to ``out``, keeping the last lines for errors.

    A follow stream ends when the connection drops or the container restarts; it is reopened
    (with ``sinceSeconds`` just before the last line seen) and lines already printed are
    skipped by their kubelet timestamp, so each line shows once.
    """

    def __init__(
        self,
        core: kubernetes.client.CoreV1Api,
        namespace: str,
        pod: str,
        container: str,
        out: TextIO,
        tail_lines: int,
        reconnect_s: float,
    ) -> None:
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.out = core, namespace, pod, out
        self.container = container
        self.reconnect_s = reconnect_s
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.stop = threading.Event()
        self._last: tuple[int, int] | None = None
        self._count_at_last = 0
        self._skip = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._follow_once()
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
                log.debug("log stream of %s interrupted: %s", self.pod, err)
            self.stop.wait(self.reconnect_s)

    def finish(self, timeout_s: float) -> None:
        """Stop following, then read once more from the last line printed: a stream that was
        between reconnects when the pod finished would otherwise miss the final lines."""
        self.stop.set()
        self.join(timeout_s)
        if self.is_alive():  # still inside a stream: reading again would print lines twice
            return
        try:
            self._follow_once()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
            log.debug("final log read of %s failed: %s", self.pod, err)

    def _follow_once(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._last is not None:
            kwargs["since_seconds"] = max(1, int(time.time() - self._last[0]) + 5)
        response = self.core.read_namespaced_pod_log(
            self.pod,
            self.namespace,
            container=self.container,
            follow=True,
            timestamps=True,
            _preload_content=False,
            _request_timeout=(10, None),
            **kwargs,
        )
        # Lines stamped exactly like the last one printed: the first few were printed already.
        self._skip = self._count_at_last
        buffer = b""
        try:
            # No early exit on stop: the stream ends by itself when the container does, and
            # its last lines are the ones that explain a failure.
            for chunk in response.stream(8192):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    self._emit(raw.decode(errors="replace"))
            if buffer:
                self._emit(buffer.decode(errors="replace"))
        finally:
            response.release_conn()

    def _emit(self, line: str) -> None:
        stamp_text, _, text = line.partition(" ")
        stamp = _parse_ts(stamp_text)
        if stamp is None:  # not timestamped (should not happen with timestamps=True): show it
            text = line
        elif self._last is not None and stamp < self._last:
            return
        elif stamp == self._last:
            if self._skip > 0:
                self._skip -= 1
                return
            self._count_at_last += 1
        else:
            self._last, self._count_at_last, self._skip = stamp, 1, 0
        self.tail.append(text)
        self.out.write(text + "\n")
        self.out.flush()
