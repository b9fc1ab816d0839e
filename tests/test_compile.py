"""`--compile` (`loading/compiled.py`, `ipadapter/slots.py`): a compiled UNet keeps its graphs while requests switch
adapters, scales, windows, masks, unit counts, LoRA files and weights; the number of graphs a sequence costs is
counted (every graph torch.compile makes goes through imprompt's counting backend; `fail_on_recompile` makes any
recompile an error), and each picture is what the same request gives uncompiled (within 1/255) and, for one
adapter, what diffusers' own pipeline gives. The backend is torch's "eager" (the guards and graphs are inductor's;
no code is generated, which would take minutes per graph on this CPU)."""

from __future__ import annotations

import logging

import diffusers_reference as reference
import pytest
import torch
from conftest import max_diff, request, unit

from imprompt import Engine
from imprompt.errors import RequestError
from tools.soak import FACE

TOLERANCE = 1  # of 255
STEPS = 2


@pytest.fixture(scope="module")
def extra(pack, tmp_path_factory):
    """Two kohya LoRAs, a FaceID adapter (with its LoRA) and a ControlNet for the tiny SD 1.5
    (`tools/extra_models.py`)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from tools.extra_models import faceid_adapter, kohya_lora, write

    folder = tmp_path_factory.mktemp("compile-extra")
    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    write(folder / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=1))
    write(folder / "Lora" / "style-sd15.safetensors", kohya_lora(sd15, seed=2))
    write(folder / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", faceid_adapter(sd15, 6))
    ControlNetModel.from_unet(sd15.unet).save_pretrained(folder / "controlnet" / "tiny-sd15-controlnet")
    return folder


@pytest.fixture(scope="module")
def engines(pack, extra):
    """An uncompiled engine (the reference) and a compiled one, fresh compile caches for the module."""
    logging.getLogger("torch.__trace").propagate = False  # torch's structured trace: megabytes per graph in reports
    torch._dynamo.reset()
    yield Engine([pack, extra]), Engine([pack, extra], compile=True, compile_backend="eager")
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def images(pack) -> dict[str, str]:
    return {name: str(pack / "images" / f"{name}.png") for name in ("red-circle", "yellow-square", "white-triangle")}


def graphs(engine: Engine) -> int:
    return engine.cache_info()["compiled"]["tiny-sd15"]["graphs"]


def same(plain: Engine, compiled: Engine, payload: dict, what: str):
    alone, result = plain.generate(payload), compiled.generate(payload)
    worst = max(max_diff(a, b) for a, b in zip(alone.images, result.images))
    assert worst <= TOLERANCE, f"{what}: compiled differs from uncompiled by {worst}/255"
    assert result.infotexts == alone.infotexts, what
    assert not [e for e in result.info["events"] if e["event"] == "eager_call"], what
    return result


def test_switching_requests_reuse_the_compiled_graphs(pack, engines, images):
    """After a warm-up that meets each structure once (no units / units, a token count that changes, a LoRA), every
    switch below compiles nothing (`fail_on_recompile` would raise), nor do the same requests from diffusers' own
    pipeline's side and through the HTTP API."""
    plain, compiled = engines
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]

    def payload(*units, **fields):
        return request(*units, steps=STEPS, **fields)

    warm_up = [payload(), payload(unit("Base", red)), payload(unit("Plus", yellow, 0.5)),
               payload(unit("Base", red), prompt="a cat <lora:detail-sd15:0.8>")]  # fmt: skip
    for i, p in enumerate(warm_up):
        same(plain, compiled, p, f"warm-up {i}")
    after_warm_up = graphs(compiled)
    assert after_warm_up <= 4  # documented: 1 + IP units present + token count dynamic + first LoRA's wrapping
    unet = compiled.pipelines.current.pipeline.unet
    compiled_forward = unet.__dict__["forward"]  # the compiled function every call goes through

    switches = {
        "another adapter": payload(unit("Light", red, 0.8)),
        "scale": payload(unit("Base", red, 0.3)),
        "window": payload(unit("Base", red, start=0.5, end=1.0)),
        "mask": payload(unit("Base", red, masks=[yellow])),
        "three units": payload(unit("Base", red), unit("Plus", yellow, 0.4), unit("Plus Face", white, 0.5)),
        "257 tokens": payload(unit("Full Face", red, 0.7)),
        "same adapter twice, masks": payload(unit("Base", red, masks=[yellow]), unit("Base", white, masks=[white])),
        "InstantStyle layers": payload(unit("Base", red, layers="style")),
        "FaceID and its LoRA": payload({"adapter": "FaceID Base", "face_embeddings": [FACE], "scale": 0.7}),
        "LoRA weight": payload(unit("Base", red), prompt="a cat <lora:detail-sd15:0.4>"),
        "another LoRA": payload(prompt="a cat <lora:style-sd15:0.7>"),
        "two LoRAs": payload(unit("Plus", yellow), prompt="a cat <lora:style-sd15:0.5> <lora:detail-sd15:0.3>"),
        "a prompt schedule": payload(unit("Base", red), prompt="a [cat:dog:0.5] on a mat"),
        "another schedule": payload(unit("Base", red), prompt="a [red:blue:0.25] [cat:dog:0.75]"),
        "img2img": payload(unit("Base", red), init_images=[white], denoising_strength=0.6),
        "no units, no LoRA": payload(),
    }
    with torch.compiler.set_stance("fail_on_recompile"):
        for what, p in switches.items():
            same(plain, compiled, p, what)
            assert unet.__dict__["forward"] is compiled_forward, what  # put back after a schedule's wrapping
        # the same compiled engine (one module fixture: its graphs are traced once, on one worker)
        equals_diffusers_own_pipeline(pack, compiled, images)
        answers_sdnext_clients_over_http(plain, compiled, images)
    assert graphs(compiled) == after_warm_up


