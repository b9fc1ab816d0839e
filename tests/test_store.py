"""ModelStore: what is indexed under the model roots, and how names resolve to files.

Also the ComfyUI layout (ipadapter/ + clip_vision/ single files) end to end through an Engine, and files that are
added, replaced or removed after the store was built.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct

import pytest
import torch
from conftest import max_diff, request, unit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imprompt.demo.pack import SD15_MODEL
from imprompt.demo.tiny_models import TINY_VIT_BIGG, TINY_VIT_H, build_clip_vision, write_adapter
from imprompt.errors import (
    CheckpointError,
    MissingEncoderError,
    UnknownAdapterError,
    UnknownEncoderError,
    UnknownModelError,
)
from imprompt.models.probe import probe
from imprompt.models.store import ModelStore

SIX = {
    "Base": "ip-adapter_sd15",
    "Light": "ip-adapter_sd15_light",
    "Plus": "ip-adapter-plus_sd15",
    "Plus Face": "ip-adapter-plus-face_sd15",
    "Full Face": "ip-adapter-full-face_sd15",
    "Base ViT-G": "ip-adapter_sd15_vit-G",
}
VIT_H_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"


@pytest.fixture(scope="module")
def store(pack):
    return ModelStore(pack)


@pytest.fixture(scope="module")
def sd15_widths(pack):
    return list(probe(pack / "diffusers" / SD15_MODEL).layer_widths)


def adapter_file(pack, stem):
    return pack / "IP-Adapter" / "models" / f"{stem}.safetensors"


# ------------------------------------------------------------------------------------------------------ listing


def test_lists_the_pack(store, pack):
    assert [e.name for e in store.pipelines] == ["tiny-flux", SD15_MODEL, "tiny-sd35", "tiny-sdxl"]
    sdxl_and_composition = {"ip-adapter_sdxl", "ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h",
                            "ip-adapter-plus-face_sdxl_vit-h", "ip_plus_composition_sd15", "ip_plus_composition_sdxl"}
    transformers = {"sd3.5-large-ip-adapter", "flux-ip-adapter", "flux-ip-adapter-v2"}
    assert sorted(e.name for e in store.adapters) == sorted(set(SIX.values()) | sdxl_and_composition | transformers)
    assert sorted(e.name for e in store.encoders) == [
        "IP-Adapter/models/image_encoder",
        "IP-Adapter/sdxl_models/image_encoder",
        "clip_vision_l",
        "siglip-so400m-patch14-384",
    ]
    assert store.unreadable == []
    assert all(e.path.is_absolute() for e in store.entries)
    assert {e.kind for e in store.entries} == {"pipeline", "ip-adapter", "image-encoder"}


def test_root_must_exist(tmp_path):
    with pytest.raises(UnknownModelError, match="does not exist"):
        ModelStore(tmp_path / "missing")


def test_a_root_may_be_a_single_file(pack):
    store = ModelStore(adapter_file(pack, "ip-adapter_sd15_light"))
    assert [e.name for e in store.adapters] == ["ip-adapter_sd15_light"]
    assert store.adapter("Light").spec.embed_dim == 1024


def test_hidden_folders_and_other_files_are_skipped(pack, tmp_path):
    root = tmp_path / "models"
    (root / ".trash").mkdir(parents=True)
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / ".trash" / "old.safetensors")
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "kept.safetensors")
    (root / "readme.txt").write_text("not a model")
    (root / "preview.png").write_bytes(b"\x89PNG")
    store = ModelStore(root)
    assert [e.name for e in store.entries] == ["kept"]


def test_unreadable_files_are_listed_not_fatal(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    data = adapter_file(pack, "ip-adapter_sd15").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "good.safetensors")
    store = ModelStore(root)
    assert [e.name for e in store.adapters] == ["good"]
    store.read_all()
    [broken] = store.unreadable
    assert broken.name == "cut" and broken.kind == "unreadable"
    assert isinstance(broken.error, CheckpointError)
    with pytest.raises(CheckpointError) as info:  # asking for it by name gives the probe's error
        store.adapter("cut")
    assert str(root / "cut.safetensors") in str(info.value)


# --------------------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("friendly", list(SIX))
def test_friendly_names(store, pack, friendly):
    entry = store.adapter(friendly)
    assert entry.path == adapter_file(pack, SIX[friendly]).resolve()
    assert store.adapter(friendly.lower()).path == entry.path
    assert store.adapter(friendly.upper()).path == entry.path
    assert store.adapter(f"  {friendly}  ").path == entry.path


@pytest.mark.parametrize(
    "name",
    [
        "Base ViT-G",
        "base vit-g",
        "ip-adapter_sd15_vit-G",
        "IP-ADAPTER_SD15_VIT-G",
        "IP-Adapter/models/ip-adapter_sd15_vit-G.safetensors",
        "ip-adapter/models/ip-adapter_sd15_vit-g.safetensors",
    ],
)
def test_names_stems_and_relative_paths(store, pack, name):
    entry = store.adapter(name)
    assert entry.path == adapter_file(pack, "ip-adapter_sd15_vit-G").resolve()
    assert entry.spec.embed_dim == 1280


def test_absolute_paths(store, pack):
    path = adapter_file(pack, "ip-adapter-plus_sd15")
    assert store.adapter(str(path)).path == path.resolve()
    assert store.adapter(str(path.resolve())).spec.variant == "plus"


def test_absolute_path_outside_the_roots(pack, tmp_path):
    outside = tmp_path / "elsewhere" / "mine.safetensors"
    outside.parent.mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), outside)
    assert ModelStore(pack, allow_paths=True).adapter(str(outside)).path == outside.resolve()
    closed = ModelStore(pack, allow_paths=False)
    with pytest.raises(UnknownAdapterError) as info:
        closed.adapter(str(outside))
    assert str(outside) in str(info.value)
    with pytest.raises(UnknownAdapterError):  # nor by climbing out of a root
        closed.adapter("../" + os.path.relpath(outside, pack))
    assert closed.adapter("Base").name == "ip-adapter_sd15"  # names inside the roots still work


def test_pipelines_and_encoders(store, pack):
    assert store.pipeline(SD15_MODEL).path == (pack / "diffusers" / SD15_MODEL).resolve()
    assert store.pipeline(SD15_MODEL.upper()).name == SD15_MODEL
    assert store.pipeline(f"diffusers/{SD15_MODEL}").name == SD15_MODEL
    vit_g = store.encoder("IP-Adapter/sdxl_models/image_encoder")
    assert vit_g.spec.projection_dim == 1280
    assert store.encoder("ip-adapter/models/image_encoder").spec.projection_dim == 1024


def test_unknown_names(store):
    with pytest.raises(UnknownAdapterError) as info:
        store.adapter("Nope")
    message = str(info.value)
    assert "'Nope'" in message
    for friendly in SIX:
        assert friendly in message
    without_adapters = ModelStore(store.roots[0] / "diffusers")
    with pytest.raises(UnknownAdapterError, match="h94/IP-Adapter/sdxl_models"):  # a published adapter not here:
        without_adapters.adapter("Base SDXL")  # the message says where to get it
    with pytest.raises(UnknownModelError, match=SD15_MODEL):
        store.pipeline("sd-xl")
    with pytest.raises(UnknownEncoderError, match="image_encoder"):
        store.encoder("ViT-Z")


def test_wrong_kind(store):
    with pytest.raises(CheckpointError, match="is an image-encoder, not an ip-adapter"):
        store.adapter("IP-Adapter/models/image_encoder")
    with pytest.raises(CheckpointError, match="is an ip-adapter, not an image-encoder"):
        store.encoder("ip-adapter_sd15")
    with pytest.raises(CheckpointError, match="is an ip-adapter, not a pipeline"):
        store.pipeline("ip-adapter_sd15")


def test_safetensors_preferred_over_pickle(pack, tmp_path, sd15_widths):
    root = tmp_path / "models"
    write_adapter(root / "same.bin", "plus", 64, sd15_widths, 768, seed=1, file_format="bin")
    write_adapter(root / "same.safetensors", "base", 1024, sd15_widths, 768, seed=1)
    store = ModelStore(root)
    assert [e.path.suffix for e in store.of_kind("unread")] == [".bin"]  # the scan leaves pickles unread
    store.read_all()
    assert len(store.adapters) == 2
    assert store.adapter("same").path.suffix == ".safetensors"
    assert store.adapter("same.bin").spec.variant == "plus"


# ----------------------------------------------------------------------------------------------------- ComfyUI


@pytest.fixture
def comfy_root(pack, tmp_path):
    """ComfyUI's layout: ipadapter/<any name>.safetensors and clip_vision/<single file>.safetensors. The encoder
    is the pack's ViT-H-like encoder (same seed), written as one file with transformers key names."""
    root = tmp_path / "ComfyUI" / "models"
    (root / "ipadapter").mkdir(parents=True)
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "ipadapter" / "my style.safetensors")
    build_clip_vision(root / "clip_vision" / VIT_H_FILE, seed=1, single_file=True, **TINY_VIT_H)
    return root


