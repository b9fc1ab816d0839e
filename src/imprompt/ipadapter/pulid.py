"""PuLID: the ID encoder (IDFormer) and the attention it adds to FLUX's blocks or SDXL's UNet, in plain torch.

From the rules of the authors' code (ToTheBeginning/PuLID, Apache-2.0: `pulid/encoders_transformer.py`,
`pulid/pipeline_flux.py`, `flux/model.py`, `flux/sampling.py`), written here:
- the file (`pulid_flux_v0.9.x.safetensors`) holds `pulid_encoder.*` (the IDFormer) and `pulid_ca.0..19.*` (one
  PerceiverAttentionCA per FLUX double block 0, 2, ..., 18 and single block 0, 4, ..., 36);
- IDFormer: the face's id vector (antelopev2's raw 512-d embedding ++ EVA02-CLIP's L2-normed cls output) mapped to
  5 tokens; 32 learned queries plus those tokens go through 10 Perceiver layers, two per EVA hidden state (each
  mapped by its own MLP), reading those 5 tokens and the mapped hidden state; the 32 queries times `proj_out` are the
  ID tokens [B, 32, 2048]. The negative ("uncond") tokens are the same encoder run on zeros;
- after each of those blocks `img = img + id_weight * ca(id, img)` on the image tokens only (a single block's text
  tokens untouched), from step `start_step` on; FLUX's true CFG runs its negative pass with the uncond tokens.
imprompt adds them with forward hooks on diffusers' `FluxTransformer2DModel` blocks (whose outputs are
`(encoder_hidden_states, hidden_states)`, double and single alike in diffusers 0.42), for one call, and removes them
after it. Where a ControlNet adds residuals after a block, they come after PuLID's (PuLID's code runs no ControlNet).
Widths come from the tensors; the head counts (16 in both attentions) are the code's constants. SDXL v1.1 (the same
IDFormer as `id_adapter.*`, `pulid/attention_processor.py`'s IDAttnProcessor2_0) is at the end of this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..loading.tensors import filled
from .text_attention import finished, merge_heads, split_heads, text_attention

HEADS = 16  # of the IDFormer's Perceiver attentions (16 x 64) and of the CAs (16 x 128)
DOUBLE_INTERVAL = 2  # a CA after double blocks 0, 2, 4, ...
SINGLE_INTERVAL = 4  # and after single blocks 0, 4, 8, ...
EVA_LAYERS = 5  # EVA hidden states the IDFormer reads, two Perceiver layers each
ID_TOKENS = 5  # tokens the id vector becomes


def cas_needed(double_blocks: int, single_blocks: int) -> int:
    """How many CAs a FLUX transformer of these depths takes (PuLID's `num_ca`): 20 for FLUX.1's 19 + 38."""
    return math.ceil(double_blocks / DOUBLE_INTERVAL) + math.ceil(single_blocks / SINGLE_INTERVAL)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention as PuLID computes it: q and k each scaled by head^-1/4, the softmax in fp32."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.25
    weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1)


class PerceiverAttention(nn.Module):
    """The IDFormer's layer: queries from the latents, keys and values from the context and the latents together."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        k, v = self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, HEADS))


class PerceiverAttentionCA(nn.Module):
    """A CA FLUX's image tokens go through: queries from them, keys and values from the ID tokens only."""

    def __init__(self, dim: int, id_width: int, inner: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(id_width)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(id_width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        k, v = self.to_kv(self.norm1(id_tokens)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(self.norm2(image)), k, v, HEADS))


def mlp(widths: list[tuple[int, int]]) -> nn.Sequential:
    """Linear, LN, LeakyReLU, Linear, LN, LeakyReLU, Linear (indices 0, 1, 3, 4, 6 hold tensors)."""
    (a, b), (c, d), (e, f) = widths
    return nn.Sequential(nn.Linear(b, a), nn.LayerNorm(a), nn.LeakyReLU(), nn.Linear(d, c), nn.LayerNorm(c),
                         nn.LeakyReLU(), nn.Linear(f, e))  # fmt: skip


@dataclass(frozen=True)
class PuLIDShape:
    """A PuLID file's widths, as its tensors give them."""

    dim: int  # the IDFormer's width (1024)
    queries: int  # 32
    id_width: int  # of the ID tokens (2048)
    inner: int  # of the IDFormer's attentions (1024)
    depth: int  # Perceiver layers (10)
    ff: int  # their FFN's hidden width (4096)
    id_in: int  # the id vector's width: 512 (antelopev2) + the EVA cls output's (768)
    eva_width: int  # the EVA hidden states' width the mappings read (1024)
    mapping: list = field(default_factory=list, compare=False)  # per mapping_i: [(out, in)] x 3
    id_mapping: list = field(default_factory=list, compare=False)
    flux_width: int = 0  # the CAs' image width: FLUX's hidden width (3072)
    ca_inner: int = 0  # 2048
    cas: int = 0  # 20


def pulid_shape(table: dict, path, prefix: str = "pulid_encoder.") -> PuLIDShape:
    """The widths of a PuLID file from its tensors' shapes: FLUX v0.9.x (`pulid_encoder.*`, `pulid_ca.N.*`) or,
    with `prefix` "id_adapter.", SDXL v1.1's IDFormer (its `id_adapter_attn_layers` are read by `PuLIDSDXL`)."""
    e = prefix
    try:
        _, queries, dim = table[f"{e}latents"].shape
        id_width = table[f"{e}proj_out"].shape[1]
        inner = table[f"{e}layers.0.0.to_q.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in table if k.startswith(f"{e}layers."))
        ff = table[f"{e}layers.0.1.1.weight"].shape[0]
        mapping = [[tuple(table[f"{e}mapping_{i}.{j}.weight"].shape) for j in (0, 3, 6)] for i in range(EVA_LAYERS)]
        id_mapping = [tuple(table[f"{e}id_embedding_mapping.{j}.weight"].shape) for j in (0, 3, 6)]
        flux = prefix == "pulid_encoder."
        cas = 1 + max(int(k.split(".")[1]) for k in table if k.startswith("pulid_ca.")) if flux else 0
        flux_width, ca_inner = table["pulid_ca.0.to_q.weight"].shape[::-1] if flux else (0, 0)
        ca_id = table["pulid_ca.0.norm1.weight"].shape[0] if flux else id_width
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, f"not a complete PuLID file (missing {exc})",
                              "Download the PuLID file again") from None  # fmt: skip
    if depth % EVA_LAYERS or id_mapping[2][0] != ID_TOKENS * dim or ca_id != id_width:
        raise CheckpointError(path, f"PuLID file of unexpected shapes: {depth} Perceiver layers (a multiple of 5), "
                                    f"id_embedding_mapping.6 {id_mapping[2]} (expected [{ID_TOKENS * dim}, ...]), "
                                    f"CA id width {ca_id} vs {id_width}")  # fmt: skip
    return PuLIDShape(dim, queries, id_width, inner, depth, ff, id_mapping[0][1], mapping[0][0][1], mapping, id_mapping,
                      flux_width, ca_inner, cas)  # fmt: skip


class IDFormer(nn.Module):
    """PuLID's ID encoder, under its file's names (`latents`, `proj_out`, `layers.N`, `mapping_i`,
    `id_embedding_mapping`)."""

    def __init__(self, shape: PuLIDShape):
        super().__init__()
        self.dim, self.queries, self.per_state = shape.dim, shape.queries, shape.depth // EVA_LAYERS
        self.latents = nn.Parameter(torch.zeros(1, shape.queries, shape.dim))
        self.proj_out = nn.Parameter(torch.zeros(shape.dim, shape.id_width))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(shape.dim, shape.inner),
                           nn.Sequential(nn.LayerNorm(shape.dim), nn.Linear(shape.dim, shape.ff, bias=False), nn.GELU(),
                                         nn.Linear(shape.ff, shape.dim, bias=False))])  # fmt: skip
            for _ in range(shape.depth)
        )
        for i in range(EVA_LAYERS):
            setattr(self, f"mapping_{i}", mlp(shape.mapping[i]))
        self.id_embedding_mapping = mlp(shape.id_mapping)

    def forward(self, id_vector: torch.Tensor, hidden: list[torch.Tensor]) -> torch.Tensor:
        """id_vector [B, 1280], hidden: 5 x [B, tokens, 1024] -> ID tokens [B, 32, 2048]."""
        ids = self.id_embedding_mapping(id_vector).reshape(id_vector.shape[0], -1, self.dim)
        latents = torch.cat([self.latents.expand(id_vector.shape[0], -1, -1), ids], dim=1)
        for i in range(EVA_LAYERS):
            context = torch.cat([ids, getattr(self, f"mapping_{i}")(hidden[i])], dim=1)
            for attn, ff in self.layers[i * self.per_state : (i + 1) * self.per_state]:
                latents = latents + attn(context, latents)
                latents = latents + ff(latents)
        return latents[:, : self.queries] @ self.proj_out


