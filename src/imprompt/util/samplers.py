"""A1111 / SD.Next sampler names -> diffusers schedulers.

A new scheduler instance is built from the model's own scheduler config for every request, so no scheduler
state (timesteps, step index, multistep history) can leak from one request into the next.
"""

from __future__ import annotations

from ..errors import RequestError

# name -> (diffusers class name, extra config)
SAMPLERS: dict[str, tuple[str | None, dict]] = {
    "Default": (None, {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),  # diffusers' name for A1111's PLMS
    "LMS": ("LMSDiscreteScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}
# diffusers scheduler class -> the sampler name A1111 writes (and reads back)
A1111_NAMES = {
    "PNDMScheduler": "PLMS", "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "DDIMScheduler": "DDIM", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "UniPCMultistepScheduler": "UniPC", "DEISMultistepScheduler": "DEIS",
}  # fmt: skip


def canonical_sampler(name: str | None) -> str:
    """The canonical spelling of a sampler name (case-insensitive); unknown names are a RequestError."""
    wanted = (name or "Default").strip().lower()
    for known in SAMPLERS:
        if known.lower() == wanted:
            return known
    raise RequestError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")


def make_scheduler(name: str, model_scheduler_config: dict, model_scheduler_class: str):
    """A fresh scheduler for this request. "Default" is the model's own scheduler."""
    import diffusers

    class_name, extra = SAMPLERS[canonical_sampler(name)]
    cls = getattr(diffusers, class_name or model_scheduler_class)
    return cls.from_config(model_scheduler_config, **extra)


def a1111_names(scheduler) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 writes them for the scheduler actually used ("Default" included), e.g.
    ("DPM++ 2M", "Karras"); A1111 reads both back."""
    cls = type(scheduler).__name__
    name = A1111_NAMES.get(cls, cls.removesuffix("Scheduler"))
    if cls == "DPMSolverMultistepScheduler" and scheduler.config.get("algorithm_type") == "sde-dpmsolver++":
        name = "DPM++ 2M SDE"
    return name, "Karras" if scheduler.config.get("use_karras_sigmas") else None
