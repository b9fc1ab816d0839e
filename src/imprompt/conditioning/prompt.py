"""The text prompt and negative prompt: A1111's reading on SD 1.5 / SDXL, the texts as written on SD 3.5 / FLUX.

On SD 1.5 / SDXL they are read as A1111 reads them (`prompting/`: weights, BREAK, 75-token chunks, textual
inversions, clip skip) and handed over as prompt embeddings; SD 3.5 and FLUX pipelines encode their prompts
themselves (T5 and CLIP), so they get the texts, and A1111's syntax is refused there rather than read as words.
`<lora:...>` tags are taken out of the text here; `loras.py` reads them.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from ..errors import LimitError, RequestError, UnsupportedError
from ..models.store import Entry, ModelStore
from ..prompting.schedule import composable, schedule
from ..prompting.syntax import BREAK, MAX_CHUNKS, parse_attention, take_lora_tags
from ..request import GenerateRequest
from ..util.samplers import SAMPLERS, canonical_sampler
from . import Conditioning, Description, Preparation

log = logging.getLogger("imprompt")


def plan(request: GenerateRequest, model: Entry, store: ModelStore):
    """The model family's prompt, read without its `<lora:...>` tags (`loras.py` reads those)."""
    if model.spec.architecture != "unet":
        return plan_for_transformer(request, model)
    if request.true_cfg_scale != 1.0:
        raise RequestError(f"true_cfg_scale is FLUX's true classifier-free guidance; model {model.name} is "
                           f"{model.spec.family}, whose guidance is cfg_scale. Leave true_cfg_scale at 1")  # fmt: skip
    prompt, _ = take_lora_tags(request.prompt, "prompt")  # A1111 takes them out of the whole prompt: never scheduled
    negative_prompt, negative_tags = take_lora_tags(request.negative_prompt, "negative_prompt")
    if negative_tags:
        raise RequestError(
            f"negative_prompt: <lora:{negative_tags[0].name}:...> — LoRA tags act only in the prompt (as in A1111); "
            f"move it to the prompt or remove it"
        )
    part_texts = composable(prompt)
    if len(part_texts) > MAX_PARTS:  # each part is one more UNet row at every call
        raise LimitError(f"prompt: {len(part_texts)} parts (AND) is more than the {MAX_PARTS} a prompt may have")
    for _, weight in part_texts:
        if not math.isfinite(weight):
            raise RequestError(f"prompt: a part's weight (its trailing :number) is {weight}; give a finite number")
    steps = schedule_steps(SAMPLERS[canonical_sampler(request.sampler)][0], request.steps)
    parts = [(schedule(text, steps), weight) for text, weight in part_texts]
    negative = schedule(negative_prompt, steps)  # A1111 reads no AND in the negative prompt
    distinct = {(field_name, text) for field_name, entries in [("prompt", e) for e, _ in parts] + [("negative_prompt", negative)]
                for _, text in entries}  # fmt: skip
    if len(distinct) > MAX_TEXTS:  # each is encoded, and held for the call
        raise LimitError(f"prompt: its edits and alternations make {len(distinct)} texts over {request.steps} steps, "
                         f"more than the {MAX_TEXTS} a request may encode; use fewer")  # fmt: skip
    for field_name, text in sorted(distinct):
        check_prompt_syntax(text, field_name)
    layers = model.spec.text_encoder_layers
    xl = model.spec.pipeline_class == "StableDiffusionXLPipeline"
    if layers and request.clip_skip > layers:  # A1111's CLIP_stop_at_last_layers counts back from the last of them
        raise RequestError(f"clip_skip: {request.clip_skip} is more than the {layers} layers of model {model.name}'s "
                           f"text encoder; use 1..{layers}")  # fmt: skip
    texts = "\n".join(text for entries in [e for e, _ in parts] + [negative] for _, text in entries).lower()
    inversions = tuple(e for e in store.current_of_kind("textual-inversion")
                       if e.spec.fits(model.spec) and e.name.lower() in texts)  # fmt: skip
    warnings = []
    if xl and request.clip_skip != 1 and not request.sdxl_clip_l_skip:
        warnings.append(f"clip_skip={request.clip_skip} does not act on SDXL models (A1111 reads both of SDXL's text "
                        f"encoders at their penultimate layer whatever the clip skip); set sdxl_clip_l_skip to apply "
                        f"it to CLIP-L, as A1111's option of that name does")  # fmt: skip
    # A1111's settings act where they mean something (sdxl_clip_l_skip on SDXL): elsewhere they change nothing
    return A1111Prompt(request.prompt, request.negative_prompt, part_texts, negative_prompt, request.steps, parts,
                       negative, request.clip_skip, request.sdxl_clip_l_skip and xl, request.cfg_scale,
                       request.pad_cond_uncond, inversions, warnings)  # fmt: skip


