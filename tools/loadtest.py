"""Load: `imprompt serve` as a real process, many concurrent clients on loopback, every answer checked.

    python -m tools.loadtest --clients 8 --requests 50 [--models DIR] [--report docs/load.json]

Each client sends SD.Next txt2img payloads drawn from the soak menu (different adapters, mixes, controls);
every image must equal that request's fresh-process reference, and no answer may be a 5xx. Reported:
statuses, latency percentiles, the deepest queue seen, and requests refused with 429.
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def to_sdnext_payload(request: dict) -> dict:
    """An engine request (images as paths) as an SD.Next payload (images as base64)."""

    def b64(ref):
        return ref if ref == "noise" else base64.b64encode(Path(ref).read_bytes()).decode()

    units = []
    for unit in request["ip_adapters"]:
        unit = dict(unit)
        for key in ("images", "masks", "negative_images"):
            if unit.get(key):
                unit[key] = [b64(ref) for ref in unit[key]]
        units.append(unit)
    payload = {k: v for k, v in request.items() if k not in ("model", "ip_adapters")}
    return payload | {"override_settings": {"sd_model_checkpoint": request["model"]}, "ip_adapter": units}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: list[str], max_queue: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "imprompt.cli", "-q", "serve", "--port", str(port), "--max-queue", str(max_queue)]
    for root in models:
        command += ["--models", root]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2)
            return process, url
        except httpx.HTTPError:
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {process.stderr.read()[-2000:]}") from None
            time.sleep(0.2)


def load(url: str, valid: dict, references: dict[str, Path], clients: int, requests: int, seed: int = 0) -> dict:
    import httpx
    import numpy as np
    from PIL import Image

    expected = {n: np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for n, p in references.items()}
    payloads = {name: to_sdnext_payload(req) for name, req in valid.items()}
    latencies, statuses, failures, depths = [], {}, [], []
    lock = threading.Lock()
    stop = threading.Event()

    def sample_queue():
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                depths.append(http.get("/healthz").json()["queue"])
                time.sleep(0.05)

    def client(index: int):
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(requests):
                name = rng.choice(sorted(payloads))
                started = time.perf_counter()
                response = http.post("/sdapi/v1/txt2img", json=payloads[name])
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                if response.status_code != 200:
                    if response.status_code != 429:  # a full queue is behaviour to report; anything else fails
                        with lock:
                            failures.append({"client": index, "request": i, "name": name, "status": response.status_code,
                                             "detail": response.text[:300]})  # fmt: skip
                    continue
                image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB")
                difference = int(np.abs(np.asarray(image).astype(np.int16) - expected[name]).max())
                if difference:
                    with lock:
                        failures.append({"client": index, "request": i, "name": name, "problem": f"pixels differ by {difference}"})

    sampler = threading.Thread(target=sample_queue, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    stop.set()
    sampler.join()
    ordered = sorted(latencies)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))], 3) if ordered else None  # noqa: E731
    return {
        "clients": clients,
        "requests_per_client": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
        "latency_s": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": pick(1.0),
                      "mean": round(statistics.mean(latencies), 3) if latencies else None},  # fmt: skip
        "queue_depth_max": max(depths, default=0),
        "refused_429": statuses.get(429, 0),
    }


def main(argv: list[str] | None = None) -> int:
    from imprompt.demo.pack import build_demo_pack

    from .soak import fresh_references, pack_images, sd15_menu, write_report

    parser = argparse.ArgumentParser(prog="python -m tools.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--models", type=Path, default=Path("demo-models"))
    parser.add_argument("--work", type=Path, default=Path(".soak"))
    parser.add_argument("--report", type=Path, default=Path("docs/load.json"))
    args = parser.parse_args(argv)
    pack = build_demo_pack(args.models)
    roots = [str(pack.resolve())]
    valid = sd15_menu(pack_images(pack))
    references = fresh_references(roots, valid, args.work / "references")
    process, url = start_server(roots, args.max_queue)
    try:
        report = load(url, valid, references, args.clients, args.requests)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return write_report(report, args.report)


if __name__ == "__main__":
    sys.exit(main())
