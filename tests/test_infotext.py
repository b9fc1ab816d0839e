"""The PNG "parameters" text (A1111's infotext) read back by real readers: every field imprompt writes comes back
with its value, and every number is the one that made the image (batch seeds included)."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from conftest import max_diff, request, unit
from PIL import Image
from sd_parsers import ParserManager
from server_fixtures import b64, client, new_engine, running_server


def a1111_read(text: str) -> tuple[str, str, dict]:
    """A1111's own reader (`parse_generation_parameters` in modules/infotext_utils.py): the last line holds the
    `key: value` pairs (at least 3), matched by A1111's `re_param`; a value in double quotes is a JSON string."""
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    assert len(pattern.findall(last)) >= 3, text
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if into_negative else prompt).append(line)
    fields = {k: json.loads(v) if v.startswith('"') and v.endswith('"') else v for k, v in pattern.findall(last)}
    return "\n".join(prompt), "\n".join(negative), fields


def png_parameters(png: Image.Image) -> str:
    return png.info["parameters"]


def sd_parsers_read(png_bytes: bytes):
    return ParserManager().parse(Image.open(io.BytesIO(png_bytes)))


PROMPT = 'a "red" circle, on blue:\nsecond line'
NEGATIVE = "blurry, dark"


@pytest.fixture(scope="module")
def served(pack):
    """One img2img request with a batch of 2, a named sampler with Karras sigmas, a negative prompt and a unit,
    through the HTTP API: the PNGs and the response's info."""
    red = Image.open(pack / "images" / "red-circle.png").convert("RGB")
    payload = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 41, "steps": 4, "width": 64, "height": 64,
               "cfg_scale": 6.5, "batch_size": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
               "init_images": [b64(red)], "denoising_strength": 0.6,
               "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
               "ip_adapter": [{"adapter": "Base", "images": [b64(red)], "scale": 0.6, "start": 0.25}]}  # fmt: skip
    with running_server(new_engine(pack)) as url, client(url) as http:
        response = http.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    return [base64.b64decode(i) for i in body["images"]], json.loads(body["info"])


def test_every_field_comes_back_through_a1111s_reader(served):
    pngs, info = served
    for i, png in enumerate(pngs):
        prompt, negative, fields = a1111_read(png_parameters(Image.open(io.BytesIO(png))))
        assert (prompt, negative) == (PROMPT, NEGATIVE)
        unit = info["ip_adapters"][0]
        assert fields == {
            "Steps": "4", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5", "Seed": str(41 + i),
            "Size": "64x64", "Model": "tiny-sd15", "Denoising strength": "0.6", "Batch size": "2", "Batch pos": str(i),
            "IP Adapter": "Base:0.6:0.25:1.0", "IP Adapter encoders": unit["encoder"],
            "Version": f"imprompt {info['version']}",
        }  # fmt: skip
        assert info["infotexts"][i] == png_parameters(Image.open(io.BytesIO(png)))
    assert info["all_seeds"] == [41, 42]


def test_sd_parsers_reads_the_standard_fields(served):
    """sd-parsers (PyPI) reads A1111's fields. It splits the last line on ',' and ':' naively, so values that hold
    one (the IP-Adapter fields) are beyond it; A1111's own reader above gets those."""
    pngs, _ = served
    for i, png in enumerate(pngs):
        read = sd_parsers_read(png)
        assert read.full_prompt == PROMPT and read.full_negative_prompt == NEGATIVE
        [sampler] = read.samplers
        assert sampler.name == "DPM++ 2M"
        assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "6.5", "seed": str(41 + i), "steps": "4"}
        assert [m.name for m in read.models] == ["tiny-sd15"]
        assert read.metadata["Size"] == "64x64" and read.metadata["Denoising strength"] == "0.6"
        assert read.metadata["Batch pos"] == str(i)


def test_batch_image_i_is_the_single_image_of_seed_plus_i(engine, red_circle):
    """A1111's behaviour: a generator per image, so a batch's seeds are real seeds."""
    batch = engine.generate(request(unit("Plus", red_circle), seed=7, batch_size=3))
    assert batch.info["all_seeds"] == [7, 8, 9]
    for i, image in enumerate(batch.images):
        alone = engine.generate(request(unit("Plus", red_circle), seed=7 + i))
        assert max_diff(image, alone.images[0]) == 0
        assert f"Seed: {7 + i}," in batch.infotexts[i]
    assert max_diff(batch.images[0], batch.images[1]) > 0


def test_default_sampler_is_named_as_a1111_names_it(engine):
    """"Default" is the model's own scheduler (PNDM for SD 1.5), which A1111 calls PLMS, and reads back as such."""
    result = engine.generate(request())
    _, _, fields = a1111_read(result.parameters)
    assert fields["Sampler"] == "PLMS" and "Schedule type" not in fields
    again = engine.generate(request(sampler=fields["Sampler"]))
    assert max_diff(again.images[0], result.images[0]) == 0


def test_txt2img_writes_no_denoising_strength(engine):
    _, _, fields = a1111_read(engine.generate(request(denoising_strength=0.3)).parameters)
    assert "Denoising strength" not in fields


def test_saved_png_files_carry_their_own_seed(tmp_path, engine, red_circle):
    result = engine.generate(request(unit("Base", red_circle), seed=3, batch_size=2))
    for i in range(2):
        written = Image.open(result.save(tmp_path / f"{i}.png", index=i))
        assert a1111_read(png_parameters(written))[2]["Seed"] == str(3 + i)
