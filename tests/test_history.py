"""Output depends on the request alone: any sequence of requests (switches, mixes, failures, evictions), and any
interleaving of concurrent clients of the server, gives for each request exactly the pixels that request gives
as the first one in a fresh process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from comfy_trees import FP8_T5, GGUF_MODEL, write_comfy_flux_tree
from conftest import locked, max_diff, shared_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_sdnext_pulid import write_pulid_files

from imprompt import Engine
from imprompt.demo.tiny_dits import write_pulid_flux
from imprompt.errors import ImpromptError
from imprompt.ipadapter.attach import AttachedAdapters
from tools.loadtest import load, start_server
from tools.soak import (
    controlnet_menu,
    failing_menu,
    faceid_menu,
    fresh_references,
    instantid_menu,
    lora_menu,
    pack_images,
    random_requests,
    redux_menu,
    sd15_menu,
    sdxl_menu,
    soak,
    transformer_menu,
    write_extra_files,
)


@pytest.fixture(scope="module")
def roots(pack, tmp_path_factory) -> list[str]:
    """The pack plus an A1111-style folder: LoRAs, an embedding, a VAE, a FLUX Redux with its SigLIP, InstantID
    with its IdentityNet and antelopev2 and PuLID FLUX with its EVA tower and facexlib's files (with InsightFace),
    and bad files (a truncated adapter and LoRA, an SDXL-width adapter, a PuLID file no EVA tower here fits), and a
    ComfyUI FLUX tree (a GGUF transformer alone, its parts, two FLUX LoRAs)."""
    extra = shared_folder(tmp_path_factory, "extra")  # shared by the workers, so their references are too
    with locked(extra):
        if not (extra / "done").is_file():
            write_extra_files(extra, pack)
            write_comfy_flux_tree(extra / "ComfyUI")  # scanned with the rest of the folder
            if (extra / "faces").is_dir():  # InsightFace is installed (`write_extra_files` wrote its faces)
                write_pulid_files(extra)
                write_pulid_flux(extra / "pulid" / f"{PULID_NO_EVA}.safetensors", 32, 2, eva_width=96, eva_projection=24)
            (extra / "done").write_text("")
    return [str(pack), str(extra)]


@pytest.fixture(scope="module")
def images(pack) -> dict[str, str]:
    return pack_images(pack)


def comfy_menu(images: dict[str, str]) -> dict[str, dict]:
    """FLUX as ComfyUI users have it (`write_comfy_flux_tree`): the GGUF transformer with the fp8 T5 named, two
    LoRAs (a tag and the field) and an XLabs unit; with the T5 found by itself and one LoRA; plain; and a FLUX LoRA
    on the demo pack's FLUX folder (the same widths)."""
    red = images["red-circle"]
    comfy = {"model": GGUF_MODEL, "cfg_scale": 3.5, "steps": 3}
    return {
        "comfy-fp8-t5-loras+unit": {**comfy, "prompt": "a cat <lora:flux-detail:0.8>", "seed": 21,
                                    "text_encoders": [FP8_T5], "loras": [{"name": "flux-style-xlabs", "weight": 0.6}],
                                    "ip_adapters": [{"adapter": "FLUX XLabs", "images": [red], "scale": 0.7}],
                                    "width": 64, "height": 64},
        "comfy-lora": {**comfy, "prompt": "a cat <lora:flux-style-xlabs:1>", "seed": 22, "width": 64, "height": 64},
        "comfy-none": {**comfy, "prompt": "a cat", "seed": 23, "width": 64, "height": 64},
        "flux-folder-lora": {"model": "tiny-flux", "cfg_scale": 3.5, "steps": 3, "prompt": "a cat <lora:flux-detail:0.7>",
                             "seed": 24, "width": 64, "height": 64},
    }  # fmt: skip


