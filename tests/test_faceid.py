"""FaceID adapters from given face embeddings: each request equals diffusers' own FaceID path (load_ip_adapter,
which also loads the LoRA the file embeds) on the same inputs; the embedded LoRA acts exactly while its unit does,
beside the user's own LoRAs, and leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_diff
from diffusers_reference import pipeline
from safetensors.torch import save_file

from imprompt import Engine
from imprompt.errors import IncompatibleError, UnsupportedError
from imprompt.models.probe import probe
from tools.extra_models import faceid_adapter, kohya_lora, write

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def faceid_root(pack, tmp_path_factory):
    """h94 FaceID files for the tiny models (Base with its LoRA, Portrait with 16 tokens and no LoRA, an SDXL
    Base), a user LoRA, and face embeddings as files."""
    root = tmp_path_factory.mktemp("faceid")
    sd15, sdxl = pipeline(pack), pipeline(pack, "tiny-sdxl")
    write(root / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", faceid_adapter(sd15, seed=1))
    write(root / "ipadapter" / "ip-adapter-faceid-portrait_sd15.safetensors",
          faceid_adapter(sd15, seed=2, tokens=16, lora_rank=None))  # fmt: skip
    write(root / "ipadapter" / "ip-adapter-faceid_sdxl.safetensors", faceid_adapter(sdxl, seed=3))
    write(root / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=4))
    return root


@pytest.fixture(scope="module")
def faceid_engine(pack, faceid_root):
    return Engine([pack, faceid_root])


def faces(count: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 512, generator=torch.Generator().manual_seed(seed))


def generate(engine, units, prompt="a cat", model="tiny-sd15"):
    return engine.generate(model=model, prompt=prompt, seed=1, steps=STEPS, width=SIZE, height=SIZE, ip_adapters=units)


def diffusers_faceid(pack, root, file, scale, face_embeddings, model="tiny-sd15", loras=None):
    """diffusers' documented FaceID path: load_ip_adapter (no image encoder), ip_adapter_image_embeds of
    cat([zeros, faces]) [2, faces, 512]; `loras`: user LoRAs loaded beside and set by hand with faceid_0 at 1."""
    pipe = pipeline(pack, model)
    pipe.load_ip_adapter(str(root / "ipadapter"), subfolder="", weight_name=file, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    if loras:
        for name in loras:
            pipe.load_lora_weights(str(root / "Lora"), weight_name=f"{name}.safetensors", adapter_name=name.replace("-", "_"))
        pipe.set_adapters(["faceid_0", *(n.replace("-", "_") for n in loras)], [1.0, *loras.values()])
    embeds = torch.cat([torch.zeros_like(face_embeddings), face_embeddings]).unsqueeze(0)
    embeds = embeds.reshape(2, -1, 512)
    return pipe("a cat", ip_adapter_image_embeds=[embeds], num_inference_steps=STEPS, width=SIZE, height=SIZE,
                guidance_scale=7.0, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip


def test_faceid_base_equals_diffusers_and_its_lora_acts_only_with_it(pack, faceid_root, faceid_engine):
    plain = generate(faceid_engine, []).images[0]
    result = generate(faceid_engine, [{"adapter": "FaceID Base", "face_embeddings": faces().tolist(), "scale": 0.7}])
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sd15.safetensors", 0.7, faces())
    assert max_diff(result.images[0], expected) <= 1
    unit = result.info["ip_adapters"][0]
    assert unit["encoder"] == "face embeddings given" and unit["variant"] == "faceid"
    assert [e["lora"] for e in result.info["events"] if e["event"] == "lora_loaded"] == ["FaceID Base (its LoRA)"]
    assert max_diff(generate(faceid_engine, []).images[0], plain) == 0  # the FaceID LoRA is off again


def test_faceid_lora_coexists_with_the_users_lora(pack, faceid_root, faceid_engine):
    """diffusers' FaceID loading switches the user's LoRAs off (set_adapters([faceid_0])); imprompt keeps both,
    as the reference sets them by hand."""
    unit = {"adapter": "FaceID Base", "face_embeddings": faces(seed=5).tolist(), "scale": 0.6}
    result = generate(faceid_engine, [unit], prompt="a cat <lora:detail-sd15:0.7>")
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sd15.safetensors", 0.6, faces(seed=5),
                                loras={"detail-sd15": 0.7})  # fmt: skip
    assert max_diff(result.images[0], expected) <= 1
    alone = generate(Engine([pack, faceid_root]), [], prompt="a cat <lora:detail-sd15:0.7>").images[0]
    assert max_diff(generate(faceid_engine, [], prompt="a cat <lora:detail-sd15:0.7>").images[0], alone) == 0


def test_portrait_with_several_faces_from_a_file(pack, faceid_root, faceid_engine, tmp_path):
    several = faces(3, seed=7)
    np.save(tmp_path / "faces.npy", several.numpy())
    result = generate(faceid_engine, [{"adapter": "FaceID Portrait", "face_embeddings": str(tmp_path / "faces.npy"),
                                       "scale": 0.8}])  # fmt: skip
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid-portrait_sd15.safetensors", 0.8, several)
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["ip_adapters"][0]["tokens"] == 16 and result.info["ip_adapters"][0]["images"] == 3
    save_file({"faces": several}, tmp_path / "faces.safetensors")
    again = generate(faceid_engine, [{"adapter": "FaceID Portrait", "face_embeddings": str(tmp_path / "faces.safetensors"),
                                      "scale": 0.8}])  # fmt: skip
    assert max_diff(again.images[0], result.images[0]) == 0


def test_sdxl_faceid_equals_diffusers(pack, faceid_root, faceid_engine):
    result = generate(faceid_engine, [{"adapter": "FaceID Base SDXL", "face_embeddings": faces().tolist(), "scale": 0.7}],
                      model="tiny-sdxl")  # fmt: skip
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sdxl.safetensors", 0.7, faces(), "tiny-sdxl")
    assert max_diff(result.images[0], expected) <= 1


@pytest.mark.parametrize(
    ("unit", "error", "words"),
    [
        ({"adapter": "FaceID Base", "face_embeddings": [[0.1] * 256]}, IncompatibleError, ["[1, 256]", "512-d"]),
        ({"adapter": "FaceID Base", "images": ["red-circle"]}, UnsupportedError, ["face_embeddings", "512-d"]),
        ({"adapter": "Base", "face_embeddings": [[0.1] * 512]}, IncompatibleError, ["face_embeddings", "image_embeds[1024]"]),
        ({"adapter": "FaceID Base", "face_embeddings": "/nope/faces.npy"}, Exception, ["/nope/faces.npy"]),
    ],
)
def test_bad_faceid_units_are_named_and_change_nothing(pack, faceid_engine, red_circle, unit, error, words):
    plain = generate(faceid_engine, []).images[0]
    unit = {**unit, "images": [red_circle]} if unit.get("images") else unit
    with pytest.raises(error) as caught:
        generate(faceid_engine, [unit])
    for word in words:
        assert word in str(caught.value)
    assert max_diff(generate(faceid_engine, []).images[0], plain) == 0


def test_faceid_plus_is_refused_saying_why(pack, tmp_path):
    from test_probe import write_faceid_adapter

    widths = probe(pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors").layer_widths
    write_faceid_adapter(tmp_path / "ip-adapter-faceid-plusv2_sd15.safetensors", widths, lora_rank=4, clip_width=1280)
    with pytest.raises(UnsupportedError, match=r"FaceID Plus \(v2, file name contains 'v2'\).*\[1280\]"):
        generate(Engine([pack, tmp_path]), [{"adapter": "FaceID Plus v2", "face_embeddings": [[0.1] * 512]}])
