"""A1111 / SD.Next single-file base checkpoints, loaded offline, for SD 1.5 and SDXL."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import diffusers_reference as reference
import pytest
import torch
from conftest import max_diff, request, unit
from single_files import single_file_tensors, sparse_checkpoint, write_single_file
from transformers import CLIPTokenizer

from imprompt import Engine
from imprompt.demo.tiny_models import build_sd15_pipeline, build_sdxl_pipeline
from imprompt.errors import UnsupportedError
from imprompt.loading.tensors import read_tensor_table
from imprompt.models.probe import probe
from imprompt.models.single_file import CONFIGS, write_clip_vocabulary, write_config_folder

BUILDERS = {"sd15": build_sd15_pipeline, "sdxl": build_sdxl_pipeline}


@pytest.fixture(scope="module")
def a1111(tmp_path_factory) -> Path:
    """A1111's layout: `models/Stable-diffusion/*.safetensors`, written by the project from tiny pipelines with
    CLIP's real vocabulary. The diffusers folders they were written from sit beside them as references."""
    root = tmp_path_factory.mktemp("a1111")
    for name, build in BUILDERS.items():
        pipeline = build(root / "reference" / f"folder-{name}", seed=5, clip_vocabulary=True)
        write_single_file(pipeline, root / "models" / "Stable-diffusion" / f"tiny-{name}-single.safetensors")
    return root


@pytest.mark.parametrize("name, pipeline_class, layers", [("sd15", "StableDiffusionPipeline", 16),
                                                          ("sdxl", "StableDiffusionXLPipeline", 70)])  # fmt: skip
def test_single_files_probe_like_their_folders(a1111, name, pipeline_class, layers):
    single = probe(a1111 / "models" / "Stable-diffusion" / f"tiny-{name}-single.safetensors")
    folder = probe(a1111 / "reference" / f"folder-{name}")
    assert (single.kind, single.pipeline_class, len(single.layer_widths)) == ("pipeline", pipeline_class, layers)
    assert single.layer_names == folder.layer_names and single.layer_widths == folder.layer_widths
    assert single.cross_attention_dim == folder.cross_attention_dim


@pytest.mark.parametrize("name, adapter", [("sd15", "Plus"), ("sdxl", "Base SDXL")])
def test_single_files_generate_like_their_folders(pack, a1111, red_circle, name, adapter):
    """The same pixels (to 1/255: single files store fp16 weights) as the diffusers folder they came from, with
    an IP-Adapter unit, with the configs and tokenizer built offline."""
    engine = Engine([a1111 / "models", a1111 / "reference", pack / "IP-Adapter"])
    single = engine.generate(request(unit(adapter, red_circle), model=f"tiny-{name}-single"))
    folder = engine.generate(request(unit(adapter, red_circle), model=f"folder-{name}"))
    assert max_diff(single.images[0], folder.images[0]) <= 1
    assert single.info["model"] == f"tiny-{name}-single"


