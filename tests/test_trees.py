"""Whole A1111 and ComfyUI model trees: every file listed as what its tensors say, pickles read only when needed,
a rescan of an unchanged tree reading no file, and the A1111 endpoints that list and rescan them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from model_trees import EXPECTED, build_trees, kohya_lora
from safetensors.torch import save_file
from server_fixtures import client, new_engine, running_server

from imprompt.models.store import PICKLE_SUFFIXES, ModelStore


@pytest.fixture(scope="module")
def trees(tmp_path_factory, pack):
    return build_trees(tmp_path_factory.mktemp("trees"), pack)


def listed(*roots) -> dict[str, dict]:
    """`imprompt models --json` over `roots`: every file it lists, by path, with what it says of it."""
    command = [sys.executable, "-m", "imprompt.cli", "models", "--json"]
    for root in roots:
        command += ["--models", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    listing = json.loads(done.stdout)
    entries = {}
    for kind, items in (("pipeline", listing["models"]), ("ip-adapter", listing["adapters"]),
                        ("image-encoder", listing["encoders"]), ("controlnet", listing["controlnets"]),
                        *listing["other"].items()):  # fmt: skip
        for item in items:
            entries[item["path"]] = {"kind": kind, **item}
    for item in listing["unreadable"]:
        entries[item["path"]] = {"kind": "unreadable", **item}
    return entries


@pytest.mark.parametrize("tree", ["a1111", "a1111-embeddings", "comfyui"])
def test_every_file_of_a_tree_is_listed_as_what_its_tensors_say(trees, tree):
    entries = listed(trees[tree])
    for relative, (kind, words) in EXPECTED[tree].items():
        entry = entries.pop(str(trees[tree] / relative))
        assert entry["kind"] == kind, (relative, entry)
        assert words in json.dumps(entry), (relative, words, entry)
    assert entries == {}  # nothing listed that the tree does not hold


def test_the_cli_says_what_each_file_is(trees):
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "models", "--models", str(trees["a1111"])],
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    for line in ("LoRAs:", "SDXL     kohya, rank 4, text_encoder+text_encoder_2+unet", "VAEs:", "Upscalers:",
                 "ESRGAN (RRDBNet)", "ControlNets:", "Face restorers:", "Unreadable files:"):  # fmt: skip
        assert line in done.stdout, (line, done.stdout)


def test_a_scan_leaves_pickles_unread_and_a_rescan_reads_no_file(trees, tmp_path, monkeypatch):
    """Starting a server on a tree of multi-GB pickles must not unpickle them: a scan reads safetensors headers
    only; a pickle is read when first needed (here: a listing). What was read is kept on disk, so the next scan of
    the unchanged tree, in another process too, reads no file at all."""
    monkeypatch.setenv("IMPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    root = trees["a1111"]
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", *PICKLE_SUFFIXES)]
    pickles = {p for p in files if p.suffix in PICKLE_SUFFIXES}
    store = ModelStore(root)
    assert {e.path for e in store.of_kind("unread")} == pickles
    assert store.probes == len(files) - len(pickles)  # every safetensors header, no pickle
    store.read_all()
    assert store.of_kind("unread") == [] and store.probes == len(files)
    again = ModelStore(root)
    again.read_all()
    assert again.probes == 1  # the broken file: what failed is read again, in case it was repaired
    assert {e.path: e.kind for e in again.entries} == {e.path: e.kind for e in store.entries}


def test_a_model_added_to_the_folder_is_listed_after_a_rescan(trees, tmp_path):
    models = shutil.copytree(trees["comfyui"], tmp_path / "models")
    with running_server(new_engine(models)) as url, client(url) as http:
        before = {lora["name"] for lora in http.get("/sdapi/v1/loras").json()}
        save_file(kohya_lora(768, {"lora_te_": 768}), models / "loras" / "new-detail.safetensors")
        shutil.copy(models / "checkpoints" / "tiny-comfy.safetensors", models / "checkpoints" / "tiny-copy.safetensors")
        assert http.post("/sdapi/v1/refresh-checkpoints").json() is None  # A1111 answers null
        after = http.get("/sdapi/v1/loras").json()
        assert {lora["name"] for lora in after} == before | {"new-detail"}
        assert [lora["family"] for lora in after if lora["name"] == "new-detail"] == ["SD 1.5"]
        assert "tiny-copy" in [m["model_name"] for m in http.get("/sdapi/v1/sd-models").json()]
        counts = http.post("/v1/models/refresh").json()
        assert counts["lora"] == 2 and counts["pipeline"] == 2


def test_the_a1111_listing_endpoints(trees):
    with running_server(new_engine([trees["a1111"], trees["a1111-embeddings"]])) as url, client(url) as http:
        loras = http.get("/sdapi/v1/loras").json()
        assert sorted(lora["name"] for lora in loras) == ["detail-sd15", "texture-loha"]  # what fits SD 1.5
        assert all(set(lora) >= {"name", "alias", "path", "metadata"} for lora in loras)
        assert sorted(v["model_name"] for v in http.get("/sdapi/v1/sd-vae").json()) == ["tiny-vae.safetensors",
                                                                                         "tiny-vae.vae.pt"]  # fmt: skip
        embeddings = http.get("/sdapi/v1/embeddings").json()  # the current model is SD 1.5
        assert embeddings["loaded"]["bad-hands"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                     "shape": 768, "vectors": 2}  # fmt: skip
        assert list(embeddings["skipped"]) == ["painterly-sdxl"]
        assert [m["model_name"] for m in http.get("/sdapi/v1/sd-models").json()] == ["tiny-sd15-single"]
