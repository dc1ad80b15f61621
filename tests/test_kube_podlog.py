"""Copying the training pod's log to the component's stdout (ldm_core.kube.podlog), against
a container log served as the kubelet serves ``pods/log`` (tests/harness/kubelet_log.py):
follow streams that stay open while the container runs, end when it exits or when the
connection drops, ``sinceSeconds`` and kubelet timestamps honoured.

Every wait is bounded and fails on an assertion; the follower polls every few milliseconds.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator

import kubernetes
import pytest

from ldm_core.kube.podlog import PodLogFollower
from tests.harness.kube import KubeApi
from tests.harness.kubelet_log import ContainerLog

NS = "brain-ldm"
MASTER = "train-ae-master-0"
RECONNECT_S = 0.02
WAIT_S = 5.0
SECOND = 1_000_000_000


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.005)


class Setup:
    """One API server, the master's container log, and the followers a test starts."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.followers: list[PodLogFollower] = []
        self.logs: list[ContainerLog] = []

    def log(self, **kw) -> ContainerLog:
        log = ContainerLog(MASTER, "pytorch", **kw)
        log.serve(self.api, NS)
        self.logs.append(log)
        return log

    def follower(self, tail_lines: int = 40, reconnect_s: float = RECONNECT_S) -> PodLogFollower:
        core = kubernetes.client.CoreV1Api(self.api.client("follower-under-test"))
        follower = PodLogFollower(
            core, NS, MASTER, "pytorch", io.StringIO(), tail_lines, reconnect_s
        )
        self.followers.append(follower)
        follower.start()
        return follower


@pytest.fixture
def setup() -> Iterator[Setup]:
    with KubeApi() as api:
        setup = Setup(api)
        try:
            yield setup
        finally:
            for log in setup.logs:
                log.end()
            for follower in setup.followers:
                follower.stop.set()
                follower.join(WAIT_S)


def printed(follower: PodLogFollower) -> list[str]:
    return follower.out.getvalue().splitlines()


def _end_and_finish(log: ContainerLog, follower: PodLogFollower) -> None:
    log.end()
    wait_for(lambda: log.open_streams == 0, "the stream to end with the container")
    follower.finish(timeout_s=2.0)
    assert not follower.is_alive()


# --------------------------------------------------------------------------- following


def test_lines_are_copied_while_the_container_writes_them(setup):
    log = setup.log()
    follower = setup.follower()
    log.write("step 0 loss 1.000")
    wait_for(lambda: printed(follower) == ["step 0 loss 1.000"], "the first line")
    log.write("step 1 loss 0.500")
    log.write("step 2 loss 0.333")
    wait_for(lambda: len(printed(follower)) == 3, "the next lines")
    # Through the one stream that stays open, not by polling.
    assert log.open_streams == 1 and len(log.requests) == 1
    (first,) = log.requests
    assert first["follow"].lower() == first["timestamps"].lower() == "true"
    assert first["container"] == "pytorch" and "sinceSeconds" not in first
    _end_and_finish(log, follower)
    assert printed(follower) == ["step 0 loss 1.000", "step 1 loss 0.500", "step 2 loss 0.333"]


def test_lines_cut_across_chunks_are_joined(setup):
    log = setup.log(chunk_bytes=7)
    texts = [f"step {i} loss {1 / (i + 1):.4f} lr 1e-4" for i in range(4)]
    for text in texts:
        log.write(text)
    follower = setup.follower()
    wait_for(lambda: len(printed(follower)) == 4, "four lines")
    _end_and_finish(log, follower)
    assert printed(follower) == texts


def test_the_tail_keeps_the_last_lines_without_timestamps(setup):
    """Quoted in the failure report when the pod (and its log) is already gone."""
    log = setup.log()
    for i in range(5):
        log.write(f"line {i}")
    follower = setup.follower(tail_lines=3)
    wait_for(lambda: len(printed(follower)) == 5, "five lines")
    assert list(follower.tail) == ["line 2", "line 3", "line 4"]


# --------------------------------------------------------------------------- reconnecting


def test_a_dropped_stream_is_reopened_without_repeating_or_losing_lines(setup):
    log = setup.log()
    stamps = [log.write(f"step {i}") for i in range(6)]
    log.drop_streams_after(2, 2)  # the second reopened stream drops too, on old lines only
    follower = setup.follower()
    wait_for(lambda: len(printed(follower)) == 6, "all six lines")
    log.write("step 6")
    wait_for(lambda: len(printed(follower)) == 7, "a line written after the reconnects")
    _end_and_finish(log, follower)
    assert printed(follower) == [f"step {i}" for i in range(7)]
    # Reopened from just before the last line printed: the server sends nothing older
    # than sinceSeconds, so a window too short would lose lines, not repeat them.
    reopened = log.requests[1]
    assert int(reopened["sinceSeconds"]) >= 1
    assert time.time_ns() - int(reopened["sinceSeconds"]) * SECOND <= stamps[1]


