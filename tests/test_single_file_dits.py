"""All-in-one SD 3.5 and FLUX single files (ComfyUI's `checkpoints/`), loaded offline: configs from the tensors,
T5's tokenizer from the ComfyUI install around them, the same pixels as the diffusers folders they came from."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import max_diff
from single_files import sparse_checkpoint, transformer_single_file_tensors, write_transformer_single_file

from imprompt import Engine
from imprompt.demo.pack import FLUX_ADAPTERS, SD35_ADAPTER
from imprompt.demo.tiny_dits import build_flux_pipeline, build_sd3_pipeline
from imprompt.errors import MissingTokenizerError
from imprompt.loading.tensors import read_tensor_table
from imprompt.models.probe import probe
from imprompt.models.single_file import CONFIGS, COMFY_T5_TOKENIZER, write_transformer_config_folder

FLUX_V1 = Path(list(FLUX_ADAPTERS)[0]).stem
SD35 = Path(SD35_ADAPTER).stem


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Path:
    """A ComfyUI install: `models/checkpoints/` with an SD 3.5 file (no T5, as `sd3.5_large` ships it with CLIPs)
    and a FLUX file (with T5), and `comfy/text_encoders/t5_tokenizer/` as ComfyUI ships it (here the tiny T5's).
    The diffusers folders they were written from sit beside them as references."""
    root = tmp_path_factory.mktemp("ComfyUI")
    sd3 = build_sd3_pipeline(root / "reference" / "folder-sd35", seed=5, clip_vocabulary=True)
    flux = build_flux_pipeline(root / "reference" / "folder-flux", seed=5, clip_vocabulary=True)
    write_transformer_single_file(sd3, root / "models" / "checkpoints" / "tiny-sd35-aio.safetensors")
    write_transformer_single_file(flux, root / "models" / "checkpoints" / "tiny-flux-aio.safetensors")
    shutil.copytree(root / "reference" / "folder-flux" / "tokenizer_2", root / COMFY_T5_TOKENIZER)
    return root


def request(model: str, adapter: str, image, **fields) -> dict:
    return {"model": model, "prompt": "a red cat", "negative_prompt": "blurry", "seed": 3, "steps": 3, "width": 64,
            "height": 64, "cfg_scale": 4.0, "ip_adapters": [{"adapter": adapter, "images": [image], "scale": 0.7}],
            **fields}  # fmt: skip


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_dit_single_files_probe_like_their_folders(comfy, name):
    single = probe(comfy / "models" / "checkpoints" / f"tiny-{name}-aio.safetensors")
    folder = probe(comfy / "reference" / f"folder-{name}")
    assert single.unsupported is None
    assert (single.pipeline_class, single.architecture, single.family) == (folder.pipeline_class, folder.architecture, folder.family)
    assert single.layer_names == folder.layer_names and single.layer_widths == folder.layer_widths
    assert single.cross_attention_dim == folder.cross_attention_dim and single.in_channels == folder.in_channels
    assert single.text_encoders == {"sd35": ("clip_l", "clip_g"), "flux": ("clip_l", "t5xxl")}[name]


@pytest.mark.parametrize("name, adapter, fields", [("sd35", SD35, {}), ("flux", FLUX_V1, {"true_cfg_scale": 2.0})])
def test_dit_single_files_generate_like_their_folders(pack, comfy, red_circle, name, adapter, fields):
    """The same pixels (to 1/255: the file stores fp16 weights) as the folder, with an IP-Adapter unit: configs
    read from the tensors, CLIP's vocabulary built offline, T5's tokenizer from the ComfyUI install."""
    engine = Engine([comfy / "models", comfy / "reference", pack])
    single = engine.generate(request(f"tiny-{name}-aio", adapter, red_circle, **fields))
    folder = engine.generate(request(f"folder-{name}", adapter, red_circle, **fields))
    assert single.info["model"] == f"tiny-{name}-aio"
    assert max_diff(single.images[0], folder.images[0]) <= 1
    without = engine.generate(request(f"tiny-{name}-aio", adapter, red_circle, **fields) | {"ip_adapters": []})
    assert max_diff(single.images[0], without.images[0]) > 0  # the adapter is attached to the single file's model


def test_sd35_with_clip_towers_of_one_width_reads_each_from_its_own_tensors(pack, tmp_path, red_circle):
    """diffusers tells SD 3's two CLIP towers apart by width only (768 / 1280); in a file where both are 32 wide
    imprompt still fills bigG from `text_encoders.clip_g.`: the same pixels as the folder."""
    sd3 = build_sd3_pipeline(tmp_path / "reference" / "same-widths", seed=6, clip_vocabulary=True, clip_widths=(32, 32))
    write_transformer_single_file(sd3, tmp_path / "models" / "same-widths-aio.safetensors")
    engine = Engine([tmp_path / "models", tmp_path / "reference", pack])
    single = engine.generate(request("same-widths-aio", SD35, red_circle))
    assert max_diff(single.images[0], engine.generate(request("same-widths", SD35, red_circle)).images[0]) <= 1


def test_a_single_file_holding_t5_needs_its_tokenizer_and_says_where_to_get_it(comfy, pack, red_circle, tmp_path, monkeypatch):
    """T5's tokenizer is in no checkpoint: outside a ComfyUI install and with an empty Hugging Face cache, the
    request is refused before anything loads, naming the command that fetches it; the cache is the second place
    looked in."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    alone = tmp_path / "models"
    alone.mkdir()
    shutil.copy(comfy / "models" / "checkpoints" / "tiny-flux-aio.safetensors", alone)
    engine = Engine([alone, pack])
    with pytest.raises(MissingTokenizerError, match=r"holds a T5 text encoder.*hf download black-forest-labs/FLUX.1-schnell"):
        engine.generate(request("tiny-flux-aio", FLUX_V1, red_circle))
    assert engine.cache_info()["model"] is None
    # the same tokenizer where that command puts it (refs/main -> snapshots/<commit>/tokenizer_2/) is found there
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-schnell" / "snapshots" / ("0" * 40)
    shutil.copytree(comfy / COMFY_T5_TOKENIZER, snapshot / "tokenizer_2")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert engine.generate(request("tiny-flux-aio", FLUX_V1, red_circle)).images


def test_files_without_what_their_pipeline_needs_are_listed_with_the_reason(comfy, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(comfy / "models" / "checkpoints" / "tiny-flux-aio.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_encoders.t5xxl.")}, tmp_path / "no-t5.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith("model.")}, tmp_path / "alone.safetensors")
    save_file({**tensors, "scaled_fp8": torch.tensor([])}, tmp_path / "scaled.safetensors")
    assert "without its t5xxl" in probe(tmp_path / "no-t5.safetensors").unsupported
    alone = probe(tmp_path / "alone.safetensors")  # the transformer alone: ComfyUI's split layout, run with parts
    assert alone.unsupported is None and alone.parts == ("vae", "clip_l", "t5xxl")
    assert probe(tmp_path / "scaled.safetensors").unsupported is None  # scaled fp8 runs (test_quantized_files.py)


# ---------------------------------------------------------------------------------- real sizes, on the meta device


def real_size_pipeline(architecture: str, **transformer_fields):
    """SD 3.5 Large / FLUX.1 dev at real size on the meta device (no memory), from the shipped configs."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = CONFIGS / architecture

    def config(sub):
        return json.loads((folder / sub / "config.json").read_text())

    with torch.device("meta"):
        model = SD3Transformer2DModel if architecture == "sd3" else FluxTransformer2DModel
        parts = {"transformer": model.from_config({**config("transformer"), **transformer_fields}),
                 "vae": AutoencoderKL.from_config(config("vae"))}  # fmt: skip
        clip_l = CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")
        t5 = T5EncoderModel(T5Config.from_json_file(folder / f"text_encoder_{3 if architecture == 'sd3' else 2}" / "config.json"))
        if architecture == "sd3":
            clip_g = CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")
            parts.update(text_encoder=CLIPTextModelWithProjection(clip_l), text_encoder_2=CLIPTextModelWithProjection(clip_g),
                         text_encoder_3=t5)  # fmt: skip
        else:
            parts.update(text_encoder=CLIPTextModel(clip_l), text_encoder_2=t5)
    return SimpleNamespace(**parts)


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_real_size_files_get_exactly_the_shipped_configs(tmp_path, architecture):
    """For SD 3.5 Large and FLUX.1 dev at real size, every width read from the tensors equals the published
    config, so the configs diffusers receives are the real ones; and the probe sees the real layouts."""
    path = sparse_checkpoint(tmp_path / "real.safetensors", transformer_single_file_tensors(real_size_pipeline(architecture)))
    spec = probe(path)
    assert spec.unsupported is None
    if architecture == "sd3":
        assert (spec.model_type, spec.cross_attention_dim, len(spec.layer_widths)) == ("sd35_large", 2432, 38)
    else:
        assert (spec.model_type, spec.cross_attention_dim, len(spec.layer_widths)) == ("flux-dev", 4096, 19)
    written = tmp_path / "config"
    write_transformer_config_folder(path, read_tensor_table(path)[0], written, architecture, None)
    for config in sorted((CONFIGS / architecture).rglob("*config.json")):
        shipped = json.loads(config.read_text())
        assert json.loads((written / config.relative_to(CONFIGS / architecture)).read_text()) == shipped, config.name


def test_sd35_medium_reads_its_dual_attention_blocks(tmp_path):
    """SD 3.5 Medium's published transformer (24 blocks, the first 13 with a second attention, 384 positions)
    comes back from its tensors alone, though imprompt ships SD 3.5 Large's config."""
    medium = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                  dual_attention_layers=tuple(range(13)))  # fmt: skip
    path = sparse_checkpoint(tmp_path / "medium.safetensors",
                             transformer_single_file_tensors(real_size_pipeline("sd3", **medium)))  # fmt: skip
    assert probe(path).model_type == "sd35_medium"
    written = tmp_path / "config"
    write_transformer_config_folder(path, read_tensor_table(path)[0], written, "sd3", None)
    config = json.loads((written / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in medium} == {**medium, "dual_attention_layers": list(range(13))}


def test_headers_too_large_to_map_are_read_as_the_library_reads_them(comfy, tmp_path):
    """The header reader for files the safetensors library cannot map gives the library's table, and refuses a
    header whose offsets do not match its shapes."""
    from imprompt.errors import CheckpointError
    from imprompt.loading.tensors import parse_safetensors_header, read_safetensors_header

    path = comfy / "models" / "checkpoints" / "tiny-flux-aio.safetensors"
    assert parse_safetensors_header(path) == read_safetensors_header(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s + 1 for s in header[name]["shape"]]
    text = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    with pytest.raises(CheckpointError, match="do not hold"):
        parse_safetensors_header(tmp_path / "bad.safetensors")