def test_comfyui_layout_is_indexed(comfy_root):
    store = ModelStore(comfy_root)
    [adapter] = store.adapters
    [encoder] = store.encoders
    assert adapter.name == "my style" and adapter.spec.variant == "base"
    assert encoder.name == VIT_H_FILE.removesuffix(".safetensors")
    assert encoder.path == (comfy_root / "clip_vision" / VIT_H_FILE).resolve()
    assert (encoder.spec.projection_dim, encoder.spec.hidden_size) == (1024, 64)
    assert encoder.spec.num_attention_heads == 4  # from the config in the file's metadata
    assert store.adapter("ipadapter/my style.safetensors").path == adapter.path
    assert store.encoder(f"clip_vision/{VIT_H_FILE}").path == encoder.path


def test_comfyui_layout_generates(pack, comfy_root, engine, red_circle):
    from imprompt import Engine

    comfy = Engine([pack / "diffusers", comfy_root])
    result = comfy.generate(request(unit("my style", red_circle)))
    info = result.info["ip_adapters"][0]
    assert info["file"] == str((comfy_root / "ipadapter" / "my style.safetensors").resolve())
    assert info["encoder_file"] == str((comfy_root / "clip_vision" / VIT_H_FILE).resolve())
    assert info["encoder_source"] == "loaded"
    # Same adapter bytes and same encoder weights as the pack's Base: the same picture.
    assert max_diff(result.images[0], engine.generate(request(unit("Base", red_circle))).images[0]) == 0


