"""A request's LoRA set: its `<lora:...>` tags and `loras` field, checked, then exactly what acts on the model.

Each LoRA is checked against the model from its tensors before anything loads. With the LoRAs any other
conditioning brings (FaceID adapters' own), the set is exactly what acts on the model during its call (none
included: what one request activated never reaches the next). Loading and switching are `loading/loras.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IncompatibleError, RequestError, UnsupportedError
from ..models.store import Entry, ModelStore
from ..prompting.syntax import take_lora_tags
from ..request import LORA_WEIGHT_RANGE, GenerateRequest
from . import Conditioning, Description, Preparation

UNREAD_LORA_FORMATS = {"lycoris-loha": "LyCORIS LoHa", "lycoris-lokr": "LyCORIS LoKr"}


@dataclass(frozen=True)
class LoraPlan:
    entry: Entry
    weight: float
    source: str  # "prompt" (a <lora:...> tag) or "loras" (the request field)


def plan(request: GenerateRequest, model: Entry, store: ModelStore) -> LoraSet:
    """The prompt's `<lora:...>` tags (`prompt.py` reads the text without them) and the `loras` field."""
    _, tags = take_lora_tags(request.prompt, "prompt")
    asked = [(tag.name, tag.weight, "prompt") for tag in tags] + [(lo.name, lo.weight, "loras") for lo in request.loras]
    loras = tuple(plan_lora(name, weight, source, store, model) for name, weight, source in asked)
    seen: dict = {}
    for lora in loras:
        if lora.entry.path in seen:
            raise RequestError(
                f"LoRA {lora.entry.name} is asked for twice ({seen[lora.entry.path].source} and {lora.source}); "
                f"give it once, with the weight you want"
            )
        seen[lora.entry.path] = lora
    return LoraSet(loras)


def plan_lora(name: str, weight: float, source: str, store: ModelStore, pipeline: Entry) -> LoraPlan:
    """Resolve one LoRA and check it against the model, from its tensors, before anything is loaded."""
    low, high = LORA_WEIGHT_RANGE
    if not low <= weight <= high:
        raise RequestError(f"LoRA {name}: weight {weight} is outside {low}..{high}; use a weight in that range")
    entry = store.lora(name)
    if entry.spec.format in UNREAD_LORA_FORMATS:
        raise UnsupportedError(
            f"LoRA {entry.name} ({entry.path.name}) is a {UNREAD_LORA_FORMATS[entry.spec.format]} file: diffusers, "
            f"whose loader imprompt uses, reads kohya / A1111 LoRAs (LoCon included) and diffusers / PEFT LoRAs for "
            f"SD 1.5, SDXL, SD 3.5 and FLUX.1 (and XLabs' for FLUX.1), not this format. Use a LoRA in one of those "
            f"formats"
        )  # fmt: skip
    if not lora_fits(entry, pipeline):
        fitting = sorted(e.name for e in store.of_kind("lora") if lora_fits(e, pipeline))
        raise IncompatibleError(
            f"LoRA {entry.name} ({entry.path.name}) is for {entry.spec.family} models ({_width_words(entry.spec)}), "
            f"but model {pipeline.name} is {pipeline.spec.family} ({_width_words(pipeline.spec)}). Use a LoRA made "
            f"for {pipeline.spec.family} ({', '.join(fitting) or 'none in the models folder'})"
        )
    refusal = quantized_lora_refusal(pipeline.spec)
    if refusal:
        raise UnsupportedError(f"LoRA {entry.name}: model {pipeline.name} {refusal}")
    return LoraPlan(entry, weight, source)


def lora_fits(lora: Entry, pipeline: Entry) -> bool:
    """A LoRA fits a model of its architecture whose width is the one it was trained for (a UNet's cross-attention
    width; a transformer's blocks' width). Unknown width, or diffusers' names that do not say SD 3.5 or FLUX: let
    diffusers try (a misfit is then a CheckpointError naming the file)."""
    spec, model = lora.spec, pipeline.spec
    if spec.architecture == "dit":
        if model.architecture not in ("sd3", "flux"):
            return False
    elif spec.architecture != model.architecture:
        return False
    return spec.width is None or spec.width == lora_width(model)


def lora_width(model) -> int | None:
    """The width a LoRA of this model's family reads: a UNet's cross-attention width; SD 3's blocks' width (its
    `cross_attention_dim`); FLUX's double-stream blocks' width (its `cross_attention_dim` is T5's)."""
    if model.architecture == "flux":
        return model.layer_widths[0] if model.layer_widths else None
    return model.cross_attention_dim


def _width_words(spec) -> str:
    if spec.kind == "lora":
        what = "cross-attention width" if spec.architecture == "unet" else "blocks' width"
        return f"{what} {spec.width}" if spec.width else f"{what} unknown"
    what = "cross-attention width" if spec.architecture == "unet" else "blocks' width"
    return f"{what} {lora_width(spec)}"


def quantized_lora_refusal(model) -> str | None:
    """Why LoRAs cannot act on this model's stored weights, or None. diffusers (through PEFT) adds LoRA layers
    beside GGUF-quantized and layerwise-cast (fp8 storage) linear layers and computes them in the compute dtype, so
    those take LoRAs; no other storage is refused today."""
    return None


@dataclass
class LoraSet(Conditioning):
    kind = "loras"

    loras: tuple[LoraPlan, ...]
    hashes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def prepare(self, prep: Preparation) -> None:
        """A1111's short hashes, for the infotext (computed once per file version, kept on disk)."""
        self.hashes = [prep.state.store.a1111_hash(lora.entry.path, 12) for lora in self.loras]

    def apply(self, call) -> None:
        """Exactly these LoRAs, and those the other conditionings added to the call, act (loaded where missing)."""
        from ..loading.loras import lora_file  # torch-heavy: imported where used, so planning stays light

        uses = [lora_file(lora.entry, lora.weight) for lora in self.loras]
        for use in call.lora_uses:  # two units of one FaceID adapter bring its LoRA once
            if use.key not in {u.key for u in uses}:
                uses.append(use)
        self.warnings = call.loaded.loras.activate(uses, call.events)
        if call.loaded.loras.eager_reason is not None:
            call.eager_reasons.append(call.loaded.loras.eager_reason)

    def batch_part(self) -> tuple | None:
        """A batch shares one LoRA set: the same files at the same weights, in the same order."""
        return tuple((lora.entry.key(), lora.weight) for lora in self.loras)

    def describe(self, call) -> Description:
        loras = [{"name": lora.entry.name, "weight": lora.weight, "source": lora.source, "file": str(lora.entry.path),
                  "hash": digest} for lora, digest in zip(self.loras, self.hashes)]  # fmt: skip
        infotext = {}
        if loras:  # A1111's form: "name: sha256[:12], ..." (the prompt keeps the <lora:...> tags)
            infotext["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in loras)
        # the prompt as A1111 would show it: LoRAs given as a field are written as tags, so that readers find them
        suffix = "".join(f" <lora:{lo.entry.name}:{lo.weight:g}>" for lo in self.loras if lo.source == "loras")
        return Description(info={"loras": loras}, infotext=infotext, prompt_suffix=suffix, warnings=self.warnings)
