"""Request batching (`batching.py`, `Engine.generate_batch`): requests that share a pipeline call run as its rows,
each with its own prompt, seeds and IP-Adapter units, and each gets what it gets alone: its images within 1/255
(batched GEMMs may round otherwise: bit-equality is not promised; the measured differences are printed), its seeds,
infotexts and info (but timings, events and `batch`), its own error, its own interrupt; and the engine keeps what
the same requests alone leave. What cannot share a call gets no key and runs alone."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from conftest import pixels, request, unit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imprompt import Engine
from imprompt.errors import ImpromptError, RequestError
from tools.soak import FACE

TOLERANCE = 1  # of 255
SDXL = "tiny-sdxl"
LONG = ", ".join(["a small red cat on a mat"] * 12)  # more than 75 tokens: two chunks (154 tokens)


@pytest.fixture(scope="module")
def images(pack) -> dict[str, str]:
    return {name: str(pack / "images" / f"{name}.png") for name in ("red-circle", "yellow-square", "white-triangle")}


@pytest.fixture(scope="module")
def extra(pack, tmp_path_factory):
    """A kohya LoRA (UNet and text encoder) and a VAE file for the tiny SD 1.5 (`tools/extra_models.py`)."""
    from diffusers import StableDiffusionPipeline

    from tools.extra_models import altered_vae, kohya_lora, write

    folder = tmp_path_factory.mktemp("batching-extra")
    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    write(folder / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=1))
    write(folder / "VAE" / "soft-vae.safetensors", altered_vae(sd15, seed=5).state_dict())
    return folder


@pytest.fixture(scope="module")
def engines(pack, extra):
    """An engine that runs requests alone and one that batches them, shared by the tests: their histories stay
    equal as long as a batch leaves what its requests alone leave (each test checks it), so each test also runs
    after the others' requests, as a server would."""
    return Engine([pack, extra]), Engine([pack, extra])


def differences(alone: list, batch: list) -> tuple[int, int]:
    """The largest difference of any pixel channel (of 255) and how many channels differ at all."""
    assert len(alone) == len(batch)
    diffs = [np.abs(pixels(a) - pixels(b)) for a, b in zip(alone, batch)]
    return max(int(d.max()) for d in diffs), sum(int((d > 0).sum()) for d in diffs)


def shape(result) -> tuple[int, int]:
    """The call a batched result ran in: its rows and requests (`info["batch"]`)."""
    return result.info["batch"]["size"], result.info["batch"]["requests"]


def same_result(alone, batched, what: str) -> tuple[int, int]:
    """Everything but the pixels equal; the pixels within TOLERANCE. Returns the measured differences."""
    assert not isinstance(batched, BaseException), f"{what}: {batched!r}"

    def shown(info: dict) -> dict:
        return {k: v for k, v in info.items() if k not in ("timings", "events", "batch")}

    assert shown(batched.info) == shown(alone.info), what
    assert batched.infotexts == alone.infotexts, what
    assert not [e for e in batched.info["events"] if e["event"] == "batch_fallback"], what  # its call did not fail
    worst, count = differences(alone.images, batched.images)
    assert worst <= TOLERANCE, f"{what}: pixels differ by {worst}"
    return worst, count


def kept(engine: Engine) -> tuple:
    """What an engine keeps between requests, as a later request could find it: each cache's entries in order and
    its counts, and for each resident model its attached adapter set, its kept processor shells in order, its
    active LoRAs, and whether its UNet and VAE carry exactly that (not a batch's processors, another VAE)."""
    from imprompt.ipadapter.attach import AttachedAdapters

    models = []
    for loaded in engine.state.pipelines.all():
        attached, pipeline = loaded.attached, loaded.pipeline
        if not isinstance(attached, AttachedAdapters):  # a transformer's (SD 3.5, FLUX): it never runs merged
            models.append({"model": loaded.name, "attached": attached.attached, "loras": loaded.loras.active,
                           "own vae": pipeline.vae is loaded.own_vae,
                           "vae slicing": pipeline.vae.use_slicing})  # fmt: skip
            continue
        shells = attached._shells.get(attached.attached) if attached.attached else None
        processors = shells[0] if shells else attached.plain_processors
        models.append({
            "model": loaded.name, "attached": attached.attached, "shells": list(attached._shells),
            "loras": loaded.loras.active,
            "unet carries the attached set": all(m.processor is p for m, p in zip(attached.cross_attention, processors)),
            "projection": pipeline.unet.encoder_hid_proj is (shells[1] if shells else None),
            "own vae": pipeline.vae is loaded.own_vae, "vae slicing": pipeline.vae.use_slicing,
        })  # fmt: skip
    return engine.cache_info(), models


