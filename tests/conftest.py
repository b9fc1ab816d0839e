"""Shared fixtures: the demo model pack (built once per session by the project's own builder) and helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imprompt.demo.pack import SD15_MODEL, build_demo_pack

# Tests never touch the network: the models are built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def pack(tmp_path_factory) -> Path:
    """The demo model pack: tiny SD 1.5 pipeline, ViT-H/bigG-like encoders, six SD 1.5 adapters (h94 layout)."""
    return build_demo_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="session")
def engine(pack):
    """One engine shared by many tests: it also sees every other test's requests, as a long-running server would."""
    from imprompt import Engine

    return Engine(pack)


@pytest.fixture
def adapters_copy(pack, tmp_path) -> Path:
    """A private, writable copy of the pack's h94 SD 1.5 adapters and both encoders, for tests that damage files.
    Use with Engine([pack / "diffusers", adapters_copy])."""
    target = tmp_path / "IP-Adapter"
    shutil.copytree(pack / "IP-Adapter" / "models", target / "models")
    shutil.copytree(pack / "IP-Adapter" / "sdxl_models" / "image_encoder", target / "sdxl_models" / "image_encoder")
    return target


@pytest.fixture(scope="session")
def red_circle(pack) -> Image.Image:
    return Image.open(pack / "images" / "red-circle.png").convert("RGB")


@pytest.fixture(scope="session")
def yellow_square(pack) -> Image.Image:
    return Image.open(pack / "images" / "yellow-square.png").convert("RGB")


MODEL = SD15_MODEL


def request(*units, seed: int = 1, prompt: str = "a cat", **fields) -> dict:
    """A small generate request: 64 px, 4 steps, with the given IP-Adapter units."""
    return {"model": MODEL, "prompt": prompt, "seed": seed, "steps": 4, "width": 64, "height": 64,
            "cfg_scale": 7.0, "ip_adapters": list(units), **fields}  # fmt: skip


def unit(adapter: str, image, scale: float = 0.6, **fields) -> dict:
    return {"adapter": adapter, "images": [image], "scale": scale, **fields}


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())