def comfy_failures(images: dict[str, str]) -> dict[str, dict]:
    """Refused before compute: a T5 that is not there, an SD VAE for the FLUX transformer, a FLUX LoRA on SD 1.5."""
    base = {"model": GGUF_MODEL, "prompt": "a cat", "steps": 3, "width": 64, "height": 64}
    return {"comfy-unknown-t5": {**base, "text_encoders": ["t5xxl_q2"]},
            "comfy-sd-vae": {**base, "vae": "soft-vae"},
            "flux-lora-on-sd15": {"model": "tiny-sd15", "prompt": "a cat <lora:flux-detail:1>", "steps": 3,
                                  "width": 64, "height": 64}}  # fmt: skip


PULID_NO_EVA = "pulid_flux_no_eva"  # a PuLID FLUX file reading an EVA tower of widths no file here has


def pulid_menu(extra: Path) -> dict[str, dict]:
    """PuLID FLUX v0.9.x on the pack's tiny FLUX (where InsightFace is installed: `write_pulid_files` then writes
    it, its EVA tower and facexlib's files): alone, and under true CFG (the negative pass reads the uncond ID
    tokens) from step 1 beside an XLabs unit; empty without InsightFace."""
    faces = sorted(str(p) for p in (Path(extra) / "faces").glob("face-*.png"))
    if not faces or not (Path(extra) / "pulid").is_dir():
        return {}
    flux = {"model": "tiny-flux", "prompt": "a portrait", "cfg_scale": 3.5, "steps": 3, "width": 64, "height": 64}
    return {
        "pulid": {**flux, "seed": 51, "ip_adapters": [{"adapter": "PuLID FLUX v0.9.0", "images": [faces[0]], "scale": 0.9}]},
        "pulid-true-cfg+xlabs": {**flux, "seed": 52, "negative_prompt": "blurry", "true_cfg_scale": 2.0,
                                 "ip_adapters": [{"adapter": "PuLID FLUX v0.9.0", "images": [faces[1]], "scale": 0.8,
                                                  "start_step": 1},
                                                 {"adapter": "FLUX XLabs", "images": [faces[0]], "scale": 0.6}]},
    }  # fmt: skip


def pulid_failures(extra: Path) -> dict[str, dict]:
    """PuLID refused before compute: its EVA tower missing (no EVA-CLIP of the file's widths), a mask given."""
    faces = sorted(str(p) for p in (Path(extra) / "faces").glob("face-*.png"))
    if not faces or not (Path(extra) / "pulid").is_dir():
        return {}
    flux = {"model": "tiny-flux", "prompt": "a portrait", "cfg_scale": 3.5, "steps": 3, "width": 64, "height": 64}
    return {"pulid-no-eva": {**flux, "ip_adapters": [{"adapter": PULID_NO_EVA, "images": [faces[0]]}]},
            "pulid-masked": {**flux, "ip_adapters": [{"adapter": "PuLID FLUX v0.9.0", "images": [faces[0]],
                                                      "masks": [faces[1]]}]}}  # fmt: skip


def every_valid(roots: list[str], images: dict[str, str]) -> dict[str, dict]:
    """Every menu's valid requests: the families, adapters, LoRAs, ControlNets, FaceID, Redux, InstantID, PuLID."""
    return (sd15_menu(images) | sdxl_menu(images) | lora_menu(images) | faceid_menu(roots[1]) | transformer_menu(images)
            | controlnet_menu(images) | comfy_menu(images) | redux_menu(images) | instantid_menu(roots[1], images)
            | pulid_menu(roots[1]))


@pytest.fixture(scope="module")
def fresh_paths(roots, images, tmp_path_factory) -> dict[str, Path]:
    """Each valid request's image, computed as the only request of a brand-new Python process."""
    valid = every_valid(roots, images)
    folder = shared_folder(tmp_path_factory, "fresh")  # references are kept by request: one worker computes them,
    with locked(folder):  # in two processes of one thread each, while the other waits for them
        return fresh_references(roots, valid, folder, workers=2)


@pytest.fixture(scope="module")
def fresh(fresh_paths) -> dict[str, Image.Image]:
    return {name: Image.open(path).convert("RGB") for name, path in fresh_paths.items()}


