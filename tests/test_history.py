"""Output depends on the request alone: any sequence of requests (switches, mixes, failures, evictions) gives,
for each request, exactly the pixels that request gives as the first one in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import max_diff, request, unit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imprompt import Engine
from imprompt.errors import ImpromptError
from imprompt.pack import write_adapter


def menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid requests, named. Images are paths so a fresh process can read the same request from JSON."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    return {
        "none": request(seed=3),
        "base": request(unit("Base", red, 0.6)),
        "light": request(unit("Light", yellow, 0.8), seed=2),
        "plus": request(unit("Plus", red, 0.5), seed=3),
        "plus-face": request(unit("Plus Face", white, 0.7)),
        "full-face": request(unit("Full Face", red, 0.6), seed=4),
        "vit-g": request(unit("Base ViT-G", yellow, 0.6)),
        "base+vit-g": request(unit("Base", red, 0.6), unit("Base ViT-G", yellow, 0.5)),
        "plus+vit-g+full": request(unit("Plus", white, 0.5), unit("Base ViT-G", red, 0.4), unit("Full Face", yellow, 0.3), seed=5),
        "base-2-images-window": request({"adapter": "Base", "images": [red, yellow], "scale": 0.7, "start": 0.25, "end": 0.75}),
        "light+plus-face": request(unit("Light", white, 0.6), unit("Plus Face", red, 0.6), seed=6),
    }  # fmt: skip


def sdxl_menu(images: dict[str, str]) -> dict[str, dict]:
    """SDXL requests, and SD 1.5 ones, to be mixed: every switch between them changes the base model."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    sdxl = {"model": "tiny-sdxl"}
    return {
        "xl-base": request(unit("Base SDXL", red, 0.6), **sdxl),
        "xl-plus+vit-h": request(unit("Plus ViT-H SDXL", yellow, 0.5), unit("Base ViT-H SDXL", white, 0.5), seed=2, **sdxl),
        "xl-style-masked": request({**unit("Base SDXL", white, 0.9, layers="style"), "masks": [yellow]}, seed=3, **sdxl),
        "xl-composition-window": request(unit("Ostris Composition ViT-H SDXL", red, 0.7, start=0.25), seed=4, **sdxl),
        "xl-none": request(seed=5, **sdxl),
    }  # fmt: skip


def failing(images: dict[str, str]) -> dict[str, dict]:
    red = images["red-circle"]
    return {
        "unknown-adapter": request(unit("Base XL Turbo", red)),
        "bad-image": request(unit("Plus", "bm90IGFuIGltYWdl")),  # base64 of "not an image"
        "start-after-end": request(unit("Base", red, start=0.8, end=0.2)),
        "wrong-encoder": request({**unit("Base ViT-G", red), "encoder": "IP-Adapter/models/image_encoder"}),
        "corrupt-file": request(unit("ip-adapter_broken", red)),
        "sdxl-on-sd15": request(unit("ip-adapter_sdxl_test", red)),
        "second-unit-bad": request(unit("Base ViT-G", red), unit("Nope", red)),
        "sd15-on-sdxl": request(unit("Plus", red), model="tiny-sdxl"),
        "bad-layers": request(unit("Base SDXL", red, layers={"down": {"block_0": 1.0}}), model="tiny-sdxl"),
    }


FRESH_PROCESS = """
import json, sys
from imprompt import Engine
roots, req, out = json.loads(sys.argv[1])
Engine(roots).generate(req).images[0].save(out)
"""


