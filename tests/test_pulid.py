"""PuLID for FLUX: EVA02-CLIP's tower, the IDFormer and the CAs in FLUX's blocks, each equal to a reference.

No PuLID pipeline exists in diffusers. The references here are written in this file from the rules of the authors'
code (ToTheBeginning/PuLID: `eva_clip/eva_vit_model.py` + `rope.py` for the tower, `pulid/encoders_transformer.py`
for the IDFormer and PerceiverAttentionCA, `flux/model.py` + `flux/sampling.py` for where and when the CAs act),
as plain functions over the files' tensors, independent of imprompt's modules: the FLUX reference is diffusers'
own FluxPipeline with each PuLID block's forward wrapped by hand. The face's preprocessing follows PuLID's
`get_id_embedding` by hand: facexlib's RetinaFace (`facexlib_reference.ref_detect`, not imprompt's detector) finds the
centre face, facexlib's BiSeNet parsing (`facexlib_reference.ref_face_features`) whitens the non-face and grays the
rest before EVA, whose resize antialiases as torchvision >= 0.17 does (not PuLID's 0.15.2 pin: see `ref_tokens`). Tiny models in the real key layouts (`demo/tiny_dits.py`): an EVA02-CLIP checkpoint
pickled whole, a PuLID FLUX file; facexlib's two files (`demo/tiny_faces.py`) in `models/facexlib/`, where ComfyUI's
PuLID nodes keep them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn import functional as F

from facexlib_reference import ref_center_face, ref_detect, ref_face_features

from imprompt.demo.tiny_dits import build_flux_pipeline, write_eva_clip, write_pulid_flux
from imprompt.demo.tiny_faces import tiny_bisenet, write_facexlib_files, write_tiny_bisenet

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


MODEL = "flux-pulid"
PULID_FILE = "pulid/pulid_flux_v0.9.1.safetensors"  # ComfyUI's models/pulid/
EVA_FILE = "clip/EVA02_CLIP_L_336_psz14_s6B.pt"
PARSER_FILE = "facexlib/parsing_bisenet.pth"  # ComfyUI's models/facexlib/
DETECTOR_FILE = "facexlib/detection_Resnet50_Final.pth"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pulid")
    write_facexlib_files(root)
    eva = write_eva_clip(root / EVA_FILE)
    flux = build_flux_pipeline(root / "diffusers" / MODEL, double=DOUBLE, single=SINGLE)
    width = flux.transformer.config.num_attention_heads * flux.transformer.config.attention_head_dim
    pulid = write_pulid_flux(root / PULID_FILE, width, 4, gain=4.0)
    return root, eva, pulid


def pixels(seed=3, size=28):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ modules


def test_eva_tower_equals_the_reference(files):
    from imprompt.ipadapter.eva_clip import build_eva
    from imprompt.loading.tensors import read_tensors

    root, eva, _ = files
    tower = build_eva(read_tensors(root / EVA_FILE), "eva", dtype=torch.float64)
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


# ------------------------------------------------------------------------------------------------ the files


def test_files_are_read_from_their_tensors(files):
    import shutil

    from imprompt.models.probe import probe

    root, _, _ = files
    spec = probe(root / PULID_FILE)
    assert (spec.kind, spec.variant, spec.architecture, spec.encoder_type) == ("ip-adapter", "pulid", "flux", "antelopev2")
    assert (spec.embed_dim, spec.clip_width, spec.eva_projection, spec.tokens, len(spec.layer_widths)) == (512, 128, 32, 8, 4)
    assert spec.needs.startswith("InsightFace antelopev2 face_embeds[512] + eva-clip hidden_states[128] and cls[32]")
    eva = probe(root / EVA_FILE)
    assert (eva.kind, eva.model_type, eva.hidden_size, eva.projection_dim, eva.num_layers) == (
        "image-encoder", "eva-clip", 128, 32, 21)
    shutil.copy(root / PULID_FILE, root / "renamed.safetensors")  # the name plays no part
    assert probe(root / "renamed.safetensors").variant == "pulid"
    (root / "renamed.safetensors").unlink()


# ------------------------------------------------------------------------------------------------ FLUX, end to end


def face_inputs():
    """A raw antelopev2-like embedding (not normed) and an aligned 512 crop."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(9)
    embedding = torch.randn(1, 512, generator=g) * 1.5
    y, x = np.mgrid[0:512, 0:512]
    crop = np.stack([(x // 2) % 256, (y // 2) % 256, ((x + y) // 4) % 256], axis=-1).astype(np.uint8)
    crop[180:330, 180:330] = (200, 150, 120)
    return embedding, Image.fromarray(crop)


def ref_tokens(eva_sd, sd, embedding, crop, parser_sd=None):
    """PuLID's get_id_embedding after the face is aligned: BiSeNet parses the crop, its non-face white and the rest
    gray (0.299 R + 0.587 G + 0.114 B), bicubic to the tower's size, OpenAI mean/std; cat(raw embedding, normed
    cls); the IDFormer, and the IDFormer on zeros. The bicubic resize antialiases: that is torchvision's tensor
    `resize` from 0.17 on (PuLID's requirements_fp8.txt pins 0.19.1; nunchaku, SD.Next and ComfyUI run such
    versions), and imprompt's documented choice (`ipadapter/pulid.eva_pixels`). PuLID's requirements.txt pins
    torchvision 0.15.2, whose tensor resize does not antialias: against that pin this reference, like imprompt,
    deviates (`test_eva_resize_antialiases_as_torchvision_0_17_not_0_15`), so it is not PuLID's code there."""
    import numpy as np

    gray = ref_face_features(tiny_bisenet(0) if parser_sd is None else parser_sd, np.asarray(crop))
    size = eva_sd["visual.patch_embed.proj.weight"].shape[-1] * round((eva_sd["visual.pos_embed"].shape[1] - 1) ** 0.5)
    gray = F.interpolate(gray, size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    cls, hidden = ref_eva(eva_sd, (gray - mean) / std)
    vector = torch.cat([embedding.double(), cls / cls.norm(dim=-1, keepdim=True)], dim=-1)
    zeros = ref_idformer(sd, torch.zeros_like(vector), [torch.zeros_like(h) for h in hidden])
    return ref_idformer(sd, vector, hidden).float(), zeros.float()


def test_eva_resize_antialiases_as_torchvision_0_17_not_0_15():
    """The one resize choice, made on purpose: EVA reads the 512 face features image antialiased to 336 (torchvision
    >= 0.17's tensor resize, which PuLID's requirements_fp8.txt, nunchaku, SD.Next and ComfyUI run), which differs
    from torchvision 0.15.2's plain bicubic (PuLID's requirements.txt pin) on a detailed image."""
    from imprompt.ipadapter.eva_clip import OPENAI_MEAN, OPENAI_STD
    from imprompt.ipadapter.pulid import eva_pixels

    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    got = eva_pixels(image, 336, OPENAI_MEAN, OPENAI_STD)
    smoothed = (F.interpolate(image, size=(336, 336), mode="bicubic", antialias=True) - mean) / std
    plain = (F.interpolate(image, size=(336, 336), mode="bicubic", antialias=False) - mean) / std
    assert (got - smoothed).abs().max() < 1e-6 and (got - plain).abs().max() > 0.5


def reference(root, sd, cond, uncond, weight, first_step, **call):
    """diffusers' FluxPipeline, each PuLID block's forward wrapped by hand: after double blocks 0, 2 and single
    blocks 0, 4, `image += weight * ca(id, image)` from step `first_step` on; the first transformer pass of a step
    reads the ID tokens, the true-CFG negative pass the uncond ones (PuLID's flux/model.py and sampling.py)."""
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(root / "diffusers" / MODEL)
    flux.set_progress_bar_config(disable=True)
    state = {"step": 0, "pass": 0}
    t = flux.transformer
    blocks = [t.transformer_blocks[i] for i in range(0, DOUBLE, 2)] + [t.single_transformer_blocks[j] for j in range(0, SINGLE, 4)]
    for k, block in enumerate(blocks):
        def wrapped(*args, forward=block.forward, k=k, **kwargs):
            text, image = forward(*args, **kwargs)
            if state["step"] >= first_step:
                ids = cond if state["pass"] == 1 else uncond
                image = image + weight * ref_ca(sd, k, ids.to(image), image)
            return text, image

        block.forward = wrapped
    forward = t.forward

    def counted(*args, **kwargs):
        state["pass"] += 1
        return forward(*args, **kwargs)

    t.forward = counted

    def step_end(pipe, i, timestep, tensors):
        state["step"], state["pass"] = i + 1, 0
        return tensors

    return flux(prompt="a portrait", num_inference_steps=3, width=64, height=64, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(1), callback_on_step_end=step_end, **call).images[0]


def request(*units, **fields) -> dict:
    return {"model": MODEL, "prompt": "a portrait", "seed": 1, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 3.5, "ip_adapters": list(units), **fields}


def unit(embedding, crop, **fields) -> dict:
    return {"adapter": "PuLID", "face_embeddings": embedding.tolist(), "aligned_face": crop, **fields}


@pytest.fixture(scope="module")
def engine(pack, files):
    from imprompt import Engine

    return Engine([pack, files[0]])


def test_pulid_equals_diffusers_flux_with_hand_written_block_hooks(files, engine):
    from conftest import max_diff

    root, eva_sd, sd = files
    embedding, crop = face_inputs()
    cond, uncond = ref_tokens(eva_sd, sd, embedding, crop)
    got = engine.generate(request(unit(embedding, crop, scale=0.8, start_step=1)))
    want = reference(root, sd, cond, uncond, 0.8, 1)
    assert max_diff(got.images[0], want) <= 1
    info = got.info["ip_adapters"][0]
    assert (info["adapter"], info["encoder"], info["active_steps"], info["id_weight"]) == (
        "PuLID FLUX v0.9.1", "EVA02_CLIP_L_336_psz14_s6B", [1, 2], 0.8)
    assert "deviation" not in info and not got.info.get("warnings")  # PuLID's preprocessing, no deviation left
    loaded = [e["encoder"] for e in got.info["events"] if e["event"] == "encoder_loaded"]
    assert loaded == ["EVA02_CLIP_L_336_psz14_s6B", "parsing_bisenet.pth"]  # a given crop: parsed, not detected
    plain = engine.generate(request())
    assert max_diff(got.images[0], plain.images[0]) > 10  # the ID acts
    # true CFG: the negative pass reads the uncond tokens; from step 0 (start 0)
    cfg = engine.generate(request(unit(embedding, crop), negative_prompt="blurry", true_cfg_scale=2.0))
    want = reference(root, sd, cond, uncond, 1.0, 0, negative_prompt="blurry", true_cfg_scale=2.0)
    assert max_diff(cfg.images[0], want) <= 1


def test_switching_pulid_plain_pulid_leaves_nothing_behind(pack, files):
    from conftest import max_diff

    from imprompt import Engine

    engine = Engine([pack, files[0]])
    embedding, crop = face_inputs()
    first = engine.generate(request(unit(embedding, crop)))
    plain = engine.generate(request())
    again = engine.generate(request(unit(embedding, crop)))
    assert max_diff(first.images[0], again.images[0]) == 0
    assert [r.info["ip_adapters"][0]["face"]["id_tokens"] for r in (first, again)] == ["computed", "cache"]
    # the EVA tower is an image encoder (the encoder cache holds it) and the ID tokens embeddings (so does theirs):
    # a repeated face loads and runs neither, even with an adapter cache too small to keep anything
    assert [e["event"] for e in first.info["events"]].count("encoder_loaded") == 2  # EVA and the parser
    assert "encoder_loaded" not in [e["event"] for e in again.info["events"]]
    small = Engine([pack, files[0]], adapter_cache_budget=1)
    small.generate(request(unit(embedding, crop)))
    repeated = small.generate(request(unit(embedding, crop)))
    assert repeated.info["ip_adapters"][0]["face"]["id_tokens"] == "cache"
    assert "encoder_loaded" not in [e["event"] for e in repeated.info["events"]]
    assert max_diff(repeated.images[0], again.images[0]) == 0
    assert max_diff(plain.images[0], Engine([pack, files[0]]).generate(request()).images[0]) == 0
    transformer = engine.state.pipelines.all()[0].pipeline.transformer
    hooks = [m for m in transformer.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []  # nothing left on the model


def test_a_changed_parser_file_makes_the_id_tokens_again(pack, files, tmp_path):
    """The ID tokens' cache key holds the parser file's version: a parser rewritten on disk is loaded again (the
    old one let go) and the same face's tokens are made again, equal to the reference with the new parser."""
    from conftest import max_diff

    from imprompt import Engine

    root, eva_sd, sd = files
    for name in ("diffusers", "pulid", "clip"):
        (tmp_path / name).symlink_to(root / name)
    write_tiny_bisenet(tmp_path / PARSER_FILE, seed=0)
    engine = Engine([pack, tmp_path])
    embedding, crop = face_inputs()
    first = engine.generate(request(unit(embedding, crop)))
    write_tiny_bisenet(tmp_path / PARSER_FILE, seed=1)
    second = engine.generate(request(unit(embedding, crop)))
    assert [r.info["ip_adapters"][0]["face"]["id_tokens"] for r in (first, second)] == ["computed", "computed"]
    events = [(e["event"], e["encoder"]) for e in second.info["events"] if e["event"].startswith("encoder_")]
    assert ("encoder_evicted", "parsing_bisenet.pth") in events and ("encoder_loaded", "parsing_bisenet.pth") in events
    cond, uncond = ref_tokens(eva_sd, sd, embedding, crop, tiny_bisenet(1))
    assert max_diff(second.images[0], reference(root, sd, cond, uncond, 1.0, 0)) <= 1
    assert max_diff(first.images[0], second.images[0]) > 0


@pytest.mark.parametrize("model, family", [("tiny-sd35", "SD 3.5"), ("tiny-sd15", "SD 1.5"), ("tiny-sdxl", "SDXL"),
                                           ("tiny-flux", "FLUX.1")])  # fmt: skip
def test_pulid_on_another_model_is_refused_before_compute(pack, files, model, family):
    """Another family, or a FLUX of other depths (the demo pack's: 2 double + 1 single blocks take 2 CAs, not 4)."""
    from imprompt import Engine
    from imprompt.errors import IncompatibleError

    engine = Engine([pack, files[0]])
    embedding, crop = face_inputs()
    with pytest.raises(IncompatibleError) as raised:
        engine.generate(request(unit(embedding, crop), model=model))
    message = str(raised.value)
    assert "PuLID" in message and "FLUX.1" in message and family in message and model in message and MODEL in message
    assert engine.cache_info()["pipelines"]["entries"] == []  # nothing loaded
    assert engine.generate(request()).images  # the next request is unaffected


def test_pulid_sdxl_v11_is_recognised_and_refused_where_it_does_not_run(pack, files, tmp_path, red_circle):
    from imprompt import Engine
    from imprompt.demo.tiny_dits import write_pulid_sdxl
    from imprompt.errors import IncompatibleError, RequestError, UnsupportedError
    from imprompt.models.probe import probe

    write_pulid_sdxl(tmp_path / "pulid_v1.1.safetensors", [64] * 70)  # tiny-sdxl's 70 attn2 layers, all 64 wide
    spec = probe(tmp_path / "pulid_v1.1.safetensors")
    assert (spec.variant, spec.family, len(spec.layer_widths), spec.clip_width, spec.eva_projection) == (
        "pulid-sdxl", "SDXL", 70, 128, 32)
    engine = Engine([pack, files[0], tmp_path])
    embedding, crop = face_inputs()
    sdxl = unit(embedding, crop, adapter="PuLID SDXL v1.1")
    with pytest.raises(IncompatibleError, match="PuLID SDXL v1.1.*is for SDXL models, but model flux-pulid is FLUX.1"):
        engine.generate(request(sdxl))
    with pytest.raises(UnsupportedError, match="run PuLID SDXL alone"):
        engine.generate(request({"adapter": "Base SDXL", "images": [red_circle]}, sdxl, model="tiny-sdxl", cfg_scale=7.0))
    with pytest.raises(RequestError, match="num_zero.*PuLID SDXL v1.1's"):
        engine.generate(request(unit(embedding, crop, num_zero=8)))
    assert engine.cache_info()["pipelines"]["entries"] == []  # all refused before anything loaded


def test_the_listing_names_its_eva_tower_and_face_pack(engine, files):
    from imprompt.plan import describe_store

    listed = {a["name"]: a for a in describe_store(engine.state.store)["adapters"]}
    item = listed["pulid_flux_v0.9.1"]
    assert (item["friendly_name"], item["variant"], item["encoder"], item["face_pack"]) == (
        "PuLID FLUX v0.9.1", "pulid", "EVA02_CLIP_L_336_psz14_s6B", "antelopev2")
    assert item["fits_models"] == [MODEL]
    assert item["facexlib"] == {"detection_Resnet50_Final.pth": str(files[0] / DETECTOR_FILE),
                                "parsing_bisenet.pth": str(files[0] / PARSER_FILE)} and item["facexlib_present"]  # fmt: skip


def test_imprompt_models_prints_its_eva_tower_and_face_pack(files, pack, capsys):
    from imprompt.cli import main

    main(["models", "--models", str(pack), "--models", str(files[0])])
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("PuLID FLUX v0.9.1"))
    assert "-> EVA02_CLIP_L_336_psz14_s6B" in lines[at] and "(fits: flux-pulid)" in lines[at]
    assert f"parsing_bisenet.pth: {files[0] / PARSER_FILE}" in lines[at + 1]
    assert f"detection_Resnet50_Final.pth: {files[0] / DETECTOR_FILE}" in lines[at + 1]


# ------------------------------------------------------------------------------------------------ from a face image


def centre_crop_by_hand(detector_sd, rgb):
    """facexlib's FaceRestoreHelper as PuLID calls it: RetinaFace on the BGR image at 0.97 (`facexlib_reference.
    ref_detect`, float64, independent of imprompt's detector; its rows float32 as facexlib's detect_faces returns
    them), the face whose box centre is nearest the image centre (`ref_center_face`), its five landmarks warped onto
    the FFHQ 512 template (cv2's LMEDS similarity, border (135, 133, 132) BGR); the crop back in RGB."""
    import cv2
    import numpy as np

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    rows = ref_detect(detector_sd, bgr, 0.97, 0.4)[0].astype(np.float32)
    centre = ref_center_face(rows, *rgb.shape[:2])
    template = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]])  # fmt: skip
    kps = rows[centre, 5:15].reshape(5, 2)
    matrix = cv2.estimateAffinePartial2D(kps, template, method=cv2.LMEDS)[0]
    warped = cv2.warpAffine(bgr, matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT, borderValue=(135, 133, 132))
    return cv2.cvtColor(warped, cv2.COLOR_BGR2RGB), len(rows)


def test_a_face_image_follows_pulids_whole_preprocessing_by_hand(pack, files, tmp_path_factory, caplog):
    """From an image, PuLID's get_id_embedding by hand: antelopev2 (BGR, largest face, raw embedding); facexlib's
    RetinaFace centre face (the float64 reference detector) aligned onto the FFHQ template; BiSeNet's parsing
    (non-face white, the rest gray); EVA; the IDFormer; diffusers' FLUX with the CAs by hand. Where antelopev2 finds
    no face, its glintr100 embeds the aligned crop (PuLID's fallback, logged); where RetinaFace finds none, a
    NoFaceError (PuLID: 'facexlib align face fail'). RetinaFace's detection and its cache hit are events."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    import base64
    import io
    import os

    import cv2
    import numpy as np
    from conftest import max_diff
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import get_model
    from PIL import Image
    from tools.insightface_pack import face_image, write_insightface_pack

    from imprompt import Engine
    from imprompt.errors import MissingFaceAnalysisError, NoFaceError

    root, eva_sd, sd = files
    detector = torch.load(root / DETECTOR_FILE, weights_only=True)
    faces = tmp_path_factory.mktemp("pulid-faces")
    write_insightface_pack(faces / "insightface", "antelopev2")
    engine = Engine([pack, root, faces])
    image = face_image(4)
    app = FaceAnalysis(name="antelopev2", root=str(faces / "insightface"), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    found = app.get(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    face = sorted(found, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))[-1]
    crop, detected = centre_crop_by_hand(detector, np.asarray(image))
    assert detected > 1  # the centre face chosen among several
    mask = (ref_face_features(tiny_bisenet(0), crop) == 1).all(dim=1)
    assert 0.05 < mask.float().mean() < 0.95  # the parsing whitens part of the crop, not all of it
    cond, uncond = ref_tokens(eva_sd, sd, torch.from_numpy(face["embedding"][None]), crop)
    got = engine.generate(request({"adapter": "PuLID", "images": [image]}))
    assert max_diff(got.images[0], reference(root, sd, cond, uncond, 1.0, 0)) <= 1
    info = got.info["ip_adapters"][0]
    assert info["face"]["found_by"] == "InsightFace antelopev2 (detected); facexlib RetinaFace (detected) aligned the face"
    shown = info["faces"][0]  # the aligned crop, for the web page
    assert shown["faces_found"] == detected and Image.open(io.BytesIO(base64.b64decode(shown["crop"]))).size == (112, 112)
    assert shown["retinaface"] == "detected"
    loaded = [e["encoder"] for e in got.info["events"] if e["event"] == "encoder_loaded"]
    assert sorted(loaded) == ["EVA02_CLIP_L_336_psz14_s6B", "detection_Resnet50_Final.pth", "parsing_bisenet.pth"]
    detections = [e for e in got.info["events"] if e["event"] == "face_detected"]
    assert [(e["detector"], e["faces"], e["for"]) for e in detections] == [("RetinaFace", detected, "PuLID FLUX v0.9.1")]
    again = engine.generate(request({"adapter": "PuLID", "images": [image]}))
    # a repeated image runs neither RetinaFace (its result kept), the parser nor EVA (the ID tokens kept)
    assert not [e for e in again.info["events"] if e["event"].startswith("encoder_") or e["event"] == "face_detected"]
    assert [e["detector"] for e in again.info["events"] if e["event"] == "face_reused"] == ["RetinaFace"]
    assert again.info["ip_adapters"][0]["face"]["found_by"] == ("InsightFace antelopev2 (cache); facexlib RetinaFace "
                                                                "(cache) aligned the face")  # fmt: skip
    assert again.info["ip_adapters"][0]["faces"][0]["retinaface"] == "cache"
    assert again.info["ip_adapters"][0]["face"]["id_tokens"] == "cache"
    assert max_diff(again.images[0], got.images[0]) == 0

    # antelopev2 finds no face, RetinaFace does: glintr100 on the aligned crop (BGR, as facexlib crops it)
    y, x = np.mgrid[0:256, 0:256]
    lonely = Image.fromarray(np.stack([120 + x // 2, 250 - y // 3, 130 + (x + y) // 5], -1).astype(np.uint8))  # light, in colour
    assert not app.get(cv2.cvtColor(np.asarray(lonely), cv2.COLOR_RGB2BGR))
    crop, _ = centre_crop_by_hand(detector, np.asarray(lonely))
    glint = get_model(os.path.join(faces, "insightface", "models", "antelopev2", "glintr100.onnx"),
                      providers=["CPUExecutionProvider"])  # fmt: skip
    glint.prepare(ctx_id=0)
    embedding = torch.from_numpy(glint.get_feat(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)))
    cond, uncond = ref_tokens(eva_sd, sd, embedding, crop)
    with caplog.at_level("INFO", logger="imprompt"):
        fallback = engine.generate(request({"adapter": "PuLID", "images": [lonely]}))
    assert max_diff(fallback.images[0], reference(root, sd, cond, uncond, 1.0, 0)) <= 1
    assert fallback.info["ip_adapters"][0]["face"]["fallback"] and "recognition model" in fallback.info["warnings"][0]
    assert any("found no face" in r.getMessage() and "PuLID's fallback" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage().startswith("RetinaFace (detection_Resnet50_Final.pth) found") for r in caplog.records)

    # RetinaFace finds no face: refused, naming the image and the detector
    blind = tmp_path_factory.mktemp("pulid-blind")
    write_facexlib_files(blind, detects=False)
    for name in ("diffusers", "pulid", "clip"):
        (blind / name).symlink_to(root / name)
    with pytest.raises(NoFaceError, match=r"images\.0: no face found .* RetinaFace"):
        Engine([pack, blind, faces]).generate(request({"adapter": "PuLID", "images": [image]}))
    nowhere = Engine([pack, root], insightface_root=tmp_path_factory.mktemp("empty"))
    with pytest.raises(MissingFaceAnalysisError, match="antelopev2"):
        nowhere.generate(request({"adapter": "PuLID", "images": [image]}))
    assert max_diff(engine.generate(request()).images[0], Engine([pack, root]).generate(request()).images[0]) == 0


def test_landmarks_that_fit_no_alignment_are_a_typed_error(pack, files, tmp_path, monkeypatch):
    """RetinaFace's five landmarks all on one point fit no similarity (facexlib crashes there): a NoFaceError naming
    the image and what to give instead, where it was an untyped ValueError (an HTTP 500)."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    import numpy as np
    from tools.insightface_pack import face_image, write_insightface_pack

    from imprompt import Engine
    from imprompt.errors import NoFaceError
    from imprompt.ipadapter import retinaface

    write_insightface_pack(tmp_path / "insightface", "antelopev2")
    one_point = (np.full((5, 2), 30.0, np.float32), {"box": [10.0, 10.0, 50.0, 50.0], "score": 0.99, "faces_found": 1})
    monkeypatch.setattr(retinaface, "center_face_landmarks", lambda model, rgb: one_point)
    engine = Engine([pack, files[0], tmp_path])
    with pytest.raises(NoFaceError, match=r"^ip_adapters\.0\.images\.0: RetinaFace's five landmarks .*\(box \[10\.0, 10\.0, "
                                          r"50\.0, 50\.0\], score 0\.990\) fit no alignment; .*aligned_face"):
        engine.generate(request({"adapter": "PuLID", "images": [face_image(4)]}))
    assert 400 <= NoFaceError.http_status < 500  # a client's error, not "internal error"


def test_missing_facexlib_files_are_refused_in_the_plan(pack, files, tmp_path):
    """Without facexlib's files, a PuLID request is refused before anything loads, naming each missing file, its
    release URL and the folder to put it in; a given embedding and crop need the parser alone; the next request
    runs."""
    from imprompt import Engine
    from imprompt.errors import MissingFaceAnalysisError

    root = files[0]
    for name in ("diffusers", "pulid", "clip"):
        (tmp_path / name).symlink_to(root / name)
    engine = Engine([pack, tmp_path], insightface_root=tmp_path / "insightface")
    embedding, crop = face_inputs()
    cases = [(unit(embedding, crop), ["parsing_bisenet.pth"], ["detection_Resnet50_Final.pth"]),
             ({"adapter": "PuLID", "images": [crop]}, ["parsing_bisenet.pth", "detection_Resnet50_Final.pth"], [])]
    for given, named, unnamed in cases:
        with pytest.raises(MissingFaceAnalysisError) as raised:
            engine.generate(request(given))
        message = str(raised.value)
        assert message.startswith("ip_adapters.0: PuLID PuLID FLUX v0.9.1 needs")
        assert all(n in message for n in named) and not any(n in message for n in unnamed)
        assert "https://github.com/xinntao/facexlib/releases/download/" in message
        assert f"into {tmp_path / 'facexlib'}" in message
        assert engine.cache_info()["pipelines"]["entries"] == []  # refused in the plan
    write_tiny_bisenet(tmp_path / PARSER_FILE)  # the parser alone: a given crop runs
    assert engine.generate(request(unit(embedding, crop))).images
    with pytest.raises(MissingFaceAnalysisError, match=r"needs detection_Resnet50_Final\.pth .*face_embeddings"):
        engine.generate(request({"adapter": "PuLID", "images": [crop]}))
    assert engine.generate(request()).images


def test_a_missing_pack_or_insightface_is_refused_before_anything_loads(pack, files, tmp_path, monkeypatch):
    """From an image, PuLID reads antelopev2's embedding: the plan checks the pack and InsightFace itself before the
    FLUX pipeline, the PuLID file or EVA load, refused as the loader would say it; a given embedding and crop need
    neither."""
    import sys

    from tools.insightface_pack import face_image

    from imprompt import Engine
    from imprompt.errors import MissingFaceAnalysisError

    root = files[0]
    engine = Engine([pack, root], insightface_root=tmp_path / "empty")
    with pytest.raises(MissingFaceAnalysisError, match=r"^ip_adapters\.0: PuLID from images needs InsightFace's "
                                                       r"antelopev2 model pack, found in none of: .*empty.*Unzip"):
        engine.generate(request({"adapter": "PuLID", "images": [face_image(4)]}))
    info = engine.cache_info()
    assert info["pipelines"]["entries"] == [] and not info["adapters"]["entries"], info
    assert not info["encoders"]["entries"], info["encoders"]  # neither EVA nor facexlib's models
    monkeypatch.setitem(sys.modules, "insightface", None)  # not installed
    with pytest.raises(MissingFaceAnalysisError, match=r"^ip_adapters\.0: PuLID from images needs InsightFace, which "
                                                       r"is not installed \(No module named 'insightface'\)"):
        engine.generate(request({"adapter": "PuLID", "images": [face_image(4)]}))
    assert engine.cache_info()["pipelines"]["entries"] == []
    embedding, crop = face_inputs()
    assert engine.generate(request(unit(embedding, crop))).images  # neither the pack nor InsightFace needed


# ------------------------------------------------------------------------------------------------ real shapes


def real_pulid_table() -> dict:
    """pulid_flux_v0.9.1's tensor table as PuLID's `IDFormer()` and `PerceiverAttentionCA()` defaults make it (key
    names from its `load_pretrain`, shapes from its constructors: dim 1024, 32 queries, 2048 out, 10 layers, 16 x 64
    heads, FFN 4096, mappings 1024 wide, 5 id tokens; 20 CAs of FLUX width 3072, 16 x 128 heads, id width 2048)."""
    t, e = {}, "pulid_encoder."
    t[f"{e}latents"], t[f"{e}proj_out"] = (1, 32, 1024), (1024, 2048)
    for n in range(10):
        p = f"{e}layers.{n}."
        for name in ("0.norm1", "0.norm2", "1.0"):
            t[f"{p}{name}.weight"] = t[f"{p}{name}.bias"] = (1024,)
        t |= {f"{p}0.to_q.weight": (1024, 1024), f"{p}0.to_kv.weight": (2048, 1024), f"{p}0.to_out.weight": (1024, 1024),
              f"{p}1.1.weight": (4096, 1024), f"{p}1.3.weight": (1024, 4096)}  # fmt: skip
    for name, first, last in [(f"mapping_{i}", 1024, 1024) for i in range(5)] + [("id_embedding_mapping", 1280, 5120)]:
        for j, shape in ((0, (1024, first)), (3, (1024, 1024)), (6, (last, 1024))):
            t[f"{e}{name}.{j}.weight"], t[f"{e}{name}.{j}.bias"] = shape, (shape[0],)
        for j in (1, 4):
            t[f"{e}{name}.{j}.weight"] = t[f"{e}{name}.{j}.bias"] = (1024,)
    for k in range(20):
        p = f"pulid_ca.{k}."
        t |= {f"{p}norm1.weight": (2048,), f"{p}norm1.bias": (2048,), f"{p}norm2.weight": (3072,),
              f"{p}norm2.bias": (3072,), f"{p}to_q.weight": (2048, 3072), f"{p}to_kv.weight": (4096, 2048),
              f"{p}to_out.weight": (3072, 2048)}  # fmt: skip
    return t


def real_eva_table() -> dict:
    """EVA02_CLIP_L_336_psz14_s6B.pt's `visual.*` (PuLID's EVA02-CLIP-L-14-336.json: width 1024, 24 blocks, SwiGLU
    2730, patch 14, 336 px, embed 768), with the rotary tables the loader drops."""
    t = {"visual.cls_token": (1, 1, 1024), "visual.pos_embed": (1, 577, 1024), "visual.patch_embed.proj.weight": (1024, 3, 14, 14),
         "visual.patch_embed.proj.bias": (1024,), "visual.norm.weight": (1024,), "visual.norm.bias": (1024,),
         "visual.head.weight": (768, 1024), "visual.head.bias": (768,), "visual.rope.freqs_cos": (576, 64),
         "visual.rope.freqs_sin": (576, 64)}  # fmt: skip
    for i in range(24):
        p = f"visual.blocks.{i}."
        for name in ("norm1", "norm2", "attn.inner_attn_ln", "attn.proj"):
            t[f"{p}{name}.bias"] = (1024,)
            t[f"{p}{name}.weight"] = (1024, 1024) if name == "attn.proj" else (1024,)
        t |= {f"{p}attn.{n}.weight": (1024, 1024) for n in ("q_proj", "k_proj", "v_proj")}
        t |= {f"{p}attn.q_bias": (1024,), f"{p}attn.v_bias": (1024,), f"{p}attn.rope.freqs_cos": (576, 64),
              f"{p}attn.rope.freqs_sin": (576, 64), f"{p}mlp.w1.weight": (2730, 1024), f"{p}mlp.w1.bias": (2730,),
              f"{p}mlp.w2.weight": (2730, 1024), f"{p}mlp.w2.bias": (2730,), f"{p}mlp.ffn_ln.weight": (2730,),
              f"{p}mlp.ffn_ln.bias": (2730,), f"{p}mlp.w3.weight": (1024, 2730), f"{p}mlp.w3.bias": (1024,)}  # fmt: skip
    return t


def test_the_real_layouts_build_exactly_and_are_recognised():
    """The real files' tables (no weights: 2.3 GB + 1.2 GB) build imprompt's modules key for key and shape for
    shape, and the recognisers read them as PuLID FLUX and EVA02-CLIP-L-14-336."""
    from imprompt.ipadapter.eva_clip import EvaVisionTower, eva_shape
    from imprompt.ipadapter.pulid import PuLIDFlux, cas_needed, pulid_shape
    from imprompt.loading.tensors import TensorInfo
    from imprompt.models.recognise import recognise

    table = {k: TensorInfo("BF16", s) for k, s in real_pulid_table().items()}
    with torch.device("meta"):
        module = PuLIDFlux(pulid_shape(table, "pulid"))
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == real_pulid_table()
    encoder = sum(v.numel() for k, v in module.state_dict().items() if k.startswith("pulid_encoder."))
    assert len([k for k in table if k.startswith("pulid_encoder.")]) == 172 and round(encoder / 1e6, 1) == 151.4
    assert cas_needed(19, 38) == 20
    spec = recognise("pulid_flux_v0.9.1.safetensors", table)
    assert (spec.variant, spec.cross_attention_dim, spec.tokens, spec.clip_width, spec.eva_projection) == (
        "pulid", 3072, 32, 1024, 768)
    eva = {k: TensorInfo("F32", s) for k, s in real_eva_table().items()}
    with torch.device("meta"):
        tower = EvaVisionTower(eva_shape(eva, "eva"))
    wanted = {k[7:]: s for k, s in real_eva_table().items() if "freqs" not in k}
    assert {k: tuple(v.shape) for k, v in tower.state_dict().items()} == wanted
    spec = recognise("EVA02_CLIP_L_336_psz14_s6B.pt", eva)
    assert (spec.model_type, spec.architecture, spec.image_size, spec.hidden_size, spec.projection_dim) == (
        "eva-clip", "EVA02-CLIP-L-14-336", 336, 1024, 768)


# ------------------------------------------------------------------------------------------------ SDXL v1.1


def ref_id_processor(layer: dict, tokens, scale, num_zero, mode):
    """PuLID's IDAttnProcessor2_0 (pulid/attention_processor.py) for one attn2 of diffusers' SDXL UNet, as plain
    arithmetic: the text attention, then the ID attention over [ID tokens, num_zero zeros] through id_to_k/v, added
    (off), or its part orthogonal to the text output over tokens (v1), or v2's: the projection weighted by the
    head-mean softmax of q·k_id (unscaled) summed over the first 5 ID tokens, minus 1; fp32; then to_out."""

    def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None and attn.group_norm is None and not attn.residual_connection
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def split(x):
            return x.reshape(b, x.shape[1], heads, -1).permute(0, 2, 1, 3)

        q = split(attn.to_q(hidden_states))
        k, v = split(attn.to_k(encoder_hidden_states)), split(attn.to_v(encoder_hidden_states))
        d = q.shape[-1]
        h = ((q @ k.transpose(-2, -1)) / d**0.5).softmax(-1) @ v
        h = h.permute(0, 2, 1, 3).reshape(b, n, -1)
        ids = torch.cat([tokens, torch.zeros(b, num_zero, tokens.shape[-1])], dim=1)
        ik, iv = split(ids @ layer["id_to_k"].T), split(ids @ layer["id_to_v"].T)
        h_id = (((q @ ik.transpose(-2, -1)) / d**0.5).softmax(-1) @ iv).permute(0, 2, 1, 3).reshape(b, n, -1)
        if mode == "off":
            h = h + scale * h_id
        else:
            proj = (h * h_id).sum(-2, keepdim=True) / (h * h).sum(-2, keepdim=True) * h
            if mode == "v1":
                h = h + scale * (h_id - proj)
            else:
                share = (q @ ik.transpose(-2, -1)).softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)
                h = h + scale * (h_id + (share - 1) * proj)
        return attn.to_out[0](h)

    return processor


