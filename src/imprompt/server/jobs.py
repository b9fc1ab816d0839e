"""One engine, one pipeline call at a time: a bounded FIFO queue of jobs and the worker thread that runs them.

HTTP handlers submit a job and wait for it without holding a thread (they await its completion on the event
loop), so a long queue never starves the server: progress, interrupt and health checks still answer at once. A
full queue is refused at once (429) rather than making clients wait without bound. A client that disconnects
while its job waits has the job dropped; while it runs, interrupted. Each job carries its own request, so
concurrent clients with different adapters each get exactly the image their request asks for.

Batching (`batch_wait` > 0): the worker, taking a job the engine can batch (`Engine.batch_key` is not None, one
n_iter batch), takes the waiting jobs with an equal key and, while no other job waits, waits up to `batch_wait`
seconds for more; it runs them, up to `batch_max` rows (the sum of their batch sizes), as one
`Engine.generate_batch` call. Each keeps its own progress, interrupt, result and error; jobs with other keys wait
for that call (a later job of the running key may so run before an earlier one of another). `batch_wait` == 0
runs one job at a time, as before.
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
from ..errors import ImpromptError, InterruptedRunError, QueueFullError, RequestError
from ..request import GenerateRequest

log = logging.getLogger("imprompt")
_ids = itertools.count(1)
DISCONNECT_POLL_SECONDS = 0.5  # how often a waiting handler checks that its client is still there
# The default batch size (rows: the sum of the jobs' batch sizes) when none is given: on the CPU a batch saves
# per-call overhead but not compute, so a few rows; on CUDA as many rows as the engine's activation budget
# (util/devices.py) holds at ROW_BYTES per megapixel of image, the UNet step's activations growing with rows and
# pixels (the VAE decodes one image at a time, so the decode needs no more with more rows). ROW_BYTES:
# `tools.activation_memory` counts 0.31 GiB for one SDXL 1024x1024 row with guidance in float16; a quarter for the
# allocator and SD 1.5's attention at the full latent size round it up to 0.5 GiB. Never more than BATCH_MAX_CAP
# rows (one slow batch delays all its clients).
CPU_BATCH_MAX = 4
ROW_BYTES = 2**29  # per 1024x1024 pixels of one batch row
BATCH_MAX_CAP = 16
BATCH_WAIT_MAX = 60.0  # seconds: a lone batchable request waits this long at most before it runs
_UNKEYED = object()  # a job whose batch key has not been asked yet


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
    stop: threading.Event = field(default_factory=threading.Event)  # this job's own interrupt, in a batch
    batched: bool = False  # running in one `generate_batch` call with other jobs: interrupted through `stop`
    key: object = _UNKEYED  # `Engine.batch_key` of its request, asked once by the worker

    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.total) / self.iterations)

    def finish(self) -> None:
        self.done.set()
        if self.on_done is not None:
            self.on_done()


def default_batch_max(engine, request: GenerateRequest | None = None) -> int:
    """How many rows (the sum of the jobs' batch sizes) one batch may hold when the server was given no
    `--batch-max` (see ROW_BYTES): on CUDA the rows of `request`'s size (its width x height, 1024x1024 when the
    model's native size is asked; the jobs of one batch share it) the activation budget holds, at most
    BATCH_MAX_CAP; elsewhere CPU_BATCH_MAX; at least 1."""
    if getattr(engine.device, "type", "cpu") != "cuda":
        return CPU_BATCH_MAX
    width = (request.width if request is not None else None) or 1024
    height = (request.height if request is not None else None) or 1024
    row = max(1, ROW_BYTES * width * height // (1024 * 1024))
    return max(1, min(BATCH_MAX_CAP, int(engine.activation_budget) // row))


class JobQueue:
    def __init__(self, engine: Engine, max_queue: int = 16, batch_max: int | None = None, batch_wait: float = 0.0,
                 recent_events: int = 200):  # fmt: skip
        """`batch_max`: rows one batch may hold, the sum of its jobs' batch sizes (None: `default_batch_max`, sized
        per batch from the device's memory); `batch_wait`: seconds the worker waits for jobs to batch with the one
        it took (0: no batching)."""
        if max_queue < 1:
            raise RequestError(f"max_queue must be at least 1 (jobs that may wait), got {max_queue}")
        if batch_max is not None and batch_max < 1:
            raise RequestError(f"batch_max must be at least 1 (rows in one pipeline call), got {batch_max}")
        if not 0 <= batch_wait <= BATCH_WAIT_MAX:
            raise RequestError(f"batch_wait (--batch-wait) must be 0 (no batching) to {BATCH_WAIT_MAX:g} seconds (a "
                               f"lone request waits that long before it runs), got {batch_wait}; give at most "
                               f"{BATCH_WAIT_MAX:g}")  # fmt: skip
        self.engine = engine
        self.max_queue = max_queue
        self.batch_max = batch_max
        self.batch_wait = float(batch_wait)
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()
        self._arrivals = 0  # counts submissions, so the batching wait wakes for each new job
        self.running: list[Job] = []  # the jobs of the pipeline call now running (one, or a batch's)
        self._taking: Job | None = None  # the oldest job, while the worker gathers its batch
        self._held: list[Job] = []  # a failed batch's jobs still to run alone, one after another
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
            self._arrivals += 1
            self._changed.notify_all()
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
        """Drop a job that is still waiting (also while the worker waits to batch it); interrupt it if it is
        running. In a batch only that job stops: the others go on."""
        with self._changed:
            waiting = job in self._waiting or job in self._held
            if job in self._waiting:
                self._waiting.remove(job)
                self._changed.notify_all()
            if job in self._held:  # its failed batch's turn has not come: it has not started
                self._held.remove(job)
            running = job in self.running
            if running:
                self._stop(job)
        if waiting:
            log.info("job %d dropped before it ran: %s", job.id, why)
            self.events.append({"event": "request_dropped", "job": job.id, "why": why, "time": time.time()})
            job.error = RequestError(f"request dropped before it ran: {why}")
            job.finish()
        elif running:
            log.info("job %d interrupted: %s", job.id, why)
            self.events.append({"event": "request_interrupted", "job": job.id, "why": why, "time": time.time()})

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
    def current(self) -> Job | None:
        """The first running job (a batch's first)."""
        running = self.running
        return running[0] if running else None

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def recent_events(self, since: float = 0.0) -> list[dict]:
        return [e for e in list(self.events) if e.get("time", 0) > since]

    def cache_info(self) -> dict:
        return self.engine.cache_info()

    def clear_cache(self) -> dict:
        return self.engine.clear_cache()

    def interrupt(self) -> bool:
        """A1111's interrupt (it names no job): stop what is running — every job of a batch, or after a failed
        batch the one job running alone — after the current step; no further n_iter batch starts (the engine
        clears its own flag at each `generate`, so the job carries the interrupt)."""
        with self._changed:
            running = list(self.running)
            for job in running:
                self._stop(job)
        return bool(running)

    def _stop(self, job: Job) -> None:
        """Interrupt a running job: a batched one through its own event (the batch's others go on), a lone one
        through the engine's."""
        job.interrupted = True
        if job.batched:
            job.stop.set()
        else:
            self.engine.interrupt()

    # ------------------------------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            jobs: list[Job] = []
            try:
                jobs = self._take()
                if len(jobs) == 1:
                    self._run_alone(jobs[0])
                else:
                    self._run_batch(jobs)
            except Exception as exc:  # a fault of the queue's own: never the worker's end, or every client would wait
                self._fault(jobs or [job for job in [self._taking] if job is not None], exc)

    def _fault(self, jobs: list[Job], exc: Exception) -> None:
        """The jobs in hand when the worker met a fault outside any job's run: each not finished gets the error
        (its client a 500), and the worker goes on with the next."""
        log.error("the worker failed with jobs %s in hand; they fail, the queue goes on", [j.id for j in jobs],
                  exc_info=exc)  # fmt: skip
        with self._changed:
            for job in jobs:
                if job in self._waiting:
                    self._waiting.remove(job)
            self.running, self._held = [], []
        for job in jobs:
            if not job.done.is_set():
                job.error = exc
                job.finish()

    def _take(self) -> list[Job]:
        """The next pipeline call's jobs, now running: the oldest job, and with batching the waiting jobs its key
        equals (FIFO), gathered for at most `batch_wait` seconds."""
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                head = self._taking = self._waiting[0]
            key = self._key(head) if self.batch_wait > 0 and head.iterations == 1 else None
            limit = (self.batch_max or default_batch_max(self.engine, head.request)) if key is not None else 0
            if limit > head.request.batch_size:  # room for another job's rows
                mates = self._gather(head, key, limit)
                if mates is None:
                    continue  # the head was dropped meanwhile: start again from the new oldest job
            else:
                mates = []
            with self._changed:
                if head not in self._waiting:
                    continue
                batch = [head] + [job for job in mates if job in self._waiting]  # a mate may have been dropped
                for job in batch:
                    self._waiting.remove(job)
                    job.started, job.batched = time.time(), len(batch) > 1
                self.running, self._taking = batch, None
                return batch

    def _gather(self, head: Job, key, limit: int) -> list[Job] | None:
        """Wait (bounded by `batch_wait`, woken by each new or dropped job) until waiting jobs of `head`'s key fill
        `limit` rows with it; returns them, oldest first, each that fits the rows left (None if `head` itself was
        dropped). The wait holds only while nothing else waits: a job that will not join this batch (another key,
        too many rows) is work the device could do now, so the batch runs with the mates it has."""
        deadline = time.monotonic() + self.batch_wait
        while True:
            with self._changed:
                if head not in self._waiting:
                    return None
                snapshot, seen = list(self._waiting), self._arrivals
            # keys are asked outside the lock (planning may read files; only this thread asks them), oldest first,
            # no further than the batch fills
            mates: list[Job] = []
            rows, others = head.request.batch_size, False
            for job in snapshot:
                if rows == limit:
                    break
                if job is head:
                    continue
                if job.iterations == 1 and rows + job.request.batch_size <= limit and self._key(job) == key:
                    mates.append(job)
                    rows += job.request.batch_size
                else:
                    others = True
            left = deadline - time.monotonic()
            if rows == limit or others or left <= 0:
                return mates
            with self._changed:
                if self._arrivals == seen and head in self._waiting:
                    self._changed.wait(timeout=min(left, threading.TIMEOUT_MAX))

    def _key(self, job: Job):
        """`Engine.batch_key` of the job's request, asked once; a fault in asking means "runs alone"."""
        if job.key is _UNKEYED:
            try:
                job.key = self.engine.batch_key(job.request)
            except Exception:  # the request runs alone and meets its error there, as without batching
                log.debug("job %d: no batch key", job.id, exc_info=True)
                job.key = None
        return job.key

    def _run_alone(self, job: Job, failed_batch: str | None = None) -> None:
        """One job's n_iter batches, one `generate` call each. Interrupted before its first, it gets an error,
        never an empty answer: it was dropped before it ran, or (`failed_batch`: why its batch's call failed) it
        was interrupted in that call and is not run again."""
        try:
            for job.iteration in range(job.iterations):
                if job.interrupted and not job.results and failed_batch is not None:
                    raise InterruptedRunError(f"job {job.id}: interrupted in the batch it ran in, whose call then "
                                              f"failed ({failed_batch}), so no image of it was kept; send it again")  # fmt: skip
                if job.interrupted and not job.results:
                    raise RequestError("request dropped before it ran: it was interrupted before its first step")
                if job.interrupted:
                    break
                seed = job.request.seed + job.iteration * job.request.batch_size
                result = self.engine.generate(job.request.model_copy(update={"seed": seed}), on_step=self._progress(job))
                if failed_batch is not None:  # why it ran alone, as the engine says it of a merged call that failed
                    result.info["events"].insert(0, {"event": "batch_fallback", "why": failed_batch})
                job.results.append(result)
                self._record(job, result)
                if result.info["interrupted"]:
                    break
        except Exception as exc:
            self._failed(job, exc)
        finally:
            self._end(job)

    def _run_batch(self, jobs: list[Job]) -> None:
        """One `generate_batch` call for `jobs` (imprompt's own batching of queued requests: diffusers batches one
        call's rows, not separate requests). If the call itself raises, each job runs alone, so no job fails for
        another's fault."""
        rows = sum(job.request.batch_size for job in jobs)
        ids = [job.id for job in jobs]
        log.info("jobs %s gathered as one batch (%d jobs, %d rows)", ", ".join(map(str, ids)), len(jobs), rows)
        self.events.append({"event": "batch_gathered", "job": ids[0], "jobs": ids, "size": len(jobs), "rows": rows,
                            "time": time.time()})  # fmt: skip
        try:
            outcomes = self.engine.generate_batch([job.request for job in jobs],
                                                  on_steps=[self._progress(job) for job in jobs],
                                                  interrupts=[job.stop for job in jobs])  # fmt: skip
        except ImpromptError as exc:
            log.warning("the batch of jobs %s was refused as a whole (%s); its jobs run alone", ids, exc)
            outcomes, why = None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("the batch of jobs %s failed as a whole; its jobs run alone", ids)
            outcomes, why = None, f"{type(exc).__name__}: {exc}"
        if outcomes is not None and len(outcomes) != len(jobs):
            log.error("the batch of jobs %s gave %d outcomes; its jobs run alone", ids, len(outcomes))
            outcomes, why = None, f"{len(outcomes)} outcomes for {len(jobs)} jobs"
        if outcomes is None:
            self._run_held(jobs, why)
            return
        self._merged(jobs, outcomes)
        for index, job in enumerate(jobs):
            outcome = outcomes[index]
            try:
                if isinstance(outcome, BaseException):
                    self._failed(job, outcome)
                else:
                    self._record(job, outcome)
                    job.results.append(outcome)
            except Exception as exc:  # an outcome the queue cannot read: that job's fault alone
                job.results.clear()
                self._failed(job, exc)
            self._end(job, still_running=jobs[index + 1:])

    def _run_held(self, jobs: list[Job], why: str) -> None:
        """A failed batch's jobs, each alone in turn: only the one running is `running` (what A1111's interrupt
        stops); the others are held, not started, and a client that leaves meanwhile has its job dropped."""
        with self._changed:
            self.running, self._held = [], list(jobs)
            for job in jobs:
                job.batched = False  # from now on interrupted through the engine, as any lone job
        for job in jobs:
            with self._changed:
                if job not in self._held:
                    continue  # dropped while it waited for its turn
                self._held.remove(job)
                self.running = [job]
            self._run_alone(job, failed_batch=why)

    def _merged(self, jobs: list[Job], outcomes: list) -> None:
        """A `batch` event for each pipeline call the engine ran for several of the jobs (their results'
        `info["batch"]`: the call's number, rows and requests); what ran alone or failed is in none."""
        calls: dict[int, tuple[int, list[int]]] = {}
        for job, outcome in zip(jobs, outcomes):
            batch = getattr(outcome, "info", {}).get("batch") if not isinstance(outcome, BaseException) else None
            if isinstance(batch, dict) and batch.get("requests", 1) > 1:
                calls.setdefault(batch.get("call"), (batch.get("size"), []))[1].append(job.id)
        now = time.time()
        for rows, ids in calls.values():
            log.info("jobs %s ran as one pipeline call (%s rows)", ", ".join(map(str, ids)), rows)
            self.events.append({"event": "batch", "job": ids[0], "jobs": ids, "size": len(ids), "rows": rows, "time": now})

    def _failed(self, job: Job, exc: BaseException) -> None:
        job.error = exc
        if isinstance(exc, ImpromptError) and exc.http_status < 500:
            self.events.append({"event": "request_refused", "job": job.id, "why": str(exc), "time": time.time()})
        else:  # a real fault: reported as 500 by the server, with the traceback in the log
            log.error("job %d failed", job.id, exc_info=exc)

    def _end(self, job: Job, still_running: list[Job] | None = None) -> None:
        with self._changed:
            self.running = list(still_running or [])
        job.finish()

    def _progress(self, job: Job):
        def on_step(step: int, total: int) -> None:
            job.step, job.total = step, total
            if job.interrupted and not job.batched and not self.engine.interrupt_requested:
                self.engine.interrupt()  # it came after the check above but before `generate` cleared the flag

        return on_step

    def _record(self, job: Job, result: Result) -> None:
        now = time.time()
        for event in result.info["events"]:
            self.events.append({**event, "job": job.id, "time": now})
        for unit in result.info["ip_adapters"]:
            if unit.get("encoder_source") in ("cache", "not needed"):  # PuLID's info has none
                self.events.append(
                    {"event": "cache_hit", "job": job.id, "time": now, "for": unit["adapter"], "encoder": unit["encoder"],
                     "what": "embedding" if unit["encoder_source"] == "not needed" else "encoder"}
                )  # fmt: skip

    def progress(self) -> dict:
        """A1111's /sdapi/v1/progress shape, over the jobs of the running call (imprompt's batches hold several,
        which may run as several pipeline calls one after another): progress is their mean fraction (a job whose
        call has not started counts 0), the step shown the least advanced job's, `interrupted` true once every
        job is; while any goes on, only those that go on count."""
        running = list(self.running)
        if not running:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": self.waiting + len(self._held),
                     "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        going = [job for job in running if not job.interrupted] or running
        fraction = sum(job.fraction() for job in going) / len(going)
        least = min(going, key=lambda job: job.fraction())
        elapsed = time.time() - min(job.started or time.time() for job in running)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {
            "skipped": False,
            "interrupted": all(job.interrupted for job in running),
            "job": f"job {running[0].id}" if len(running) == 1 else f"jobs {', '.join(str(j.id) for j in running)}",
            "job_count": self.waiting + len(running) + len(self._held),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(least.submitted)),
            "job_no": least.iteration,
            "sampling_step": least.step,
            "sampling_steps": least.total or least.request.steps,
        }
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": None, "textinfo": None}  # fmt: skip


def _outcome(job: Job) -> list[Result]:
    if job.error is not None:
        raise job.error
    return job.results
