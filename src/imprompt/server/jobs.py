"""One engine, one generation at a time: a bounded FIFO queue of jobs and the worker thread that runs them.

HTTP handlers submit a job and wait for it without holding a thread (they await its completion on the event
loop), so a long queue never starves the server: progress, interrupt and health checks still answer at once. A
full queue is refused at once (429) rather than making clients wait without bound. A client that disconnects
while its job waits has the job dropped; while it runs, interrupted. Each job carries its own request, so
concurrent clients with different adapters each get exactly the image their request asks for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..engine import Engine
from ..result import Result
from ..errors import ImpromptError, QueueFullError, RequestError
from ..request import GenerateRequest

log = logging.getLogger("imprompt")
_ids = itertools.count(1)
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting handler checks that its client is still there


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
    interrupted: bool = False  # set by an interrupt: no further n_iter batch starts
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[], None] | None = None  # called from the worker thread when the job ends

    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.total) / self.iterations)

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class JobQueue:
    def __init__(self, engine: Engine, max_queue: int = 16, recent_events: int = 200):
        if max_queue < 1:
            raise RequestError(f"max_queue must be at least 1 (jobs that may wait), got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self.current: Job | None = None
        self.events: deque[dict] = deque(maxlen=recent_events)
        self._worker = threading.Thread(target=self._work, name="imprompt-worker", daemon=True)
        self._worker.start()

    def submit(self, request: GenerateRequest, iterations: int = 1, on_done=None) -> Job:
        if request.seed < 0:  # fix the seed now, so the n_iter batches continue from it
            request = request.model_copy(update={"seed": secrets.randbelow(2**32 - 64)})
        job = Job(request, iterations, on_done=on_done)
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self.max_queue} jobs waiting); try again when a job has finished"
                )
            self._waiting.append(job)
            self._changed.notify()
        return job

    async def run_async(self, request: GenerateRequest, iterations: int,
                        client_gone: Callable[[], Awaitable[bool]]) -> list[Result]:  # fmt: skip
        """Submit and await the job on the event loop (no thread is held while it waits). If `client_gone()`
        turns true first, the job is dropped (waiting) or interrupted (running)."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        job = self.submit(request, iterations, on_done=wake)
        while not finished.done():  # ends when the job does: the worker finishes every job it is given
            try:
                await asyncio.wait_for(asyncio.shield(finished), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await client_gone():
                    self.cancel(job, "the client disconnected")
                    await finished
        return _outcome(job)

    def cancel(self, job: Job, why: str) -> None:
        """Drop a job that is still waiting; interrupt it if it is running."""
        with self._changed:
            waiting = job in self._waiting
            if waiting:
                self._waiting.remove(job)
        if waiting:
            log.info("job %d dropped before it ran: %s", job.id, why)
            self.events.append({"event": "request_dropped", "job": job.id, "why": why, "time": time.time()})
            job.error = RequestError(f"request dropped before it ran: {why}")
            job.finish()
        elif self.current is job:
            log.info("job %d interrupted: %s", job.id, why)
            self.events.append({"event": "request_interrupted", "job": job.id, "why": why, "time": time.time()})
            job.interrupted = True
            self.engine.interrupt()

    def preload(self, model: str) -> threading.Thread:
        """Load `model` in the background while the server starts; a request that comes meanwhile waits for the
        engine as it would for a running job. A failure is logged here and met again, as a 4xx, by the first
        request for that model."""

        def load() -> None:
            log.info("preloading model %s while the server starts", model)
            try:
                events = self.engine.preload(model)
            except ImpromptError as exc:
                log.error("could not preload model %s: %s", model, exc)
                self.events.append({"event": "preload_failed", "job": "preload", "model": model, "why": str(exc),
                                    "time": time.time()})  # fmt: skip
                return
            except Exception as exc:  # a real fault (out of memory, I/O): the traceback goes to the log
                log.exception("preloading model %s failed", model)
                self.events.append({"event": "preload_failed", "job": "preload", "model": model,
                                    "why": f"{type(exc).__name__}: {exc}", "time": time.time()})  # fmt: skip
                return
            self.events.extend({**event, "job": "preload", "time": time.time()} for event in events)

        thread = threading.Thread(target=load, name="imprompt-preload", daemon=True)
        thread.start()
        return thread

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self.current is not None

    def recent_events(self, since: float = 0.0) -> list[dict]:
        return [e for e in list(self.events) if e.get("time", 0) > since]

    def cache_info(self) -> dict:
        return self.engine.cache_info()

    def clear_cache(self) -> dict:
        return self.engine.clear_cache()

    def interrupt(self) -> bool:
        """Stop the running job: its batch ends after the current step, and no further n_iter batch starts (the
        engine clears its own flag at each `generate`, so the job carries the interrupt)."""
        job = self.current
        if job is None:
            return False
        job.interrupted = True
        self.engine.interrupt()
        return True

    def _next(self) -> Job:
        with self._changed:
            while not self._waiting:
                self._changed.wait()
            job = self._waiting.popleft()
            self.current, job.started = job, time.time()
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            try:
                for job.iteration in range(job.iterations):
                    if job.interrupted:
                        break
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
                job.finish()

    def _progress(self, job: Job):
        def on_step(step: int, total: int) -> None:
            job.step, job.total = step, total
            if job.interrupted and not self.engine.interrupt_requested:
                self.engine.interrupt()  # it came after the check above but before `generate` cleared the flag

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
            "interrupted": job.interrupted,
            "job": f"job {job.id}",
            "job_count": self.waiting + 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.submitted)),
            "job_no": job.iteration,
            "sampling_step": job.step,
            "sampling_steps": job.total,
        }
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": None, "textinfo": None}  # fmt: skip


def _outcome(job: Job) -> list[Result]:
    if job.error is not None:
        raise job.error
    return job.results
