"""Bad requests and bad files: each raises its own typed error with a message naming the culprit, and leaves the
shared engine exactly as it was (it then draws, pixel for pixel, what a brand-new engine draws)."""

from __future__ import annotations

import base64
import io
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import max_diff, request, unit
from PIL import Image
from safetensors.torch import load_file, save_file

from imprompt.demo.pack import FLUX_MODEL, SD15_MODEL
from imprompt.demo.tiny_models import TINY_VIT_H, build_clip_vision, write_adapter
from imprompt.errors import (
    CheckpointError,
    ImageError,
    ImageTooLargeError,
    ImpromptError,
    IncompatibleError,
    LimitError,
    MissingEncoderError,
    RequestError,
    UnknownAdapterError,
    UnknownEncoderError,
    UnknownModelError,
    UnsafeCheckpointError,
)
from imprompt.models.probe import probe
from imprompt.models.store import ModelStore

H94 = ("IP-Adapter", "models")


# ----------------------------------------------------------------------------------------- the invariance check


@pytest.fixture(scope="module")
def fixed_request(red_circle, yellow_square):
    """A valid request that exercises state: two adapters of two kinds, two encoders, a start/end window."""
    return request(
        unit("Plus", red_circle, scale=0.7),
        unit("Base ViT-G", yellow_square, scale=0.5, start=0.25, end=0.75),
        seed=7,
    )


@pytest.fixture(scope="module")
def reference(pack, fixed_request):
    from imprompt import Engine

    return Engine(pack).generate(fixed_request).images[0]


def assert_unchanged(engine, fixed_request, reference):
    result = engine.generate(fixed_request)
    diff = max_diff(result.images[0], reference)
    assert diff == 0, (
        f"shared engine drifted by {diff}: events {result.info['events']}, units {result.info['ip_adapters']}, "
        f"caches {engine.cache_info()}"
    )


# --------------------------------------------------------------------------------------------- hostile files


