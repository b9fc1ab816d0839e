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
    # an engine-wide offload=encoders does not refuse SD 1.5 / SDXL: they run with every component on the device
    plan = plan_for(8, sdxl, forced="encoders", encoders_apart=False)
    assert plan.mode == "none" and "offload=encoders is for SD 3.x and FLUX" in plan.why


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
        held = sum(module_bytes(m) for m in loaded.own_components.values() if isinstance(m, torch.nn.Module))
        assert loaded.device_bytes == (loaded.memory.on_device_bytes if loaded.hooked else
                                       module_bytes(loaded.pipeline.transformer) + module_bytes(loaded.pipeline.vae))  # fmt: skip
        assert loaded.device_bytes + loaded.host_bytes == held  # what waits in host memory is counted too
        # on the CPU device both are the same memory: the pipelines budget counts all of it
        resident = engine.state.pipelines.on_device.values()
        assert engine.state.pipelines.on_device.used_bytes == sum(p.device_bytes + p.host_bytes for p in resident)
        loaded_event = next(e for e in result.info["events"] if e["event"] == "model_loaded")
        assert (loaded_event["device_bytes"], loaded_event["host_bytes"]) == (loaded.device_bytes, loaded.host_bytes)
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


def test_a_forced_encoders_plan_serves_sd_models_with_no_plan_and_says_why(pack):
    result = Engine(pack / "diffusers", offload="encoders").generate(request("tiny-sdxl", cfg_scale=5.0))
    events = [e for e in result.info["events"] if e["event"] == "memory_plan"]
    assert [e["plan"] for e in events] == ["none"] and "offload=encoders is for SD 3.x and FLUX" in events[0]["why"]


# ------------------------------------------------------------------------------------------------ fp8 sizes


@pytest.fixture(scope="module")
def fp8_tree(pack, tmp_path_factory):
    """ComfyUI's split FLUX with an fp8 transformer and an fp8 T5, an SD 3.5 transformer in fp8, and an all-in-one
    FLUX file whose transformer and T5 are fp8 (T5's tokenizer where ComfyUI ships it)."""
    import shutil

    from comfy_trees import fp8_tensors, save_part, split_tensors, write_split_tree
    from single_files import transformer_single_file_tensors

    from imprompt.models.single_file import COMFY_T5_TOKENIZER

    root = tmp_path_factory.mktemp("fp8")
    flux = load_pipeline(probe(pack / "diffusers" / FLUX_MODEL), CPU, torch.float32)
    write_split_tree(flux, root / "models")
    tensors = split_tensors(flux)
    save_part(fp8_tensors(tensors["transformer"]), root / "models" / "diffusion_models" / "flux1-dev.safetensors", None)
    save_part(fp8_tensors(tensors["t5xxl"]), root / "models" / "text_encoders" / "t5xxl_fp16.safetensors", None)
    sd35 = load_pipeline(probe(pack / "diffusers" / SD35_MODEL), CPU, torch.float32)
    names = {"transformer": ("diffusion_models", "sd3.5-fp8.safetensors"), "vae": ("vae", "sd3.5_vae.safetensors"),
             "clip_l": ("text_encoders", "clip_l_sd35.safetensors"), "clip_g": ("text_encoders", "clip_g.safetensors")}
    write_split_tree(sd35, root / "models", names, with_t5=False)
    sd_parts = split_tensors(sd35, with_t5=False)
    save_part(fp8_tensors(sd_parts["transformer"]), root / "models" / "diffusion_models" / "sd3.5-fp8.safetensors", None)
    whole = transformer_single_file_tensors(flux)
    fp8 = ("model.diffusion_model.", "text_encoders.t5xxl.")
    save_part({k: v.to(torch.float8_e4m3fn) if k.startswith(fp8) else v.half() for k, v in whole.items()},
              root / "models" / "checkpoints" / "flux-aio-fp8.safetensors", None)  # fmt: skip
    shutil.copytree(pack / "diffusers" / FLUX_MODEL / "tokenizer_2", root / COMFY_T5_TOKENIZER)
    return root / "models"


