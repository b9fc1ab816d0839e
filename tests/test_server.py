"""The HTTP API through real connections: SD.Next/A1111 shapes, a real A1111 client, concurrency, every error."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import webuiapi
from conftest import max_diff, request, unit
from PIL import Image
from server_fixtures import b64, client, decode, new_engine, running_server, wait_until



@pytest.fixture(scope="module")
def server(pack):
    with running_server(new_engine(pack), max_queue=8) as url:
        yield url


def payload(*units, **fields) -> dict:
    """An SD.Next txt2img payload: 64 px, 4 steps, tiny-sd15."""
    base = {"prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 4, "cfg_scale": 7.0, "width": 64,
            "height": 64, "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, "ip_adapter": list(units)}  # fmt: skip
    return {**base, **fields}


def sdnext_unit(adapter: str, image, scale: float = 0.6, **fields) -> dict:
    return {"adapter": adapter, "images": [b64(image)], "scale": scale, "start": 0.0, "end": 1.0, "crop": False, **fields}


def as_request(p: dict, images: list) -> dict:
    """The engine request equal to an SD.Next payload (for the side-by-side reference)."""
    model = p["override_settings"]["sd_model_checkpoint"]
    units = [{**{k: v for k, v in u.items() if k not in ("images", "crop")}, "images": [img]} for u, img in zip(p["ip_adapter"], images)]
    return request(*units, model=model, seed=p["seed"], steps=p["steps"], prompt=p["prompt"])


# ----------------------------------------------------------------------------------------------- SD.Next API


def test_sdnext_payloads_switch_adapters_across_requests(server, reference, red_circle, yellow_square):
    sequence = [
        payload(sdnext_unit("Base", red_circle)),
        payload(sdnext_unit("Base ViT-G", red_circle)),
        payload(sdnext_unit("Plus", yellow_square), sdnext_unit("Base ViT-G", red_circle, 0.4)),
        payload(sdnext_unit("Base", red_circle)),
    ]
    images = [[red_circle], [red_circle], [yellow_square, red_circle], [red_circle]]
    with client(server) as http:
        for p, imgs in zip(sequence, images):
            response = http.post("/sdapi/v1/txt2img", json=p)
            assert response.status_code == 200, response.text
            body = response.json()
            info = json.loads(body["info"])  # A1111: info is a JSON string
            assert [u["adapter"] for u in info["ip_adapters"]] == [u["adapter"] for u in p["ip_adapter"]]
            for u in info["ip_adapters"]:
                assert u["file"].endswith(".safetensors") and u["encoder"].startswith("IP-Adapter/")
            assert max_diff(decode(body["images"][0]).convert("RGB"), reference(as_request(p, imgs))) == 0
    vit_g = json.loads(http_post(server, sequence[1])["info"])["ip_adapters"][0]
    assert vit_g["encoder"] == "IP-Adapter/sdxl_models/image_encoder"


def http_post(server, p):
    with client(server) as http:
        response = http.post("/sdapi/v1/txt2img", json=p)
        assert response.status_code == 200, response.text
        return response.json()


def test_pngs_carry_the_a1111_parameters_chunk(server, red_circle):
    body = http_post(server, payload(sdnext_unit("Light", red_circle, 0.5), seed=3))
    text = decode(body["images"][0]).text["parameters"]
    assert text.startswith("a cat\n") and "Seed: 3" in text and 'IP Adapter: "Light:0.5:0.0:1.0"' in text
    assert json.loads(body["info"])["infotexts"] == [text]


def test_img2img_with_units_and_data_url_prefixes(server, reference, red_circle, yellow_square):
    p = payload({**sdnext_unit("Plus", red_circle), "images": ["data:image/png;base64," + b64(red_circle)]},
                init_images=[b64(yellow_square.resize((64, 64)))], denoising_strength=0.6, steps=5)  # fmt: skip
    with client(server) as http:
        response = http.post("/sdapi/v1/img2img", json=p)
    assert response.status_code == 200, response.text
    expected = reference(
        request(unit("Plus", red_circle), steps=5, init_images=[yellow_square.resize((64, 64))], denoising_strength=0.6)
    )
    assert max_diff(decode(response.json()["images"][0]).convert("RGB"), expected) == 0


def test_line_wrapped_base64_is_accepted_as_a1111_accepts_it(server, reference, red_circle):
    """`base64` without -w0, MIME encoders and some clients wrap at 76 characters."""
    text = b64(red_circle)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    p = payload({"adapter": "Base", "images": [wrapped], "scale": 0.6})
    image = decode(http_post(server, p)["images"][0]).convert("RGB")
    assert max_diff(image, reference(request(unit("Base", red_circle)))) == 0


def test_n_iter_runs_batches_with_counting_seeds(server, reference, red_circle):
    body = http_post(server, payload(sdnext_unit("Base", red_circle), seed=10, n_iter=2))
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [10, 11]
    second = reference(request(unit("Base", red_circle), seed=11))
    assert max_diff(decode(body["images"][1]).convert("RGB"), second) == 0


def test_models_options_and_adapters_for_the_current_model(pack, red_circle):
    with running_server(new_engine(pack)) as url, client(url) as http:
        titles = [m["title"] for m in http.get("/sdapi/v1/sd-models").json()]
        assert titles == ["tiny-flux", "tiny-sd15", "tiny-sd35", "tiny-sdxl"]
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"  # UNet families first
        sd15 = set(http.get("/sdapi/v1/ip-adapters").json())  # SD.Next's shape: names
        assert "Base ViT-G" in sd15 and "Base SDXL" not in sd15
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}).status_code == 200
        assert http.get("/sdapi/v1/ip-adapters").json()[0] == "None"
        sdxl = http.get("/v1/ip-adapters").json()
        assert {a["name"] for a in sdxl} == {"Base SDXL", "Base ViT-H SDXL", "Plus ViT-H SDXL", "Plus Face ViT-H SDXL",
                                             "Ostris Composition ViT-H SDXL"}  # fmt: skip
        assert all(a["encoder_present"] and a["needs"] for a in sdxl)
        for model, expected in (("tiny-flux", {("FLUX XLabs", "image_embeds[768] (ViT-L-14)", "clip_vision_l"),
                                               ("FLUX XLabs v2", "image_embeds[768] (ViT-L-14)", "clip_vision_l")}),
                                ("tiny-sd35", {("SD3.5 Large", "siglip hidden_states[1152] (SigLIP-so400m-14-384)", "siglip-so400m-patch14-384")})):
            assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).status_code == 200
            listed = {(a["name"], a["needs"], a["encoder"]) for a in http.get("/v1/ip-adapters").json()}
            assert listed == expected, model
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}).status_code == 200
        # requests without override_settings now use the current model
        p = payload(sdnext_unit("Base SDXL", red_circle))
        del p["override_settings"]
        assert json.loads(http.post("/sdapi/v1/txt2img", json=p).json()["info"])["model"] == "tiny-sdxl"


def test_native_endpoints(server, red_circle):
    with client(server) as http:
        http_post(server, payload(sdnext_unit("Full Face", red_circle)))
        models = http.get("/v1/models").json()
        assert {m["name"] for m in models["models"]} == {"tiny-sd15", "tiny-sdxl", "tiny-sd35", "tiny-flux"}
        assert all("fits_models" in a and "needs" in a for a in models["adapters"])
        cache = http.get("/v1/cache").json()
        assert cache["encoders"]["entries"] and {"hits", "misses", "evictions", "used_bytes"} <= set(cache["encoders"])
        events = http.get("/v1/events").json()
        assert any(e["event"] in ("encoder_loaded", "cache_hit", "encoder_reused") for e in events)
        cleared = http.delete("/v1/cache").json()["cleared"]
        assert cleared["encoders"] >= 1 and http.get("/v1/cache").json()["encoders"]["entries"] == []
        assert http.get("/healthz").json()["status"] == "ok"
        schema = http.get("/openapi.json").json()
        assert "/sdapi/v1/txt2img" in schema["paths"] and "/v1/cache" in schema["paths"]
        assert http.get("/docs").status_code == 200


def test_progress_and_interrupt(server, red_circle):
    """A long job reports progress while it runs, stops when interrupted, and the next job is unaffected."""
    results = {}

    def long_job():
        results["long"] = http_post(server, payload(sdnext_unit("Base", red_circle), steps=150))

    thread = threading.Thread(target=long_job)
    thread.start()
    with client(server) as http:
        deadline = time.time() + 60
        while True:
            progress = http.get("/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] >= 2:
                break
            assert time.time() < deadline, progress
            time.sleep(0.05)
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] >= 150
        assert http.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    thread.join(timeout=120)
    info = json.loads(results["long"]["info"])
    assert info["interrupted"] is True
    after = json.loads(http_post(server, payload(sdnext_unit("Base", red_circle)))["info"])
    assert after["interrupted"] is False


# --------------------------------------------------------------------------------------------- a real client


def test_webuiapi_the_a1111_client(pack, reference):
    """A1111's Python client: set the model through options, generate through txt2img."""
    with running_server(new_engine(pack)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        api.util_set_model("tiny-sdxl")
        assert api.util_get_current_model() == "tiny-sdxl"
        result = api.txt2img(prompt="a cat", seed=1, steps=4, width=64, height=64, cfg_scale=7.0)
        assert result.info["seed"] == 1 and result.info["model"] == "tiny-sdxl" and result.info["sampler"] == "Euler a"
        expected = reference({"model": "tiny-sdxl", "prompt": "a cat", "seed": 1, "steps": 4, "width": 64,
                              "height": 64, "cfg_scale": 7.0, "sampler": "Euler a"})  # fmt: skip
        assert max_diff(result.images[0].convert("RGB"), expected) == 0
        assert "Sampler: Euler a" in result.info["infotexts"][0]


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_clients_each_get_their_own_image(server, reference, red_circle, yellow_square):
    """Six clients at once, each with different adapters (both families): every image equals its request run
    alone. No state leaks between requests."""
    cases = [
        (payload(sdnext_unit("Base", red_circle), seed=1), [red_circle]),
        (payload(sdnext_unit("Base ViT-G", yellow_square), seed=2), [yellow_square]),
        (payload(sdnext_unit("Plus", red_circle), sdnext_unit("Base ViT-G", yellow_square, 0.3), seed=3),
         [red_circle, yellow_square]),
        (payload(sdnext_unit("Full Face", yellow_square, 0.8), seed=4), [yellow_square]),
        (payload(sdnext_unit("Base SDXL", red_circle), seed=5, override_settings={"sd_model_checkpoint": "tiny-sdxl"}),
         [red_circle]),
        (payload(seed=6), []),
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        bodies = list(pool.map(lambda case: http_post(server, case[0]), cases))
    for (p, imgs), body in zip(cases, bodies):
        assert max_diff(decode(body["images"][0]).convert("RGB"), reference(as_request(p, imgs))) == 0, p["seed"]


# ---------------------------------------------------------------------------------------------------- errors


def bomb_png() -> str:
    """A 20000 x 20000 PNG of a few KB: refused from its header, never decoded."""
    return b64(Image.new("1", (20000, 20000)))


ERRORS = [
    ("unknown adapter", lambda r: payload(sdnext_unit("Base XL Turbo", r)), 404, "Base XL Turbo"),
    ("unknown model", lambda r: payload(override_settings={"sd_model_checkpoint": "sd-9"}), 404, "sd-9"),
    ("incompatible adapter", lambda r: payload(sdnext_unit("Base SDXL", r)), 422, "2048"),
    ("bad base64", lambda r: payload({"adapter": "Base", "images": ["not base64 at all!"]}), 422, "base64"),
    ("not an image", lambda r: payload({"adapter": "Base", "images": ["aGVsbG8gd29ybGQ="]}), 422, "not an image"),
    ("decompression bomb", lambda r: payload({"adapter": "Base", "images": [bomb_png()]}), 413, "400000000 pixels"),
    ("image over the pixel limit", lambda r: payload({"adapter": "Base", "images": [b64(Image.new("1", (5000, 4000)))]}),
     413, "5000x4000"),
    ("start after end", lambda r: payload(sdnext_unit("Base", r, start=0.9, end=0.1)), 422, "start"),
    ("wrong type", lambda r: payload(steps="many"), 422, "steps"),
    ("path traversal in adapter", lambda r: payload(sdnext_unit("../../etc/passwd", r)), 404, "not found"),
    ("absolute path as adapter", lambda r: payload(sdnext_unit("/etc/passwd", r)), 404, "not found"),
    ("path traversal in model", lambda r: payload(override_settings={"sd_model_checkpoint": "../diffusers/tiny-sd15"}),
     404, "not found"),
    ("server file as image", lambda r: payload({"adapter": "Base", "images": ["/etc/hostname"]}), 422, "base64"),
]  # fmt: skip


@pytest.mark.parametrize("name, make, status, fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_4xx_json_and_the_server_answers_next(server, reference, red_circle, name, make, status, fragment):
    with client(server) as http:
        response = http.post("/sdapi/v1/txt2img", json=make(red_circle))
        assert response.status_code == status, response.text
        body = response.json()
        assert fragment in body["detail"] and body["error"]
    good = payload(sdnext_unit("Base ViT-G", red_circle), seed=21)
    image = decode(http_post(server, good)["images"][0]).convert("RGB")
    assert max_diff(image, reference(as_request(good, [red_circle]))) == 0


def test_malformed_json_and_oversize_body(pack, red_circle):
    with running_server(new_engine(pack), max_body_bytes=200_000) as url, client(url) as http:
        response = http.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422 and "JSON" in response.json()["detail"]
        big = payload({"adapter": "Base", "images": ["A" * 300_000]})
        response = http.post("/sdapi/v1/txt2img", json=big)
        assert response.status_code == 413 and "byte limit" in response.json()["detail"]
        assert http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle))).status_code == 200


