"""PuLID for FLUX: EVA02-CLIP's tower, the IDFormer and the CAs in FLUX's blocks, each equal to a reference.

No PuLID pipeline exists in diffusers. The references here are written in this file from the rules of the authors'
code (ToTheBeginning/PuLID: `eva_clip/eva_vit_model.py` + `rope.py` for the tower, `pulid/encoders_transformer.py`
for the IDFormer and PerceiverAttentionCA, `flux/model.py` + `flux/sampling.py` for where and when the CAs act),
as plain functions over the files' tensors, independent of imprompt's modules: the FLUX reference is diffusers'
own FluxPipeline with each PuLID block's forward wrapped by hand. Tiny models in the real key layouts
(`demo/tiny_dits.py`): an EVA02-CLIP checkpoint pickled whole, a PuLID FLUX file.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from imprompt.demo.tiny_dits import build_flux_pipeline, write_eva_clip, write_pulid_flux

DOUBLE, SINGLE = 3, 5  # a CA after double blocks 0, 2 and single blocks 0, 4: four CAs


# ------------------------------------------------------------------------------------------------ references


def ref_eva(sd: dict, pixels: torch.Tensor):
    """EVA02-CLIP's vision tower from the whole checkpoint's tensors: (head(norm(x)[:, 0]), inputs of blocks 4..20)."""
    v = {k[7:]: t.double() for k, t in sd.items() if k.startswith("visual.")}
    width, patch = v["patch_embed.proj.weight"].shape[0], v["patch_embed.proj.weight"].shape[2]
    heads, head = width // 64, 64
    x = F.conv2d(pixels.double(), v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=patch)
    grid = x.shape[-1]
    x = torch.cat([v["cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + v["pos_embed"]
    # rotary angles: position (r, c); channel d < 32 rotates with the row, else the column; frequency of pair (d % 32)//2
    t = [i / grid * 16 for i in range(grid)]
    angles = torch.zeros(grid * grid, head, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for d in range(head):
                freq = 10000 ** (-(2 * ((d % 32) // 2)) / 32)
                angles[r * grid + c, d] = (t[r] if d < 32 else t[c]) * freq

    def rope(q):  # q [B, H, N, 64]; pairs (2i, 2i+1) rotated by their angle
        cls, patches = q[:, :, :1], q[:, :, 1:]
        a, b = patches[..., 0::2], patches[..., 1::2]
        cos, sin = angles[:, 0::2].cos(), angles[:, 0::2].sin()
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
        return torch.cat([cls, out], dim=2)

    depth = 1 + max(int(k.split(".")[1]) for k in v if k.startswith("blocks."))
    hidden = []
    for i in range(depth):
        if 0 < i <= 20 and i % 4 == 0:
            hidden.append(x)
        p = f"blocks.{i}."
        h = F.layer_norm(x, (width,), v[p + "norm1.weight"], v[p + "norm1.bias"], 1e-6)
        b, n, _ = h.shape
        q = (h @ v[p + "attn.q_proj.weight"].T + v[p + "attn.q_bias"]).view(b, n, heads, head).transpose(1, 2)
        k = (h @ v[p + "attn.k_proj.weight"].T).view(b, n, heads, head).transpose(1, 2)
        val = (h @ v[p + "attn.v_proj.weight"].T + v[p + "attn.v_bias"]).view(b, n, heads, head).transpose(1, 2)
        q, k = rope(q), rope(k)
        w = ((q * head**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = (w @ val).transpose(1, 2).reshape(b, n, width)
        o = F.layer_norm(o, (width,), v[p + "attn.inner_attn_ln.weight"], v[p + "attn.inner_attn_ln.bias"], 1e-6)
        x = x + o @ v[p + "attn.proj.weight"].T + v[p + "attn.proj.bias"]
        h = F.layer_norm(x, (width,), v[p + "norm2.weight"], v[p + "norm2.bias"], 1e-6)
        m = F.silu(h @ v[p + "mlp.w1.weight"].T + v[p + "mlp.w1.bias"]) * (h @ v[p + "mlp.w2.weight"].T + v[p + "mlp.w2.bias"])
        m = F.layer_norm(m, (m.shape[-1],), v[p + "mlp.ffn_ln.weight"], v[p + "mlp.ffn_ln.bias"], 1e-6)
        x = x + m @ v[p + "mlp.w3.weight"].T + v[p + "mlp.w3.bias"]
    x = F.layer_norm(x, (width,), v["norm.weight"], v["norm.bias"], 1e-6)
    return x[:, 0] @ v["head.weight"].T + v["head.bias"], hidden


def ref_attention(q, k, v, heads=16):
    b, n, inner = q.shape
    split = [t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v)]
    w = (split[0] @ split[1].transpose(-2, -1) / math.sqrt(inner // heads)).softmax(-1)
    return (w @ split[2]).permute(0, 2, 1, 3).reshape(b, n, inner)


def ref_ln(sd, name, x):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"].to(x), sd[name + ".bias"].to(x))


def ref_mlp(sd, name, x):
    for j in (0, 3):
        x = F.leaky_relu(ref_ln(sd, f"{name}.{j + 1}", x @ sd[f"{name}.{j}.weight"].to(x).T + sd[f"{name}.{j}.bias"].to(x)), 0.01)
    return x @ sd[f"{name}.6.weight"].to(x).T + sd[f"{name}.6.bias"].to(x)


def ref_idformer(sd: dict, id_vector, hidden):
    """PuLID's IDFormer over the file's tensors: 5 id tokens beside the learned queries, two layers per EVA state."""
    e = "pulid_encoder."
    sd = {k[len(e):]: t.double() for k, t in sd.items() if k.startswith(e)}
    dim = sd["latents"].shape[-1]
    ids = ref_mlp(sd, "id_embedding_mapping", id_vector.double()).reshape(id_vector.shape[0], -1, dim)
    latents = torch.cat([sd["latents"].repeat(id_vector.shape[0], 1, 1), ids], dim=1)
    for n in range(10):
        p = f"layers.{n}."
        ctx = torch.cat([ids, ref_mlp(sd, f"mapping_{n // 2}", hidden[n // 2].double())], dim=1)
        c, lat = ref_ln(sd, p + "0.norm1", ctx), ref_ln(sd, p + "0.norm2", latents)
        kv = torch.cat([c, lat], dim=1) @ sd[p + "0.to_kv.weight"].T
        k, v = kv.chunk(2, dim=-1)
        latents = latents + ref_attention(lat @ sd[p + "0.to_q.weight"].T, k, v) @ sd[p + "0.to_out.weight"].T
        h = F.gelu(ref_ln(sd, p + "1.0", latents) @ sd[p + "1.1.weight"].T)
        latents = latents + h @ sd[p + "1.3.weight"].T
    return latents[:, : sd["latents"].shape[1]] @ sd["proj_out"]


def ref_ca(sd: dict, k: int, ids, image):
    p = f"pulid_ca.{k}."
    kv = ref_ln(sd, p + "norm1", ids) @ sd[p + "to_kv.weight"].to(image).T
    key, val = kv.chunk(2, dim=-1)
    q = ref_ln(sd, p + "norm2", image) @ sd[p + "to_q.weight"].to(image).T
    return ref_attention(q, key, val) @ sd[p + "to_out.weight"].to(image).T


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pulid")
    eva = write_eva_clip(root / "clip" / "EVA02_CLIP_L_336_psz14_s6B.pt")
    flux = build_flux_pipeline(root / "flux", double=DOUBLE, single=SINGLE)
    width = flux.transformer.config.num_attention_heads * flux.transformer.config.attention_head_dim
    pulid = write_pulid_flux(root / "pulid" / "pulid_flux_v0.9.1.safetensors", width, 4, gain=4.0)
    return root, eva, pulid


def pixels(seed=3, size=28):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ modules


def test_eva_tower_equals_the_reference(files):
    from imprompt.ipadapter.eva_clip import build_eva
    from imprompt.loading.tensors import read_tensors

    root, eva, _ = files
    tower = build_eva(read_tensors(root / "clip" / "EVA02_CLIP_L_336_psz14_s6B.pt"), "eva", dtype=torch.float64)
    assert (tower.shape.width, tower.shape.depth, tower.shape.grid, tower.shape.projection) == (128, 21, 2, 32)
    cls, hidden = tower(pixels().double())
    want_cls, want_hidden = ref_eva(eva, pixels())
    assert len(hidden) == 5 and hidden[0].shape == (1, 5, 128)
    assert (cls - want_cls).abs().max() < 1e-6  # the rotary tables are made in fp32 (as EVA's code makes them)
    assert max((h - w).abs().max() for h, w in zip(hidden, want_hidden)) < 1e-6


def test_idformer_equals_the_reference_and_uncond_is_the_encoder_on_zeros(files):
    from imprompt.ipadapter.pulid import build_pulid

    root, _, sd = files
    module = build_pulid(sd, "pulid", dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    vector = torch.randn(1, 512 + 32, generator=g, dtype=torch.float64)
    hidden = [torch.randn(1, 5, 128, generator=g, dtype=torch.float64) for _ in range(5)]
    cond, uncond = module.id_tokens(vector, hidden)
    assert cond.shape == (1, 8, 48)
    assert (cond - ref_idformer(sd, vector, hidden)).abs().max() < 1e-5  # PuLID's softmax runs in fp32
    zeros = ref_idformer(sd, torch.zeros_like(vector), [torch.zeros_like(h) for h in hidden])
    assert (uncond - zeros).abs().max() < 1e-5 and uncond.abs().max() > 0  # not a zero tensor
    ids = torch.randn(1, 8, 48, generator=g, dtype=torch.float64)
    image = torch.randn(1, 16, module.shape.flux_width, generator=g, dtype=torch.float64)
    assert (module.pulid_ca[2](ids, image) - ref_ca(sd, 2, ids, image)).abs().max() < 1e-5
