"""ComfyUI's split layout, probed and paired: a FLUX / SD 3.5 transformer alone (safetensors, fp8, scaled fp8,
city96's GGUF) reads like its diffusers folder, text encoders alone say their role and width, and `choose_parts`
pairs each transformer with the VAE and text encoders its tensors fit (names only where tensors cannot tell)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from comfy_trees import FLUX_NAMES, SD35_NAMES, fp8_tensors, save_part, scaled_fp8_tensors, split_tensors

from imprompt.demo.tiny_dits import build_flux_pipeline, build_sd3_pipeline
from imprompt.errors import IncompatibleError, MissingPartError, RequestError, UnknownModelError
from imprompt.loading.tensors import quantization, read_tensor_table, read_tensors
from imprompt.models.parts import NO_PARTS, choose_parts
from imprompt.models.probe import probe
from imprompt.models.specs import PipelineSpec, TextEncoderSpec
from imprompt.models.store import ModelStore

# ComfyUI's two spellings of the folders: (transformer folder, text-encoder folder)
LAYOUTS = {"diffusion_models": ("diffusion_models", "text_encoders"), "unet": ("unet", "clip")}
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def names_in(layout: str, names: dict) -> dict:
    """A family's usual file names in one of ComfyUI's folder spellings."""
    transformers, encoders = LAYOUTS[layout]
    folders = {"diffusion_models": transformers, "text_encoders": encoders, "vae": "vae"}
    return {part: (folders[folder], file) for part, (folder, file) in names.items()}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> SimpleNamespace:
    """The tiny diffusers FLUX and SD 3.5 pipelines (saved as folders: the references), and their parts' tensors."""
    root = tmp_path_factory.mktemp("split-references")
    flux = build_flux_pipeline(root / "folder-flux", seed=5)
    sd3 = build_sd3_pipeline(root / "folder-sd35", seed=5)
    return SimpleNamespace(root=root, flux=flux, sd3=sd3, flux_parts=split_tensors(flux), sd3_parts=split_tensors(sd3))


def write_tree(parts: dict, models: Path, names: dict, dtype=torch.float16) -> dict[str, Path]:
    return {part: save_part(tensors, models / names[part][0] / names[part][1], dtype) for part, tensors in parts.items()}


@pytest.fixture(scope="module")
def trees(pipelines, tmp_path_factory) -> dict:
    """(family, layout) -> its split tree's models folder, as users keep it."""
    out = {}
    for layout in LAYOUTS:
        for family, parts, names in (("flux", pipelines.flux_parts, FLUX_NAMES), ("sd35", pipelines.sd3_parts, SD35_NAMES)):
            models = tmp_path_factory.mktemp(f"{family}-{layout}") / "models"
            write_tree(parts, models, names_in(layout, names))
            out[family, layout] = models
    return out


TRANSFORMER = {"flux": "flux1-dev", "sd35": "sd3.5_large"}


def expected_widths(family: str, pipeline) -> dict:
    """The text-encoder widths diffusers' own configs give the transformer."""
    config = pipeline.transformer.config
    pooled = "clip" if family == "flux" else "clip_pooled"
    return {pooled: config.pooled_projection_dim, "t5xxl": config.joint_attention_dim}


