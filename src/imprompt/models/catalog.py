"""What the field calls things: friendly adapter names, image-encoder families, UNet families.

This module is data. It is used to *name* and *suggest* (help texts, error messages, downloads), never to decide
compatibility: that is read from tensors (see `probe.py` and `plan.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderFamily:
    """A published CLIP vision architecture, with the config transformers needs to rebuild it."""

    name: str
    hidden_size: int
    projection_dim: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    image_size: int
    patch_size: int
    usual_files: tuple[str, ...]
    hub_repo: str
    hub_subfolder: str


VIT_L = EncoderFamily(
    name="ViT-L-14",
    hidden_size=1024,
    projection_dim=768,
    num_layers=24,
    intermediate_size=4096,
    num_attention_heads=16,
    hidden_act="quick_gelu",
    image_size=224,
    patch_size=14,
    usual_files=("clip-vit-large-patch14", "CLIP-ViT-L-14.safetensors"),
    hub_repo="openai/clip-vit-large-patch14",
    hub_subfolder="",
)
VIT_H = EncoderFamily(
    name="ViT-H-14",
    hidden_size=1280,
    projection_dim=1024,
    num_layers=32,
    intermediate_size=5120,
    num_attention_heads=16,
    hidden_act="gelu",
    image_size=224,
    patch_size=14,
    usual_files=("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "h94/IP-Adapter models/image_encoder"),
    hub_repo="h94/IP-Adapter",
    hub_subfolder="models/image_encoder",
)
VIT_BIGG = EncoderFamily(
    name="ViT-bigG-14",
    hidden_size=1664,
    projection_dim=1280,
    num_layers=48,
    intermediate_size=8192,
    num_attention_heads=16,
    hidden_act="gelu",
    image_size=224,
    patch_size=14,
    usual_files=("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "h94/IP-Adapter sdxl_models/image_encoder"),
    hub_repo="h94/IP-Adapter",
    hub_subfolder="sdxl_models/image_encoder",
)
SIGLIP_SO400M = EncoderFamily(  # SD 3.5's InstantX adapter reads its hidden_states[-2] (729 x 1152)
    name="SigLIP-so400m-14-384",
    hidden_size=1152,
    projection_dim=0,  # a SigLIP vision tower has no visual projection: only hidden states
    num_layers=27,
    intermediate_size=4304,
    num_attention_heads=16,
    hidden_act="gelu_pytorch_tanh",
    image_size=384,
    patch_size=14,
    usual_files=("siglip-so400m-patch14-384.safetensors", "google/siglip-so400m-patch14-384"),
    hub_repo="google/siglip-so400m-patch14-384",
    hub_subfolder="",
)
ENCODER_FAMILIES = (VIT_L, VIT_H, VIT_BIGG)  # CLIP
SIGLIP_FAMILIES = (SIGLIP_SO400M,)


def family_by_shape(hidden_size: int, projection_dim: int | None, num_layers: int, intermediate_size: int):
    """The published family whose tensor shapes these are, or None (a custom encoder)."""
    for family in ENCODER_FAMILIES:
        if (family.hidden_size, family.num_layers, family.intermediate_size) == (
            hidden_size,
            num_layers,
            intermediate_size,
        ) and projection_dim in (family.projection_dim, None):
            return family
    return None


def family_by_output(kind: str, width: int, encoder_type: str = "clip"):
    """The published family of `encoder_type` ("clip" | "siglip") that produces `kind` ("image_embeds" |
    "hidden_states") of this width, if any."""
    if encoder_type not in ("clip", "siglip"):  # InsightFace's packs (antelopev2) are no vision tower
        return None
    for family in SIGLIP_FAMILIES if encoder_type == "siglip" else ENCODER_FAMILIES:
        produced = family.projection_dim if kind == "image_embeds" else family.hidden_size
        if produced == width:
            return family
    return None


# UNet cross-attention width -> family name. The adapter's `to_k_ip` input width must equal it.
UNET_FAMILIES = {768: "SD 1.5", 1024: "SD 2.x", 2048: "SDXL"}


def unet_family(cross_attention_dim: int) -> str:
    return UNET_FAMILIES.get(cross_attention_dim, f"custom ({cross_attention_dim}-wide)")


# Diffusion transformers: the architecture names the family (their widths vary with the model's size).
DIT_FAMILIES = {"sd3": "SD 3.5", "flux": "FLUX.1"}


def model_family(architecture: str, width: int) -> str:
    """A denoiser's family: a UNet's by its cross-attention width, a transformer's by its architecture."""
    return unet_family(width) if architecture == "unet" else DIT_FAMILIES[architecture]


@dataclass(frozen=True)
class KnownAdapter:
    """A published IP-Adapter: its friendly name (SD.Next's), the file stems it ships under, where to get it, and
    other names clients send for it (SD.Next's `face` payload says "FaceID Plus v1" and "FaceID XL")."""

    name: str
    stems: tuple[str, ...]
    hub_repo: str
    hub_subfolder: str
    aliases: tuple[str, ...] = ()


