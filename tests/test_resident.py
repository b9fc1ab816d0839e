"""Several base models resident at once: switching back to a model is no reload, the pipeline budget is a real
bound (what it pushes out is freed), components two folders share on disk are loaded once, a failed load or a
changed file leaves the others as they were, and every picture is the one a fresh engine gives."""

from __future__ import annotations

import gc
import shutil
import weakref

import pytest
import torch
from conftest import max_diff, request, unit

from imprompt import Engine
from imprompt.errors import CheckpointError
from tools.extra_models import kohya_lora, write

SDXL = "tiny-sdxl"


@pytest.fixture(scope="module")
def models(pack, tmp_path_factory):
    """`tiny-sd15-b`: another SD 1.5 model whose UNet differs and whose `vae/` and `text_encoder/` are the first
    model's files (linked, as users share components between folders); a LoRA with text-encoder parts; a broken
    model whose UNet file is cut short."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    root = tmp_path_factory.mktemp("resident")
    a, b = pack / "diffusers" / "tiny-sd15", root / "tiny-sd15-b"
    b.mkdir()
    for name in ("scheduler", "tokenizer", "model_index.json"):
        (shutil.copytree if (a / name).is_dir() else shutil.copy)(a / name, b / name)
    for name in ("vae", "text_encoder"):
        (b / name).mkdir()
        for file in (a / name).iterdir():
            (b / name / file.name).symlink_to(file)
    unet = UNet2DConditionModel.from_pretrained(a / "unet")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    unet.save_pretrained(b / "unet")
    broken = shutil.copytree(a, root / "tiny-sd15-broken")
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    sd15 = StableDiffusionPipeline.from_pretrained(a, safety_checker=None, requires_safety_checker=False)
    write(root / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=1))
    return root


def fresh(pack, models, req):
    return Engine([pack, models]).generate(req).images[0]


def model_events(result) -> list[str]:
    return [e["event"] for e in result.info["events"] if e["event"].startswith(("model_", "component_"))]


def test_switching_back_is_no_reload_and_shared_files_load_once(pack, models, red_circle):
    engine = Engine([pack, models])
    sequence = [
        request(unit("Base", red_circle)),
        request(unit("Base", red_circle), model="tiny-sd15-b"),
        request(unit("Plus", red_circle)),
        request(unit("Base SDXL", red_circle), model=SDXL),
        request(unit("Base ViT-G", red_circle), model="tiny-sd15-b"),
    ]
    results = [engine.generate(r) for r in sequence]
    assert [model_events(r) for r in results] == [
        ["model_loaded"], ["component_shared", "component_shared", "model_loaded"], ["model_reused"],
        ["model_loaded"], ["model_reused"],
    ]  # fmt: skip
    assert max_diff(results[0].images[0], results[1].images[0]) > 0  # another UNet, another picture
    for result, req in zip(results, sequence):
        assert max_diff(result.images[0], fresh(pack, models, req)) == 0
    resident = {p.name: p.pipeline for p in engine.state.pipelines.all()}
    assert set(resident) == {"tiny-sd15", "tiny-sd15-b", SDXL}
    assert resident["tiny-sd15"].vae is resident["tiny-sd15-b"].vae
    assert resident["tiny-sd15"].text_encoder is resident["tiny-sd15-b"].text_encoder
    assert resident["tiny-sd15"].unet is not resident["tiny-sd15-b"].unet
    listed = [e["label"] for e in engine.cache_info()["pipelines"]["entries"]]
    assert listed == ["tiny-sd15", SDXL, "tiny-sd15-b"]  # least recently used first


def test_a_shared_text_encoder_carries_no_lora_from_one_model_to_the_other(pack, models):
    """LoRA layers for the text encoder sit in the module both models share: each request still gets exactly
    its own LoRAs, in every order."""
    engine = Engine([pack, models])
    sequence = [
        request(prompt="a cat <lora:detail-sd15:0.9>"),
        request(model="tiny-sd15-b"),
        request(prompt="a cat <lora:detail-sd15:0.9>"),
        request(prompt="a cat <lora:detail-sd15:-0.6>", model="tiny-sd15-b"),
        request(),
        request(prompt="a cat <lora:detail-sd15:0.9>", model="tiny-sd15-b"),
        request(prompt="a cat <lora:detail-sd15:0.9>"),
    ]
    for i, req in enumerate(sequence):
        assert max_diff(engine.generate(req).images[0], fresh(pack, models, req)) == 0, f"request {i}"


def test_the_pipeline_budget_is_a_bound_and_what_it_pushes_out_is_freed(pack, models, red_circle):
    engine = Engine([pack, models], pipeline_cache_budget=1)  # room for one: every switch unloads
    first = engine.generate(request(unit("Base", red_circle)))
    unet = weakref.ref(engine.state.pipelines.current.pipeline.unet)
    second = engine.generate(request(unit("Base SDXL", red_circle), model=SDXL))
    assert model_events(second) == ["model_unloaded", "model_loaded"]
    unloaded = next(e for e in second.info["events"] if e["event"] == "model_unloaded")
    assert unloaded["model"] == "tiny-sd15" and "pipeline budget" in unloaded["why"]
    gc.collect()
    assert unet() is None  # nothing (attached adapters, LoRAs, shells) keeps it alive
    again = engine.generate(request(unit("Base", red_circle)))
    assert model_events(again) == ["model_unloaded", "model_loaded"]
    assert max_diff(again.images[0], first.images[0]) == 0


def test_a_pushed_out_model_is_gone_before_the_next_moves_to_the_device(pack, models, red_circle, monkeypatch):
    """On a GPU with room for one model, holding the old one while the new one moves in would run out of memory."""
    from diffusers import StableDiffusionXLPipeline

    engine = Engine([pack, models], pipeline_cache_budget=1)
    engine.generate(request(unit("Base", red_circle)))
    unet = weakref.ref(engine.state.pipelines.current.pipeline.unet)
    old_alive_at_each_move, move = [], StableDiffusionXLPipeline.to

    def to(self, *args, **kwargs):
        old_alive_at_each_move.append(unet() is not None)
        return move(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "to", to)
    engine.generate(request(unit("Base SDXL", red_circle), model=SDXL))
    assert old_alive_at_each_move and old_alive_at_each_move[-1] is False  # the last move: onto the device


def test_a_model_that_fails_to_move_onto_the_device_is_not_left_resident(pack, models, red_circle, monkeypatch):
    """Out of device memory halfway through the move: the half-moved model is never served, the others are."""
    import sys

    from diffusers import StableDiffusionXLPipeline

    engine = Engine([pack, models])
    before = engine.generate(request(unit("Base", red_circle)))
    move = StableDiffusionXLPipeline.to

    def to(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_name in ("add", "place"):  # ResidentPipelines.add: the move onto the device
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return move(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "to", to)
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate(request(unit("Base SDXL", red_circle), model=SDXL))
    assert [e["label"] for e in engine.cache_info()["pipelines"]["entries"]] == ["tiny-sd15"]
    monkeypatch.undo()
    assert max_diff(engine.generate(request(unit("Base", red_circle))).images[0], before.images[0]) == 0
    assert "model_loaded" in model_events(engine.generate(request(unit("Base SDXL", red_circle), model=SDXL)))


def test_a_failed_load_or_a_changed_file_leaves_the_others_as_they_were(pack, models, red_circle, tmp_path):
    engine = Engine([pack, models, tmp_path])
    before = engine.generate(request(unit("Base", red_circle)))
    with pytest.raises(CheckpointError, match="tiny-sd15-broken"):
        engine.generate(request(unit("Base", red_circle), model="tiny-sd15-broken"))
    after = engine.generate(request(unit("Base", red_circle)))
    assert model_events(after) == []  # still resident and current: nothing to do
    assert max_diff(after.images[0], before.images[0]) == 0
    assert [e["label"] for e in engine.cache_info()["pipelines"]["entries"]] == ["tiny-sd15"]

    copy = shutil.copytree(models / "tiny-sd15-b", tmp_path / "tiny-sd15-c", symlinks=True)
    engine.generate(request(model="tiny-sd15-c"))
    weights = next((copy / "unet").glob("*.safetensors"))
    shutil.copy(pack / "diffusers" / "tiny-sd15" / "unet" / weights.name, weights)  # now tiny-sd15's UNet
    changed = engine.generate(request(model="tiny-sd15-c"))  # its VAE and text encoder are still tiny-sd15's
    assert model_events(changed) == ["model_unloaded", "component_shared", "component_shared", "model_loaded"]
    assert next(e for e in changed.info["events"] if e["event"] == "model_unloaded")["why"] == "its file changed on disk"
    assert max_diff(changed.images[0], engine.generate(request()).images[0]) == 0  # the new file's picture


def test_a_model_dropped_for_a_changed_file_takes_its_loras_out_of_a_shared_text_encoder(pack, models, tmp_path):
    """A model whose file changed is loaded anew; the old one's LoRA layers must not stay behind in the text
    encoder it shared with other models (memory that nothing frees, adapters nothing switches)."""
    engine = Engine([pack, models, tmp_path])
    engine.generate(request(prompt="a cat <lora:detail-sd15:0.9>"))  # tiny-sd15: LoRA layers in the shared encoder
    copy = shutil.copytree(models / "tiny-sd15-b", tmp_path / "tiny-sd15-c", symlinks=True)
    engine.generate(request(prompt="a cat <lora:detail-sd15:0.9>", model="tiny-sd15-c"))
    weights = next((copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # the same bytes, a new file version
    req = request(prompt="a cat <lora:detail-sd15:0.5>", model="tiny-sd15-c")
    assert max_diff(engine.generate(req).images[0], Engine([pack, models, tmp_path]).generate(req).images[0]) == 0
    encoder = engine.state.pipelines.current.pipeline.text_encoder
    prefixes = {resident.loras.prefix for resident in engine.state.pipelines.all()}
    assert all(name.startswith(tuple(prefixes)) for name in encoder.peft_config)  # the dropped model's are gone


@pytest.fixture(scope="module")
def vaes(pack, tmp_path_factory):
    """A folder with one SD 1.5 VAE file (another decoder than the models' own)."""
    from diffusers import StableDiffusionPipeline

    from tools.extra_models import altered_vae

    root = tmp_path_factory.mktemp("vaes")
    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    write(root / "VAE" / "soft-vae.safetensors", altered_vae(sd15, seed=5).state_dict())
    return root


def test_a_request_vae_is_never_handed_out_as_a_shared_component(pack, models, vaes):
    """A request's VAE acts for that request only: a model loaded later that shares the first model's `vae/` files
    gets those files' VAE, not the one the earlier request swapped in."""
    engine = Engine([pack, models, vaes])
    with_vae = engine.generate(request(vae="soft-vae.safetensors"))
    assert with_vae.info["vae"]["name"] == "soft-vae.safetensors"
    later = engine.generate(request(model="tiny-sd15-b"))  # loads tiny-sd15-b, sharing tiny-sd15's vae/ files
    assert "component_shared" in model_events(later) and later.info["vae"] is None
    assert max_diff(later.images[0], Engine([pack, models, vaes]).generate(request(model="tiny-sd15-b")).images[0]) == 0


def test_a_request_vae_is_not_kept_alive_by_a_model_that_is_not_current(pack, models, vaes, red_circle):
    """After the request, every resident pipeline (its image-to-image twin included) holds its own VAE again, so a
    VAE the cache lets go is freed (on a GPU: its memory too)."""
    engine = Engine([pack, models, vaes])
    engine.generate(request(vae="soft-vae.safetensors", init_images=[red_circle], denoising_strength=0.5))
    engine.generate(request(vae="soft-vae.safetensors"))
    request_vae = weakref.ref(engine.state.vaes.values()[0])
    engine.generate(request(model="tiny-sd15-b"))
    engine.clear_cache()  # lets the VAE go from the cache
    gc.collect()
    assert request_vae() is None


def test_loading_a_model_leaves_the_components_it_shares_where_they_are(pack, models):
    """On a GPU a resident model's VAE and text encoder sit on the device while a model that shares them loads into
    CPU memory: the load must not move them there (if it then failed, the current model would be left with CPU
    components). Emulated with modules on the meta device, which cannot move at all."""
    from diffusers import AutoencoderKL

    from imprompt.loading.pipelines import load_pipeline
    from imprompt.models.probe import probe

    config = AutoencoderKL.load_config(pack / "diffusers" / "tiny-sd15" / "vae")
    with torch.device("meta"):
        on_the_gpu = AutoencoderKL.from_config(config)
    pipeline = load_pipeline(probe(models / "tiny-sd15-b"), torch.device("cpu"), torch.float32, {"vae": on_the_gpu})
    assert pipeline.vae is on_the_gpu and on_the_gpu.device.type == "meta"
    assert pipeline.unet.device.type == "cpu"


def test_the_offload_tier_gives_the_pictures_a_fresh_engine_gives(pack, models, vaes, red_circle):
    """A GPU's second tier (a model pushed off the device waits in CPU memory and moves back), emulated on the CPU
    with an offload budget: after going out and coming back, with adapters, LoRAs and a request VAE in between,
    every picture is a fresh engine's."""
    roots = [pack, models, vaes]
    engine = Engine(roots, pipeline_cache_budget=1, offload_budget="64GiB")  # one on the "device", the rest wait
    sequence = [
        request(unit("Plus", red_circle), prompt="a cat <lora:detail-sd15:0.8>", vae="soft-vae.safetensors"),
        request(unit("Base SDXL", red_circle), model=SDXL),
        request(unit("Plus", red_circle), prompt="a cat <lora:detail-sd15:0.8>"),
        request(unit("Base", red_circle), model="tiny-sd15-b", vae="soft-vae.safetensors"),
        request(prompt="a cat <lora:detail-sd15:0.5>"),
        request(unit("Base SDXL", red_circle), model=SDXL),
    ]
    seen = []
    for i, req in enumerate(sequence):
        result = engine.generate(req)
        seen += model_events(result) + [e["event"] for e in result.info["events"] if e["event"] == "model_restored"]
        assert max_diff(result.images[0], Engine(roots).generate(req).images[0]) == 0, f"request {i}"
    assert "model_offloaded" in seen and "model_restored" in seen and "model_unloaded" not in seen


# ------------------------------------------------------------------- host parts of planned pipelines (GPU tiers)


class _Stub:
    """A pipeline's stand-in: its components, and moves that change nothing (placement is not under test)."""

    def __init__(self, **modules):
        self.components = modules

    def to(self, *args, **kwargs):
        return self


def _planned(name: str, mode: str, **modules):
    from imprompt.loading.memory_plan import MemoryPlan
    from imprompt.loading.resident import LoadedPipeline

    class Loras:
        def release(self):
            pass

        def clear(self):
            return 0

    class Attached:
        def attach(self, *args):
            pass

    loaded = LoadedPipeline(key=(f"/m/{name}", 1, "bf16", "meta", mode), name=name, pipeline=_Stub(**modules),
                            attached=Attached(), loras=Loras(), own_components=dict(modules), scheduler_config={},
                            scheduler_class="x", load_seconds=0, model_hash=None, memory=MemoryPlan(mode, "", 0))  # fmt: skip
    loaded.place = lambda device: None
    return loaded


def test_a_pipeline_moved_to_cpu_memory_never_pushes_out_the_host_part_of_one_on_the_device():
    """On a GPU ("meta" stands in: any device but the CPU takes the same paths), a pipeline pushed off the device
    into the offload tier must not evict the host part (its text encoders kept on the CPU) of the pipeline that is
    moving in: that part is in use, and it is no pipeline to let go of."""
    from imprompt.loading.resident import ResidentPipelines, host_key

    tiers = ResidentPipelines(torch.device("meta"), budget_bytes=100, offload_budget_bytes=120)
    old = _planned("A", "none", transformer=torch.nn.Linear(20, 1, bias=False))  # 80 bytes on the device
    new = _planned("B", "encoders", transformer=torch.nn.Linear(15, 1, bias=False),
                   text_encoder=torch.nn.Linear(15, 1, bias=False))  # 60 on the device, 60 in host memory  # fmt: skip
    tiers.add(old, [])
    tiers.add(new, [])  # A moves to CPU memory; B's host part stays booked
    assert host_key(new.key) in tiers.offloaded and old.key in tiers.offloaded
    assert [p.name for p in tiers.on_device.values()] == ["B"]


def test_a_pipeline_that_fails_to_reach_the_device_leaves_no_host_part_booked():
    from imprompt.loading.resident import ResidentPipelines, host_key

    tiers = ResidentPipelines(torch.device("meta"), budget_bytes=1000, offload_budget_bytes=1000)
    failing = _planned("C", "encoders", transformer=torch.nn.Linear(15, 1, bias=False),
                       text_encoder=torch.nn.Linear(15, 1, bias=False))  # fmt: skip

    def out_of_memory(device):
        raise RuntimeError("CUDA out of memory (simulated)")

    failing.place = out_of_memory
    with pytest.raises(RuntimeError):
        tiers.add(failing, [])
    assert host_key(failing.key) not in tiers.offloaded and failing.key not in tiers.on_device
