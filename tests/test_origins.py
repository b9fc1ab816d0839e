"""Cross-site requests: a page of another site, or a DNS-rebinding page (its own name pointed at the server), cannot
use the API through the user's browser; the server's own page, listed origins and clients that are not browsers
can. Through real servers (uvicorn on loopback), `imprompt serve`'s flags, and Starlette's TestClient."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from server_fixtures import free_port, new_engine, running_server

TXT2IMG = {"prompt": "a cat", "seed": 1, "steps": 2, "width": 64, "height": 64,
           "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}  # fmt: skip


@pytest.fixture(scope="module")
def server(pack):
    with running_server(new_engine(pack)) as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_page_of_another_site_cannot_post(server):
    """A browser sends another site's POST without asking (CORS would only hide the answer): refused, nothing runs."""
    with httpx.Client(base_url=server, timeout=120) as http:
        before = http.get("/v1/events").json()
        response = http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers={"Origin": "https://evil.example"})
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["error"] == "CrossSiteError"
        assert "https://evil.example" in body["detail"] and "--cors-allow-origins https://evil.example" in body["detail"]
        assert "access-control-allow-origin" not in response.headers
        for origin in ("null", f"http://localhost:{port_of(server) + 1}", f"https://127.0.0.1:{port_of(server)}x"):
            assert http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers={"Origin": origin}).status_code == 403, origin
        preflight = http.options("/sdapi/v1/txt2img", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert preflight.status_code == 403
        assert [e for e in http.get("/v1/events").json() if e not in before] == []  # no job started


def test_a_dns_rebinding_page_is_refused(server):
    """The page's own name, pointed at 127.0.0.1, arrives as the Host header, with or without an Origin."""
    port = port_of(server)
    with httpx.Client(base_url=server, timeout=120) as http:
        for headers in ({"Host": f"evil.example:{port}"},
                        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"},
                        {"Host": "127.0.0.1.evil.example"}, {"Host": "localhost.evil.example"}):  # fmt: skip
            response = http.get("/sdapi/v1/sd-models", headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert response.json()["error"] == "CrossSiteError" and "--allowed-hosts" in response.json()["detail"]


def test_loopback_names_the_own_page_and_plain_clients_are_served(server):
    port = port_of(server)
    with httpx.Client(base_url=server, timeout=120) as http:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}", "127.0.0.1",
                     f"127.0.0.2:{port}"):  # fmt: skip
            assert http.get("/sdapi/v1/sd-models", headers={"Host": host}).status_code == 200, host
        own = {"Origin": f"http://127.0.0.1:{port}"}  # what the page at / sends with its fetch() POSTs
        assert http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers=own).status_code == 200
        local = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
        assert http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers=local).status_code == 200
        assert http.post("/sdapi/v1/txt2img", json=TXT2IMG).status_code == 200  # no Origin: not a browser


def test_listed_origins_and_hosts_are_served_with_cors_headers(pack):
    """As A1111's --cors-allow-origins / --cors-allow-origins-regex: listed origins may call the API and read the
    answers (CORS headers, preflight answered without the key, which a preflight never carries)."""
    settings = {"api_key": "k3y", "allowed_hosts": ("studio.lan",), "cors_allow_origins": ("https://app.example",),
                "cors_allow_origins_regex": r"https://.*\.tools\.example"}  # fmt: skip
    with running_server(new_engine(pack), **settings) as url, httpx.Client(base_url=url, timeout=120) as http:
        key = {"Authorization": "Bearer k3y"}
        for origin in ("https://app.example", "https://a.tools.example"):
            preflight = http.options("/sdapi/v1/txt2img", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == origin
            response = http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers={"Origin": origin, **key})
            assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin
        assert http.post("/sdapi/v1/txt2img", json=TXT2IMG, headers={"Origin": "https://app.example.evil"}).status_code == 403
        assert http.get("/sdapi/v1/sd-models", headers={"Host": f"studio.lan:{port_of(url)}", **key}).status_code == 200
        assert http.get("/sdapi/v1/sd-models", headers={"Host": "other.lan", **key}).status_code == 403
        assert http.get("/sdapi/v1/sd-models", headers={"Origin": "https://app.example"}).status_code == 401


def test_any_host_when_the_operator_says_so(pack):
    with running_server(new_engine(pack), allowed_hosts=("*",)) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/sdapi/v1/sd-models", headers={"Host": "anything.example"}).status_code == 200
        assert http.get("/sdapi/v1/sd-models", headers={"Origin": "https://evil.example"}).status_code == 403


def test_testclient_is_served_as_its_own_host(pack):
    """Starlette's TestClient sends Host "testserver" and gives the app that server name: the address it was
    reached at, as a real server's socket address is."""
    from starlette.testclient import TestClient

    from imprompt.server.app import ServerSettings, create_app

    with TestClient(create_app(new_engine(pack), ServerSettings())) as http:
        assert http.get("/sdapi/v1/sd-models").status_code == 200
        assert http.get("/sdapi/v1/sd-models", headers={"Host": "evil.example"}).status_code == 403


def test_serve_flags(pack):
    """`imprompt serve --allowed-hosts ... --cors-allow-origins ...` (comma-separated, as A1111's flags)."""
    port = free_port()
    command = [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--port", str(port), "--no-preload",
               "--allowed-hosts", "studio.lan,render.lan", "--cors-allow-origins", "https://app.example,https://b.example"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as http:
            for host, status in (("render.lan", 200), (f"studio.lan:{port}", 200), ("evil.example", 403)):
                assert http.get("/sdapi/v1/sd-models", headers={"Host": host}).status_code == status, host
            for origin, status in (("https://b.example", 200), ("https://c.example", 403)):
                response = http.get("/sdapi/v1/sd-models", headers={"Origin": origin})
                assert response.status_code == status, origin
            assert response.json()["error"] == "CrossSiteError"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_refuses_a_regex_that_does_not_compile(pack):
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--no-preload",
                           "--port", str(free_port()), "--cors-allow-origins-regex", "https://("],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--cors-allow-origins-regex" in done.stderr, done.stderr[-2000:]
    assert "not a regular expression" in done.stderr
