"""A1111's "parameters" PNG text, which A1111, SD.Next, ComfyUI and civitai read back.

Written as A1111's `create_infotext` writes it: the prompt, `Negative prompt: ...` when there is one, then
`key: value` pairs in A1111's order, each value quoted as A1111's `quote` does (JSON, when it holds a comma, a
colon or a newline), so that A1111's own reader (`parse_generation_parameters`) gets every value back.
"""

from __future__ import annotations

import json

from PIL.PngImagePlugin import PngInfo

from .. import __version__


def quote(value) -> str:
    """A1111's rule: a value with a comma, a colon or a newline is written as a JSON string."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The infotext of one image. `fields` in A1111's order; None values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines).strip()


# A1111's order of the fields (`create_infotext`), then imprompt's IP-Adapter units in SD.Next's form
ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash", "VAE",
         "Denoising strength", "Clip skip", "Batch size", "Batch pos", "Lora hashes", "TI hashes", "IP Adapter",
         "IP Adapter encoders")  # fmt: skip


def image_fields(*, steps: int, sampler: str, schedule_type: str | None, cfg_scale: float, seed: int, width: int,
                 height: int, model_hash: str | None, model: str, batch_size: int, batch_pos: int,
                 described: dict) -> dict:  # fmt: skip
    """The fields of one image: those of every request, and `described` (the conditionings' own: VAE, Denoising
    strength, Clip skip, Lora hashes, TI hashes, IP Adapter...), in A1111's order (`ORDER`; fields it does not
    know come after), then the version."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
        **described,
    }
    rank = {name: i for i, name in enumerate(ORDER)}
    ordered = dict(sorted(fields.items(), key=lambda item: rank.get(item[0], len(ORDER))))
    ordered["Version"] = f"imprompt {__version__}"
    return ordered


def png_info(parameters: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info