class _CreatesFile:
    """Unpickling this calls open(target, "w"): a payload with a visible side effect."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def write_malicious_bin(path: Path, target: Path, legacy: bool = False) -> Path:
    """An h94-looking `.bin` adapter that also carries code: loading it unsafely creates `target`."""
    state = {
        "image_proj": {"proj.weight": torch.zeros(8, 4), "x": _CreatesFile(target)},
        "ip_adapter": {"1.to_k_ip.weight": torch.zeros(8, 2), "1.to_v_ip.weight": torch.zeros(8, 2)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_payload_is_live(tmp_path, legacy):
    """The payload used below really does create its file when unpickled without protection."""
    target = tmp_path / "pwned-on-purpose"
    path = write_malicious_bin(tmp_path / "evil.bin", target, legacy)
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_never_run(pack, tmp_path, legacy, engine, red_circle, fixed_request, reference):
    target = tmp_path / "pwned"
    root = tmp_path / "models"
    path = write_malicious_bin(root / "ip-adapter_evil.bin", target, legacy)

    with pytest.raises(UnsafeCheckpointError) as info:  # probing it
        probe(path)
    assert str(path) in str(info.value)
    assert not target.exists()

    store = ModelStore(root)  # scanning a folder that holds it: pickles are not even opened
    assert [e.path for e in store.of_kind("unread")] == [path]
    store.read_all()  # listing what everything is reads it, weights only
    [entry] = store.unreadable
    assert isinstance(entry.error, UnsafeCheckpointError)
    assert not target.exists()

    with pytest.raises(UnsafeCheckpointError) as info:  # asking for it as an adapter
        engine.generate(request(unit(str(path), red_circle)))
    assert str(path) in str(info.value)
    assert "safetensors" in str(info.value)  # the fix: use the .safetensors version
    assert not target.exists()

    from imprompt import Engine

    with pytest.raises(UnsafeCheckpointError):  # by name, from an engine whose root holds it
        Engine([pack / "diffusers", root]).generate(request(unit("ip-adapter_evil", red_circle)))
    assert not target.exists()
    assert_unchanged(engine, fixed_request, reference)


# -------------------------------------------------------------------------------------- cases through the engine


@dataclass
class Ctx:
    pack: Path
    tmp: Path
    widths: list
    red: Image.Image


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _faceid(ctx):
    g = torch.Generator().manual_seed(5)
    tensors = {
        "image_proj.proj.0.weight": torch.randn(1024, 512, generator=g),
        "image_proj.proj.0.bias": torch.randn(1024, generator=g),
        "image_proj.proj.2.weight": torch.randn(4 * 768, 1024, generator=g),
        "image_proj.proj.2.bias": torch.randn(4 * 768, generator=g),
        "image_proj.norm.weight": torch.ones(768),
        "image_proj.norm.bias": torch.zeros(768),
    }
    for j, width in enumerate(ctx.widths):
        tensors[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = torch.randn(width, 768, generator=g)
        tensors[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = torch.randn(width, 768, generator=g)
    path = ctx.tmp / "ip-adapter-faceid_sd15.safetensors"
    save_file({k: v.half() for k, v in tensors.items()}, path)
    faces = {"adapter": str(path), "face_embeddings": [[0.1] * 256], "scale": 0.6}  # ArcFace gives 512, not 256
    return request(faces), IncompatibleError, ["[1, 256]", "512-d", "InsightFace"]


def _sdxl_adapter(ctx):
    path = write_adapter(ctx.tmp / "sdxl" / "ip-adapter_sdxl.safetensors", "base", 1280, ctx.widths, 2048, seed=21)
    return request(unit(str(path), ctx.red)), IncompatibleError, ["2048", "768", "SDXL", "SD 1.5", path.name]


def _truncated(ctx):
    path = ctx.tmp / "ip-adapter_cut.safetensors"
    data = ctx.pack.joinpath(*H94, "ip-adapter_sd15.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return request(unit(str(path), ctx.red)), CheckpointError, [str(path)]


def _random_bytes(ctx):
    path = ctx.tmp / "ip-adapter_noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(50_000))
    return request(unit(str(path), ctx.red)), CheckpointError, [str(path)]


def _empty_file(ctx):
    path = ctx.tmp / "ip-adapter_empty.safetensors"
    path.write_bytes(b"")
    return request(unit(str(path), ctx.red)), CheckpointError, [str(path)]


def _directory(ctx):
    path = ctx.tmp / "ip-adapter_x.safetensors"
    path.mkdir()
    return request(unit(str(path), ctx.red)), CheckpointError, [str(path), "folder"]


def _encoder_as_adapter(ctx):
    path = ctx.tmp / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    build_clip_vision(path, seed=1, single_file=True, **TINY_VIT_H)
    return request(unit(str(path), ctx.red)), CheckpointError, [str(path), "image-encoder", "not an ip-adapter"]


def _encoder_that_fails_to_load(ctx):
    """Probes as a fine ViT-H-like encoder (the shapes it reads are all there) but lacks a tensor, so it fails only
    when loaded: after the pipeline and the first unit's adapter were prepared."""
    whole = ctx.tmp / "whole.safetensors"
    build_clip_vision(whole, seed=1, single_file=True, **TINY_VIT_H)
    tensors = load_file(whole)
    del tensors["vision_model.post_layernorm.weight"]
    path = ctx.tmp / "broken-encoder.safetensors"
    save_file(tensors, path)
    units = [unit("Light", ctx.red), unit("Base", _shape_color((9, 99, 199)), encoder=str(path))]
    return request(*units), CheckpointError, [str(path)]


def _wrong_width_encoder(ctx):
    req = request(unit("Base", ctx.red, encoder="IP-Adapter/sdxl_models/image_encoder"))
    return req, IncompatibleError, ["IP-Adapter/sdxl_models/image_encoder", "image_embeds[1280]", "image_embeds[1024]"]


def _shape_color(color):
    return Image.new("RGB", (40, 40), color)