def test_comfyui_and_h94_layouts_together(pack, comfy_root):
    """Two encoders produce image_embeds[1024]: the one beside the adapter (h94 layout) wins for Base, and the
    ComfyUI adapter gets one of them; both choices are explained."""
    from imprompt.conditioning.ip_adapter import pick_encoder

    store = ModelStore([pack, comfy_root])
    assert len(store.encoders) == 5  # the pack's four, and the ComfyUI tree's ViT-H
    encoder, why = pick_encoder(store.adapter("Base"), store)
    assert encoder.name == "IP-Adapter/models/image_encoder"
    assert "beside the adapter" in why
    encoder, why = pick_encoder(store.adapter("my style"), store)
    assert encoder.spec.projection_dim == 1024
    assert "2 encoders produce it" in why


def test_single_file_encoder_without_projection_serves_plus(pack, tmp_path, engine, red_circle):
    """A clip_vision file with hidden states only (no visual_projection) is enough for Plus, which consumes
    hidden_states[64]: it is chosen, and gives the same picture as the pack's encoder with the same weights."""
    from imprompt import Engine

    root = tmp_path / "models"
    build_clip_vision(tmp_path / "full.safetensors", seed=1, single_file=True, **TINY_VIT_H)
    tensors = load_file(tmp_path / "full.safetensors")
    tensors.pop("visual_projection.weight")
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        metadata = f.metadata()  # the transformers config, as ComfyUI-style single files may carry it
    (root / "clip_vision").mkdir(parents=True)
    save_file(tensors, root / "clip_vision" / "vit-h-hidden.safetensors", metadata=metadata)
    (root / "ipadapter").mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), root / "ipadapter" / "ip-adapter-plus_sd15.safetensors")
    assert ModelStore(root).encoders[0].spec.projection_dim is None

    result = Engine([pack / "diffusers", root]).generate(request(unit("Plus", red_circle)))
    assert result.info["ip_adapters"][0]["encoder_file"].endswith("vit-h-hidden.safetensors")
    assert max_diff(result.images[0], engine.generate(request(unit("Plus", red_circle))).images[0]) == 0


# ------------------------------------------------------------------------------------------ changes on disk


