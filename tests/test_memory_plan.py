"""Precision per family and the memory plan: the dtype "auto" gives each family on CUDA, the plan chosen for FLUX dev
on simulated 16 / 24 / 80 GiB GPUs, the sizes read from files before loading, and each plan run on the CPU giving
the pixels of no plan at all."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff
from safetensors.torch import save_file

from imprompt import Engine
from imprompt.demo.pack import FLUX_MODEL, SD35_MODEL
from imprompt.errors import RequestError, UnsupportedError
from imprompt.loading.memory_plan import choose_plan, estimate_sizes, tensor_bytes
from imprompt.loading.pipelines import load_pipeline
from imprompt.models.parts import NO_PARTS
from imprompt.models.probe import probe
from imprompt.util.cache import module_bytes
from imprompt.util.devices import model_dtype

GB, GiB = 10**9, 2**30
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
# FLUX.1-dev as it sits in memory in bf16: what users' GPUs are asked to hold
FLUX_DEV = {"transformer": int(23.8 * GB), "text_encoder_2": int(9.5 * GB), "text_encoder": int(0.25 * GB),
            "vae": int(0.17 * GB)}  # fmt: skip
# under group offload with streams: two of its largest blocks (a double-stream block is 0.68 GB) and what is outside
FLUX_DEV_GROUP = {"transformer": int(1.5 * GB), "text_encoder_2": int(1.1 * GB), "text_encoder": int(0.05 * GB),
                  "vae": int(0.17 * GB)}  # fmt: skip


def plan_for(gib: float, sizes: dict = FLUX_DEV, **fields):
    """The plan for a GPU of `gib` GiB with the engine's default activation margin (20 %), all of it free."""
    return choose_plan(int(gib * GiB), sizes, activation_bytes=int(0.2 * gib * GiB), group_bytes=FLUX_DEV_GROUP,
                       **fields)  # fmt: skip


def request(model: str = FLUX_MODEL, **fields) -> dict:
    return {"model": model, "prompt": "a red cat", "seed": 1, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 5.0 if model == SD35_MODEL else 3.5} | fields  # fmt: skip


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(("dtype", "device", "architecture", "bf16", "expected"), [
    (None, CUDA, "flux", True, torch.bfloat16),  # FLUX and SD 3.x were trained in bf16
    ("auto", CUDA, "sd3", True, torch.bfloat16),
    (None, CUDA, "flux", False, torch.float16),  # a GPU without bf16 (before Ampere)
    (None, CUDA, "unet", True, torch.float16),  # SD 1.5 / SDXL
    ("float32", CUDA, "flux", True, torch.float32),  # the user's choice wins
    ("float16", CUDA, "sd3", True, torch.float16),
    (None, CPU, "flux", True, torch.float32),  # the CPU: float32 unless asked
    ("bfloat16", CPU, "unet", False, torch.bfloat16),
])  # fmt: skip
def test_auto_precision_is_per_family_and_the_users_dtype_wins(dtype, device, architecture, bf16, expected):
    assert model_dtype(dtype, device, architecture, bf16_supported=bf16) == expected


def test_the_cpu_refuses_float16_for_any_family():
    with pytest.raises(RequestError, match="float16 on the CPU"):
        model_dtype("float16", CPU, "flux", bf16_supported=True)


# ------------------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize(("gib", "expected"), [(80, "none"), (32, "encoders"), (24, "group"), (16, "group")])
def test_flux_dev_in_bf16_on_simulated_gpus(gib, expected):
    plan = plan_for(gib)
    assert plan.mode == expected, plan.why
    assert plan.on_device_bytes <= 0.8 * gib * GiB  # what it holds leaves the activations their margin
    assert "GiB" in plan.why


@pytest.mark.parametrize(("gib", "expected"), [(24, "encoders"), (16, "encoders"), (14, "model"), (8, "group")])
def test_flux_dev_in_fp8_keeps_t5_off_a_24_or_16_gib_gpu(gib, expected):
    fp8 = FLUX_DEV | {"transformer": int(11.9 * GB)}
    assert plan_for(gib, fp8).mode == expected