def run_alone(engine: Engine, requests: list) -> list:
    """Each request through `generate`, in order: its result or its error."""
    outcomes = []
    for r in requests:
        try:
            outcomes.append(engine.generate(r))
        except ImpromptError as exc:
            outcomes.append(exc)
    return outcomes


def check_batch(engines, requests: list, sizes: tuple[int, int] | list[tuple[int, int]], what: str) -> list:
    """The requests alone in one engine and as one batch in the other: results, measured differences and the
    engines' kept state compared; each request ran in a call of its size (rows, requests): `sizes` one for all or
    one per request. Returns the batch's results."""
    alone_engine, batch_engine = engines
    alone = run_alone(alone_engine, requests)
    batch = batch_engine.generate_batch(requests)
    sizes = sizes if isinstance(sizes, list) else [sizes] * len(requests)
    measured = []
    for n, (a, b, size) in enumerate(zip(alone, batch, sizes, strict=True)):
        measured.append(same_result(a, b, f"{what} request {n}"))
        assert shape(b) == size, b.info["batch"]
    assert kept(batch_engine) == kept(alone_engine)
    print(f"\n{what}: (max difference, channels differing) per request: {measured}")
    return batch


# ------------------------------------------------------------------------------------------- one merged call


def test_sd15_requests_in_one_call_equal_each_alone(engines, images):
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    requests = [
        request(unit("Base", red, 0.7), prompt="a cat", seed=11),  # the pack's ViT-H encoder
        request(unit("Plus", yellow, 0.5, start=0.25, end=0.75),  # a window
                unit("Base ViT-G", white, 0.8, layers="composition"),  # another encoder, InstantStyle weights
                prompt="a dog on a mat", seed=12),  # fmt: skip
        request(prompt="a red house", seed=13, batch_size=2, cfg_scale=4.5),  # no units, two images, its own CFG
        request(unit("Light", white, 1.0, masks=[yellow]), prompt="a tree", negative_prompt="blurry", seed=14,
                cfg_scale=9.0),  # fmt: skip
    ]
    requests = [{**r, "sampler": "Euler a", "steps": 3} for r in requests]  # ancestral: each row's own noise
    check_batch(engines, requests, (5, 4), "SD 1.5")


def test_sdxl_requests_in_one_call_equal_each_alone(engines, images):
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    requests = [
        request(unit("Base SDXL", red), prompt="a cat", seed=21, model=SDXL),
        request(unit("Plus ViT-H SDXL", yellow, 0.5, end=0.5),  # the other encoder, a window
                unit("Base SDXL", white, 0.9, layers="style", masks=[red]),  # InstantStyle, a mask
                prompt="a dog on a mat", seed=22, model=SDXL),  # fmt: skip
        request(prompt="a red house", seed=23, model=SDXL, cfg_scale=5.5),
    ]
    requests = [{**r, "sampler": "DPM++ 2M", "steps": 3} for r in requests]
    check_batch(engines, requests, (3, 3), "SDXL")


def test_the_batch_is_one_call_and_skips_a_unit_at_zero(pack, images):
    """The rows really run together: the UNet sees one batch of every row (twice, under CFG) at each step. A unit
    at 0 in every row at a step is skipped, as diffusers skips a unit at 0: one whose window is empty never runs."""
    engine = Engine(pack)
    red = images["red-circle"]
    requests = [request(unit("Base", red), seed=1, sampler="Euler"), request(seed=2, batch_size=2, sampler="Euler"),
                request(unit("Light", red, start=0.5, end=0.5), seed=3, sampler="Euler")]  # fmt: skip
    engine.preload(requests[0]["model"])
    unet = engine.state.pipelines.current.pipeline.unet
    seen, idle = [], []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    light = engine.store.adapter("Light").key(unet.dtype, engine.state.device)

    def count(module, args):
        idle.append(1)

    def watch(step, total):
        if step == 1:  # built and attached by now: watch the empty window's adapter from here on
            hooks.append(engine.state.adapters.get(light).to_k_ip[0].register_forward_pre_hook(count))

    hooks = [hook]
    try:
        engine.generate_batch(requests, on_steps=[watch, None, None])
    finally:
        for h in hooks:
            h.remove()
    assert seen == [8] * 4 and len(hooks) == 2 and idle == []


