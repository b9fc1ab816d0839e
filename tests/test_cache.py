"""Caches: ByteLRU and parse_bytes on their own, then the engine's encoder / embedding / adapter caches, whose
contents must never change what a request produces."""

from __future__ import annotations

import shutil

import pytest
from conftest import max_diff, request, unit
from hypothesis import given, settings
from hypothesis import strategies as st

from imprompt.demo.tiny_models import TINY_VIT_H, build_clip_vision, draw_reference, write_adapter
from imprompt.models.probe import probe
from imprompt.util.cache import ByteLRU, parse_bytes

# ------------------------------------------------------------------------------------------------------ ByteLRU


def test_evicts_least_recently_used():
    lru = ByteLRU("t", 10)
    assert lru.put("a", "A", 4) == []
    assert lru.put("b", "B", 4) == []
    assert lru.get("a") == "A"  # a is now the most recently used
    evicted = lru.put("c", "C", 4)
    assert [(e.key, e.label, e.nbytes) for e in evicted] == [("b", "b", 4)]
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.used_bytes == 8
    assert lru.get("b") is None


def test_evicts_as_many_as_needed_oldest_first():
    lru = ByteLRU("t", 10)
    for key in "abcde":
        lru.put(key, key.upper(), 2)
    evicted = lru.put("big", "BIG", 7)
    assert [e.key for e in evicted] == ["a", "b", "c", "d"]
    assert [e["label"] for e in lru.stats()["entries"]] == ["e", "big"]
    assert lru.evictions == 4


def test_item_bigger_than_budget_is_kept_alone():
    lru = ByteLRU("t", 10)
    lru.put("a", 1, 3)
    lru.put("b", 2, 3)
    evicted = lru.put("huge", 3, 100, label="the huge one")
    assert sorted(e.key for e in evicted) == ["a", "b"]
    assert lru.get("huge") == 3
    assert lru.used_bytes == 100  # over budget, but the one item that was asked for stays
    evicted = lru.put("small", 4, 1)
    assert [(e.key, e.label) for e in evicted] == [("huge", "the huge one")]
    assert lru.get("small") == 4


def test_budget_zero_keeps_the_last_item():
    lru = ByteLRU("t", 0)
    lru.put("a", 1, 1)
    assert lru.get("a") == 1
    lru.put("b", 2, 1)
    assert lru.get("a") is None and lru.get("b") == 2


def test_counters_and_stats():
    lru = ByteLRU("named", 100)
    assert lru.get("x") is None
    lru.put("x", "X", 10, label="ex")
    assert lru.get("x") == "X"
    assert lru.get("x") == "X"
    assert lru.get("y") is None
    assert "x" in lru  # membership is not a lookup: no counter moves
    stats = lru.stats()
    assert stats == {
        "name": "named",
        "budget_bytes": 100,
        "used_bytes": 10,
        "entries": [{"label": "ex", "bytes": 10}],
        "hits": 2,
        "misses": 2,
        "evictions": 0,
    }


def test_put_replaces_the_same_key():
    lru = ByteLRU("t", 10)
    lru.put("a", "old", 6)
    lru.put("b", "B", 2)
    assert lru.put("a", "new", 7) == []  # replaced, not counted twice: 7 + 2 <= 10
    assert lru.get("a") == "new"
    assert lru.used_bytes == 9
    assert [e["label"] for e in lru.stats()["entries"]] == ["b", "a"]


def test_discard_where_and_clear():
    lru = ByteLRU("t", 100)
    for path in ("/m/a", "/m/b"):
        for version in (1, 2):
            lru.put((path, version), f"{path}@{version}", 5)
    dropped = lru.discard_where(lambda k: k[0] == "/m/a" and k[1] != 2)
    assert [(d.key, d.nbytes) for d in dropped] == [(("/m/a", 1), 5)]
    assert ("/m/a", 1) not in lru and ("/m/a", 2) in lru
    assert lru.evictions == 0  # dropping stale items is not an eviction
    assert lru.discard_where(lambda k: False) == []
    lru.discard(("/m/b", 1))
    lru.discard("absent")
    assert lru.used_bytes == 10
    assert lru.clear() == 2
    assert lru.used_bytes == 0 and lru.get(("/m/a", 2)) is None


