"""Engine behaviours users rely on beyond the reference images: seeds, batches, windows, progress, caches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_diff, request, unit
from PIL import Image

from imprompt import Engine
from imprompt.models.download import download
from imprompt.models.store import ModelStore


def test_info_is_json_and_names_what_served_each_unit(engine, red_circle):
    result = engine.generate(request(unit("Plus Face", red_circle)))
    info = json.loads(json.dumps(result.info))
    (u,) = info["ip_adapters"]
    assert u["adapter"] == "Plus Face" and u["variant"] == "plus" and u["consumes"] == "hidden_states"
    assert u["encoder_source"] in ("loaded", "cache", "not needed")
    assert u["encoder_why"].startswith("Plus Face consumes hidden_states[64]")
    assert set(info["timings"]) == {"plan", "load", "prepare", "apply", "denoise", "total", "by_kind"}
    assert set(info["timings"]["by_kind"]) == {"init_image", "image_prompts", "loras", "vae", "prompt", "controlnets"}


def test_random_seed_is_reported_and_reproduces(engine, red_circle):
    first = engine.generate(request(unit("Base", red_circle), seed=-1))
    again = engine.generate(request(unit("Base", red_circle), seed=first.info["seed"]))
    assert 0 <= first.info["seed"] < 2**32
    assert max_diff(first.images[0], again.images[0]) == 0


def test_without_classifier_free_guidance_the_unit_still_acts(engine, red_circle):
    plain = engine.generate(request(cfg_scale=1.0))
    with_unit = engine.generate(request(unit("Base ViT-G", red_circle, 1.0), cfg_scale=1.0))
    assert max_diff(plain.images[0], with_unit.images[0]) > 0


def test_an_empty_window_equals_no_unit(engine, red_circle):
    """start == end: the unit never acts, so the image is the image without it, to the pixel."""
    without = engine.generate(request())
    for start in (0.0, 0.5, 1.0):
        idle = engine.generate(request(unit("Base", red_circle, 1.0, start=start, end=start)))
        assert max_diff(idle.images[0], without.images[0]) == 0


def test_a_partial_window_differs_from_both_ends(engine, red_circle):
    full = engine.generate(request(unit("Base", red_circle, 1.0)))
    half = engine.generate(request(unit("Base", red_circle, 1.0, end=0.5)))
    none = engine.generate(request())
    assert max_diff(half.images[0], full.images[0]) > 0 and max_diff(half.images[0], none.images[0]) > 0


def test_progress_callback_and_interrupt(engine, red_circle):
    seen = []
    engine.generate(request(unit("Base", red_circle)), on_step=lambda step, total: seen.append((step, total)))
    assert seen and seen[-1][0] == seen[-1][1] and [s for s, _ in seen] == list(range(1, len(seen) + 1))

    calls = []

    def stop_after_first(step, total):
        calls.append(step)
        engine.interrupt()

    result = engine.generate(request(unit("Base", red_circle)), on_step=stop_after_first)
    assert calls == [1] and result.info["interrupted"] is True
    after = engine.generate(request(unit("Base", red_circle)))  # an interrupted job does not affect the next
    assert after.info["interrupted"] is False


def test_clear_cache_changes_nothing_but_speed(engine, red_circle):
    before = engine.generate(request(unit("Full Face", red_circle)))
    cleared = engine.clear_cache()
    assert cleared["encoders"] >= 1
    assert engine.cache_info()["encoders"]["entries"] == []
    after = engine.generate(request(unit("Full Face", red_circle)))
    assert after.info["ip_adapters"][0]["encoder_source"] == "loaded"
    assert max_diff(before.images[0], after.images[0]) == 0


def test_engine_wide_defaults(pack, red_circle):
    """No model named: the only model in the store is used (a root may be the pipeline folder itself); its
    native size is the default size. With several models, the request must name one."""
    engine = Engine([pack / "diffusers" / "tiny-sd15", pack / "IP-Adapter"])
    result = engine.generate(prompt="a cat", seed=1, steps=2, ip_adapters=[unit("Light", red_circle)])
    assert result.info["model"] == "tiny-sd15" and result.images[0].size == (64, 64)
    from imprompt.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="tiny-flux, tiny-sd15, tiny-sd35, tiny-sdxl"):
        Engine(pack).generate(prompt="a cat", steps=1)


def test_download_places_adapters_and_their_encoders_where_the_store_finds_them(pack, red_circle, tmp_path):
    """The hub path, with the hub replaced by the pack (no network here)."""
    h94 = pack / "IP-Adapter"
    calls = []

    def fake_fetch(repo_id, filename, subfolder=None, local_dir=None):
        """hf_hub_download(local_dir=...): the file at local_dir/subfolder/filename, its path returned."""
        calls.append((repo_id, subfolder, filename))
        assert repo_id == "h94/IP-Adapter"
        target = Path(local_dir) / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(h94 / (subfolder or "") / filename, target)
        return str(target)

    models = tmp_path / "models"
    download(["Base ViT-G", "Plus"], models, fetch=fake_fetch)
    assert ("h94/IP-Adapter", "sdxl_models/image_encoder", "model.safetensors") in calls
    assert ("h94/IP-Adapter", "models", "ip-adapter-plus_sd15.safetensors") in calls
    store = ModelStore(models)
    assert {e.name for e in store.adapters} == {"ip-adapter_sd15_vit-G", "ip-adapter-plus_sd15"}
    assert {e.name for e in store.encoders} == {"IP-Adapter/sdxl_models/image_encoder", "IP-Adapter/models/image_encoder"}
    download(["Base ViT-G"], models, fetch=fake_fetch)  # what is there is not fetched again
    assert len(calls) == 6
    engine = Engine([pack / "diffusers", models])
    result = engine.generate(request(unit("Base ViT-G", red_circle)))
    assert result.info["ip_adapters"][0]["encoder"] == "IP-Adapter/sdxl_models/image_encoder"


def test_download_refuses_unknown_names(tmp_path):
    from imprompt.errors import UnknownAdapterError

    with pytest.raises(UnknownAdapterError, match="Base ViT-G"):
        download(["Base Turbo"], tmp_path, fetch=lambda **kw: None)


# --------------------------------------------------------------------------------------------- images in


def test_phone_photos_are_encoded_upright(engine, tmp_path, red_circle):
    """A JPEG whose pixels are stored sideways with EXIF orientation 6 (turn 90° clockwise to view) is the same
    reference as its pixels turned upright: viewers, A1111, SD.Next and ComfyUI all turn it first."""
    import numpy as np

    sideways = red_circle.crop((0, 0, 96, 64)).transpose(Image.Transpose.ROTATE_90)  # what the camera stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    sideways.save(path, exif=exif, quality=95)
    stored = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # its pixels as stored, no EXIF
    turned = stored.transpose(Image.Transpose.ROTATE_270)
    assert turned.size == (96, 64)
    from_file = engine.generate(request(unit("Base", str(path))))
    assert max_diff(from_file.images[0], engine.generate(request(unit("Base", turned))).images[0]) == 0
    assert max_diff(from_file.images[0], engine.generate(request(unit("Base", stored))).images[0]) > 0


def test_dtype_float16_on_the_cpu_is_refused_with_what_to_use(pack, tmp_path):
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "generate", "--models", str(pack), "--model", "tiny-sd15",
                           "--dtype", "float16", "--device", "cpu", "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and "float16 on the CPU" in done.stderr and "bfloat16" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_saved_embeddings_of_several_images_are_averaged_when_the_unit_asks(engine, red_circle, yellow_square, tmp_path):
    """`average` acts on saved embeddings as on images (it was ignored: the unit got two token sets)."""
    saved = engine.save_embeddings({"adapter": "Plus", "images": [red_circle, yellow_square]}, tmp_path / "two.safetensors")
    averaged = engine.generate(request({"adapter": "Plus", "embeddings": str(saved), "scale": 0.6, "average": True}))
    expected = engine.generate(request(unit("Plus", red_circle, average=True, images=[red_circle, yellow_square])))
    assert max_diff(averaged.images[0], expected.images[0]) == 0
    both = engine.generate(request({"adapter": "Plus", "embeddings": str(saved), "scale": 0.6}))
    assert max_diff(both.images[0], averaged.images[0]) > 0


def test_an_image_whose_decode_would_not_fit_is_decoded_tile_by_tile_as_diffusers_tiles(pack):
    """The VAE decode is what a large image's memory goes to (SD 1.5 at 2048 px: about 15 GiB in float32): where the
    whole decode would not fit the device memory left for activations, diffusers' tiled VAE decodes it. Emulated with
    a small activation budget at a size where the tiny VAE's 64 px tiles act; the pixels are diffusers' own."""
    from diffusers_reference import pipeline, run

    small = Engine(pack, activation_budget="4MiB")  # the tiny VAE: 2 MiB to decode 64 px, 8 MiB at 128 px
    tiled = small.generate(request(width=128, height=128, prompt="a cat"))
    assert tiled.info["vae_tiling"] is True
    pipe = pipeline(pack)
    pipe.vae.enable_tiling()
    assert max_diff(tiled.images[0], run(pipe, size=128)) <= 1
    whole = Engine(pack).generate(request(width=128, height=128, prompt="a cat"))  # the default budget: fits
    assert whole.info["vae_tiling"] is False
    pipe.vae.disable_tiling()
    assert max_diff(whole.images[0], run(pipe, size=128)) <= 1
    assert max_diff(whole.images[0], tiled.images[0]) > 0  # tiles are blended: not the same picture
    again = small.generate(request(width=64, height=64, prompt="a cat"))  # small enough: whole, in the same engine
    assert again.info["vae_tiling"] is False


def test_the_largest_request_the_limits_allow_fits_the_activation_budget_of_a_24_gib_device():
    """At the request limits (2048 x 2048, batch 8; a batch is made one image at a time, so one image's decode is
    the peak) SD 1.5's and SDXL's VAE decode tile by tile on a 24 GiB GPU and a 24 GiB CPU, and one tile fits."""
    from diffusers import AutoencoderKL

    from imprompt.loading.vaes import decode_bytes, needs_tiling
    from imprompt.request import GenerateRequest
    from imprompt.util.devices import RESERVED

    limits = GenerateRequest.model_fields
    side = max(m.le for m in limits["width"].metadata if hasattr(m, "le"))
    assert side == 2048
    configs = Path(__file__).parent.parent / "src" / "imprompt" / "models" / "configs"
    for family in ("sd15", "sdxl"):
        for device, dtype in (("cpu", "float32"), ("cuda", "float16")):
            with torch.device("meta"):
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / family / "vae")).to(getattr(torch, dtype))
            budget = int(24 * 2**30 * RESERVED[device])
            assert needs_tiling(vae, side, side, budget), (family, device)
            tile = vae.config.sample_size
            assert decode_bytes(vae, tile, tile) <= budget, (family, device)


def test_engine_limits_above_the_ceilings_every_request_is_parsed_under_are_refused(pack):
    from imprompt.errors import RequestError
    from imprompt.request import MAX_UNITS

    with pytest.raises(RequestError, match=f"max_units: {MAX_UNITS + 1} is outside 1..{MAX_UNITS}"):
        Engine(pack, max_units=MAX_UNITS + 1)


def test_an_empty_mask_list_means_no_masks(engine, red_circle):
    """SD.Next sends `masks: []` for a unit without masks; imprompt's own form reads it the same way."""
    plain = engine.generate(request(unit("Base", red_circle)))
    empty = engine.generate(request(unit("Base", red_circle, masks=[])))
    assert max_diff(empty.images[0], plain.images[0]) == 0 and empty.info["ip_adapters"][0]["masked"] is False