# ------------------------------------------------------------------------------------ failures are their own


def test_a_failing_request_gets_its_own_error_and_the_others_their_images(engines, images, monkeypatch):
    """Refused in the plan (an unknown adapter, an image that is no image) or failing in prepare (an encoder that
    fails on one request's unit), each gets the error it gets alone; the others run merged."""
    from imprompt.conditioning.ip_adapter import UnitPlan

    encode = UnitPlan.encode

    def failing(self, state, inputs, events, true_cfg):
        if self.unit.scale == 0.33:
            raise RequestError("ip_adapters.0: the encoder failed on this unit (a test's fault)")
        return encode(self, state, inputs, events, true_cfg)

    monkeypatch.setattr(UnitPlan, "encode", failing)
    red = images["red-circle"]
    requests = [
        request(unit("Base", red), seed=1),
        request(unit("Base XL Turbo", red), seed=2),  # no such adapter
        request(unit("Plus", "bm90IGFuIGltYWdl"), seed=3),  # base64 of "not an image"
        request(unit("Plus", red, 0.33), seed=4),  # fails in prepare
        request(prompt="a dog", seed=5),
    ]
    alone_engine, batch_engine = engines
    alone = run_alone(alone_engine, requests)
    batch = batch_engine.generate_batch(requests)
    for n in (1, 2, 3):
        assert isinstance(alone[n], ImpromptError) and type(batch[n]) is type(alone[n]), (n, batch[n])
        assert str(batch[n]) == str(alone[n])
    for n in (0, 4):
        same_result(alone[n], batch[n], f"request {n}")
        assert shape(batch[n]) == (2, 2)
    assert kept(batch_engine) == kept(alone_engine)


def test_a_merged_call_that_raises_runs_each_request_alone(pack, images, monkeypatch):
    import imprompt.engine

    def broken(rows):
        raise RuntimeError("out of memory (a test's fault)")

    monkeypatch.setattr(imprompt.engine, "run_merged", broken)
    requests = [request(unit("Base", images["red-circle"]), seed=1), request(prompt="a dog", seed=2)]
    alone = run_alone(Engine(pack), requests)
    for n, (a, b) in enumerate(zip(alone, Engine(pack).generate_batch(requests))):
        assert differences(a.images, b.images) == (0, 0)
        assert b.info["batch"] == {"size": 1, "requests": 1, "call": 2 + n}  # call 1 failed
        assert b.info["events"][0] == {"event": "batch_fallback", "requests": 2,
                                       "why": "RuntimeError: out of memory (a test's fault)"}  # fmt: skip


def test_a_request_interrupted_in_a_call_that_fails_is_not_run_again(pack, images, caplog):
    """Request 0 is interrupted at step 2; request 1's progress callback then raises at step 3, failing the merged
    call. Request 0 keeps its interrupt: it is not run again and gets an error saying what happened (nothing of its
    rows was kept); the others run again alone and equal alone, a `batch_fallback` event and a warning saying
    why."""
    from imprompt.errors import InterruptedRunError

    requests = [request(unit("Base", images["red-circle"]), seed=1), request(prompt="a dog", seed=2),
                request(prompt="a tree", seed=3)]  # fmt: skip
    requests = [{**r, "steps": 5, "sampler": "Euler"} for r in requests]
    events = [threading.Event() for _ in requests]
    seen: list[list[int]] = [[], [], []]
    raised = []

    def stopping(step, total):
        seen[0].append(step)
        if step == 2:
            events[0].set()

    def failing_once(step, total):
        seen[1].append(step)
        if step == 3 and not raised:
            raised.append(step)
            raise RuntimeError("a progress callback failed (a test's fault)")

    batch = Engine(pack).generate_batch(requests, on_steps=[stopping, failing_once, lambda s, t: seen[2].append(s)],
                                        interrupts=events)  # fmt: skip
    assert isinstance(batch[0], InterruptedRunError), batch[0]
    assert "interrupted at step 2 of " in str(batch[0]) and "a progress callback failed" in str(batch[0])
    assert isinstance(batch[0].__cause__, RuntimeError)
    assert seen == [[1, 2], [1, 2, 3, 1, 2, 3, 4, 5], [1, 2, 1, 2, 3, 4, 5]]  # 0 is not run again (1 raised first)
    alone = run_alone(Engine(pack), requests[1:])
    for n, a in zip((1, 2), alone):
        assert differences(a.images, batch[n].images) == (0, 0) and batch[n].info["interrupted"] is False
        assert batch[n].info["events"][0] == {"event": "batch_fallback", "requests": 3,
                                              "why": "RuntimeError: a progress callback failed (a test's fault)"}  # fmt: skip
    assert [r.levelname for r in caplog.records if "each runs again alone" in r.getMessage()] == ["WARNING"]