def test_fresh_references_are_distinct(fresh):
    """Sanity: the menu's requests give different pictures, so equality below means something."""
    names = sorted(fresh)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max_diff(fresh[a], fresh[b]) > 0, (a, b)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_sequence_gives_fresh_process_pixels(roots, images, fresh, data):
    valid = every_valid(roots, images)
    bad = failing_menu(images, roots[1]) | comfy_failures(images) | pulid_failures(roots[1])
    budget = data.draw(st.sampled_from([None, 1]), label="encoder cache budget (1 byte: evict on every switch)")
    sequence = data.draw(
        st.lists(st.sampled_from(sorted(valid) + sorted(bad)), min_size=2, max_size=7), label="requests"
    )
    engine = Engine(roots, cache_budget=budget, embedding_cache_budget=budget, controlnet_cache_budget=budget)
    for name in sequence:
        if name in bad:
            with pytest.raises(ImpromptError):
                engine.generate(bad[name])
            continue
        result = engine.generate(valid[name])
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} after {sequence}"


@pytest.fixture(scope="module")
def alone(roots):
    """Each named request's outcome alone (its result, or the error it got) in one engine, computed the first time a
    test asks and kept: what a batched request's infotexts, info and error must equal (its pixels: `fresh`)."""
    engine, outcomes = Engine(roots), {}

    def outcome(name: str, request: dict):
        if name not in outcomes:
            try:
                outcomes[name] = engine.generate(request)
            except ImpromptError as exc:
                outcomes[name] = exc
        return outcomes[name]

    return outcome


WHERE_FROM = {"cache", "detected", "loaded", "encoded", "computed", "not needed"}  # an encoder's, embedding's, face's


