"""imprompt on Ray Serve, as users run it: `imprompt serve --workers 2 --encoder-workers 2` (a local cluster on
loopback) in its own process, driven over HTTP by real clients; every image checked against the single process.

One cluster for the whole file and one test that takes it through its phases in order (affinity first: it needs
models no request has loaded yet), because starting a cluster costs about a minute on two cores. The cluster batches
(`--batch-wait`, Ray Serve's `@serve.batch` in each generator replica): a request that ran alone must equal the
single process's image exactly, one that shared a pipeline call with others within 1/255.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the cluster extra is not installed: pip install 'imprompt[cluster]'")
psutil = pytest.importorskip("psutil")

from server_fixtures import b64, client, decode, free_port, wait_until  # noqa: E402

from imprompt import Engine  # noqa: E402
from imprompt.cluster.start import stop_left_over  # noqa: E402
from imprompt.demo.pack import SD15_MODEL, SDXL_MODEL  # noqa: E402
from tools.bench_cluster import ready, session_processes, stop  # noqa: E402

START_SECONDS = 300  # bounded waits: a cluster that does not come up fails the test, never hangs it
BATCH_WAIT = "0.5"  # seconds a generator replica gathers requests for (every lone request waits this long too)


@pytest.fixture(scope="module")
def burst_models(pack, tmp_path_factory) -> Path:
    """Two more copies of the SD 1.5 pipeline under other names: models no request has loaded yet; and a LoRA whose
    header passes the ingress's plan but whose weights do not fit the model: it fails on the generator worker."""
    import torch
    from diffusers import StableDiffusionPipeline

    from tools.extra_models import kohya_lora, write

    root = tmp_path_factory.mktemp("burst-models")
    for name in ("burst-a", "burst-b"):
        shutil.copytree(pack / "diffusers" / SD15_MODEL, root / name)
    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / SD15_MODEL, safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    lora = kohya_lora(sd15, seed=3, text=False)
    up = next(name for name in lora if name.endswith("lora_up.weight"))
    lora[up] = torch.zeros(lora[up].shape[0] + 3, lora[up].shape[1])  # 3 rows more than the layer has
    write(root / "Lora" / "broken-sd15.safetensors", lora)
    return root


@pytest.fixture(scope="module")
def cluster(pack, burst_models):
    """`imprompt serve` with 2 generator and 2 encoder replicas; stopped, and every Ray process it started with
    it (found by the Ray temp folder in their command line or environment; any that outlived it fails the test)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(Path(ray_tmp) / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--models", str(burst_models),
         "--workers", "2", "--encoder-workers", "2", "--models-per-worker", "3", "--port", str(port),
         "--batch-wait", BATCH_WAIT, "--batch-max", "4"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url, process), START_SECONDS, "the cluster serving")
        yield url, process.pid, ray_tmp
    finally:
        leftover = stop(process, ray_tmp)
        log.close()
        print((Path(ray_tmp) / "serve.log").read_text()[-4000:])
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leftover, f"Ray processes outlived `imprompt serve`: {leftover}"


def txt2img(url: str, model: str, units: list, seed: int, steps: int = 4, size: int = 64) -> dict:
    """An A1111 ControlNet-extension payload, as the extension's users send it."""
    payload = {"prompt": "a cat", "seed": seed, "steps": steps, "width": size, "height": size, "cfg_scale": 7.0,
               "override_settings": {"sd_model_checkpoint": model},
               "alwayson_scripts": {"controlnet": {"args": [
                   {"enabled": True, "module": "ip-adapter_clip_sd15", "model": adapter, "weight": 0.7,
                    "image": b64(image)} for adapter, image in units]}}}  # fmt: skip
    return payload


def post(url: str, payload: dict):
    with client(url) as http:
        response = http.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    return decode(body["images"][0]).convert("RGB"), json.loads(body["info"])


def reference(pack, engine: Engine, payload: dict):
    """The single process's image for the same payload, through the same A1111 conversion."""
    from imprompt.server.a1111 import Txt2ImgPayload, to_request

    request = to_request(Txt2ImgPayload(**payload), SD15_MODEL, engine.store).request
    return engine.generate(request).images[0]


def same(a, b) -> bool:
    import numpy as np

    return np.array_equal(np.asarray(a), np.asarray(b))


