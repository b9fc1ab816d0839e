"""Trains the demo pack: a tiny SD 1.5-shaped pipeline and three IP-Adapters that draw the shapes of
`imprompt/demo/shapes.py`.

    python -m tools.training [--out src/imprompt/demo/weights] [--seed 0] [--effort 1.0]

Stages, each on the CPU of a small machine (about an hour in all on 2 cores; `--effort 0.1` for a try-out):

1. the VAE (64x64 RGB <-> 8x8x4 latents, as SD 1.5's factor 8), then every picture's latents once;
2. two image encoders with the real output widths (ViT-H's 1024 and ViT-bigG's 1280 projections, tiny inside),
   taught to tell shape and colours apart and then frozen, as CLIP is frozen for the real adapters;
3. UNet, text encoder and three IP-Adapters in one loop: a quarter of the steps on captions ("a red circle on
   a blue background", 10 % empty and 10 % neutral "a shape" so classifier-free guidance has a meaning), the
   rest through one adapter each with mostly empty prompts, so the picture has to come from the image: Base on
   the ViT-H-width encoder, Base ViT-G on the bigG-width one, Plus on the ViT-H-width encoder's penultimate
   hidden states. h94 trained its adapters on a frozen, finished UNet; a UNet this small learns to draw in the
   time it takes, so it learns the image pathway with the adapters instead of after them.

The real checkpoints' widths (768-wide text and cross-attention, 1024/1280 projections) would make even tiny
models tens of MB. Matrices that are wide only because of those widths are trained as rank-16 products
(`LowRankLinear`, `LowRankEmbedding`) and shipped as their two factors; `imprompt.demo.pack.build_demo_pack` multiplies them
out into the standard files (diffusers folders, transformers encoders, h94 adapters). Everything is seeded; a
rerun on the same machine and thread count gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imprompt.demo import shapes
from imprompt.ipadapter.build import BuiltAdapter, build_adapter

log = logging.getLogger("imprompt.training")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "imprompt" / "demo" / "weights"  # the source tree's
SIZE = 64

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1, norm_num_groups=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 64, 64),
)  # fmt: skip
UNET_CONFIG = dict(
    sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TEXT_CONFIG = dict(hidden_size=768, intermediate_size=128, num_hidden_layers=1, num_attention_heads=12,
                   max_position_embeddings=77)  # fmt: skip

# adapter file stem -> (variant, encoder, encoder output it consumes)
ADAPTERS = {
    "ip-adapter_sd15": ("base", "vit-h", "image_embeds"),
    "ip-adapter_sd15_vit-G": ("base", "vit-g", "image_embeds"),
    "ip-adapter-plus_sd15": ("plus", "vit-h", "hidden_states"),
}
RANK = 16
STEPS = {"vae": 2000, "encoder": 500, "unet and adapters": 4000}  # at --effort 1; batches 16, 48, 48
OFFSET_NOISE = 0.1  # Guttenberg's offset noise: lets the model choose flat colours (see _denoising_loss)


# ------------------------------------------------------------------------------------------ low-rank weights


class LowRankLinear(torch.nn.Module):
    """A Linear layer whose weight is `up @ down` (rank r), applied as two thin products: for the 768-wide
    text tokens this is what makes training fit a small CPU, not only what makes the files small."""

    def __init__(self, linear: torch.nn.Linear, rank: int):
        super().__init__()
        rows, cols = linear.weight.shape
        self.up = torch.nn.Parameter(torch.randn(rows, rank) / rank**0.5)
        self.down = torch.nn.Parameter(torch.randn(rank, cols) * float(linear.weight.detach().std()))
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the weight (diffusers' ImageProjection reads its dtype)
        return self.up @ self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)


class LowRankEmbedding(torch.nn.Module):
    """An Embedding whose table is `up @ down` (rank r)."""

    def __init__(self, embedding: torch.nn.Embedding, rank: int):
        super().__init__()
        rows, cols = embedding.weight.shape
        self.up = torch.nn.Parameter(torch.randn(rows, rank) / rank**0.5)
        self.down = torch.nn.Parameter(torch.randn(rank, cols) * float(embedding.weight.detach().std()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.up) @ self.down


def low_rank(module: torch.nn.Module, rank: int = RANK) -> torch.nn.Module:
    """The low-rank stand-in for a Linear or Embedding, at the replaced weight's scale."""
    if isinstance(module, torch.nn.Embedding):
        return LowRankEmbedding(module, rank)
    return LowRankLinear(module, rank)


