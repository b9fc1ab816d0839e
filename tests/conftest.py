"""Shared fixtures: the demo model pack (built once per session by the project's own builder) and helpers."""

from __future__ import annotations

import os

# The suite runs on two pytest-xdist workers (pyproject's addopts). Tiny models spend their time in Python and
# PyTorch's dispatch, one thread each: two processes with one thread apiece use both cores, where two with two
# threads each were 2.3 times slower than one after the other. Set before torch is imported; the processes the
# tests start (CLI, servers, fresh-process references) inherit it, so every image is computed the same way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never touch the network: the models are built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from imprompt.demo.pack import SD15_MODEL, build_demo_pack  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory):
    """What the model store learns about files is kept on disk: the tests keep theirs apart from the user's (and
    the processes they start use the same)."""
    os.environ["IMPROMPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("probe-cache"))


def shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run shares (beside their own temp folders), for what costs
    minutes to build and is only read: the demo pack, the fresh-process reference images. Build under `locked`."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared-{name}"
    folder.mkdir(exist_ok=True)
    return folder


def locked(folder: Path):
    """One worker builds, the others wait, then find it built."""
    from filelock import FileLock

    return FileLock(str(folder) + ".lock")


@pytest.fixture(scope="session")
def pack(tmp_path_factory) -> Path:
    """The demo model pack (tiny SD 1.5, SDXL, SD 3.5 and FLUX pipelines, their adapters and encoders), built once
    for all workers; tests only read it."""
    folder = shared_folder(tmp_path_factory, "pack")
    with locked(folder):
        return build_demo_pack(folder)


@pytest.fixture(scope="session")
def nets(pack, tmp_path_factory) -> dict:
    """The tiny ControlNets (`tools/controlnet_models.py`: SD 1.5 as an A1111 single file and a diffusers folder,
    SDXL, Union, SD 3.5, FLUX, and the refused kinds), built once for all workers; name -> path."""
    from tools.controlnet_models import write_controlnets

    folder = shared_folder(tmp_path_factory, "controlnets")
    with locked(folder):
        return write_controlnets(folder, pack)


@pytest.fixture(scope="session")
def engine(pack):
    """One engine shared by many tests: it also sees every other test's requests, as a long-running server would."""
    from imprompt import Engine

    return Engine(pack)


@pytest.fixture(scope="module")
def reference(pack):
    """What a request gives run alone, in an engine of its own (modules with their own meaning override it)."""
    from imprompt import Engine

    engine = Engine(pack)
    return lambda req: engine.generate(req).images[0]


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
