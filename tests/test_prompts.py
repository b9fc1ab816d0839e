"""A1111 prompt syntax: attention weights, 75-token chunks, BREAK, commas, and the HTTP / CLI paths that carry
LoRAs, VAE and clip skip (A1111 payloads, webuiapi), with concurrent clients each getting their own picture."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import webuiapi
from conftest import max_diff
from diffusers_reference import pipeline
from PIL import Image
from server_fixtures import client, decode, running_server

from imprompt import Engine
from imprompt.errors import RequestError
from imprompt.prompting.encode import Reading, chunks, encode_text
from imprompt.prompting.syntax import BREAK, parse_attention, take_lora_tags
from tools.extra_models import write_extra_models

# A1111's own documented examples of its prompt parser (the docstring of `parse_prompt_attention`)
A1111_EXAMPLES = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
}  # fmt: skip


@pytest.mark.parametrize("text", sorted(A1111_EXAMPLES))
def test_attention_syntax_reads_as_a1111_documents(text):
    assert parse_attention(text) == A1111_EXAMPLES[text]


def test_break_and_lora_tags():
    assert parse_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    text, tags = take_lora_tags("a <lora:Detail:0.5> cat <lyco:style> x")
    assert text == "a  cat  x" and [(t.name, t.weight) for t in tags] == [("Detail", 0.5), ("style", 1.0)]


@pytest.fixture(scope="module")
def sd15(pack):
    return pipeline(pack)


@pytest.fixture(scope="module")
def sdxl(pack):
    return pipeline(pack, "tiny-sdxl")


def test_weighted_prompt_equals_a1111s_arithmetic(sd15):
    """`(red:1.5) cat`: each fragment tokenized on its own, the vectors of "red" times 1.5, then the chunk's mean
    restored; computed here directly with transformers, handed to diffusers as prompt_embeds."""
    embeds, _ = encode_text(sd15, "(red:1.5) cat", Reading(), [], {}, "prompt")
    tokenizer, encoder = sd15.tokenizer, sd15.text_encoder
    red = tokenizer("red", add_special_tokens=False).input_ids
    cat = tokenizer(" cat", add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id] + red + cat + [tokenizer.eos_token_id] * (76 - len(red) - len(cat))
    with torch.no_grad():
        z = encoder(torch.tensor([ids]))[0]
        weights = torch.ones(77)
        weights[1 : 1 + len(red)] = 1.5
        weighted = z * weights.reshape(1, -1, 1)
        expected = weighted * (z.mean() / weighted.mean())
    assert torch.equal(embeds, expected)
    plain, _ = encode_text(sd15, "red cat", Reading(), [], {}, "prompt")
    assert not torch.equal(plain, expected)


def test_prompt_without_weights_is_diffusers_own_encoding(sd15, sdxl):
    for pipe in (sd15, sdxl):
        ours, pooled = encode_text(pipe, "a red cat on a mat", Reading(), [], {}, "prompt")
        negative, _ = encode_text(pipe, "blurry", Reading(), [], {}, "negative_prompt")
        theirs = pipe.encode_prompt("a red cat on a mat", device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True, negative_prompt="blurry")  # fmt: skip
        assert torch.equal(ours, theirs[0]) and torch.equal(negative, theirs[1])
        if pipe is sdxl:
            assert torch.equal(pooled, theirs[2])


def test_long_prompts_are_chunks_of_75_tokens(sd15, sdxl):
    words = " ".join(f"word{i}" for i in range(150))
    for pipe, width in ((sd15, sd15.text_encoder.config.hidden_size), (sdxl, 2048)):
        tokens = len(pipe.tokenizer(words, add_special_tokens=False).input_ids)
        embeds, _ = encode_text(pipe, words, Reading(), [], {}, "prompt")
        count = -(-tokens // 75)
        assert embeds.shape == (1, 77 * count, width) and count >= 2


def test_a_full_chunk_breaks_at_its_last_comma(sd15):
    """A1111: a chunk that fills up moves the words after its last comma (if at most 20 tokens back) on."""
    tokenizer = sd15.tokenizer
    head = " ".join(["cat"] * 70) + ","
    tail = " dog dog dog dog dog dog dog dog"
    first, second = chunks(head + tail, tokenizer, [], {})
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    assert first.tokens[:71].count(comma) == 1 and first.tokens[71:] == [tokenizer.eos_token_id] * 4
    assert second.tokens[:8] == tokenizer(tail, add_special_tokens=False).input_ids
    assert len(chunks("a cat BREAK a dog", tokenizer, [], {})) == 2


def test_sdxl_empty_negative_is_zeros_as_diffusers_makes_it(engine):
    """SDXL's empty negative prompt is zeros (diffusers' force_zeros_for_empty_prompt, A1111's
    force_zero_negative_prompt): the engine's picture is diffusers' own with negative_prompt left out."""
    from diffusers_reference import pipeline as reference_pipeline
    from diffusers_reference import run

    ours = engine.generate(model="tiny-sdxl", prompt="a cat", negative_prompt="", seed=1, steps=4, width=64,
                           height=64, cfg_scale=7.0).images[0]  # fmt: skip
    assert max_diff(ours, run(reference_pipeline(engine.store.roots[0], "tiny-sdxl"))) <= 1


# ------------------------------------------------------------------------------------------------ HTTP, CLI


@pytest.fixture(scope="module")
def extras(pack, tmp_path_factory):
    return write_extra_models(tmp_path_factory.mktemp("a1111"), pack)


@pytest.fixture(scope="module")
def server(pack, extras):
    with running_server(Engine([pack, extras], allow_paths=False), model="tiny-sd15") as url:
        yield url


def payload(prompt="a cat", **fields) -> dict:
    return {"prompt": prompt, "seed": 1, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0, **fields}


def post(url, body):
    with client(url) as http:
        response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text[:1000]
    data = response.json()
    return decode(data["images"][0]).convert("RGB"), json.loads(data["info"])


def test_a1111_payload_with_lora_vae_and_clip_skip(server, pack, extras):
    image, info = post(server, payload("a (shiny:1.2) cat <lora:detail-sd15:0.7>",
                                       override_settings={"sd_vae": "soft-vae.safetensors", "CLIP_stop_at_last_layers": 2}))  # fmt: skip
    assert [lo["name"] for lo in info["loras"]] == ["detail-sd15"] and info["clip_skip"] == 2
    assert info["vae"]["name"] == "soft-vae.safetensors" and info["textual_inversions"][0]["name"] == "shiny"
    assert info["warnings"] == []
    text = info["infotexts"][0]
    for field in ("Lora hashes:", "TI hashes:", "VAE: soft-vae.safetensors", "Clip skip: 2"):
        assert field in text
    direct = Engine([pack, extras]).generate(model="tiny-sd15", prompt="a (shiny:1.2) cat <lora:detail-sd15:0.7>",
                                              seed=1, steps=3, width=64, height=64, vae="soft-vae.safetensors",
                                              clip_skip=2)  # fmt: skip
    assert max_diff(image, direct.images[0]) == 0
    _, plain = post(server, payload(override_settings={"sd_vae": "Automatic"}))
    assert plain["vae"] is None and plain["loras"] == []


def test_listings_show_what_fits_the_current_model(server):
    with client(server) as http:
        loras = {lo["name"] for lo in http.get("/sdapi/v1/loras").json()}
        embeddings = http.get("/sdapi/v1/embeddings").json()
        vaes = [v["model_name"] for v in http.get("/sdapi/v1/sd-vae").json()]
    assert {"detail-sd15", "style-sd15"} <= loras and "style-sdxl" not in loras
    assert "shiny" in embeddings["loaded"] and vaes == ["soft-vae.safetensors"]


def test_concurrent_clients_with_different_loras_get_their_own_pictures(server, pack, extras):
    prompts = ["a cat <lora:detail-sd15:1>", "a cat <lora:style-sd15:0.8>", "a cat", "a cat <lora:detail-sd15:-0.5>"] * 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda p: post(server, payload(p))[0], prompts))
    engine = Engine([pack, extras])
    for prompt, image in zip(prompts, answers):
        alone = engine.generate(model="tiny-sd15", prompt=prompt, seed=1, steps=3, width=64, height=64).images[0]
        assert max_diff(image, alone) == 0, prompt


def test_webuiapi_prompt_with_lora_tag(server):
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    result = api.txt2img(prompt="a cat <lora:style-sd15:0.6>", seed=1, steps=3, width=64, height=64, cfg_scale=7.0)
    assert [lo["name"] for lo in result.info["loras"]] == ["style-sd15"]


def test_cli_lora_and_vae_flags(pack, extras, tmp_path):
    out = tmp_path / "out.png"
    done = subprocess.run(
        [sys.executable, "-m", "imprompt.cli", "generate", "--models", str(pack), "--models", str(extras),
         "--model", "tiny-sd15", "--prompt", "a cat", "--lora", "detail-sd15:0.7", "--vae", "soft-vae",
         "--clip-skip", "2", "--seed", "1", "--steps", "3", "--width", "64", "--height", "64", "--out", str(out),
         "--json"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout)
    assert info["loras"][0]["source"] == "loras" and info["vae"]["name"] == "soft-vae.safetensors"
    assert "<lora:detail-sd15:0.7>" in Image.open(out).info["parameters"]


def test_a_weight_that_is_no_number_is_refused_in_the_plan(pack):
    engine = Engine(pack)
    with pytest.raises(RequestError, match=r"^prompt: the weight in .*\(cat:\.\).* is '\.', not a number"):
        engine.generate({"model": "tiny-sd15", "prompt": "a (cat:.)", "steps": 2, "width": 64, "height": 64})
    assert engine.state.pipelines.all() == []