def test_what_the_files_tell_is_refused_in_the_plan_before_anything_loads(pack):
    """Clip skip deeper than the text encoder (its layers are read when the model is probed) and a prompt of more
    chunks than the limit (each BREAK starts one) are refused by `plan`, as a cluster's ingress calls it."""
    from imprompt.errors import LimitError, RequestError

    fresh = Engine(pack)
    with pytest.raises(RequestError, match=r"clip_skip: 12 is more than the \d+ layers of model tiny-sd15"):
        fresh.plan(request(clip_skip=12))
    with pytest.raises(LimitError, match="prompt: 40 chunks of 75 tokens"):
        fresh.plan(request(prompt=" BREAK ".join(["a cat"] * 40)))
    assert fresh.pipelines.all() == []


def test_fields_that_would_change_nothing_are_refused_not_dropped(engine, red_circle):
    """FaceID Plus's `structure` and `faceid_version` on another adapter, a second init image, a unit index that is
    not there: each named, none silently ignored."""
    from imprompt.errors import RequestError, UnsupportedError

    with pytest.raises(RequestError, match=r"ip_adapters\.0\.structure: acts on FaceID Plus adapters only"):
        engine.plan(request(unit("Base", red_circle, structure=2.0)))
    with pytest.raises(RequestError, match=r"ip_adapters\.0\.faceid_version: acts on FaceID Plus adapters only"):
        engine.plan(request(unit("Base", red_circle, faceid_version="v2")))
    with pytest.raises(UnsupportedError, match="init_images: 2 images"):
        engine.plan(request(init_images=[red_circle, red_circle]))
    with pytest.raises(RequestError, match="unit 3: the request has 1 IP-Adapter units"):
        engine.embed(request(unit("Base", red_circle)), 3)


def test_a_field_of_several_types_is_named_by_the_type_tried(engine, red_circle):
    from imprompt.errors import RequestError

    with pytest.raises(RequestError) as refused:
        engine.plan(request(unit("Base", red_circle, layers=12)))
    assert "layers.str: Input should be a valid string" in str(refused.value) and "0x" not in str(refused.value)


def test_the_engine_still_shows_its_limits_and_caches(pack):
    engine = Engine(pack, max_units=3)
    assert (engine.max_units, engine.allow_paths, engine.pipelines) == (3, True, engine.state.pipelines)
