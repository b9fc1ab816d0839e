"""What A1111 computes for a prompt, written out for the tests from its rules, independent of imprompt's code:
texts through transformers' text encoders directly (75-token chunks, no weights or commas: the test prompts have
none), and a denoising loop written here step by step over diffusers' UNet and scheduler, which at each call reads
the conditionings the test says A1111 uses there, runs the negative and each part through the UNet on its own (at
its own length), and combines them as A1111's CFGDenoiser does: negative + Σ weight × cfg × (part − negative)."""

from __future__ import annotations

import torch

CHUNK = 75


def text_embeds(tokenizer, encoder, text: str, layer: int | None = None, normed: bool = False):
    """[1, 77 * chunks, width]: each 75 tokens between begin and end tokens, padded with the end token (SDXL's second
    tokenizer pads with its pad token after the first end); `layer`: that hidden state from the end (None: the
    output), through the final norm when `normed`. Also the pooled output of a projection model (else None)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = [ids[i : i + CHUNK] for i in range(0, max(len(ids), 1), CHUNK)] or [[]]
    outputs, pooled = [], None
    for n, piece in enumerate(pieces):
        row = [tokenizer.bos_token_id] + piece + [tokenizer.eos_token_id]
        fill = tokenizer.pad_token_id if tokenizer.pad_token_id not in (None, tokenizer.eos_token_id) else tokenizer.eos_token_id
        row += [fill] * (CHUNK + 2 - len(row))
        with torch.no_grad():
            out = encoder(torch.tensor([row]), output_hidden_states=True)
        if layer is None:
            z = out[0]
        else:
            z = out.hidden_states[-layer]
            if normed:
                z = encoder.text_model.final_layer_norm(z)
        outputs.append(z)
        if n == 0 and out[0].ndim == 2:
            pooled = out[0]
    return torch.cat(outputs, dim=1), pooled


def sd15_cond(pipe, text: str, clip_skip: int = 1):
    embeds, _ = text_embeds(pipe.tokenizer, pipe.text_encoder, text, None if clip_skip == 1 else clip_skip, True)
    return embeds, None


def sdxl_cond(pipe, text: str, clip_l_layer: int = 2):
    """A1111's SDXL reading: CLIP-L at `clip_l_layer` from the end (2 by default, whatever the clip skip), CLIP-G's
    penultimate layer, concatenated; the pooled vector of CLIP-G's first chunk."""
    first, _ = text_embeds(pipe.tokenizer, pipe.text_encoder, text, clip_l_layer)
    second, pooled = text_embeds(pipe.tokenizer_2, pipe.text_encoder_2, text, 2)
    return torch.cat([first, second], dim=-1), pooled


def denoise(pipe, conds_at, *, steps: int, cfg: float, seed: int, size: int = 64):
    """The image diffusers' Euler sampling gives when call i reads `conds_at(i) = (negative, [(part, weight), ...])`,
    each a (embeds, pooled) pair; every conditioning through the UNet on its own."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    unet, xl = pipe.unet, getattr(pipe, "text_encoder_2", None) is not None
    latents = torch.randn((1, unet.config.in_channels, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    def predict(x, t, cond):
        embeds, pooled = cond
        added = {"text_embeds": pooled, "time_ids": time_ids} if xl else None
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(latents, t)
        negative, parts = conds_at(i)
        uncond = predict(x, t, negative)
        noise = uncond + sum(weight * cfg * (predict(x, t, part) - uncond) for part, weight in parts)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
