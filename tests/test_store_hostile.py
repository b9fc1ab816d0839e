"""ModelStore against what real models folders hold: symlinks between A1111's and ComfyUI's trees (loops
included), typo storms against a large tree, and several stores or processes sharing the probe cache on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imprompt.errors import UnknownAdapterError
from imprompt.models import store as store_module
from imprompt.models.probe_cache import cache_file
from imprompt.models.store import ModelStore


def adapter_file(pack, stem="ip-adapter_sd15"):
    return pack / "IP-Adapter" / "models" / f"{stem}.safetensors"


def list_with_the_cli(*roots, timeout=120) -> dict:
    """`imprompt models --json` in its own process, so a scan that never ends fails the test instead of hanging it."""
    arguments = [a for root in roots for a in ("--models", str(root))]
    try:
        done = subprocess.run([sys.executable, "-m", "imprompt.cli", "models", *arguments, "--json"],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"listing {roots} did not finish in {timeout} s: the scan follows a symlink loop")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------------------------ symlinks


def test_two_links_to_their_own_folder_do_not_hang_the_scan(pack, tmp_path):
    """`a -> .` and `b -> .` make 2**40 paths before the OS gives up: each real folder is visited once."""
    root = tmp_path / "models"
    (root / "ipadapter").mkdir(parents=True)
    shutil.copy(adapter_file(pack), root / "ipadapter" / "mine.safetensors")
    (root / "ipadapter" / "a").symlink_to(".")
    (root / "ipadapter" / "b").symlink_to(".")
    model = root / "diffusers" / "looped"  # a pipeline folder whose fingerprint walk meets a loop too
    shutil.copytree(pack / "diffusers" / "tiny-sd15", model)
    (model / "unet" / "up").symlink_to("..")
    (model / "unet" / "again").symlink_to("..")
    listing = list_with_the_cli(root)
    assert [a["name"] for a in listing["adapters"]] == ["mine"]
    assert [m["name"] for m in listing["models"]] == ["looped"]

    files = sorted(Path(folder, name).relative_to(model).as_posix() for folder, _, names in os.walk(model)
                   for name in names if Path(folder, name).is_file())  # fmt: skip
    fingerprint = ModelStore(root).pipeline("looped").fingerprint
    assert sorted(item[0] for item in fingerprint) == files  # each file of the pipeline once


def test_a_folder_linked_into_itself_lists_its_files_once(pack, tmp_path):
    root = tmp_path / "models"
    (root / "ipadapter").mkdir(parents=True)
    shutil.copy(adapter_file(pack), root / "ipadapter" / "mine.safetensors")
    (root / "ipadapter" / "loop").symlink_to(".")
    store = ModelStore(root)
    assert [(e.name, e.path) for e in store.entries] == [("mine", root / "ipadapter" / "mine.safetensors")]


def test_a1111_and_comfyui_trees_linked_together_list_each_file_once(pack, tmp_path):
    """The usual setup: ComfyUI's `ipadapter/` is a link to A1111's folder (or the other way round), and one
    file is linked on its own. Each file is listed once, at its real path; a link under another name is an alias
    the user made, listed under that name."""
    a1111, comfy = tmp_path / "webui" / "models", tmp_path / "ComfyUI" / "models"
    (a1111 / "ipadapter").mkdir(parents=True)
    shutil.copy(adapter_file(pack), a1111 / "ipadapter" / "style.safetensors")
    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), a1111 / "plus.safetensors")
    comfy.mkdir(parents=True)
    (comfy / "ipadapter").symlink_to(a1111 / "ipadapter")  # listed before the real folder in walk order
    (comfy / "plus.safetensors").symlink_to(a1111 / "plus.safetensors")
    (comfy / "my-plus.safetensors").symlink_to(a1111 / "plus.safetensors")
    (a1111 / "back").symlink_to(comfy)  # and a loop between the two trees

    store = ModelStore([comfy, a1111])
    assert sorted((e.name, str(e.path)) for e in store.entries) == [
        ("my-plus", str(comfy / "my-plus.safetensors")),
        ("plus", str(a1111 / "plus.safetensors")),
        ("style", str(a1111 / "ipadapter" / "style.safetensors")),
    ]
    assert store.adapter("style").path == a1111 / "ipadapter" / "style.safetensors"
    assert store.adapter("my-plus").spec.variant == "plus"


# ------------------------------------------------------------------------------------------ rescans on a miss


def test_a_burst_of_unknown_names_rescans_at_most_once_per_interval(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack), root / "first.safetensors")
    store = ModelStore(root, rescan_interval=3600)
    scans = store.scans
    for typo in range(20):
        with pytest.raises(UnknownAdapterError):
            store.adapter(f"typo-{typo}")
    assert store.scans - scans <= 1

    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), root / "added.safetensors")
    store.refresh()  # an explicit refresh always walks the folders
    assert store.scans - scans <= 2 and store.adapter("added").spec.variant == "plus"
    store.rescan_interval = 0  # the interval is over: a miss walks again and finds what was added meanwhile
    shutil.copy(adapter_file(pack, "ip-adapter_sd15_vit-G"), root / "later.safetensors")
    before = store.scans
    assert store.adapter("later").spec.embed_dim == 1280
    assert store.scans == before + 1


def test_the_default_interval_keeps_a_typo_storm_to_one_scan(pack, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack), root / "first.safetensors")
    store = ModelStore(root)
    assert store.rescan_interval > 0
    scans = store.scans
    for typo in range(20):
        with pytest.raises(UnknownAdapterError):
            store.adapter(f"typo-{typo}")
    assert store.scans - scans <= 1


def test_lookups_do_not_wait_for_a_slow_scan(pack, tmp_path, monkeypatch):
    """A scan that takes long (a new multi-GB tree, a slow network drive) holds no lock that lookups need: a known
    name is served and an unknown one is refused meanwhile, then the scan's index takes over."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copy(adapter_file(pack), root / "first.safetensors")
    store = ModelStore(root)
    store.rescan_interval = 0  # every miss would like to scan: it must not wait for the one under way
    entered, release = threading.Event(), threading.Event()
    probe = store_module.probe

    def slow_probe(path):
        if path.name == "slow.safetensors":
            entered.set()
            release.wait(120)
        return probe(path)

    monkeypatch.setattr(store_module, "probe", slow_probe)
    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), root / "slow.safetensors")
    scan = threading.Thread(target=store.refresh)
    scan.start()
    outcome = {}

    def look_up():
        outcome["known"] = store.adapter("first").name
        try:
            store.adapter("typo")
        except UnknownAdapterError as exc:
            outcome["unknown"] = exc

    try:
        assert entered.wait(60), "the scan never reached the new file"
        lookup = threading.Thread(target=look_up)
        lookup.start()
        lookup.join(30)
        assert not lookup.is_alive(), "a lookup waited for the scan under way"
        assert outcome["known"] == "first" and isinstance(outcome["unknown"], UnknownAdapterError)
    finally:
        release.set()
        scan.join(120)
    assert store.adapter("slow").spec.variant == "plus"


