"""Default memory budgets that are real bounds: what an Engine takes by default on a device, all caches together,
leaves room for a generation's activations; a GPU machine's offload tier is a share of its RAM, not of the GPU's."""

from __future__ import annotations

import pytest
import torch

from imprompt import Engine
from imprompt.util import devices

GiB = 2**30
# `python -m tools.activation_memory`: SDXL's VAE decoding one 1024x1024 image in float32 (diffusers upcasts it)
# holds 3.0 GiB of activations, one SDXL UNet step at that size in float16 0.31 GiB; the allocator adds about a
# quarter (a real decode at 512 px on the CPU grew the process by 0.94 GiB for 0.75 GiB counted)
SDXL_1024 = (3.0 + 0.31) * 1.25 * GiB


def on_device(engine: Engine) -> dict[str, int]:
    """The byte budgets an engine took for the caches that live on its device. LoRAs: one budget for the LoRAs of
    every resident pipeline, read from its default."""
    return {
        "pipelines": engine.state.pipelines.on_device.budget_bytes,
        "encoders": engine.state.embedder.encoders.budget_bytes,
        "embeddings": engine.state.embedder.embeddings.budget_bytes,
        "adapters": engine.state.adapters.budget_bytes,
        "loras": engine.state.loras.cache.budget_bytes,
        "vaes": engine.state.vaes.budget_bytes,
        "textual inversions": engine.state.inversions.budget_bytes,
        "faces": engine.state.faces.faces.budget_bytes,
    }


@pytest.mark.parametrize("device, memory", [("cpu", 32 * GiB), ("cuda", 24 * GiB)])
def test_an_engine_s_default_budgets_leave_room_for_an_sdxl_generation(pack, monkeypatch, device, memory):
    """A 32 GiB machine on the CPU, a 24 GiB GPU (with 64 GiB of RAM): every cache full at its default budget, the
    device still has room for an SDXL 1024x1024 step and its VAE decode."""
    ram = memory if device == "cpu" else 64 * GiB
    monkeypatch.setattr(devices, "device_memory", lambda d: memory if d.type == device else ram)
    engine = Engine(pack, device=device)
    took = on_device(engine)
    left = memory - sum(took.values())
    assert left >= memory * devices.RESERVED[device] >= SDXL_1024, (
        f"{left / GiB:.1f} GiB of {memory / GiB:.0f} GiB left for activations: {took}")  # fmt: skip
    if device == "cuda":  # the offload tier is RAM, where nothing else of the engine's is kept
        assert engine.state.pipelines.offloaded.budget_bytes <= ram * (1 - devices.RESERVED["host"])


def test_the_default_shares_of_each_memory_leave_its_reserved_share():
    for memory in ("cpu", "cuda", "host"):
        assert sum(devices.SHARES[memory].values()) + devices.RESERVED[memory] <= 1, memory
    assert "offload" in devices.SHARES["host"]
    assert "offload" not in devices.SHARES["cpu"] and "offload" not in devices.SHARES["cuda"]
    assert set(devices.SHARES["cpu"]) == set(devices.SHARES["cuda"])  # the same caches on either device


def test_the_caps_still_apply(monkeypatch):
    """A large device reaches each cache's cap; a small one gets its share."""
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        kind = device.type
        monkeypatch.setattr(devices, "device_memory", lambda d: 2**40)
        for cache, cap in devices.CAPS.items():
            assert devices.default_budget(cache, device) == cap, (cache, kind)
        monkeypatch.setattr(devices, "device_memory", lambda d: 8 * GiB)
        for cache, cap in devices.CAPS.items():
            assert devices.default_budget(cache, device) == int(8 * GiB * devices.SHARES[kind][cache]) < cap
        assert devices.default_budget("offload", device) == int(8 * GiB * devices.SHARES["host"]["offload"])


def test_the_command_line_says_the_default_shares_the_engine_takes():
    """`--help` names each budget's default share; it must be the share `util/devices.py` gives."""
    import argparse

    from imprompt.cli import _engine_arguments

    parser = argparse.ArgumentParser()
    _engine_arguments(parser)
    helps = {a.dest: (a.help or "").replace("%%", "%") for a in parser._actions}

    def percent(share: float) -> str:
        return f"{share * 100:g}%"

    cpu, gpu = devices.SHARES["cpu"], devices.SHARES["cuda"]
    assert f"{percent(cpu['encoders'])} of the RAM; {percent(gpu['encoders'])} of a GPU" in helps["cache_budget"]
    assert percent(cpu["adapters"]) in helps["adapter_budget"] and cpu["adapters"] == gpu["adapters"]
    assert percent(cpu["embeddings"]) in helps["embedding_budget"] and cpu["embeddings"] == gpu["embeddings"]
    assert percent(cpu["loras"]) in helps["lora_budget"] and cpu["loras"] == gpu["loras"]
    assert f"{percent(cpu['pipelines'])} of the RAM; {percent(gpu['pipelines'])} of a GPU" in helps["model_budget"]
    assert percent(cpu["controlnets"]) in helps["controlnet_budget"] and cpu["controlnets"] == gpu["controlnets"]
    assert percent(devices.SHARES["host"]["offload"]) in helps["offload_budget"]
    assert percent(devices.RESERVED["cpu"]) in helps["activation_budget"] and devices.RESERVED["cpu"] == devices.RESERVED["cuda"]
