"""A LoRA that only half fits the model (layers for modules the model does not have) loads what fits, and says so:
in the result's warnings and the log, on every request that uses it, not only the one that loaded it."""

from __future__ import annotations

import logging

import json

import torch
from conftest import max_diff
from server_fixtures import client, running_server

from imprompt import Engine
from tools.extra_models import kohya_lora, write


def test_a_lora_that_half_loads_is_reported_on_every_request(pack, tmp_path, caplog):
    from diffusers import StableDiffusionPipeline

    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    whole = kohya_lora(sd15, seed=1)
    partial = dict(whole)
    for block in (7, 8):  # layers of a deeper UNet than this one, which diffusers loads without a word
        prefix = f"lora_unet_down_blocks_{block}_attentions_0_transformer_blocks_0_attn1_to_q"
        partial |= {f"{prefix}.lora_down.weight": torch.zeros(4, 32), f"{prefix}.lora_up.weight": torch.zeros(32, 4),
                    f"{prefix}.alpha": torch.tensor(4.0)}  # fmt: skip
    write(tmp_path / "Lora" / "whole.safetensors", whole)
    write(tmp_path / "Lora" / "partial.safetensors", partial)
    engine = Engine([pack, tmp_path])
    call = {"model": "tiny-sd15", "seed": 1, "steps": 2, "width": 64, "height": 64}
    with caplog.at_level(logging.WARNING, logger="imprompt"):
        first = engine.generate(prompt="a cat <lora:partial:0.8>", **call)
    pairs = sum(k.endswith("lora_down.weight") for k in partial)
    expected = f"LoRA partial: {pairs - 2} of its {pairs} layers"
    assert any(expected in w for w in first.info["warnings"]), first.info["warnings"]
    assert any(expected in r.getMessage() for r in caplog.records)
    again = engine.generate(prompt="a cat <lora:partial:0.8>", **call)  # loaded already: still said
    assert any(expected in w for w in again.info["warnings"])
    fine = engine.generate(prompt="a cat <lora:whole:0.8>", **call)
    assert fine.info["warnings"] == []
    assert max_diff(fine.images[0], again.images[0]) == 0  # what fits is loaded and acts
    with running_server(engine) as url, client(url) as http:  # an A1111 client reads it in info.warnings
        answer = http.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:partial:0.8>", "steps": 2, "width": 64,
                                                      "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}})  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert any(expected in w for w in json.loads(answer.json()["info"])["warnings"])