@settings(max_examples=200, deadline=None, database=None)
@given(
    budget=st.integers(0, 20),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.sampled_from("abcdef"), st.integers(0, 12)),
            st.tuples(st.just("get"), st.sampled_from("abcdefg"), st.just(0)),
        ),
        max_size=40,
    ),
)
def test_matches_a_reference_model(budget, ops):
    """Against a plain list kept in recency order: same contents, same order, same counters."""
    lru = ByteLRU("t", budget)
    model: list[tuple[str, int]] = []  # least recently used first
    hits = misses = evictions = 0
    for op, key, nbytes in ops:
        if op == "put":
            model = [(k, n) for k, n in model if k != key] + [(key, nbytes)]
            expected = []
            while sum(n for _, n in model) > budget and len(model) > 1:
                expected.append(model.pop(0)[0])
            evictions += len(expected)
            assert [e.key for e in lru.put(key, key, nbytes)] == expected
        else:
            found = [k for k, _ in model if k == key]
            if found:
                hits += 1
                model = [(k, n) for k, n in model if k != key] + [(k, n) for k, n in model if k == key]
                assert lru.get(key) == key
            else:
                misses += 1
                assert lru.get(key) is None
        assert lru.used_bytes == sum(n for _, n in model)
        assert len(model) <= 1 or lru.used_bytes <= budget
    stats = lru.stats()
    assert [e["label"] for e in stats["entries"]] == [k for k, _ in model]
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (hits, misses, evictions)


# -------------------------------------------------------------------------------------------------- parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * 2**30),
        ("8gib", 8 * 2**30),
        ("8 GiB", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("1.5G", int(1.5 * 2**30)),
        ("2g", 2 * 2**30),
        ("100M", 100 * 2**20),
        ("4k", 4096),
        ("4KB", 4000),
        ("3KiB", 3072),
        ("1TiB", 2**40),
        ("1073741824", 1073741824),
        ("100B", 100),
        ("0", 0),
        (" 16GiB ", 16 * 2**30),
        (1234, 1234),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text, default=-1) == expected


@pytest.mark.parametrize("empty", [None, ""])
def test_parse_bytes_default(empty):
    assert parse_bytes(empty, default=77) == 77


