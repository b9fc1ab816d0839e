"""How strongly each ControlNet acts at each step: the A1111 ControlNet extension's weight, window and mode.

They are applied to what the ControlNet model returns, for the length of one pipeline call.

diffusers' pipelines scale a ControlNet's residuals by one number per step (`controlnet_conditioning_scale` times 0
or 1 from `control_guidance_start/end`), and offer `guess_mode` (the control on the conditional rows only, the
residuals scaled from 0.1 to 1 along a log space). The extension (read for its rules, `scripts/hook.py`) does
otherwise, and its users' payloads mean its rules:
- a unit acts at sampling step i of n when start <= max(i - 1, 0) / n <= end: the step number A1111 reports while
  step i runs is the previous one's (diffusers: start <= i / n and (i + 1) / n <= end);
- "My prompt is more important" (its soft injection) scales residual k of 13 (12 down, then the middle block) by
  0.825 ** (12 - k), and SDXL's 10 residuals by the first 10 of those;
- "ControlNet is more important" does that too, and gives the control to the conditional rows only (its cfg
  injection: the unconditional rows' residuals are zeroed); diffusers' guess_mode is not the same scaling.
So imprompt runs diffusers' pipeline at scale 1 and window [0, 1] and applies the unit's rules here, on the model's
own forward, patched for the call (`ControlPatch`). The ControlNets of SD 3.5 and FLUX (which the extension does
not run) take the weight and window; their control mode is "Balanced".

When the prompt's conditionings are not the pipeline's own batch (scheduled or composable prompts, or a prompt and
negative at their own lengths: `prompting/conds.py`), the ControlNet reads, like the UNet, each row's own text (as
the extension's hook does, which sees the UNet's input): `rows` gives the batches to run it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import RequestError

SOFT_INJECTION_BASE = 0.825  # the extension's per-residual decay for its two non-balanced modes


@dataclass(frozen=True)
class UnitGuidance:
    """One ControlNet unit's weight, window and mode."""

    weight: float
    start: float
    end: float
    control_mode: str  # request.CONTROL_MODES
    advanced_weighting: tuple[float, ...] | None = None  # the extension's own scales, which replace the others
    # what the net's cross-attention reads instead of the prompt for this unit, one row per flag (whether that row is
    # the unconditional one): InstantID's IdentityNet reads its unit's face tokens, as InstantX's pipeline feeds it
    # (diffusers' pipelines give the prompt); None: the prompt
    hidden_states: object = field(default=None, compare=False, hash=False)

    def active_at(self, fraction: float) -> bool:
        """`fraction`: the sampling step A1111 reports over its steps (`reported_fraction`)."""
        return self.start <= fraction <= self.end

    def residual_scales(self, count: int) -> list[float]:
        """The factor of each of a UNet ControlNet's `count` residuals (down blocks, then the middle block)."""
        if self.advanced_weighting is not None:  # as the extension: the weight and the mode's scales do not apply
            if len(self.advanced_weighting) != count:
                raise RequestError(f"advanced_weighting: {len(self.advanced_weighting)} scales for a ControlNet with "
                                   f"{count} residuals; give {count}")  # fmt: skip
            return list(self.advanced_weighting)
        if self.control_mode == "Balanced":
            return [self.weight] * count
        return [self.weight * SOFT_INJECTION_BASE ** float(12 - k) for k in range(13)][:count]

    @property
    def conditional_only(self) -> bool:
        return self.control_mode == "ControlNet is more important"


