"""The text prompt and negative prompt: A1111's reading on SD 1.5 / SDXL, the texts as written on SD 3.5 / FLUX.

On SD 1.5 / SDXL they are read as A1111 reads them (`prompting/`: weights, BREAK, 75-token chunks, textual
inversions, clip skip) and handed over as prompt embeddings; SD 3.5 and FLUX pipelines encode their prompts
themselves (T5 and CLIP), so they get the texts, and A1111's syntax is refused there rather than read as words.
`<lora:...>` tags are taken out of the text here; `loras.py` reads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import LimitError, RequestError, UnsupportedError
from ..models.store import Entry, ModelStore
from ..prompting.syntax import BREAK, MAX_CHUNKS, parse_attention, scheduling_syntax, take_lora_tags
from ..request import GenerateRequest
from . import Conditioning, Description, Preparation

log = logging.getLogger("imprompt")


def plan(request: GenerateRequest, model: Entry, store: ModelStore):
    """The model family's prompt, read without its `<lora:...>` tags (`loras.py` reads those)."""
    if model.spec.architecture != "unet":
        return plan_for_transformer(request, model)
    if request.true_cfg_scale != 1.0:
        raise RequestError(f"true_cfg_scale is FLUX's true classifier-free guidance; model {model.name} is "
                           f"{model.spec.family}, whose guidance is cfg_scale. Leave true_cfg_scale at 1")  # fmt: skip
    prompt, _ = take_lora_tags(request.prompt, "prompt")
    negative_prompt, negative_tags = take_lora_tags(request.negative_prompt, "negative_prompt")
    if negative_tags:
        raise RequestError(
            f"negative_prompt: <lora:{negative_tags[0].name}:...> — LoRA tags act only in the prompt (as in A1111); "
            f"move it to the prompt or remove it"
        )
    check_prompt_syntax(prompt, "prompt", composable=True)
    check_prompt_syntax(negative_prompt, "negative_prompt", composable=False)  # A1111 reads no AND there
    layers = model.spec.text_encoder_layers
    if layers and request.clip_skip > layers:  # A1111's CLIP_stop_at_last_layers counts back from the last of them
        raise RequestError(f"clip_skip: {request.clip_skip} is more than the {layers} layers of model {model.name}'s "
                           f"text encoder; use 1..{layers}")  # fmt: skip
    texts = f"{prompt}\n{negative_prompt}".lower()
    inversions = tuple(e for e in store.current_of_kind("textual-inversion")
                       if e.spec.fits(model.spec) and e.name.lower() in texts)  # fmt: skip
    return A1111Prompt(request.prompt, request.negative_prompt, prompt, negative_prompt, request.clip_skip,
                       request.cfg_scale, inversions)  # fmt: skip


def check_prompt_syntax(text: str, field_name: str, composable: bool) -> None:
    """A1111 prompt syntax that imprompt reads (weights, BREAK) must parse; what it does not compute yet (prompt
    editing, alternation, AND) is refused rather than read as words, which would give another picture."""
    breaks = sum(fragment is BREAK for fragment in parse_attention(text, field_name))
    if breaks >= MAX_CHUNKS:  # each BREAK starts a chunk (a long text fills them too: checked as it is encoded)
        raise LimitError(f"{field_name}: {breaks + 1} chunks of 75 tokens (BREAK starts one) is more than the "
                         f"{MAX_CHUNKS} a prompt may fill; shorten it")  # fmt: skip
    found = scheduling_syntax(text, composable)
    if found:
        raise UnsupportedError(
            f"{field_name}: {found} is A1111 syntax computed per step (or per composable prompt), which imprompt "
            f"does not do yet; read as words it would give another picture than A1111's. Remove it, or write the "
            f"prompt as it should read throughout (escape literal brackets as \\[ \\])"
        )


def plan_for_transformer(request: GenerateRequest, model: Entry) -> TransformerPrompt:
    """SD 3.5 and FLUX: the texts as written, and a refusal naming the field for what those pipelines do not read."""
    family, name, flux = model.spec.family, model.name, model.spec.architecture == "flux"
    if take_lora_tags(request.negative_prompt, "negative_prompt")[1]:
        raise UnsupportedError(f"negative_prompt: LoRA tags are not supported for {family} models (model {name}); "
                               f"remove it")  # fmt: skip
    for field_name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
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
    """SD 1.5 / SDXL: prompt embeddings made as A1111 makes them, after the LoRA set acts on the text encoders."""

    kind = "prompt"

    prompt: str  # as the request wrote it (tags included), for the result
    negative_prompt: str
    text: str  # what the text encoders read: the prompt without its <lora:...> tags
    negative_text: str
    clip_skip: int
    cfg_scale: float
    inversion_entries: tuple  # textual inversions that fit the model and whose names the prompts contain
    inversions: list = field(default_factory=list)
    used: list = field(default_factory=list)

    def prepare(self, prep: Preparation) -> None:
        """The textual inversions' vectors, from the engine's cache or read now."""
        from ..loading.textual_inversions import load_inversion  # torch-heavy: imported where used

        state = prep.state
        self.inversions = []
        for entry in self.inversion_entries:
            key = entry.key(state.dtype, state.device)
            inversion = state.inversions.get(key)
            if inversion is None:
                inversion = load_inversion(entry, state.device, state.dtype, state.store.a1111_hash(entry.path, 12))
                state.inversions.put(key, inversion, sum(v.numel() * v.element_size() for v in inversion.vectors),
                                     entry.name)  # fmt: skip
            self.inversions.append(inversion)

    def apply(self, call) -> None:
        import torch

        from ..prompting.encode import encode_prompts

        layers = call.loaded.pipeline.text_encoder.config.num_hidden_layers
        if self.clip_skip > layers:  # the plan checks this where the files say how many (the backstop, where not)
            raise RequestError(f"clip_skip: {self.clip_skip} is more than the {layers} layers of model "
                               f"{call.loaded.name}'s text encoder; use 1..{layers}")  # fmt: skip
        with torch.no_grad():
            encoded = encode_prompts(call.loaded.pipeline, self.text, self.negative_text, self.clip_skip,
                                     self.inversions, guidance=self.cfg_scale > 1.0)  # fmt: skip
        call.kwargs |= encoded.kwargs
        self.used = encoded.inversions_used

    def describe(self, call) -> Description:
        inversions = [{"name": i.name, "hash": i.hash} for i in self.used]
        infotext = {"Clip skip": self.clip_skip if self.clip_skip > 1 else None}
        if inversions:
            infotext["TI hashes"] = ", ".join(f"{i['name']}: {i['hash']}" for i in inversions)
        info = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "textual_inversions": inversions,
                "clip_skip": self.clip_skip}  # fmt: skip
        return Description(info=info, infotext=infotext)


@dataclass
class TransformerPrompt(Conditioning):
    """SD 3.5 / FLUX: the pipeline encodes the texts itself; FLUX's true CFG reads the negative prompt."""

    kind = "prompt"

    prompt: str
    negative_prompt: str
    flux: bool
    true_cfg_scale: float

    def apply(self, call) -> None:
        if self.flux:
            call.kwargs |= {"prompt": self.prompt, "negative_prompt": self.negative_prompt or None,
                            "true_cfg_scale": self.true_cfg_scale}  # fmt: skip
        else:  # SD3 encodes "" for an empty one, as diffusers does
            call.kwargs |= {"prompt": self.prompt, "negative_prompt": self.negative_prompt}

    def describe(self, call) -> Description:
        info = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "textual_inversions": [],
                "clip_skip": 1}  # fmt: skip
        return Description(info=info)