MAX_PARTS = 16  # AND parts of a prompt
MAX_TEXTS = 64  # distinct texts a prompt's and negative's schedules make
SECOND_ORDER = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


def schedule_steps(scheduler_class: str | None, steps: int) -> int:
    """The steps A1111 counts a schedule over: twice the steps for a second-order sampler (it calls the model
    twice a step); None (the model's own scheduler) is known once the model is loaded (`count_calls`)."""
    return 2 * steps if scheduler_class in SECOND_ORDER else steps


def check_prompt_syntax(text: str, field_name: str) -> None:
    """A scheduled text's A1111 syntax that imprompt reads (weights, BREAK) must parse, within the chunk limit."""
    breaks = sum(fragment is BREAK for fragment in parse_attention(text, field_name))
    if breaks >= MAX_CHUNKS:  # each BREAK starts a chunk (a long text fills them too: checked as it is encoded)
        raise LimitError(f"{field_name}: {breaks + 1} chunks of 75 tokens (BREAK starts one) is more than the "
                         f"{MAX_CHUNKS} a prompt may fill; shorten it")  # fmt: skip


def without_lora_tags(text: str) -> str:
    """The text without its `<lora:...>` tags and the spaces they leave (T5's tokenizer reads a space as a token)."""
    bare, tags = take_lora_tags(text, "prompt")
    return re.sub(r" {2,}", " ", bare).strip() if tags else text


def plan_for_transformer(request: GenerateRequest, model: Entry) -> TransformerPrompt:
    """SD 3.5 and FLUX: the texts as written, and a refusal naming the field for what those pipelines do not read."""
    family, name, flux = model.spec.family, model.name, model.spec.architecture == "flux"
    negative_tags = take_lora_tags(request.negative_prompt, "negative_prompt")[1]
    if negative_tags:
        raise RequestError(f"negative_prompt: <lora:{negative_tags[0].name}:...> — LoRA tags act only in the prompt "
                           f"(as in A1111); move it to the prompt")  # fmt: skip
    for field_name, text in (("prompt", without_lora_tags(request.prompt)), ("negative_prompt", request.negative_prompt)):
        if len(schedule(text, request.steps)) > 1:
            raise UnsupportedError(
                f"{field_name}: A1111's prompt editing and alternation ([from:to:when], [a|b]) are not computed for "
                f"{family} models (model {name}), whose prompts go to their text encoders as written; remove them")
        if any(f is BREAK or f[1] != 1.0 for f in parse_attention(text, field_name)):
            raise UnsupportedError(
                f"{field_name}: A1111 attention weights ((word:1.2), [word]) and BREAK are not applied for {family} "
                f"models (model {name}), whose prompts go to their text encoders as written; remove them")
    if request.clip_skip != 1:
        raise UnsupportedError(f"clip_skip: clip_skip is not supported for {family} models (model {name}); remove it")
    if request.true_cfg_scale != 1.0 and not flux:
        raise UnsupportedError(f"true_cfg_scale: true_cfg_scale is FLUX's; the guidance is cfg_scale for {family} "
                               f"models (model {name}); remove it")  # fmt: skip
    if flux and request.true_cfg_scale > 1.0 and not request.negative_prompt:
        raise RequestError("true_cfg_scale: FLUX's true CFG needs a negative_prompt (diffusers runs it only with "
                           "one); give one, or set true_cfg_scale to 1")  # fmt: skip
    return TransformerPrompt(request.prompt, request.negative_prompt, flux, request.true_cfg_scale)