def alike(image, info: dict, expected) -> bool:
    """The single process's image: exactly when the request ran alone; within 1/255 when it shared a pipeline
    call with others (`info.batch`: batched GEMMs may round otherwise, as in the single process's batches)."""
    from conftest import max_diff

    if info.get("batch", {}).get("requests", 1) == 1:
        return same(image, expected)
    return max_diff(image, expected) <= 1


def events(url: str, since: float = 0.0) -> list[dict]:
    with client(url) as http:
        return http.get("/v1/events", params={"since": since}).json()


def test_cluster(cluster, pack, burst_models, engine, red_circle, yellow_square):
    url, pid, ray_tmp = cluster
    with client(url) as http:
        workers = wait_until(lambda: _workers(http, 4), 120, "every replica reporting")
    assert {w["node"] for w in workers.values()} == {"127.0.0.1"}, workers  # Ray kept every replica on loopback
    listening = _listening(pid, ray_tmp)
    outside = [(ip, port, name) for ip, port, name in listening if ip not in LOOPBACK]
    assert listening and not outside, outside  # and every socket it opened listens on loopback only

    # ------------------------------------------- refusals: the same status, JSON and text as one process, no load
    from starlette.testclient import TestClient

    from imprompt.server.app import (  # the single-process app, for its answers
        ServerSettings,
        create_app,
    )

    wrong = txt2img(url, SD15_MODEL, [("ip-adapter_sdxl", red_circle)], seed=1)  # an SDXL adapter on SD 1.5
    unknown = txt2img(url, SD15_MODEL, [("no-such-adapter", red_circle)], seed=1)
    with client(url) as http, TestClient(create_app(Engine([pack, burst_models], allow_paths=False), ServerSettings())) as alone:
        for payload in (wrong, unknown):
            answer, expected = http.post("/sdapi/v1/txt2img", json=payload), alone.post("/sdapi/v1/txt2img", json=payload)
            assert (answer.status_code, answer.json()) == (expected.status_code, expected.json())
            assert answer.status_code in (404, 422)
        cleared = http.delete("/v1/cache")
        assert cleared.status_code == 422 and "--models-per-worker" in cleared.json()["detail"]
    assert [e for e in events(url) if e["event"].endswith("_loaded")] == []  # refused before any worker computed

    # ----------------------------------------------------------------------------------------------- affinity
    encoder_sets = [
        (SD15_MODEL, [("ip-adapter_sd15", red_circle)]),  # {ViT-H}
        (SDXL_MODEL, [("ip-adapter_sdxl", yellow_square)]),  # {bigG}
        (SDXL_MODEL, [("ip-adapter_sdxl", red_circle), ("ip-adapter_sdxl_vit-h", yellow_square)]),  # {ViT-H, bigG}
    ]
    started = time.time()
    for i in range(12):
        model, units = encoder_sets[i % 3]
        post(url, txt2img(url, model, units, seed=i))
    seen = events(url, started - 1)
    pipeline_loads = [(e["model"], e["replica"]) for e in seen if e["event"] == "model_loaded"]
    encoder_loads = [(e["encoder"], e["replica"]) for e in seen if e["event"] == "encoder_loaded"]
    assert Counter(m for m, _ in pipeline_loads) == {SD15_MODEL: 1, SDXL_MODEL: 1}, pipeline_loads
    assert sorted(Counter(e for e, _ in encoder_loads).values()) == [1, 1], encoder_loads
    assert {e["worker"] for e in seen if e["event"] == "encoder_loaded"} == {"encoder"}
    with client(url) as http:
        workers = http.get("/v1/cache").json()["workers"]
    held = Counter(i.split("@")[0] for w in workers.values() if w["kind"] == "generator" for i in w["held"])
    assert held == {SD15_MODEL: 1, SDXL_MODEL: 1}, workers  # what Ray routes by: each model on one replica

    # ------------------------------------------------------------------------- no cross-talk, 8 clients at once
    mixes = [
        (SD15_MODEL, [("ip-adapter_sd15", red_circle)]),
        (SD15_MODEL, [("ip-adapter-plus_sd15", yellow_square)]),
        (SD15_MODEL, [("ip-adapter_sd15_vit-G", red_circle)]),
        (SD15_MODEL, [("ip-adapter_sd15", yellow_square), ("ip-adapter_sd15_vit-G", red_circle)]),
        (SDXL_MODEL, [("ip-adapter_sdxl", yellow_square)]),
        (SDXL_MODEL, [("ip-adapter_sdxl_vit-h", red_circle)]),
        (SDXL_MODEL, [("ip-adapter-plus_sdxl_vit-h", yellow_square), ("ip-adapter_sdxl", red_circle)]),
        (SD15_MODEL, []),
    ]
    payloads = [txt2img(url, model, units, seed=100 + i) for i, (model, units) in enumerate(mixes)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: post(url, p), payloads))
    for payload, (model, units), (image, info) in zip(payloads, mixes, answers):
        assert [Path(u["file"]).stem for u in info["ip_adapters"]] == [a for a, _ in units], info["ip_adapters"]
        assert alike(image, info, reference(pack, engine, payload)), f"{model} {units}: differs from the single process"

    # ----------------------- batching: concurrent requests for one model share a call; a bad one fails on its own
    started = time.time()
    good = [{**txt2img(url, SD15_MODEL, [], seed=300 + i), "prompt": prompt}
            for i, prompt in enumerate(("a red cat", "a blue dog", "a green bird"))]  # fmt: skip
    bad = {**txt2img(url, SD15_MODEL, [], seed=303), "prompt": "a cat <lora:broken-sd15:1>"}  # passes the plan
    together = threading.Barrier(4)

    def send(payload: dict) -> tuple[int, dict]:
        together.wait(60)
        return _post_any(url, payload)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [*good, bad]))
    for payload, (status, body) in zip(good, answers):
        assert status == 200, body
        info = json.loads(body["info"])
        assert info["batch"]["requests"] > 1, info["batch"]  # shared a pipeline call with another request
        image = decode(body["images"][0]).convert("RGB")
        assert alike(image, info, reference(pack, engine, payload)), f"{payload['prompt']}: differs from alone"
    status, body = answers[-1]
    assert status == 422 and body["error"] == "CheckpointError" and "broken-sd15" in body["detail"], body
    gathered = [e for e in events(url, started - 1) if e["event"] == "batch_gathered"]
    assert [e["size"] for e in gathered] == [4], gathered  # the bad request was in the batch, and failed alone

    # --------------------------------------------------------------------- interrupt: the long job, not the short
    long_payload = {**txt2img(url, SD15_MODEL, [("ip-adapter_sd15", red_circle)], seed=7, steps=150, size=128),
                    "n_iter": 8}  # fmt: skip
    short_payload = txt2img(url, SD15_MODEL, [("ip-adapter_sd15", yellow_square)], seed=8)
    outcome = {}
    long_thread = threading.Thread(target=lambda: outcome.update(long=post(url, long_payload)))
    long_thread.start()
    with client(url) as http:
        wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0, 120, "the long job running")
        short_thread = threading.Thread(target=lambda: outcome.update(short=post(url, short_payload)))
        short_thread.start()
        wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2, 60, "the short job submitted")
        assert http.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    long_thread.join(300)
    short_thread.join(300)
    long_info = outcome["long"][1]
    assert long_info["interrupted"] is True and len(long_info["imprompt"]) < 8, long_info  # stopped in a batch
    assert outcome["short"][1]["interrupted"] is False
    assert alike(*outcome["short"], reference(pack, engine, short_payload))

    # ----------------------------------------------------------- burst: first requests for never-loaded models
    started = time.time()
    burst = [txt2img(url, model, [("ip-adapter_sd15", red_circle)], seed=200 + i)
             for i, model in enumerate(["burst-a", "burst-b"] * 3)]  # fmt: skip
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda p: post(url, p), burst))
    loads = Counter(e["model"] for e in events(url, started - 1) if e["event"] == "model_loaded")
    print(f"burst of 6 first requests over 2 new models: loads {dict(loads)}")
    # every request answered (above); each model loaded once, or on both replicas at most: the first request of a
    # new id goes alone (no herd), but when the replica holding it has 4 requests, Ray spills the next elsewhere
    assert set(loads) == {"burst-a", "burst-b"} and max(loads.values()) <= 2, loads

    # --------------------------------------------------------------- faults: a generator replica killed mid-run
    with client(url) as http:
        victim_payload = {**txt2img(url, SD15_MODEL, [("ip-adapter_sd15", red_circle)], seed=9, steps=60), "n_iter": 2}
        other_payload = txt2img(url, SDXL_MODEL, [("ip-adapter_sdxl", yellow_square)], seed=10)
        outcome = {}
        victim = threading.Thread(target=lambda: outcome.update(victim=_post_any(url, victim_payload)))
        victim.start()
        progress = wait_until(lambda: _running(http), 120, "the victim job running")
        replica = progress["textinfo"].removeprefix("on ")
        pid = http.get("/v1/cache").json()["workers"][replica]["pid"]
        with ThreadPoolExecutor(2) as pool:  # requests for the other model, on the other replica, meanwhile
            pending = [pool.submit(post, url, other_payload) for _ in range(2)]
            os.kill(pid, signal.SIGKILL)
            others = [p.result() for p in pending]
        victim.join(300)
        status, body = outcome["victim"]
        print(f"the killed replica's request: {status} {'(retried)' if status == 200 else body}")
        if status == 200:  # retried on another replica: the request carries its seed, so the image is the same
            image, info = decode(body["images"][0]).convert("RGB"), json.loads(body["info"])
            assert info["worker"] != replica, info["worker"]  # not a job that ended before its replica was killed
            assert alike(image, info, reference(pack, engine, victim_payload))
        else:
            assert status == 503 and body["error"] == "WorkerLostError", body
        expected = reference(pack, engine, other_payload)
        assert all(alike(image, info, expected) for image, info in others)
        # Ray restarts the replica: two generators report again, one of them a new process
        wait_until(lambda: _workers(http, 4, without_pid=pid), 180, "the killed replica replaced")
    after = {**victim_payload, "steps": 4, "n_iter": 1}  # the model again, served right (not its 120 steps again)
    image, info = post(url, after)
    assert alike(image, info, reference(pack, engine, after))

    # ------------------------------------------------ SD 3.5 and FLUX: their encoders and adapters, routed the same
    for model, adapter in (("tiny-sd35", "sd3.5-large-ip-adapter"), ("tiny-flux", "flux-ip-adapter")):
        payload = {**txt2img(url, model, [(adapter, red_circle)], seed=11, steps=3), "cfg_scale": 3.5}
        image, info = post(url, payload)
        assert [Path(u["file"]).stem for u in info["ip_adapters"]] == [adapter]
        assert same(image, reference(pack, engine, payload)), f"{model}: differs from the single process"