def test_sdxl_cannot_keep_its_encoders_apart_so_a_small_gpu_gets_model_offload():
    sdxl = {"unet": int(5.1 * GB), "text_encoder": int(0.25 * GB), "text_encoder_2": int(1.4 * GB), "vae": int(0.17 * GB)}
    assert plan_for(8, sdxl, encoders_apart=False).mode == "model"
    assert plan_for(12, sdxl, encoders_apart=False).mode == "none"
    with pytest.raises(UnsupportedError, match="'encoders' plan"):
        plan_for(8, sdxl, forced="encoders", encoders_apart=False)


def test_nothing_fits_says_so():
    plan = plan_for(2)
    assert plan.mode == "group" and "expect running out of device memory" in plan.why


def test_the_cpu_plans_none_unless_forced_and_a_forced_plan_is_kept():
    plan = plan_for(16, device_type="cpu")
    assert plan.mode == "none" and "the device is the CPU" in plan.why
    for mode in ("none", "encoders", "model", "group"):
        forced = plan_for(16, forced=mode, device_type="cpu")
        assert forced.mode == mode and f"forced (offload={mode})" in forced.why
    assert "does not fit" in plan_for(16, forced="none").why
    with pytest.raises(RequestError, match="offload: 'sequential' is not a memory plan"):
        plan_for(16, forced="sequential")
    with pytest.raises(RequestError, match="offload"):
        Engine([], offload="disk")


# ------------------------------------------------------------------------------------------------ sizes


def test_tensor_bytes_keep_quantized_weights_at_their_size():
    assert tensor_bytes("F16", 1000, torch.float32, False) == 4000  # upcast to the compute dtype
    assert tensor_bytes("BF16", 1000, torch.bfloat16, False) == 2000
    assert tensor_bytes("F8_E4M3", 1000, torch.bfloat16, True) == 1000  # kept fp8 (layerwise casting)
    assert tensor_bytes("F8_E4M3", 1000, torch.bfloat16, False) == 2000  # upcast at load
    assert tensor_bytes("Q8_0", 64, torch.bfloat16, False) == 68  # GGUF: 32 values in 34 bytes
    assert tensor_bytes("Q4_K", 256, torch.bfloat16, False) == 144
    assert tensor_bytes("I64", 10, torch.float16, False) == 80


@pytest.mark.parametrize("name", [FLUX_MODEL, SD35_MODEL, "tiny-sdxl"])
def test_sizes_read_from_the_files_are_what_the_loaded_modules_hold(pack, name):
    spec = probe(pack / "diffusers" / name)
    pipeline = load_pipeline(spec, CPU, torch.float32)
    loaded = {n: module_bytes(m) for n, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    for dtype in (torch.float32, torch.bfloat16):
        sizes = estimate_sizes(spec, NO_PARTS, dtype)
        assert sizes.total.keys() == loaded.keys()
        for component, nbytes in loaded.items():  # CLIP's position ids (a buffer no file holds) aside
            expected = nbytes if dtype == torch.float32 else nbytes // 2
            assert abs(sizes.total[component] - expected) <= 1024, (component, dtype)
        group = sizes.group(streams=True)
        assert group["vae"] == sizes.total["vae"] and all(group[c] <= sizes.total[c] for c in group)


def test_sizes_of_an_all_in_one_file_by_its_prefixes(pack, tmp_path):
    from single_files import transformer_single_file_tensors

    spec = probe(pack / "diffusers" / FLUX_MODEL)
    pipeline = load_pipeline(spec, CPU, torch.float32)
    save_file({k: v.to(torch.float16).contiguous() for k, v in transformer_single_file_tensors(pipeline).items()},
              tmp_path / "flux.safetensors")  # fmt: skip
    sizes = estimate_sizes(probe(tmp_path / "flux.safetensors"), NO_PARTS, torch.float32).total
    assert sizes.keys() == {"transformer", "vae", "text_encoder.clip_l", "text_encoder.t5xxl"}
    assert sizes["transformer"] == module_bytes(pipeline.transformer)
    assert sizes["vae"] == module_bytes(pipeline.vae)
    assert abs(sizes["text_encoder.t5xxl"] - module_bytes(pipeline.text_encoder_2)) <= 1024


# ------------------------------------------------------------------------------------------------ the plans run


@pytest.fixture(scope="module")
def unplanned(pack):
    engine = Engine(pack / "diffusers")
    return {name: engine.generate(request(name, **fields)) for name, fields in CASES.items()}


CASES = {FLUX_MODEL: {"negative_prompt": "blurry", "true_cfg_scale": 2.0}, SD35_MODEL: {"negative_prompt": "blurry"}}


@pytest.mark.parametrize("mode", ["encoders", "model", "group"])
def test_a_forced_plan_gives_the_pixels_of_no_plan(pack, unplanned, mode, monkeypatch):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    encoded_with_embeddings = []  # the pipelines' own encode_prompt, called with embeddings imprompt made
    for cls in (FluxPipeline, StableDiffusion3Pipeline):
        original = cls.encode_prompt

        def spy(self, *args, _original=original, **kwargs):
            encoded_with_embeddings.append(kwargs.get("prompt_embeds") is not None)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "encode_prompt", spy)
    engine = Engine(pack / "diffusers", offload=mode)
    for name, fields in CASES.items():
        result = engine.generate(request(name, **fields))
        assert max_diff(result.images[0], unplanned[name].images[0]) == 0, name
        events = [e for e in result.info["events"] if e["event"] == "memory_plan"]
        assert [(e["model"], e["plan"]) for e in events] == [(name, mode)] and "forced" in events[0]["why"]
        assert result.info["memory_plan"]["plan"] == mode and result.info["dtype"] == "float32"
        loaded = engine.state.pipelines.current
        assert loaded.hooked == (mode in ("model", "group"))
        assert loaded.nbytes == (loaded.memory.on_device_bytes if loaded.hooked else
                                 module_bytes(loaded.pipeline.transformer) + module_bytes(loaded.pipeline.vae))  # fmt: skip
    # "encoders": the prompts were encoded apart and handed over as embeddings; otherwise the pipeline encoded them
    assert any(encoded_with_embeddings) == (mode == "encoders")