# ----------------------------------------------------------------------------------------------- probing


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_a_transformer_alone_probes_like_its_diffusers_folder(pipelines, trees, family, layout):
    store = ModelStore(trees[family, layout])
    entry = store.pipeline(TRANSFORMER[family])
    assert entry.path.parent.name == LAYOUTS[layout][0]
    alone, folder = entry.spec, probe(pipelines.root / f"folder-{family}")
    assert alone.unsupported is None and alone.quantization == ""
    assert (alone.pipeline_class, alone.architecture, alone.family) == (folder.pipeline_class, folder.architecture, folder.family)
    assert alone.layer_names == folder.layer_names and alone.layer_widths == folder.layer_widths
    assert alone.cross_attention_dim == folder.cross_attention_dim and alone.in_channels == folder.in_channels
    assert alone.parts == {"flux": ("vae", "clip_l", "t5xxl"), "sd35": ("vae", "clip_l", "clip_g")}[family]
    pipeline = pipelines.flux if family == "flux" else pipelines.sd3
    assert dict(alone.text_encoder_widths) == expected_widths(family, pipeline)
    assert alone.to_dict()["parts"] == list(alone.parts)  # listed as JSON


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_text_encoders_alone_say_their_role_and_widths(pipelines, trees, layout):
    flux, sd3 = ModelStore(trees["flux", layout]), ModelStore(trees["sd35", layout])
    t5 = flux.text_encoder("t5xxl_fp16.safetensors").spec
    t5_config = pipelines.flux.text_encoder_2.config
    assert isinstance(t5, TextEncoderSpec)
    assert (t5.role, t5.width, t5.layers, t5.quantization) == ("t5xxl", t5_config.d_model, t5_config.num_layers, "")
    clip_l = flux.text_encoder("clip_l").spec
    assert (clip_l.role, clip_l.width, clip_l.layers, clip_l.projection) == (
        "clip", pipelines.flux.text_encoder.config.hidden_size, pipelines.flux.text_encoder.config.num_hidden_layers, None)
    clip_g = sd3.text_encoder("clip_g").spec
    config = pipelines.sd3.text_encoder_2.config
    assert (clip_g.role, clip_g.width, clip_g.projection) == ("clip", config.hidden_size, config.projection_dim)
    assert "CLIP text encoder" in clip_g.to_dict()["detail"]
    assert [e.name for e in flux.of_kind("text-encoder")] == ["clip_l", "t5xxl_fp16"]


def test_a_transformer_under_the_all_in_one_prefix_alone_is_split_too(pipelines, tmp_path):
    tensors = {f"model.diffusion_model.{k}": v for k, v in pipelines.flux_parts["transformer"].items()}
    spec = probe(save_part(tensors, tmp_path / "flux1-dev-prefixed.safetensors"))
    assert spec.unsupported is None and spec.parts == ("vae", "clip_l", "t5xxl")
    assert spec.layer_names == probe(pipelines.root / "folder-flux").layer_names