def _workers(http, count: int, without_pid: int | None = None) -> dict | None:
    """The live replicas `/v1/cache` lists, once `count` of them report (and none is the process `without_pid`)."""
    reported = http.get("/v1/cache").json()["workers"]
    if any(w["pid"] == without_pid for w in reported.values()):
        return None
    return reported if len(reported) >= count else None


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pid: int, ray_tmp: str) -> list[tuple]:
    """(address, port, process) of every socket listening in `imprompt serve` or a Ray process of its session."""
    found = []
    for p in [psutil.Process(pid), *session_processes(ray_tmp)]:
        try:
            found += [(c.laddr.ip, c.laddr.port, p.name()) for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]  # fmt: skip
        except psutil.Error:  # ended meanwhile
            continue
    return found


def _running(http) -> dict | None:
    progress = http.get("/sdapi/v1/progress").json()
    return progress if progress["state"]["sampling_step"] > 0 else None


def _post_any(url: str, payload: dict) -> tuple[int, dict]:
    with client(url) as http:
        response = http.post("/sdapi/v1/txt2img", json=payload)
    return response.status_code, response.json()


def test_joining_a_cluster_started_with_ray_start(pack, red_circle, engine):
    """`ray start --head` (as on a GPU node), then `imprompt serve --address`: it deploys onto that cluster, serves,
    and on SIGTERM deletes its application and leaves the cluster running. Everything on loopback; every process
    of the Ray session stopped at the end (`ray stop`, then by PID)."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # the cluster's token, as a driver needs it
    ray = str(Path(sys.executable).parent / "ray")
    head, port = free_port(), free_port()
    started = subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(head),
                              "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", ray_tmp],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    process = None
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        log = open(Path(ray_tmp) / "serve.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--address", f"127.0.0.1:{head}",
             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: ready(url, process), START_SECONDS, "the application deployed")
        payload = txt2img(url, SD15_MODEL, [("ip-adapter_sd15", red_circle)], seed=3)
        image, info = post(url, payload)
        assert info["worker"] and same(image, reference(pack, engine, payload))
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        with httpx.Client(base_url=url, timeout=10) as http:  # Serve's proxy still answers: the cluster runs on,
            assert http.get("/sdapi/v1/sd-models").status_code == 404  # without imprompt's application
        session = session_processes(ray_tmp)
        assert {"gcs_server", "raylet"} <= {p.name() for p in session}  # what `ray start` started is found here
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(30)
        # not `ray stop`: it stops every Ray process on the machine; this session's, by PID, as `ray stop` does
        # (SIGTERM, then SIGKILL after a grace period: its 16 s, 5 here; the GCS and a log monitor outwait any),
        # the kills by imprompt's own `stop_left_over` (the raylet first: it restarts what it lost)
        for _ in range(3):  # bounded; a worker started meanwhile is found by the next pass
            session = session_processes(ray_tmp)
            if not session:
                break
            for p in session:
                with contextlib.suppress(psutil.NoSuchProcess):  # ended since it was found
                    p.terminate()
            stop_left_over(session, wait_s=5)
        print((Path(ray_tmp) / "serve.log").read_text()[-3000:] if (Path(ray_tmp) / "serve.log").exists() else "")
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not session_processes(ray_tmp)



def test_the_cluster_refuses_past_its_jobs_in_flight(pack):
    """`--max-queue` bounds the jobs in flight at the ingress: one more is a 429 before anything is planned."""
    import asyncio

    from imprompt.cluster.ingress import ClusterJobs
    from imprompt.errors import QueueFullError
    from imprompt.request import parse_request

    jobs = ClusterJobs(Engine(pack), encoders=None, generators=None, board=None, max_queue=2)
    jobs.in_flight = 2
    try:
        asyncio.run(jobs.run_async(parse_request({"prompt": "a cat"}), 1, client_gone=None))
    except QueueFullError as exc:
        assert exc.http_status == 429 and "2 jobs in flight" in str(exc)
    else:
        raise AssertionError("a job past the limit was accepted")


# --------------------------------------------------------------------- a generator replica's batch, without Ray


class FakeBoard:
    """The job board's calls a generator replica makes, answered at once (`ray.get` is patched to pass them on).
    `stop_at`: job -> the step after which the board answers that the job should stop; `gone`: jobs it dropped."""

    def __init__(self, stop_at: dict | None = None, gone: tuple = ()):
        from types import SimpleNamespace

        self.stop_at, self.gone, self.calls = stop_at or {}, set(gone), []

        def call(name, answer):
            return SimpleNamespace(remote=lambda *args: self.calls.append((name, *args)) or Answer(answer(*args)))

        self.started = call("started", lambda job, replica, iterations: job in self.gone)
        self.step = call("step", lambda job, step, total, iteration: step >= self.stop_at.get(job, total + 1))
        self.interrupted = call("interrupted", lambda job: job in self.gone)


class Answer:
    """A board's answer as `ray.get` (patched: it returns this) and as an awaited ObjectRef give it."""

    def __init__(self, value):
        self.value = value

    def __bool__(self):
        return bool(self.value)

    def __await__(self):
        yield from ()
        return self.value


