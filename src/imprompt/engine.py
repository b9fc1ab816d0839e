"""Engine.generate(request) -> Result: the data flow, and nothing else.

    request -> plan (every image decoded, every name resolved, every pairing checked; nothing loaded)
            -> the model (resident, or loaded)
            -> prepare each conditioning (load and encode through the caches)
            -> apply each to one pipeline call (keyword arguments, attached modules, per-step schedules)
            -> run the call (one image at a time) -> the result (info and infotexts from the descriptions)

Several requests (`generate_batch`) take the same steps, each its own, and those that share a call (`batching.py`)
run as one call with a row for each of their images; the others run alone, as above.

The kinds of conditioning (`conditioning/`) and the model families are the plan's and their own modules'; the flow
knows neither. Output depends on the request alone: every step either rebuilds its state from the request
(scheduler, scales, attached set, LoRA set, VAE, generator) or takes it from a cache keyed by what determines it
(file fingerprints, image content, dtype). A request that fails before its call runs changes nothing the next
request can see. The engine's state between requests (caches, budgets, resident models, locks) is `state.py`'s.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from .batching import Row, Stop, batch_key, merge_groups, merge_signature, plan_key, run_alone, run_merged
from .call import PipelineCall
from .conditioning import Description, Preparation
from .conditioning.image_prompts import embed_unit, save_unit_embeddings
from .errors import InterruptedRunError, RequestError
from .ipadapter.attach import RequestUnits
from .ipadapter.embeddings import UnitEmbeddings
from .models.store import Entry
from .models.parts import NO_PARTS, ModelParts
from .plan import Plan, check_limits, make_plan, plan_parts
from .request import GenerateRequest, IPAdapterUnit, parse_request
from .result import Result, Timer, make_result
from .state import EngineState, Limits
from .util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = ["Engine", "Result"]
log = logging.getLogger("imprompt")
# what an engine showed of itself before its state had a module of its own: read from the state (or its limits)
STATE_ATTRIBUTES = ("encoder_dtype", "embedder", "faces", "adapters", "loras", "vaes", "inversions", "controlnets", "pipelines",
                    "default_model", "activation_budget")  # fmt: skip
LIMIT_ATTRIBUTES = ("max_units", "max_images", "max_image_pixels", "max_image_bytes", "allow_paths")


class Engine:
    """Generates images from a text prompt plus image prompts (IP-Adapter units) with any mix of adapters."""

    def __init__(
        self,
        models,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        encoder_dtype: str | torch.dtype | None = None,
        cache_budget: str | int | None = None,
        embedding_cache_budget: str | int | None = None,
        adapter_cache_budget: str | int | None = None,
        lora_cache_budget: str | int | None = None,
        controlnet_cache_budget: str | int | None = None,
        pipeline_cache_budget: str | int | None = None,
        offload_budget: str | int | None = None,
        default_model: str | None = None,
        allow_paths: bool = True,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        max_units: int = 8,
        max_images: int = 16,
        insightface_root: str | Path | None = None,
        activation_budget: str | int | None = None,
        offload: str = "auto",
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        """`models`: a models folder (or several). `dtype`: of the pipeline; `encoder_dtype`: of the image
        encoders (default: the same; bfloat16 halves their memory and, on CPUs with bf16 support, their time).
        Budgets ("8GiB", "512MB", bytes) of the caches, on the device the models live on (defaults: shares of its
        memory, `util/devices.py`): `cache_budget` for loaded image encoders, `adapter_cache_budget` for built
        adapters, `embedding_cache_budget` for embeddings, `lora_cache_budget` for the LoRAs loaded into every
        resident model, `controlnet_cache_budget` for ControlNet models, `pipeline_cache_budget` for base models kept loaded, and on a GPU `offload_budget` for
        base models waiting in CPU memory; `activation_budget`: the device memory a generation may use beyond the
        caches (an image whose VAE decode would need more is decoded tile by tile).
        Paths as names are allowed unless `allow_paths=False`. `max_units` per request and `max_images` per unit
        are checked before any image is decoded. `insightface_root`: where InsightFace's model pack is (FaceID from
        images; see `ipadapter/faces.py` for where else it is looked for). `offload`: the memory plan of models that
        do not fit the device ("auto" chooses by size; "none", "encoders", "model", "group" force one: see
        `loading/memory_plan.py`). `compile`: each model's UNet / transformer compiled with torch.compile
        (`compile_backend`) when it loads, kept compiled while requests switch adapters, LoRAs and scales
        (`loading/compiled.py`; the first request at each new size pays the compile)."""
        budgets = {"encoders": cache_budget, "embeddings": embedding_cache_budget, "adapters": adapter_cache_budget,
                   "loras": lora_cache_budget, "controlnets": controlnet_cache_budget, "pipelines": pipeline_cache_budget, "offload": offload_budget,
                   "activations": activation_budget}  # fmt: skip
        limits = Limits(max_units, max_images, max_image_pixels, max_image_bytes, allow_paths)
        if compile:
            check_backend(compile_backend)
        self.state = EngineState(models, device, dtype, encoder_dtype, budgets, limits, default_model, insightface_root,
                                 offload, compile_backend if compile else None)
        self.store, self.device, self.dtype = self.state.store, self.state.device, self.state.dtype

    def __getattr__(self, name: str):
        if name in STATE_ATTRIBUTES:
            return getattr(self.state, name)
        if name in LIMIT_ATTRIBUTES:
            return getattr(self.state.limits, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ----------------------------------------------------------------------------------------------- generation

    def generate(self, request: GenerateRequest | dict | None = None, on_step=None,
                 embeddings: dict[int, UnitEmbeddings] | None = None, **fields) -> Result:  # fmt: skip
        """Generate images. Accepts a `GenerateRequest`, a dict, or its fields as keyword arguments.
        `on_step(step, total)` is called after every denoising step. One generation runs at a time.
        `embeddings`: finished embeddings of some units (by unit index), made elsewhere by `embed` (a cluster's
        encoder workers); the other units are encoded here. Either way the pipeline only sees finished embeddings."""
        request = parse_request(request, **fields)
        self.check_limits(request)
        with self.state.lock:
            self.state.interrupt.clear()
            return generate(self.state, request, on_step, embeddings or {})

    def batch_key(self, request: GenerateRequest | dict) -> tuple | None:
        """What the request's pipeline call must share with others to run as one call with them (`generate_batch`),
        or None when it runs alone (a kind not batched yet, or a request that fails: it then fails alone). Plans
        the request (names resolved, images decoded); loads and encodes nothing."""
        try:
            request = parse_request(request)
            self.check_limits(request)
            return batch_key(self.state, request)
        except Exception:
            return None

    def generate_batch(self, requests: list, on_steps: list | None = None, interrupts: list | None = None,
                       embeddings: list | None = None) -> list[Result | BaseException]:  # fmt: skip
        """Generate several requests (`GenerateRequest`s or dicts) at once: those with equal `batch_key`s run as one
        pipeline call, each with its own prompt, seeds and units, the others alone. `on_steps`: each request's
        `on_step(step, total)` or None (in a shared call, every image of the request is at `step`); `interrupts`:
        each request's `threading.Event` or None (set: that request stops after its current step and returns what
        it has, as alone; `interrupt()` stops them all). Returns each request's `Result`, or the exception it got,
        in the requests' order; info["batch"] says how many rows its call ran and for how many requests.
        `embeddings`: each request's finished unit embeddings made elsewhere (as `generate`'s), or None."""
        requests = list(requests)
        on_steps = list(on_steps) if on_steps is not None else [None] * len(requests)
        interrupts = list(interrupts) if interrupts is not None else [None] * len(requests)
        if not len(on_steps) == len(interrupts) == len(requests):
            raise RequestError(f"generate_batch: {len(requests)} requests, {len(on_steps)} on_steps and "
                               f"{len(interrupts)} interrupts; give one of each per request (or None)")  # fmt: skip
        made = [e or {} for e in embeddings] if embeddings is not None else [{}] * len(requests)
        if len(made) != len(requests):
            raise RequestError(f"generate_batch: {len(requests)} requests and {len(made)} embeddings; give one per "
                               f"request (or None)")  # fmt: skip
        with self.state.lock:
            self.state.interrupt.clear()
            return generate_batch(self.state, requests, on_steps, interrupts, made)

    def plan(self, request: GenerateRequest | dict) -> Plan:
        """Everything a request would be refused for (images, names, pairings, limits), checked without loading
        or computing anything: a cluster's ingress calls this before it hands the request to any worker."""
        request = parse_request(request)
        self.check_limits(request)
        return make_plan(request, self.state)

    def check_limits(self, request: GenerateRequest) -> None:
        """How many units and images a request may bring, checked before any image is decoded (the server calls
        this before it queues a job)."""
        check_limits(request, self.state.limits)

    def embed(self, request: GenerateRequest | dict, index: int) -> tuple[UnitEmbeddings, list[dict]]:
        """The finished embeddings of unit `index` of `request` (on the CPU, to travel), and the events of making
        them: the same step `generate` takes for a unit, run on its own (a cluster's encoder worker)."""
        with self.state.lock:
            return embed_unit(self.state, request, index)

    def save_embeddings(self, unit: IPAdapterUnit | dict, path) -> Path:
        """Encode a unit's images once and write the embeddings that later units can name instead of images."""
        with self.state.lock:
            return save_unit_embeddings(self.state, unit, path)

    # ---------------------------------------------------------------------------------- what stays between them

    def preload(self, model: str, parts: ModelParts = NO_PARTS) -> list[dict]:
        """Load a model before any request needs it (the server does this as it starts, so that the first request
        does not wait for the load). `parts`: a transformer alone's VAE and text encoders (default: as a request
        naming none would find them). Returns the load's events; a failed load raises as a request would."""
        events: list[dict] = []
        entry = self.store.pipeline(model)
        if entry.spec.parts and not parts.files:
            parts = plan_parts(parse_request({"model": model}), entry, self.store)
        with self.state.lock:
            self.state.pipeline(entry, events, parts)
        return events

    def preload_encoder(self, entry: Entry) -> list[dict]:
        """Load an image encoder before a unit needs it (a cluster's encoder worker, as Ray routes a new encoder
        to it). Returns the load's events."""
        events: list[dict] = []
        with self.state.lock:
            self.state.embedder.load(entry, "preloaded for the cluster's routing", events)
        return events

    def unload(self, kind: str, key: tuple) -> bool:
        """Drop one loaded pipeline ("pipeline") or image encoder ("encoder") by its cache key, waiting for a running
        generation; a cluster's worker does this when Ray's model multiplexing lets the model go."""
        with self.state.lock:
            return self.state.unload(kind, key)

    def interrupt(self) -> None:
        """Stop the running generation after its current step (it returns what it has)."""
        self.state.interrupt.set()

    @property
    def interrupt_requested(self) -> bool:
        return self.state.interrupt.is_set()

    def cache_info(self) -> dict:
        """What is loaded now; answers at once, even while a generation (or a model switch) runs."""
        return self.state.cache_info()

    def clear_cache(self) -> dict:
        """Drop loaded encoders, embeddings, built adapters, LoRAs, VAEs and faces (the loaded models stay)."""
        with self.state.lock:
            return self.state.clear_cache()


