"""Whether an MLflow run's owner is alive: heartbeats while it runs, KILLED once it is not.

A run closes itself when its flow fails, is cancelled or gets SIGTERM/SIGINT. SIGKILL, a lost
machine or a lost tracking server leave it RUNNING: the next run in the experiment closes it
as KILLED when its heartbeat has stopped, or when the Prefect flow run that owned it has ended.
A run still going on another machine keeps beating and is never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from uuid import UUID

from mlflow import MlflowClient

HEARTBEAT_TAG = "heartbeat_at"
FLOW_RUN_TAG = "prefect_flow_run_id"
KILLED_REASON_TAG = "killed_because"
# A run whose heartbeat is this many beats old is dead: a busy server or a slow beat
# delays one or two, never five.
MISSED_BEATS = 5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _OpenRun:
    tracking_uri: str
    parent_run_id: str | None


class _Heartbeat:
    """One daemon thread per process that tags every run the process has open, every beat."""

    def __init__(self) -> None:
        self._runs: dict[str, _OpenRun] = {}
        self._lock = threading.Lock()
        self._interval = 30.0
        self._thread: threading.Thread | None = None

    def watch(
        self, run_id: str, uri: str, seconds: float | None = None, parent: str | None = None
    ) -> None:
        """Beat for `run_id` until forgotten, every `seconds` (default: as for the others)."""
        with self._lock:
            self._runs[run_id] = _OpenRun(uri, parent)
            if seconds is not None:
                self._interval = min(self._interval, seconds) if self._thread else seconds
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
                self._thread.start()

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def children_of(self, run_id: str) -> list[str]:
        with self._lock:
            return [child for child, run in self._runs.items() if run.parent_run_id == run_id]

    def _beat(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                runs = dict(self._runs)
            now = str(int(time.time()))
            for run_id, run in runs.items():
                try:
                    MlflowClient(run.tracking_uri).set_tag(run_id, HEARTBEAT_TAG, now)
                except Exception as error:  # the next beat tries again; missing five is death
                    logger.debug("heartbeat of run %s failed: %s", run_id, error)


heartbeat = _Heartbeat()


def liveness_tags() -> dict[str, str]:
    """Tags a new run starts with: its first heartbeat and the Prefect flow run that owns it."""
    from prefect.runtime import flow_run

    tags = {HEARTBEAT_TAG: str(int(time.time()))}
    if flow_run.id:
        tags[FLOW_RUN_TAG] = str(flow_run.id)
    return tags


def close_stale_runs(uri: str, experiment_id: str, heartbeat_seconds: float) -> list[str]:
    """Close as KILLED every RUNNING run of the experiment whose owner is gone; their ids.

    Gone means no heartbeat for MISSED_BEATS beats (runs from before heartbeats count from
    their start), or a Prefect flow run that has ended, which also catches a run killed a
    moment ago. The owning flow run, when this Prefect API knows it and it still shows
    RUNNING, is set Crashed.
    """
    client = MlflowClient(uri)
    now = time.time()
    closed = []
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    for run in running:
        tags = run.data.tags
        last_beat = float(tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
        silent = now - last_beat
        flow_run_id = tags.get(FLOW_RUN_TAG)
        flow_state = _flow_run_state(flow_run_id)
        if flow_state is not None and flow_state.is_final():
            reason = f"its Prefect flow run {flow_run_id} ended {flow_state.type.value}"
        elif silent > MISSED_BEATS * heartbeat_seconds:
            reason = f"no heartbeat for {silent:.0f} s (its process or machine is gone)"
        else:
            continue
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        if flow_state is not None and not flow_state.is_final():
            _crash_flow_run(flow_run_id, reason)
        logger.warning(
            "Closed run %s (%s) as KILLED: %s", run.info.run_id, run.info.run_name, reason
        )
        closed.append(run.info.run_id)
    return closed


def _flow_run_state(flow_run_id: str | None):
    """The flow run's state on this process's Prefect API, or None if it does not know it."""
    if not flow_run_id:
        return None
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # another server's flow run, or no API: the heartbeat decides alone
        return None


def _crash_flow_run(flow_run_id: str | None, reason: str) -> None:
    from prefect import get_client
    from prefect.states import Crashed

    if not flow_run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(flow_run_id), Crashed(message=reason), force=True)
    except Exception as error:
        logger.warning("Could not mark Prefect flow run %s crashed: %s", flow_run_id, error)