def generator_without_ray(engine: Engine, board: FakeBoard, monkeypatch, batch_max: int = 4):
    """A `GeneratorWorker` as a replica has it, but for Ray: its board answers at once and its model is held."""
    import asyncio

    import imprompt.cluster.workers as workers

    monkeypatch.setattr(workers.ray, "get", lambda answer: answer)
    worker = object.__new__(workers.GeneratorWorker)
    worker.engine, worker.board, worker.replica, worker.turn = engine, board, "replica-1", asyncio.Lock()
    worker.batch_wait, worker.batch_max, worker.held = 0.5, batch_max, set()
    worker.reported = []
    worker.report = lambda events, job=None: worker.reported.append((events, job))

    async def hold(wanted):
        worker.held.add(wanted)

    worker.hold = hold
    return worker


def test_a_generator_replicas_batch_gives_each_request_its_own_outcome(pack, red_circle, yellow_square, monkeypatch):
    """`GeneratorWorker.run_turns`, what Ray Serve's `@serve.batch` calls with the turns it gathered: the requests
    that share a call run as one (`info.batch`), each image within 1/255 of the same request alone on a plain
    Engine (with a unit's embeddings made elsewhere, as encoder workers make them); a bad request, one whose client left
    before it ran and one interrupted on the board each get their own outcome, the others their images."""
    import asyncio

    from conftest import max_diff
    from conftest import request as make_request
    from conftest import unit

    from imprompt.cluster.workers import Turn
    from imprompt.errors import ImpromptError, RequestError
    from imprompt.request import parse_request

    plain = Engine(pack)
    adapter = make_request(unit("Base", b64(red_circle)), seed=2, prompt="a dog")
    # made from another image than the request's: the image shows that the worker used what it was given
    embeddings, _ = plain.embed(make_request(unit("Base", b64(yellow_square))), 0)
    requests = {
        "cat": (make_request(seed=1), {}),
        "adapter": (adapter, {0: embeddings}),
        "unknown": (make_request(unit("no-such-adapter", b64(red_circle)), seed=3), {}),
        "gone": (make_request(seed=4, prompt="a bird"), {}),
        "stopped": (make_request(seed=5, prompt="a tree"), {}),
    }
    board = FakeBoard(stop_at={"stopped": 2}, gone=("gone",))
    worker = generator_without_ray(Engine(pack), board, monkeypatch)
    turns = [Turn(parse_request(r), 0, 1, e, job, "tiny-sd15@x", 1) for job, (r, e) in requests.items()]
    outcomes = dict(zip(requests, asyncio.run(worker.run_turns(turns))))

    assert worker.held == {"tiny-sd15@x"}
    for job in ("cat", "adapter"):
        result = outcomes[job]
        assert not isinstance(result, BaseException), (job, result)
        assert result.info["batch"]["requests"] > 1 and result.info["worker"] == "replica-1"
        assert result.info["interrupted"] is False
        request, made = requests[job]
        assert max_diff(result.images[0], plain.generate(request, embeddings=made).images[0]) <= 1, job
    try:
        plain.generate(requests["unknown"][0])
    except ImpromptError as alone:
        assert type(outcomes["unknown"]) is type(alone) and str(outcomes["unknown"]) == str(alone)
    else:
        raise AssertionError("the unknown adapter was accepted alone")
    assert isinstance(outcomes["gone"], RequestError) and "went away" in str(outcomes["gone"])
    assert outcomes["stopped"].info["interrupted"] is True  # its own interrupt: the others ran to their end
    started = [call[1] for call in board.calls if call[0] == "started"]
    assert sorted(started) == sorted(requests)  # every job started once, on the board
    gathered = [e for events, _ in worker.reported for e in events if e["event"] == "batch_gathered"]
    assert gathered and gathered[0]["size"] == 4  # all but the job that left