def reported_fraction(call: int, calls: int, steps: int, second_order: bool) -> float:
    """The fraction of the steps A1111 reports while model call `call` of `calls` runs, which the extension's window
    reads: the step number is set after each step, so a step's calls see the previous step's (step 0's see 0). A
    second-order sampler (Heun, DPM2: the scheduler's `order` is 2, `calls` = 2 * steps - 1) calls the model twice
    in a step, the step's number set between the two: call 2i (i >= 1) sees i - 1, call 2i + 1 sees i. Told by the
    scheduler, not by the count: PNDM's 2 steps are 3 calls too."""
    if second_order and steps > 1:
        return max((call - 1) // 2, 0) / steps
    return max(call - 1, 0) / calls


class ControlPatch:
    """Replaces, for one call, the forward of one ControlNet model: runs it at scale 1 and applies its units' rules.
    A model named by two units is called once per unit, in the units' order, at every denoising call (diffusers'
    multi model calls its nets in order): `cursor` walks the units, and with them each unit's own cross-attention
    input. One patch per model: a second patch on the same model would wrap the first, which then ran every call."""

    def __init__(self, net, units: list[UnitGuidance], unet_family: bool, steps: int, conditioned, scheduler):
        """`steps`: the request's; `conditioned()`: the call's `prompting.conds.ConditionedUNet`, or None where the
        UNet reads the pipeline's own batch; `scheduler()`: the scheduler running the call (made per image)."""
        self.net, self.units, self.unet_family, self.conditioned = net, units, unet_family, conditioned
        self.scheduler = scheduler
        self.forward = net.forward  # the class's own, bound: what this calls
        self.steps = steps
        self.cursor = 0
        self.fraction = 0.0

    def install(self):
        self.net.forward = self
        return lambda: self.net.__dict__.pop("forward", None)

    def at_step(self, step: int, total: int, index: int) -> None:
        """The call's step hook: the step about to run (each batch image starts at 0)."""
        second_order = getattr(self.scheduler(), "order", 1) == 2
        self.fraction = reported_fraction(step, total, self.steps, second_order)
        self.cursor = 0

    def __call__(self, *args, **kwargs):
        unit = self.units[self.cursor % len(self.units)]
        self.cursor += 1
        kwargs["conditioning_scale"] = 1.0
        factor_on = unit.active_at(self.fraction)
        if not self.unet_family:
            out = self.forward(*args, **kwargs)
            factor = unit.weight if factor_on else 0.0
            return tuple(None if o is None else [t * factor for t in o] for o in out)
        down, mid, uncond_rows = self.unet_control(unit.hidden_states, *args, **kwargs)
        scales = unit.residual_scales(len(down) + 1) if factor_on else [0.0] * (len(down) + 1)
        residuals = [r * s for r, s in zip([*down, mid], scales)]
        if unit.conditional_only and uncond_rows:
            mark = torch.ones(residuals[0].shape[0], 1, 1, 1, dtype=residuals[0].dtype, device=residuals[0].device)
            mark[uncond_rows] = 0
            residuals = [r * mark for r in residuals]
        return residuals[:-1], residuals[-1]

    def unet_control(self, hidden_states, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, *args,
                     added_cond_kwargs=None, return_dict=False, **kwargs):  # fmt: skip
        """The residuals for the rows the UNet runs, and which rows are unconditional; `hidden_states`: the unit's
        (`UnitGuidance.hidden_states`)."""
        guided = sample.shape[0] == 2  # the pipeline's batch (one image at a time): [negative, prompt], or [prompt]
        conditioned = self.conditioned()
        if conditioned is None:
            if hidden_states is not None:
                encoder_hidden_states = hidden_states([True, False] if guided else [False])
            down, mid = self.forward(sample, timestep, encoder_hidden_states, controlnet_cond, *args,
                                     added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs)  # fmt: skip
            return list(down), mid, [0] if guided else []
        batches, uncond_rows = conditioned.control_batches(guided, added_cond_kwargs)
        outs, offset = [], 0
        for embeds, added in batches:
            n = embeds.shape[0]
            if hidden_states is not None:
                embeds = hidden_states([offset + k in uncond_rows for k in range(n)])
            offset += n
            rows = {key: rowed(value, n, sample.shape[0]) for key, value in kwargs.items()}  # e.g. a Union's control_type
            outs.append(self.forward(rowed(sample, n, sample.shape[0]), timestep, embeds,
                                     rowed(controlnet_cond, n, sample.shape[0]), *args, added_cond_kwargs=added,
                                     return_dict=False, **rows))  # fmt: skip
        down = [torch.cat(parts) for parts in zip(*[list(o[0]) for o in outs])]
        return down, torch.cat([o[1] for o in outs]), uncond_rows


def rowed(value, n: int, batch: int):
    """A per-row input of the pipeline's batch (every row the same latent and control image) for `n` rows: tensors
    of the batch's first dimension, also inside lists (a Union model's control images); anything else as it is."""
    if isinstance(value, (list, tuple)):
        return type(value)(rowed(v, n, batch) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[-1:].expand(n, *value.shape[1:])
    return value
