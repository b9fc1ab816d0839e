"""A cluster's two kinds of workers, as Ray Serve deployments: encoders and generators.

Encoders turn a unit's reference images into finished embeddings; generators turn a request and its finished
embeddings into images.

Each replica owns one `Engine` on the shared models folder and runs the same code the single process runs
(`Engine.embed`, `Engine.generate(..., embeddings=...)`), so the pixels are the same. What imprompt adds to Ray
Serve is the model identity: the ingress computes from the plan which pipeline and encoders a request needs
(`routing.py`), and each replica's multiplexed `hold` loads them into its engine, so Ray's router finds them there
again. When Ray's multiplexing lets a model go (least recently used, past `models_per_worker`), the replica frees it
in its engine too: what Ray reports a replica holds is what it holds.

Batching (`batch_wait` > 0): a generator replica gathers the requests that reach it together with Ray Serve's own
`@serve.batch` (`batched`), which splits what it gathered by multiplexed model id (Ray 2.60's `batching.py`,
`_split_batch_by_model_id`), so each batch is one model's; `Engine.generate_batch` then runs those whose
`Engine.batch_key`s are equal as one pipeline call and the others alone. Each request keeps its own progress and
interrupt (through the board), result and error. A job of several n_iter batches enters the batch queue once per
batch, so its batches may share calls with other jobs while a one-batch job batched with it is answered after its
own call. `batch_max` counts rows (the sum of batch sizes), as the single process's queue does. With `batch_wait` 0
a replica runs one request at a time, as the single process does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass

import ray
from ray import serve

from ..engine import Engine
from ..errors import ImpromptError, RequestError
from ..conditioning.image_prompts import plan_unit
from ..models.parts import NO_PARTS, ModelParts
from ..plan import plan_parts
from ..request import GenerateRequest, parse_request
from ..result import Result
from ..server.jobs import BATCH_MAX_CAP, BATCH_WAIT_MAX, default_batch_max
from .board import BOARD_NAME, NAMESPACE
from .loopback import keep_replica_on_loopback
from .routing import model_id

log = logging.getLogger("imprompt")


@dataclass
class WorkerSettings:
    engine: dict  # Engine's keyword arguments: models folders, device, dtypes, budgets, limits
    models_per_worker: int = 2  # pipelines a generator replica (encoders an encoder replica) holds at most
    batch_max: int | None = None  # rows one batched pipeline call may hold (None: sized from the device, jobs.py)
    batch_wait: float = 0.0  # seconds a generator replica waits for requests to batch with (0: no batching)

    def __post_init__(self):
        if self.batch_max is not None and self.batch_max < 1:
            raise RequestError(f"batch_max (--batch-max) must be at least 1 (rows in one pipeline call), got "
                               f"{self.batch_max}")  # fmt: skip
        if not 0 <= self.batch_wait <= BATCH_WAIT_MAX:
            raise RequestError(f"batch_wait (--batch-wait) must be 0 (no batching) to {BATCH_WAIT_MAX:g} seconds, "
                               f"got {self.batch_wait}; give at most {BATCH_WAIT_MAX:g}")  # fmt: skip


@dataclass
class Turn:
    """One n_iter batch of one job, as the generator's batch method (`batched`) receives it with others."""

    request: GenerateRequest  # with this batch's seed
    iteration: int
    iterations: int
    embeddings: dict  # unit index -> finished embeddings, made by encoder workers
    job: str
    wanted: str  # the model id Ray routed the job for, checked against this replica's own plan
    rows: int  # what it counts against batch_max: its batch size, at most batch_max (larger runs alone)


class WorkerMismatchError(ImpromptError):
    """A worker's own plan names another model than the id it was routed for."""

    http_status = 503  # the request itself is fine


class Held:
    """What Ray Serve's multiplexing keeps for one model id. Ray calls `__del__` when it lets the id go (its LRU);
    the model then leaves the engine as well, and the board learns the replica no longer holds it."""

    def __init__(self, worker: Worker, wanted: str, kind: str, key: tuple):
        self.worker, self.wanted, self.kind, self.key = worker, wanted, kind, key
        self.released = False

    def __del__(self):
        if not self.released:
            self.released = True
            self.worker.held.discard(self.wanted)
            self.worker.engine.unload(self.kind, self.key)
            self.worker.report([{"event": "model_let_go" if self.kind == "pipeline" else "encoder_let_go",
                                 "id": self.wanted, "why": "Ray's multiplexing (--models-per-worker)"}])  # fmt: skip