def test_interrupted_is_each_request_own(engines, images):
    """The engine's interrupt during a later call of the batch (a request with rows of its own) stops that request;
    the requests whose calls finished before it (merged, rows of their own, one that cannot merge) are not
    interrupted, as alone."""
    requests = [request(unit("Base", images["red-circle"]), seed=1), request(prompt="a dog", seed=2),
                request(prompt=LONG, negative_prompt=LONG, seed=3),  # rows of its own (154 tokens)
                request(prompt=LONG, seed=4),  # runs at once, the first call
                request(prompt=f"{LONG}, {LONG}", negative_prompt=f"{LONG}, {LONG}", seed=5)]  # 231: the last call  # fmt: skip
    alone_engine, batch_engine = engines

    def interrupting(engine):
        def on_step(step, total):
            if step == 2:
                engine.interrupt()

        return on_step

    order = (3, 0, 1, 2, 4)  # as the batch's calls run
    alone = {n: alone_engine.generate(requests[n], on_step=interrupting(alone_engine) if n == 4 else None) for n in order}
    batch = batch_engine.generate_batch(requests, on_steps=[None] * 4 + [interrupting(batch_engine)])
    assert [b.info["interrupted"] for b in batch] == [False, False, False, False, True]
    for n in range(5):
        same_result(alone[n], batch[n], f"request {n}")
    assert [b.info["batch"]["call"] for b in batch] == [2, 2, 3, 1, 4]
    assert kept(batch_engine) == kept(alone_engine)


# --------------------------------------------------------------------------------- what cannot share a call


def test_requests_that_cannot_share_a_call_are_split(engines, images):
    """Another size or number of steps: another group; SD 1.5 prompts of 154 tokens: rows of their own (one such
    request runs alone); a prompt longer than its negative (each read at its own length): alone at once. Each
    equals alone; what ran alone, to the bit."""
    red, yellow = images["red-circle"], images["yellow-square"]
    requests = [
        request(unit("Base", red), seed=1),
        request(unit("Base", red), seed=2, width=72),
        request(unit("Base", red), seed=3, steps=3),
        request(unit("Plus", yellow, 0.5), seed=4, prompt="a dog"),
        request(unit("Plus", yellow, 0.5), seed=5, prompt=LONG, negative_prompt=LONG),
        request(unit("Base", yellow), seed=6, prompt=LONG),  # negative of one chunk: the UNet reads its own rows
        request(seed=7, prompt=LONG + ", blue", negative_prompt=LONG + ", grey"),
    ]
    alone_engine, batch_engine = engines
    keys = [alone_engine.batch_key(r) for r in requests]
    assert keys[0] == keys[3] == keys[4] == keys[5] == keys[6] and None not in keys
    assert keys[1] != keys[0] and keys[2] != keys[0]
    # another CFG scale shares the call (each row its own); CFG off (no negative rows) does not
    assert alone_engine.batch_key({**requests[0], "cfg_scale": 3.0}) == keys[0]
    assert alone_engine.batch_key({**requests[0], "cfg_scale": 1.0}) != keys[0]
    order = (0, 3, 4, 5, 6, 1, 2)  # the groups' order: by their first request
    alone = dict(zip(order, run_alone(alone_engine, [requests[i] for i in order])))
    batch = batch_engine.generate_batch(requests)
    calls = {0: (2, 2), 3: (2, 2), 4: (2, 2), 6: (2, 2), 5: (1, 1), 1: (1, 1), 2: (1, 1)}
    for n, call in calls.items():
        worst, count = same_result(alone[n], batch[n], f"request {n}")
        assert shape(batch[n]) == call, (n, batch[n].info["batch"])
        if call == (1, 1):
            assert (worst, count) == (0, 0), n
    # the calls in the order they ran: 5 at once, as it was applied; then the merged ones; then the other keys
    assert [batch[n].info["batch"]["call"] for n in range(7)] == [2, 4, 5, 2, 3, 1, 3]
    assert kept(batch_engine) == kept(alone_engine)


