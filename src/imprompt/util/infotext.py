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


def image_fields(*, steps: int, sampler: str, schedule_type: str | None, cfg_scale: float, seed: int, width: int,
                 height: int, model_hash: str | None, model: str, denoising_strength: float | None, batch_size: int,
                 batch_pos: int, units: list[dict], clip_skip: int = 1, vae: dict | None = None,
                 loras: list[dict] = (), inversions: list[dict] = ()) -> dict:  # fmt: skip
    """The fields of one image, in A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash,
    Model, VAE hash, VAE, Denoising strength, Clip skip, Batch size/pos, Lora hashes, TI hashes), then imprompt's
    IP-Adapter units in SD.Next's form."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model,
        "VAE hash": vae["hash"] if vae else None,
        "VAE": vae["name"] if vae else None,
        "Denoising strength": denoising_strength,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Batch size": batch_size if batch_size > 1 else None,
        "Batch pos": batch_pos if batch_size > 1 else None,
    }
    if loras:  # A1111's form: "name: sha256[:12], ..." (the prompt keeps the <lora:...> tags)
        fields["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash']}" for lora in loras)
    if inversions:
        fields["TI hashes"] = ", ".join(f"{i['name']}: {i['hash']}" for i in inversions)
    if units:  # SD.Next's form: name:scale:start:end per unit, units separated by ';'
        fields["IP Adapter"] = ";".join(f"{u['adapter']}:{u['scale']}:{u['start']}:{u['end']}" for u in units)
        fields["IP Adapter encoders"] = ";".join(u["encoder"] for u in units)
    fields["Version"] = f"imprompt {__version__}"
    return fields


def png_info(parameters: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info
