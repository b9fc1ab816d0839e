"""One engine, one generation at a time: a bounded FIFO queue of jobs and the worker thread that runs them.

HTTP handlers submit a job and wait for it; a full queue is refused at once (429) rather than making clients
wait without bound. Each job carries its own request, so concurrent clients with different adapters each get
exactly the image their request asks for.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import Engine, Result
from ..errors import ImpromptError, QueueFullError
from ..request import GenerateRequest

log = logging.getLogger("imprompt")
_ids = itertools.count(1)


@dataclass
class Job:
    request: GenerateRequest
    iterations: int = 1  # A1111's n_iter: batches run one after another, seeds counting on
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    step: int = 0
    total: int = 0
    iteration: int = 0
    results: list[Result] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.total) / self.iterations)


class JobQueue:
    def __init__(self, engine: Engine, max_queue: int = 16, recent_events: int = 200):
        self.engine = engine
        self.max_queue = max_queue
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.current: Job | None = None
        self.events: deque[dict] = deque(maxlen=recent_events)
        self._worker = threading.Thread(target=self._work, name="imprompt-worker", daemon=True)
        self._worker.start()

    def submit(self, request: GenerateRequest, iterations: int = 1) -> Job:
        if request.seed < 0:  # fix the seed now, so the n_iter batches continue from it
            request = request.model_copy(update={"seed": secrets.randbelow(2**32 - 64)})
        job = Job(request, iterations)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the queue is full ({self.max_queue} jobs waiting); try again when a job has finished"
            ) from None
        return job

    def run(self, request: GenerateRequest, iterations: int = 1) -> list[Result]:
        """Submit and wait; raises the job's error (typed errors keep their type)."""
        job = self.submit(request, iterations)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def interrupt(self) -> bool:
        if self.current is None:
            return False
        self.engine.interrupt()
        return True

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            self.current, job.started = job, time.time()
            try:
                for job.iteration in range(job.iterations):
                    seed = job.request.seed + job.iteration * job.request.batch_size
                    result = self.engine.generate(job.request.model_copy(update={"seed": seed}), on_step=self._progress(job))
                    job.results.append(result)
                    self._record(job, result)
                    if result.info["interrupted"]:
                        break
            except ImpromptError as exc:
                job.error = exc
                self.events.append({"event": "request_refused", "job": job.id, "why": str(exc), "time": time.time()})
            except Exception as exc:  # a real fault: reported as 500 by the server, with the traceback in the log
                log.exception("job %d failed", job.id)
                job.error = exc
            finally:
                self.current = None
                job.done.set()

    @staticmethod
    def _progress(job: Job):
        def on_step(step: int, total: int) -> None:
            job.step, job.total = step, total

        return on_step

    def _record(self, job: Job, result: Result) -> None:
        now = time.time()
        for event in result.info["events"]:
            self.events.append({**event, "job": job.id, "time": now})
        for unit in result.info["ip_adapters"]:
            if unit["encoder_source"] in ("cache", "not needed"):
                self.events.append(
                    {"event": "cache_hit", "job": job.id, "time": now, "for": unit["adapter"], "encoder": unit["encoder"],
                     "what": "embedding" if unit["encoder_source"] == "not needed" else "encoder"}
                )  # fmt: skip

    def progress(self) -> dict:
        """A1111's /sdapi/v1/progress shape."""
        job = self.current
        if job is None:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": self.waiting,
                     "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        fraction = job.fraction()
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {
            "skipped": False,
            "interrupted": self.engine.interrupt_requested,
            "job": f"job {job.id}",
            "job_count": self.waiting + 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)),
            "job_no": job.iteration,
            "sampling_step": job.step,
            "sampling_steps": job.total,
        }
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": None, "textinfo": None}  # fmt: skip
