"""SD 3.5 and FLUX image prompts at real size, random weights: switching between the two adapters, and SigLIP's
embedding cache. Measured side by side in one run on this machine.

The transformers themselves (SD 3.5 Large: 8 B parameters, FLUX.1: 12 B) do not fit 24 GiB in fp32, so the
adapter side is measured alone: each transformer is built on the meta device (its configuration and module tree,
no weights), which is all that building and attaching an IP-Adapter reads. The adapters and encoders are real
size: InstantX's SD3.5-Large-IP-Adapter layout (Resampler 1280 wide, 4 layers, 64 tokens; per joint block AdaLN,
to_k_ip / to_v_ip of 2432), SigLIP so400m (27 layers, 1152 wide, 384 px), XLabs' flux-ip-adapter (19 double
blocks, 4 tokens of 4096), CLIP ViT-L/14 (24 layers, 1024 wide, 768 projection).

1. Switch SD 3.5 -> FLUX -> SD 3.5 ... with one reference image each time:
   - diffusers' path (the only correct one when the encoder changes): the encoder (`from_pretrained`) and the
     adapter (`load_ip_adapter`) from disk, encode, `unload_ip_adapter()`;
   - the strongest baseline, a diffusers expert's script: each adapter and encoder loaded once into its own
     pipeline and kept (SD 3.5's pipeline holds one adapter at a time); a switch is the encode;
   - imprompt: both adapters built once and both encoders kept (what its caches hold after the first use):
     attach, then the encoder from memory (and, for a reference seen before, the embedding from its cache).
2. SigLIP so400m: encode one image vs the embedding-cache hit.

    python -m tools.bench_transformers --switches 6 --out docs/transformers-benchmark.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")  # fmt: skip
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # fmt: skip
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)  # fmt: skip


def write_models(folder: Path) -> None:
    """Real-size random weights, in the published on-disk layouts (fp16, as published), once."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from imprompt.demo.tiny_dits import write_flux_adapter, write_sd3_adapter

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "sd35" / "image_encoder" / "model.safetensors").is_file():
        SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)).half().save_pretrained(folder / "sd35" / "image_encoder")
        SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(folder / "sd35" / "image_encoder")
    if not (folder / "flux" / "image_encoder" / "model.safetensors").is_file():
        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  projection_dim=768, image_size=224, patch_size=14, hidden_act="quick_gelu")  # fmt: skip
        CLIPVisionModelWithProjection(config).half().save_pretrained(folder / "flux" / "image_encoder")
        CLIPImageProcessor(size=224, crop_size=224).save_pretrained(folder / "flux" / "image_encoder")
    if not (folder / "sd35" / "ip-adapter.safetensors").is_file():
        with torch.device("meta"):
            config = dict(SD3Transformer2DModel(**SD35_LARGE).config)
        write_sd3_adapter(folder / "sd35" / "ip-adapter.safetensors", config, hidden_dim=1280, tokens=64,
                          timestep_dim=320)  # fmt: skip
    if not (folder / "flux" / "ip_adapter.safetensors").is_file():
        with torch.device("meta"):
            config = dict(FluxTransformer2DModel(**FLUX_DEV).config)
        write_flux_adapter(folder / "flux" / "ip_adapter.safetensors", config, tokens=4)


def meta_pipelines():
    """StableDiffusion3Pipeline and FluxPipeline around transformers on the meta device (no other component)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    with torch.device("meta"):
        sd3, flux = SD3Transformer2DModel(**SD35_LARGE), FluxTransformer2DModel(**FLUX_DEV)
    none = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    scheduler = FlowMatchEulerDiscreteScheduler()
    return (StableDiffusion3Pipeline(transformer=sd3, scheduler=scheduler, text_encoder_3=None, tokenizer_3=None, **none),
            FluxPipeline(transformer=flux, scheduler=scheduler, **none))  # fmt: skip


def load_with_diffusers(pipe, folder: Path, family: str) -> None:
    """What a diffusers user runs to put an adapter and its encoder on a pipeline: the encoder and its processor
    with `from_pretrained` (as diffusers' SD 3.5 / FLUX docs do: here also because `load_ip_adapter` would move a
    loaded encoder to the pipeline's device, which is the meta device of these weightless transformers), then
    `load_ip_adapter` for the adapter file."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, SiglipImageProcessor, SiglipVisionModel

    encoder_folder = folder / family / "image_encoder"
    if family == "sd35":
        pipe.register_modules(image_encoder=SiglipVisionModel.from_pretrained(encoder_folder, dtype=torch.float32).eval(),
                              feature_extractor=SiglipImageProcessor.from_pretrained(encoder_folder))  # fmt: skip
        pipe.load_ip_adapter(str(folder / "sd35"), weight_name="ip-adapter.safetensors", subfolder="",
                             image_encoder_folder=None, low_cpu_mem_usage=False)  # fmt: skip
    else:
        pipe.register_modules(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_folder, dtype=torch.float32).eval(),
            feature_extractor=CLIPImageProcessor.from_pretrained(encoder_folder))  # fmt: skip
        pipe.load_ip_adapter(str(folder / "flux"), weight_name="ip_adapter.safetensors",
                             image_encoder_pretrained_model_name_or_path=None, low_cpu_mem_usage=False)  # fmt: skip