class Worker:
    """One replica. Requests take `self.turn` from before `hold` until they are done: a model Ray's multiplexing
    marked as used cannot be let go (by a later request's `hold`) while an earlier request waits to use it."""

    kind = ""  # "generator" | "encoder"

    def __init__(self, settings: WorkerSettings):
        logging.getLogger("imprompt").setLevel(logging.INFO)
        keep_replica_on_loopback(ray.util.get_node_ip_address())
        self.engine = Engine(**settings.engine)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.actor = ray.get_runtime_context().get_actor_name()  # the board's readers look it up to see it alive
        self.board = ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
        self.held: set[str] = set()  # model ids this replica holds (Ray's multiplexing loaded and kept them)
        self.turn = asyncio.Lock()
        self._wanted: dict[str, object] = {}  # model id -> its Entry, set by the request before `hold` runs
        self.report([])

    async def load(self, wanted: str) -> Held:
        """Ray Serve's multiplexed loader (see `multiplexed`): runs once per id and replica, until Ray lets it go."""
        entry, parts = self._wanted[wanted]
        if self.kind == "generator":
            events = await asyncio.to_thread(self.engine.preload, entry.name, parts)
            key = self.engine.state.pipeline_key(entry, parts)
        else:
            events = await asyncio.to_thread(self.engine.preload_encoder, entry)
            key = entry.key(self.engine.state.embedder.dtype, self.engine.state.embedder.device)
        self.held.add(wanted)
        self.report([{**e, "id": wanted} for e in events])
        return Held(self, wanted, "pipeline" if self.kind == "generator" else "encoder", key)

    def check(self, entry, parts: ModelParts = NO_PARTS) -> str:
        """The id this request was routed for, if this replica's own plan agrees."""
        wanted = serve.get_multiplexed_model_id()
        if model_id(entry, parts) != wanted:
            raise WorkerMismatchError(
                f"worker {self.replica} was sent for {wanted} but its own plan needs {model_id(entry, parts)}: either the "
                f"file changed between the ingress's plan and this worker's (send the request again), or the models "
                f"folders differ between nodes (give every node the same folder, at the same path)"
            )
        self._wanted[wanted] = (entry, parts)
        return wanted

    def report(self, events: list[dict], job: str | None = None) -> None:
        """Events to the board (not awaited: a report never delays a request), with this replica's state."""
        if events:
            self.board.record.remote(self.replica, self.kind, events, job)
        self.board.report.remote(self.replica, {"kind": self.kind, "pid": os.getpid(), "actor": self.actor,
                                                "node": ray.util.get_node_ip_address(), "held": sorted(self.held),
                                                "cache": self.engine.cache_info()})  # fmt: skip


class EncoderWorker(Worker):
    kind = "encoder"

    async def embed(self, request: dict, index: int) -> tuple:
        """Unit `index`'s finished embeddings (on the CPU) and the events of making them."""
        async with self.turn:
            await self.warm_unit(request, index)
            embeddings, events = await asyncio.to_thread(self.engine.embed, request, index)
        self.report(events)
        return embeddings, [{**e, "replica": self.replica} for e in events]

    async def warm(self, request: dict, index: int) -> None:
        """Load unit `index`'s encoder (the ingress's first call for an id no replica holds)."""
        async with self.turn:
            await self.warm_unit(request, index)

    async def warm_unit(self, request: dict, index: int) -> None:
        parsed = parse_request(request)
        planned = plan_unit(index, parsed.ip_adapters[index], self.engine.store)  # names only: no image is read
        await self.hold(self.check(planned.encoder))