def test_auto_on_the_cpu_is_no_plan_and_says_why(pack, unplanned):
    result = Engine(pack / "diffusers").generate(request(SD35_MODEL, negative_prompt="blurry"))
    assert result.info["memory_plan"]["plan"] == "none" and "the device is the CPU" in result.info["memory_plan"]["why"]
    events = [e for e in result.info["events"] if e["event"] == "memory_plan"]
    assert [(e["plan"], e["on_device_bytes"]) for e in events] == [("none", result.info["memory_plan"]["on_device_bytes"])]


def test_a_group_offloaded_model_pushed_out_and_back_gives_the_same_pixels(pack, unplanned):
    """The GPU's second tier emulated on the CPU: a model under group offload leaves (only what its hooks do not
    move goes with `.to`) and comes back without installing its hooks twice."""
    engine = Engine(pack / "diffusers", offload="group", pipeline_cache_budget=1, offload_budget="64GiB")
    for name in (FLUX_MODEL, SD35_MODEL, FLUX_MODEL, SD35_MODEL):
        result = engine.generate(request(name, **CASES[name]))
        assert max_diff(result.images[0], unplanned[name].images[0]) == 0, name
    assert "model_restored" in [e["event"] for e in result.info["events"]]


def test_sizes_of_a_split_model_count_its_parts(pack, tmp_path):
    """ComfyUI's split layout: the transformer alone, and the VAE and text encoders its parts are paired with."""
    from comfy_trees import write_split_tree

    from imprompt.models.parts import choose_parts
    from imprompt.models.store import ModelStore

    pipeline = load_pipeline(probe(pack / "diffusers" / FLUX_MODEL), CPU, torch.float32)
    write_split_tree(pipeline, tmp_path)  # saved in float16, planned in float32
    store = ModelStore(tmp_path)
    entry = store.pipeline("flux1-dev")
    sizes = estimate_sizes(entry.spec, choose_parts(entry, store, None, []), torch.float32).total
    assert sizes == {"transformer": module_bytes(pipeline.transformer), "vae": module_bytes(pipeline.vae),
                     "text_encoder.clip_l": sizes["text_encoder.clip_l"],
                     "text_encoder.t5xxl": module_bytes(pipeline.text_encoder_2)}  # fmt: skip
    assert abs(sizes["text_encoder.clip_l"] - module_bytes(pipeline.text_encoder)) <= 1024  # CLIP's position ids