KNOWN_ADAPTERS = (
    KnownAdapter("Base", ("ip-adapter_sd15",), "h94/IP-Adapter", "models"),
    KnownAdapter("Light", ("ip-adapter_sd15_light", "ip-adapter_sd15_light_v11"), "h94/IP-Adapter", "models"),
    KnownAdapter("Plus", ("ip-adapter-plus_sd15",), "h94/IP-Adapter", "models"),
    KnownAdapter("Plus Face", ("ip-adapter-plus-face_sd15",), "h94/IP-Adapter", "models"),
    KnownAdapter("Full Face", ("ip-adapter-full-face_sd15",), "h94/IP-Adapter", "models"),
    KnownAdapter("Base ViT-G", ("ip-adapter_sd15_vit-G",), "h94/IP-Adapter", "models"),
    KnownAdapter("Base SDXL", ("ip-adapter_sdxl",), "h94/IP-Adapter", "sdxl_models"),
    KnownAdapter("Base ViT-H SDXL", ("ip-adapter_sdxl_vit-h",), "h94/IP-Adapter", "sdxl_models"),
    KnownAdapter("Plus ViT-H SDXL", ("ip-adapter-plus_sdxl_vit-h",), "h94/IP-Adapter", "sdxl_models"),
    KnownAdapter("Plus Face ViT-H SDXL", ("ip-adapter-plus-face_sdxl_vit-h",), "h94/IP-Adapter", "sdxl_models"),
    KnownAdapter("Ostris Composition ViT-H", ("ip_plus_composition_sd15",), "ostris/ip-composition-adapter", ""),
    KnownAdapter("Ostris Composition ViT-H SDXL", ("ip_plus_composition_sdxl",), "ostris/ip-composition-adapter", ""),
    # FaceID (h94/IP-Adapter-FaceID): face embeddings from InsightFace (the Plus family also reads the face crop)
    KnownAdapter("FaceID Base", ("ip-adapter-faceid_sd15",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Plus", ("ip-adapter-faceid-plus_sd15",), "h94/IP-Adapter-FaceID", "", ("FaceID Plus v1",)),
    KnownAdapter("FaceID Plus v2", ("ip-adapter-faceid-plusv2_sd15",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Portrait", ("ip-adapter-faceid-portrait_sd15",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Portrait v11", ("ip-adapter-faceid-portrait-v11_sd15",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Base SDXL", ("ip-adapter-faceid_sdxl",), "h94/IP-Adapter-FaceID", "", ("FaceID XL",)),
    KnownAdapter("FaceID Plus v2 SDXL", ("ip-adapter-faceid-plusv2_sdxl",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Portrait SDXL", ("ip-adapter-faceid-portrait_sdxl",), "h94/IP-Adapter-FaceID", ""),
    KnownAdapter("FaceID Portrait SDXL unnorm", ("ip-adapter-faceid-portrait_sdxl_unnorm",), "h94/IP-Adapter-FaceID", ""),
    # diffusion transformers: SD 3.5 Large (SigLIP) and FLUX.1 (CLIP ViT-L)
    # (their repositories ship `ip-adapter.bin` / `ip_adapter.safetensors`: these are the names users give them)
    KnownAdapter("SD3.5 Large", ("sd3.5-large-ip-adapter", "sd35-large-ip-adapter"), "InstantX/SD3.5-Large-IP-Adapter", ""),
    KnownAdapter("FLUX XLabs", ("flux-ip-adapter",), "XLabs-AI/flux-ip-adapter", ""),
    KnownAdapter("FLUX XLabs v2", ("flux-ip-adapter-v2",), "XLabs-AI/flux-ip-adapter-v2", ""),
    # FLUX.1 Redux (SigLIP so400m): BFL's file (ComfyUI's style_models/), or the repository's diffusers folder
    # InstantID (SDXL): InstantX's `ip-adapter.bin` (antelopev2 face embedding) + its IdentityNet ControlNet folder
    # (`ControlNetModel/`); found by its tensors whatever its name (`conditioning/instantid.py`)
    KnownAdapter("InstantID", ("ip-adapter_instant_id_sdxl", "ip-adapter_instantid", "instantid-ip-adapter", "instantid"),
                 "InstantX/InstantID", "",
                 ("InstantX InstantID",)),
    KnownAdapter("FLUX Redux", ("flux1-redux-dev", "FLUX.1-Redux-dev"), "black-forest-labs/FLUX.1-Redux-dev", "",
                 ("FLUX.1 Redux", "Redux")),
    # PuLID (guozinan/PuLID; EVA02-CLIP-L-14-336 + antelopev2): v0.9.0 and v0.9.1 have the same tensors, so the file
    # name tells them apart; "PuLID" names v0.9.1 (the authors' default); v1.1 is SDXL's
    KnownAdapter("PuLID FLUX v0.9.1", ("pulid_flux_v0.9.1",), "guozinan/PuLID", "", ("PuLID", "PuLID FLUX", "PuLID Flux")),
    KnownAdapter("PuLID FLUX v0.9.0", ("pulid_flux_v0.9.0",), "guozinan/PuLID", ""),
    KnownAdapter("PuLID SDXL v1.1", ("pulid_v1.1",), "guozinan/PuLID", ""),
)


def known_adapter(name: str):
    """The published adapter with this friendly name (case-insensitive), or None."""
    wanted = name.strip().lower()
    for adapter in KNOWN_ADAPTERS:
        if wanted in (n.lower() for n in (adapter.name, *adapter.aliases)):
            return adapter
    return None


def friendly_name(stem: str):
    """The friendly name of a file stem, or None."""
    lowered = stem.lower()
    for adapter in KNOWN_ADAPTERS:
        if lowered in (s.lower() for s in adapter.stems):
            return adapter.name
    return None
