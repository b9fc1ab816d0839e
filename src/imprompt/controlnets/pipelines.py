"""The diffusers ControlNet pipeline a request runs: built over the resident model's own modules, for that request.

diffusers has a ControlNet twin of each pipeline imprompt runs (and of its image-to-image twin); `from_pipe` builds
it from the loaded components without copying any weight, so a request with ControlNet units costs no load, and a
request without them runs the model's own pipeline, untouched. The twin is not kept: it would hold the request's
ControlNets alive after the request.
"""

from __future__ import annotations

# (the model's pipeline class, union, image to image) -> diffusers' ControlNet pipeline class
CONTROLNET_PIPELINES = {
    ("StableDiffusionPipeline", False, False): "StableDiffusionControlNetPipeline",
    ("StableDiffusionPipeline", False, True): "StableDiffusionControlNetImg2ImgPipeline",
    ("StableDiffusionXLPipeline", False, False): "StableDiffusionXLControlNetPipeline",
    ("StableDiffusionXLPipeline", False, True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("StableDiffusionXLPipeline", True, False): "StableDiffusionXLControlNetUnionPipeline",
    ("StableDiffusionXLPipeline", True, True): "StableDiffusionXLControlNetUnionImg2ImgPipeline",
    ("StableDiffusion3Pipeline", False, False): "StableDiffusion3ControlNetPipeline",
    ("FluxPipeline", False, False): "FluxControlNetPipeline",
    ("FluxPipeline", True, False): "FluxControlNetPipeline",  # FLUX's union ControlNets take a mode per image
}


def controlnet_pipeline(pipeline, pipeline_class: str, union: bool, img2img: bool, controlnets: list):
    """The ControlNet pipeline over `pipeline`'s modules, with `controlnets` (one, or several as diffusers' multi
    model of that family)."""
    import diffusers

    name = CONTROLNET_PIPELINES[(pipeline_class, union, img2img)]
    cls = getattr(diffusers, name)
    controlnet = controlnets[0] if len(controlnets) == 1 else multi_controlnet(pipeline_class, union, controlnets)
    # diffusers' from_pipe casts every module to `torch_dtype` (float32 when not given), in place: the shared ones too
    twin = cls.from_pipe(pipeline, controlnet=controlnet, torch_dtype=pipeline.dtype)
    twin.set_progress_bar_config(disable=True)
    return twin


def multi_controlnet(pipeline_class: str, union: bool, controlnets: list):
    """Several ControlNets as the family's multi model (diffusers sums their residuals)."""
    from diffusers.models.controlnets import (
        FluxMultiControlNetModel,
        MultiControlNetModel,
        MultiControlNetUnionModel,
        SD3MultiControlNetModel,
    )

    if pipeline_class == "StableDiffusion3Pipeline":
        return SD3MultiControlNetModel(controlnets)
    if pipeline_class == "FluxPipeline":
        return FluxMultiControlNetModel(controlnets)
    return MultiControlNetUnionModel(controlnets) if union else MultiControlNetModel(controlnets)