@pytest.mark.parametrize("drop_after", [1, 2, 3])
def test_lines_sharing_a_timestamp_are_neither_repeated_nor_lost(setup, drop_after):
    """Several lines can carry one stamp; a stream that drops among them resumes after
    exactly the ones printed. The stamps are seconds old when the stream is reopened (the
    launcher waits ``log_reconnect_s``, 5 s, before reopening), so the reopened stream must
    ask for enough seconds back to include them (a whole-second stamp: the window's
    rounding cannot hide a shortfall)."""
    log = setup.log()
    stamp = (time.time_ns() // SECOND - 3) * SECOND
    for text in ("a", "b", "c"):
        log.write(text, stamp_ns=stamp)
    log.write("d", stamp_ns=stamp + 1_000_000)
    log.drop_streams_after(drop_after)
    follower = setup.follower()
    wait_for(lambda: len(printed(follower)) >= 4, "four lines")
    _end_and_finish(log, follower)
    assert printed(follower) == ["a", "b", "c", "d"]


def test_trimmed_timestamps_are_ordered_by_time_not_by_text(setup):
    """Older kubelets trim trailing zeros: ``…:05Z`` is before ``…:05.1Z`` though it sorts
    after it as text."""
    log = setup.log(trim_zeros=True)
    whole = (time.time_ns() // SECOND - 2) * SECOND
    for i, text in enumerate(("at :05", "at :05.1", "at :05.2")):
        log.write(text, stamp_ns=whole + i * SECOND // 10)
    log.drop_streams_after(2)
    follower = setup.follower()
    wait_for(lambda: len(printed(follower)) >= 3, "three lines")
    _end_and_finish(log, follower)
    assert printed(follower) == ["at :05", "at :05.1", "at :05.2"]


def test_a_container_that_has_not_started_is_retried(setup):
    """The kubelet answers 400 "waiting to start" until the container runs."""
    log = setup.log()
    log.started = False
    follower = setup.follower()
    wait_for(lambda: len(log.requests) >= 3, "retries while the container waits")
    assert follower.is_alive() and printed(follower) == []
    log.started = True
    log.write("started")
    wait_for(lambda: printed(follower) == ["started"], "the first line once started")


def test_a_node_stamping_local_time_is_followed_like_utc(setup):
    """containerd stamps each log line with the node's local time and its offset
    (internal/cri/io/logger.go: time.Now() in RFC3339Nano) and the kubelet keeps that offset
    when it prefixes the line (kuberuntime/logs/logs.go): such stamps must be read as times,
    or every stamp is printed and the whole log repeats after each reconnect."""
    log = setup.log(utc_offset_h=1)
    for i in range(3):
        log.write(f"step {i}")
    log.end()
    log.drop_streams_after(2)
    follower = setup.follower()
    wait_for(lambda: len(log.requests) >= 3, "two reconnects")
    follower.finish(timeout_s=2.0)
    assert printed(follower) == ["step 0", "step 1", "step 2"]


# --------------------------------------------------------------------------- stopping


def test_stop_lets_the_open_stream_finish_then_ends_the_follower(setup):
    """The lines a container writes last explain a failure: stop does not cut the stream,
    the container's exit does; then no stream is opened again."""
    log = setup.log()
    follower = setup.follower()
    log.write("step 0")
    wait_for(lambda: printed(follower) == ["step 0"], "the first line")
    follower.stop.set()
    log.write("Traceback (most recent call last):")
    wait_for(lambda: len(printed(follower)) == 2, "a line written after stop")
    assert follower.is_alive()
    log.end()
    follower.join(WAIT_S)
    assert not follower.is_alive()
    requests = len(log.requests)
    time.sleep(10 * RECONNECT_S)
    assert len(log.requests) == requests == 1


def test_finish_prints_what_was_written_between_reconnects(setup):
    """The pod finished while the follower waited to reconnect: finish reads once more, from
    the last line printed, without waiting out the reconnect delay."""
    log = setup.log()
    for i in range(3):
        log.write(f"step {i}")
    log.drop_streams_after(3)
    follower = setup.follower(reconnect_s=60.0)
    wait_for(lambda: len(printed(follower)) == 3 and log.open_streams == 0, "the dropped stream")
    log.write("saved autoencoder.pt")
    log.end()
    started = time.monotonic()
    follower.finish(timeout_s=2.0)
    assert time.monotonic() - started < 2.0
    assert printed(follower) == ["step 0", "step 1", "step 2", "saved autoencoder.pt"]
    assert len(log.requests) == 2 and "sinceSeconds" in log.requests[1]


def test_finish_does_not_read_again_while_a_stream_is_still_open(setup):
    """A second reader beside the open stream would print its lines twice."""
    log = setup.log()
    follower = setup.follower()
    log.write("step 0")
    wait_for(lambda: printed(follower) == ["step 0"], "the first line")
    finisher = threading.Thread(target=follower.finish, kwargs={"timeout_s": 0.2}, daemon=True)
    finisher.start()
    finisher.join(WAIT_S)
    assert not finisher.is_alive(), "finish did not return while the stream was open"
    assert len(log.requests) == 1
    log.write("step 1")
    log.end()
    follower.join(WAIT_S)
    assert printed(follower) == ["step 0", "step 1"]