@pytest.mark.parametrize("name", ["flux1-dev", "sd3.5-fp8", "flux-aio-fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_sizes_are_what_the_loader_holds(fp8_tree, name, dtype):
    """Findings 1 and 2: an fp8 transformer's layers that diffusers' skip patterns upcast (FLUX's and SD 3's AdaLN
    "norm" layers) count in the compute dtype, an fp8 T5 counts fp8 with its skipped `wo` layers upcast: the
    estimate equals the loaded modules' bytes (CLIP's position ids, a buffer no file holds, aside)."""
    from imprompt.models.parts import choose_parts
    from imprompt.models.store import ModelStore

    store = ModelStore(fp8_tree)
    entry = store.pipeline(name)
    assert entry.spec.quantization == "fp8_e4m3fn"
    parts = NO_PARTS if name == "flux-aio-fp8" else choose_parts(entry, store, None, [])
    sizes = estimate_sizes(entry.spec, parts, dtype).total
    pipeline = load_pipeline(entry.spec, CPU, dtype, None, parts)
    t5 = "text_encoder_3" if name.startswith("sd3") else "text_encoder_2"
    loaded = {"transformer": pipeline.transformer, "text_encoder.t5xxl": getattr(pipeline, t5, None)}
    for component, module in loaded.items():
        if module is None:
            continue
        assert any(p.dtype == torch.float8_e4m3fn for p in module.parameters()) == (component == "transformer" or
                                                                                      name != "sd3.5-fp8")  # fmt: skip
        assert abs(sizes[component] - module_bytes(module)) <= 1024, (component, sizes[component], module_bytes(module))


# ------------------------------------------------------------------------------------------------ keys, LoRAs


@pytest.fixture
def split_tree(tmp_path):
    """ComfyUI's split FLUX (a transformer alone, its VAE, CLIP-L and T5 beside it), T5's tokenizer where ComfyUI
    ships it, and a FLUX LoRA."""
    import shutil

    from comfy_trees import write_split_tree
    from dit_loras import diffusers_lora, lora_pairs, write

    from imprompt.models.single_file import COMFY_T5_TOKENIZER

    from imprompt.demo.tiny_dits import build_flux_pipeline

    flux = build_flux_pipeline(tmp_path / "reference", seed=5, clip_vocabulary=True)  # CLIP's whole vocabulary
    write_split_tree(flux, tmp_path / "models")
    shutil.copytree(tmp_path / "reference" / "tokenizer_2", tmp_path / COMFY_T5_TOKENIZER)
    write(tmp_path / "models" / "loras" / "flux-detail.safetensors", diffusers_lora(lora_pairs(flux.transformer, 2, scale=0.2)))
    return tmp_path / "models"


def split_request(**fields) -> dict:
    return request("flux1-dev", **fields)


def test_a_changed_part_frees_the_pipeline_built_from_its_old_version(split_tree):
    """Finding 4: replacing t5xxl_fp16.safetensors leaves no pipeline of its old version resident; a pipeline with
    another T5 at another path is another pipeline and stays."""
    import os
    import shutil

    from comfy_trees import save_part
    from safetensors.torch import load_file

    engine = Engine(split_tree)
    engine.generate(split_request())
    t5 = split_tree / "text_encoders" / "t5xxl_fp16.safetensors"
    other = shutil.copyfile(t5, split_tree / "text_encoders" / "t5xxl_other.safetensors")
    engine.generate(split_request(text_encoders=["clip_l", "t5xxl_other"]))
    assert len(engine.state.pipelines.all()) == 2  # another T5 at another path: both stay
    save_part({k: v * 1.01 for k, v in load_file(t5).items()}, t5, None)
    os.utime(t5, (os.stat(t5).st_atime, os.stat(t5).st_mtime + 5))
    engine.store.refresh()
    result = engine.generate(split_request())
    unloaded = [e for e in result.info["events"] if e["event"] == "model_unloaded"]
    assert [e["why"] for e in unloaded] == ["its file changed on disk"]
    held = [dict(p.key[5:])["t5xxl"][0] for p in engine.state.pipelines.all()]
    assert sorted(held) == sorted([str(t5), str(other)])


def test_a_lora_under_model_offload_loads_and_keeps_the_hooks(split_tree):
    """Finding 5: diffusers' `load_lora_weights` puts model offload back on its default accelerator (none on the
    CPU); imprompt lifts the hooks itself and puts them back on the engine's device: the LoRA acts as with no plan,
    the pipeline keeps its hooks, and taking it out gives the plain pixels."""
    from accelerate.hooks import CpuOffload

    plain = Engine(split_tree)
    expected = {name: plain.generate(split_request(prompt=prompt)).images[0]
                for name, prompt in (("lora", "a red cat <lora:flux-detail:0.8>"), ("plain", "a red cat"))}  # fmt: skip
    assert max_diff(expected["lora"], expected["plain"]) > 0
    engine = Engine(split_tree, offload="model")
    for name in ("lora", "plain", "lora"):
        prompt = "a red cat <lora:flux-detail:0.8>" if name == "lora" else "a red cat"
        result = engine.generate(split_request(prompt=prompt))
        assert max_diff(result.images[0], expected[name]) == 0, name
        loaded = engine.state.pipelines.current
        assert loaded.hooked and loaded.memory.mode == "model"
        hooks = {n: type(getattr(m, "_hf_hook", None)) for n, m in loaded.pipeline.components.items()
                 if isinstance(m, torch.nn.Module)}  # fmt: skip
        assert set(hooks.values()) == {CpuOffload}, hooks


def test_the_plan_is_part_of_the_pipeline_key_and_does_not_depend_on_free_memory(pack, monkeypatch):
    """Invariant 3: "auto" chooses from the device's total memory and the engine's budgets, never from what is free
    at the moment (which depends on what else is resident or cached), and a forced change of plan is another
    pipeline. A 24 GiB GPU simulated (nothing loads): its plan is the same with all of it free and with 1 MiB free."""
    import imprompt.state as state_module

    monkeypatch.setattr(state_module, "device_memory", lambda device: 24 * GiB)
    keys = {}
    for mode in ("auto", "group"):
        for free in (24 * GiB, 2**20):
            monkeypatch.setattr(state_module, "free_memory", lambda device, _free=free: _free, raising=False)
            engine = Engine(pack / "diffusers", offload=mode, dtype="float32")
            engine.state.device = CUDA
            keys.setdefault(mode, set()).add(engine.state.pipeline_key(engine.state.store.pipeline(FLUX_MODEL)))
    assert [len(found) for found in keys.values()] == [1, 1]  # the same request, the same key, whatever is free
    (auto,), (group,) = keys.values()
    assert auto[4] == "none" and group[4] == "group"


def test_on_a_gpu_a_pipelines_host_part_is_charged_to_the_offload_budget():
    """Finding 7: under "encoders" a pipeline on a GPU holds its text encoders in host RAM; that part is charged to
    the offload budget (host RAM) beside the pipelines waiting there, and freed with it. The GPU is stood in for by
    the meta device (nothing computes)."""
    from types import SimpleNamespace

    from imprompt.loading.memory_plan import MemoryPlan
    from imprompt.loading.resident import HOST, LoadedPipeline, ResidentPipelines

    class Pipeline(SimpleNamespace):
        def to(self, *_, **__):
            return self

    def loaded(name: str) -> LoadedPipeline:
        modules = {"transformer": torch.nn.Linear(64, 64), "text_encoder": torch.nn.Linear(32, 32)}
        nothing = SimpleNamespace(attach=lambda *_: None, clear=lambda: 0, release=lambda: None)
        return LoadedPipeline(key=(name, "v1", "float32", "meta", "encoders"), name=name,
                              pipeline=Pipeline(components=modules, **modules), attached=nothing, loras=nothing,
                              own_components=dict(modules), scheduler_config={}, scheduler_class="", load_seconds=0.0,
                              model_hash=None, memory=MemoryPlan("encoders", "test", 0))  # fmt: skip

    first = loaded("a")
    encoder = module_bytes(torch.nn.Linear(32, 32))
    assert (first.device_bytes, first.host_bytes) == (module_bytes(torch.nn.Linear(64, 64)), encoder)
    resident = ResidentPipelines(torch.device("meta"), budget_bytes=10**9, offload_budget_bytes=10**9)
    events: list = []
    resident.add(first, events)
    assert resident.on_device.used_bytes == first.device_bytes  # the GPU's budget: its device part
    assert resident.offloaded.used_bytes == first.host_bytes and (HOST, first.key) in resident.offloaded
    assert resident.all() == [first]
    resident.unload(first.key)
    assert resident.offloaded.used_bytes == 0 and resident.on_device.used_bytes == 0