def shown(info: dict) -> dict:
    """A result's info but its timings, its events, its call (`batch`) and where each part came from (a cache, or
    made now): that is the engine's history, which the alone reference's differs from."""

    def sourceless(value):
        if isinstance(value, dict):
            return {k: sourceless(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sourceless(v) for v in value]
        if isinstance(value, str):
            return "?" if value in WHERE_FROM else re.sub(r"\((cache|detected)\)", "(?)", value)
        return value

    return sourceless({k: v for k, v in info.items() if k not in ("timings", "events", "batch")})


def left_as_alone(engine: Engine) -> None:
    """What a batch must not leave on a resident model: a hook, a batch's processors or projection on a UNet
    instead of its attached set's, another VAE than its own, the VAE's slicing on."""
    for resident in engine.state.pipelines.all():
        pipeline, attached = resident.pipeline, resident.attached
        model = getattr(pipeline, "transformer", None) or pipeline.unet
        hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        assert hooked == [], f"{resident.name}: hooks left on {hooked[:5]}"
        assert pipeline.vae is resident.own_vae and not pipeline.vae.use_slicing, resident.name
        if isinstance(attached, AttachedAdapters):  # a UNet's IP-Adapter set
            shells = attached._shells.get(attached.attached) if attached.attached else None
            processors = shells[0] if shells else attached.plain_processors
            assert all(m.processor is p for m, p in zip(attached.cross_attention, processors)), resident.name
            assert pipeline.unet.encoder_hid_proj is (shells[1] if shells else None), resident.name
    for name, stats in engine.cache_info().items():
        if isinstance(stats, dict) and "entries" in stats:
            assert stats["used_bytes"] == sum(e["bytes"] for e in stats["entries"]), name


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_sequence_in_batches_gives_each_request_its_own_outcome(roots, images, fresh, alone, data):
    """The property test's requests drawn as a sequence of batches (`Engine.generate_batch`): each request gets what
    it gets alone (its fresh-process pixels, within 1/255 where its call merged with others' and exactly where it ran
    alone; its infotexts and info; its error), and no batch leaves anything on a model that the next one finds."""
    valid = every_valid(roots, images)
    bad = failing_menu(images, roots[1]) | comfy_failures(images) | pulid_failures(roots[1])
    merging = sorted(sd15_menu(images) | sdxl_menu(images))  # drawn more often, so that calls really merge
    budget = data.draw(st.sampled_from([None, 1]), label="encoder cache budget (1 byte: evict on every switch)")
    names = st.one_of(st.sampled_from(merging), st.sampled_from(sorted(valid) + sorted(bad)))
    batches = data.draw(st.lists(st.lists(names, min_size=1, max_size=4), min_size=1, max_size=3), label="batches")
    engine = Engine(roots, cache_budget=budget, embedding_cache_budget=budget, controlnet_cache_budget=budget)
    calls = []  # each batch's requests as its calls ran them (rows, requests), printed
    for batch in batches:
        outcomes = engine.generate_batch([bad[n] if n in bad else valid[n] for n in batch])
        calls.append([(o.info["batch"]["size"], o.info["batch"]["requests"]) if not isinstance(o, BaseException)
                      else type(o).__name__ for o in outcomes])  # fmt: skip
        for name, got in zip(batch, outcomes):
            what = f"{name} in {batch} of {batches}"
            expected = alone(name, bad[name] if name in bad else valid[name])
            if name in bad:
                assert isinstance(expected, ImpromptError), what
                assert type(got) is type(expected) and str(got) == str(expected), f"{what}: {got!r}"
                continue
            assert not isinstance(got, BaseException), f"{what}: {got!r}"
            merged = got.info["batch"]["requests"] > 1
            assert max_diff(got.images[0], fresh[name]) <= (1 if merged else 0), what
            assert got.infotexts == expected.infotexts, what
            assert shown(got.info) == shown(expected.info), what
            assert [e for e in got.info["events"] if e["event"] == "batch_fallback"] == [], what
        left_as_alone(engine)
    print(f"\nbatches {batches}: calls {calls}")


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
    valid, bad = sd15_menu(images), failing_menu(images, roots[1])
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


def test_every_lora_request_after_every_other(roots, images, fresh):
    """LoRA sets (tags and field, weights), weighted and long prompts, a textual inversion, a VAE and clip skip,
    in every order with plain requests and failures, with a LoRA budget of one byte (a LoRA is unloaded whenever
    another is needed): nothing one request set up reaches the next."""
    menu = lora_menu(images)
    valid = {name: menu[name] for name in menu if name != "xl-lora"} | {n: sd15_menu(images)[n] for n in ("none", "base")}
    bad = failing_menu(images, roots[1])
    sequence = every_ordered_pair(sorted(valid))
    for budget in (None, 1):
        engine = Engine(roots, lora_cache_budget=budget)
        for i, name in enumerate(sequence):
            if i % 4 == 3:
                failure = ("unknown-lora", "sdxl-lora-on-sd15", "corrupt-lora", "bad-lora-tag")[i // 4 % 4]
                with pytest.raises(ImpromptError):
                    engine.generate(bad[failure])
            result = engine.generate(valid[name])
            previous = sequence[i - 1] if i else "nothing"
            assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}, budget {budget}) after {previous}"


def test_every_faceid_request_after_every_other(roots, images, fresh):
    """FaceID from images (InsightFace; Base, and Plus v2 with its face crop's encoder and structure), FaceID
    beside other units and user LoRAs, in every order with plain requests and failures, with caches of one byte
    (encoders, embeddings, LoRAs evicted whenever another is needed): the FaceID LoRA and crops never linger."""
    menu = faceid_menu(roots[1])
    if not menu:
        pytest.skip("InsightFace (the `faceid` extra) is not installed")
    plain = sd15_menu(images)
    valid = menu | {"faceid+lora+unit": lora_menu(images)["faceid+lora+unit"]} | {n: plain[n] for n in ("none", "base")}
    bad = failing_menu(images, roots[1])
    sequence = every_ordered_pair(sorted(valid))
    for budget in (None, 1):
        engine = Engine(roots, cache_budget=budget, embedding_cache_budget=budget, lora_cache_budget=budget)
        for i, name in enumerate(sequence):
            if i % 4 == 3:
                failure = ("faceid-no-face", "faceid-plus-without-crop", "faceid-wrong-width")[i // 4 % 3]
                with pytest.raises(ImpromptError):
                    engine.generate(bad[failure])
            result = engine.generate(valid[name])
            previous = sequence[i - 1] if i else "nothing"
            assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}, budget {budget}) after {previous}"


