"""Several requests as one pipeline call: what they must share (`batch_key`), and the merged call that runs them.

Requests that share what one diffusers call must share (the model and how it is loaded, size, steps, sampler, CFG on
or off, VAE, LoRA set) run as rows of one call, each with its own prompt embeddings, seeds, CFG scale (`RowGuidance`)
and IP-Adapter units:

    prompt embeddings   concatenated along the batch (each request's repeated for its batch_size rows)
    noise               one generator per row (seed + i): diffusers draws each row's latents and ancestral noise
                        from its own generator, so a row's noise is the noise it gets alone
    IP-Adapter units    every request's units are slots of one processor set (`ipadapter.attach.RowScales`): a
                        slot acts at its unit's scale, window, mask and layer weights in its own request's rows and
                        at 0 in the others' (diffusers skips a slot that is 0 in every row, as it skips a unit at 0)
    progress, interrupt each request's own: an interrupted request's rows keep the latents of the step it stopped
                        at (decoded as alone decodes them: the decode goes row by row), the others go on
    decode              row by row (the VAE's slicing), as alone

So each request's images are its images alone, up to the last bits that batched arithmetic rounds otherwise (a
GEMM over more rows may sum in another order; bit-equality with alone is not promised, <= 1/255 is tested on the tiny
CPU test models; real models in float16 on CUDA are not measured yet). A scheduler that clamps or thresholds each
row's predicted image (`clip_sample`, as DDIM has unless the model's config turns it off; `thresholding`) amplifies
those last bits far past 1/255, in diffusers' own batches too (`row_exact`), so it gets no key. What cannot share a
call runs alone (`batch_key` None, or a call the rows cannot merge into); the flow that prepares the requests and
falls back to alone is `engine.py`'s.

A known cost, by design for now: every slot runs its IP-Adapter attention on every row (the other requests' rows
scaled by 0, not skipped), so a merged call's IP-Adapter work grows with requests x rows; and `engine.py` prepares
every request of a group before any runs, so their built adapters and embeddings are alive together, beyond what
the adapter and embedding cache budgets bound alone.
"""

from __future__ import annotations

import inspect
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .call import PipelineCall
from .errors import RequestError
from .ipadapter.attach import RequestUnits
from .plan import Plan, make_plan
from .request import GenerateRequest
from .util.samplers import make_scheduler

# the pipelines whose calls merge: SD 1.5 / 2.x and SDXL text to image (SD 3.5 and FLUX run alone for now)
BATCHED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# what a mergeable call passes to its pipeline; anything else (an init image, ControlNet images) makes it run alone
MERGED_KWARGS = {"guidance_scale", "width", "height", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                 "negative_pooled_prompt_embeds", "ip_adapter_image_embeds", "cross_attention_kwargs"}  # fmt: skip
PROMPT_TENSORS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def batch_key(state, request: GenerateRequest) -> tuple | None:
    """What a request's call must share with others to run merged with them, or None when it runs alone. Plans the
    request (names resolved, images decoded; nothing loaded or encoded)."""
    return plan_key(state, request, make_plan(request, state))


def plan_key(state, request: GenerateRequest, plan: Plan) -> tuple | None:
    """`batch_key` from a request's plan: the model as loaded (file versions, dtype, device, memory plan, parts),
    size, steps, sampler, whether CFG is on (each row has its own scale: `RowGuidance`), and each kind's part (the
    VAE, the LoRA set; None from a kind that cannot batch). The prompt's clip skip and textual inversions are not
    shared: imprompt encodes each request's prompt."""
    spec = plan.pipeline.spec
    if spec.architecture != "unet" or spec.pipeline_class not in BATCHED_PIPELINES:
        return None
    parts = tuple(c.batch_part() for c in plan.conditionings)
    if any(part is None for part in parts):
        return None
    if not row_exact(model_scheduler(state, plan, request)):
        return None
    return (state.pipeline_key(plan.pipeline, plan.parts), plan.width, plan.height, request.steps, plan.sampler,
            request.cfg_scale > 1.0, parts)  # fmt: skip


def row_exact(scheduler) -> bool:
    """Whether a row of a batch stays within rounding of the same row alone under this scheduler: not where it clamps
    or thresholds each row's predicted image (`clip_sample`, `thresholding`; DDIM clips unless the model's config
    says not). Both act on each row alone (thresholding's quantile is per image), but where the model's predictions
    reach the clamp they amplify the last bits in which a batched UNet rounds otherwise; measured on the tiny SD 1.5
    in diffusers alone (one row vs two, 4 to 12 steps): DDIM with clip_sample 226/255, thresholding with DPM++ 2M
    2.4, UniPC 2.3, DEIS 1.5; without them every scheduler imprompt names <= 0.04/255. Every other step of diffusers'
    schedulers acts on each row on its own (their noise: one generator per row)."""
    takes = inspect.signature(type(scheduler).__init__).parameters  # a config may carry keys its class ignores
    return not any(name in takes and scheduler.config.get(name) for name in ("clip_sample", "thresholding"))


