"""What the cluster costs and gives on one machine: `imprompt serve` (one process) against `imprompt serve --workers
2 --encoder-workers 2` (Ray Serve on loopback), the same requests to each, measured side by side in one run.

Measured: time from the command to the first answer of the server; memory of every process (the cluster's:
each replica, Ray's own processes); the same sequential requests on warm servers (p50 per request, and the ratio);
the same requests from 4 concurrent clients (wall time). Both run with OMP_NUM_THREADS=1 (one thread per
generation), so the cluster's two generators and the single process get the same cores to share.

    python -m tools.bench_cluster --requests 24 --out docs/scale-out.json
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
MIX = [  # (model, adapters): two pipelines, encoder sets {ViT-H}, {bigG}, {ViT-H, bigG}
    ("tiny-sd15", ["ip-adapter_sd15"]),
    ("tiny-sdxl", ["ip-adapter_sdxl"]),
    ("tiny-sdxl", ["ip-adapter_sdxl", "ip-adapter_sdxl_vit-h"]),
    ("tiny-sd15", ["ip-adapter-plus_sd15"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads(pack: Path, count: int, steps: int, size: int) -> list[dict]:
    images = [base64.b64encode((pack / "images" / f"{name}.png").read_bytes()).decode()
              for name in ("red-circle", "yellow-square")]  # fmt: skip
    out = []
    for i in range(count):
        model, adapters = MIX[i % len(MIX)]
        out.append({"prompt": "a cat", "seed": i, "steps": steps, "width": size, "height": size, "cfg_scale": 7.0,
                    "override_settings": {"sd_model_checkpoint": model},
                    "alwayson_scripts": {"controlnet": {"args": [
                        {"enabled": True, "module": "ip-adapter_clip_sd15", "model": a, "weight": 0.7,
                         "image": images[(i + j) % 2]} for j, a in enumerate(adapters)]}}})  # fmt: skip
    return out


def post(url: str, payload: dict) -> float:
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        response = http.post("/sdapi/v1/txt2img", json=payload)
    response.raise_for_status()
    return time.perf_counter() - started


def ready(url: str, process: subprocess.Popen) -> bool:
    """Whether the server answers (the ingress, for a cluster); an exited server raises."""
    if process.poll() is not None:
        raise RuntimeError(f"the server exited with {process.returncode}")
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            return http.get("/sdapi/v1/sd-models").status_code == 200
    except httpx.TransportError:
        return False


def run_server(kind: str, pack: Path, requests: list[dict], log_dir: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--port", str(port), "--no-preload"]
    if kind == "cluster":
        command += ["--workers", "2", "--encoder-workers", "2"]
    log = open(log_dir / f"{kind}.log", "w")
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not ready(url, process):  # bounded by the deadline
            if time.time() > deadline:
                raise RuntimeError(f"{kind} server not ready in 600 s")
            time.sleep(0.2)
        start_s = time.perf_counter() - started
        first = [post(url, p) for p in requests[: len(MIX)]]  # every model and encoder loaded once
        sequential = [post(url, p) for p in requests]
        concurrent_started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: post(url, p), requests))
        concurrent_s = time.perf_counter() - concurrent_started
        memory = processes_memory(process.pid, ray_tmp)
        return {"start_s": round(start_s, 2), "first_requests_s": [round(t, 3) for t in first],
                "request_s": [round(t, 4) for t in sequential], "p50_s": round(statistics.median(sequential), 4),
                "concurrent_4_clients_s": round(concurrent_s, 3), "memory": memory}  # fmt: skip
    finally:
        stop(process, ray_tmp)
        log.close()


def processes_memory(pid: int, ray_tmp: str) -> dict:
    """RSS of the server process, its descendants and every Ray process of its session, by name."""
    found = {}
    main = psutil.Process(pid)
    procs = [main, *main.children(recursive=True), *session_processes(ray_tmp)]
    for p in {p.pid: p for p in procs}.values():
        try:
            name = " ".join(p.cmdline()[:1]).rsplit("/", 1)[-1] if not p.name().startswith("ray::") else p.name()
            found.setdefault(name, []).append(round(p.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            continue
    return {"rss_mib_by_process": found, "total_mib": sum(sum(v) for v in found.values())}


def session_processes(ray_tmp: str) -> list[psutil.Process]:
    """The processes of the Ray session started with RAY_TMPDIR=ray_tmp: their command line names the folder, or
    (Ray's agents rename their command line) their environment carries it, or (a long new name overwrites the
    environment too) a renamed `ray::` process holds a file open in one of its session folders (`session_*`, under
    `ray/` when Ray picked the folder from RAY_TMPDIR): its logs. Only `ray::` names: the test that started the
    session holds `serve.log` in the folder, and a user may be reading a log."""
    found = []
    sessions = (str(Path(ray_tmp) / "session_"), str(Path(ray_tmp) / "ray" / "session_"))
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            if (ray_tmp in " ".join(p.info["cmdline"] or []) or f"RAY_TMPDIR={ray_tmp}" in environment(p)
                    or ((p.info["name"] or "").startswith("ray::")
                        and any(f.path.startswith(sessions) for f in p.open_files()))):  # fmt: skip
                found.append(p)
        except psutil.Error:  # ended meanwhile, or another user's
            continue
    return found


def environment(process: psutil.Process) -> list[str]:
    """A process's environment entries. Not psutil's `environ()`: a process that renamed itself (Ray's agents)
    zeroed the start of its environment block, and psutil stops reading at the first empty entry."""
    if not sys.platform.startswith("linux"):
        return [f"{k}={v}" for k, v in process.environ().items()]
    try:
        raw = Path(f"/proc/{process.pid}/environ").read_bytes()
    except PermissionError as exc:  # another user's
        raise psutil.AccessDenied(process.pid) from exc
    except OSError:  # ended, or a kernel thread
        return []
    return [entry.decode(errors="replace") for entry in raw.split(b"\0") if entry]


def stop(process: subprocess.Popen, ray_tmp: str) -> list[str]:
    """SIGTERM (imprompt serve shuts Ray down and stops what is left of its session), then any process of its
    Ray session still there is killed by PID. Returns them (PID and name): none, when the server stopped cleanly."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
    leftover = []
    for p in session_processes(ray_tmp):
        try:
            leftover.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            continue
    return leftover


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", type=Path, default=REPO / ".bench-cache" / "cluster-pack",
                        help="the demo pack (built there if missing)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / ".bench-cache" / "scale-out.json")
    args = parser.parse_args(argv)
    from imprompt.demo.pack import build_demo_pack

    build_demo_pack(args.pack)
    requests = payloads(args.pack, args.requests, args.steps, args.size)
    logs = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results = {kind: run_server(kind, args.pack, requests, logs) for kind in ("single", "cluster")}
    single, cluster = results["single"], results["cluster"]
    results["ratio_p50_cluster_over_single"] = round(cluster["p50_s"] / single["p50_s"], 2)
    results["ratio_concurrent_cluster_over_single"] = round(cluster["concurrent_4_clients_s"] / single["concurrent_4_clients_s"], 2)
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    results["settings"] = vars(args) | {"pack": str(args.pack), "out": str(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| | one process | cluster (2 + 2 replicas) | ratio |\n|---|---:|---:|---:|")
    print(f"| ready after | {single['start_s']} s | {cluster['start_s']} s | |")
    print(f"| request, p50 ({args.requests} sequential) | {single['p50_s'] * 1000:.0f} ms | {cluster['p50_s'] * 1000:.0f} ms "
          f"| {results['ratio_p50_cluster_over_single']} |")
    print(f"| {args.requests} requests, 4 clients | {single['concurrent_4_clients_s']} s | "
          f"{cluster['concurrent_4_clients_s']} s | {results['ratio_concurrent_cluster_over_single']} |")
    print(f"| memory, all processes | {single['memory']['total_mib']} MiB | {cluster['memory']['total_mib']} MiB | |")
    print(f"raw: {args.out}; logs: {logs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