class GeneratorWorker(Worker):
    kind = "generator"

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.batch_wait = settings.batch_wait
        self.batch_max = settings.batch_max or default_batch_max(self.engine)  # rows; None: from the device's memory

    async def generate(self, request: dict, iterations: int, embeddings: dict, job: str) -> list:
        """The request's images, `iterations` batches one after another (A1111's n_iter, seeds counting on), with
        the units' embeddings made by encoder workers; steps reported to the board, which answers interrupts."""
        parsed = parse_request(request)
        if self.batch_wait > 0:
            return await self.generate_batched(parsed, iterations, embeddings, job)
        async with self.turn:  # a job waiting here is not running yet: the board learns when it starts
            await self.hold(self.check(*self.model(parsed)))
            return await asyncio.to_thread(self._run, parsed, iterations, embeddings, job)

    async def generate_batched(self, request, iterations: int, embeddings: dict, job: str) -> list:
        """`generate` with batching: each n_iter batch goes through `batched` (Ray Serve's `@serve.batch`), with the
        requests that reach this replica meanwhile."""
        wanted = self.check(*self.model(request))  # a mismatch is this request's error alone
        results = []
        for iteration in range(iterations):
            if iteration and await self.board.interrupted.remote(job):  # interrupted between two batches
                break
            seed = request.seed + iteration * request.batch_size
            turn = Turn(request.model_copy(update={"seed": seed}), iteration, iterations, embeddings, job, wanted,
                        min(request.batch_size, self.batch_max))  # fmt: skip
            outcome = await self.batched(turn)
            if isinstance(outcome, BaseException):  # this request's own error (the others of its batch got theirs)
                raise outcome
            results.append(outcome)
            if outcome.info["interrupted"]:
                break
        return results

    async def batched(self, turn: Turn):
        """The turn's Result or the exception it got. Here alone; the deployed class (`deployments`) replaces this
        with Ray Serve's `@serve.batch`, which gathers turns and calls `run_turns` with them."""
        return (await self.run_turns([turn]))[0]

    async def run_turns(self, turns: list[Turn]) -> list:
        """Turns gathered together, one model at a time (Ray splits its batches by model id already; grouped here
        again so that nothing depends on it): the model held while its turns run, then one `generate_batch`. Errors
        are returned, not raised: Serve would set one raised error on every request of the batch."""
        outcomes: list = [None] * len(turns)
        models: dict[str, list[int]] = {}
        for i, turn in enumerate(turns):
            models.setdefault(turn.wanted, []).append(i)
        for wanted, members in models.items():
            async with self.turn:
                try:
                    await self.hold(wanted)
                except Exception as exc:  # the load failed: every request for it gets the error, as alone
                    for i in members:
                        outcomes[i] = exc
                    continue
                done = await asyncio.to_thread(self._run_turns, [turns[i] for i in members])
            for i, outcome in zip(members, done):
                outcomes[i] = outcome
        return outcomes

    def _run_turns(self, turns: list[Turn]) -> list:
        """One `Engine.generate_batch` over the turns, each with its own progress and interrupt on the board. If
        the call fails as a whole (a fault outside any request), each turn runs again alone."""
        outcomes: list = [None] * len(turns)
        live = []
        for i, turn in enumerate(turns):
            if turn.iteration == 0 and ray.get(self.board.started.remote(turn.job, self.replica, turn.iterations)):
                outcomes[i] = RequestError("request dropped before it ran: its client went away")
            else:
                live.append(i)
        if len(live) > 1:
            jobs, rows = [turns[i].job for i in live], sum(turns[i].request.batch_size for i in live)
            log.info("jobs %s gathered as one batch (%d rows)", ", ".join(jobs), rows)
            self.report([{"event": "batch_gathered", "jobs": jobs, "size": len(jobs), "rows": rows}])
        stops = {i: threading.Event() for i in live}  # each job's own interrupt: the engine's would stop them all

        def run(members: list[int]) -> list:
            return self.engine.generate_batch([turns[i].request for i in members],
                                              on_steps=[self._on_step(turns[i], stops[i]) for i in members],
                                              interrupts=[stops[i] for i in members],
                                              embeddings=[turns[i].embeddings for i in members])  # fmt: skip

        try:
            done = run(live)
        except Exception as exc:
            log.warning("the batch of jobs %s failed as a whole (%s: %s); each runs alone",
                        [turns[i].job for i in live], type(exc).__name__, exc)  # fmt: skip
            done = []
            for i in live:
                try:
                    done += run([i])
                except Exception as alone:
                    done.append(alone)
        for i, outcome in zip(live, done):
            if isinstance(outcome, Result):
                outcome.info["worker"] = self.replica
                outcome.info["events"] = [{**e, "replica": self.replica} for e in outcome.info["events"]]
                self.report(outcome.info["events"], turns[i].job)
            outcomes[i] = outcome
        return outcomes

    def _on_step(self, turn: Turn, stop: threading.Event):
        def on_step(step: int, total: int) -> None:
            if ray.get(self.board.step.remote(turn.job, step, total, turn.iteration)):
                stop.set()

        return on_step

    async def warm(self, request: dict, index: int = 0) -> None:
        """Load the request's model (the ingress's first call for an id no replica holds)."""
        async with self.turn:
            await self.hold(self.check(*self.model(parse_request(request))))

    def model(self, request) -> tuple:
        """The request's model and, for a transformer alone, its parts (the ingress named them in the request)."""
        entry = self.engine.store.pipeline(request.model)
        return entry, plan_parts(request, entry, self.engine.store)

    def _run(self, request, iterations: int, embeddings: dict, job: str) -> list:
        if ray.get(self.board.started.remote(job, self.replica, iterations)):
            raise RequestError("request dropped before it ran: its client went away")
        results = []
        for iteration in range(iterations):
            if iteration and ray.get(self.board.interrupted.remote(job)):  # interrupted between two batches
                break

            def on_step(step: int, total: int, iteration=iteration) -> None:
                if ray.get(self.board.step.remote(job, step, total, iteration)):
                    self.engine.interrupt()

            seed = request.seed + iteration * request.batch_size
            result = self.engine.generate(request.model_copy(update={"seed": seed}), on_step=on_step, embeddings=embeddings)
            result.info["worker"] = self.replica
            result.info["events"] = [{**e, "replica": self.replica} for e in result.info["events"]]
            self.report(result.info["events"], job)
            results.append(result)
            if result.info["interrupted"]:
                break
        return results