CASES = {
    # names, files and pairings
    "unknown-adapter": lambda c: (
        request(unit("Nope Adapter", c.red)), UnknownAdapterError, ["'Nope Adapter'", "Base ViT-G", "Plus Face"]
    ),
    "unknown-adapter-second-unit": lambda c: (
        request(unit("Base", c.red), unit("Nope", c.red)), UnknownAdapterError, ["'Nope'"]
    ),
    "unknown-model": lambda c: (
        request(unit("Base", c.red), model="sd-xl-base"), UnknownModelError, ["'sd-xl-base'", SD15_MODEL]
    ),
    "unknown-encoder": lambda c: (
        request(unit("Base", c.red, encoder="ViT-Nope")), UnknownEncoderError, ["'ViT-Nope'"]
    ),
    "sdxl-adapter": _sdxl_adapter,
    "wrong-width-encoder": _wrong_width_encoder,
    "faceid": _faceid,
    # files
    "truncated": _truncated,
    "random-bytes": _random_bytes,
    "empty-file": _empty_file,
    "directory": _directory,
    "encoder-as-adapter": _encoder_as_adapter,
    "encoder-fails-to-load": _encoder_that_fails_to_load,
    # images
    "image-not-an-image": lambda c: (
        request(unit("Base", b"these are not pixels")), ImageError, ["ip_adapters.0.images.0", "not an image"]
    ),
    "image-base64-garbage": lambda c: (
        request(unit("Base", "!!not*base64~~")), ImageError, ["ip_adapters.0.images.0", "!!not*base64~~"]
    ),
    "image-base64-of-text": lambda c: (
        request(unit("Base", base64.b64encode(b"hello world, no image").decode())),
        ImageError,
        ["ip_adapters.0.images.0"],
    ),
    "image-data-url-garbage": lambda c: (
        request(unit("Base", "data:image/png;base64,AAAA")), ImageError, ["ip_adapters.0.images.0"]
    ),
    "image-missing-path-str": lambda c: (
        request(unit("Base", str(c.tmp / "missing.png"))), ImageError, ["ip_adapters.0.images.0", "missing.png"]
    ),
    "image-missing-path": lambda c: (
        request(unit("Base", c.tmp / "missing.png")), ImageError, ["ip_adapters.0.images.0", "missing.png"]
    ),
    "image-second-of-two": lambda c: (
        request({"adapter": "Plus", "images": [c.red, b"junk"], "scale": 0.5}), ImageError, ["ip_adapters.0.images.1"]
    ),
    "image-truncated-png": lambda c: (
        request(unit("Base", _png_bytes(c.red)[:200])), ImageError, ["ip_adapters.0.images.0"]
    ),
    "image-too-many-pixels": lambda c: (
        request(unit("Base", _png_bytes(Image.new("L", (5000, 4000))))), ImageTooLargeError, ["5000x4000"]
    ),
    "image-wrong-type": lambda c: (request(unit("Base", 12345)), ImageError, ["int"]),
    # request values
    "scale-9": lambda c: (request(unit("Base", c.red, scale=9)), RequestError, ["ip_adapters.0.scale", "9"]),
    "start-negative": lambda c: (
        request(unit("Base", c.red, start=-0.1)), RequestError, ["ip_adapters.0.start", "-0.1"]
    ),
    "end-1.5": lambda c: (request(unit("Base", c.red, end=1.5)), RequestError, ["ip_adapters.0.end", "1.5"]),
    "start-after-end": lambda c: (
        request(unit("Base", c.red, start=0.8, end=0.2)), RequestError, ["ip_adapters.0", "start", "end", "0.8", "0.2"]
    ),
    "width-65": lambda c: (request(width=65), RequestError, ["width", "65"]),
    "height-4096": lambda c: (request(height=4096), RequestError, ["height", "4096"]),
    "seed-too-big": lambda c: (request(seed=2**32), RequestError, ["seed"]),
    "steps-0": lambda c: (request(steps=0), RequestError, ["steps"]),
    "unknown-sampler": lambda c: (
        request(unit("Base", c.red), sampler="Bogus 3M"), RequestError, ["'Bogus 3M'", "Euler"]
    ),
    "unknown-field": lambda c: (request(strength=0.5), RequestError, ["strength"]),
    "unit-without-images": lambda c: (
        request({"adapter": "Base", "images": []}), RequestError, ["ip_adapters.0", "give one of images, embeddings"]
    ),
    "empty-adapter-name": lambda c: (request(unit("", c.red)), RequestError, ["ip_adapters.0.adapter"]),
    # text that is not Unicode (a lone surrogate) and weights that are not finite, or far out of range
    "prompt-lone-surrogate": lambda c: (request(prompt="a \ud800 cat"), RequestError, ["prompt: not valid Unicode text"]),
    "lora-name-lone-surrogate": lambda c: (
        request(loras=[{"name": "x\udc00"}]), RequestError, ["loras.0.name: not valid Unicode text"]
    ),
    "layers-nan": lambda c: (
        request(unit("Base", c.red, layers={"mid": float("nan")})), RequestError, ["ip_adapters.0.layers.mid", "nan"]
    ),
    "layers-huge": lambda c: (
        request(unit("Base", c.red, layers={"down": {"block_2": 1e300}})), RequestError,
        ["ip_adapters.0.layers.down.block_2", "1e+300", "-1.0..5.0"],
    ),
    "layers-list-nan-flux": lambda c: (
        request(unit("FLUX XLabs", c.red, layers=[float("nan"), 1.0]), model=FLUX_MODEL, cfg_scale=3.5),
        RequestError, ["ip_adapters.0.layers[0]", "nan"],
    ),
    "layers-list-inf-flux": lambda c: (
        request(unit("FLUX XLabs", c.red, layers=[1.0, float("-inf")]), model=FLUX_MODEL, cfg_scale=3.5),
        RequestError, ["ip_adapters.0.layers[1]", "-inf"],
    ),
    "face-embedding-nan": lambda c: (
        request({"adapter": "Base", "face_embeddings": [[float("nan")] * 512]}), RequestError,
        ["ip_adapters.0.face_embeddings", "finite"],
    ),
    # list lengths over the ceilings every request is parsed against (the engine's limits are below them)
    "loras-over-the-ceiling": lambda c: (request(loras=[{"name": "x"}] * 100_000), LimitError, ["loras", "100000"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request(case, pack, tmp_path, engine, red_circle, fixed_request, reference):
    ctx = Ctx(pack, tmp_path, list(probe(pack / "diffusers" / SD15_MODEL).layer_widths), red_circle)
    req, error, fragments = CASES[case](ctx)
    with pytest.raises(ImpromptError) as info:
        engine.generate(req)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert_unchanged(engine, fixed_request, reference)


def test_every_typed_error_reaches_http_clients_with_its_status(pack, tmp_path, red_circle):
    """One request per kind of error, through a real server: the answer names the error type, and its status is
    the one that type carries (4xx: the caller's or the files' problem, never a 500)."""
    import json

    from server_fixtures import b64, client, new_engine, running_server

    from imprompt import errors

    bad = tmp_path / "bad"
    good = (pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors").read_bytes()
    bad.mkdir()
    (bad / "ip-adapter_broken.safetensors").write_bytes(good[: len(good) // 2])
    write_malicious_bin(bad / "ip-adapter_evil.bin", tmp_path / "pwned")
    shutil.copy(pack / "IP-Adapter" / "models" / "ip-adapter_sd15_vit-G.safetensors", bad)  # its encoder is absent
    shutil.copy(pack / "IP-Adapter" / "sdxl_models" / "ip-adapter_sdxl.safetensors", bad)
    inpaint = shutil.copytree(pack / "diffusers" / SD15_MODEL, bad / "tiny-inpaint")
    index = json.loads((inpaint / "model_index.json").read_text())
    (inpaint / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    roots = [pack / "diffusers", bad, pack / "IP-Adapter" / "models" / "image_encoder"]
    red = b64(red_circle)

    def txt(*units, **fields):
        return {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64, "ip_adapter": list(units),
                "override_settings": {"sd_model_checkpoint": fields.pop("model", SD15_MODEL)}, **fields}  # fmt: skip

    cases = {
        "CheckpointError": txt({"adapter": "ip-adapter_broken", "images": [red]}),
        "UnsafeCheckpointError": txt({"adapter": "ip-adapter_evil", "images": [red]}),
        "MissingEncoderError": txt({"adapter": "Base ViT-G", "images": [red]}),
        "IncompatibleError": txt({"adapter": "Base SDXL", "images": [red]}),
        "UnsupportedError": txt(model="tiny-inpaint"),
        "UnknownAdapterError": txt({"adapter": "Base Turbo", "images": [red]}),
        "UnknownModelError": txt(model="sd-9"),
        "ImageError": txt({"adapter": "Base", "images": ["aGVsbG8="]}),
        "ImageTooLargeError": txt({"adapter": "Base", "images": [b64(Image.new("1", (5000, 5000)))]}),
        "LimitError": txt(*[{"adapter": "Base", "images": [red]}] * 9),
        "RequestError": txt(steps=0),
    }
    with running_server(new_engine(roots)) as url, client(url) as http:
        for name, payload in cases.items():
            response = http.post("/sdapi/v1/txt2img", json=payload)
            body = response.json()
            assert body["error"] == name, (name, body)
            assert response.status_code == getattr(errors, name).http_status and 400 <= response.status_code < 500
        assert http.post("/sdapi/v1/txt2img", json=txt()).status_code == 200
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------ separate model roots


def test_no_encoder_for_the_needed_output(pack, tmp_path, engine, red_circle, fixed_request, reference):
    """Base ViT-G consumes image_embeds[1280] (bigG); the only encoder in these roots gives 1024 (ViT-H)."""
    from imprompt import Engine
    from imprompt.plan import describe_store

    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(pack.joinpath(*H94, "ip-adapter_sd15_vit-G.safetensors"), root)
    shutil.copytree(pack.joinpath(*H94, "image_encoder"), root / "image_encoder")
    limited = Engine([pack / "diffusers", root])
    with pytest.raises(MissingEncoderError) as info:
        limited.generate(request(unit("Base ViT-G", red_circle)))
    message = str(info.value)
    assert "image_embeds[1280]" in message
    assert "CLIP-ViT-bigG-14-laion2B-39B-b160k" in message
    assert "Base ViT-G" in message
    assert "image_embeds[1024]" in message  # what the encoder present gives
    [item] = describe_store(limited.store)["adapters"]
    assert item["encoder_present"] is False and "image_embeds[1280]" in item["encoder_problem"]
    assert_unchanged(engine, fixed_request, reference)


def test_bad_files_in_a_separate_root(pack, tmp_path, red_circle):
    """The same files found by name under a model root: typed errors, and the root is still usable."""
    from imprompt import Engine

    widths = list(probe(pack / "diffusers" / SD15_MODEL).layer_widths)
    root = tmp_path / "models"
    write_adapter(root / "ip-adapter_sdxl.safetensors", "base", 1280, widths, 2048, seed=21)
    (root / "ip-adapter_x.safetensors").mkdir()
    data = pack.joinpath(*H94, "ip-adapter_sd15.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 3])
    other = Engine([pack / "diffusers", root])

    with pytest.raises(IncompatibleError) as info:
        other.generate(request(unit("Base SDXL", red_circle)))
    for fragment in ("2048", "768", "SDXL", "SD 1.5", "ip-adapter_sdxl.safetensors"):
        assert fragment in str(info.value)
    with pytest.raises(UnknownAdapterError) as info:  # a folder is not an adapter, whatever its name
        other.generate(request(unit("ip-adapter_x", red_circle)))
    assert "ip-adapter_x" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        other.generate(request(unit("cut", red_circle)))
    assert str((root / "cut.safetensors").resolve()) in str(info.value)
    assert [e.name for e in other.store.unreadable] == ["cut"]


def test_closed_engine_refuses_paths(pack, tmp_path, red_circle):
    """allow_paths=False (the HTTP server): neither adapter files nor images may be named by path."""
    from imprompt import Engine

    outside = tmp_path / "mine.safetensors"
    shutil.copy(pack.joinpath(*H94, "ip-adapter_sd15.safetensors"), outside)
    closed = Engine(pack, allow_paths=False)
    with pytest.raises(UnknownAdapterError) as info:
        closed.generate(request(unit(str(outside), red_circle)))
    assert str(outside) in str(info.value)
    with pytest.raises(ImageError, match="ip_adapters.0.images.0"):
        closed.generate(request(unit("Base", pack / "images" / "red-circle.png")))
