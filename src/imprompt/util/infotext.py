"""A1111's "parameters" PNG text, which A1111, SD.Next, ComfyUI and civitai read back."""

from __future__ import annotations

from PIL.PngImagePlugin import PngInfo

from .. import __version__


def quote(value) -> str:
    """A1111 quotes values that contain its separators."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parameters_text(request, seed: int, width: int, height: int, sampler: str, model: str, units: list[dict]) -> str:
    """`units`: one dict per IP-Adapter unit with its display name, scale, start and end."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = {
        "Steps": request.steps,
        "Sampler": sampler,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    if request.batch_size > 1:
        fields["Batch size"] = request.batch_size
    if units:
        # SD.Next's form: name:scale:start:end per unit, units separated by ';'
        fields["IP Adapter"] = ";".join(f"{u['adapter']}:{u['scale']}:{u['start']}:{u['end']}" for u in units)
        fields["IP Adapter encoders"] = ";".join(u["encoder"] for u in units)
    fields["Version"] = f"imprompt {__version__}"
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def png_info(parameters: str) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info
