"""EVA02-CLIP's vision tower in plain torch: the face encoder PuLID reads (its cls output and five hidden states).

PuLID runs EVA02-CLIP-L-14-336 (`EVA02_CLIP_L_336_psz14_s6B.pt`, the whole CLIP pickled) through the authors' own
copy of EVA's code, which needs timm, einops and xformers; imprompt computes the same tower itself, from the rules
read in that code (ToTheBeginning/PuLID `eva_clip/eva_vit_model.py`, `rope.py`, `model_configs/EVA02-CLIP-L-14-336.json`):
- patch embedding (a conv of stride = kernel = patch), a cls token, learned position embeddings;
- pre-norm blocks (LayerNorm eps 1e-6): attention with biases on q and v only, 2-D rotary embeddings on the patch
  tokens (the cls token untouched), a LayerNorm on the merged heads before the output projection ("subln"); a
  SwiGLU MLP `w3(ffn_ln(silu(w1 x) * w2 x))`;
- the output: `head(norm(x)[:, 0])`; PuLID also reads the inputs of blocks 4, 8, 12, 16 and 20 (before `norm`).
Every width, the depth and the grid are read from the tensors; the head width (64) and the rotary embedding's
pretraining grid (16 = 224 / 14, interpolated to the tower's own grid) are EVA02's constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..loading.tensors import filled

HIDDEN_LAYERS = (4, 8, 12, 16, 20)  # PuLID reads the input of these blocks (`0 < idx <= 20 and idx % 4 == 0`)
HEAD_WIDTH = 64  # every EVA02 tower's
ROPE_GRID = 16  # the grid EVA02 was pretrained on (224 / 14); its rotary frequencies are interpolated from it
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-6
PROBE_KEY = "visual.blocks.0.attn.inner_attn_ln.weight"  # an EVA02 vision tower's mark (sub-LN attention)


@dataclass(frozen=True)
class EvaShape:
    """An EVA02 vision tower's sizes, as its tensors give them."""

    width: int
    depth: int
    mlp: int
    patch: int
    grid: int  # patches per side
    projection: int  # the width of its cls output (`head`)

    @property
    def heads(self) -> int:
        return self.width // HEAD_WIDTH

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    @property
    def architecture(self) -> str:
        return f"EVA02-CLIP-{'L' if self.width == 1024 else self.width}-{self.patch}-{self.image_size}"


def visual_prefix(keys) -> str | None:
    """The prefix before `visual.` in a checkpoint holding an EVA02 vision tower (`""`, `module.`, `state_dict.`,
    ...), or None when it holds none."""
    for key in keys:
        if key.endswith(PROBE_KEY):
            return key[: -len(PROBE_KEY)]
    return None


def eva_shape(table: dict, path) -> EvaShape:
    """The tower's sizes from its `visual.*` tensors' shapes (a table of anything with `.shape`)."""
    prefix = visual_prefix(table)
    if prefix is None:
        raise CheckpointError(path, f"not an EVA02-CLIP checkpoint: no {PROBE_KEY}")
    v = f"{prefix}visual."
    try:
        patch = table[f"{v}patch_embed.proj.weight"].shape  # [width, 3, patch, patch]
        tokens = table[f"{v}pos_embed"].shape[1]
        depth = 1 + max(int(k[len(v) + 7:].split(".")[0]) for k in table if k.startswith(f"{v}blocks."))
        mlp = table[f"{v}blocks.0.mlp.w1.weight"].shape[0]
        projection = table[f"{v}head.weight"].shape[0]
    except (KeyError, IndexError) as exc:
        raise CheckpointError(path, f"EVA02-CLIP vision tower without {exc} (patch_embed, pos_embed, blocks, head)",
                              "Use the whole EVA02-CLIP checkpoint (EVA02_CLIP_L_336_psz14_s6B.pt)") from None  # fmt: skip
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1 or patch[0] % HEAD_WIDTH:
        raise CheckpointError(path, f"EVA02-CLIP vision tower of {tokens} positions and width {patch[0]}: expected a "
                                    f"square grid plus the cls token and heads of {HEAD_WIDTH}")  # fmt: skip
    return EvaShape(patch[0], depth, mlp, patch[2], grid, projection)


