"""Tiny SD 3.5- and FLUX-shaped models, built offline in their real on-disk formats, and their image prompts.

Real block structure (SD3's joint transformer blocks with RMS q/k norms as SD 3.5 has them; FLUX's double- and
single-stream blocks with guidance embedding), 16-channel VAEs, tiny widths. The encoders keep the outputs the
adapters read at their real widths: SigLIP so400m's 1152-wide hidden states, CLIP ViT-L's 768-wide `image_embeds`.
The adapters are written under their publishers' key names (InstantX's `SD3.5-Large-IP-Adapter`, XLabs'
`flux-ip-adapter`), so diffusers' own `load_ip_adapter` reads them, which is what the tests compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .tiny_models import write_tokenizer

SIGLIP_WIDTH = 1152  # google/siglip-so400m-patch14-384's hidden size
VIT_L_PROJECTION = 768  # openai/clip-vit-large-patch14's image_embeds
TINY_SIGLIP = dict(hidden_size=SIGLIP_WIDTH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=16,
                   image_size=56, patch_size=14)  # fmt: skip
TINY_VIT_L = dict(hidden_size=48, projection_dim=VIT_L_PROJECTION, num_layers=3, heads=4)


# each family's VAE latent normalisation (scaling_factor, shift_factor), as their published configs have them
SD3_VAE_FACTORS = (1.5305, 0.0609)
FLUX_VAE_FACTORS = (0.3611, 0.1159)


def _vae(seed: int, factors: tuple[float, float]):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=16,  # SD 3 and FLUX VAEs: 16 latent channels
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=factors[0],
        shift_factor=factors[1],
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_text(tokenizer, hidden: int, projection: int | None, seed: int, act: str = "quick_gelu"):
    """A CLIP text tower by CLIP's conventions (64 channels per head, at least one), so a single file written from
    it reads back with the same configuration."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, projection_dim=projection or hidden,
        hidden_act=act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build_sd3_pipeline(folder: Path, seed: int = 11, heads: int = 4, head_dim: int = 8, layers: int = 3,
                       clip_vocabulary: bool = False, clip_widths: tuple[int, int] = (32, 48)):  # fmt: skip
    """A StableDiffusion3Pipeline folder as SD 3.5 Large has it (qk RMS norms, two CLIP text towers of different
    widths: CLIP-L's pooled output unprojected, bigG's with GELU), saved without T5 (`text_encoder_3: [null, null]`),
    as diffusers allows: prompts run through the CLIP towers alone. `clip_vocabulary`: CLIP's real tokenizer, as
    single files get it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer(folder / sub, clip_vocabulary, pad="!" if sub == "tokenizer_2" else "<|endoftext|>")
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(folder / s) for s in ("tokenizer", "tokenizer_2"))
    clip_l, clip_g = clip_widths  # CLIP-L and bigG: 768 and 1280 wide in SD 3
    text_encoder = _clip_text(tokenizer, clip_l, clip_l, seed + 2)
    with torch.no_grad():  # SD 3 reads CLIP-L's pooled output unprojected (diffusers' single-file loader: identity)
        text_encoder.text_projection.weight.copy_(torch.eye(clip_l))
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=clip_l + clip_g,  # the CLIP towers' hidden states side by side (T5's width with T5)
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_l + clip_g,  # the two pooled CLIP outputs
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 1, SD3_VAE_FACTORS),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer_2, clip_g, clip_g, seed + 3, act="gelu"),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def write_t5_tokenizer(folder: Path) -> None:
    """A T5TokenizerFast built offline: a Unigram vocabulary of the demo words and single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    from .tiny_models import DEMO_WORDS

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in DEMO_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.()"]
    pieces += [("\u2581", -3.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    fast = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, pad_token="<pad>",
                           eos_token="</s>", unk_token="<unk>", model_max_length=512)  # fmt: skip
    fast.save_pretrained(folder)


def build_flux_pipeline(folder: Path, seed: int = 21, heads: int = 1, head_dim: int = 32, double: int = 2,
                        single: int = 1, t5_width: int = 32, clip_vocabulary: bool = False):  # fmt: skip
    """A FluxPipeline folder with FLUX.1-dev's structure (double- then single-stream blocks, guidance embedding,
    CLIP-L pooled text + T5 tokens, rotary axes splitting each head as FLUX.1's 16/56/56 of 128 do), tiny widths
    (`t5_width` 4096 is FLUX's own, for adapters at full width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer", clip_vocabulary)
    write_t5_tokenizer(folder / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip_width = 32
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2 x 2
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    )
    torch.manual_seed(seed + 4)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id,
                                 eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))  # fmt: skip
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(seed + 1, FLUX_VAE_FACTORS),
        text_encoder=_clip_text(tokenizer, clip_width, None, seed + 2),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def build_siglip_vision(target: Path, seed: int = 31, single_file: bool = False, dtype=torch.float16, **shape):
    """A SigLIP vision tower with so400m's 1152-wide hidden states, layers and image size tiny, under the key names
    of the published files (`vision_model.*`): a folder (config.json, model.safetensors, preprocessor_config.json,
    as google/siglip-so400m-patch14-384 has them) or, with `single_file`, one .safetensors (ComfyUI's clip_vision/)
    carrying its config as metadata. Stored in fp16, as the published files are."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**{**TINY_SIGLIP, **shape})
    torch.manual_seed(seed)
    model = SiglipVisionModel(config).eval()
    model = model.to(dtype)
    state = {f"vision_model.{k.removeprefix('vision_model.')}": v.contiguous() for k, v in model.state_dict().items()}
    target = Path(target)
    if single_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(target), metadata={"format": "pt", "config": config.to_json_string()})
        return model
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(target)
    side = config.image_size
    SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(target)
    return model


def write_sd3_adapter(path: Path, transformer_config: dict, seed: int = 41, embed_dim: int = SIGLIP_WIDTH,
                      hidden_dim: int = 64, tokens: int = 8, depth: int = 4, timestep_dim: int = 32):  # fmt: skip
    """An InstantX SD3.5-Large-IP-Adapter file: `image_proj.*` (its Resampler, under InstantX's own layer names) and
    `ip_adapter.<block>.*` (per joint block: AdaLN of the time embedding, to_k_ip / to_v_ip, q/k RMS norms)."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    torch.manual_seed(seed)
    projection = IPAdapterTimeImageProjection(embed_dim=embed_dim, output_dim=inner, hidden_dim=hidden_dim,
                                              depth=depth, heads=hidden_dim // 64, num_queries=tokens,
                                              timestep_in_dim=timestep_dim)  # fmt: skip
    tensors = {}
    for key, value in projection.state_dict().items():
        if key.startswith("layers."):  # diffusers' names -> InstantX's (the inverse of diffusers' converter)
            i = key.split(".")[1]
            for ours, theirs in (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"),
                                 ("attn.to_kv", "0.to_kv"), ("attn.to_out.0", "0.to_out"),
                                 ("adaln_norm", "1.0"), ("ff.net.0.proj", "1.1"), ("ff.net.2", "1.3"),
                                 ("adaln_proj", "2.1")):  # fmt: skip
                key = key.replace(f"layers.{i}.{ours}.", f"layers.{i}.{theirs}.")
        tensors[f"image_proj.{key}"] = _perturbed(value)
    for block in range(transformer_config["num_layers"]):
        processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                      head_dim=transformer_config["attention_head_dim"],
                                                      timesteps_emb_dim=hidden_dim)  # fmt: skip
        for key, value in processor.state_dict().items():
            tensors[f"ip_adapter.{block}.{key}"] = _perturbed(value)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_flux_adapter(path: Path, transformer_config: dict, seed: int = 51, embed_dim: int = VIT_L_PROJECTION,
                       tokens: int = 4):  # fmt: skip
    """An XLabs flux-ip-adapter file (v1: 4 tokens, v2: 16): `ip_adapter_proj_model.proj/norm` (CLIP ViT-L
    image_embeds -> tokens of T5's width) and `double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj`."""
    width = transformer_config["joint_attention_dim"]
    inner = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)

    def weight(rows, cols):
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    def vector(n, center=0.0):
        return center + 0.1 * torch.randn(n, generator=generator)

    tensors = {"ip_adapter_proj_model.proj.weight": weight(tokens * width, embed_dim),
               "ip_adapter_proj_model.proj.bias": vector(tokens * width),
               "ip_adapter_proj_model.norm.weight": vector(width, 1.0),
               "ip_adapter_proj_model.norm.bias": vector(width)}  # fmt: skip
    for block in range(transformer_config["num_layers"]):
        for kv in ("k", "v"):
            name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kv}_proj"
            tensors[f"{name}.weight"] = weight(inner, width)
            tensors[f"{name}.bias"] = vector(inner)
    save_file(tensors, str(path))


