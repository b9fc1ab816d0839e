"""Real servers on free loopback ports, for the HTTP and browser tests."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from imprompt import Engine
from imprompt.server.app import ServerSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(engine: Engine, **settings):
    """Serve `engine` with uvicorn in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(engine, ServerSettings(**settings)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64_png: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64_png)))


def client(url: str, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=300, **kwargs)


def new_engine(pack, **limits) -> Engine:
    return Engine(pack, allow_paths=False, **limits)


def wait_until(condition, seconds: float = 120, what: str = "condition"):
    """Poll `condition()` until it is true (returns its value); bounded, so a test never hangs."""
    deadline = time.time() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} not reached in {seconds} s")
        time.sleep(0.05)


def post_txt2img(url: str, payload: dict, status: int = 200):
    """POST /sdapi/v1/txt2img expecting `status`: (first image, parsed info) on 200, else the error body."""
    import json

    with client(url) as http:
        response = http.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    return body if status != 200 else (decode(body["images"][0]).convert("RGB"), json.loads(body["info"]))