def test_the_clip_vocabulary_is_clips(tmp_path):
    """Built from openai-clip's BPE merges: 49,408 tokens and CLIP's own ids."""
    write_clip_vocabulary(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text((CONFIGS / "sd15" / "tokenizer" / "tokenizer_config.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def real_size_pipeline(family: str):
    """SD 1.5 / SDXL at real size on the meta device (no memory), from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS / family
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text())),
            "vae": AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text())),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return SimpleNamespace(**parts)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_real_size_checkpoints_get_exactly_the_shipped_configs(tmp_path, family):
    """For real SD 1.5 / SDXL single files, every width read from the tensors equals the published config, so
    the configs diffusers receives are the real ones."""
    path = sparse_checkpoint(tmp_path / f"{family}.safetensors", single_file_tensors(real_size_pipeline(family)))
    spec = probe(path)
    assert spec.cross_attention_dim == (768 if family == "sd15" else 2048)
    assert len(spec.layer_widths) == (16 if family == "sd15" else 70)
    written = tmp_path / "config"
    write_config_folder(path, read_tensor_table(path)[0], written)
    for config in sorted((CONFIGS / family).rglob("config.json")):
        shipped = json.loads(config.read_text())
        adjusted = json.loads((written / config.relative_to(CONFIGS / family)).read_text())
        normalise = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
        expected = normalise(shipped)
        if config.parent.name == "unet" and "transformer_layers_per_block" not in expected:  # SD 1.5: default 1
            expected["transformer_layers_per_block"] = [1, 1, 1, 1]
        assert normalise(adjusted) == expected, config.relative_to(CONFIGS)


def test_sd2_single_files_are_refused_with_a_fix(tmp_path):
    tensors = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 1024)}
    path = sparse_checkpoint(tmp_path / "sd21.safetensors", tensors)
    spec = probe(path)  # listed as what it is, with the reason; a request for it is refused by the plan
    assert spec.kind == "pipeline" and spec.model_type.startswith("v2")
    assert re.search(r"sd21.safetensors: a SD 2.x single-file .* runs SD 1.5 and SDXL", spec.unsupported)
    with pytest.raises(UnsupportedError, match=r"sd21.safetensors: a SD 2.x single-file"):
        Engine(tmp_path).generate(prompt="a cat", steps=1, width=64, height=64)


def test_an_inpainting_checkpoint_is_refused_naming_its_type(a1111, tmp_path, pack, red_circle):
    """Its UNet takes 9 channels: it would crash mid-denoise. diffusers' detection names it, and the request is
    refused before anything is loaded; the model list says why it cannot run."""
    import subprocess
    import sys

    from diffusers import UNet2DConditionModel

    pipeline = build_sd15_pipeline(tmp_path / "source", seed=5, clip_vocabulary=True)
    pipeline.unet = UNet2DConditionModel.from_config({**pipeline.unet.config, "in_channels": 9})
    write_single_file(pipeline, tmp_path / "models" / "tiny-inpainting.safetensors")
    engine = Engine([tmp_path / "models", pack / "IP-Adapter"])
    with pytest.raises(UnsupportedError, match=r"tiny-inpainting.safetensors: a SD 1.5 inpainting single-file"):
        engine.generate(request(unit("Base", red_circle), model="tiny-inpainting"))
    assert engine.cache_info()["model"] is None
    listing = subprocess.run([sys.executable, "-m", "imprompt.cli", "models", "--models", str(tmp_path / "models")],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "SD 1.5 inpainting" in listing


def test_a_v_prediction_sdxl_checkpoint_loads_as_v_prediction(a1111, tmp_path, pack, red_circle):
    """SDXL v-prediction fine-tunes carry a `v_pred` key; loaded as epsilon they draw noise. The reference is the
    folder the file came from with diffusers' scheduler switched to v-prediction."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    tensors = load_file(a1111 / "models" / "Stable-diffusion" / "tiny-sdxl-single.safetensors")
    (tmp_path / "models").mkdir()
    save_file({**tensors, "v_pred": torch.tensor([])}, tmp_path / "models" / "tiny-sdxl-vpred.safetensors")
    engine = Engine([tmp_path / "models", a1111 / "models", a1111 / "reference", pack / "IP-Adapter"])
    result = engine.generate(request(unit("Base SDXL", red_circle), model="tiny-sdxl-vpred", sampler="Euler"))

    pipe = StableDiffusionXLPipeline.from_pretrained(a1111 / "reference" / "folder-sdxl")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe = reference.load_adapters(pipe, pack, "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", reference.VIT_G)
    pipe.set_ip_adapter_scale(0.6)
    expected = reference.run(pipe, ip_adapter_image=red_circle)
    assert max_diff(result.images[0], expected) <= 1
    epsilon = engine.generate(request(unit("Base SDXL", red_circle), model="tiny-sdxl-single", sampler="Euler"))
    assert max_diff(result.images[0], epsilon.images[0]) > 10


def test_a_single_file_without_attention_blocks_is_a_checkpoint_error(a1111, tmp_path):
    from safetensors.torch import load_file, save_file

    from imprompt.errors import CheckpointError

    tensors = load_file(a1111 / "models" / "Stable-diffusion" / "tiny-sd15-single.safetensors")
    path = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".1.proj_in.weight")}, path)
    with pytest.raises(CheckpointError, match="no attention block"):
        probe(path)
