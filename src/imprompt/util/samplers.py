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
    "PNDM": ("PNDMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}


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


def sampler_label(name: str, model_scheduler_class: str) -> str:
    """What the infotext calls the sampler actually used."""
    name = canonical_sampler(name)
    return name if name != "Default" else model_scheduler_class.removesuffix("Scheduler")