def test_queue_full_is_429(pack, red_circle):
    with running_server(new_engine(pack), max_queue=1) as url, client(url) as http:
        slow = payload(sdnext_unit("Base", red_circle), steps=150)
        threads = [threading.Thread(target=lambda: http_post(url, slow)) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: http.get("/healthz").json()["busy"], what="the first job running")
        threads[1].start()  # waits in the queue, which is now full
        wait_until(lambda: http.get("/healthz").json()["queue"] >= 1, what="the second job waiting")
        response = http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle)))
        assert response.status_code == 429 and "queue is full" in response.json()["detail"]
        stop_jobs(http, threads)
        assert http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle))).status_code == 200


def stop_jobs(http, threads) -> None:
    """Interrupt running jobs until every client thread has its answer."""
    for thread in threads:
        while thread.is_alive():
            http.post("/sdapi/v1/interrupt")
            thread.join(timeout=0.2)


def test_a_long_queue_never_starves_progress_interrupt_and_health(pack, red_circle):
    """48 clients wait behind a long job: more than the 40 threads Starlette has for blocking handlers. Waiting
    handlers hold no thread, so progress, health and interrupt still answer while the long job runs."""
    with running_server(new_engine(pack), max_queue=64) as url, client(url) as http:
        done = []
        long = threading.Thread(target=lambda: done.append(http_post(url, payload(sdnext_unit("Base", red_circle), steps=150))))
        long.start()
        wait_until(lambda: http.get("/healthz").json()["busy"], what="the long job running")
        waiting = [threading.Thread(target=lambda i=i: done.append(http_post(url, payload(seed=i)))) for i in range(48)]
        for thread in waiting:
            thread.start()
        wait_until(lambda: http.get("/healthz", timeout=10).json()["queue"] == 48, what="48 jobs waiting")
        progress = http.get("/sdapi/v1/progress", timeout=10).json()
        assert progress["state"]["job_count"] == 49 and progress["state"]["sampling_step"] < 150
        assert http.post("/sdapi/v1/interrupt", timeout=10).json() == {"interrupted": True}
        stop_jobs(http, [long] + waiting)
        assert len(done) == 49


