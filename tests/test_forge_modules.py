"""Forge's `forge_additional_modules` (the VAE and text-encoder files a FLUX transformer alone runs with) read into
imprompt's `vae` / `text_encoders`: each module sorted by what the store says its tensors are, never by its folder;
a module that is not a VAE or a text encoder, or not in the tree, refused naming it; `sd_vae` and a VAE module that
disagree refused (invariant 8: neither is dropped silently); imprompt's own `text_encoders` must be a list."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from comfy_trees import write_split_tree

from imprompt.errors import RequestError
from imprompt.models.store import ModelStore
from imprompt.server.a1111 import apply_options, forge_modules, from_sdnext_payload


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny FLUX in ComfyUI's split layout, with a second VAE (`other-vae`) and a second `clip_l.safetensors`
    in the old `clip/flux/` folder (the store resolves the stem to the shallower `text_encoders/` one)."""
    from imprompt.demo.tiny_dits import build_flux_pipeline

    root = tmp_path_factory.mktemp("forge")
    models = root / "models"
    write_split_tree(build_flux_pipeline(root / "reference", seed=3), models)
    shutil.copy(models / "vae" / "ae.safetensors", models / "vae" / "other-vae.safetensors")
    (models / "clip" / "flux").mkdir(parents=True)
    shutil.copy(models / "text_encoders" / "clip_l.safetensors", models / "clip" / "flux" / "clip_l.safetensors")
    return models


@pytest.fixture(scope="module")
def store(models) -> ModelStore:
    return ModelStore(models, allow_paths=False)  # the HTTP server's: no paths outside the roots


def converted(store, overrides: dict | None = None, **payload):
    settings = {"sd_model_checkpoint": "flux1-dev", **(overrides or {})}
    return from_sdnext_payload({"prompt": "x", "override_settings": settings, **payload}, store=store).request


def test_modules_are_sorted_by_what_the_store_says_they_are(store):
    fields = forge_modules(["/forge/models/text_encoder/ae.safetensors",  # a VAE, whatever folder Forge had it in
                            "C:\\forge\\models\\VAE\\t5xxl_fp16.safetensors", "clip_l.safetensors"], store)  # fmt: skip
    assert fields == {"vae": "ae", "text_encoders": ["t5xxl_fp16", "text_encoders/clip_l.safetensors"]}
    assert store.text_encoder(fields["text_encoders"][1]).path == store.text_encoder("clip_l").path


def test_each_path_sd_modules_lists_gives_that_very_file(store):
    listed = [*store.of_kind("vae"), *store.of_kind("text-encoder")]  # what GET /sdapi/v1/sd-modules lists
    assert len(listed) == 5
    for entry in listed:
        fields = forge_modules([str(entry.path)], store)
        name = fields.get("vae") or fields["text_encoders"][0]
        found = store.vae(name) if entry.kind == "vae" else store.text_encoder(name)
        assert found.path == entry.path, (entry.path, name)


def test_a_module_not_in_the_tree_or_of_another_kind_is_refused_naming_it_and_what_exists(store):
    with pytest.raises(RequestError, match=r"forge_additional_modules: '/f/models/VAE/flux_vae.safetensors' is not in "
                                           r"the models folders.*ae.safetensors.*clip_l.safetensors.*other-vae"
                                           r".*t5xxl_fp16.safetensors.*GET /sdapi/v1/sd-modules"):  # fmt: skip
        forge_modules(["/f/models/VAE/flux_vae.safetensors", "clip_l.safetensors"], store)
    with pytest.raises(RequestError, match=r"forge_additional_modules: 'flux1-dev.safetensors' is .*flux1-dev"
                                           r".*a pipeline, neither a VAE nor a text encoder.*sd-modules"):  # fmt: skip
        forge_modules(["flux1-dev.safetensors"], store)
    with pytest.raises(RequestError, match=r"forge_additional_modules: two VAEs"):
        forge_modules(["ae.safetensors", "other-vae.safetensors"], store)
    with pytest.raises(RequestError, match=r"flux_vae"):  # the options endpoint checks them as it sets them
        apply_options({}, {"forge_additional_modules": ["/f/models/VAE/flux_vae.safetensors"]}, store)


def test_sd_vae_and_a_vae_module_must_agree(store):
    modules = {"forge_additional_modules": ["/f/models/VAE/ae.safetensors", "t5xxl_fp16.safetensors"]}
    with pytest.raises(RequestError, match=r"sd_vae \(other-vae.safetensors\).*forge_additional_modules.*ae"
                                           r".*different VAEs"):  # fmt: skip
        converted(store, {"sd_vae": "other-vae.safetensors", **modules})
    with pytest.raises(RequestError, match=r"different VAEs"):  # sd_vae set earlier by POST /sdapi/v1/options
        from_sdnext_payload({"prompt": "x", "override_settings": modules}, store=store,
                            settings={"sd_model_checkpoint": "flux1-dev", "sd_vae": "other-vae.safetensors"})  # fmt: skip
    agreeing = converted(store, {"sd_vae": "ae.safetensors", **modules})
    assert (agreeing.vae, agreeing.text_encoders) == ("ae", ["t5xxl_fp16"])
    automatic = converted(store, {"sd_vae": "Automatic", **modules})
    assert automatic.vae == "ae"
    alone = converted(store, {"sd_vae": "other-vae.safetensors"})
    assert alone.vae == "other-vae.safetensors"


def test_text_encoders_must_be_a_list_of_names(store):
    with pytest.raises(RequestError, match=r"text_encoders: expected a list of text encoder file names, got "
                                           r"'t5xxl_fp16'"):  # fmt: skip
        converted(store, text_encoders="t5xxl_fp16")
    with pytest.raises(RequestError, match=r"text_encoders: expected a list"):
        converted(store, text_encoders=[3])
    both = converted(store, {"forge_additional_modules": ["ae.safetensors"]}, text_encoders=["t5xxl_fp16"])
    assert (both.vae, both.text_encoders) == ("ae", ["t5xxl_fp16"])
