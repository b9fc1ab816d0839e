"""Prompts as A1111 computes them: prompt editing and alternation (a text per denoising call), AND (composable
parts, weighted into the guidance), a prompt and negative of unequal lengths each at its own length (A1111's
default) or padded (`pad_cond_uncond`), and SDXL's clip skip. Each picture is held to `a1111_reference.py`, a
denoising loop written from A1111's rules over diffusers' UNet; the schedules are A1111's documented ones, as data."""

from __future__ import annotations

import json

import pytest
from a1111_reference import denoise, sd15_cond, sdxl_cond
from conftest import max_diff
from diffusers_reference import pipeline
from server_fixtures import client, decode, running_server

from imprompt import Engine
from imprompt.prompting.schedule import composable, schedule

STEPS, CFG, SEED = 4, 7.0, 1

# A1111's own documented examples (the docstring of `get_learned_conditioning_prompt_schedules`, 10 steps): data
A1111_SCHEDULES = {
    "test": [[10, "test"]],
    "a [b:3]": [[3, "a "], [10, "a b"]],
    "a [b: 3]": [[3, "a "], [10, "a b"]],
    "a [[[b]]:2]": [[2, "a "], [10, "a [[b]]"]],
    "[(a:2):3]": [[3, ""], [10, "(a:2)"]],
    "a [b : c : 1] d": [[1, "a b  d"], [10, "a  c  d"]],
    "a[b:[c:d:2]:1]e": [[1, "abe"], [2, "ace"], [10, "ade"]],
    "a [unbalanced": [[10, "a [unbalanced"]],
    "a [b:.5] c": [[5, "a  c"], [10, "a b c"]],
    "((a][:b:c [d:3]": [[3, "((a][:b:c "], [10, "((a][:b:c d"]],
    "[a|(b:1.1)]": [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)],
    "[fe|]male": [[i, "female" if i % 2 else "male"] for i in range(1, 11)],
    "[fe|||]male": [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)],
}


@pytest.mark.parametrize("prompt", sorted(A1111_SCHEDULES))
def test_schedules_are_a1111s_documented_ones(prompt):
    assert [list(entry) for entry in schedule(prompt, 10)] == A1111_SCHEDULES[prompt]