def test_file_added_later_is_found(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "first.safetensors")
    store = ModelStore(root)
    assert [e.name for e in store.adapters] == ["first"]
    (root / "sub").mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), root / "sub" / "added.safetensors")
    entry = store.adapter("added")  # not in the index yet: found by scanning again on the miss
    assert entry.spec.variant == "plus"
    assert sorted(e.name for e in store.adapters) == ["added", "first"]
    store.rescan_interval = 0  # a second miss this soon walks again only without the interval (test_store_hostile)
    shutil.copy(adapter_file(pack, "ip-adapter_sd15_vit-G"), root / "ip-adapter_sd15_vit-G.safetensors")
    assert store.adapter("Base ViT-G").spec.embed_dim == 1280  # friendly names too


def test_file_replaced_by_another_variant_is_probed_again(pack, tmp_path, sd15_widths):
    root = tmp_path / "models"
    root.mkdir()
    path = root / "mine.safetensors"
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), path)
    store = ModelStore(root)
    before = store.adapter("mine")
    assert (before.spec.variant, before.spec.tokens) == ("base", 4)

    write_adapter(path, "plus", 64, sd15_widths, 768, seed=7)
    after = store.adapter("mine")
    assert (after.spec.variant, after.spec.consumes, after.spec.tokens) == ("plus", "hidden_states", 16)
    assert after.fingerprint != before.fingerprint
    assert store.adapter(str(path)).spec.variant == "plus"

    shutil.copy(adapter_file(pack, "ip-adapter-full-face_sd15"), path)
    assert store.adapter("mine").spec.variant == "full-face"


def test_file_removed(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    path = root / "gone.safetensors"
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), path)
    store = ModelStore(root)
    store.adapter("gone")
    path.unlink()
    with pytest.raises((CheckpointError, UnknownAdapterError)) as info:
        store.adapter("gone")
    assert "gone" in str(info.value)
    with pytest.raises(UnknownAdapterError):
        store.adapter("gone")
    assert store.adapters == []


def test_file_turned_into_an_encoder(pack, tmp_path):
    """A name whose file now holds an image encoder is no longer served as an adapter."""
    root = tmp_path / "models"
    root.mkdir()
    path = root / "thing.safetensors"
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), path)
    store = ModelStore(root)
    assert store.adapter("thing").kind == "ip-adapter"
    build_clip_vision(path, seed=3, single_file=True, **TINY_VIT_H)
    with pytest.raises(CheckpointError, match="image-encoder, not an ip-adapter"):
        store.adapter("thing")
    assert store.encoder("thing").spec.projection_dim == 1024


def test_encoder_replaced_on_disk_is_seen_by_encoder_choice(adapters_copy, pack):
    """The ViT-H-like folder is replaced by a bigG-like one: nothing gives image_embeds[1024] any more, so Base
    has no encoder (MissingEncoderError), instead of being paired with a folder that no longer gives 1024."""
    from imprompt.conditioning.ip_adapter import pick_encoder

    store = ModelStore([pack / "diffusers", adapters_copy])
    encoder, _ = pick_encoder(store.adapter("Base"), store)
    assert encoder.spec.projection_dim == 1024
    folder = adapters_copy / "models" / "image_encoder"
    shutil.rmtree(folder)
    build_clip_vision(folder, seed=4, **TINY_VIT_BIGG)
    with pytest.raises(MissingEncoderError):
        pick_encoder(store.adapter("Base"), store)


# ------------------------------------------------------------------------------------ hostile files in a root