def test_a_lora_set_and_a_vae_are_shared_by_a_call(engines, images):
    """Requests with the same LoRAs (a tag or the field: the same set) and VAE run as one call, each prompt encoded
    under the LoRA; another weight is another call."""
    red = images["red-circle"]
    lora = {"vae": "soft-vae.safetensors", "sampler": "Euler"}
    requests = [request(prompt="a cat <lora:detail-sd15:0.6>", seed=1, **lora),
                request(unit("Base", red), prompt="a dog", loras=[{"name": "detail-sd15", "weight": 0.6}], seed=2, **lora),
                request(prompt="a cat <lora:detail-sd15:0.9>", seed=3, **lora)]  # fmt: skip
    batch = check_batch(engines, requests, [(2, 2), (2, 2), (1, 1)], "a LoRA set and a VAE")
    assert batch[0].info["loras"] and batch[0].info["vae"]


def test_a_vae_file_stays_on_for_the_rows_after_a_request_that_runs_at_once(engines, images):
    """A request whose call cannot merge (a prompt longer than its negative) runs at once and ends its call, which
    puts the model's own VAE back; the requests applied before it still decode with the VAE file they asked for."""
    vae = {"vae": "soft-vae.safetensors", "sampler": "Euler"}
    requests = [request(unit("Base", images["red-circle"]), prompt="a cat", seed=1, **vae),
                request(prompt="a dog", seed=2, **vae),
                request(prompt=LONG, seed=3, **vae)]  # fmt: skip
    batch = check_batch(engines, requests, [(2, 2), (2, 2), (1, 1)], "a VAE file")
    assert [b.info["vae"]["name"] for b in batch] == ["soft-vae.safetensors"] * 3


def test_a_shape_of_its_own_runs_alone_with_its_units(engines, images):
    """The one 154-token request among 77-token ones runs alone inside the batch (its adapters swapped in for its
    call): its pixels are alone's to the bit, and the engine keeps what alone leaves."""
    red, white = images["red-circle"], images["white-triangle"]
    requests = [request(unit("Base", red), seed=1), request(seed=2, prompt="a dog"),
                request(unit("Plus", white, 0.7), seed=3, prompt=LONG, negative_prompt=LONG)]  # fmt: skip
    alone_engine, batch_engine = engines
    alone = run_alone(alone_engine, requests)
    batch = batch_engine.generate_batch(requests)
    assert [shape(b) for b in batch] == [(2, 2)] * 2 + [(1, 1)]
    assert same_result(alone[2], batch[2], "the long one") == (0, 0)
    assert kept(batch_engine) == kept(alone_engine)