def encode_with(pipe, family: str, image):
    with torch.no_grad():
        if family == "sd35":
            return pipe.encode_image(image, torch.device("cpu"))
        return pipe.encode_image(image, torch.device("cpu"), 1)


def diffusers_switches(folder: Path, image, switches: int) -> list[float]:
    """diffusers' documented path at each switch: load the encoder and the adapter, encode the reference through
    the pipeline's encoder, `unload_ip_adapter()` (which drops the encoder too)."""
    pipes = dict(zip(("sd35", "flux"), meta_pipelines()))
    times = []
    for i in range(switches):
        family = ("sd35", "flux")[i % 2]
        started = time.perf_counter()
        load_with_diffusers(pipes[family], folder, family)
        encode_with(pipes[family], family, image)
        pipes[family].unload_ip_adapter()
        times.append(time.perf_counter() - started)
    return times


def expert_switches(folder: Path, image, switches: int) -> list[float]:
    """The strongest baseline: a diffusers expert's script that loads each adapter (and its encoder) once into its
    own pipeline and keeps both; a switch is then the encode of the reference through the other pipeline's encoder."""
    pipes = dict(zip(("sd35", "flux"), meta_pipelines()))
    for family, pipe in pipes.items():
        load_with_diffusers(pipe, folder, family)
    times = []
    for i in range(switches):
        family = ("sd35", "flux")[i % 2]
        started = time.perf_counter()
        encode_with(pipes[family], family, image)
        times.append(time.perf_counter() - started)
    return times


def imprompt_switches(folder: Path, image, switches: int) -> tuple[list[float], list[float], dict]:
    """imprompt's components: each adapter built once (the adapter cache), each encoder loaded once (the encoder
    cache), embeddings kept (the embedding cache). Returns per-switch times with the embedding computed (a new
    reference) and from the cache (the same reference again), and the one-off costs."""
    from imprompt.ipadapter.build import load_adapter_state_dict
    from imprompt.ipadapter.dit import AttachedTransformerAdapters, build_transformer_adapter
    from imprompt.ipadapter.embeddings import ImageEmbedder
    from imprompt.models.store import ModelStore

    store = ModelStore([str(folder)])
    sd3, flux = meta_pipelines()
    sides = {}
    started = time.perf_counter()
    for name, pipe, arch in (("sd35", sd3, "sd3"), ("flux", flux, "flux")):
        entry = store.adapter(str(folder / name / ("ip-adapter.safetensors" if name == "sd35" else "ip_adapter.safetensors")))
        built = build_transformer_adapter(entry.spec, load_adapter_state_dict(entry.spec), pipe.transformer)
        sides[name] = (AttachedTransformerAdapters(pipe.transformer, arch), built, entry, store.encoder(str(folder / name / "image_encoder")))
    build_s = time.perf_counter() - started
    embedder = ImageEmbedder(torch.device("cpu"), torch.float32, 2**40, 2**40)
    started = time.perf_counter()
    for name, (_, _, entry, encoder) in sides.items():
        output = "hidden_states" if name == "sd35" else "image_embeds"
        embedder.embed(encoder, output, [image], name, "bench", [], unconditional_kind="zeros")
    first_encode_s = time.perf_counter() - started

    def switch(i: int, fresh: bool) -> float:
        name = ("sd35", "flux")[i % 2]
        attached, built, entry, encoder = sides[name]
        output = "hidden_states" if name == "sd35" else "image_embeds"
        if fresh:
            embedder.embeddings.clear()
        started = time.perf_counter()
        attached.attach([built], (entry.path,))
        embedder.embed(encoder, output, [image], name, "bench", [], unconditional_kind="zeros")
        seconds = time.perf_counter() - started
        attached.attach([], ())  # the next request for this family may bring another set
        return seconds

    encoded = [switch(i, fresh=True) for i in range(switches)]
    for i in range(2):  # the reference's embedding for each family in the cache, as after a first request
        switch(i, fresh=False)
    cached = [switch(i, fresh=False) for i in range(switches)]
    return encoded, cached, {"build_both_adapters_s": round(build_s, 3), "load_both_encoders_and_encode_s": round(first_encode_s, 3)}