def test_a_batched_job_of_several_iterations_gets_each_batch_with_its_seed(pack, monkeypatch):
    """n_iter through the batch path: each batch a turn of its own (seed counting on by the batch size), stopped
    between two batches once the board says so."""
    import asyncio

    from conftest import request as make_request

    from imprompt.request import parse_request

    board = FakeBoard()
    worker = generator_without_ray(Engine(pack), board, monkeypatch)
    worker.check = lambda entry, parts: "tiny-sd15@x"
    request = parse_request(make_request(seed=10, batch_size=2, steps=2))
    results = asyncio.run(worker.generate_batched(request, 3, {}, "job"))
    assert [r.info["seed"] for r in results] == [10, 12, 14]
    assert [c[0] for c in board.calls if c[0] in ("started", "interrupted")] == ["started", "interrupted", "interrupted"]
    board.gone.add("later")
    board.started = FakeBoard().started  # it started; then its client leaves before the second batch
    assert len(asyncio.run(worker.generate_batched(request, 3, {}, "later"))) == 1


def test_worker_batch_settings_are_checked():
    from imprompt.cluster.workers import WorkerSettings
    from imprompt.errors import RequestError

    for bad in ({"batch_wait": 61.0}, {"batch_wait": -1.0}, {"batch_max": 0}):
        with pytest.raises(RequestError, match="--batch-"):
            WorkerSettings({}, **bad)


def test_every_imprompt_error_reaches_the_ingress_as_itself():
    """A worker's error travels pickled (Ray): each `ImpromptError` must come back as its type with its message, or
    the ingress answers 500 "failed to deserialize" instead of its status (a broken LoRA's CheckpointError did)."""
    import pickle

    import imprompt.errors as errors

    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.ImpromptError)]
    assert errors.CheckpointError in kinds
    for kind in kinds:
        checkpoint = issubclass(kind, errors.CheckpointError)
        error = kind("/models/x.safetensors", "truncated", "download it again") if checkpoint else kind("why")
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is kind and str(back) == str(error) and back.http_status == error.http_status