def model_scheduler(state, plan: Plan, request: GenerateRequest):
    """The scheduler the request's call would build (`util.samplers.make_scheduler`), without loading the model: from
    the resident pipeline's scheduler config, or else the one its files give (a folder's `scheduler/`, or the
    config imprompt writes a single file's folder from)."""
    import diffusers

    from .models.single_file import CONFIGS

    key = state.pipeline_key(plan.pipeline, plan.parts)
    resident = next((loaded for loaded in state.pipelines.all() if loaded.key == key), None)
    if resident is not None:
        config, class_name = resident.scheduler_config, resident.scheduler_class
    else:
        path = Path(plan.pipeline.spec.path)
        if path.is_file():
            path = CONFIGS / ("sdxl" if plan.pipeline.spec.pipeline_class == "StableDiffusionXLPipeline" else "sd15")
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        class_name = config["_class_name"]
    if not hasattr(diffusers, class_name):
        raise RequestError(f"model {plan.pipeline.name}: scheduler {class_name} is not one of diffusers' classes; "
                           "use a model whose scheduler config names one")  # fmt: skip
    return make_scheduler(plan.sampler, config, class_name)


class Stop:
    """A request's stop in a batch: its own interrupt, or the engine's (which stops every request). Read as a
    `threading.Event` is read (`is_set`)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def merge_signature(call: PipelineCall) -> tuple | None:
    """What calls must have in common to merge (the prompt tensors' shapes: SD 1.5 prompts of 77 and of 154 tokens
    do not stack), or None when a call runs alone: its UNet reads other rows than the pipeline's (a prompt and a
    negative of their own lengths, `prompting.conds.ConditionedUNet`), or it passes what a merged call does not."""
    kwargs = call.kwargs
    if call.conditioned_unet is not None or call.pipeline is not call.loaded.pipeline or call.lora_uses:
        return None
    attention_kwargs = set(kwargs.get("cross_attention_kwargs", {}))
    if set(kwargs) - MERGED_KWARGS or attention_kwargs - {"ip_adapter_masks", "ip_hidden_states"}:
        return None
    if not isinstance(call.adapters, RequestUnits):
        return None
    if not row_exact(make_scheduler(call.sampler, call.loaded.scheduler_config, call.loaded.scheduler_class)):
        return None  # the model as loaded clips or thresholds (the key read its files; this reads what loaded)
    shapes = tuple((name, tuple(kwargs[name].shape), kwargs[name].dtype) for name in PROMPT_TENSORS if name in kwargs)
    # CFG on or off is shared (a row without CFG has no negative row); the scale is each row's own, but where a UNet
    # reads it as an embedding (LCM's `time_cond_proj_dim`: diffusers makes a tensor of one Python number)
    unet = call.loaded.pipeline.unet
    cfg = kwargs["guidance_scale"] if unet.config.time_cond_proj_dim is not None else kwargs["guidance_scale"] > 1.0
    return shapes + (call.loaded.key, cfg, kwargs["width"], kwargs["height"])


@dataclass
class Row:
    """One request in a batch: its applied call (its progress callback and stop in its schedule), the units it
    attached, and what the call gave it."""

    call: PipelineCall
    units: RequestUnits
    images: list = field(default_factory=list)
    stopped: bool = False  # interrupted in its own call: its rows kept the step it stopped at
    stopped_at: tuple[int, int] = (0, 0)  # the step it stopped after, of how many
    batch: tuple[int, int] = (1, 1)  # the call it ran in: rows the UNet ran at once (CFG aside), requests among them
    number: int = 0  # which pipeline call of the batch it ran in
    error: BaseException | None = None  # what its call raised


def run_alone(row: Row) -> None:
    """A row that no other row merges with runs as it would alone: its own adapter set's shells swapped in for the
    call (what is attached and kept stays as the requests left it)."""
    undo = row.call.loaded.attached.alone(row.units)
    try:
        with row.call.in_place():  # its VAE: a call that ended since it was applied put the model's own back
            row.images = row.call.run()
        row.stopped = row.call.schedule.interrupt.is_set()  # read now, as alone reads it: not at a later call's end
    finally:
        undo()


def run_merged(rows: list[Row]) -> None:
    """The rows' calls as one pipeline call (see the module docstring); each row gets its images."""
    first = rows[0].call
    loaded, pipeline = first.loaded, first.pipeline
    owner = [r for r, row in enumerate(rows) for _ in range(row.call.batch_size)]  # the request of each batch row
    kwargs = {name: first.kwargs[name] for name in ("guidance_scale", "width", "height")}
    scales = [rows[r].call.kwargs["guidance_scale"] for r in owner]
    if len(set(scales)) > 1:
        kwargs["guidance_scale"] = RowGuidance(scales)
    for name in PROMPT_TENSORS:
        if name in first.kwargs:
            kwargs[name] = torch.cat([rows[r].call.kwargs[name] for r in owner])
    held, frozen = None, torch.zeros(len(owner), dtype=torch.bool)

    def step_end(pipe, step, timestep, tensors):
        """Each request's hooks, progress and stop, as its own schedule's `step_end` takes them alone."""
        nonlocal held
        total, latents = pipe.num_timesteps, tensors["latents"]
        for r, row in enumerate(rows):
            if row.stopped:
                continue
            schedule = row.call.schedule
            if step + 1 < total:
                for hook in schedule.hooks:
                    hook(step + 1, total, 0)
            if schedule.on_step is not None:
                schedule.on_step(step + 1, total)
            if schedule.interrupt.is_set():  # its rows stay at this step's latents, as alone stops here
                row.stopped, row.stopped_at = True, (step + 1, total)
                mine = torch.tensor([o == r for o in owner])
                held = latents.clone() if held is None else torch.where(_rows(mine, latents), latents, held)
                frozen[mine] = True
        if held is not None:
            latents = torch.where(_rows(frozen, latents), held, latents)
        if all(row.stopped for row in rows):
            pipe._interrupt = True
        update_scales()
        return {"latents": latents}

    generators = [torch.Generator(device="cpu").manual_seed(row.call.seed + i)
                  for row in rows for i in range(row.call.batch_size)]  # fmt: skip
    pipeline.scheduler = make_scheduler(first.sampler, loaded.scheduler_config, loaded.scheduler_class)
    for row in rows:
        row.units.merged = True
        row.call.schedule.begin(0, first.steps)
    # the rows' image prompts, each row reading its own request's units (the attachment's `merged`)
    units, update_scales, undo = loaded.attached.merged(
        [row.units for row in rows], owner, kwargs["guidance_scale"] > 1.0, [row.call.kwargs for row in rows],
        kwargs["width"], kwargs["height"])  # fmt: skip
    kwargs |= units
    try:
        with first.in_place():  # the rows' VAE (they share it): a call that ended since may have put the own one back
            vae = pipeline.vae
            slicing = vae.use_slicing
            vae.use_slicing = True  # the decode row by row: each row's as alone's, and one image's memory at a time
            try:
                devices = [pipeline.device] if pipeline.device.type == "cuda" else []
                reasons = list(dict.fromkeys(why for row in rows for why in row.call.eager_reasons))
                for row in rows:  # one call: eager for all its rows if any row needs it, and each says so
                    row.call.eager_reasons = reasons
                    row.call.note_eager()
                with torch.random.fork_rng(devices=devices), first.compiled_or_eager():  # as `PipelineCall.run`
                    torch.manual_seed(first.seed)
                    output = pipeline(num_inference_steps=first.steps, generator=generators,
                                      callback_on_step_end=step_end, output_type="pil", **kwargs)  # fmt: skip
            finally:
                vae.use_slicing = slicing
    finally:
        undo()
        for row in rows:
            row.units.merged = False
    at = 0
    for row in rows:
        size = row.call.batch_size
        # interrupted: the image it was making, as alone (its later images are never started)
        row.images = output.images[at : at + (1 if row.stopped else size)]
        row.call.scheduler = pipeline.scheduler
        row.batch = (len(owner), len(rows))
        at += size


