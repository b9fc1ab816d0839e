"""probe(): checkpoint -> spec, from tensor tables alone.

Covers the demo pack's six adapters, its two encoder folders and its pipeline; pickled `.bin` adapters; real-size
architectures (ViT-L/H/bigG encoders, SDXL adapters) written as sparse files whose header describes the real
tensor shapes but whose data is never written; FaceID layouts; and malformed files, which must be reported as
`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from imprompt.demo.pack import SD15_MODEL
from imprompt.demo.tiny_models import write_adapter
from imprompt.errors import CheckpointError
from imprompt.loading.tensors import read_safetensors_header
from imprompt.models.probe import probe
from imprompt.models.specs import AdapterSpec, EncoderSpec, PipelineSpec

MODELS = ("IP-Adapter", "models")

# stem -> (variant, consumes, embed_dim, tokens)
SIX_ADAPTERS = {
    "ip-adapter_sd15": ("base", "image_embeds", 1024, 4),
    "ip-adapter_sd15_light": ("base", "image_embeds", 1024, 4),
    "ip-adapter-plus_sd15": ("plus", "hidden_states", 64, 16),
    "ip-adapter-plus-face_sd15": ("plus", "hidden_states", 64, 16),
    "ip-adapter-full-face_sd15": ("full-face", "hidden_states", 64, 257),
    "ip-adapter_sd15_vit-G": ("base", "image_embeds", 1280, 4),
}

# SDXL's 70 cross-attention layers in UNet processor order: down 1 (640), down 2 (1280), up 0 (1280), up 1 (640), mid.
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10

_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
_ST_SIZES = {"F16": 2, "BF16": 2, "F32": 4}


# ----------------------------------------------------------------------------------------------------- helpers


def adapter_path(pack, stem):
    return pack.joinpath(*MODELS, f"{stem}.safetensors")


@pytest.fixture(scope="module")
def sd15_widths(pack):
    return list(probe(pack / "diffusers" / SD15_MODEL).layer_widths)


def write_sparse_safetensors(path, shapes: dict, dtype: str = "F16", metadata: dict | None = None):
    """A safetensors file whose header describes `shapes` but whose data region is a hole: the file has the
    right size (so every entry lies inside it) without a single tensor byte being written."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        size = n * _ST_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def clip_vision_shapes(hidden, intermediate, layers, projection, heads=16):
    """Tensor names and shapes of a transformers CLIPVisionModelWithProjection of this size (built on the meta
    device: no memory). `projection=None` drops `visual_projection.weight` (a CLIPVisionModel checkpoint)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=projection or 512,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=224,
        patch_size=14,
    )
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert "vision_model.embeddings.patch_embedding.weight" in shapes  # the h94 / ComfyUI key names
    if projection is None:
        shapes.pop("visual_projection.weight")
    return shapes


def ip_attn_shapes(widths, cross):
    shapes = {}
    for j, width in enumerate(widths):
        shapes[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = [width, cross]
        shapes[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = [width, cross]
    return shapes


def write_faceid_adapter(path, widths, cross=768, embed=512, tokens=4, lora_rank=None, clip_width=None):
    """The h94 FaceID image_proj layout (MLPProjModel): proj.0 -> GELU -> proj.2 -> norm; with `clip_width`, the
    Plus family's perceiver_resampler over CLIP hidden states; with `lora_rank`, the LoRA FaceID files embed
    (`<n>.to_q_lora.down.weight` ... on every attention processor, self- and cross-attention)."""
    g = torch.Generator().manual_seed(5)
    tensors = {
        "image_proj.proj.0.weight": torch.randn(1024, embed, generator=g),
        "image_proj.proj.0.bias": torch.randn(1024, generator=g),
        "image_proj.proj.2.weight": torch.randn(tokens * cross, 1024, generator=g),
        "image_proj.proj.2.bias": torch.randn(tokens * cross, generator=g),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    if clip_width:
        tensors["image_proj.perceiver_resampler.proj_in.weight"] = torch.randn(cross, clip_width, generator=g)
        tensors["image_proj.perceiver_resampler.proj_out.weight"] = torch.randn(cross, cross, generator=g)
    for j, width in enumerate(widths):
        tensors[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = torch.randn(width, cross, generator=g)
        tensors[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = torch.randn(width, cross, generator=g)
        for key_id, source in ((2 * j, width), (2 * j + 1, cross)) if lora_rank else ():
            for name in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
                tensors[f"ip_adapter.{key_id}.{name}.down.weight"] = torch.randn(lora_rank, width if name in
                                                                                ("to_q_lora", "to_out_lora") else source)  # fmt: skip
                tensors[f"ip_adapter.{key_id}.{name}.up.weight"] = torch.randn(width, lora_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path)
    return path


def without_path(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "path"}


# ------------------------------------------------------------------------------------------------ the demo pack


@pytest.mark.parametrize("stem", list(SIX_ADAPTERS))
def test_pack_adapters(pack, stem):
    variant, consumes, embed_dim, tokens = SIX_ADAPTERS[stem]
    spec = probe(adapter_path(pack, stem))
    assert isinstance(spec, AdapterSpec)
    assert spec.kind == "ip-adapter"
    assert spec.variant == variant
    assert spec.consumes == consumes
    assert spec.embed_dim == embed_dim
    assert spec.tokens == tokens
    assert spec.cross_attention_dim == 768
    assert len(spec.layer_widths) == 16
    assert spec.family == "SD 1.5"
    assert spec.needs == f"{consumes}[{embed_dim}]"
    d = spec.to_dict()
    assert d["layers"] == 16 and d["family"] == "SD 1.5" and "layer_widths" not in d
    assert d["path"] == str(adapter_path(pack, stem))


def test_adapter_layer_widths_follow_the_unet(pack, sd15_widths):
    """Every adapter's per-layer widths are those of the UNet's cross-attention layers, in the same order."""
    for stem in SIX_ADAPTERS:
        assert list(probe(adapter_path(pack, stem)).layer_widths) == sd15_widths


@pytest.mark.parametrize(
    "folder, projection, hidden",
    [(("IP-Adapter", "models", "image_encoder"), 1024, 64), (("IP-Adapter", "sdxl_models", "image_encoder"), 1280, 96)],
)
def test_pack_encoder_folders(pack, folder, projection, hidden):
    spec = probe(pack.joinpath(*folder))
    assert isinstance(spec, EncoderSpec)
    assert spec.kind == "image-encoder"
    assert spec.path == str(pack.joinpath(*folder))  # the folder, not its weights file
    assert spec.projection_dim == projection
    assert spec.hidden_size == hidden
    assert spec.num_layers == 3
    assert spec.image_size == 224
    assert spec.patch_size == 14
    assert spec.num_attention_heads == 4  # from config.json: shapes cannot tell
    assert spec.architecture == "custom"
    assert spec.produces("image_embeds") == projection
    assert spec.produces("hidden_states") == hidden


def test_pack_pipeline_folder(pack):
    spec = probe(pack / "diffusers" / SD15_MODEL)
    assert isinstance(spec, PipelineSpec)
    assert spec.kind == "pipeline"
    assert spec.pipeline_class == "StableDiffusionPipeline"
    assert spec.cross_attention_dim == 768
    assert len(spec.layer_widths) == 16
    assert spec.family == "SD 1.5"
    assert spec.default_size == 64
    d = spec.to_dict()
    assert d["cross_attention_layers"] == 16 and d["family"] == "SD 1.5"


def test_to_dict_is_json(pack):
    """to_dict() of every kind of spec is plain JSON (what `imprompt probe --json` and the server print)."""
    paths = [adapter_path(pack, s) for s in SIX_ADAPTERS]
    paths += [pack / "diffusers" / SD15_MODEL, pack.joinpath(*MODELS, "image_encoder")]
    for path in paths:
        d = probe(path).to_dict()
        assert json.loads(json.dumps(d)) == d
        assert d["kind"] in ("ip-adapter", "image-encoder", "pipeline")


@pytest.mark.parametrize("variant, embed_dim", [("base", 1024), ("plus", 64), ("full-face", 64), ("base", 1280)])
def test_bin_adapters_probe_like_safetensors(tmp_path, sd15_widths, variant, embed_dim):
    st_path = write_adapter(tmp_path / "a.safetensors", variant, embed_dim, sd15_widths, 768, seed=3)
    bin_path = write_adapter(tmp_path / "a.bin", variant, embed_dim, sd15_widths, 768, seed=3, file_format="bin")
    from_st, from_bin = probe(st_path), probe(bin_path)
    assert from_bin.path == str(bin_path)
    assert without_path(from_bin.to_dict()) == without_path(from_st.to_dict())
    assert from_bin.layer_widths == from_st.layer_widths
    assert from_bin.variant == variant and from_bin.embed_dim == embed_dim


def test_legacy_pickle_adapter(pack, tmp_path):
    """A `.bin` in torch's pre-1.6 (non-zip) format cannot be memory-mapped; it is still read, safely."""
    from safetensors.torch import load_file

    flat = load_file(adapter_path(pack, "ip-adapter-plus_sd15"))
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        group, _, name = key.partition(".")
        nested[group][name] = tensor
    path = tmp_path / "ip-adapter-plus_sd15.bin"
    torch.save(nested, path, _use_new_zipfile_serialization=False)
    expected = probe(adapter_path(pack, "ip-adapter-plus_sd15"))
    assert without_path(probe(path).to_dict()) == without_path(expected.to_dict())