@pytest.fixture(scope="module")
def alone_kinds(pack, tmp_path_factory):
    """A ControlNet (from the tiny SD 1.5's UNet) and a FaceID adapter (with its LoRA) for the tiny SD 1.5: units of
    kinds that run alone in a batch."""
    from types import SimpleNamespace

    from diffusers import ControlNetModel, UNet2DConditionModel

    from tools.extra_models import faceid_adapter, write

    folder = tmp_path_factory.mktemp("batching-alone-kinds")
    unet = UNet2DConditionModel.from_pretrained(pack / "diffusers" / "tiny-sd15" / "unet")
    ControlNetModel.from_unet(unet).save_pretrained(folder / "controlnet" / "tiny-sd15-controlnet")
    write(folder / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", faceid_adapter(SimpleNamespace(unet=unet), 6))
    return folder


def test_what_is_not_batched_yet_gets_no_key(pack, images, alone_kinds):
    """img2img, ControlNets, FaceID units, prompt schedules and AND, SD 3.5 and FLUX: None (they run alone); a
    request that fails its plan: None (it fails alone). A plain request gets a key."""
    engine = Engine([pack, alone_kinds])
    red = images["red-circle"]
    assert engine.batch_key(request(unit("Base", red))) is not None
    assert engine.batch_key(request(unit("Base", red), prompt="a cat <lora:nope:1>")) is None  # fails its plan
    refused = {
        "img2img": request(init_images=[red]),
        "controlnet": request(controlnets=[{"model": "tiny-sd15-controlnet", "image": red}]),
        "faceid": request({"adapter": "FaceID Base", "face_embeddings": [FACE], "scale": 0.7}),
        "prompt editing": request(prompt="a [red:blue:0.5] cat"),
        "alternation": request(prompt="a [red|blue] cat"),
        "AND": request(prompt="a cat AND a dog"),
        "a part's weight": request(prompt="a cat:0.5"),
        "negative schedule": request(negative_prompt="[ugly:blurry:2]"),
        "sd3.5": request(model="tiny-sd35", cfg_scale=5.0),
        "flux": request(unit("FLUX XLabs", red), model="tiny-flux", cfg_scale=3.5),
    }
    for what, r in refused.items():
        engine.plan(r)  # each plans: None means "not batched", not "refused"
        assert engine.batch_key(r) is None, what


def test_every_unit_kind_and_failure_in_one_batch_gets_what_it_gets_alone(pack, extra, alone_kinds, images):
    """One batch of everything at once: IP-Adapter units and LoRA sets that merge (two calls), a FaceID unit, a
    ControlNet, img2img, a prompt schedule, AND, a prompt longer than its negative and SD 3.5, which run alone among
    them, a request refused for its adapter's pairing and one whose run fails (its progress callback raises). Each
    gets what it gets alone (run alone in the order the batch runs its calls, so both engines' histories match):
    its images within 1/255 (those alone: to the bit), infotexts and info, or its error's type and message; and
    `info["batch"]` says which requests shared a call."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    lora = "<lora:detail-sd15:0.6>"
    requests = [
        request(unit("Base", red), unit("Light", yellow, 0.8, masks=[white]), seed=1),  # merges with 6
        request({"adapter": "FaceID Base", "face_embeddings": [FACE], "scale": 0.7}, seed=2),
        request(prompt=f"a cat {lora}", seed=3),  # merges with 5 (the same LoRA set)
        request(unit("Plus", white, 0.5), controlnets=[{"model": "tiny-sd15-controlnet", "image": yellow}], seed=4),
        request(unit("Base", white), init_images=[red], denoising_strength=0.6, seed=5),
        request(unit("Plus", red, 0.7, start=0.25), prompt=f"a dog {lora}", seed=6),
        request(unit("Base ViT-G", white, 0.6, layers="style"), prompt="a tree", seed=7, batch_size=2),
        request(unit("Base", yellow), prompt="a [red:blue:0.5] cat AND a dog", seed=8),
        request(unit("Plus", red), model=SDXL, seed=9),  # refused: an SD 1.5 adapter on SDXL
        request(prompt="a house", init_images=[white], seed=10),  # its run fails (below)
        request(unit("Base", red), prompt=LONG, seed=11),  # runs at once: its prompt is read at its own length
        request(unit("SD3.5 Large", red), model="tiny-sd35", cfg_scale=5.0, seed=12),
    ]
    failing = 9

    def fails(step, total):
        if step == 2:
            raise RuntimeError("a progress callback failed (a test's fault)")

    on_steps = [fails if n == failing else None for n in range(len(requests))]
    alone_engine, batch_engine = Engine([pack, extra, alone_kinds]), Engine([pack, extra, alone_kinds])
    # the batch prepares its groups in the order of their first request, a group's requests in their order
    keys = []
    for n, r in enumerate(requests):
        try:
            keys.append(alone_engine.batch_key(r) or ("alone", n))
        except ImpromptError:
            keys.append(("refused", n))
    assert keys[0] == keys[6] and keys[2] == keys[5] and keys[0] != keys[2] and keys[10] == keys[0]
    order = sorted(range(len(requests)), key=lambda n: keys.index(keys[n]))
    alone = {}
    for n in order:
        try:
            alone[n] = alone_engine.generate(requests[n], on_step=on_steps[n])
        except Exception as exc:
            alone[n] = exc
    batch = batch_engine.generate_batch(requests, on_steps=on_steps)
    for n in (8, failing):
        assert isinstance(alone[n], Exception) and type(batch[n]) is type(alone[n]), (n, batch[n])
        assert str(batch[n]) == str(alone[n]), n
    assert isinstance(batch[8], ImpromptError) and isinstance(batch[failing], RuntimeError)
    calls = {}
    for n in sorted(set(range(len(requests))) - {8, failing}):
        worst, count = same_result(alone[n], batch[n], f"request {n}")
        calls.setdefault(batch[n].info["batch"]["call"], []).append(n)
        if shape(batch[n]) == (1, 1):
            assert (worst, count) == (0, 0), n
    merged = sorted(group for group in calls.values() if len(group) > 1)
    assert merged == [[0, 6], [2, 5]], calls
    assert [shape(batch[n]) for n in (0, 6, 2, 5)] == [(3, 2), (3, 2), (2, 2), (2, 2)]
    assert all(shape(batch[n]) == (1, 1) for group in calls.values() if len(group) == 1 for n in group)
    assert batch[4].info["mode"] == "img2img" and batch[1].info["ip_adapters"][0]["adapter"] == "FaceID Base"
    assert kept(batch_engine) == kept(alone_engine)


def scheduler_variant(pack, folder, name: str, **config) -> None:
    """The tiny SD 1.5 as another model whose scheduler config adds `config` (the other parts: links to the pack's)."""
    import json

    source, model = pack / "diffusers" / "tiny-sd15", folder / "diffusers" / name
    model.mkdir(parents=True)
    for part in source.iterdir():
        if part.name != "scheduler":
            (model / part.name).symlink_to(part)
    (model / "scheduler").mkdir()
    scheduler = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, **config}))


