"""ControlNet files as users' trees hold them: each format told apart by its tensors (family, width, Union modes),
loaded offline into diffusers' own classes (an LDM single file to the same weights and outputs as the diffusers
folder it came from), refused kinds listed with their reason, a ControlNet of another family refused naming both
widths, and the names clients send ("name [hash]", stems, file names, folders)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import locked, shared_folder
from safetensors.torch import load_file, save_file

from imprompt.errors import UnknownControlNetError
from imprompt.loading.controlnets import load_controlnet
from imprompt.models.probe import probe
from imprompt.models.specs import ControlNetSpec, spec_from_json, spec_to_json
from imprompt.models.store import ModelStore, legacy_hash
from tools.controlnet_models import ldm_names, write_controlnets


@pytest.fixture(scope="module")
def files(pack, tmp_path_factory) -> dict:
    """The tiny ControlNets (built once for all workers), plus single-file forms derived from them here: the LDM
    file without its `control_model.` prefix (ComfyUI's), and diffusers-named single files (SDXL, Union, SD 3.5,
    FLUX) as users drop them in `models/ControlNet/`."""
    folder = shared_folder(tmp_path_factory, "controlnets")
    with locked(folder):
        paths = write_controlnets(folder, pack)
    extra = tmp_path_factory.mktemp("controlnet-singles")
    ldm = load_file(paths["sd15-ldm"])
    save_file({k.removeprefix("control_model."): v for k, v in ldm.items()}, extra / "control_bare_sd15.safetensors")
    singles = {"sd15-bare": extra / "control_bare_sd15.safetensors", "sdxl-ldm": extra / "control_sdxl.safetensors"}
    sdxl = load_file(paths["sdxl"] / "diffusion_pytorch_model.safetensors")
    save_file(ldm_names(sdxl, layers_per_block=2), singles["sdxl-ldm"])  # SDXL's label_emb too
    for name in ("sdxl", "sdxl-union", "sd35", "flux", "flux-union"):
        singles[f"{name}-single"] = extra / f"diffusers_{name}.safetensors"
        shutil.copy(paths[name] / "diffusion_pytorch_model.safetensors", singles[f"{name}-single"])
    return {**paths, **singles, "pack": pack, "root": folder, "extra": extra}


@pytest.fixture(scope="module")
def pipelines(pack) -> dict:
    return {name: probe(pack / "diffusers" / f"tiny-{name}") for name in ("sd15", "sdxl", "sd35", "flux")}


UNION = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal", "segment",
         "tile", "repaint")  # fmt: skip
# name -> (format, the pipeline it is for, variant, union modes)
EXPECTED = {
    "sd15-ldm": ("ldm", "sd15", "SD 1.5 ControlNet", ()),
    "sd15-bare": ("ldm", "sd15", "SD 1.5 ControlNet", ()),
    "sd15": ("diffusers", "sd15", "SD 1.5 ControlNet", ()),
    "sdxl": ("diffusers", "sdxl", "SDXL ControlNet", ()),
    "sdxl-single": ("diffusers", "sdxl", "SDXL ControlNet", ()),
    "sdxl-ldm": ("ldm", "sdxl", "SDXL ControlNet", ()),
    "sdxl-union": ("diffusers", "sdxl", "SDXL ControlNet Union ProMax", UNION),
    "sdxl-union-single": ("diffusers", "sdxl", "SDXL ControlNet Union ProMax", UNION),
    "sd35": ("diffusers", "sd35", "SD 3.5 ControlNet", ()),
    "sd35-single": ("diffusers", "sd35", "SD 3.5 ControlNet", ()),
    "flux": ("diffusers", "flux", "FLUX ControlNet", ()),
    "flux-single": ("diffusers", "flux", "FLUX ControlNet", ()),
    "flux-union": ("diffusers", "flux", "FLUX ControlNet Union", ("canny", "tile", "depth", "blur", "pose", "gray",
                                                                  "low quality", "mode 7", "mode 8", "mode 9")),  # fmt: skip
    "flux-union-single": ("diffusers", "flux", "FLUX ControlNet Union", ("canny", "tile", "depth", "blur", "pose",
                                                                        "gray", "low quality", "mode 7", "mode 8",
                                                                        "mode 9")),  # fmt: skip
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_format_is_recognised_with_its_family_width_and_modes(files, pipelines, name):
    fmt, family, variant, modes = EXPECTED[name]
    spec = probe(files[name])
    assert isinstance(spec, ControlNetSpec), spec
    pipeline = pipelines[family]
    assert (spec.format, spec.architecture, spec.variant) == (fmt, pipeline.architecture, variant)
    assert (spec.family, spec.cross_attention_dim) == (pipeline.family, pipeline.cross_attention_dim)
    assert (spec.union, spec.control_types) == (bool(modes), modes)
    assert spec.unsupported is None and spec.mismatch(pipeline) is None
    assert spec_from_json(spec_to_json(spec)) == spec  # kept in the probe cache as it is
    others = [p for k, p in pipelines.items() if k != family]
    assert all(spec.mismatch(p) for p in others)


def test_another_familys_controlnet_is_a_mismatch_naming_both_widths(files, pipelines):
    sentence = probe(files["sd15-ldm"]).mismatch(pipelines["sdxl"])
    assert "SD 1.5" in sentence and "768" in sentence and "SDXL" in sentence and "2048" in sentence
    assert "control_tiny_sd15_canny.safetensors" in sentence and "tiny-sdxl" in sentence
    sentence = probe(files["flux"]).mismatch(pipelines["sd35"])
    assert "FLUX" in sentence and "SD 3.5" in sentence


def _forward(model, spec):
    """One ControlNet forward on fixed inputs (UNet ControlNets; the down and mid residuals it returns). The weights
    are first copied to fresh memory: CPU kernels round differently for data at another alignment (a file's
    tensors are mapped at their offset in it), which is about where the bytes lie, not what they are."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 16, 16), generator=generator)
    cond = torch.rand((1, 3, 128, 128), generator=generator)
    text = torch.randn((1, 7, spec.cross_attention_dim), generator=generator)
    with torch.no_grad():
        down, mid = model(sample, 10, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
    return [*down, mid]


@pytest.mark.parametrize("single", ["sd15-ldm", "sd15-bare"])
def test_the_ldm_single_file_loads_to_the_weights_and_outputs_of_its_folder(files, single):
    from diffusers import ControlNetModel

    folder_spec, single_spec = probe(files["sd15"]), probe(files[single])
    expected = load_controlnet(folder_spec, torch.float32)
    loaded = load_controlnet(single_spec, torch.float32)
    assert type(loaded) is ControlNetModel and not loaded.training
    reference = expected.state_dict()
    state = loaded.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    outputs, wanted = _forward(loaded, single_spec), _forward(expected, folder_spec)
    assert all(torch.equal(a, b) for a, b in zip(outputs, wanted)) and outputs[-1].abs().max() > 0  # no zero conv
    for key in ("block_out_channels", "attention_head_dim", "conditioning_embedding_out_channels", "layers_per_block"):
        assert list(_listed(loaded.config[key])) == list(_listed(expected.config[key])), key


def _listed(value):
    return value if isinstance(value, (list, tuple)) else [value]


@pytest.mark.parametrize("name", ["sdxl", "sdxl-union", "sd35", "flux", "flux-union", "sdxl-ldm"])
def test_a_single_file_loads_as_its_folder(files, name):
    """No config beside the file: every width is read from its tensors, and the model equals the folder's (an
    SDXL ControlNet in original names too: diffusers' converter leaves its added embedding out)."""
    folder, single = (name.removesuffix("-ldm"), name) if name.endswith("-ldm") else (name, f"{name}-single")
    expected = load_controlnet(probe(files[folder]), torch.float32)
    loaded = load_controlnet(probe(files[single]), torch.float32)
    assert type(loaded) is type(expected) and not loaded.training
    reference, state = expected.state_dict(), loaded.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    for key, value in expected.config.items():  # (the keys the class takes: a folder may hold more)
        if not key.startswith("_") and key in loaded.config and key != "sample_size":
            assert _listed(loaded.config[key]) == _listed(value) or (list(_listed(loaded.config[key])) ==
                                                                    list(_listed(value))), key  # fmt: skip


def test_refused_kinds_are_listed_as_what_they_are_with_their_reason(files, tmp_path):
    lllite = tmp_path / "kohya_controllllite_xl_canny.safetensors"
    save_file({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": torch.zeros(4, 64),
               "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight":
                   torch.zeros(4, 3, 4, 4)}, lllite)  # fmt: skip
    xs = tmp_path / "controlnet-xs-sd15"
    xs.mkdir()
    (xs / "config.json").write_text('{"_class_name": "ControlNetXSAdapter"}')
    cases = {files["control-lora"]: ("Control-LoRA", "controlnet"), files["t2i-adapter"]: ("T2I-Adapter", "t2i-adapter"),
             lllite: ("ControlNet-LLLite", "controlnet"), xs: ("ControlNet-XS", "controlnet")}  # fmt: skip
    for path, (variant, kind) in cases.items():
        spec = probe(path)
        assert isinstance(spec, ControlNetSpec) and spec.kind == kind and spec.variant.startswith(variant), spec
        assert variant in spec.unsupported and "not supported" in spec.to_dict()["detail"], spec
    assert probe(files["control-lora"]).family == "SDXL"


def test_the_store_finds_controlnets_by_the_names_clients_send(files):
    store = ModelStore([files["root"]])
    names = {e.name for e in store.controlnets}
    assert {"control_tiny_sd15_canny", "controlnet/tiny-sdxl-union-promax", "t2iadapter_tiny_sd15"} <= names
    ldm = files["sd15-ldm"]
    for name in ("control_tiny_sd15_canny", "control_tiny_sd15_canny.safetensors", "CONTROL_TINY_SD15_CANNY",
                 f"control_tiny_sd15_canny [{legacy_hash(ldm)}]", f"control_tiny_sd15_canny [{store.a1111_hash(ldm)}]",
                 f"renamed-since [{legacy_hash(ldm)}]", "ControlNet/control_tiny_sd15_canny.safetensors"):  # fmt: skip
        assert store.controlnet(name).path == ldm, name
    union = store.controlnet("tiny-sdxl-union-promax")
    assert union.spec.union and union.spec.control_types[6] == "tile"
    title = store.controlnet_title(union)  # what listings show, and what comes back
    assert store.controlnet(title).path == union.path
    assert store.controlnet("t2iadapter_tiny_sd15").spec.unsupported
    with pytest.raises(UnknownControlNetError) as caught:
        store.controlnet("control_v11p_sd15_openpose [cab727d4]")
    assert "control_v11p_sd15_openpose" in str(caught.value) and "control_tiny_sd15_canny" in str(caught.value)
    assert caught.value.http_status == 404


def test_the_listing_says_what_each_controlnet_is(files):
    from imprompt.plan import describe_store

    listing = describe_store(ModelStore([files["root"]]))
    listed = {item["path"]: item for item in listing["controlnets"]}
    assert "SD 1.5 ControlNet (ldm names)" in listed[str(files["sd15-ldm"])]["detail"]
    assert listed[str(files["sdxl-union"])]["control_types"] == list(UNION)
    assert "not supported" in listed[str(files["control-lora"])]["detail"]
    t2i = {item["path"]: item for item in listing["other"]["t2i-adapter"]}
    assert "not supported" in t2i[str(files["t2i-adapter"])]["detail"]