def test_custom_token_counts(tmp_path, sd15_widths):
    base = probe(write_adapter(tmp_path / "b.safetensors", "base", 1024, sd15_widths, 768, seed=1, tokens=16))
    plus = probe(write_adapter(tmp_path / "p.safetensors", "plus", 64, sd15_widths, 768, seed=1, tokens=8))
    assert (base.variant, base.tokens) == ("base", 16)
    assert (plus.variant, plus.tokens) == ("plus", 8)


# --------------------------------------------------------------------------------------- real-size, sparse files

REAL_ENCODERS = {
    # name: (hidden, intermediate, layers, projection, activation)
    "ViT-H-14": (1280, 5120, 32, 1024, "gelu"),
    "ViT-bigG-14": (1664, 8192, 48, 1280, "gelu"),
    "ViT-L-14": (1024, 4096, 24, 768, "quick_gelu"),
}


@pytest.mark.parametrize("name", list(REAL_ENCODERS))
def test_real_size_single_file_encoders(tmp_path, name):
    hidden, intermediate, layers, projection, act = REAL_ENCODERS[name]
    path = write_sparse_safetensors(
        tmp_path / "clip_vision" / f"{name}.safetensors", clip_vision_shapes(hidden, intermediate, layers, projection)
    )
    assert os.path.getsize(path) > 500 * 2**20  # the header really describes a full-size model
    spec = probe(path)
    assert isinstance(spec, EncoderSpec)
    assert spec.architecture == name
    assert (spec.hidden_size, spec.projection_dim, spec.num_layers) == (hidden, projection, layers)
    assert (spec.image_size, spec.patch_size, spec.intermediate_size) == (224, 14, intermediate)
    assert spec.num_attention_heads == 16  # from the published family (no config in the file)
    assert spec.hidden_act == act
    json.dumps(spec.to_dict())