# ------------------------------------------------------------------------------------------- the probe cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("IMPROMPT_CACHE_DIR", str(folder))
    return folder


def test_two_stores_keep_each_others_probes(pack, tmp_path, cache_dir):
    """Two stores (two servers, or a server and the CLI) over different folders: each one's save keeps what the
    other learnt, so a later process reads neither tree's files again."""
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        shutil.copy(adapter_file(pack), root / "a.safetensors")
    first, second = ModelStore(one), ModelStore(two)
    shutil.copy(adapter_file(pack, "ip-adapter-plus_sd15"), one / "b.safetensors")
    first.refresh()  # rewrites the cache file, which `first` read before `second` wrote to it
    second.refresh()
    assert ModelStore([one, two]).probes == 0


def test_stores_saving_at_once_in_threads_lose_nothing(pack, tmp_path, cache_dir, caplog):
    files = []
    for n in range(40):
        files.append(tmp_path / "files" / f"{n}.safetensors")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_bytes(b"weights %d" % n)
    stores = [ModelStore(pack / "images"), ModelStore(pack / "images")]
    threads = [threading.Thread(target=lambda s=s, part=files[i::2]: [s.a1111_hash(f) for f in part])
               for i, s in enumerate(stores)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "could not keep probe results" not in caplog.text
    assert set(json.loads(cache_file().read_text())["sha256"]) >= {str(f) for f in files}


WRITER = """
import sys, time
from pathlib import Path
from imprompt.models.store import ModelStore
root, go = Path(sys.argv[1]), Path(sys.argv[2])
store = ModelStore(root)
(root / "ready").write_text("")
while not go.exists():
    time.sleep(0.01)
for path in sorted(root.glob("*.safetensors")):
    store.a1111_hash(path)
"""


def test_two_processes_writing_the_probe_cache_lose_nothing(tmp_path, cache_dir):
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        root.mkdir()
        for n in range(40):
            (root / f"{n}.safetensors").write_bytes(b"%s %d" % (root.name.encode(), n))
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(go)], env=os.environ.copy())
               for root in roots]  # fmt: skip
    try:
        for root in roots:
            for _ in range(12000):
                if (root / "ready").exists() or any(w.poll() is not None for w in writers):
                    break
                time.sleep(0.01)
        go.write_text("")
        assert [w.wait(120) for w in writers] == [0, 0]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    saved = set(json.loads(cache_file().read_text())["sha256"])
    assert saved >= {str(p) for root in roots for p in root.glob("*.safetensors")}
    assert not [p.name for p in Path(cache_dir).iterdir() if p.name.endswith(".partial")]