@dataclass
class A1111Prompt(Conditioning):
    """SD 1.5 / SDXL: the prompt's parts (AND) and the negative, each a schedule of texts over the denoising calls,
    made into conditionings as A1111 makes them (after the LoRA set acts on the text encoders). A prompt that is one
    part, at weight 1, the same text throughout, goes to the pipeline as its prompt embeddings (padded with empty
    chunks to the negative's length only with `pad_cond_uncond`, A1111's setting, off by default); any other
    reaches the UNet through `prompting/conds.py`."""

    kind = "prompt"

    prompt: str  # as the request wrote it (tags included), for the result
    negative_prompt: str
    part_texts: list  # [(text, weight)]: the prompt without its LoRA tags, split at AND
    negative_text: str
    steps: int
    parts: list  # [(schedule, weight)], a schedule being [(last call, text)]
    negative: list  # the negative prompt's schedule
    clip_skip: int
    sdxl_clip_l_skip: bool
    cfg_scale: float
    pad_cond_uncond: bool
    inversion_entries: tuple  # textual inversions that fit the model and whose names the prompts contain
    warnings: list = field(default_factory=list)
    inversions: list = field(default_factory=list)
    used: list = field(default_factory=list)
    padded: bool = False
    call_index: int = 0
    unet: object = None  # prompting.conds.ConditionedUNet, where the UNet reads the prompt per call
    calls: int = 0  # the model's calls in the run (shown with the schedule)

    def prepare(self, prep: Preparation) -> None:
        """The textual inversions' vectors, from the engine's cache or read now."""
        from ..loading.textual_inversions import load_inversion  # torch-heavy: imported where used

        state = prep.state
        self.inversions = []
        for entry in self.inversion_entries:
            key = entry.key(prep.loaded.dtype, state.device)  # in the model's dtype
            inversion = state.inversions.get(key)
            if inversion is None:
                inversion = load_inversion(entry, state.device, prep.loaded.dtype, state.store.a1111_hash(entry.path, 12))
                state.inversions.put(key, inversion, sum(v.numel() * v.element_size() for v in inversion.vectors),
                                     entry.name)  # fmt: skip
            self.inversions.append(inversion)

    def apply(self, call) -> None:
        import torch

        from ..prompting.conds import Cond, ConditionedUNet, StepConds
        from ..prompting.encode import Reading, encode_text, lengthen, zero_negative

        pipeline = call.loaded.pipeline
        self.count_calls(SAMPLERS[call.sampler][0] or call.loaded.scheduler_class)
        layers = pipeline.text_encoder.config.num_hidden_layers
        if self.clip_skip > layers:  # the plan checks it where the files say how many (this is the backstop)
            raise RequestError(f"clip_skip: {self.clip_skip} is more than the {layers} layers of model "
                               f"{call.loaded.name}'s text encoder; use 1..{layers}")  # fmt: skip
        reading, used, encoded = Reading(self.clip_skip, self.sdxl_clip_l_skip), {}, {}

        def cond(text: str, field_name: str) -> Cond:
            if text not in encoded:
                encoded[text] = Cond(*encode_text(pipeline, text, reading, self.inversions, used, field_name))
            return encoded[text]

        with torch.no_grad():
            parts = [([(end, cond(text, "prompt")) for end, text in entries], weight) for entries, weight in self.parts]
            first = parts[0][0][0][1]
            if first.pooled is not None and all(text == "" for _, text in self.negative):  # SDXL, as A1111
                negative = [(end, Cond(*zero_negative(first.embeds, first.pooled))) for end, _ in self.negative]
            else:
                negative = [(end, cond(text, "negative_prompt")) for end, text in self.negative]
            empty = cond("", "") if self.pad_cond_uncond else None  # what A1111 pads with
        self.used = list(used.values())
        guided = self.cfg_scale > 1.0  # diffusers applies classifier-free guidance only above 1
        positive, unconditional = first, negative[0][1]
        fixed = len(parts) == 1 and parts[0][1] == 1.0 and len(parts[0][0]) == 1 and len(negative) == 1
        unequal = guided and positive.embeds.shape[1] != unconditional.embeds.shape[1]
        if fixed and unequal and empty is not None:  # A1111's pad_cond_uncond: one batch, empty chunks added
            positive, unconditional = (Cond(lengthen(positive.embeds, unconditional.embeds, empty.embeds), positive.pooled),
                                       Cond(lengthen(unconditional.embeds, positive.embeds, empty.embeds), unconditional.pooled))  # fmt: skip
            self.padded, unequal = True, False
        if not fixed or unequal:
            # per call, composable, or prompt and negative at their own lengths: the UNet reads them (`conds.py`);
            # the pipeline's own prompt embeddings are stand-ins of one shape, never read
            self.unet = ConditionedUNet(pipeline.unet, StepConds(negative, parts, empty), lambda: self.call_index,
                                        self.cfg_scale)  # fmt: skip
            call.after(self.unet.install())
            call.conditioned_unet = self.unet
            call.schedule.add(self.at_call)
            unconditional = Cond(torch.zeros_like(positive.embeds),
                                 None if positive.pooled is None else torch.zeros_like(positive.pooled))  # fmt: skip
        call.kwargs["prompt_embeds"] = positive.embeds
        if positive.pooled is not None:
            call.kwargs["pooled_prompt_embeds"] = positive.pooled
        if guided:
            call.kwargs["negative_prompt_embeds"] = unconditional.embeds
            if unconditional.pooled is not None:
                call.kwargs["negative_pooled_prompt_embeds"] = unconditional.pooled

    def count_calls(self, scheduler_class: str) -> None:
        """The model's calls and the schedules over the steps A1111 counts, now that the scheduler is known (a
        model's own scheduler may be a second-order one the plan could not see)."""
        second_order = scheduler_class in SECOND_ORDER
        self.calls = 2 * self.steps - 1 if second_order else self.steps
        steps = schedule_steps(scheduler_class, self.steps)
        self.parts = [(schedule(text, steps), weight) for text, weight in self.part_texts]
        self.negative = schedule(self.negative_text, steps)

    def batch_part(self) -> tuple | None:
        """A prompt that is one part at weight 1, the same text throughout (the pipeline's prompt embeddings) can
        share a batch, each request with its own texts; schedules and AND parts run alone (not batched yet)."""
        (entries, weight), *others = self.parts
        return () if not others and weight == 1.0 and len(entries) == 1 and len(self.negative) == 1 else None

    def at_call(self, step: int, total: int, index: int) -> None:
        self.call_index = step

    def describe(self, call) -> Description:
        inversions = [{"name": i.name, "hash": i.hash} for i in self.used]
        clip_skip = self.clip_skip
        infotext = {"Clip skip": clip_skip if clip_skip > 1 else None}
        if inversions:
            infotext["TI hashes"] = ", ".join(f"{i['name']}: {i['hash']}" for i in inversions)
        if self.padded or (self.unet is not None and self.unet.padded):
            infotext["Pad conds"] = True  # as A1111 writes it when it padded
        schedule_info = {
            "prompt": [{"weight": weight, "texts": steps_of(entries, self.calls)} for entries, weight in self.parts],
            "negative_prompt": steps_of(self.negative, self.calls),
        }
        info = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "textual_inversions": inversions,
                "clip_skip": clip_skip, "prompt_schedule": schedule_info, "pad_cond_uncond": self.pad_cond_uncond,
                "sdxl_clip_l_skip": self.sdxl_clip_l_skip}  # fmt: skip
        return Description(info=info, infotext=infotext, warnings=self.warnings)