def test_fp8_and_scaled_fp8_files_say_how_they_are_stored(pipelines, tmp_path):
    transformer, t5 = pipelines.flux_parts["transformer"], pipelines.flux_parts["t5xxl"]
    cases = {
        "e4m3fn": (fp8_tensors(transformer), "fp8_e4m3fn"),
        "e5m2": (fp8_tensors(transformer, torch.float8_e5m2), "fp8_e5m2"),
        "scaled": (scaled_fp8_tensors(transformer), "scaled_fp8"),
    }
    for name, (tensors, expected) in cases.items():
        spec = probe(save_part(tensors, tmp_path / f"flux1-dev-{name}.safetensors", dtype=None))
        assert (spec.quantization, spec.unsupported, spec.parts) == (expected, None, ("vae", "clip_l", "t5xxl")), name
    t5_fp8 = probe(save_part(fp8_tensors(t5), tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=None))
    assert (t5_fp8.role, t5_fp8.quantization) == ("t5xxl", "fp8_e4m3fn")
    t5_scaled = probe(save_part(scaled_fp8_tensors(t5), tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", dtype=None))
    assert (t5_scaled.role, t5_scaled.quantization) == ("t5xxl", "scaled_fp8")


def test_a_fill_transformer_alone_stays_refused(pipelines, tmp_path):
    tensors = dict(pipelines.flux_parts["transformer"])
    tensors["img_in.weight"] = torch.zeros(tensors["img_in.weight"].shape[0], 384)  # FLUX Fill's input channels
    spec = probe(save_part(tensors, tmp_path / "flux1-fill-dev.safetensors"))
    assert "384 input channels" in spec.unsupported and "text-to-image" in spec.unsupported


# -------------------------------------------------------------------------------------------------- GGUF


def write_city96_gguf(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """A transformer as city96's GGUF files hold it: architecture "flux", the file type, bare BFL names, Q8_0 where
    a tensor's rows are whole 32-value blocks, F16 elsewhere."""
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in tensors.items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[-1] % gguf.GGML_QUANT_SIZES[Q8_0][0] == 0:
            blocks = gguf.quants.quantize(values, Q8_0)
            writer.add_tensor(key, blocks, raw_shape=blocks.shape, raw_dtype=Q8_0)
        else:
            writer.add_tensor(key, tensor.half().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(pipelines, tmp_path_factory) -> Path:
    return write_city96_gguf(pipelines.flux_parts["transformer"], tmp_path_factory.mktemp("gguf") / "flux1-dev-Q8_0.gguf")


def test_a_gguf_transformer_probes_like_its_folder(pipelines, gguf_file):
    table, metadata = read_tensor_table(gguf_file)
    source = pipelines.flux_parts["transformer"]
    assert set(table) == set(source)
    assert all(table[k].shape == tuple(v.shape) for k, v in source.items())  # logical shapes, in torch's order
    assert table["double_blocks.0.img_attn.qkv.weight"].dtype == "Q8_0" and metadata["general.architecture"] == "flux"
    assert table["img_in.weight"].dtype == "Q8_0" and table["final_layer.linear.bias"].dtype == "F16"
    spec, folder = probe(gguf_file), probe(pipelines.root / "folder-flux")
    assert isinstance(spec, PipelineSpec) and spec.quantization == "gguf_Q8_0" and spec.unsupported is None
    assert spec.layer_names == folder.layer_names and spec.layer_widths == folder.layer_widths
    assert spec.cross_attention_dim == folder.cross_attention_dim and spec.parts == ("vae", "clip_l", "t5xxl")


def test_gguf_quantization_without_a_declared_file_type_is_the_commonest_quantized_type(gguf_file):
    table, _ = read_tensor_table(gguf_file)
    assert quantization(gguf_file, table, {}) == "gguf_Q8_0"
    assert quantization(gguf_file, table, {"general.file_type": "14"}) == "gguf_Q4_K_S"


def test_gguf_tensors_read_dequantized_near_the_weights(pipelines, gguf_file):
    source = pipelines.flux_parts["transformer"]
    read = read_tensors(gguf_file)
    for key, tensor in source.items():
        expected = tensor.float()
        bound = expected.abs().max().item() / 127 + 1e-3  # Q8_0: 8-bit steps of each block's max, fp16 scales
        assert (read[key] - expected).abs().max().item() <= bound, key


def test_a_gguf_file_in_the_tree_is_read_at_scan(gguf_file, trees, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trees["flux", "unet"], models)
    shutil.copy(gguf_file, models / "unet" / gguf_file.name)
    store = ModelStore(models)
    entry = store.pipeline("flux1-dev-Q8_0")
    assert entry.spec.quantization == "gguf_Q8_0"
    parts = choose_parts(entry, store, None, [])
    assert {role: e.name for role, e in parts.files.items()} == {"vae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl_fp16"}


# ---------------------------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_choose_parts_takes_the_only_candidates(pipelines, trees, family):
    """Each part the tree holds (the tiny SD 3.5 has no T5: it runs without one)."""
    store = ModelStore(trees[family, "diffusion_models"])
    parts = choose_parts(store.pipeline(TRANSFORMER[family]), store, None, [])
    names = FLUX_NAMES if family == "flux" else SD35_NAMES
    written = pipelines.flux_parts if family == "flux" else pipelines.sd3_parts
    assert {role: e.path.name for role, e in parts.files.items()} == {
        role: names[role][1] for role in written if role != "transformer"}
    assert all(why.startswith("the only ") for why in parts.why.values()), parts.why
    assert parts.key() == tuple((role, parts.files[role].key()) for role in sorted(parts.files))
    assert parts.describe()["vae"]["why"] == parts.why["vae"]


def test_ties_are_broken_by_comfyuis_names_and_the_request_wins(pipelines, trees, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    encoders, vaes = models / "text_encoders", models / "vae"
    save_part(fp8_tensors(pipelines.flux_parts["t5xxl"]), encoders / "t5xxl_fp8_e4m3fn.safetensors", dtype=None)
    shutil.copy(encoders / "t5xxl_fp16.safetensors", encoders / "a-t5.safetensors")
    shutil.copy(vaes / "ae.safetensors", vaes / "a-vae.safetensors")
    shutil.copy(encoders / "clip_l.safetensors", encoders / "a-clip.safetensors")
    store = ModelStore(models)
    model = store.pipeline("flux1-dev")
    parts = choose_parts(model, store, None, [])
    assert {role: e.path.name for role, e in parts.files.items()} == {
        "vae": "ae.safetensors", "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
    assert parts.why["t5xxl"].startswith("ComfyUI's usual name t5xxl_fp16.safetensors (3 T5 text encoders fit")
    assert "ComfyUI's usual name ae.safetensors" in parts.why["vae"]
    assert parts.describe()["t5xxl"]["quantization"] == ""
    named = choose_parts(model, store, "a-vae.safetensors", ["t5xxl_fp8_e4m3fn", "a-clip"])
    assert {role: e.path.name for role, e in named.files.items()} == {
        "vae": "a-vae.safetensors", "clip_l": "a-clip.safetensors", "t5xxl": "t5xxl_fp8_e4m3fn.safetensors"}
    assert named.why == {"vae": "named in the request (vae)", "clip_l": "named in the request (text_encoders)",
                         "t5xxl": "named in the request (text_encoders)"}  # fmt: skip
    assert named.describe()["t5xxl"]["quantization"] == "fp8_e4m3fn"
    (encoders / "t5xxl_fp16.safetensors").unlink()
    (encoders / "t5xxl_fp8_e4m3fn.safetensors").unlink()
    (vaes / "ae.safetensors").rename(vaes / "b-vae.safetensors")
    store.refresh()
    parts = choose_parts(store.pipeline("flux1-dev"), store, None, [])
    assert parts.files["vae"].path.name == "a-vae.safetensors" and "the first by the store's order" in parts.why["vae"]
    assert parts.files["t5xxl"].path.name == "a-t5.safetensors" and parts.why["t5xxl"].startswith("the only")


def test_flux_and_sd35_in_one_tree_take_their_own_vae_by_name(trees, tmp_path):
    """FLUX's and SD 3's VAEs have the same shapes: each model takes the one ComfyUI's names give its family."""
    models = tmp_path / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    shutil.copytree(trees["sd35", "diffusion_models"] / "vae", models / "vae", dirs_exist_ok=True)
    shutil.copytree(trees["sd35", "diffusion_models"] / "diffusion_models", models / "diffusion_models", dirs_exist_ok=True)
    shutil.copy(trees["sd35", "diffusion_models"] / "text_encoders" / "clip_g.safetensors", models / "text_encoders")
    shutil.copy(trees["sd35", "diffusion_models"] / "text_encoders" / "clip_l.safetensors", models / "text_encoders" / "clip_l_sd3.safetensors")
    store = ModelStore(models)
    flux = choose_parts(store.pipeline("flux1-dev"), store, None, [])
    sd3 = choose_parts(store.pipeline("sd3.5_large"), store, None, [])
    assert flux.files["vae"].path.name == "ae.safetensors" and sd3.files["vae"].path.name == "sd3.5_vae.safetensors"
    assert "usual name" in flux.why["vae"] and "usual name" in sd3.why["vae"]
    # both 32-wide CLIPs fit FLUX: by name; SD 3 pairs the 32-wide one it fits with the 48-wide clip_g
    assert flux.files["clip_l"].path.name == "clip_l.safetensors"
    assert {role: sd3.files[role].path.name for role in ("clip_l", "clip_g")} == {
        "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors"}
    assert "t5xxl" not in sd3.files  # FLUX's T5 (32 wide) does not fit SD 3's (80): SD 3 runs without one


def test_a_missing_part_is_refused_listing_the_candidates_and_the_fix(trees, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(trees["flux", "unet"], models)
    (models / "clip" / "t5xxl_fp16.safetensors").unlink()
    store = ModelStore(models)
    with pytest.raises(MissingPartError, match=r"needs a T5 text encoder 32 wide.*found: clip_l.safetensors \(CLIP "
                                               r"text \(32 wide\)\).*t5xxl_fp16.safetensors in models/text_encoders/, "
                                               r"or name one in text_encoders") as caught:  # fmt: skip
        choose_parts(store.pipeline("flux1-dev"), store, None, [])
    assert isinstance(caught.value, UnknownModelError)  # a 404, as an unknown model is
    (models / "vae" / "ae.safetensors").unlink()
    with pytest.raises(MissingPartError, match=r"needs a VAE with 16 latent channels.*found: none.*ae.safetensors"):
        choose_parts(store.pipeline("flux1-dev"), store, None, [])
    with pytest.raises(MissingPartError, match=r"text encoder 'nowhere' not found.*Available text encoders: "
                                               r"clip_l.safetensors"):  # fmt: skip
        store.text_encoder("nowhere")


def test_parts_of_the_wrong_kind_or_width_are_refused(pipelines, trees, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    models = tmp_path / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    save_part(t5.state_dict(), models / "text_encoders" / "t5-48.safetensors")
    sd15_vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    save_part(sd15_vae.state_dict(), models / "vae" / "sd15-vae.safetensors")
    shutil.copy(trees["sd35", "diffusion_models"] / "text_encoders" / "clip_g.safetensors", models / "text_encoders")
    store = ModelStore(models)
    model = store.pipeline("flux1-dev")
    with pytest.raises(IncompatibleError, match=r"t5-48.*a T5 text encoder 48 wide, but model flux1-dev \(FLUX.1 "
                                                r"transformer alone\) reads T5 32 wide"):  # fmt: skip
        choose_parts(model, store, None, ["t5-48"])
    with pytest.raises(IncompatibleError, match=r"clip_g.*a CLIP text encoder 48 wide.*reads CLIP-L 32 wide"):
        choose_parts(model, store, None, ["clip_g"])
    with pytest.raises(IncompatibleError, match=r"VAE sd15-vae .* has 4 latent channels .* needs 16"):
        choose_parts(model, store, "sd15-vae", [])
    with pytest.raises(RequestError, match=r"text_encoders: .* one T5 and 1 CLIP .* names 0 T5 and 2 CLIP"):
        choose_parts(model, store, None, ["clip_l", "clip_g"])
    parts = choose_parts(model, store, None, [])  # the misfits are never chosen from the folders
    assert {e.path.name for e in parts.files.values()} == {"ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"}


def test_sd35_clip_roles_come_from_widths_and_a_model_holding_its_own_takes_none(pipelines, trees):
    store = ModelStore([trees["sd35", "diffusion_models"], pipelines.root])
    model = store.pipeline("sd3.5_large")
    both = choose_parts(model, store, None, ["clip_g", "clip_l"])  # the narrower is CLIP-L, whatever the order
    assert (both.files["clip_l"].name, both.files["clip_g"].name) == ("clip_l", "clip_g")
    one = choose_parts(model, store, None, ["clip_g"])
    assert one.files["clip_l"].name == "clip_l" and one.why["clip_l"].startswith("the only")
    folder = store.pipeline("folder-sd35")
    assert choose_parts(folder, store, None, []) is NO_PARTS
    with pytest.raises(RequestError, match=r"text_encoders: model folder-sd35 holds its own text encoders"):
        choose_parts(folder, store, None, ["clip_l"])


def test_the_models_listing_shows_parts_and_quantization(trees, gguf_file, tmp_path, capsys):
    from imprompt.cli import _models

    models = tmp_path / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    shutil.copy(gguf_file, models / "diffusion_models" / gguf_file.name)
    save_part(fp8_tensors(split_tensors_of(models / "text_encoders" / "t5xxl_fp16.safetensors")),
              models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors", dtype=None)  # fmt: skip
    assert _models(SimpleNamespace(models=[models], json=False)) == 0
    out = capsys.readouterr().out
    assert "flux1-dev-Q8_0               FLUX.1   FluxPipeline (flux-dev)  [gguf_Q8_0]" in out
    assert "transformer alone, runs with: vae ae, clip_l clip_l, t5xxl t5xxl_fp16" in out
    assert "T5 text encoder (2 layers, width 32, fp8_e4m3fn)" in out
    (models / "vae" / "ae.safetensors").unlink()
    assert _models(SimpleNamespace(models=[models], json=False)) == 0
    assert "missing part: model flux1-dev" in capsys.readouterr().out


def split_tensors_of(path: Path) -> dict:
    return read_tensors(path)


def test_an_all_in_one_fp8_file_says_its_transformers_quantization(pipelines, tmp_path):
    from single_files import transformer_single_file_tensors

    tensors = transformer_single_file_tensors(pipelines.flux)
    stored = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") else v.half() for k, v in tensors.items()}
    spec = probe(save_part(stored, tmp_path / "flux1-dev-fp8.safetensors", dtype=None))
    assert (spec.quantization, spec.parts, spec.text_encoders) == ("fp8_e4m3fn", (), ("clip_l", "t5xxl"))


def test_gguf_files_that_are_no_transformer_or_no_gguf_are_listed_as_such(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "llm.gguf"), "llama")
    for key in ("token_embd.weight", "blk.0.attn_q.weight"):  # a language model's names
        writer.add_tensor(key, torch.randn(8, 32).half().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    store = ModelStore(tmp_path)
    kinds = {e.name: e.kind for e in store.entries}
    assert kinds == {"llm": "unknown", "broken": "unreadable"}
    assert "not a valid GGUF file" in str(next(e for e in store.entries if e.name == "broken").error)


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_real_size_split_trees_pair_at_the_published_widths(tmp_path, architecture):
    """SD 3.5 Large and FLUX.1 dev at real size (headers only, on the meta device): the transformer alone expects
    the published text-encoder widths (FLUX: CLIP-L 768, T5 4096; SD 3.5: pooled 768 + 1280, T5 4096), and the
    real-size parts in ComfyUI's names are the ones chosen."""
    from single_files import sparse_checkpoint
    from test_single_file_dits import real_size_pipeline

    names = FLUX_NAMES if architecture == "flux" else SD35_NAMES
    for part, tensors in split_tensors(real_size_pipeline(architecture)).items():
        folder, file = names[part]
        (tmp_path / folder).mkdir(exist_ok=True)
        sparse_checkpoint(tmp_path / folder / file, tensors)
    store = ModelStore(tmp_path)
    model = store.pipeline(Path(names["transformer"][1]).stem)
    expected = {"flux": {"clip": 768, "t5xxl": 4096}, "sd3": {"clip_pooled": 2048, "t5xxl": 4096}}[architecture]
    assert dict(model.spec.text_encoder_widths) == expected and model.spec.unsupported is None
    assert model.spec.layer_widths == probe_real_folder_widths(architecture)
    parts = choose_parts(model, store, None, [])
    assert {role: e.path.name for role, e in parts.files.items()} == {
        role: file for role, (_, file) in names.items() if role != "transformer"}
    assert store.text_encoder("t5xxl_fp16").spec.layers == 24


def probe_real_folder_widths(architecture: str) -> tuple[int, ...]:
    """The blocks' widths of the published transformer (FLUX.1 dev: 19 double blocks of 3072; SD 3.5 Large: 38
    joint blocks of 2432)."""
    return (3072,) * 19 if architecture == "flux" else (2432,) * 38


# ------------------------------------------------------------------------------- GGUF text encoders: refused


def write_llama_cpp_t5(t5: dict[str, torch.Tensor], path: Path) -> Path:
    """A T5 encoder as city96's `t5-v1_1-xxl-encoder-Q8_0.gguf` names it (llama.cpp's: `token_embd.weight`,
    `enc.blk.N.attn_q.weight`, ...), Q8_0 where rows are whole blocks."""
    names = {"shared.weight": "token_embd.weight"}
    for key in t5:
        if key.startswith("encoder.block.") and ".SelfAttention." in key:
            block, what = key.split(".")[2], key.rsplit(".", 2)[-2]
            names[key] = f"enc.blk.{block}.attn_{what}.weight"
    return write_city96_gguf({new: t5[old] for old, new in names.items() if old in t5}, path)


@pytest.fixture(scope="module")
def gguf_t5_tree(pipelines, trees, tmp_path_factory) -> Path:
    """The FLUX tree with two GGUF T5s beside its fp16 one: transformers' names (under the fp16 file's own stem, so
    ComfyUI's usual name cannot tell them apart) and llama.cpp's (city96's)."""
    from comfy_trees import write_gguf

    models = tmp_path_factory.mktemp("gguf-t5") / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    t5 = pipelines.flux_parts["t5xxl"]
    write_gguf(t5, models / "text_encoders" / "t5xxl_fp16.gguf", Q8_0, "t5")
    write_llama_cpp_t5(t5, models / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf")
    return models


def test_city96_t5_ggufs_are_recognised_as_t5(pipelines, gguf_t5_tree):
    spec = probe(gguf_t5_tree / "text_encoders" / "t5-v1_1-xxl-encoder-Q8_0.gguf")
    width = pipelines.flux.text_encoder_2.config.d_model
    assert isinstance(spec, TextEncoderSpec)
    assert (spec.role, spec.width, spec.layers, spec.quantization) == (
        "t5xxl", width, pipelines.flux.text_encoder_2.config.num_layers, "gguf_Q8_0")


@pytest.mark.parametrize("name", ["t5xxl_fp16.gguf", "t5-v1_1-xxl-encoder-Q8_0"])
def test_a_named_gguf_text_encoder_is_refused_in_the_plan_with_the_fix(gguf_t5_tree, name):
    from imprompt.errors import UnsupportedError

    store = ModelStore(gguf_t5_tree)
    file = Path(name).stem + ".gguf"
    with pytest.raises(UnsupportedError, match=rf"text_encoders: .*{file}.* GGUF .*safetensors.*t5xxl_fp16"
                                               rf".*t5xxl_fp8_e4m3fn"):  # fmt: skip
        choose_parts(store.pipeline("flux1-dev"), store, None, [name])


def test_gguf_text_encoders_are_passed_over_in_the_folders_and_named_when_nothing_else_fits(gguf_t5_tree, tmp_path):
    store = ModelStore(gguf_t5_tree)
    parts = choose_parts(store.pipeline("flux1-dev"), store, None, [])
    assert parts.files["t5xxl"].path.name == "t5xxl_fp16.safetensors" and parts.why["t5xxl"].startswith("the only")
    models = tmp_path / "models"
    shutil.copytree(gguf_t5_tree, models)
    (models / "text_encoders" / "t5xxl_fp16.safetensors").unlink()
    store = ModelStore(models)
    with pytest.raises(MissingPartError, match=r"needs a T5 text encoder 32 wide.*GGUF.*t5-v1_1-xxl-encoder-Q8_0.gguf"
                                               r".*t5xxl_fp16.gguf.*safetensors"):  # fmt: skip
        choose_parts(store.pipeline("flux1-dev"), store, None, [])


def test_the_loader_refuses_a_gguf_text_encoder_as_unsupported(gguf_t5_tree, tmp_path):
    from imprompt.errors import UnsupportedError
    from imprompt.loading.split_files import PartFile, load_text_encoder

    with pytest.raises(UnsupportedError, match=r"t5xxl_fp16.gguf.*GGUF"):
        load_text_encoder("t5xxl", PartFile(gguf_t5_tree / "text_encoders" / "t5xxl_fp16.gguf"), tmp_path,
                          "text_encoder_2", torch.float32, "flux")  # fmt: skip


# ----------------------------------------------------------------------- a part's name names one file


@pytest.fixture(scope="module")
def two_clip_folders(trees, tmp_path_factory) -> Path:
    """ComfyUI's old and new text-encoder folders both kept: `clip/flux/clip_l.safetensors` (first in the walk) and
    `text_encoders/clip_l.safetensors` (the store's own pick for the name: the shallower)."""
    models = tmp_path_factory.mktemp("two-clips") / "models"
    shutil.copytree(trees["flux", "diffusion_models"], models)
    (models / "clip" / "flux").mkdir(parents=True)
    shutil.copy(models / "text_encoders" / "clip_l.safetensors", models / "clip" / "flux" / "clip_l.safetensors")
    return models


def test_a_tie_is_broken_as_the_store_resolves_names_and_the_reported_name_gives_the_same_file(two_clip_folders):
    store = ModelStore(two_clip_folders)
    model = store.pipeline("flux1-dev")
    parts = choose_parts(model, store, None, [])
    assert parts.files["clip_l"].path == store.text_encoder("clip_l").path == two_clip_folders / "text_encoders" / "clip_l.safetensors"
    described = parts.describe()
    # a stem two files share is reported as the path under the models folder; a unique stem stays readable
    assert {role: p["name"] for role, p in described.items()} == {
        "vae": "ae", "clip_l": "text_encoders/clip_l.safetensors", "t5xxl": "t5xxl_fp16"}
    assert "clip/flux/clip_l.safetensors" in parts.why["clip_l"] and "text_encoders/clip_l.safetensors" in parts.why["clip_l"]
    fields = parts.fields()
    assert fields == {"vae": "ae", "text_encoders": ["text_encoders/clip_l.safetensors", "t5xxl_fp16"]}
    served = ModelStore(two_clip_folders, allow_paths=False)  # the HTTP server's store: no paths outside the roots
    again = choose_parts(served.pipeline("flux1-dev"), served, fields["vae"], fields["text_encoders"])
    assert again.key() == parts.key()
    deeper = choose_parts(model, store, None, ["clip/flux/clip_l.safetensors"])  # the other one, by its own name
    assert deeper.files["clip_l"].path == two_clip_folders / "clip" / "flux" / "clip_l.safetensors"
    assert deeper.describe()["clip_l"]["name"] == "clip/flux/clip_l.safetensors"
    by_path = choose_parts(model, served, None, [str(deeper.files["clip_l"].path)])  # a path in the roots, as listed
    assert by_path.key() == deeper.key()


# ------------------------------------------------------------------------------------ a part of the wrong kind


def test_a_part_of_the_wrong_kind_is_refused_naming_the_field_what_fits_and_the_candidates(trees):
    store = ModelStore(trees["flux", "diffusion_models"])
    model = store.pipeline("flux1-dev")
    with pytest.raises(IncompatibleError, match=r"text_encoders: 'ae' is .*vae/ae\.safetensors.*a VAE.*not a text encoder"
                                                r".*CLIP-L text encoder 32 wide.*T5 text encoder 32 wide"
                                                r".*clip_l.*t5xxl_fp16"):  # fmt: skip
        choose_parts(model, store, None, ["ae"])
    with pytest.raises(IncompatibleError, match=r"vae: 'clip_l' is .*clip_l\.safetensors.*a CLIP text encoder"
                                                r".*not a VAE.*16 latent channels.*ae"):  # fmt: skip
        choose_parts(model, store, "clip_l", [])