def test_real_size_encoder_folder(tmp_path):
    """An h94-style folder (config.json + model.safetensors) of the real ViT-H size."""
    folder = tmp_path / "image_encoder"
    write_sparse_safetensors(folder / "model.safetensors", clip_vision_shapes(1280, 5120, 32, 1024))
    config = {"model_type": "clip_vision_model", "hidden_size": 1280, "num_hidden_layers": 32,
              "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 1024}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    spec = probe(folder)
    assert spec.path == str(folder)
    assert (spec.architecture, spec.hidden_size, spec.projection_dim, spec.num_layers) == ("ViT-H-14", 1280, 1024, 32)


def test_real_size_encoder_without_projection(tmp_path):
    """A CLIPVisionModel checkpoint (no visual_projection): hidden states only, still recognised as ViT-H."""
    path = write_sparse_safetensors(tmp_path / "h.safetensors", clip_vision_shapes(1280, 5120, 32, None))
    spec = probe(path)
    assert spec.projection_dim is None
    assert spec.produces("image_embeds") is None
    assert spec.produces("hidden_states") == 1280
    assert spec.architecture == "ViT-H-14"


def test_real_size_sdxl_base_adapter(tmp_path):
    """ip-adapter_sdxl.safetensors: ImageProjection over bigG's 1280-d image_embeds, 4 tokens of 2048."""
    shapes = {
        "image_proj.proj.weight": [4 * 2048, 1280],
        "image_proj.proj.bias": [4 * 2048],
        "image_proj.norm.weight": [2048],
        "image_proj.norm.bias": [2048],
        **ip_attn_shapes(SDXL_WIDTHS, 2048),
    }
    spec = probe(write_sparse_safetensors(tmp_path / "ip-adapter_sdxl.safetensors", shapes))
    assert isinstance(spec, AdapterSpec)
    assert (spec.variant, spec.consumes, spec.embed_dim, spec.tokens) == ("base", "image_embeds", 1280, 4)
    assert spec.cross_attention_dim == 2048
    assert spec.family == "SDXL"
    assert list(spec.layer_widths) == SDXL_WIDTHS
    assert spec.to_dict()["layers"] == 70


def test_real_size_sdxl_plus_vit_h_adapter(tmp_path):
    """ip-adapter-plus_sdxl_vit-h: Resampler over ViT-H's 1280-d hidden states, 16 tokens of 2048."""
    shapes = {
        "image_proj.latents": [1, 16, 1280],
        "image_proj.proj_in.weight": [1280, 1280],
        "image_proj.proj_in.bias": [1280],
        "image_proj.proj_out.weight": [2048, 1280],
        "image_proj.proj_out.bias": [2048],
        "image_proj.norm_out.weight": [2048],
        "image_proj.norm_out.bias": [2048],
        **ip_attn_shapes(SDXL_WIDTHS, 2048),
    }
    spec = probe(write_sparse_safetensors(tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors", shapes))
    assert (spec.variant, spec.consumes, spec.embed_dim, spec.tokens) == ("plus", "hidden_states", 1280, 16)
    assert spec.family == "SDXL"


def test_faceid_adapter(tmp_path, sd15_widths):
    spec = probe(write_faceid_adapter(tmp_path / "ip-adapter-faceid_sd15.safetensors", sd15_widths))
    assert isinstance(spec, AdapterSpec)
    assert spec.variant == "faceid"
    assert spec.consumes == "faceid_embeds"
    assert spec.embed_dim == 512
    assert spec.tokens == 4
    assert spec.cross_attention_dim == 768
    assert spec.needs == "faceid_embeds[512]"
    assert (spec.lora_rank, spec.clip_width, spec.faceid_version) == (None, None, None)
    json.dumps(spec.to_dict())


@pytest.mark.parametrize(
    ("stem", "clip_width", "tokens", "expected"),
    [
        ("ip-adapter-faceid-plusv2_sd15", 1280, 4, ("faceid-plus", "v2", "file name contains 'v2'")),
        ("ip-adapter-faceid-plus_sd15", 1280, 4, ("faceid-plus", "v1", "file name has no 'v2'")),
        ("my-renamed-faceid-v2", 1024, 4, ("faceid-plus", "v2", "file name contains 'v2'")),
        ("ip-adapter-faceid-portrait_sd15", None, 16, ("faceid-portrait", None, None)),
        ("ip-adapter-faceid-portrait_sdxl_unnorm", None, 16, ("faceid-portrait", "unnorm", "file name contains 'unnorm'")),
        ("ip-adapter-faceid_sd15", None, 4, ("faceid", None, None)),
    ],
)
def test_faceid_variants_their_lora_and_clip_width(tmp_path, sd15_widths, stem, clip_width, tokens, expected):
    """What tensors tell (face width, tokens, the embedded LoRA's rank, the CLIP width Plus reads) is read from
    them; v1 / v2 Plus, whose tensors are identical, is read from the file name and says so."""
    path = write_faceid_adapter(tmp_path / f"{stem}.safetensors", sd15_widths, tokens=tokens, lora_rank=8,
                                clip_width=clip_width)  # fmt: skip
    spec = probe(path)
    assert (spec.variant, spec.faceid_version, spec.faceid_from) == expected
    assert (spec.embed_dim, spec.tokens, spec.lora_rank, spec.clip_width) == (512, tokens, 8, clip_width)


# --------------------------------------------------------------------------------------------------- bad files


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as info:
        probe(tmp_path / "nope.safetensors")
    assert str(tmp_path / "nope.safetensors") in str(info.value)


def test_folder_that_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder") as info:
        probe(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="extension"):
        probe(path)


def test_unrelated_tensors_are_listed_as_unknown_naming_them(tmp_path):
    """Readable tensors of no kind imprompt knows: "unknown" (not "unreadable"), with what the file holds."""
    path = tmp_path / "mystery.safetensors"
    save_file({"mystery.weight": torch.zeros(3), "other.bias": torch.zeros(2)}, path)
    spec = probe(path)
    assert (spec.kind, spec.path) == ("unknown", str(path))
    assert "2 tensors" in spec.detail and "mystery.weight" in spec.detail


def test_adapter_without_attention_layers(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(CheckpointError, match="not a valid IP-Adapter"):
        probe(path)


def test_truncated_file(pack, tmp_path):
    data = adapter_path(pack, "ip-adapter_sd15").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        probe(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value) or "outside" in str(info.value)


def _header_file(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "header, data",
    [
        (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}', b"\0" * 4),  # not JSON
        (b"[1, 2, 3]", b""),  # not an object
        (b'{"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 4]}}', b"\0" * 4),  # unknown dtype
        (b'{"a": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}}', b"\0" * 4),  # negative dim
        (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 4),  # beyond the file
        (b'{"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}', b"\0" * 4),  # size mismatch
        (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4),  # duplicate key
        (b'{"__metadata__": {"x": 1}}', b""),  # metadata values must be strings
        (b'\xff\xfe{"a": 1}', b""),  # not UTF-8
    ],
)
def test_malformed_headers(tmp_path, header, data):
    path = _header_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError) as info:
        read_safetensors_header(path)
    assert info.value.path == str(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file .*header length"):
        probe(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a valid safetensors file .*header too small"):
        probe(tmp_path / "tiny.safetensors")


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
    path = _header_file(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError):
        probe(path)


@pytest.mark.parametrize("seed", [2, 61])
def test_corrupt_pickle_is_a_checkpoint_error(tmp_path, seed):
    path = tmp_path / "corrupt.bin"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError) as info:
        probe(path)
    assert str(path) in str(info.value)


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_adapter_files_give_checkpoint_errors(tiny_adapter_bytes, tmp_path, data):
    """Any truncation or byte change of a valid adapter file either still probes or raises CheckpointError
    naming the file: never another exception."""
    damaged = bytearray(tiny_adapter_bytes)
    (header_len,) = struct.unpack("<Q", tiny_adapter_bytes[:8])
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, 8 + header_len - 1), st.integers(0, 255)), max_size=3), label="flips"
    )
    for index, value in flips:
        damaged[index] = value
    cut = data.draw(st.sampled_from([len(damaged), 8 + header_len, len(damaged) - 1, 4, 0]), label="cut")
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(damaged[:cut]))
    try:
        spec = probe(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(spec, AdapterSpec)


@pytest.fixture(scope="module")
def tiny_adapter_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny.safetensors"
    write_adapter(path, "base", 8, [8, 16], 16, seed=0)
    return path.read_bytes()