def test_a_client_that_leaves_while_waiting_has_its_job_dropped(pack, red_circle):
    import httpx

    with running_server(new_engine(pack), max_queue=4) as url, client(url) as http:
        long = threading.Thread(target=lambda: http_post(url, payload(sdnext_unit("Base", red_circle), steps=150)))
        long.start()
        wait_until(lambda: http.get("/healthz").json()["busy"], what="the long job running")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job waits
            httpx.post(url + "/sdapi/v1/txt2img", json=payload(seed=77), timeout=1.5)
        wait_until(lambda: http.get("/healthz").json()["queue"] == 0, what="the abandoned job dropped")
        assert http.get("/healthz").json()["busy"]  # still the long job: the abandoned one never ran
        events = http.get("/v1/events").json()
        assert [e["why"] for e in events if e["event"] == "request_dropped"] == ["the client disconnected"]
        stop_jobs(http, [long])


def test_max_queue_must_be_positive(pack):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--max-queue", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--max-queue" in done.stderr and "not a positive whole number" in done.stderr
    from imprompt.errors import RequestError
    from imprompt.server.app import ServerSettings, create_app

    with pytest.raises(RequestError, match="max_queue must be at least 1"):
        create_app(new_engine(pack), ServerSettings(max_queue=0))


def test_units_and_images_over_the_limits_are_refused_before_decoding(pack, red_circle):
    """A 64 MiB body holds ~100,000 tiny PNGs; counts are checked before any of them is decoded (the images here
    are not even base64, yet the answer is about the count)."""
    garbage = ["not base64 at all!"]
    with running_server(new_engine(pack, max_units=2, max_images=3), max_queue=4) as url, client(url) as http:
        for body, where in [
            (payload(*[{"adapter": "Base", "images": garbage}] * 3), "ip_adapters: 3 units is more than the 2"),
            (payload({"adapter": "Base", "images": garbage * 4}), "ip_adapters.0.images: 4 is more than the 3"),
            (payload({"adapter": "Base", "images": garbage * 4, "masks": garbage * 4}), "ip_adapters.0.images: 4"),
        ]:
            response = http.post("/sdapi/v1/txt2img", json=body)
            assert response.status_code == 413 and response.json()["error"] == "LimitError", response.text
            assert where in response.json()["detail"]
        assert http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle))).status_code == 200


