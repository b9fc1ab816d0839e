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


@dataclass(frozen=True)
class Cond:
    """One text's conditioning: its embeddings [1, tokens, width] and, for SDXL, its pooled vector [1, width]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class StepConds:
    """What every denoising call reads: the negative's schedule, and each part's schedule with its weight, where a
    schedule is [(last call, Cond), ...] as `prompting/schedule.py` makes it."""

    negative: list[tuple[int, Cond]]
    parts: list[tuple[list[tuple[int, Cond]], float]]

    def at(self, call: int) -> tuple[Cond, list[tuple[Cond, float]]]:
        return pick(self.negative, call), [(pick(entries, call), weight) for entries, weight in self.parts]


def pick(entries: list[tuple[int, Cond]], call: int) -> Cond:
    """The first entry whose last call is >= `call`; past every one, the first (as A1111 counts)."""
    return next((cond for end, cond in entries if call <= end), entries[0][1])


class ConditionedUNet:
    """Replaces, for one pipeline call, the conditioning the UNet reads (see the module docstring). `current_call()`
    is the index of the denoising call under way; `guided`: the pipeline runs classifier-free guidance (its batch
    is [negative, prompt]); without it the batch is the prompt alone, and the negative still runs where the parts
    need it (AND, or a part's weight), as A1111 runs it at any cfg scale."""

    def __init__(self, unet, conds: StepConds, current_call: Callable[[], int], guided: bool):
        self.unet, self.conds, self.current_call, self.guided = unet, conds, current_call, guided
        self.forward = unet.forward  # the class's own, bound: what this calls

    def install(self) -> Callable[[], None]:
        """Route the UNet's calls through `__call__` until the returned undo runs."""
        self.unet.forward = self
        return lambda: self.unet.__dict__.pop("forward", None)

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, added_cond_kwargs=None,
                 return_dict: bool = True, **kwargs):  # fmt: skip
        negative, parts = self.conds.at(self.current_call())
        with_negative = self.guided or not (len(parts) == 1 and parts[0][1] == 1.0)
        rows = ([negative] if with_negative else []) + [cond for cond, _ in parts]
        prompt_row = 1 if self.guided else 0  # where the pipeline's batch holds the prompt (the negative first)
        picks = ([0] if with_negative else []) + [prompt_row] * len(parts)
        embeds, mask = stacked(rows, with_negative)
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
            combined = neg + sum(weight * (out[1 + i : 2 + i] - neg) for i, (_, weight) in enumerate(parts))
            out = torch.cat([neg, combined]) if self.guided else combined
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


def stacked(rows: list[Cond], negative_apart: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows' embeddings as one batch, and the attention mask that keeps each at its own length. Parts (all rows
    after the negative, or all of them) of unequal lengths repeat their last vector, as A1111 stacks them; the
    negative keeps its own length (masked), as A1111 runs it apart."""
    parts = rows[1:] if negative_apart else rows
    longest_part = max(c.embeds.shape[1] for c in parts)
    embeds = [torch.cat([c.embeds, c.embeds[:, -1:].expand(1, longest_part - c.embeds.shape[1], -1)], dim=1)
              for c in parts]  # fmt: skip
    lengths = [longest_part] * len(parts)
    if negative_apart:
        embeds.insert(0, rows[0].embeds)
        lengths.insert(0, rows[0].embeds.shape[1])
    longest = max(lengths)
    if all(length == longest for length in lengths):
        return torch.cat(embeds), None
    padded = torch.cat([torch.cat([e, e.new_zeros(1, longest - e.shape[1], e.shape[2])], dim=1) for e in embeds])
    mask = torch.tensor([[1] * length + [0] * (longest - length) for length in lengths], device=padded.device)
    return padded, mask


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