def test_a_new_size_and_a_batch_compile_once_then_stay(engines, images):
    """Shapes cost a graph the first time a dimension varies (it is dynamic from then on): a new width, a batched
    call of several requests (each row its own units), each once per kwarg structure (a ControlNet's residuals are
    another); the next width, batch or control image compiles nothing (a first new height would cost one more)."""
    plain, compiled = engines
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    same(plain, compiled, request(unit("Base", red), steps=STEPS), "first")
    before = graphs(compiled)
    same(plain, compiled, request(unit("Base", red), steps=STEPS, width=96), "96 wide")
    control = [{"model": "tiny-sd15-controlnet", "image": yellow}]
    same(plain, compiled, request(unit("Base", red), steps=STEPS, controlnets=control), "a ControlNet")
    # AND: the parts and the negative run as rows of their own, each reading its pipeline row's image prompts
    same(plain, compiled, request(unit("Base", red), steps=STEPS, prompt="a cat AND a dog :0.7"), "AND")
    batch = [request(unit("Base", red), seed=5, steps=STEPS),
             request(unit("Plus", yellow, 0.4), unit("Base", red, end=0.5), seed=6, steps=STEPS),
             request(seed=7, steps=STEPS)]  # fmt: skip
    for alone, result in zip([plain.generate(p) for p in batch], compiled.generate_batch(batch)):
        assert result.info["batch"]["requests"] == 3
        assert max(max_diff(a, b) for a, b in zip(alone.images, result.images)) <= TOLERANCE
    # width, the ControlNet's residuals (another kwarg structure), AND's rows, then a batch's rows (IP tokens: dynamic)
    assert graphs(compiled) - before <= 4
    settled = graphs(compiled)
    with torch.compiler.set_stance("fail_on_recompile"):
        same(plain, compiled, request(unit("Base", red), steps=STEPS, width=80), "80 wide (the height never varied)")
        same(plain, compiled, request(unit("Light", white), steps=STEPS, controlnets=[
            {"model": "tiny-sd15-controlnet", "image": red, "weight": 0.5}]), "another control image and weight")
        results = compiled.generate_batch([request(unit("Light", yellow), seed=8, steps=STEPS),
                                           request(unit("Base", red), seed=9, steps=STEPS)])  # fmt: skip
        assert all(r.info["batch"]["requests"] == 2 for r in results)
        same(plain, compiled, request(unit("Plus", yellow), steps=STEPS, prompt="a cat AND a dog AND a bird"),
             "AND of three")
    assert graphs(compiled) == settled


def test_an_unknown_backend_is_refused_naming_the_known_ones(pack):
    with pytest.raises(RequestError, match="compile backend 'inductr' is not one of torch.compile's.*inductor"):
        Engine([pack], compile=True, compile_backend="inductr")


def test_the_cli_passes_compile_options_to_the_engine(pack, tmp_path):
    """`imprompt generate --compile --compile-backend NAME`: the backend is checked by the engine the CLI builds."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "generate", "--models", str(pack), "--model", "tiny-sd15",
                           "--prompt", "a cat", "--out", str(tmp_path / "x.png"), "--compile", "--compile-backend",
                           "inductr"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "compile backend 'inductr' is not one of torch.compile's" in done.stderr


def test_a_compiled_flux_transformer_keeps_its_graph_and_runs_units_it_cannot_take_eager(pack, images, tmp_path):
    """FLUX: LoRAs are baked (a file or weight switch compiles nothing); an XLabs unit's processors are not the
    graph's, so its call runs eager (an `eager_call` event says why) and the graph stays for the next request."""
    from diffusers import FluxTransformer2DModel
    from dit_loras import diffusers_lora, lora_pairs, write

    flux = FluxTransformer2DModel.from_pretrained(pack / "diffusers" / "tiny-flux" / "transformer")
    write(tmp_path / "Lora" / "flux-a.safetensors", diffusers_lora(lora_pairs(flux, 2)))
    write(tmp_path / "Lora" / "flux-b.safetensors", diffusers_lora(lora_pairs(flux, 3)))
    torch._dynamo.reset()
    plain, compiled = Engine([pack, tmp_path]), Engine([pack, tmp_path], compile=True, compile_backend="eager")

    def payload(prompt="a cat", *units):
        return {"model": "tiny-flux", "prompt": prompt, "seed": 1, "steps": STEPS, "width": 64, "height": 64,
                "cfg_scale": 3.5, "ip_adapters": list(units)}  # fmt: skip

    def same_as_plain(p: dict, what: str):
        alone, result = plain.generate(p), compiled.generate(p)
        assert max(max_diff(a, b) for a, b in zip(alone.images, result.images)) <= TOLERANCE, what
        return result

    same_as_plain(payload(), "plain")
    same_as_plain(payload("a cat <lora:flux-a:0.8>"), "a LoRA")
    before = compiled.cache_info()["compiled"]["tiny-flux"]["graphs"]
    assert before >= 1
    with torch.compiler.set_stance("fail_on_recompile"):
        same_as_plain(payload("a cat <lora:flux-a:0.3>"), "its weight")
        same_as_plain(payload("a cat <lora:flux-b:0.6>"), "another LoRA")
        result = same_as_plain(payload("a cat", {"adapter": "FLUX XLabs", "images": [images["red-circle"]], "scale": 0.7}),
                               "an XLabs unit")  # fmt: skip
        assert [e["why"] for e in result.info["events"] if e["event"] == "eager_call"] == [
            "image-prompt units on an SD 3.5 / FLUX transformer are not compiled"]
        same_as_plain(payload(), "plain again")
    stats = compiled.cache_info()["compiled"]["tiny-flux"]
    assert stats["graphs"] == before and stats["eager_calls"] == 1
    torch._dynamo.reset()


