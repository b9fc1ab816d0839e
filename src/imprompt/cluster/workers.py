"""A cluster's two kinds of workers, as Ray Serve deployments: encoders and generators.

Encoders turn a unit's reference images into finished embeddings; generators turn a request and its finished
embeddings into images.

Each replica owns one `Engine` on the shared models folder and runs the same code the single process runs
(`Engine.embed`, `Engine.generate(..., embeddings=...)`), so the pixels are the same. What imprompt adds to Ray
Serve is the model identity: the ingress computes from the plan which pipeline and encoders a request needs
(`routing.py`), and each replica's multiplexed `hold` loads them into its engine, so Ray's router finds them there
again. When Ray's multiplexing lets a model go (least recently used, past `models_per_worker`), the replica frees it
in its engine too: what Ray reports a replica holds is what it holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import ray
from ray import serve

from ..engine import Engine
from ..errors import ImpromptError, RequestError
from ..conditioning.image_prompts import plan_unit
from ..models.parts import NO_PARTS, ModelParts
from ..plan import plan_parts
from ..request import parse_request
from .board import BOARD_NAME, NAMESPACE
from .loopback import keep_replica_on_loopback
from .routing import model_id

log = logging.getLogger("imprompt")


@dataclass
class WorkerSettings:
    engine: dict  # Engine's keyword arguments: models folders, device, dtypes, budgets, limits
    models_per_worker: int = 2  # pipelines a generator replica (encoders an encoder replica) holds at most


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

    async def generate(self, request: dict, iterations: int, embeddings: dict, job: str) -> list:
        """The request's images, `iterations` batches one after another (A1111's n_iter, seeds counting on), with
        the units' embeddings made by encoder workers; steps reported to the board, which answers interrupts."""
        parsed = parse_request(request)
        async with self.turn:  # a job waiting here is not running yet: the board learns when it starts
            await self.hold(self.check(*self.model(parsed)))
            return await asyncio.to_thread(self._run, parsed, iterations, embeddings, job)

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
    """The two deployments, sized by `cluster` (`start.ClusterSettings`). Ray Serve's `@serve.multiplexed` takes
    its per-replica limit when the method is defined, so the classes that carry it are made here."""

    class Generator(GeneratorWorker):
        @serve.multiplexed(max_num_models_per_replica=settings.models_per_worker)
        async def hold(self, wanted: str) -> Held:
            return await self.load(wanted)

    class Encoder(EncoderWorker):
        @serve.multiplexed(max_num_models_per_replica=settings.models_per_worker)
        async def hold(self, wanted: str) -> Held:
            return await self.load(wanted)

    # num_cpus 0: a replica's threads are PyTorch's to schedule, and a small head node still places them all
    generator = serve.deployment(Generator, name="generator", num_replicas=cluster.generators,
                                 max_ongoing_requests=cluster.max_ongoing,
                                 ray_actor_options={"num_cpus": 0, "num_gpus": cluster.gpus_per_worker})  # fmt: skip
    encoder = serve.deployment(Encoder, name="encoder", num_replicas=cluster.encoders,
                               max_ongoing_requests=cluster.max_ongoing,
                               ray_actor_options={"num_cpus": 0, "num_gpus": cluster.gpus_per_encoder})  # fmt: skip
    return generator.bind(settings), encoder.bind(settings)