def visual_state(tensors: dict) -> dict:
    """The vision tower's own tensors of a whole EVA-CLIP checkpoint, prefix stripped; the rotary tables are left
    (they are recomputed, as PuLID's loader drops them)."""
    prefix = visual_prefix(tensors) or ""
    v = f"{prefix}visual."
    return {k[len(v):]: t for k, t in tensors.items()
            if k.startswith(v) and not k.endswith(("freqs_cos", "freqs_sin"))}  # fmt: skip


def rotary_tables(grid: int, head_width: int = HEAD_WIDTH) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [grid * grid, head_width]: per axis half the head, frequencies 10000^(-2i/half) at positions
    interpolated from EVA02's pretraining grid, each repeated for an interleaved pair; rows then columns."""
    half = head_width // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    t = torch.arange(grid).float() / grid * ROPE_GRID
    axis = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # [grid, half]
    both = torch.cat([axis[:, None, :].expand(grid, grid, half), axis[None, :, :].expand(grid, grid, half)], dim=-1)
    both = both.reshape(grid * grid, head_width)
    return both.cos(), both.sin()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate(x) * sin, where rotate turns each interleaved pair (a, b) into (-b, a)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + turned * sin


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
        v = F.linear(x, self.v_proj.weight, self.v_bias).view(b, n, self.heads, -1).transpose(1, 2)
        q = torch.cat([q[:, :, :1], rotated(q[:, :, 1:], cos, sin)], dim=2)  # the cls token keeps no position
        k = torch.cat([k[:, :, :1], rotated(k[:, :, 1:], cos, sin)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(self.inner_attn_ln(out))


class EvaMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=EPS)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = EvaMLP(width, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)


class EvaVisionTower(nn.Module):
    """EVA02-CLIP's `visual` module, under its checkpoint's own names (`patch_embed`, `blocks.N`, `norm`, `head`)."""

    def __init__(self, shape: EvaShape):
        super().__init__()
        self.shape = shape
        self.patch_embed = PatchEmbed(shape.width, shape.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, shape.grid**2 + 1, shape.width))
        self.blocks = nn.ModuleList(EvaBlock(shape.width, shape.heads, shape.mlp) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.width, eps=EPS)
        self.head = nn.Linear(shape.width, shape.projection)
        cos, sin = rotary_tables(shape.grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the cls output [B, projection], the inputs of blocks 4, 8, 12, 16, 20 [B, 1 + grid^2, width] each)."""
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in HIDDEN_LAYERS:
                hidden.append(x)
            x = block(x, cos, sin)
        return self.head(self.norm(x)[:, 0]), hidden


def build_eva(tensors: dict, path, device=None, dtype=None) -> EvaVisionTower:
    """The tower of a whole EVA-CLIP checkpoint's tensors (or of its `visual.*` ones), filled strictly."""
    shape = eva_shape(tensors, path)
    if shape.depth <= HIDDEN_LAYERS[-1]:
        raise CheckpointError(path, f"EVA02-CLIP vision tower of {shape.depth} blocks: PuLID reads the input of block "
                                    f"{HIDDEN_LAYERS[-1]}, so it needs more", "Use EVA02-CLIP-L-14-336")  # fmt: skip
    state = visual_state(tensors)
    with torch.device("meta"):
        tower = EvaVisionTower(shape)
    filled(tower, state, path, "EVA02-CLIP vision tower", "Check that the file is complete")
    cos, sin = rotary_tables(shape.grid)
    tower.rope_cos, tower.rope_sin = cos, sin  # buffers made on meta: computed again, for real
    return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