def steps_of(entries: list[tuple[int, str]], calls: int) -> list[dict]:
    """A schedule as users read it: each text with the denoising calls it acts at (1-based, first to last)."""
    shown, start = [], 1
    for end, text in entries:
        last = min(end + 1, calls)
        if last >= start:
            shown.append({"steps": [start, last], "text": text})
        start = last + 1
    return shown


@dataclass
class TransformerPrompt(Conditioning):
    """SD 3.5 / FLUX: the pipeline encodes the texts itself; FLUX's true CFG reads the negative prompt."""

    kind = "prompt"

    prompt: str
    negative_prompt: str
    flux: bool
    true_cfg_scale: float

    def apply(self, call) -> None:
        prompt = without_lora_tags(self.prompt)  # the LoRA set reads the tags (`loras.py`); the encoders do not
        if self.flux:
            call.kwargs |= {"prompt": prompt, "negative_prompt": self.negative_prompt or None,
                            "true_cfg_scale": self.true_cfg_scale}  # fmt: skip
        else:  # SD3 encodes "" for an empty one, as diffusers does
            call.kwargs |= {"prompt": prompt, "negative_prompt": self.negative_prompt}
        if call.loaded.memory.encoders_on_cpu:  # its text encoders stay in CPU memory (`loading/memory_plan.py`)
            call.kwargs |= self.encoded_on_cpu(call.pipeline, call.kwargs)
        if self.flux and call.prompt_tokens:  # FLUX Redux's image tokens (`redux.py`) join the prompt's T5 tokens
            call.kwargs |= with_image_tokens(call.pipeline, call.kwargs, call.prompt_tokens)

    def encoded_on_cpu(self, pipeline, kwargs: dict) -> dict:
        """The texts the pipeline would encode on its device, encoded by its own `encode_prompt` on the CPU where
        its text encoders stay, as the embeddings it takes instead (moved to the denoiser's device): the same
        numbers. diffusers encodes where the denoiser runs; imprompt can keep the 9.5 GB T5 off a GPU too small
        for both."""
        import torch

        cpu, device = torch.device("cpu"), pipeline.transformer.device
        with torch.no_grad():
            if self.flux:
                embeds, pooled, _ = pipeline.encode_prompt(prompt=kwargs["prompt"], prompt_2=None, device=cpu)
                found = {"prompt": None, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                if kwargs["negative_prompt"] is not None and kwargs["true_cfg_scale"] > 1:  # true CFG reads it
                    embeds, pooled, _ = pipeline.encode_prompt(prompt=kwargs["negative_prompt"], prompt_2=None,
                                                               device=cpu)  # fmt: skip
                    found |= {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}
                found["negative_prompt"] = None
            else:
                guided = kwargs["guidance_scale"] > 1  # SD 3 encodes the negative only when it guides
                embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
                    prompt=kwargs["prompt"], prompt_2=None, prompt_3=None, device=cpu,
                    do_classifier_free_guidance=guided, negative_prompt=kwargs["negative_prompt"])  # fmt: skip
                found = {"prompt": None, "negative_prompt": None, "prompt_embeds": embeds,
                         "pooled_prompt_embeds": pooled}  # fmt: skip
                if guided:
                    found |= {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in found.items()}

    def describe(self, call) -> Description:
        info = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "textual_inversions": [],
                "clip_skip": 1}  # fmt: skip
        return Description(info=info)


def with_image_tokens(pipeline, kwargs: dict, tokens: list) -> dict:
    """The positive prompt as embeddings, image tokens appended after its T5 tokens, as diffusers'
    `FluxPriorReduxPipeline` hands them to `FluxPipeline`: encoded by the pipeline's own `encode_prompt` (unless
    already encoded on the CPU), where the pipeline would encode it. The negative prompt is left as it is."""
    import torch

    if kwargs.get("prompt") is not None:
        with torch.no_grad():
            embeds, pooled, _ = pipeline.encode_prompt(prompt=kwargs["prompt"], prompt_2=None)
    else:
        embeds, pooled = kwargs["prompt_embeds"], kwargs["pooled_prompt_embeds"]
    embeds = torch.cat([embeds, *(t.to(device=embeds.device, dtype=embeds.dtype) for t in tokens)], dim=1)
    return {"prompt": None, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