def test_a_scheduler_that_clips_or_thresholds_runs_alone(pack, tmp_path):
    """Clamping or thresholding each row's predicted image amplifies the last bits in which a batch rounds otherwise
    (in diffusers' own batches too), so such a scheduler gets no key, from the model's files before it loads and from
    the resident model after: DDIM from a config that does not turn clip_sample off, any scheduler with
    thresholding. DDIM with clip_sample off batches, within 1/255."""
    scheduler_variant(pack, tmp_path, "tiny-sd15-thresholding", thresholding=True)
    scheduler_variant(pack, tmp_path, "tiny-sd15-noclip", clip_sample=False)
    engine = Engine([pack, tmp_path])
    clipped, thresholded = "tiny-sd15", "tiny-sd15-thresholding"
    cases = {(clipped, "DDIM"): None, (clipped, "Euler"): "key", (clipped, "Default"): "key",
             (thresholded, "DPM++ 2M"): None, (thresholded, "UniPC"): None, (thresholded, "Default"): "key",  # PNDM
             (thresholded, "Euler"): "key", ("tiny-sd15-noclip", "DDIM"): "key"}  # fmt: skip
    for loaded in (False, True):
        for (model, sampler), expected in cases.items():
            key = engine.batch_key(request(model=model, sampler=sampler))
            assert (key is None) == (expected is None), (model, sampler, loaded)
        for model in (clipped, thresholded, "tiny-sd15-noclip"):
            engine.preload(model)

    alone_engine = Engine([pack, tmp_path])
    for model, sampler in ((clipped, "DDIM"), (thresholded, "DPM++ 2M")):
        requests = [request(model=model, sampler=sampler, seed=1, steps=6),
                    request(model=model, sampler=sampler, prompt="a dog", seed=2, steps=6)]  # fmt: skip
        batch = engine.generate_batch(requests)  # each alone, to the bit
        for n, alone in enumerate(run_alone(alone_engine, requests)):
            assert batch[n].info["batch"]["size"] == 1, (model, n)
            assert differences(alone.images, batch[n].images) == (0, 0), (model, n)
    requests = [request(model="tiny-sd15-noclip", sampler="DDIM", seed=1, steps=6),
                request(model="tiny-sd15-noclip", sampler="DDIM", prompt="a dog", seed=2, steps=6)]  # fmt: skip
    batch = engine.generate_batch(requests)
    for n, alone in enumerate(run_alone(alone_engine, requests)):
        assert batch[n].info["batch"]["size"] == 2
        same_result(alone, batch[n], f"DDIM without clip_sample, request {n}")


def test_instantid_pulid_and_redux_units_do_not_batch(pack, images):
    """Their units make the image prompts' part None (checked on a real plan whose unit is given their kinds: their
    files and models are the other tests')."""
    from imprompt.conditioning.image_prompts import ImagePrompts
    from imprompt.conditioning.instantid import InstantIDUnitPlan
    from imprompt.conditioning.ip_adapter import UnitPlan
    from imprompt.conditioning.pulid import PuLIDPrompts, PuLIDUnitPlan
    from imprompt.conditioning.redux import ReduxPrompts, ReduxUnitPlan

    plan = Engine(pack).plan(request(unit("Base", images["red-circle"])))
    prompts = next(c for c in plan.conditionings if isinstance(c, ImagePrompts))
    (planned,) = prompts.units
    assert prompts.batch_part() == ()

    def as_kind(kind):
        return kind(**{f.name: getattr(planned, f.name) for f in dataclasses.fields(UnitPlan)})

    assert dataclasses.replace(prompts, units=(as_kind(InstantIDUnitPlan),)).batch_part() is None
    pulid = PuLIDPrompts((as_kind(PuLIDUnitPlan),), prompts.inputs)
    assert dataclasses.replace(prompts, units=(), inputs=[], pulid=pulid).batch_part() is None
    redux = ReduxPrompts((as_kind(ReduxUnitPlan),), prompts.inputs)
    assert dataclasses.replace(prompts, units=(), inputs=[], redux=redux).batch_part() is None