def test_cache_answers_during_model_switches(pack, red_circle):
    """/v1/cache reads the engine while another thread switches models: always an answer, and always a model
    (a switch keeps the current model until the next one is loaded)."""
    with running_server(new_engine(pack)) as url, client(url) as http:
        http_post(url, payload(seed=1))
        answers, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                response = http.get("/v1/cache")
                answers.append((response.status_code, response.json().get("model")))

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for i, model in enumerate(["tiny-sdxl", "tiny-sd15", "tiny-sdxl", "tiny-sd15"]):
                http_post(url, payload(seed=i, override_settings={"sd_model_checkpoint": model}))
        finally:
            stop.set()
            poller.join(timeout=60)
        assert answers and all(status == 200 and model in ("tiny-sd15", "tiny-sdxl") for status, model in answers)


def test_api_key(pack, red_circle):
    with running_server(new_engine(pack), api_key="s3cret") as url:
        with client(url) as http:
            assert http.get("/healthz").status_code == 200  # open, for load balancers
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
                response = http.get("/sdapi/v1/sd-models", headers=headers)
                assert response.status_code == 401 and "API key" in response.json()["detail"]
                assert response.headers["www-authenticate"].startswith("Basic realm=")  # browsers then ask for the key
            assert http.get("/", headers={}).status_code == 401  # the page too
            assert http.get("/sdapi/v1/sd-models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with client(url, auth=("anyone", "s3cret")) as http:  # A1111-style HTTP Basic
            assert http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle))).status_code == 200
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), username="user", password="s3cret")
        assert api.util_get_current_model() == "tiny-sd15"
        with client(url) as http:
            for header in ("Bearer clé".encode(), b"Basic \xff\xfe", "Bearer s3crét".encode("latin-1")):
                response = http.get("/sdapi/v1/sd-models", headers={"Authorization": header})
                assert response.status_code == 401 and response.json()["error"] == "AuthError"