def _write_header(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_scan_survives_a_deeply_nested_header(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "good.safetensors")
    _write_header(root / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    store = ModelStore(root)
    assert [e.name for e in store.adapters] == ["good"]
    assert [e.name for e in store.unreadable] == ["deep"]


def test_scan_survives_broken_files(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "good.safetensors")
    (root / "random.safetensors").write_bytes(random.Random(1).randbytes(4096))
    (root / "empty.safetensors").write_bytes(b"")
    (root / "random.bin").write_bytes(random.Random(0).randbytes(4096))
    _write_header(root / "list.safetensors", json.dumps([1, 2]).encode())
    torch.save({"not": "tensors", "n": 3}, root / "plain.pt")
    (root / "folder.safetensors").mkdir()
    store = ModelStore(root)
    assert [e.name for e in store.adapters] == ["good"]
    assert sorted(e.name for e in store.unreadable) == ["empty", "list", "random"]
    assert sorted(e.path.name for e in store.of_kind("unread")) == ["plain.pt", "random.bin"]  # pickles: lazily
    store.read_all()
    assert sorted(e.name for e in store.unreadable) == ["empty", "list", "plain", "random", "random"]
    assert all(isinstance(e.error, CheckpointError) for e in store.unreadable)


@pytest.mark.parametrize("seed", [2, 61])
def test_scan_survives_a_corrupt_pickle(pack, tmp_path, seed):
    """Random bytes named .bin: some make torch's unpickler raise IndexError (seeds chosen so they do)."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack, "ip-adapter_sd15"), root / "good.safetensors")
    (root / "corrupt.bin").write_bytes(random.Random(seed).randbytes(4096))
    store = ModelStore(root)
    assert [e.name for e in store.adapters] == ["good"]
    store.read_all()
    [broken] = store.unreadable
    assert isinstance(broken.error, CheckpointError)


def test_a_files_sha256_is_kept_on_disk_and_read_again_only_when_the_file_changes(pack, tmp_path, monkeypatch):
    """A1111's model hash is the sha256 of the whole checkpoint (seconds for GBs): a new process must not read the
    file again before its first image, and a changed file must not keep its old hash."""
    import hashlib

    from imprompt.models import store as store_module

    monkeypatch.setenv("IMPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    file = tmp_path / "models" / "checkpoint.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"weights" * 1000)
    first = ModelStore([pack]).a1111_hash(file)
    assert first == hashlib.sha256(file.read_bytes()).hexdigest()[:10]

    store_module._HASHES.clear()  # a new process: only the disk remembers
    expected = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    monkeypatch.setattr(store_module.hashlib, "sha256", lambda: pytest.fail("the file was read again"))
    assert ModelStore([pack]).a1111_hash(file, 12) == expected

    monkeypatch.undo()
    monkeypatch.setenv("IMPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    file.write_bytes(b"other weights" * 1000)
    store_module._HASHES.clear()
    assert ModelStore([pack]).a1111_hash(file) == hashlib.sha256(file.read_bytes()).hexdigest()[:10] != first


def test_a_vae_path_that_is_not_there_is_not_found_not_another_file_of_its_name(pack, tmp_path):
    """A mistyped path (or, on a server, a path outside the models folders) names no file: refused, never served
    by a file of the same name elsewhere in the tree."""
    from imprompt.errors import UnknownVaeError

    shutil.copytree(pack / "diffusers" / SD15_MODEL / "vae", tmp_path / "models" / "vae" / "soft")
    vae = tmp_path / "models" / "vae" / "soft" / "diffusion_pytorch_model.safetensors"
    store = ModelStore(tmp_path / "models")
    assert store.vae(str(vae)).path == vae
    with pytest.raises(UnknownVaeError):
        store.vae(str(tmp_path / "elsewhere" / vae.name))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(vae, outside / vae.name)
    with pytest.raises(UnknownVaeError):
        ModelStore(tmp_path / "models", allow_paths=False).vae(str(outside / vae.name))


def test_options_keep_a_vae_by_a_name_that_gives_that_very_file(pack, tmp_path):
    """Two VAE files of one name (vae/ae.safetensors, vae/flux/ae.safetensors): the option POST /sdapi/v1/options
    keeps for the second resolves to the second, not to the first."""
    from imprompt.server.a1111 import apply_options

    source = pack / "diffusers" / SD15_MODEL / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(source)
    for where, shift in (("vae", 0.0), ("vae/flux", 1.0)):
        (tmp_path / "models" / where).mkdir(parents=True, exist_ok=True)
        save_file({k: v + shift for k, v in tensors.items()}, tmp_path / "models" / where / "ae.safetensors")
    store = ModelStore(tmp_path / "models")
    options, _ = apply_options({"sd_vae": "Automatic"}, {"sd_vae": "vae/flux/ae.safetensors"}, store)
    assert store.vae(options["sd_vae"]).path == tmp_path / "models" / "vae" / "flux" / "ae.safetensors"
    options, _ = apply_options({"sd_vae": "Automatic"}, {"sd_vae": "vae/ae.safetensors"}, store)
    assert store.vae(options["sd_vae"]).path == tmp_path / "models" / "vae" / "ae.safetensors"