# -------------------------------------------------------------------------------------------------- interrupt


def test_interrupting_one_request_stops_it_alone(engines, images):
    """Its rows keep the step it stopped at and it returns what alone-interrupted-there returns (one image of its
    two, its seed, the steps its unit acted at, interrupted); the others finish as alone."""
    red, yellow = images["red-circle"], images["yellow-square"]
    requests = [request(unit("Base", red), seed=1, sampler="Euler a"),
                request(unit("Plus", yellow, 0.5, start=0.25, end=0.75), seed=7, batch_size=2, prompt="a dog",
                        sampler="Euler a"),
                request(seed=3, prompt="a red house", sampler="Euler a")]  # fmt: skip
    alone_engine, batch_engine = engines
    seen_alone = []

    def stop_alone(step, total):
        seen_alone.append(step)
        if step == 2:
            alone_engine.interrupt()

    alone = [alone_engine.generate(requests[0]), alone_engine.generate(requests[1], on_step=stop_alone),
             alone_engine.generate(requests[2])]  # fmt: skip
    events = [threading.Event() for _ in requests]
    seen = []

    def stop(step, total):
        seen.append(step)
        if step == 2:
            events[1].set()

    batch = batch_engine.generate_batch(requests, on_steps=[None, stop, None], interrupts=events)
    assert seen == seen_alone == [1, 2]
    assert batch[1].info["interrupted"] is True and len(batch[1].images) == 1
    for n in range(3):
        same_result(alone[n], batch[n], f"request {n}")
        assert shape(batch[n]) == (4, 3)
    assert not batch[0].info["interrupted"] and not batch[2].info["interrupted"]
    assert kept(batch_engine) == kept(alone_engine)


# ------------------------------------------------------------------------------------------ any set of requests


def menu(images: dict[str, str]) -> dict[str, dict]:
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    base = {"steps": 3}
    return {
        "none": request(seed=1, **base),
        "base": request(unit("Base", red), seed=2, prompt="a dog", **base),
        "plus-window": request(unit("Plus", yellow, 0.8, start=0.3), seed=3, **base),
        "vit-g+light-masked": request(unit("Base ViT-G", white, 0.5), unit("Light", red, 1.2, masks=[white]),
                                      seed=4, prompt="a tree", **base),  # fmt: skip
        "composition-two": request(unit("Ostris Composition ViT-H", red, 0.7), seed=5, batch_size=2, **base),
        "full-face-style": request(unit("Full Face", white, 0.6, layers="style"), seed=6, negative_prompt="ugly", **base),
        "long": request(unit("Base", yellow), seed=7, prompt=LONG, negative_prompt=LONG, **base),
        "bad-image": request(unit("Plus", "bm90IGFuIGltYWdl"), seed=8, **base),
        "xl-base": request(unit("Base SDXL", red), seed=9, model=SDXL, **base),
        "xl-none": request(seed=10, model=SDXL, prompt="a house", **base),
    }


@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_set_of_requests_equals_each_alone(images, engines, data):
    requests = menu(images)
    names = data.draw(st.lists(st.sampled_from(sorted(requests)), min_size=2, max_size=3), label="requests")
    alone_engine, batch_engine = engines
    chosen = [requests[name] for name in names]
    # generate_batch runs its groups (requests of one key) in the order of their first request
    keys = [alone_engine.batch_key(r) or ("alone", i) for i, r in enumerate(chosen)]
    order = sorted(range(len(chosen)), key=lambda i: keys.index(keys[i]))
    alone = dict(zip(order, run_alone(alone_engine, [chosen[i] for i in order])))
    batch = batch_engine.generate_batch(chosen)
    for i, name in enumerate(names):
        if isinstance(alone[i], BaseException):
            assert type(batch[i]) is type(alone[i]) and str(batch[i]) == str(alone[i]), name
        else:
            same_result(alone[i], batch[i], f"{name} in {names}")
    assert kept(batch_engine) == kept(alone_engine), names