def write_redux(path: Path, t5_width: int, seed: int = 61, embed_dim: int = SIGLIP_WIDTH, diffusers_folder: bool = False,
                gain: float = 1.0):  # fmt: skip
    """A FLUX.1 Redux file in BFL's key layout (`redux_up` [3 x T5 width, SigLIP width], `redux_down` [T5 width,
    3 x T5 width], with biases; ComfyUI's style_models/), or with `diffusers_folder` diffusers' `image_embedder/`
    folder (config.json + diffusion_pytorch_model.safetensors, the same names). `gain` scales its tokens (a tiny
    FLUX reads 16 image tokens beside 512 of T5's: louder ones show their effect). Returns the tensors."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 3 * t5_width
    tensors = {"redux_up.weight": torch.randn(hidden, embed_dim, generator=generator) / embed_dim**0.5,
               "redux_up.bias": 0.1 * torch.randn(hidden, generator=generator),
               "redux_down.weight": gain * torch.randn(t5_width, hidden, generator=generator) / hidden**0.5,
               "redux_down.bias": 0.1 * torch.randn(t5_width, generator=generator)}  # fmt: skip
    path = Path(path)
    if diffusers_folder:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"_class_name": "ReduxImageEncoder", "_diffusers_version": "0.32.0",
                                                      "redux_dim": embed_dim, "txt_in_features": t5_width}))  # fmt: skip
        save_file(tensors, str(path / "diffusion_pytorch_model.safetensors"))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
    return tensors


def _perturbed(value: torch.Tensor) -> torch.Tensor:
    """diffusers initialises some adapter weights to zeros or ones (AdaLN, norms): perturbed, so every tensor
    changes the picture and a wrong mapping shows."""
    generator = torch.Generator().manual_seed(value.numel())
    return value + 0.05 * torch.randn(value.shape, generator=generator)


def transformer_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "transformer" / "config.json").read_text())


TINY_EVA = dict(width=128, depth=21, mlp=64, patch=14, grid=2, projection=32)  # 21 blocks: PuLID reads block 20's input
TINY_PULID = dict(dim=64, queries=8, id_width=48, inner=32, depth=10, ff=96, hidden=40, ca_inner=32)


def write_eva_clip(path: Path, seed: int = 71, width: int = 128, depth: int = 21, mlp: int = 64, patch: int = 14,
                   grid: int = 2, projection: int = 32) -> dict:  # fmt: skip
    """A whole EVA02-CLIP checkpoint pickled as BAAI publishes it (`visual.*` of EVA02's vision tower, a stand-in
    `text.*`, `logit_scale`, the rotary tables PuLID's loader drops), tiny widths (EVA02-L: width 1024, 24 blocks,
    SwiGLU 2730, grid 24, projection 768). Returns the tensors."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    v = {"visual.cls_token": rand(1, 1, width, scale=0.5), "visual.pos_embed": rand(1, grid * grid + 1, width, scale=0.5),
         "visual.patch_embed.proj.weight": rand(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
         "visual.patch_embed.proj.bias": rand(width, scale=0.1), "visual.rope.freqs_cos": torch.ones(grid * grid, 64),
         "visual.rope.freqs_sin": torch.zeros(grid * grid, 64)}  # fmt: skip
    for i in range(depth):
        b = f"visual.blocks.{i}."
        for name in ("norm1", "norm2", "attn.inner_attn_ln"):
            v[f"{b}{name}.weight"], v[f"{b}{name}.bias"] = 1 + rand(width, scale=0.1), rand(width, scale=0.1)
        for name in ("q_proj", "k_proj", "v_proj"):
            v[f"{b}attn.{name}.weight"] = rand(width, width)
        v[f"{b}attn.q_bias"], v[f"{b}attn.v_bias"] = rand(width, scale=0.1), rand(width, scale=0.1)
        v[f"{b}attn.proj.weight"], v[f"{b}attn.proj.bias"] = rand(width, width, scale=0.5 * width**-0.5), rand(width, scale=0.1)
        v[f"{b}attn.rope.freqs_cos"], v[f"{b}attn.rope.freqs_sin"] = torch.ones(grid * grid, 64), torch.zeros(grid * grid, 64)
        for name in ("w1", "w2"):
            v[f"{b}mlp.{name}.weight"], v[f"{b}mlp.{name}.bias"] = rand(mlp, width), rand(mlp, scale=0.1)
        v[f"{b}mlp.ffn_ln.weight"], v[f"{b}mlp.ffn_ln.bias"] = 1 + rand(mlp, scale=0.1), rand(mlp, scale=0.1)
        v[f"{b}mlp.w3.weight"], v[f"{b}mlp.w3.bias"] = rand(width, mlp, scale=0.5 * mlp**-0.5), rand(width, scale=0.1)
    v["visual.norm.weight"], v["visual.norm.bias"] = 1 + rand(width, scale=0.1), rand(width, scale=0.1)
    v["visual.head.weight"], v["visual.head.bias"] = rand(projection, width), rand(projection, scale=0.1)
    tensors = {**v, "text.token_embedding.weight": rand(16, projection), "logit_scale": torch.tensor(4.6)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return tensors


def write_pulid_flux(path: Path, flux_width: int, cas: int, eva_width: int = 128, eva_projection: int = 32,
                     seed: int = 81, face_width: int = 512, dim: int = 64, queries: int = 8, id_width: int = 48,
                     inner: int = 32, depth: int = 10, ff: int = 96, hidden: int = 40, ca_inner: int = 32,
                     gain: float = 1.0) -> dict:  # fmt: skip
    """A PuLID FLUX file in the key layout of `pulid_flux_v0.9.1.safetensors` (`pulid_encoder.*`: latents
    [1, queries, dim], proj_out [dim, id_width], `layers.N.0/1`, `mapping_0..4`, `id_embedding_mapping`;
    `pulid_ca.0..cas-1.*`), tiny widths (real: dim 1024, 32 queries, id 2048, inner 1024, hidden 1024, FLUX 3072,
    CA inner 2048, 20 CAs). The mappings read the EVA tower's width and the 512 + EVA projection id vector, as the
    real file reads EVA02-L's 1024 and 1280. `gain` scales the CAs' output. Returns the tensors."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def norm(name, width):
        return {f"{name}.weight": 1 + rand(width, scale=0.1), f"{name}.bias": rand(width, scale=0.1)}

    def mapping(name, width_in, width_out):
        t = {}
        for j, (o, i) in zip((0, 3, 6), ((hidden, width_in), (hidden, hidden), (width_out, hidden))):
            t[f"{name}.{j}.weight"], t[f"{name}.{j}.bias"] = rand(o, i), rand(o, scale=0.1)
        return t | norm(f"{name}.1", hidden) | norm(f"{name}.4", hidden)

    e = "pulid_encoder."
    t = {f"{e}latents": rand(1, queries, dim, scale=dim**-0.5), f"{e}proj_out": rand(dim, id_width, scale=dim**-0.5)}
    for n in range(depth):
        layer = f"{e}layers.{n}."
        t |= norm(f"{layer}0.norm1", dim) | norm(f"{layer}0.norm2", dim) | norm(f"{layer}1.0", dim)
        t |= {f"{layer}0.to_q.weight": rand(inner, dim), f"{layer}0.to_kv.weight": rand(2 * inner, dim),
              f"{layer}0.to_out.weight": rand(dim, inner), f"{layer}1.1.weight": rand(ff, dim),
              f"{layer}1.3.weight": rand(dim, ff)}  # fmt: skip
    for i in range(5):
        t |= mapping(f"{e}mapping_{i}", eva_width, dim)
    t |= mapping(f"{e}id_embedding_mapping", face_width + eva_projection, 5 * dim)
    for k in range(cas):
        ca = f"pulid_ca.{k}."
        t |= norm(f"{ca}norm1", id_width) | norm(f"{ca}norm2", flux_width)
        t |= {f"{ca}to_q.weight": rand(ca_inner, flux_width), f"{ca}to_kv.weight": rand(2 * ca_inner, id_width),
              f"{ca}to_out.weight": gain * rand(flux_width, ca_inner)}  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return t


def write_pulid_sdxl(path: Path, layer_widths: list[int], seed: int = 91, id_width: int = 2048, **encoder) -> dict:
    """A PuLID v1.1 file in `pulid_v1.1.safetensors`' key layout: the IDFormer as `id_adapter.*` (tiny widths, as
    `write_pulid_flux` makes it) and `id_adapter_attn_layers.K.id_to_k/id_to_v` [width, id width] for K = 1, 3, 5,
    ... (the UNet's attn2 processors in diffusers' order; `layer_widths` theirs). Returns the tensors."""
    path = Path(path)
    flux = write_pulid_flux(path.with_suffix(".flux.safetensors"), 8, 0, seed=seed, id_width=id_width, **encoder)
    path.with_suffix(".flux.safetensors").unlink()
    g = torch.Generator().manual_seed(seed + 1)
    t = {k.replace("pulid_encoder.", "id_adapter."): v for k, v in flux.items()}
    for n, width in enumerate(layer_widths):
        for name in ("id_to_k", "id_to_v"):
            t[f"id_adapter_attn_layers.{2 * n + 1}.{name}.weight"] = torch.randn(width, id_width, generator=g) / id_width**0.5
    save_file(t, str(path))
    return t