def deployments(settings: WorkerSettings, cluster) -> tuple:
    """The two deployments, sized by `cluster` (`start.ClusterSettings`). Ray Serve's `@serve.multiplexed` and
    `@serve.batch` take their settings when the method is defined, so the classes that carry them are made here."""

    class Generator(GeneratorWorker):
        @serve.multiplexed(max_num_models_per_replica=settings.models_per_worker)
        async def hold(self, wanted: str) -> Held:
            return await self.load(wanted)

        # Ray Serve's own batching: it gathers for batch_wait_timeout_s after the first turn, up to max_batch_size
        # rows (batch_size_fn: a turn counts its rows), and hands each model id's turns to one call of this method
        @serve.batch(max_batch_size=settings.batch_max or BATCH_MAX_CAP,
                     batch_wait_timeout_s=settings.batch_wait, batch_size_fn=lambda turns: sum(t.rows for t in turns))
        async def batched(self, turns: list[Turn]) -> list:
            return await self.run_turns(turns)

        def __init__(self, settings: WorkerSettings):
            super().__init__(settings)
            self.batched.set_max_batch_size(self.batch_max)  # None given: sized from this replica's device

    class Encoder(EncoderWorker):
        @serve.multiplexed(max_num_models_per_replica=settings.models_per_worker)
        async def hold(self, wanted: str) -> Held:
            return await self.load(wanted)

    # num_cpus 0: a replica's threads are PyTorch's to schedule, and a small head node still places them all
    # a replica takes at most max_ongoing requests at once: with batching, at least a full batch of them
    ongoing = cluster.max_ongoing
    if settings.batch_wait > 0:
        ongoing = max(ongoing, settings.batch_max or BATCH_MAX_CAP)
    generator = serve.deployment(Generator, name="generator", num_replicas=cluster.generators,
                                 max_ongoing_requests=ongoing,
                                 ray_actor_options={"num_cpus": 0, "num_gpus": cluster.gpus_per_worker})  # fmt: skip
    encoder = serve.deployment(Encoder, name="encoder", num_replicas=cluster.encoders,
                               max_ongoing_requests=cluster.max_ongoing,
                               ray_actor_options={"num_cpus": 0, "num_gpus": cluster.gpus_per_encoder})  # fmt: skip
    return generator.bind(settings), encoder.bind(settings)