class PuLIDFlux(nn.Module):
    """A PuLID FLUX file's modules under its own names: `pulid_encoder` and `pulid_ca`."""

    def __init__(self, shape: PuLIDShape):
        super().__init__()
        self.shape = shape
        self.pulid_encoder = IDFormer(shape)
        self.pulid_ca = nn.ModuleList(PerceiverAttentionCA(shape.flux_width, shape.id_width, shape.ca_inner)
                                      for _ in range(shape.cas))  # fmt: skip

    def id_tokens(self, id_vector: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the ID tokens, the uncond tokens: the encoder on zeros, as PuLID's `get_id_embedding` makes them)."""
        p = next(self.parameters())
        id_vector = id_vector.to(device=p.device, dtype=p.dtype)
        hidden = [h.to(device=p.device, dtype=p.dtype) for h in hidden]
        with torch.no_grad():
            cond = self.pulid_encoder(id_vector, hidden)
            uncond = self.pulid_encoder(torch.zeros_like(id_vector), [torch.zeros_like(h) for h in hidden])
        return cond, uncond


def build_pulid(tensors: dict, path, device=None, dtype=None) -> PuLIDFlux:
    shape = pulid_shape(tensors, path)
    with torch.device("meta"):
        module = PuLIDFlux(shape)
    filled(module, tensors, path, "PuLID FLUX file", "Download pulid_flux_v0.9.1.safetensors again")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass
class PuLIDRun:
    """What the hooks read during one call: the tokens, the weight, whether the ID acts at this step, and which pass
    is running. `begin_step` is called before each step (the call's schedule); each transformer forward in a step
    is the positive pass first, then (true CFG) the negative one, as diffusers' FluxPipeline orders them."""

    cond: torch.Tensor
    uncond: torch.Tensor
    weight: float
    active: bool = True
    passes: int = 0

    def begin_step(self, active: bool) -> None:
        self.active, self.passes = active, 0

    def tokens(self) -> torch.Tensor | None:
        """The ID tokens this pass reads, or None where the ID does not act."""
        if not self.active:
            return None
        return self.cond if self.passes == 1 else self.uncond


def attach(transformer, module: PuLIDFlux, run: PuLIDRun):
    """Hooks on `transformer` (diffusers' FluxTransformer2DModel) that add the CAs after PuLID's blocks; returns
    the function that removes them all."""
    doubles, singles = transformer.transformer_blocks, transformer.single_transformer_blocks
    needed = cas_needed(len(doubles), len(singles))
    if needed != len(module.pulid_ca):
        raise CheckpointError("PuLID", f"the file has {len(module.pulid_ca)} CAs, but this FLUX transformer of "
                                       f"{len(doubles)} double and {len(singles)} single blocks takes {needed}")  # fmt: skip
    handles = [transformer.register_forward_pre_hook(lambda *_: setattr(run, "passes", run.passes + 1))]
    blocks = [doubles[i] for i in range(0, len(doubles), DOUBLE_INTERVAL)]
    blocks += [singles[j] for j in range(0, len(singles), SINGLE_INTERVAL)]
    for block, ca in zip(blocks, module.pulid_ca):
        handles.append(block.register_forward_hook(added(ca, run)))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def added(ca: PerceiverAttentionCA, run: PuLIDRun):
    def hook(block, args, output):
        tokens = run.tokens()
        if tokens is None:
            return output
        text, image = output
        p = next(ca.parameters())
        ids = tokens.to(device=p.device, dtype=p.dtype).expand(image.shape[0], -1, -1)
        residual = ca(ids, image.to(p.dtype)).to(image.dtype)
        return text, image + run.weight * residual

    return hook


# ------------------------------------------------------------------------------------------------ SDXL v1.1

ORTHO_MODES = ("off", "v1", "v2")
ORTHO_V2_TOKENS = 5  # ortho v2 sums the attention on the first 5 ID tokens (PuLID's code hard-codes 5)


class IDLayer(nn.Module):
    def __init__(self, width: int, id_width: int):
        super().__init__()
        self.id_to_k = nn.Linear(id_width, width, bias=False)
        self.id_to_v = nn.Linear(id_width, width, bias=False)


class PuLIDSDXL(nn.Module):
    """PuLID v1.1's file under its own names: `id_adapter` (the IDFormer) and `id_adapter_attn_layers.K` for every
    processor K of the UNet (in diffusers' `attn_processors` order) that holds ID projections (the attn2 layers)."""

    def __init__(self, shape: PuLIDShape, layers: dict[int, int]):
        super().__init__()
        self.shape = shape
        self.id_adapter = IDFormer(shape)
        self.id_adapter_attn_layers = nn.ModuleDict({str(k): IDLayer(w, shape.id_width) for k, w in layers.items()})

    def id_tokens(self, id_vector: torch.Tensor, hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return PuLIDFlux.id_tokens(self, id_vector, hidden)

    @property
    def pulid_encoder(self) -> IDFormer:  # the name `PuLIDFlux.id_tokens` reads
        return self.id_adapter


def build_pulid_sdxl(tensors: dict, path, device=None, dtype=None) -> PuLIDSDXL:
    shape = pulid_shape(tensors, path, "id_adapter.")
    layers = {int(k.split(".")[1]): t.shape[0] for k, t in tensors.items()
              if k.startswith("id_adapter_attn_layers.") and k.endswith(".id_to_k.weight")}  # fmt: skip
    with torch.device("meta"):
        module = PuLIDSDXL(shape, dict(sorted(layers.items())))
    filled(module, tensors, path, "PuLID v1.1 file", "Download pulid_v1.1.safetensors again")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass
class SDXLRun:
    """What the ID processors read during one call: the tokens, the scale, PuLID v1.1's NUM_ZERO and ortho mode,
    whether the ID acts at this step, and which rows of the UNet's current call are unconditional (set per UNet
    call from the rows it runs: the negative runs without CFG too where the prompt has AND parts or weights)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    num_zero: int
    ortho: str
    uncond_rows: tuple[int, ...] = ()
    active: bool = True

    def tokens(self, rows: int) -> torch.Tensor | None:
        """[rows, 32 + num_zero, id width]: the uncond tokens on the unconditional rows, the ID tokens on the others."""
        if not self.active:
            return None
        ids = torch.cat([self.uncond if r in self.uncond_rows else self.cond for r in range(rows)])
        return torch.cat([ids, ids.new_zeros(rows, self.num_zero, ids.shape[-1])], dim=1)


class IDAttnProcessor:
    """diffusers' `AttnProcessor2_0` for one cross-attention, with PuLID v1.1's ID attention added to its heads'
    output before `to_out` (PuLID's `IDAttnProcessor2_0`): `h += s * h_id`, or with ortho "v1" the part of `h_id`
    orthogonal to `h` (per channel, summed over tokens), or "v2" that part with `h`'s share weighted by the attention
    on the first 5 ID tokens, both in fp32."""

    def __init__(self, layer: IDLayer, run: SDXLRun):
        self.layer, self.run = layer, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        text = text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out, query = text.out, text.query
        ids = self.run.tokens(text.batch)
        if ids is not None:
            ids = ids.to(device=query.device, dtype=self.layer.id_to_k.weight.dtype)
            id_key = split_heads(attn, text, self.layer.id_to_k(ids).to(query.dtype))
            id_value = split_heads(attn, text, self.layer.id_to_v(ids).to(query.dtype))
            id_out = merge_heads(attn, text, F.scaled_dot_product_attention(query, id_key, id_value, dropout_p=0.0))
            out = self.added(out, id_out, query, id_key)
        return finished(attn, text, out)

    def added(self, out, id_out, query, id_key):
        scale, mode = self.run.scale, self.run.ortho
        if mode == "off":
            return out + scale * id_out
        dtype, h, h_id = out.dtype, out.float(), id_out.float()
        # imprompt beyond PuLID: where the text output is all zeros (SDXL's empty negative prompt is zeros) PuLID's
        # code divides 0 by 0 and the image turns NaN; there it takes no projection
        energy = (h * h).sum(dim=-2, keepdim=True)
        projection = (h * h_id).sum(dim=-2, keepdim=True) / torch.where(energy > 0, energy, 1.0) * h
        if mode == "v1":
            return (h + scale * (h_id - projection)).to(dtype)
        weights = (query @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)  # no scale, as PuLID's code
        share = weights[:, :, :ORTHO_V2_TOKENS].sum(dim=-1, keepdim=True)
        return (h + scale * (h_id + (share - 1) * projection)).to(dtype)


def attach_sdxl(unet, module: PuLIDSDXL, run: SDXLRun, uncond_rows=None):
    """The UNet's processors K that the file has ID projections for replaced by `IDAttnProcessor`s, and `run`'s
    unconditional rows set at each UNet call by `uncond_rows(sample)`; returns the function that undoes both."""
    before = unet.attn_processors
    names = list(before)
    missing = [k for k in map(int, module.id_adapter_attn_layers) if k >= len(names)]
    if missing or len(module.id_adapter_attn_layers) != len(names) // 2:
        raise CheckpointError("PuLID", f"the file has ID projections for {len(module.id_adapter_attn_layers)} "
                                       f"processors, but this UNet has {len(names) // 2} cross-attentions")  # fmt: skip
    after = dict(before)
    for k, layer in module.id_adapter_attn_layers.items():
        after[names[int(k)]] = IDAttnProcessor(layer, run)
    unet.set_attn_processor(after)
    hook = None
    if uncond_rows is not None:
        def rows_hook(_module, args, kwargs):
            run.uncond_rows = tuple(uncond_rows(args[0] if args else kwargs["sample"]))

        hook = unet.register_forward_pre_hook(rows_hook, with_kwargs=True)

    def undo():
        if hook is not None:
            hook.remove()
        unet.set_attn_processor(before)

    return undo


# ------------------------------------------------------------------------------------------------ the face's pixels

FACE_SIZE = 512  # the aligned crop PuLID's face helper makes
# facexlib's FFHQ five-point template at 512 px (eyes, nose, mouth corners), which PuLID aligns faces to
FFHQ_TEMPLATE = ((192.98138, 239.94708), (318.90277, 240.1936), (256.63416, 314.01935), (201.26117, 371.41043),
                 (313.08905, 371.15118))  # fmt: skip
BORDER_RGB = (132, 133, 135)  # facexlib's border (135, 133, 132), given in BGR


def aligned_face(rgb, kps):
    """The face warped onto the FFHQ template at 512 px (a similarity fitted by least median of squares, linear
    interpolation, a constant border), as facexlib's `align_warp_face` does, on the five landmarks of the face
    RetinaFace finds nearest the image's centre (`retinaface.center_face_landmarks`), as PuLID aligns it; None where
    the landmarks fit no similarity (all on one point: facexlib would crash there; the caller says which image)."""
    import cv2
    import numpy as np

    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), np.asarray(FFHQ_TEMPLATE, np.float32),
                                            method=cv2.LMEDS)  # fmt: skip
    if matrix is None or not np.isfinite(matrix).all():
        return None
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_RGB)  # fmt: skip


def eva_pixels(face_features: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """What EVA reads: PuLID's face features image (`face_parsing.face_features_image`: the aligned crop in gray,
    its non-face white; [1, 3, H, W] in 0..1) resized to the tower's size (bicubic, antialiased) and normalised
    with OpenAI CLIP's mean and std. PuLID calls torchvision's `resize` on a tensor, which antialiases from
    torchvision 0.17 on (its requirements_fp8.txt pins 0.19.1) but not before (its requirements.txt pins 0.15.2)."""
    image = face_features.float()
    resized = torch.nn.functional.interpolate(image, size=(size, size), mode="bicubic", antialias=True,
                                              align_corners=False)  # fmt: skip
    mean, std = (torch.tensor(v, device=image.device).view(1, 3, 1, 1) for v in (mean, std))
    return (resized - mean) / std


def id_vector(face_embedding: torch.Tensor, eva_cls: torch.Tensor) -> torch.Tensor:
    """The IDFormer's input: antelopev2's raw embedding ++ EVA's cls output, L2-normed."""
    eva_cls = eva_cls / eva_cls.norm(dim=-1, keepdim=True)
    return torch.cat([face_embedding.to(eva_cls), eva_cls], dim=-1)