def test_chunked_body_over_the_limit_is_413_json(pack, red_circle):
    """A body without Content-Length is limited while it streams, with imprompt's error shape."""
    with running_server(new_engine(pack), max_body_bytes=10_000) as url, client(url) as http:
        chunks = (b" " * 1000 for _ in range(50))
        response = http.post("/sdapi/v1/txt2img", content=chunks, headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.status_code == 413 and response.json()["error"] == "PayloadTooLargeError"
        assert "10000 byte limit" in response.json()["detail"]
        assert http.post("/sdapi/v1/txt2img", json=payload(sdnext_unit("Base", red_circle))).status_code == 200


def test_serve_cli_starts_on_loopback_and_preloads_its_model(pack):
    """`imprompt serve` itself, as a process: binds loopback by default and answers at once, loads its model
    meanwhile, and the first request finds it loaded. With one worker (the default) it serves from this process:
    Ray is never loaded, even where the cluster extra is installed."""
    import subprocess
    import sys

    from server_fixtures import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--port", str(port), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        import httpx

        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.2)
        assert health["status"] == "ok"
        preloaded = wait_until(lambda: [e for e in httpx.get(f"http://127.0.0.1:{port}/v1/events").json()
                                        if e["event"] == "model_loaded"], what="the preload")  # fmt: skip
        assert [e["job"] for e in preloaded] == ["preload"]
        txt2img = {"prompt": "a shape", "steps": 2, "width": 64, "height": 64, "seed": 1}
        assert httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=txt2img, timeout=120).status_code == 200
        events = httpx.get(f"http://127.0.0.1:{port}/v1/events").json()
        assert [e["job"] for e in events if e["event"] == "model_loaded"] == ["preload"]  # the request loaded nothing
        mapped = Path(f"/proc/{process.pid}/maps").read_text()  # every shared library the process has loaded
        assert "torch" in mapped and "_raylet" not in mapped
    finally:
        process.terminate()
        process.wait(timeout=30)