@pytest.mark.parametrize("mode, num_zero", [("v2", 20), ("v1", 8), ("off", 0)])
def test_pulid_sdxl_equals_diffusers_sdxl_with_hand_written_processors(pack, files, tmp_path_factory, mode, num_zero):
    from conftest import max_diff
    from diffusers import StableDiffusionXLPipeline

    from imprompt import Engine
    from imprompt.demo.tiny_dits import write_pulid_sdxl

    root, eva_sd, _ = files
    sdxl = StableDiffusionXLPipeline.from_pretrained(pack / "diffusers" / "tiny-sdxl")
    sdxl.set_progress_bar_config(disable=True)
    names = list(sdxl.unet.attn_processors)
    modules = dict(sdxl.unet.named_modules())
    widths = [modules[name.removesuffix(".processor")].to_k.out_features for name in names[1::2]]
    folder = tmp_path_factory.mktemp("pulid-sdxl")
    sd = write_pulid_sdxl(folder / "pulid_v1.1.safetensors", widths)
    embedding, crop = face_inputs()
    cond, uncond = ref_tokens(eva_sd, {k.replace("id_adapter.", "pulid_encoder."): v for k, v in sd.items()},
                              embedding, crop)  # fmt: skip
    processors = dict(sdxl.unet.attn_processors)
    for k in range(1, len(names), 2):
        layer = {n: sd[f"id_adapter_attn_layers.{k}.{n}.weight"] for n in ("id_to_k", "id_to_v")}
        processors[names[k]] = ref_id_processor(layer, torch.cat([uncond, cond]), 0.8, num_zero, mode)
    sdxl.unet.set_attn_processor(processors)
    # a negative prompt: SDXL's empty one is zeros, whose text output PuLID's ortho divides by (0 / 0)
    want = sdxl("a portrait", negative_prompt="blurry", num_inference_steps=3, width=64, height=64, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    engine = Engine([pack, root, folder])
    fields = dict(model="tiny-sdxl", cfg_scale=7.0, negative_prompt="blurry")
    got = engine.generate(request(unit(embedding, crop, adapter="PuLID SDXL v1.1", scale=0.8, num_zero=num_zero,
                                       ortho=mode), **fields))  # fmt: skip
    assert max_diff(got.images[0], want) <= 1
    plain = engine.generate(request(**fields))
    assert max_diff(got.images[0], plain.images[0]) > 2  # the ID acts
    assert max_diff(plain.images[0], Engine(pack).generate(request(**fields)).images[0]) == 0  # nothing left behind
    with warnings.catch_warnings():  # an empty negative (zeros): no NaN reaches the image ("invalid value in cast")
        warnings.simplefilter("error", RuntimeWarning)
        engine.generate(request(unit(embedding, crop, adapter="PuLID SDXL v1.1", ortho=mode), model="tiny-sdxl",
                                cfg_scale=7.0))  # fmt: skip


def test_pulid_sdxl_makes_its_id_tokens_in_float32_under_a_bfloat16_unet(pack, files, tmp_path, monkeypatch):
    """PuLID's pipeline_v1_1.py runs EVA, the IDFormer and id_to_k / id_to_v in float32 beside its float16 UNet and
    casts the ID keys and values to the query's dtype in the attention: under a bfloat16 UNet the tokens are float32
    and equal to the float64 reference, id_to_k / id_to_v read and give float32, and what enters the attention is
    bfloat16."""
    from diffusers import StableDiffusionXLPipeline

    import imprompt.ipadapter.pulid as pulid
    from imprompt import Engine
    from imprompt.demo.tiny_dits import write_pulid_sdxl

    root, eva_sd, _ = files
    sdxl = StableDiffusionXLPipeline.from_pretrained(pack / "diffusers" / "tiny-sdxl")
    modules = dict(sdxl.unet.named_modules())
    widths = [modules[n.removesuffix(".processor")].to_k.out_features for n in list(sdxl.unet.attn_processors)[1::2]]
    sd = write_pulid_sdxl(tmp_path / "pulid_v1.1.safetensors", widths)
    embedding, crop = face_inputs()
    cond, uncond = ref_tokens(eva_sd, {k.replace("id_adapter.", "pulid_encoder."): v for k, v in sd.items()},
                              embedding, crop)  # fmt: skip
    seen, processor = {}, pulid.IDAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        if "cond" not in seen:
            seen.update(cond=self.run.cond, uncond=self.run.uncond, weight=self.layer.id_to_k.weight.dtype,
                        query=attn.to_q.weight.dtype)  # fmt: skip
            handle = self.layer.id_to_k.register_forward_hook(
                lambda m, args, out: seen.update(k_in=args[0].dtype, k_out=out.dtype))  # fmt: skip
            try:
                return processor(self, attn, hidden_states, *args, **kwargs)
            finally:
                handle.remove()
        return processor(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(pulid.IDAttnProcessor, "__call__", spy)
    engine = Engine([pack, root, tmp_path], dtype="bfloat16")
    got = engine.generate(request(unit(embedding, crop, adapter="PuLID SDXL v1.1"), model="tiny-sdxl", cfg_scale=7.0))
    assert got.info["dtype"] == "bfloat16" and got.info["ip_adapters"][0]["face"]["id_dtype"] == "float32"
    assert seen["cond"].dtype == seen["uncond"].dtype == torch.float32
    assert (seen["cond"] - cond).abs().max() < 1e-4 and (seen["uncond"] - uncond).abs().max() < 1e-4
    assert (seen["weight"], seen["k_in"], seen["k_out"], seen["query"]) == (torch.float32,) * 3 + (torch.bfloat16,)


@pytest.mark.parametrize("mode", ["off", "v1", "v2"])
def test_id_attention_processor_equals_the_reference_where_the_projection_matters(mode):
    """One cross-attention, fp64, ID projections equal to the text ones and ID tokens equal to the text's first
    tokens: the ID output then lies close to the text output, so the ortho projections are large and every term
    of them shows."""
    from diffusers.models.attention_processor import Attention

    from imprompt.ipadapter.pulid import IDAttnProcessor, IDLayer, SDXLRun

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=96, heads=2, dim_head=32).double()
    layer = IDLayer(64, 96).double()
    layer.id_to_k.weight.data, layer.id_to_v.weight.data = attn.to_k.weight.data.clone(), attn.to_v.weight.data.clone()
    hidden, text = torch.randn(2, 16, 64, dtype=torch.float64), torch.randn(2, 12, 96, dtype=torch.float64)
    cond, uncond = text[1:, :8] * 1.1, text[:1, :8] * 0.9
    run = SDXLRun(cond, uncond, 0.7, 4, mode, uncond_rows=(0,))
    got = IDAttnProcessor(layer, run)(attn, hidden, text)
    weights = {"id_to_k": layer.id_to_k.weight.data, "id_to_v": layer.id_to_v.weight.data}
    want = ref_id_processor(weights, torch.cat([uncond, cond]), 0.7, 4, mode)(attn, hidden, text)
    assert (got - want).abs().max() < 1e-6  # the ortho modes run in fp32, as PuLID's code
    plain = ref_id_processor(weights, torch.cat([uncond, cond]), 0.0, 4, mode)(attn, hidden, text)
    assert (got - plain).abs().max() > 1e-2


def test_sdxl_negative_row_reads_the_uncond_tokens_without_cfg(pack, files, tmp_path, monkeypatch):
    """cfg_scale 1 with AND parts: the prompt conditioning still runs the negative row (A1111's rule), rows
    [negative, part 1, part 2]; the negative row reads the uncond ID tokens, the parts the ID tokens."""
    from diffusers import StableDiffusionXLPipeline

    import imprompt.ipadapter.pulid as pulid
    from imprompt import Engine
    from imprompt.demo.tiny_dits import write_pulid_sdxl

    sdxl = StableDiffusionXLPipeline.from_pretrained(pack / "diffusers" / "tiny-sdxl")
    modules = dict(sdxl.unet.named_modules())
    widths = [modules[n.removesuffix(".processor")].to_k.out_features for n in list(sdxl.unet.attn_processors)[1::2]]
    write_pulid_sdxl(tmp_path / "pulid_v1.1.safetensors", widths)
    seen, tokens = [], pulid.SDXLRun.tokens

    def spy(self, rows):
        out = tokens(self, rows)
        if out is not None:
            n = self.cond.shape[1]
            seen.append([torch.equal(out[r, :n], self.uncond[0]) for r in range(rows)])
        return out

    monkeypatch.setattr(pulid.SDXLRun, "tokens", spy)
    embedding, crop = face_inputs()
    for cfg, want in ((1.0, [True, False, False]), (7.0, [True, False, False])):
        seen.clear()
        Engine([pack, files[0], tmp_path]).generate(request(unit(embedding, crop, adapter="PuLID SDXL v1.1"),
                                                            model="tiny-sdxl", prompt="a cat AND a dog", cfg_scale=cfg))
        assert seen and all(rows == want for rows in seen), (cfg, seen[:1])
    seen.clear()
    Engine([pack, files[0], tmp_path]).generate(request(unit(embedding, crop, adapter="PuLID SDXL v1.1"),
                                                        model="tiny-sdxl", prompt="a cat", cfg_scale=1.0))
    assert seen and all(rows == [False] for rows in seen)


def test_bad_inputs_are_refused_before_anything_loads(pack, files):
    """start with start_step, face_embeddings of another shape or a file name, an aligned_face that is no image:
    each refused naming the field, with nothing in the caches (no pipeline, no PuLID file, no EVA)."""
    from imprompt import Engine
    from imprompt.errors import ImageError, RequestError

    engine = Engine([pack, files[0]])
    embedding, crop = face_inputs()
    cases = [(unit(embedding, crop, start=0.5, start_step=0), RequestError, r"0\.start: give start_step or start"),
             (unit(embedding[:, :511], crop), RequestError, r"face_embeddings: .*512 floats .*got 1 embedding"),
             (unit(torch.cat([embedding, embedding]), crop), RequestError, r"face_embeddings: .*got 2 embedding"),
             ({**unit(embedding, crop), "face_embeddings": "face.npy"}, RequestError, r"face_embeddings: .*a file name"),
             (unit(embedding, "data:image/png;base64,AAAA"), ImageError, r"ip_adapters\.0\.aligned_face")]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            engine.generate(request(bad))
        info = engine.cache_info()
        assert info["pipelines"]["entries"] == [], bad.get("start")
        assert not (info.get("adapters") or {}).get("entries"), info.get("adapters")


def test_eva_towers_that_are_not_pulids_are_refused_in_the_plan(pack, files, tmp_path):
    """An EVA tower of the right widths but 20 blocks (PuLID reads the input of block 20) is refused before anything
    loads, picked or requested, naming the file and what PuLID needs; one of EVA02-L's widths at 224 px (EVA02-CLIP-
    L-14, not L-14-336) is not PuLID's tower."""
    import shutil
    from dataclasses import replace

    from imprompt import Engine
    from imprompt.conditioning.pulid import eva_mismatch
    from imprompt.errors import IncompatibleError

    root = tmp_path / "m"
    shutil.copytree(files[0], root)
    (root / EVA_FILE).unlink()
    write_eva_clip(root / "clip" / "EVA02_CLIP_L_psz14_s4B.pt", depth=20)
    engine = Engine([pack, root])
    embedding, crop = face_inputs()
    for fields in ({}, {"encoder": "EVA02_CLIP_L_psz14_s4B"}):
        with pytest.raises(IncompatibleError, match=r"EVA02_CLIP_L_psz14_s4B\.pt\)? has 20 blocks.*blocks 4 to 20"):
            engine.generate(request(unit(embedding, crop, **fields)))
        assert engine.cache_info()["pipelines"]["entries"] == []
    eva = engine.store.encoder("EVA02_CLIP_L_psz14_s4B") if hasattr(engine, "store") else None
    if eva is None:
        from imprompt.models.store import ModelStore

        eva = ModelStore(root).encoder("EVA02_CLIP_L_psz14_s4B")
    at = lambda size: type(eva)(**{**eva.__dict__, "spec": replace(eva.spec, hidden_size=1024, projection_dim=768,  # noqa: E731
                                                                     num_layers=24, image_size=size)})
    assert "336 px" in eva_mismatch(at(224)) and eva_mismatch(at(336)) is None
    assert eva_mismatch(type(eva)(**{**eva.__dict__, "spec": replace(eva.spec, num_layers=21)})) is None


def test_single_file_flux_counts_its_single_blocks_for_the_fit(files, tmp_path):
    """A FLUX transformer alone (ComfyUI's models/unet, BFL names) has its single blocks counted as the folder
    probe counts them, so PuLID fits it by PuLID's num_ca; one with single blocks dropped, or of unknown single
    blocks (0), is refused in the plan rather than at attach."""
    from dataclasses import replace

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from single_files import flux_original_names

    from imprompt.conditioning.ip_adapter import fits
    from imprompt.models.store import ModelStore

    root = files[0]
    state = flux_original_names(FluxTransformer2DModel.from_pretrained(root / "diffusers" / MODEL / "transformer").state_dict())
    (tmp_path / "unet").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "unet" / "flux-alone.safetensors")
    shallow = {k: v for k, v in state.items() if not k.startswith(tuple(f"single_blocks.{i}." for i in range(4, SINGLE)))}
    save_file({k: v.contiguous() for k, v in shallow.items()}, tmp_path / "unet" / "flux-shallow.safetensors")
    store = ModelStore([root, tmp_path])
    pulid = next(a for a in store.adapters if a.spec.variant == "pulid")
    by_name = {e.name: e for e in store.pipelines}
    alone, short = by_name["flux-alone"], by_name["flux-shallow"]
    assert (alone.spec.single_blocks, short.spec.single_blocks) == (SINGLE, 4)
    assert fits(pulid, by_name[MODEL]) and fits(pulid, alone) and not fits(pulid, short)
    unknown = type(alone)(**{**alone.__dict__, "spec": replace(alone.spec, single_blocks=0)})
    assert not fits(pulid, unknown)