def check_backend(name: str) -> None:
    """`--compile-backend` names one of torch.compile's backends."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise RequestError(f"compile backend {name!r} is not one of torch.compile's ({', '.join(sorted(known))}); "
                           "use inductor (the default) or eager to check a graph without code generation")  # fmt: skip


def generate(state: EngineState, request: GenerateRequest, on_step, made_elsewhere: dict, interrupt=None,
             plan: Plan | None = None, described: tuple = (), events: tuple = ()) -> Result:  # fmt: skip
    """One request through the engine's state: the data flow (see the module docstring). `interrupt`: what stops it
    (default: the engine's); `plan`: made already; `described`: more of its result's info (a batch's); `events`:
    what happened to it before (in a batch), first among its result's events."""
    stop = interrupt or state.interrupt
    prepared = prepare(state, request, made_elsewhere, plan)
    prepared.events[:0] = events
    with open_call(prepared, on_step, stop) as call:  # what the call changed, undone after it
        apply(prepared, call)
        images = call.run()
    return finish(state, prepared, call, images, stop.is_set(), described)


@dataclass
class Prepared:
    """A request planned, its model loaded and its conditionings prepared: what its call is built from."""

    request: GenerateRequest
    plan: Plan
    loaded: object  # loading.resident.LoadedPipeline
    seed: int
    events: list
    timer: Timer


def prepare(state: EngineState, request: GenerateRequest, made_elsewhere: dict, plan: Plan | None = None) -> Prepared:
    timer, events = Timer(), []
    plan = plan or make_plan(request, state)
    timer.mark("plan")

    loaded = state.pipeline(plan.pipeline, events, plan.parts)
    timer.mark("load")

    preparation = Preparation(state, loaded, events, made_elsewhere)
    for conditioning in plan.conditionings:
        with timer.part(conditioning.kind, "prepare"):
            conditioning.prepare(preparation)
    timer.mark("prepare")
    seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
    return Prepared(request, plan, loaded, seed, events, timer)


def open_call(prepared: Prepared, on_step, interrupt) -> PipelineCall:
    request, plan = prepared.request, prepared.plan
    return PipelineCall(prepared.loaded, prepared.events, steps=request.steps, cfg_scale=request.cfg_scale,
                        width=plan.width, height=plan.height, seed=prepared.seed, batch_size=request.batch_size,
                        sampler=plan.sampler, on_step=on_step, interrupt=interrupt)  # fmt: skip


def apply(prepared: Prepared, call: PipelineCall) -> None:
    for conditioning in prepared.plan.conditionings:
        with prepared.timer.part(conditioning.kind, "apply"):
            conditioning.apply(call)
    prepared.timer.mark("apply")


def finish(state: EngineState, prepared: Prepared, call: PipelineCall, images: list, interrupted: bool,
           described: tuple = ()) -> Result:  # fmt: skip
    prepared.timer.mark("denoise")
    loaded, plan = prepared.loaded, prepared.plan
    device = {"device": str(state.device), "dtype": str(loaded.dtype or state.dtype).removeprefix("torch."),
              "encoder_dtype": str(state.encoder_dtype).removeprefix("torch."), "memory_plan": loaded.memory.describe()}  # fmt: skip
    if plan.parts.files:  # a transformer alone: which VAE and text encoders it ran with, and why those
        device["model_parts"] = plan.parts.describe()
    return make_result(images, call, prepared.request, [c.describe(call) for c in plan.conditionings] + list(described),
                       model=loaded.name, model_hash=loaded.model_hash, engine=device, events=prepared.events,
                       timer=prepared.timer, interrupted=interrupted)  # fmt: skip


# ------------------------------------------------------------------------------------------ several requests


def batch_info(rows: int, requests: int, call: int) -> Description:
    """A batch's part of each result: how many rows its UNet ran at once, for how many requests (1 and 1: alone),
    and which of the batch's pipeline calls it was (equal numbers: the same call)."""
    return Description(info={"batch": {"size": rows, "requests": requests, "call": call}})


def generate_batch(state: EngineState, requests: list, on_steps: list, interrupts: list,
                   made: list | None = None) -> list:  # fmt: skip
    """Several requests: those that share a call (`batching.plan_key`) run as one, in groups taken in the order of
    their first request, each group's requests in their order; the others run alone. Each gets its result, or the
    error it got (a request's failure is its own)."""
    outcomes: list = [None] * len(requests)
    made = made if made is not None else [{}] * len(requests)  # each request's embeddings made elsewhere
    stops = [Stop(event, state.interrupt) for event in interrupts]
    calls = itertools.count(1)  # the pipeline calls made, numbered for each result's info["batch"]
    groups: dict = {}  # the shared key (or the request alone) -> [(index, request, plan)]
    for i, given in enumerate(requests):
        try:
            request = parse_request(given)
            check_limits(request, state.limits)
            plan = make_plan(request, state)
        except Exception as exc:  # refused as alone would refuse it
            outcomes[i] = exc
            continue
        try:
            key = plan_key(state, request, plan)
        except Exception:  # a file its key reads fails: alone, it fails (or runs) on its own
            key = None
        groups.setdefault(("shared", key) if key is not None else ("alone", i), []).append((i, request, plan))
    for members in groups.values():
        if len(members) == 1:
            (i, request, plan), = members
            outcomes[i] = alone(state, request, on_steps[i], stops[i], next(calls), plan, made=made[i])
        else:
            generate_group(state, members, on_steps, stops, outcomes, calls, made)
    return outcomes


def alone(state: EngineState, request: GenerateRequest, on_step, stop: Stop, call: int, plan: Plan | None = None,
          events: tuple = (), made: dict | None = None):  # fmt: skip
    """A request of a batch run alone (its pipeline call numbered `call`; `events`: what happened to it in the batch
    before, first among its result's events): its result, or the error it got."""
    try:
        return generate(state, request, on_step, made or {}, stop, plan, (batch_info(1, 1, call),), events)
    except Exception as exc:
        return exc


def generate_group(state: EngineState, members: list, on_steps: list, stops: list, outcomes: list, calls,
                   made: list | None = None) -> None:  # fmt: skip
    """Requests that share a key: each prepared and applied in order (its adapters attached as alone attaches them,
    so what stays attached and cached is what they leave alone), then the calls that merge run as one, the others
    alone. A request whose call cannot merge at all runs alone at once. A merged call that raises is run again
    request by request, from the start (a `batch_fallback` event in each result says why), but for a request
    already interrupted in it: that one is not run again (its interrupt stands) and gets an error saying so."""
    rows: list[tuple[int, Prepared, Row]] = []
    failed: dict[int, str] = {}  # request -> why the merged call it was in failed
    try:
        for i, request, plan in members:
            try:
                prepared = prepare(state, request, made[i] if made else {}, plan)
                call = open_call(prepared, on_steps[i], stops[i])
            except Exception as exc:
                outcomes[i] = exc
                continue
            call.adapters = RequestUnits(prepared.loaded.attached)
            try:
                apply(prepared, call)
                merges = merge_signature(call) is not None
                if not merges:  # its UNet reads rows of its own: it runs alone, now (its adapter set is attached)
                    with call, call.in_place():
                        images = call.run()
                    outcomes[i] = finish(state, prepared, call, images, stops[i].is_set(),
                                         (batch_info(1, 1, next(calls)),))  # fmt: skip
            except Exception as exc:
                call.__exit__(None, None, None)
                outcomes[i] = exc
                continue
            if merges:
                rows.append((i, prepared, Row(call, call.adapters)))
        for group in merge_groups(rows, [merge_signature(row.call) for _, _, row in rows]):
            number = next(calls)
            for _, _, row in group:
                row.number = number
            try:
                if len(group) == 1:
                    run_alone(group[0][2])
                else:
                    run_merged([row for _, _, row in group])
            except Exception as exc:
                if len(group) == 1:
                    outcomes[group[0][0]] = exc
                else:  # one bad request must not take the others down: each runs again, alone, from the start
                    why = f"{type(exc).__name__}: {exc}"
                    log.warning("a call of %d requests failed (%s); each runs again alone but those interrupted in "
                                "it", len(group), why)  # fmt: skip
                    for i, _, row in group:
                        failed[i] = why
                        row.error = exc
    finally:
        for _, _, row in reversed(rows):
            row.call.__exit__(None, None, None)
    for i, prepared, row in rows:
        if outcomes[i] is None and i not in failed:  # interrupted: its own rows stopped early, not another call's
            outcomes[i] = finish(state, prepared, row.call, row.images, row.stopped,
                                 (batch_info(*row.batch, row.number),))  # fmt: skip
    for i, prepared, row in rows:
        if i not in failed:
            continue
        if row.stopped:  # its interrupt was delivered in the failed call: it is not run again
            error = InterruptedRunError(
                f"request {i} of the batch: interrupted at step {row.stopped_at[0]} of {row.stopped_at[1]}, then "
                f"the pipeline call it ran in with other requests failed ({failed[i]}), so no image of it was kept; "
                "send it again for its images")  # fmt: skip
            error.__cause__ = row.error
            outcomes[i] = error
            continue
        together = sum(1 for j, _, other in rows if j in failed and other.number == row.number)
        event = {"event": "batch_fallback", "requests": together, "why": failed[i]}
        outcomes[i] = alone(state, prepared.request, on_steps[i], stops[i], next(calls), events=(event,),
                            made=made[i] if made else None)
