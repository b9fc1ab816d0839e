"""The cluster's ingress: the same FastAPI app as the single-process server, with generations run by workers.

`ClusterJobs` stands where the single process has its `JobQueue` (same methods, so routes, auth, limits and error
JSON are the same code). For each request it plans first (every 4xx before any worker computes), computes the
model ids the request needs (`routing.py`), has encoder workers make the units' embeddings (two encoders: two
workers at once), then a generator worker denoise with them. Progress, interrupt, events and cache state go through
the job board (`board.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

import ray
from fastapi.concurrency import run_in_threadpool
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from ..engine import Engine
from ..result import Result
from ..errors import ImpromptError, QueueFullError, UnsupportedError
from ..request import GenerateRequest
from ..server.app import ServerSettings, create_app
from .board import BOARD_NAME, NAMESPACE
from .loopback import keep_replica_on_loopback
from .routing import Route, route

log = logging.getLogger("imprompt")
DISCONNECT_POLL_SECONDS = 0.5


class WorkerLostError(ImpromptError):
    """A worker replica stopped while it ran the request (Ray restarts it)."""

    http_status = 503


class ClusterJobs:
    """The server's job runner over a Ray Serve cluster: the `JobQueue` methods the app calls, cluster-wide."""

    def __init__(self, engine: Engine, encoders, generators, board, max_queue: int, retries: int = 1):
        self.engine, self.encoders, self.generators, self.board = engine, encoders, generators, board
        self.max_queue, self.retries = max_queue, retries
        self.in_flight = 0
        # Job ids are the board's keys, and the board outlives an ingress replica and serves several: a random
        # 64-bit prefix per instance makes a restarted or second replica's ids new (1 in 2**64 to meet another's),
        # the counter keeps one instance's apart and readable ("job 9f3c...-12" in A1111's progress).
        self._ids = (f"{secrets.token_hex(8)}-{n}" for n in itertools.count(1))
        self._first_calls: dict[str, asyncio.Event] = {}  # model ids no replica held, whose first load runs now

    async def run_async(self, request: GenerateRequest, iterations: int, client_gone) -> list[Result]:
        if self.in_flight >= self.max_queue:
            raise QueueFullError(f"the cluster has {self.in_flight} jobs in flight (the limit is {self.max_queue}); "
                                 f"try again when a job has finished")  # fmt: skip
        self.in_flight += 1
        job = {"id": next(self._ids)}  # a retry on another replica is a new job on the board
        try:
            plan = await run_in_threadpool(self.engine.plan, request)  # refused here, before any worker computes
            if request.seed < 0:  # fix the seed now, so the n_iter batches continue from it
                request = request.model_copy(update={"seed": secrets.randbelow(2**32 - 64)})
            # every worker reads the same model, and a transformer alone with the same parts: named so that each
            # name resolves to the very file the plan chose (a stem two files share would not)
            request = request.model_copy(update={"model": self.engine.store.name_of(plan.pipeline), **plan.parts.fields()})
            wanted = route(plan)
            held = await self.board.submit.remote(job["id"], [wanted.pipeline, *wanted.encoders.values()])
            payload = request.model_dump()
            await self._warm(payload, wanted, set(held))
            embeddings, encoder_events = await self._embed(payload, wanted.encoders)
            results = await self._generate(payload, iterations, embeddings, wanted.pipeline, job, client_gone)
        finally:  # also when the client went away and Serve cancelled this: its generation stops at the next step
            self.in_flight -= 1
            self.board.finished.remote(job["id"])
        for result in results[:1]:  # the encoders ran once, for the first batch
            result.info["events"] = encoder_events + result.info["events"]
        return results

    async def _warm(self, payload: dict, wanted: Route, held: set[str]) -> None:
        """Ray's router sends a request whose id no replica reports to a replica with the fewest models, so a burst
        of first requests for one new model would load it on several replicas at once (herding). For an id no
        replica holds, imprompt sends one `warm` call (it only loads) and holds the other requests for that id until
        it is done; then they all go, and Ray finds the model where it loaded. (The gate is per ingress replica.)"""
        calls = []
        if wanted.pipeline not in held:
            calls.append((wanted.pipeline, lambda: self._call(self.generators, wanted.pipeline, "warm", payload)))
        for index, encoder in wanted.encoders.items():
            if encoder not in held:
                calls.append((encoder, lambda i=index, e=encoder: self._call(self.encoders, e, "warm", payload, i)))
        await _all(*(self._first_alone(model, call) for model, call in calls))

    async def _first_alone(self, wanted: str, call) -> None:
        gate = self._first_calls.get(wanted)
        if gate is not None:
            await gate.wait()  # bounded: the first call ends, loaded or failed (then this request's own call tries)
            return
        gate = self._first_calls[wanted] = asyncio.Event()
        try:
            await call()
        finally:
            del self._first_calls[wanted]
            gate.set()

    async def _embed(self, payload: dict, encoders: dict[int, str]) -> tuple[dict, list]:
        """Every unit that needs an encoder, on the encoder worker that holds it, all at once."""
        made = await _all(*(self._call(self.encoders, wanted, "embed", payload, index)
                            for index, wanted in encoders.items()))  # fmt: skip
        embeddings = {index: embedding for index, (embedding, _) in zip(encoders, made)}
        return embeddings, [event for _, events in made for event in events]

    async def _call(self, deployment, wanted: str, method: str, *args, before_retry=None):
        """One call to the replica Ray routes `wanted` to. A replica lost mid-call (its process killed, its node
        gone) costs one retry on another: the request carries everything, its seed included, so the retry gives
        the same answer. `before_retry()` returns the arguments the retry sends instead."""
        for attempt in range(self.retries + 1):
            try:
                return await _plain(getattr(deployment.options(multiplexed_model_id=wanted), method).remote(*args))
            except WorkerLostError:
                if attempt == self.retries:
                    raise
                log.warning("%s for %s: its worker stopped; retrying on another replica", method, wanted)
                if before_retry is not None:
                    args = await before_retry()

    async def _generate(self, payload, iterations, embeddings, wanted: str, job: dict, client_gone) -> list[Result]:
        """On the generator worker that holds the model. A retry is a new job on the board, so a replica that was
        only unreachable and still runs the old one stops it at its next step."""

        async def as_new_job() -> tuple:
            self.board.finished.remote(job["id"])
            job["id"] = next(self._ids)
            await self.board.submit.remote(job["id"], [])
            return payload, iterations, embeddings, job["id"]

        task = asyncio.ensure_future(self._call(self.generators, wanted, "generate", payload, iterations, embeddings,
                                                job["id"], before_retry=as_new_job))  # fmt: skip
        while True:  # ends when the worker answers (or is lost twice): each wait is bounded
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await client_gone():
                log.info("job %s interrupted: the client disconnected", job["id"])
                await self.board.interrupt.remote(job["id"])
                return await task

    # ------------------------------------------------------------------------------- what the app reads

    @property
    def waiting(self) -> int:
        return self.in_flight

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def progress(self) -> dict:
        return ray.get(self.board.progress.remote())

    def interrupt(self) -> bool:
        """The job `progress` shows (the longest-running, on whichever worker) stops after its current step."""
        return ray.get(self.board.interrupt.remote())

    def recent_events(self, since: float = 0.0) -> list[dict]:
        return ray.get(self.board.recent.remote(since))

    def cache_info(self) -> dict:
        """Every live replica's models and caches (as each last reported them: after each load and each request);
        replicas whose actor is gone (killed, replaced by Ray) are dropped from the board."""
        workers = ray.get(self.board.state.remote())
        for replica, state in list(workers.items()):
            try:
                ray.get_actor(state["actor"], namespace="serve")
            except ValueError:  # no such actor any more
                self.board.forget.remote(replica)
                del workers[replica]
        return {"workers": workers, "time": time.time()}

    def clear_cache(self) -> dict:
        raise UnsupportedError(
            "DELETE /v1/cache clears one process's caches; a cluster's workers free models as Ray's multiplexing "
            "lets them go (--models-per-worker). To empty them, redeploy: stop and start `imprompt serve --workers`"
        )


async def _all(*calls) -> list:
    """Every call's answer; if any failed, the first failure, raised once every call has ended (none is left
    running unobserved)."""
    answers = await asyncio.gather(*calls, return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


async def _plain(call):
    """A worker's answer; its ImpromptError raised as itself (Ray wraps it), a lost worker as a 503."""
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, ImpromptError):
            raise exc.cause from None
        raise
    except RayActorError as exc:  # died, or unreachable
        raise WorkerLostError(f"a worker stopped while it ran this request ({type(exc).__name__}); Ray restarts "
                              f"it: send the request again") from exc  # fmt: skip


@serve.ingress()
class Ingress:
    """The HTTP front: plans and routes; holds no model (its engine reads the models folder and never loads)."""

    def __init__(self, generators, encoders, engine: dict, settings: ServerSettings):
        keep_replica_on_loopback(ray.util.get_node_ip_address())
        self.engine = Engine(**{**engine, "device": "cpu", "dtype": None, "encoder_dtype": None})  # plans only
        board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        self.jobs = ClusterJobs(self.engine, encoders, generators, board, settings.max_queue)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.settings, jobs=self.jobs)