@pytest.mark.parametrize("text", ["lots", "8XB", "GiB", "-1GiB", "-5", "1.2.3M"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_bytes(text, default=0)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [-5, "inf"])
def test_parse_bytes_rejects_negative_ints_and_infinity(value):
    with pytest.raises(ValueError):
        parse_bytes(value, default=0)


# ------------------------------------------------------------------------------------------------- the engine


def shape_image(i: int):
    """A different reference picture for every `i`, so that no embedding can come from the cache."""
    shapes = ("circle", "square", "triangle", "star")
    color = (30 + 37 * i % 200, 200 - 23 * i % 180, 60 + 51 * i % 190)
    background = (250 - 29 * i % 220, 20 + 17 * i % 200, 120 + 13 * i % 120)
    return draw_reference(shapes[i % 4], color, background)


def test_small_encoder_budget_evicts_and_changes_nothing(pack):
    """With a budget too small for both encoders, alternating Base (ViT-H-like) and Base ViT-G (bigG-like)
    evicts one encoder for the other every time, and every picture equals a roomy engine's picture."""
    from imprompt import Engine

    small = Engine(pack, cache_budget=1)
    roomy = Engine(pack, cache_budget="64GiB")
    adapters = ["Base", "Base ViT-G", "Base", "Base ViT-G"]
    for i, name in enumerate(adapters):
        req = request(unit(name, shape_image(100 + i)), seed=10 + i)
        got = small.generate(req)
        info = got.info["ip_adapters"][0]
        assert info["embeddings"] == ["encoded"]
        assert info["encoder_source"] == "loaded"
        events = [e["event"] for e in got.info["events"]]
        assert "encoder_loaded" in events
        if i > 0:
            evicted = [e for e in got.info["events"] if e["event"] == "encoder_evicted"]
            assert [e["encoder"] for e in evicted] == [
                "IP-Adapter/models/image_encoder" if name == "Base ViT-G" else "IP-Adapter/sdxl_models/image_encoder"
            ]
        assert len(small.cache_info()["encoders"]["entries"]) == 1
        assert max_diff(got.images[0], roomy.generate(req).images[0]) == 0
    assert small.cache_info()["encoders"]["evictions"] == len(adapters) - 1
    assert roomy.cache_info()["encoders"]["evictions"] == 0
    assert len(roomy.cache_info()["encoders"]["entries"]) == 2


def test_roomy_budget_reuses_encoders(engine):
    engine.generate(request(unit("Base", shape_image(200))))
    again = engine.generate(request(unit("Light", shape_image(201))))  # Light needs the same encoder as Base
    info = again.info["ip_adapters"][0]
    assert info["encoder_source"] == "cache"
    assert info["embeddings"] == ["encoded"]
    assert "encoder_reused" in [e["event"] for e in again.info["events"]]


@pytest.mark.parametrize("adapter", ["Base", "Plus"])
def test_embedding_cache(engine, adapter):
    """The same picture twice: the second time no encoder is needed, and the picture is the same."""
    image = shape_image(300 + len(adapter))  # a picture no other test uses
    first = engine.generate(request(unit(adapter, image), seed=5))
    assert first.info["ip_adapters"][0]["embeddings"] == ["encoded"]
    second = engine.generate(request(unit(adapter, image.copy()), seed=5))
    info = second.info["ip_adapters"][0]
    assert info["embeddings"] == ["cache"]
    assert info["encoder_source"] == "not needed"
    assert not [e for e in second.info["events"] if e["event"].startswith("encoder_")]
    assert max_diff(first.images[0], second.images[0]) == 0


def test_same_picture_as_file_and_as_image_share_an_embedding(engine, pack, yellow_square):
    engine.generate(request(unit("Light", yellow_square)))
    again = engine.generate(request(unit("Light", str(pack / "images" / "yellow-square.png"))))
    assert again.info["ip_adapters"][0]["embeddings"] == ["cache"]


def test_two_images_one_cached(engine):
    known, new = shape_image(400), shape_image(401)
    engine.generate(request(unit("Base", known)))
    result = engine.generate(request({"adapter": "Base", "images": [known, new], "scale": 0.5}))
    assert result.info["ip_adapters"][0]["embeddings"] == ["cache", "encoded"]


def test_changed_adapter_file_is_not_served_from_cache(pack, adapters_copy, red_circle):
    from imprompt import Engine

    models = [pack / "diffusers", adapters_copy]
    req = request(unit("Base", red_circle))
    engine = Engine(models)
    old = engine.generate(req).images[0]
    widths = list(probe(adapters_copy / "models" / "ip-adapter_sd15.safetensors").layer_widths)
    write_adapter(adapters_copy / "models" / "ip-adapter_sd15.safetensors", "base", 1024, widths, 768, seed=1234)
    new = engine.generate(req)
    assert "adapter_loaded" in [e["event"] for e in new.info["events"]]
    assert max_diff(new.images[0], Engine(models).generate(req).images[0]) == 0
    assert max_diff(new.images[0], old) > 0


def _reseed_encoder(adapters_copy, tmp_path):
    """Overwrite the ViT-H-like folder's weights with a re-seeded encoder of the same shape."""
    build_clip_vision(tmp_path / "reseeded", seed=4321, **TINY_VIT_H)
    target = adapters_copy / "models" / "image_encoder" / "model.safetensors"
    size = target.stat().st_size
    shutil.copyfile(tmp_path / "reseeded" / "model.safetensors", target)
    assert target.stat().st_size == size  # same shapes, other weights


@pytest.mark.parametrize("same_image", [True, False], ids=["same-image", "new-image"])
def test_changed_encoder_file_is_not_served_from_cache(pack, adapters_copy, tmp_path, red_circle, same_image):
    from imprompt import Engine

    models = [pack / "diffusers", adapters_copy]
    engine = Engine(models)
    old = engine.generate(request(unit("Base", red_circle)))
    _reseed_encoder(adapters_copy, tmp_path)
    req = request(unit("Base", red_circle if same_image else shape_image(500)))
    new = engine.generate(req)
    assert max_diff(new.images[0], Engine(models).generate(req).images[0]) == 0
    if same_image:
        assert max_diff(new.images[0], old.images[0]) > 0
        assert new.info["ip_adapters"][0]["embeddings"] == ["encoded"]


def test_changed_encoder_file_after_a_rescan(pack, adapters_copy, tmp_path, red_circle):
    """Once the store has scanned again, the new encoder weights are used: the old embedding is not served."""
    from imprompt import Engine

    models = [pack / "diffusers", adapters_copy]
    engine = Engine(models)
    old = engine.generate(request(unit("Base", red_circle))).images[0]
    _reseed_encoder(adapters_copy, tmp_path)
    engine.store.refresh()
    new = engine.generate(request(unit("Base", red_circle)))
    assert new.info["ip_adapters"][0]["embeddings"] == ["encoded"]
    assert max_diff(new.images[0], Engine(models).generate(request(unit("Base", red_circle))).images[0]) == 0
    assert max_diff(new.images[0], old) > 0
    assert engine.cache_info()["encoders"]["used_bytes"] > 0
    assert len(engine.cache_info()["encoders"]["entries"]) == 1  # the old version does not hold the budget


def test_clear_cache_changes_nothing(pack, red_circle):
    from imprompt import Engine

    engine = Engine(pack)
    req = request(unit("Plus Face", red_circle), unit("Base ViT-G", red_circle, scale=0.4))
    before = engine.generate(req).images[0]
    cleared = engine.clear_cache()
    # Plus Face's embeddings are its image's hidden states and those of the all-zero image (its negative).
    cleared.pop("annotator_models")  # the preprocessors' models are the process's: other tests' are counted too
    assert cleared == {"encoders": 2, "embeddings": 3, "adapters": 2, "loras": 0, "vaes": 0, "controlnets": 0,
                       "detections": 0, "faces": 0}
    after = engine.generate(req)
    assert max_diff(before, after.images[0]) == 0
    assert [u["embeddings"] for u in after.info["ip_adapters"]] == [["encoded"], ["encoded"]]


def test_an_evicted_adapter_is_freed(pack, red_circle):
    """The adapter cache is a real bound: once evicted, nothing (processor shells on the UNet, kept shell sets)
    holds an adapter any more, so its memory is returned."""
    import gc
    import weakref

    from imprompt import Engine

    engine = Engine(pack, adapter_cache_budget=1)  # room for one built adapter: each new one evicts the last
    engine.generate(request(unit("Base", red_circle)))
    gone = weakref.ref(engine.state.adapters.get(engine.store.adapter("Base").key(engine.dtype, engine.device)))
    assert gone() is not None
    result = engine.generate(request(unit("Plus", red_circle)))
    assert [e["adapter"] for e in result.info["events"] if e["event"] == "adapter_evicted"] == ["ip-adapter_sd15"]
    gc.collect()
    assert gone() is None
    engine.generate(request(unit("Base", red_circle)))  # and it is built again when asked for


def test_every_cache_budget_can_be_set_on_the_command_line(pack, red_circle, tmp_path):
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "imprompt.cli", "generate", "--models", str(pack), "--model", "tiny-sd15",
               "--steps", "1", "--width", "64", "--height", "64", "--ip", f"Base:{tmp_path / 'red.png'}",
               "--ip", f"Base ViT-G:{tmp_path / 'red.png'}", "--out", str(tmp_path / "out.png"), "--json",
               "--cache-budget", "1", "--adapter-budget", "1", "--embedding-budget", "1"]  # fmt: skip
    red_circle.save(tmp_path / "red.png")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [e["event"] for e in json.loads(done.stdout)["events"]]
    assert "adapter_evicted" in events and "encoder_evicted" in events


def test_budgets_follow_the_device(monkeypatch):
    """On a GPU the budgets are shares of the GPU's own memory (torch.cuda.mem_get_info), not of the RAM."""
    import torch

    from imprompt.util import devices

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 24 * 2**30))
    shares = devices.SHARES["cuda"]
    assert devices.default_budget("encoders", gpu) == int(shares["encoders"] * 24 * 2**30)
    assert devices.default_budget("adapters", gpu) == int(shares["adapters"] * 24 * 2**30)
    assert devices.default_budget("embeddings", gpu) == int(shares["embeddings"] * 24 * 2**30)  # under its cap
    ram = devices.device_memory(torch.device("cpu"))
    assert devices.default_budget("encoders", torch.device("cpu")) == int(ram * devices.SHARES["cpu"]["encoders"])