class RowGuidance(float):
    """imprompt beyond diffusers: a CFG scale per batch row. diffusers' SD 1.5 / SDXL pipelines read the guidance
    scale as `guidance_scale > 1` (CFG on: it is for every row of a merged call, and the float's value is the
    smallest row's) and as `uncond + guidance_scale * (text - uncond)`, where this multiplies each row by its own
    scale as a Python number multiplies a tensor (in float32, rounded to the tensor's dtype), so a row's arithmetic
    is alone's."""

    def __new__(cls, scales: list[float]):
        value = super().__new__(cls, min(scales))
        value.scales = torch.tensor(scales, dtype=torch.float32)
        return value

    def __mul__(self, other):
        if not isinstance(other, torch.Tensor):
            return float(self) * other
        if other.shape[0] != len(self.scales):
            raise ValueError(f"a per-row CFG scale for {len(self.scales)} rows met a tensor of {other.shape[0]} rows")
        per_row = self.scales.to(other.device).view(-1, *([1] * (other.ndim - 1)))
        return (per_row * other).to(other.dtype)

    __rmul__ = __mul__


def _rows(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A per-row mask shaped to select whole rows of `latents`."""
    return mask.to(latents.device).view(-1, *([1] * (latents.ndim - 1)))


def merge_groups(rows: list, signatures: list) -> list[list]:
    """Rows grouped by their merge signature, groups in the order of their first row."""
    groups: dict = {}
    for row, signature in zip(rows, signatures):
        groups.setdefault(signature, []).append(row)
    return list(groups.values())