def test_loras_are_baked_only_where_baking_keeps_the_picture():
    """Baking rounds W + ΔW to the weights' dtype: exact enough in float32, not in half precision (measured 9-14/255
    in bfloat16), so a half-precision model's LoRAs stay PEFT layers (that call eager); a DoRA loaded but not acting
    does not stop another LoRA's baking."""
    from peft import LoraConfig, inject_adapter_in_model

    from imprompt.loading.compiled import LoraBaker, wrap_for_loras

    def model(dtype):
        module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(dtype)
        wrap_for_loras(module)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), module, adapter_name="plain")
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], use_dora=True), module, adapter_name="dora")
        return module

    full = LoraBaker(model(torch.float32))
    assert full.refusal(["plain"]) is None
    assert full.refusal(["plain", "dora"]) == "a DoRA or bias LoRA is not baked"
    half = LoraBaker(model(torch.bfloat16))
    assert "bfloat16 model are not baked" in half.refusal(["plain"])
    layer = full.lora_layers()[1]
    x = torch.randn(3, 8)
    layer.enable_adapters(True)
    layer.set_adapter(["plain"])
    with torch.no_grad():
        unfused = layer(x)
        assert full.bake(["plain"]) == 2
        assert torch.allclose(layer(x), unfused, atol=1e-6)  # baked: the base layer alone gives PEFT's output
        full.bake([])
        assert torch.equal(layer(x), layer.get_base_layer()(x)) and not full.saved


def equals_diffusers_own_pipeline(pack, compiled: Engine, images) -> None:
    """The reference is diffusers' pipeline with `load_ip_adapter`, not imprompt's uncompiled path."""
    from PIL import Image

    pipe = reference.load_adapters(reference.pipeline(pack), pack, "IP-Adapter/models/ip-adapter_sd15.safetensors")
    pipe.set_ip_adapter_scale(0.6)
    expected = reference.run(pipe, steps=STEPS, ip_adapter_image=Image.open(images["red-circle"]).convert("RGB"))
    result = compiled.generate(request(unit("Base", images["red-circle"], 0.6), steps=STEPS))
    assert max_diff(result.images[0], expected) <= TOLERANCE
    assert max_diff(result.images[0], compiled.generate(request(steps=STEPS)).images[0]) > 10  # the unit acts


def answers_sdnext_clients_over_http(plain: Engine, compiled: Engine, images) -> None:
    """`imprompt serve --compile`'s engine behind the HTTP API: an SD.Next payload with an image prompt gets the
    uncompiled engine's picture; `GET /v1/cache` says how many graphs the model compiled."""
    from PIL import Image
    from server_fixtures import b64, client, post_txt2img, running_server

    red = Image.open(images["red-circle"]).convert("RGB")
    payload = {"prompt": "a cat", "negative_prompt": "", "seed": 4, "steps": STEPS, "cfg_scale": 7.0, "width": 64,
               "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
               "ip_adapter": [{"adapter": "Base", "images": [b64(red)], "scale": 0.6}]}  # fmt: skip
    with running_server(compiled) as url:
        image, info = post_txt2img(url, payload)
        with client(url) as http:
            cache = http.get("/v1/cache").json()
    expected = plain.generate(request(unit("Base", images["red-circle"], 0.6), seed=4, steps=STEPS, negative_prompt=""))
    assert max_diff(image, expected.images[0]) <= TOLERANCE
    assert info["ip_adapters"][0]["adapter"] == "Base"
    assert cache["compiled"]["tiny-sd15"]["graphs"] >= 1 and cache["compiled"]["tiny-sd15"]["backend"] == "eager"