def siglip_cache(folder: Path, image, repeats: int) -> dict:
    from imprompt.ipadapter.embeddings import ImageEmbedder
    from imprompt.models.store import ModelStore

    encoder = ModelStore([str(folder)]).encoder(str(folder / "sd35" / "image_encoder"))
    embedder = ImageEmbedder(torch.device("cpu"), torch.float32, 2**40, 2**40)
    embedder.embed(encoder, "hidden_states", [image], "sd35", "bench", [], unconditional_kind="zeros")  # load
    encode, hit = [], []
    for _ in range(repeats):
        embedder.embeddings.clear()
        started = time.perf_counter()
        embedder.embed(encoder, "hidden_states", [image], "sd35", "bench", [], unconditional_kind="zeros")
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        embedder.embed(encoder, "hidden_states", [image], "sd35", "bench", [], unconditional_kind="zeros")
        hit.append(time.perf_counter() - started)
    return {"encode_s": statistics.median(encode), "cache_hit_s": statistics.median(hit)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / ".bench-cache" / "transformers-real")
    parser.add_argument("--switches", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / ".bench-cache" / "transformers-benchmark.json")
    args = parser.parse_args(argv)
    from imprompt.demo.tiny_models import draw_reference

    torch.manual_seed(0)
    write_models(args.models)
    image = draw_reference("circle", (220, 40, 40), (40, 70, 210), size=512)
    theirs = diffusers_switches(args.models, image, args.switches)
    expert = expert_switches(args.models, image, args.switches)
    encoded, cached, once = imprompt_switches(args.models, image, args.switches)
    siglip = siglip_cache(args.models, image, 3)
    med = statistics.median

    def by_family(times):  # even switches go to SD 3.5, odd ones to FLUX
        return {"to_sd35_s": round(med(times[0::2]), 5), "to_flux_s": round(med(times[1::2]), 5)}

    rows = {"diffusers_reload": theirs, "expert_script": expert, "imprompt_encoded": encoded, "imprompt_cached_embedding": cached}
    results = {
        "switch_s": {name: [round(t, 5) for t in times] for name, times in rows.items()},
        "switch_median_by_family": {name: by_family(times) for name, times in rows.items()},
        "imprompt_one_off": once,
        "siglip_so400m": {k: round(v, 5) for k, v in siglip.items()}
        | {"ratio": round(siglip["encode_s"] / siglip["cache_hit_s"], 1)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")},  # fmt: skip
        "note": "transformers on the meta device: adapter and encoder side only (the denoiser does not fit in fp32)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    base = by_family(theirs)
    labels = {"diffusers_reload": "diffusers: encoder + load_ip_adapter from disk, encode, unload",
              "expert_script": "expert script: both pipelines keep adapter and encoder; encode",
              "imprompt_encoded": "imprompt: attach + encode (encoders kept)",
              "imprompt_cached_embedding": "imprompt: attach + embedding cache hit"}  # fmt: skip
    print("| switch, one reference image | to SD 3.5 (median) | to FLUX (median) | ratio to diffusers (SD 3.5 / FLUX) |")
    print("|---|---:|---:|---:|")
    for name, times in rows.items():
        m = by_family(times)
        print(f"| {labels[name]} | {m['to_sd35_s']:.3f} s | {m['to_flux_s']:.3f} s | "
              f"{base['to_sd35_s'] / m['to_sd35_s']:.1f}x / {base['to_flux_s'] / m['to_flux_s']:.1f}x |")
    print(f"SigLIP so400m, one 384-px image: encode {siglip['encode_s']:.2f} s, cache hit {siglip['cache_hit_s'] * 1000:.2f} ms")
    print(f"one-off: {once}; raw: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