def replace_low_rank(model: torch.nn.Module, names: list[str], rank: int = RANK) -> None:
    for name in names:
        model.set_submodule(name, low_rank(model.get_submodule(name), rank))


def factored_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each low-rank weight as `<module>.weight:up` and `<module>.weight:down`, the form
    `pack.expand_factors` multiplies out."""
    factored = {name for name, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))}
    state = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")  # owner "" when `model` is itself a low-rank module
        weight = f"{owner}.weight" if owner else "weight"
        state[f"{weight}:{leaf}" if owner in factored and leaf in ("up", "down") else key] = tensor
    return state


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)


# ------------------------------------------------------------------------------------------------- the data


class Data:
    """The training pictures as tensors, drawn once: pixels in [-1, 1], caption token ids, the scenes."""

    def __init__(self, count: int, seed: int, tokenizer):
        self.scenes = shapes.scenes(count, seed)
        self.images = [shapes.draw(scene, SIZE) for scene in self.scenes]
        pixels = torch.stack([torch.from_numpy(np.asarray(image).copy()) for image in self.images])
        self.pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
        self.tokenizer = tokenizer
        self.caption_ids = self.tokens([scene.caption for scene in self.scenes])
        self.empty_ids, self.neutral_ids = self.tokens([""]), self.tokens([shapes.NEUTRAL_PROMPT])

    def tokens(self, texts: list[str]) -> torch.Tensor:
        """Token ids exactly as StableDiffusionPipeline makes them (padded to 77, truncated)."""
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def prompt_ids(self, index: torch.Tensor, generator: torch.Generator, weights: tuple[float, float, float]):
        """Per picture: its caption, the empty prompt or the neutral one, drawn with `weights`."""
        choice = torch.multinomial(torch.tensor(weights), len(index), replacement=True, generator=generator)
        ids = self.caption_ids[index].clone()
        ids[choice == 1] = self.empty_ids[0]
        ids[choice == 2] = self.neutral_ids[0]
        return ids


def batches(count: int, size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, count, (size,), generator=generator)


def optimise(name: str, parameters, steps: int, lr: float, loss_of_batch, batch_indices) -> None:
    """AdamW with a short warm-up and cosine decay; logs the running loss ten times per stage."""
    parameters = [p for p in parameters if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item())
    )
    started, running = time.perf_counter(), None
    for step, index in enumerate(batch_indices, start=1):
        loss = loss_of_batch(index)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % max(1, steps // 10) == 0 or step == steps:
            log.info("%s: step %d/%d, loss %.4f, %.0f s", name, step, steps, running, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ the stages


def train_vae(data: Data, steps: int, generator: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)

    def loss(index):
        x = data.pixels[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(reconstruction, x) + 0.5 * F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

    optimise("vae", vae.parameters(), steps, 2e-3, loss, batches(len(data.pixels), 16, steps, generator))
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in data.pixels.split(256)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))  # unit-variance latents, as SD's 0.18215
    log.info("vae: latent scaling factor %s", vae.config.scaling_factor)
    return vae, latents * vae.config.scaling_factor


def train_unet_and_adapters(data: Data, latents: torch.Tensor, conditions: dict, steps: int, generator: torch.Generator):
    """UNet, text encoder and the three adapters in one loop. Each step is a caption step (no adapter: the UNet
    learns to draw what the text says) or one adapter's step (prompts mostly empty: the picture has to come from
    the reference through that adapter's layers). `conditions[stem]` is (embeddings of every picture, negative)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from imprompt.ipadapter.attach import AttachedAdapters

    tokenizer = data.tokenizer
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG,
    ))  # fmt: skip
    replace_low_rank(text_encoder, text_low_rank_names(text_encoder))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    replace_low_rank(unet, unet_low_rank_names(unet))
    slots = AttachedAdapters(unet)
    adapters = {stem: new_adapter(stem, unet, slots, embeds.shape[-1]) for stem, (embeds, _) in conditions.items()}
    noise_schedule = training_noise_schedule()
    modes = [None, *adapters]  # None: a caption step

    def loss(index):
        mode = modes[int(torch.randint(len(modes), (1,), generator=generator))]
        if mode is None:
            slots.attach([], ())
            ids, conditioning = data.prompt_ids(index, generator, (0.8, 0.1, 0.1)), None
        else:
            slots.attach([adapters[mode]], ("training", mode))
            slots.set_scales([1.0], [(1.0,) * len(slots.cross_attention)])
            ids = data.prompt_ids(index, generator, (0.2, 0.6, 0.2))
            embeds, negative = conditions[mode]
            image = embeds[index].clone()
            dropped = torch.rand(len(index), generator=generator) < 0.1  # the negative branch of CFG, as in h94
            image[dropped] = negative
            conditioning = {"image_embeds": [image.unsqueeze(1)]}
        return _denoising_loss(unet, noise_schedule, latents[index], encode_text(text_encoder, ids), generator, conditioning)

    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    for adapter in adapters.values():
        parameters += list(adapter.image_projection.parameters())
        parameters += [p for layer in adapter.to_k_ip + adapter.to_v_ip for p in layer.parameters()]
    optimise("unet and adapters", parameters, steps, 1e-3, loss, batches(len(latents), 48, steps, generator))
    slots.attach([], ())
    frozen = [model.eval().requires_grad_(False) for model in (unet, text_encoder)]
    return *frozen, adapters