def test_every_request_after_every_other_across_families(roots, images, fresh):
    """SD 1.5, SDXL, SD 3.5 and FLUX requests in every order (a switch of model family reloads the base model:
    the pipeline budget holds one at a time here), with failures."""
    sd15, sdxl, transformers = sd15_menu(images), sdxl_menu(images), transformer_menu(images)
    valid = ({name: sd15[name] for name in ("base", "base+vit-g")} | {n: sdxl[n] for n in ("xl-base", "xl-style-masked")}
             | {n: transformers[n] for n in ("sd35", "sd35-average-window", "flux", "flux-v1+v2", "flux-blocks-true-cfg")})  # fmt: skip
    bad = failing_menu(images, roots[1])
    sequence = every_ordered_pair(sorted(valid))
    engine = Engine(roots)
    for i, name in enumerate(sequence):
        if i % 4 == 3:
            with pytest.raises(ImpromptError):
                engine.generate(bad[sorted(bad)[i % len(bad)]])
        result = engine.generate(valid[name])
        previous = sequence[i - 1] if i else "nothing"
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}) after {previous}"


def test_every_split_flux_request_after_every_other(roots, images, fresh):
    """A GGUF transformer alone with its parts (another T5 is another pipeline), FLUX LoRAs on it and on a FLUX
    folder, an XLabs unit, in every order with the pack's FLUX requests and failures, with a LoRA budget of one
    byte in the second pass: nothing one request set up (a LoRA, a part, the adapter) reaches the next."""
    flux = transformer_menu(images)
    valid = comfy_menu(images) | {n: flux[n] for n in ("flux", "flux-none")}
    bad = comfy_failures(images)
    sequence = every_ordered_pair(sorted(valid))
    for budget in (None, 1):
        engine = Engine(roots, lora_cache_budget=budget)
        for i, name in enumerate(sequence):
            if i % 4 == 3:
                with pytest.raises(ImpromptError):
                    engine.generate(bad[sorted(bad)[i // 4 % len(bad)]])
            result = engine.generate(valid[name])
            previous = sequence[i - 1] if i else "nothing"
            assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}, budget {budget}) after {previous}"


def test_every_redux_instantid_and_pulid_request_after_every_other(roots, images, fresh):
    """FLUX Redux (beside an XLabs unit, with a FLUX LoRA), InstantID (alone, with a pose image and a ControlNet
    beside its IdentityNet) and PuLID FLUX (alone, and under true CFG beside an XLabs unit) in every order with
    FaceID and plain SDXL and FLUX requests and their failures (Redux on SD 3.5, InstantID without a face, PuLID
    without its EVA tower), with caches of one byte (encoders, embeddings, ControlNets, LoRAs evicted whenever
    another is needed): no Redux token, face, ID token, IdentityNet or LoRA lingers, and no hook stays on a model.
    (Redux alone and the rest of the menus meet them in the property test above.)"""
    redux, faceid = redux_menu(images), faceid_menu(roots[1])
    valid = ({n: redux[n] for n in ("redux+xlabs", "redux+lora")} | instantid_menu(roots[1], images)
             | pulid_menu(roots[1]) | {n: faceid[n] for n in ("faceid-image",) if faceid}
             | {"xl-none": sdxl_menu(images)["xl-none"], "flux-none": transformer_menu(images)["flux-none"]})
    bad = failing_menu(images, roots[1]) | pulid_failures(roots[1])
    failures = [name for name in ("redux-on-sd35", "instantid-no-face", "pulid-no-eva") if name in bad]
    sequence = every_ordered_pair(sorted(valid))
    engine = Engine(roots, cache_budget=1, embedding_cache_budget=1, controlnet_cache_budget=1, lora_cache_budget=1)
    for i, name in enumerate(sequence):
        if i % 4 == 3:
            with pytest.raises(ImpromptError):
                engine.generate(bad[failures[i // 4 % len(failures)]])
        result = engine.generate(valid[name])
        previous = sequence[i - 1] if i else "nothing"
        assert max_diff(result.images[0], fresh[name]) == 0, f"{name} (step {i}) after {previous}"
    for resident in engine.state.pipelines.all():
        model = getattr(resident.pipeline, "transformer", None) or resident.pipeline.unet
        hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        assert hooked == [], f"{resident.pipeline.__class__.__name__}: hooks left on {hooked[:5]}"


def test_failures_name_their_cause(roots, images):
    engine = Engine(roots)
    bad = failing_menu(images, roots[1])
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
    assert "nope" in messages["unknown-lora"] and "detail-sd15" in messages["unknown-lora"]
    assert "style-sdxl" in messages["sdxl-lora-on-sd15"] and "SD 1.5" in messages["sdxl-lora-on-sd15"]
    assert "broken-lora.safetensors" in messages["corrupt-lora"]
    assert "<lora:detail-sd15:1:2:3>" in messages["bad-lora-tag"]
    for name in ("flux-on-sd35", "sd35-on-flux"):  # both families and their widths, named
        assert "FLUX.1" in messages[name] and "SD 3.5" in messages[name] and "width 32" in messages[name], messages[name]
    assert "image_embeds[1280]" in messages["flux-with-bigg"] and "image_embeds[768]" in messages["flux-with-bigg"]
    assert "one IP-Adapter" in messages["two-units-on-sd35"]
    assert "FLUX Redux" in messages["redux-on-sd35"] and "SD 3.5" in messages["redux-on-sd35"]
    if instantid_menu(roots[1], images):
        assert "no face found" in messages["instantid-no-face"] and "antelopev2" in messages["instantid-no-face"]
    for name, req in pulid_failures(roots[1]).items():
        with pytest.raises(ImpromptError) as caught:
            engine.generate(req)
        messages[name] = str(caught.value)
    if pulid_failures(roots[1]):
        assert PULID_NO_EVA in messages["pulid-no-eva"] and "EVA02-CLIP-L-14-336" in messages["pulid-no-eva"]
        assert "masks" in messages["pulid-masked"] and "PuLID" in messages["pulid-masked"]


def test_soak_48_requests(roots, images, tmp_path_factory):
    """The soak script's loop at 48 requests: 12 requests drawn at random from the space the engine serves
    (the four families, adapters, scales, windows, images, masks, presets, samplers, img2img, LoRAs, prompt syntax,
    VAE, clip skip, true CFG), run in a random order with
    requests that must fail slipped in, with a 1-byte encoder budget (evictions all the time): every valid result
    equals its fresh-process image."""
    pool = random_requests(12, seed=0, images=images)
    assert {r["model"] for r in pool.values()} == {"tiny-sd15", "tiny-sdxl", "tiny-sd35", "tiny-flux"}
    assert len({u["adapter"] for r in pool.values() for u in r["ip_adapters"]}) >= 6
    references = fresh_references(roots, pool, tmp_path_factory.mktemp("random-fresh"))
    report = soak(roots, pool, failing_menu(images, roots[1]), references, count=48, seed=0, cache_budget=1, warmup=32)
    assert report["failures"] == []
    assert report["valid"] + report["refused_as_expected"] == 48 and report["refused_as_expected"] > 0
    # the memory reading after warm-up is taken before that request, whether it is one that must fail or not
    assert report["rss_start_bytes"] > 0 and report["rss_after_warmup_bytes"] > 0 and report["rss_end_bytes"] > 0


def test_load_4_clients_by_6_requests(roots, images, fresh_paths):
    """The load script's loop, small: `imprompt serve` as a process, 4 concurrent clients sending SD.Next
    payloads with different adapters; every answer is a 200 with exactly its fresh-process image."""
    valid = sd15_menu(images)
    process, url = start_server(roots, max_queue=16)
    try:
        report = load(url, valid, {name: fresh_paths[name] for name in valid}, clients=4, requests=6, seed=2)
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert report["failures"] == [] and report["statuses"] == {"200": 24}
    assert report["queue_depth_max"] >= 1  # the clients really were concurrent: jobs waited behind each other