@pytest.fixture(scope="module")
def roots(pack, tmp_path_factory) -> list[str]:
    """The pack plus a folder of bad files: a truncated adapter and an SDXL-width adapter."""
    extra = tmp_path_factory.mktemp("extra")
    good = (pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors").read_bytes()
    (extra / "ip-adapter_broken.safetensors").write_bytes(good[: len(good) // 2])
    write_adapter(extra / "ip-adapter_sdxl_test.safetensors", "base", 1280, [640, 1280], 2048, seed=99)
    return [str(pack), str(extra)]


@pytest.fixture(scope="module")
def images(pack) -> dict[str, str]:
    return {p.stem: str(p) for p in (pack / "images").glob("*.png")}


@pytest.fixture(scope="module")
def fresh(roots, images, tmp_path_factory) -> dict[str, Image.Image]:
    """Each valid request's image, computed as the only request of a brand-new Python process."""
    out = tmp_path_factory.mktemp("fresh")
    requests = menu(images) | sdxl_menu(images)

    def one(name):
        target = out / f"{name}.png"
        args = json.dumps([roots, requests[name], str(target)])
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return name, Image.open(target).convert("RGB")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, requests))


def test_fresh_references_are_distinct(fresh):
    """Sanity: the menu's requests give different pictures, so equality below means something."""
    names = sorted(fresh)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max_diff(fresh[a], fresh[b]) > 0, (a, b)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_sequence_gives_fresh_process_pixels(roots, images, fresh, data):
    valid, bad = menu(images) | sdxl_menu(images), failing(images)
    budget = data.draw(st.sampled_from([None, 1]), label="encoder cache budget (1 byte: evict on every switch)")
    sequence = data.draw(
        st.lists(st.sampled_from(sorted(valid) + sorted(bad)), min_size=2, max_size=7), label="requests"
    )
    engine = Engine(roots, cache_budget=budget, embedding_cache_budget=budget)
    for name in sequence:
        if name in bad:
            with pytest.raises(ImpromptError):
                engine.generate(bad[name])
            continue
        result = engine.generate(valid[name])
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} after {sequence}"


def every_ordered_pair(names: list[str]) -> list[str]:
    """A sequence in which every name follows every name (itself included) at least once: an Eulerian
    circuit of the complete directed graph with self-loops, n*n + 1 long. State that leaks from one request
    into the next shows up for some pair."""
    unused = {a: list(names) for a in names}
    stack, circuit = [names[0]], []
    while stack:
        node = stack[-1]
        if unused[node]:
            stack.append(unused[node].pop())
        else:
            circuit.append(stack.pop())
    return circuit[::-1]


def test_every_request_after_every_other_in_one_engine(roots, images, fresh):
    """Every valid request directly after every valid request (121 pairs), with a failing request slipped in
    every third step, in one engine."""
    valid, bad = menu(images), failing(images)
    sequence = every_ordered_pair(sorted(valid))
    pairs = set(zip(sequence, sequence[1:]))
    assert len(pairs) == len(valid) ** 2
    engine = Engine(roots)
    for i, name in enumerate(sequence):
        if i % 3 == 2:
            failure = sorted(bad)[i % len(bad)]
            with pytest.raises(ImpromptError):
                engine.generate(bad[failure])
        result = engine.generate(valid[name])
        previous = sequence[i - 1] if i else "nothing"
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}) after {previous}"


def test_every_request_after_every_other_across_families(roots, images, fresh):
    """SD 1.5 and SDXL requests in every order (each switch of family reloads the base model), with failures."""
    sd15 = menu(images)
    valid = {name: sd15[name] for name in ("base", "base+vit-g", "plus+vit-g+full")} | sdxl_menu(images)
    bad = failing(images)
    sequence = every_ordered_pair(sorted(valid))
    engine = Engine(roots)
    for i, name in enumerate(sequence):
        if i % 4 == 3:
            with pytest.raises(ImpromptError):
                engine.generate(bad[sorted(bad)[i % len(bad)]])
        result = engine.generate(valid[name])
        previous = sequence[i - 1] if i else "nothing"
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}) after {previous}"


def test_failures_name_their_cause(roots, images):
    engine = Engine(roots)
    bad = failing(images)
    messages = {}
    for name, req in bad.items():
        with pytest.raises(ImpromptError) as caught:
            engine.generate(req)
        messages[name] = str(caught.value)
    assert "Base XL Turbo" in messages["unknown-adapter"] and "Base ViT-G" in messages["unknown-adapter"]
    assert "ip_adapters.0.images.0" in messages["bad-image"]
    assert "start" in messages["start-after-end"] and "end" in messages["start-after-end"]
    assert "image_embeds[1280]" in messages["wrong-encoder"]
    assert Path(messages["corrupt-file"].split(":")[0]).name == "ip-adapter_broken.safetensors"
    assert "2048" in messages["sdxl-on-sd15"] and "768" in messages["sdxl-on-sd15"]
    assert "Nope" in messages["second-unit-bad"]
    assert "768" in messages["sd15-on-sdxl"] and "2048" in messages["sd15-on-sdxl"]
    assert "block_0" in messages["bad-layers"]
