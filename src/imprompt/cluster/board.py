"""The job board: one small named Ray actor that every part of a cluster reports to.

Generator replicas report each job's steps to it (and learn from the answer whether the job was interrupted);
every replica reports its load, reuse and eviction events and its cache state. The ingress reads it to answer
A1111's `/sdapi/v1/progress`, `/sdapi/v1/interrupt`, and imprompt's `/v1/events` and `/v1/cache` for the whole
cluster. It holds no model and does no compute: each call is a dictionary update.
"""

from __future__ import annotations

import time
from collections import deque

BOARD_NAME = "imprompt-board"
NAMESPACE = "imprompt"


class JobBoard:
    def __init__(self, recent_events: int = 1000):
        self.jobs: dict[str, dict] = {}  # job id (unique across ingresses) -> its state, from submission to its end
        self.events: deque[dict] = deque(maxlen=recent_events)
        self.workers: dict[str, dict] = {}  # replica -> {"kind", "cache", "pid", "time"}

    # ------------------------------------------------------------------------------------------- jobs

    def submit(self, job: str, wanted: list[str]) -> list[str]:
        """A job enters; returns which of the model ids it needs some replica holds now."""
        self.jobs[job] = {"submitted": time.time(), "started": None, "replica": None, "step": 0, "total": 0,
                          "iteration": 0, "iterations": 1, "interrupted": False}  # fmt: skip
        held = {i for worker in self.workers.values() for i in worker.get("held", [])}
        return [i for i in wanted if i in held]

    def started(self, job: str, replica: str, iterations: int) -> bool:
        """A generator replica starts the job; returns whether it should not (interrupted while it waited, or
        gone from the board: its client went away)."""
        state = self.jobs.get(job)
        if state is None:
            return True
        state.update(started=time.time(), replica=replica, iteration=0, iterations=iterations)
        return state["interrupted"]

    def step(self, job: str, step: int, total: int, iteration: int) -> bool:
        """A denoising step of the job is done; returns whether the job should stop."""
        state = self.jobs.get(job)
        if state is None:  # ended at the ingress (its client went away): nobody waits for the picture
            return True
        state.update(step=step, total=total, iteration=iteration)
        return state["interrupted"]

    def interrupted(self, job: str) -> bool:
        """Whether the job should not start its next n_iter batch (interrupted, or gone from the board)."""
        state = self.jobs.get(job)
        return state is None or state["interrupted"]

    def finished(self, job: str) -> None:
        self.jobs.pop(job, None)

    def interrupt(self, job: str | None = None) -> bool:
        """Interrupt `job`, or (None) the job `progress` shows: A1111's interrupt stops the job its progress
        reports, and so does a cluster's, whichever replica runs it. Returns whether there was one."""
        if job is None:
            running = self._running()
            job = running[0][1] if running else None
        state = self.jobs.get(job)
        if state is None:
            return False
        state["interrupted"] = True
        return True

    def _running(self) -> list:
        return sorted((s["started"], job, s) for job, s in self.jobs.items() if s["started"] is not None)

    def progress(self) -> dict:
        """A1111's /sdapi/v1/progress shape, for the longest-running job; `job_count` counts every job."""
        running = self._running()
        if not running:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(self.jobs),
                     "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        started, job, s = running[0]
        fraction = min(1.0, (s["iteration"] + s["step"] / s["total"]) / s["iterations"]) if s["total"] else 0.0
        elapsed = time.time() - started
        state = {
            "skipped": False,
            "interrupted": s["interrupted"],
            "job": f"job {job}",
            "job_count": len(self.jobs),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(s["submitted"])),
            "job_no": s["iteration"],
            "sampling_step": s["step"],
            "sampling_steps": s["total"],
        }
        return {"progress": round(fraction, 4), "eta_relative": round(elapsed / fraction - elapsed if fraction else 0.0, 3),
                "state": state, "current_image": None, "textinfo": f"on {s['replica']}", "running": len(running)}  # fmt: skip

    # ------------------------------------------------------------------------------------------ workers

    def record(self, replica: str, kind: str, events: list[dict], job: str | None = None) -> None:
        now = time.time()
        for event in events:
            self.events.append({**event, "replica": replica, "worker": kind, "job": job, "time": now})

    def report(self, replica: str, state: dict) -> None:
        """A replica's state: kind, pid, actor name, node, the model ids it holds, its caches."""
        self.workers[replica] = {**state, "time": time.time()}

    def forget(self, replica: str) -> None:
        """A replica that is gone (its actor no longer exists)."""
        self.workers.pop(replica, None)

    def recent(self, since: float = 0.0) -> list[dict]:
        return [e for e in self.events if e["time"] > since]

    def state(self) -> dict:
        return dict(self.workers)