def encode_text(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's output for each row of `ids`, computing each distinct prompt once (a batch holds a
    few dozen of the 122 possible prompts)."""
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    # index_select, not [inverse]: the backward of advanced indexing adds repeated rows in thread order, so two
    # runs on 2 threads drifted apart; index_select's backward is deterministic (measured: identical weights)
    return text_encoder(unique)[0].index_select(0, inverse)


def unet_low_rank_names(unet) -> list[str]:
    """The UNet's projections of the 768-wide text tokens."""
    return [name for name, _ in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]


def text_low_rank_names(text_encoder) -> list[str]:
    """Every 768-wide matrix of the text encoder (its layers and token table); position embeddings stay whole."""
    return [name for name, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) or name.endswith("token_embedding")]  # fmt: skip


def training_noise_schedule():
    """DDPM noise levels identical to the pipeline's scheduler (SD 1.5's scaled-linear betas)."""
    from diffusers import DDPMScheduler

    from imprompt.demo.tiny_models import sd15_scheduler

    return DDPMScheduler.from_config(sd15_scheduler().config)


def _denoising_loss(unet, noise_schedule, latents, text, generator, added_cond_kwargs=None):
    """Epsilon-prediction loss with Min-SNR-5 weighting (Hang et al. 2023), which converges several times faster
    than the plain loss: nearly clean timesteps, where predicting the noise is easy and uninformative, count less."""
    noise = torch.randn(latents.shape, generator=generator)
    # SD 1.5's last noise level keeps a trace of each channel's mean, so a model trained on plain noise takes an
    # image's overall colour from the starting noise; a shared offset per channel teaches it to set the colour
    noise += OFFSET_NOISE * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
    timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = noise_schedule.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs).sample
    alpha = noise_schedule.alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    weight = torch.clamp(snr, max=5.0) / snr
    return (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()


def train_encoder(name: str, data: Data, pixels: torch.Tensor, steps: int, generator: torch.Generator):
    """A CLIP vision tower with the real projection width, taught shape, colour and background with a linear
    read-out of its image embedding; the read-out is thrown away and the tower frozen."""
    from transformers import CLIPVisionModelWithProjection

    from imprompt.demo.tiny_models import TINY_ENCODERS, clip_vision_config

    encoder = CLIPVisionModelWithProjection(clip_vision_config(**TINY_ENCODERS[name]))
    groups = [shapes.SHAPES, sorted(shapes.PALETTE), sorted(shapes.PALETTE)]
    labels = torch.tensor([[groups[0].index(s.shape), groups[1].index(s.colour), groups[2].index(s.background)]
                           for s in data.scenes])  # fmt: skip
    readout = torch.nn.Linear(encoder.config.projection_dim, sum(len(g) for g in groups))

    def loss(index):
        logits = readout(encoder(pixels[index].float()).image_embeds).split([len(g) for g in groups], dim=1)
        return sum(F.cross_entropy(part, labels[index, i]) for i, part in enumerate(logits))

    parameters = list(encoder.parameters()) + list(readout.parameters())
    optimise(f"encoder {name}", parameters, steps, 1e-3, loss, batches(len(pixels), 48, steps, generator))
    return encoder.eval().requires_grad_(False)


def encode(encoder, pixels: torch.Tensor, output: str) -> torch.Tensor:
    """What the engine hands an adapter: image_embeds, or the penultimate hidden states."""
    with torch.no_grad():
        if output == "image_embeds":
            return torch.cat([encoder(chunk.float()).image_embeds for chunk in pixels.split(128)])
        return torch.cat([encoder(chunk.float(), output_hidden_states=True).hidden_states[-2] for chunk in pixels.split(128)])


def new_adapter(stem: str, unet, slots, embed_dim: int):
    """An h94 adapter for `unet`, ready to train: the image projection (Base's low-rank) and each layer's
    to_k_ip/to_v_ip, which start as copies of the layer's text projections, as h94's training starts."""
    from imprompt.demo.tiny_models import adapter_tensors, cross_attention_widths
    from imprompt.models.specs import AdapterSpec

    variant = ADAPTERS[stem][0]
    widths = cross_attention_widths(unet)
    state = adapter_tensors(variant, embed_dim, widths, 768, seed=list(ADAPTERS).index(stem), dtype=torch.float32)
    tokens = 4 if variant == "base" else 16
    spec = AdapterSpec(stem, variant, "image_embeds" if variant == "base" else "hidden_states", embed_dim, tokens,
                       768, tuple(widths))  # fmt: skip
    adapter = build_adapter(spec, state, unet)
    adapter.image_projection.requires_grad_(True)
    if variant == "base":  # 3072 x 1024 (or 1280) because of the real widths
        adapter.image_projection.image_embeds = low_rank(adapter.image_projection.image_embeds, 2 * RANK)
    adapter.to_k_ip = [copy.deepcopy(layer.to_k).requires_grad_(True) for layer in slots.cross_attention]
    adapter.to_v_ip = [copy.deepcopy(layer.to_v).requires_grad_(True) for layer in slots.cross_attention]
    return adapter


# --------------------------------------------------------------------------------------- saving in h94 format


def h94_state_dict(adapter: BuiltAdapter, state_of=lambda module: module.state_dict()) -> dict[str, torch.Tensor]:
    """The inverse of `build_adapter` for Base and Plus adapters: the modules' tensors under the flat h94 key
    names (`image_proj.*`, `ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`), for saving trained adapters.
    `state_of(module)` gives a module's tensors (training passes one that keeps low-rank weights as factors)."""
    tensors = {f"image_proj.{k}": v.detach() for k, v in h94_image_proj(state_of(adapter.image_projection)).items()}
    for j, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        for name, layer in (("to_k_ip", k), ("to_v_ip", v)):
            tensors |= {f"ip_adapter.{2 * j + 1}.{name}.{key}": t.detach() for key, t in state_of(layer).items()}
    return tensors


def h94_image_proj(projection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' image-projection state dict (ImageProjection or IPAdapterPlusImageProjection) under h94's names,
    undoing `_convert_ip_adapter_image_proj_to_diffusers`."""
    if any(k.startswith("image_embeds.") for k in projection):  # ImageProjection: h94's "proj" renamed
        return {k.replace("image_embeds.", "proj.", 1): v for k, v in projection.items()}
    if "latents" not in projection:
        raise ValueError(f"only Base and Plus projections can be saved in the h94 layout, not {sorted(projection)[:4]}")
    renamed = {
        "ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
        "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight", "attn.to_out.0.weight": "0.to_out.weight",
        "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias", "ff.1.net.0.proj.weight": "1.1.weight",
        "ff.1.net.2.weight": "1.3.weight",
    }  # fmt: skip
    proj = {}
    for key, value in projection.items():
        parts = key.split(".")
        if parts[0] != "layers":
            proj[key] = value
            continue
        layer, rest = f"layers.{parts[1]}", ".".join(parts[2:])
        if rest == "attn.to_k.weight":  # h94's Resampler has one to_kv; diffusers splits it
            proj[f"{layer}.0.to_kv.weight"] = torch.cat([value, projection[f"{layer}.attn.to_v.weight"]])
        elif rest != "attn.to_v.weight":
            proj[f"{layer}.{renamed[rest]}"] = value
    return proj


# ---------------------------------------------------------------------------------------------------- main


def train(out: Path, seed: int = 0, effort: float = 1.0, pictures: int = 3000) -> dict:
    """All stages, each with a random stream of its own; writes the weights and training.json into `out`."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from imprompt.demo.tiny_models import write_tokenizer

    steps = {k: max(1, round(v * effort)) for k, v in STEPS.items()}
    report = {"seconds": {}}
    write_tokenizer(out / "tokenizer")
    data = Data(pictures, seed, CLIPTokenizer.from_pretrained(out / "tokenizer"))

    clock = time.perf_counter()
    vae, latents = train_vae(data, steps["vae"], stage_generator(seed, "vae"))
    save(out / "vae.safetensors", vae.state_dict(), {"config": json.dumps(diffusers_config(vae))})
    report["seconds"]["vae"] = round(time.perf_counter() - clock, 1)

    processor = CLIPImageProcessor(size=224, crop_size=224)  # what the engine uses for encoders without their own
    pixels = torch.cat([processor(images=chunk, return_tensors="pt").pixel_values.half()
                        for chunk in _chunks(data.images, 100)])  # fmt: skip
    encoders = {}
    for name in ("vit-h", "vit-g"):
        clock = time.perf_counter()
        encoders[name] = train_encoder(name, data, pixels, steps["encoder"], stage_generator(seed, f"encoder {name}"))
        save(out / f"image_encoder_{name}.safetensors", encoders[name].state_dict(),
             {"config": encoders[name].config.to_json_string()})  # fmt: skip
        report["seconds"][f"encoder {name}"] = round(time.perf_counter() - clock, 1)

    clock = time.perf_counter()
    zero = torch.zeros(1, 3, 224, 224)
    conditions = {}
    for stem, (variant, encoder_name, output) in ADAPTERS.items():
        encoder = encoders[encoder_name]
        embeds = encode(encoder, pixels, output)
        conditions[stem] = embeds, torch.zeros_like(embeds[0]) if output == "image_embeds" else encode(encoder, zero, output)[0]
    unet, text_encoder, adapters = train_unet_and_adapters(data, latents, conditions, steps["unet and adapters"],
                                                           stage_generator(seed, "unet and adapters"))  # fmt: skip
    save(out / "unet.safetensors", factored_state(unet), {"config": json.dumps(diffusers_config(unet))})
    save(out / "text_encoder.safetensors", factored_state(text_encoder), {"config": text_encoder.config.to_json_string()})
    for stem, adapter in adapters.items():
        metadata = {"format": "pt", "encoder": ADAPTERS[stem][1]}
        save(out / f"{stem}.safetensors", h94_state_dict(adapter, factored_state), metadata)
    report["seconds"]["unet and adapters"] = round(time.perf_counter() - clock, 1)
    report.update({"seed": seed, "effort": effort, "pictures": pictures, "steps": steps, "threads": torch.get_num_threads()})
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def diffusers_config(model) -> dict:
    """A diffusers model's config to save beside its weights, without `_use_default_values`: from_config would
    otherwise reset the values set after construction (the VAE's fitted scaling factor) to their defaults."""
    return {k: v for k, v in model.config.items() if k != "_use_default_values"}


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """A random stream of the stage's own (and the global seed for its initial weights)."""
    number = zlib.crc32(f"{seed}/{stage}".encode())
    torch.manual_seed(number)
    return torch.Generator().manual_seed(number)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.training", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the weights go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--effort", type=float, default=1.0, help="multiplies every stage's steps (0.1: a try-out)")
    parser.add_argument("--pictures", type=int, default=3000, help="training pictures drawn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from imprompt.cli import quiet_libraries

    quiet_libraries()
    print(json.dumps(train(args.out, args.seed, args.effort, args.pictures), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
