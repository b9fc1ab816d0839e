"""One request's call of its diffusers pipeline: built by the conditionings, run one image at a time.

Every model family goes through the same call: which pipeline object runs it (txt2img, or the img2img twin an init
image asks for), the keyword arguments the conditionings add (prompt embeddings or texts, finished image-prompt
embeddings, masks, an init image), the per-step schedule any conditioning adds to (`StepSchedule`), and what is
undone after it (`after`). A batch is made one image at a time, each with a fresh scheduler and its own generator
(seed + i), so image i is exactly the image a request with seed + i gives alone (batched on one tensor, it would
differ in the last bit: the batched arithmetic rounds otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from .util.samplers import make_scheduler


class StepSchedule:
    """The step-end callback diffusers calls: each conditioning's per-step change (`add`), progress and interrupt.
    A hook is called as `hook(step, total, index)` before step `step` of batch image `index` runs."""

    def __init__(self, batch_size: int, on_step, interrupt: threading.Event):
        self.batch_size, self.on_step, self.interrupt = batch_size, on_step, interrupt
        self.hooks: list[Callable[[int, int, int], None]] = []
        self.index = 0

    def add(self, hook: Callable[[int, int, int], None]) -> None:
        self.hooks.append(hook)

    def begin(self, index: int, steps: int) -> None:
        """Batch image `index` starts: step 0 acts iff start == 0 < end, whatever the number of steps."""
        self.index = index
        for hook in self.hooks:
            hook(0, steps, index)

    def step_end(self, pipe, step, timestep, tensors):
        total = pipe.num_timesteps
        if step + 1 < total:
            for hook in self.hooks:
                hook(step + 1, total, self.index)
        if self.on_step is not None:
            self.on_step(self.index * total + step + 1, self.batch_size * total)
        if self.interrupt.is_set():
            pipe._interrupt = True
        return tensors


class PipelineCall:
    """The pipeline, its keyword arguments and the schedule of one request; `run` makes its images. Used as a
    context: what the conditionings changed on the model for the call is undone when the context ends, however."""

    def __init__(self, loaded, events: list, *, steps: int, cfg_scale: float, width: int, height: int, seed: int,
                 batch_size: int, sampler: str, on_step, interrupt: threading.Event):  # fmt: skip
        self.loaded = loaded  # loading.resident.LoadedPipeline
        self.events = events  # the request's (what was loaded, attached, evicted, and why)
        self.pipeline = loaded.pipeline  # a conditioning may choose another over the same modules (img2img)
        self.steps, self.seed, self.batch_size, self.sampler = steps, seed, batch_size, sampler
        self.width, self.height = width, height
        self.kwargs: dict = {"guidance_scale": cfg_scale, "width": width, "height": height}
        self.schedule = StepSchedule(batch_size, on_step, interrupt)
        self.lora_uses: list = []  # LoRAs that act during the call (loading.loras.LoraUse), from any conditioning
        self.scheduler = None  # the last image's scheduler, for the result's sampler names
        # the prompt's `prompting.conds.ConditionedUNet` where the UNet reads other rows than the pipeline's batch
        # (a ControlNet then reads those rows too); None: the pipeline's own batch
        self.conditioned_unet = None
        self.prompt_tokens: list = []  # tokens appended to the prompt's T5 tokens (FLUX Redux), read by the prompt
        # where the image prompts attach their units: the model's attachment; in a batch, a recorder of the request's
        # own that attaches through it (`ipadapter.attach.RequestUnits`, read by `batching.py`)
        self.adapters = loaded.attached
        self.components: dict = {}  # name -> module a conditioning put on the pipeline for this call (`use`)
        # why a compiled denoiser runs this call eager (`loading.compiled`): what its graph cannot take
        self.eager_reasons: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def after(self, undo: Callable[[], None]) -> None:
        """Something to undo once the call ends, however it ends (last added, first undone)."""
        self._undo.append(undo)

    def use(self, name: str, module) -> None:
        """A component of the pipeline for this call only (a VAE file): set now, the model's own back after the
        call, and recorded so that a batch, which ends other requests' calls between its own, can set it again for
        this call's rows (`in_place`)."""
        if not self.components:
            self.after(self.loaded.restore_components)
        self.components[name] = module
        setattr(self.pipeline, name, module)

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """The components this call `use`s on its pipeline while the context lasts (another call's end may have put
        the model's own back), and what was there before once it ends."""
        before = {name: getattr(self.pipeline, name) for name in self.components}
        for name, module in self.components.items():
            setattr(self.pipeline, name, module)
        try:
            yield
        finally:
            for name, module in before.items():
                setattr(self.pipeline, name, module)

    def __enter__(self) -> PipelineCall:
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def compiled_or_eager(self):
        """The call through the compiled denoiser, or eager where it carries what the graph cannot take."""
        compiled = self.loaded.compiled
        if compiled is None:
            return nullcontext()
        self.note_eager()
        return compiled.running(self.eager_reasons)

    def note_eager(self) -> None:
        """On a compiled model, the request's events say once that its call ran eager, and why."""
        if self.loaded.compiled is not None and self.eager_reasons and \
                not any(e["event"] == "eager_call" for e in self.events):  # fmt: skip
            self.events.append({"event": "eager_call", "why": "; ".join(dict.fromkeys(self.eager_reasons))})

    def run(self) -> list:
        images = []
        for index in range(self.batch_size):
            if index and self.schedule.interrupt.is_set():
                break
            self.pipeline.scheduler = make_scheduler(self.sampler, self.loaded.scheduler_config,
                                                     self.loaded.scheduler_class)  # fmt: skip
            self.schedule.begin(index, self.steps)
            # a pipeline may draw from torch's global generator besides the one it is given (diffusers' SD 3
            # ControlNet pipeline samples the control image's latents so): seeded by the request, and the process's
            # generator left as it was
            devices = [self.loaded.pipeline.device] if self.loaded.pipeline.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), self.compiled_or_eager():
                torch.manual_seed(self.seed + index)
                output = self.pipeline(
                    num_inference_steps=self.steps,
                    generator=torch.Generator(device="cpu").manual_seed(self.seed + index),
                    callback_on_step_end=self.schedule.step_end,
                    output_type="pil",
                    **self.kwargs,
                )
            images += output.images
        self.scheduler = self.pipeline.scheduler
        return images
