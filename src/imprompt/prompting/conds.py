"""Conditionings that change with the step, composable ones (AND), and a prompt and negative of unequal lengths,
through diffusers' own pipeline: its UNet call takes, at each denoising call, the conditionings A1111 would use.

diffusers' pipelines take one prompt embedding and one negative for the whole run, batched together. A1111's
denoiser (`CFGDenoiser`, read for its rules) instead takes, at denoising call i, each part's text of that call,
runs the negative and the parts through the UNet, and combines them: negative + Σ weight × cfg × (part −
negative). imprompt keeps diffusers' pipeline and replaces, for the length of the call, what its UNet call reads:
`ConditionedUNet` turns the pipeline's [negative, prompt] batch into [negative, part 1, ..., part n] rows with
each row's own embeddings, and hands back [negative, negative + Σ weight × (part − negative)], which the
pipeline's classifier-free guidance (negative + cfg × (prompt − negative)) turns into A1111's result.

Rows of different lengths (a prompt over 75 tokens with a shorter negative, A1111's default `pad_cond_uncond`
off) go through the UNet as A1111 runs them, each at its own length: padded to the longest with an attention mask
that leaves the padding out of every cross-attention (its weights are exactly zero), which is the separate call's
arithmetic in one batch. Composable parts of unequal lengths are lengthened by repeating their last vector, as
A1111 stacks them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ipadapter.slots import slot_rows


@dataclass(frozen=True)
class Cond:
    """One text's conditioning: its embeddings [1, tokens, width] and, for SDXL, its pooled vector [1, width]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class StepConds:
    """What every denoising call reads: the negative's schedule, and each part's schedule with its weight, where a
    schedule is [(last call, Cond), ...] as `prompting/schedule.py` makes it. `empty`: the empty prompt's
    conditioning, with which the shorter of the parts and the negative is padded (A1111's `pad_cond_uncond`);
    None: each at its own length."""

    negative: list[tuple[int, Cond]]
    parts: list[tuple[list[tuple[int, Cond]], float]]
    empty: Cond | None = None

    def at(self, call: int) -> tuple[Cond, list[tuple[Cond, float]]]:
        return pick(self.negative, call), [(pick(entries, call), weight) for entries, weight in self.parts]


def pick(entries: list[tuple[int, Cond]], call: int) -> Cond:
    """The first entry whose last call is >= `call`; past every one, the first (as A1111 counts)."""
    return next((cond for end, cond in entries if call <= end), entries[0][1])


class ConditionedUNet:
    """Replaces, for one pipeline call, the conditioning the UNet reads (see the module docstring). `current_call()`
    is the index of the denoising call under way. With classifier-free guidance the pipeline's batch is [negative,
    prompt] and it applies `cfg_scale`; without it (cfg_scale <= 1) the batch is the prompt alone, and the negative
    still runs where the parts need it (AND, or a part's weight), combined at `cfg_scale` as A1111 does at any
    scale. `padded` says whether any call padded (for A1111's `Pad conds`)."""

    def __init__(self, unet, conds: StepConds, current_call: Callable[[], int], cfg_scale: float):
        self.unet, self.conds, self.current_call, self.cfg_scale = unet, conds, current_call, cfg_scale
        self.forward = unet.forward  # the class's own, bound: what this calls
        self.padded = False

    def install(self) -> Callable[[], None]:
        """Route the UNet's calls through `__call__` until the returned undo runs (a compiled UNet's own forward,
        an instance attribute, back then)."""
        before = self.unet.__dict__.get("forward")
        self.unet.forward = self

        def undo() -> None:
            if before is None:
                self.unet.__dict__.pop("forward", None)
            else:
                self.unet.forward = before

        return undo

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, added_cond_kwargs=None,
                 return_dict: bool = True, **kwargs):  # fmt: skip
        guided = sample.shape[0] == 2  # the pipeline's batch: [negative, prompt] (one image at a time), or [prompt]
        rows, picks, with_negative, parts = self.rows_at(guided)
        embeds, mask, padded = stacked(rows, with_negative, self.conds.empty)
        self.padded = self.padded or padded
        for key in RESIDUALS:  # a ControlNet's residuals: computed per row already (`control_batches`), or mapped
            if kwargs.get(key) is not None:
                kwargs[key] = rows_of_residuals(kwargs[key], picks)
        attention = kwargs.get("cross_attention_kwargs") or {}
        if attention.get("ip_hidden_states") is not None:  # a compiled UNet's image prompts: per pipeline row
            kwargs["cross_attention_kwargs"] = {**attention, "ip_hidden_states": slot_rows(attention["ip_hidden_states"], picks)}
        out = self.forward(
            sample[-1:].expand(len(rows), *sample.shape[1:]),  # every row of the pipeline's batch is this latent
            timestep,
            embeds,
            *args,
            encoder_attention_mask=mask,
            added_cond_kwargs=rows_of(added_cond_kwargs, picks, rows),
            return_dict=False,
            **kwargs,
        )[0]
        if with_negative:
            neg = out[:1]
            scale = 1.0 if guided else self.cfg_scale  # guided: the pipeline multiplies by cfg_scale itself
            combined = neg + scale * sum(weight * (out[1 + i : 2 + i] - neg) for i, (_, weight) in enumerate(parts))
            out = torch.cat([neg, combined]) if guided else combined
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


    def rows_at(self, guided: bool):
        """The rows the UNet runs at the current call: each Cond, the pipeline's row each stands for, whether the
        negative runs, and the parts with their weights."""
        negative, parts = self.conds.at(self.current_call())
        with_negative = guided or not (len(parts) == 1 and parts[0][1] == 1.0)
        rows = ([negative] if with_negative else []) + [cond for cond, _ in parts]
        picks = ([0] if with_negative else []) + [1 if guided else 0] * len(parts)  # the pipeline's row each stands for
        return rows, picks, with_negative, parts

    def control_batches(self, guided: bool, added_cond_kwargs: dict | None):
        """What a ControlNet runs on at the current call, so that it reads each row's own text as the UNet does:
        the rows as one batch where they are one length (padded or not, as the UNet gets them), else each row alone
        at its own length (a ControlNet takes no attention mask); and which rows are the unconditional one."""
        rows, picks, with_negative, _ = self.rows_at(guided)
        embeds, mask, _ = stacked(rows, with_negative, self.conds.empty)
        added = rows_of(added_cond_kwargs, picks, rows)
        uncond = [0] if with_negative else []
        if mask is None:
            return [(embeds, added)], uncond
        lengths = mask.sum(dim=1).tolist()
        batches = []
        for i, length in enumerate(lengths):
            row_added = None if added is None else {k: v[i : i + 1] for k, v in added.items()}
            batches.append((embeds[i : i + 1, : int(length)], row_added))
        return batches, uncond


RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def rows_of_residuals(value, picks: list[int]):
    """A ControlNet's residuals for the UNet's rows: as they are where they were made per row, else each row's
    pipeline row (the pipeline ran the ControlNet on its own batch)."""
    if isinstance(value, (list, tuple)):
        return type(value)(rows_of_residuals(v, picks) for v in value)
    if value.shape[0] == len(picks):
        return value
    return value[torch.tensor(picks, device=value.device)]


def stacked(rows: list[Cond], negative_apart: bool, empty: Cond | None):
    """The rows' embeddings as one batch, the attention mask that keeps each at its own length (None where all are
    one length), and whether empty chunks were added. Parts (all rows after the negative, or all of them) of
    unequal lengths repeat their last vector, as A1111 stacks them. The negative keeps its own length (masked), as
    A1111 runs it apart; with `empty` (`pad_cond_uncond`) the shorter of the negative and the parts gets whole empty
    chunks instead, as A1111 pads them, and all run as one batch."""
    parts = rows[1:] if negative_apart else rows
    longest_part = max(c.embeds.shape[1] for c in parts)
    embeds = [torch.cat([c.embeds, c.embeds[:, -1:].expand(1, longest_part - c.embeds.shape[1], -1)], dim=1)
              for c in parts]  # fmt: skip
    padded = False
    if negative_apart:
        negative = rows[0].embeds
        chunks = (longest_part - negative.shape[1]) // empty.embeds.shape[1] if empty is not None else 0
        if chunks > 0:
            negative, padded = torch.cat([negative] + [empty.embeds] * chunks, dim=1), True
        elif chunks < 0:
            embeds, padded = [torch.cat([e] + [empty.embeds] * -chunks, dim=1) for e in embeds], True
        embeds.insert(0, negative)
    lengths = [e.shape[1] for e in embeds]
    longest = max(lengths)
    if all(length == longest for length in lengths):
        return torch.cat(embeds), None, padded
    batch = torch.cat([torch.cat([e, e.new_zeros(1, longest - e.shape[1], e.shape[2])], dim=1) for e in embeds])
    mask = torch.tensor([[1] * length + [0] * (longest - length) for length in lengths], device=batch.device)
    return batch, mask, padded


def rows_of(added: dict | None, picks: list[int], rows: list[Cond]) -> dict | None:
    """The pipeline's extra UNet inputs for the new rows: SDXL's pooled vector is each row's own; the size ids and
    the image prompts' embeddings are the pipeline's row (negative or prompt) each new row stands for."""
    if added is None:
        return None
    index = torch.tensor(picks)
    out = {}
    for key, value in added.items():
        if key == "text_embeds":
            out[key] = torch.cat([row.pooled for row in rows]).to(value)
        elif isinstance(value, (list, tuple)):
            out[key] = [v[index.to(v.device)] for v in value]
        else:
            out[key] = value[index.to(value.device)]
    return out
