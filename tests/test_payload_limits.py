"""One request must not exhaust the server: lists over the ceilings of `request.py` are refused while the body is
parsed, before anything converts them; the engine's own limits (--max-units, --max-images) stay the ones that
apply, below those ceilings."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from contextlib import contextmanager

import psutil
import pytest
from server_fixtures import b64, client, new_engine, running_server

from imprompt.request import MAX_IMAGES, MAX_UNITS

TXT2IMG = {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64,
           "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}  # fmt: skip
MiB = 2**20


@contextmanager
def peak_rss(process: psutil.Process):
    """The highest resident memory of `process` while the block runs, sampled every few milliseconds (what is
    left after the block depends on the allocator, the peak on the work done)."""
    peak, done = [process.memory_info().rss], threading.Event()

    def sample():
        while not done.wait(0.003):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def test_a_body_of_300k_tiny_units_is_refused_while_it_is_parsed(pack, red_circle):
    """9 MiB of JSON holding 300,000 units: a 413 naming the count, and the server's memory at its peak no more than
    what reading the JSON takes (it grew by about 1 GB while every unit was converted)."""
    body = json.dumps({**TXT2IMG, "ip_adapter": [{"adapter": "Base", "images": ["x"]}] * 300_000}).encode()
    forms = [body, json.dumps({**TXT2IMG, "alwayson_scripts": {"controlnet": {"args": [
        {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": "x"}] * 150_000}}}).encode()]  # fmt: skip
    server = psutil.Process()  # the server runs in this process, in a thread
    with running_server(new_engine(pack), max_body_bytes=32 * MiB) as url, client(url) as http:
        assert http.post("/sdapi/v1/txt2img", json=TXT2IMG).status_code == 200  # everything loaded before measuring
        for form in forms:
            gc.collect()
            before = server.memory_info().rss
            with peak_rss(server) as peak:
                response = http.post("/sdapi/v1/txt2img", content=form, headers={"content-type": "application/json"})
            grown = peak[0] - before
            assert response.status_code == 413 and response.json()["error"] == "LimitError", response.text[:500]
            assert f"more than the {MAX_UNITS}" in response.json()["detail"]
            assert grown < 250 * MiB, f"the server took {grown / MiB:.0f} MiB more refusing {len(form) / MiB:.1f} MiB"
        unit = {"adapter": "Base", "images": [b64(red_circle)], "scale": 0.5}
        assert http.post("/sdapi/v1/txt2img", json={**TXT2IMG, "ip_adapter": [unit]}).status_code == 200


def test_the_engine_limits_apply_below_the_ceilings(pack, red_circle):
    """Over --max-units but under the ceiling: the engine's 413, naming its limit and the flag that sets it."""
    with running_server(new_engine(pack, max_units=2, max_images=2)) as url, client(url) as http:
        unit = {"adapter": "Base", "images": ["x"]}
        response = http.post("/sdapi/v1/txt2img", json={**TXT2IMG, "ip_adapter": [unit] * 3})
        assert response.status_code == 413 and "3 units is more than the 2" in response.json()["detail"]
        assert "--max-units" in response.json()["detail"]
        response = http.post("/sdapi/v1/txt2img", json={**TXT2IMG, "ip_adapter": [{**unit, "images": ["x"] * 3}]})
        assert response.status_code == 413 and "--max-images" in response.json()["detail"]
        over = {**unit, "images": ["x"] * (MAX_IMAGES + 1)}
        response = http.post("/sdapi/v1/txt2img", json={**TXT2IMG, "ip_adapter": [over]})
        assert response.status_code == 413 and f"more than the {MAX_IMAGES} any request" in response.json()["detail"]


def test_serve_refuses_limits_over_the_ceilings(pack):
    for flag, ceiling in (("--max-units", MAX_UNITS), ("--max-images", MAX_IMAGES)):
        done = subprocess.run([sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), flag,
                               str(ceiling + 1)], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and flag in done.stderr and f"give at most {ceiling}" in done.stderr, done.stderr