def test_and_splits_into_weighted_parts_as_a1111_reads_them():
    assert composable("a cat AND a dog:0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert composable("(red:1.2") == [("(red", 1.2)]  # a trailing weight without AND: the one part's
    assert composable("BLACK and white") == [("BLACK and white", 1.0)]


@pytest.fixture(scope="module")
def pipes(pack):
    return {"tiny-sd15": pipeline(pack, "tiny-sd15"), "tiny-sdxl": pipeline(pack, "tiny-sdxl")}


def generate(engine, model, prompt, negative="blurry", **fields):
    return engine.generate(model=model, prompt=prompt, negative_prompt=negative, sampler="Euler", seed=SEED,
                           steps=STEPS, width=64, height=64, cfg_scale=CFG, **fields)  # fmt: skip


def cond_of(model):
    return sd15_cond if model == "tiny-sd15" else sdxl_cond


# (prompt, the texts of denoising calls 0..3 as A1111 reads them: the first schedule entry whose step >= the call)
EDITS = [
    ("a [red:blue:2] cat", ["a red cat", "a red cat", "a red cat", "a blue cat"]),
    ("a [red:blue:0.25] cat", ["a red cat", "a red cat", "a blue cat", "a blue cat"]),  # 0.25 x 4 steps: step 1
    ("a [blue:3] cat", ["a  cat", "a  cat", "a  cat", "a  cat"]),  # switches after call 3, the last
    ("a [red::1] cat", ["a red cat", "a red cat", "a  cat", "a  cat"]),
    ("a [red:[blue:green:3]:1] cat", ["a red cat", "a red cat", "a blue cat", "a blue cat"]),  # nested
    ("a [red|blue] cat", ["a red cat", "a red cat", "a blue cat", "a red cat"]),  # alternation
]


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize(("prompt", "texts"), EDITS, ids=[e[0] for e in EDITS])
def test_prompt_editing_and_alternation_equal_a1111s_per_call_conditioning(engine, pipes, model, prompt, texts):
    pipe, cond = pipes[model], cond_of(model)
    negative = cond(pipe, "blurry")
    conds = [cond(pipe, text) for text in texts]
    expected = denoise(pipe, lambda i: (negative, [(conds[i], 1.0)]), steps=STEPS, cfg=CFG, seed=SEED)
    got = generate(engine, model, prompt)
    assert max_diff(got.images[0], expected) <= 1
    shown = got.info["prompt_schedule"]["prompt"][0]["texts"]
    assert [t for s in shown for t in [s["text"]] * (s["steps"][1] - s["steps"][0] + 1)] == texts


def test_a_scheduled_negative_prompt_and_weights_inside_edits(engine, pipes):
    """The negative prompt is scheduled too; A1111's attention weights act inside the edited text."""
    pipe = pipes["tiny-sd15"]
    negatives = [sd15_cond(pipe, t) for t in ("ugly", "ugly", "blurry", "blurry")]
    plain = generate(engine, "tiny-sd15", "a red cat", negative="[ugly:blurry:1]")
    expected = denoise(pipe, lambda i: (negatives[i], [(sd15_cond(pipe, "a red cat"), 1.0)]), steps=STEPS, cfg=CFG,
                       seed=SEED)  # fmt: skip
    assert max_diff(plain.images[0], expected) <= 1
    weighted = generate(engine, "tiny-sd15", "a [(red:1.5):blue:2] cat")
    assert max_diff(weighted.images[0], generate(engine, "tiny-sd15", "a [red:blue:2] cat").images[0]) > 0


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_and_weights_each_part_into_the_guidance(engine, pipes, model):
    pipe, cond = pipes[model], cond_of(model)
    negative, cat, dog = cond(pipe, "blurry"), cond(pipe, "a red cat"), cond(pipe, " a blue dog")
    expected = denoise(pipe, lambda i: (negative, [(cat, 1.0), (dog, 0.5)]), steps=STEPS, cfg=CFG, seed=SEED)
    assert max_diff(generate(engine, model, "a red cat AND a blue dog:0.5").images[0], expected) <= 1
    weighted = denoise(pipe, lambda i: (negative, [(cat, 1.3)]), steps=STEPS, cfg=CFG, seed=SEED)
    assert max_diff(generate(engine, model, "a red cat:1.3").images[0], weighted) <= 1  # the one part's weight


LONG = " ".join(f"word{i}" for i in range(60))  # four 75-token chunks, no comma to move words by


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_a_long_prompt_and_a_short_negative_run_at_their_own_lengths_unless_padded(engine, pipes, model):
    """A1111's default (`pad_cond_uncond` off): the negative runs at its own one chunk; with the setting on, it gets
    empty-prompt chunks to the prompt's length and both run as one batch, another picture."""
    pipe, cond = pipes[model], cond_of(model)
    negative, prompt = cond(pipe, "blurry"), cond(pipe, LONG)
    assert prompt[0].shape[1] == 4 * 77 and negative[0].shape[1] == 77
    expected = denoise(pipe, lambda i: (negative, [(prompt, 1.0)]), steps=STEPS, cfg=CFG, seed=SEED)
    own = generate(engine, model, LONG)
    assert max_diff(own.images[0], expected) <= 1 and "Pad conds" not in own.infotexts[0]
    empty = cond(pipe, "")
    import torch

    padded_negative = (torch.cat([negative[0]] + [empty[0]] * 3, dim=1), negative[1])
    expected_padded = denoise(pipe, lambda i: (padded_negative, [(prompt, 1.0)]), steps=STEPS, cfg=CFG, seed=SEED)
    padded = generate(engine, model, LONG, pad_cond_uncond=True)
    assert max_diff(padded.images[0], expected_padded) <= 1 and "Pad conds: True" in padded.infotexts[0]
    assert max_diff(padded.images[0], own.images[0]) > 0


def test_sdxl_ignores_clip_skip_unless_its_clip_l_setting_is_on(engine, pipes):
    """A1111 reads both SDXL text encoders at their penultimate layer whatever the clip skip (said in warnings);
    `sdxl_clip_l_skip` makes CLIP-L's layer the clip skip's (1: the last), CLIP-G's stays the penultimate."""
    pipe = pipes["tiny-sdxl"]
    plain = generate(engine, "tiny-sdxl", "a red cat")
    skipped = generate(engine, "tiny-sdxl", "a red cat", clip_skip=2)
    assert max_diff(plain.images[0], skipped.images[0]) == 0
    assert any("clip_skip=2 does not act on SDXL" in w for w in skipped.info["warnings"])
    for clip_skip in (1, 2):
        negative, prompt = sdxl_cond(pipe, "blurry", clip_skip), sdxl_cond(pipe, "a red cat", clip_skip)
        expected = denoise(pipe, lambda i: (negative, [(prompt, 1.0)]), steps=STEPS, cfg=CFG, seed=SEED)
        got = generate(engine, "tiny-sdxl", "a red cat", clip_skip=clip_skip, sdxl_clip_l_skip=True)
        assert max_diff(got.images[0], expected) <= 1 and got.info["warnings"] == []


def test_a1111_payloads_and_the_command_line_carry_schedules_and_the_settings(pack, tmp_path):
    """Through the HTTP API (A1111's `override_settings`) and the CLI, with the schedule in `info`."""
    import subprocess
    import sys

    engine = Engine(pack, allow_paths=False)
    expected = generate(engine, "tiny-sd15", LONG + " [red:blue:2]", pad_cond_uncond=True)
    payload = {"prompt": LONG + " [red:blue:2]", "negative_prompt": "blurry", "sampler_name": "Euler", "seed": SEED,
               "steps": STEPS, "width": 64, "height": 64, "cfg_scale": CFG,
               "override_settings": {"sd_model_checkpoint": "tiny-sd15", "pad_cond_uncond": True}}  # fmt: skip
    with running_server(engine) as url, client(url) as http:
        answer = http.post("/sdapi/v1/txt2img", json=payload)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert max_diff(decode(answer.json()["images"][0]).convert("RGB"), expected.images[0]) == 0
        assert info["pad_cond_uncond"] is True and info["prompt"] == payload["prompt"]  # written as the client sent it
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "generate", "--models", str(pack), "--model",
                           "tiny-sd15", "--prompt", "a [red|blue] cat", "--negative-prompt", "blurry", "--sampler",
                           "Euler", "--seed", str(SEED), "--steps", str(STEPS), "--width", "64", "--height", "64",
                           "--pad-cond-uncond", "--out", str(out), "--json"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["prompt_schedule"]["prompt"][0]["texts"]
    assert [s["text"] for s in shown] == ["a red cat", "a blue cat", "a red cat"]


def test_and_is_refused_where_the_image_prompts_cannot_follow_its_rows(engine, red_circle):
    from imprompt.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="needs classifier-free guidance"):
        engine.plan({"model": "tiny-sd15", "prompt": "a cat AND a dog", "cfg_scale": 1.0,
                     "ip_adapters": [{"adapter": "Base", "images": [red_circle]}]})  # fmt: skip
    plain = engine.plan({"model": "tiny-sd15", "prompt": "a [cat|dog]", "cfg_scale": 1.0,
                         "ip_adapters": [{"adapter": "Base", "images": [red_circle]}]})  # one part: fine
    assert plain.units


def test_pad_cond_uncond_pads_scheduled_and_composable_prompts_too(engine, pipes):
    """A1111 pads at every call, whatever the schedule or the parts: the stacked parts against the negative."""
    import torch

    pipe = pipes["tiny-sd15"]
    negative, empty = sd15_cond(pipe, "blurry"), sd15_cond(pipe, "")
    padded_negative = (torch.cat([negative[0]] + [empty[0]] * 3, dim=1), None)
    long_red, long_blue = sd15_cond(pipe, LONG + " red"), sd15_cond(pipe, LONG + " blue")
    conds = [long_red, long_red, long_red, long_blue]
    expected = denoise(pipe, lambda i: (padded_negative, [(conds[i], 1.0)]), steps=STEPS, cfg=CFG, seed=SEED)
    got = generate(engine, "tiny-sd15", LONG + " [red:blue:2]", pad_cond_uncond=True)
    assert max_diff(got.images[0], expected) <= 1 and "Pad conds: True" in got.infotexts[0]
    assert max_diff(got.images[0], generate(engine, "tiny-sd15", LONG + " [red:blue:2]").images[0]) > 0


def test_heun_counts_a_schedule_over_twice_the_steps_as_a1111(engine):
    """A1111 builds a second-order sampler's schedule over 2 x steps: `[a:b:0.5]` switches after call 4 of 7."""
    got = engine.generate(model="tiny-sd15", prompt="a [red:blue:0.5] cat", sampler="Heun", seed=SEED, steps=4,
                          width=64, height=64)  # fmt: skip
    assert got.info["prompt_schedule"]["prompt"][0]["texts"] == [{"steps": [1, 5], "text": "a red cat"},
                                                                 {"steps": [6, 7], "text": "a blue cat"}]  # fmt: skip


def test_and_below_cfg_1_is_combined_at_the_cfg_scale_as_a1111(engine, pipes):
    pipe = pipes["tiny-sd15"]
    negative, cat, dog = sd15_cond(pipe, "blurry"), sd15_cond(pipe, "a red cat"), sd15_cond(pipe, " a blue dog")
    for cfg in (0.5, 1.0):
        expected = denoise(pipe, lambda i: (negative, [(cat, 1.0), (dog, 0.5)]), steps=STEPS, cfg=cfg, seed=SEED)
        got = engine.generate(model="tiny-sd15", prompt="a red cat AND a blue dog:0.5", negative_prompt="blurry",
                              sampler="Euler", seed=SEED, steps=STEPS, width=64, height=64, cfg_scale=cfg)  # fmt: skip
        assert max_diff(got.images[0], expected) <= 1, cfg


@pytest.mark.parametrize(
    ("prompt", "entries"),
    [
        ("a [b:c:1e400] d", [[10, "a b d"]]),  # past every step: never switches (no overflow)
        ("a [b:c:-1e400] d", [[10, "a c d"]]),
        ("(" * 600 + "a [b:3]", [[10, "(" * 600 + "a [b:3]"]]),  # deeper than any prompt: its own text
        ("a [b:2] \\\nc", [[10, "a [b:2] \\\nc"]]),  # A1111's escape takes no line end: no schedule
        ("a [b:c:３]", [[10, "a [b:c:３]"]]),  # a step is written in ASCII digits, as in A1111's grammar
    ],
)
def test_prompts_that_once_raised_or_read_otherwise_than_a1111(prompt, entries):
    assert [list(entry) for entry in schedule(prompt, 10)] == entries


def test_parts_texts_and_weights_are_bounded_and_finite(engine):
    from imprompt.errors import LimitError, RequestError, UnsupportedError

    with pytest.raises(LimitError, match="17 parts"):
        engine.plan({"model": "tiny-sd15", "prompt": " AND ".join(["a cat"] * 17)})
    many = "[a|b|c][d|e|f|g][h|i|j|k|l][m|n|o|p|q|r|s]"  # 420 texts before they repeat: one per step
    with pytest.raises(LimitError, match="texts over 150 steps"):
        engine.plan({"model": "tiny-sd15", "prompt": many, "steps": 150})
    with pytest.raises(RequestError, match="weight .* is inf"):
        engine.plan({"model": "tiny-sd15", "prompt": "a cat:1" + "0" * 400})
    with pytest.raises(UnsupportedError, match="prompt editing and alternation .* not computed for FLUX"):
        engine.plan({"model": "tiny-flux", "prompt": "a [red|blue] cat", "cfg_scale": 3.5})


def test_a1111_settings_of_other_schedules_are_refused_when_on(pack):
    engine = Engine(pack, allow_paths=False)
    with running_server(engine) as url, client(url) as http:
        for setting in ("use_old_scheduling", "pad_cond_uncond_v0"):
            answer = http.post("/sdapi/v1/txt2img", json={"prompt": "a [red:blue:0.5] cat", "steps": 2, "width": 64,
                               "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd15", setting: True}})  # fmt: skip
            assert answer.status_code == 422 and setting in answer.json()["detail"], answer.text
