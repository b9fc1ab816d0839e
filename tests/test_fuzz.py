"""Fuzzed checkpoints: whatever the bytes, probe and loader answer with a spec or one of imprompt's typed errors,
quickly, and without allocating what a header declares."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imprompt.errors import ImpromptError
from imprompt.loading.tensors import read_tensors
from imprompt.models.probe import probe

# CI runs 60 examples per test; IMPROMPT_FUZZ_EXAMPLES=2000 for a long run (docs/security.md has its figures).
FUZZ = settings(
    max_examples=int(os.environ.get("IMPROMPT_FUZZ_EXAMPLES", 60)),
    deadline=2000,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "float32", None, 7]
NAMES = st.sampled_from(["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight",
                         "image_proj.latents", "vision_model.embeddings.class_embedding",
                         "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "x"])  # fmt: skip
SHAPES = st.one_of(
    st.lists(st.integers(0, 16), max_size=4),
    st.lists(st.sampled_from([2**31, 2**40, 2**62, -1, 0]), min_size=1, max_size=3),  # huge and negative
    st.just("not a list"),
)


def safetensors_bytes(header: dict | str, data: bytes, declared_length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", declared_length if declared_length is not None else len(raw)) + raw + data


@st.composite
def tensor_entries(draw):
    entries, offset = {}, 0
    for _ in range(draw(st.integers(0, 5))):
        shape = draw(SHAPES)
        size = draw(st.one_of(st.integers(0, 64), st.sampled_from([2**40, -8])))
        begin = draw(st.one_of(st.just(offset), st.integers(-4, 200)))
        entries[draw(NAMES)] = {"dtype": draw(st.sampled_from(DTYPES)), "shape": shape, "data_offsets": [begin, begin + size]}
        offset = max(offset, begin + size) if isinstance(size, int) else offset
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.just({"format": "pt"}), st.just({"n": 3}), st.just([1])))
    return entries


def checked(path, *functions):
    """Each function either succeeds or raises an ImpromptError; anything else fails the test."""
    for function in functions:
        try:
            function(path)
        except ImpromptError:
            pass


@FUZZ
@given(entries=tensor_entries(), data=st.binary(max_size=256), declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_corrupt_safetensors_headers(tmp_path_factory, entries, data, declared):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(safetensors_bytes(entries, data, declared))
    before = reset_peak_memory()
    checked(path, probe, read_tensors)
    assert peak_memory() - before < 256 * 2**20  # a declared 2**40-element tensor was never allocated


def reset_peak_memory() -> int:
    """Reset the process's high-water mark of resident memory (Linux: `5` into /proc/self/clear_refs), so that
    what an earlier test used cannot hide what this one does; returns the resident memory now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_memory()


def peak_memory() -> int:
    """VmHWM: the most resident memory since the last reset, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_the_peak_memory_reading_sees_an_allocation():
    """The reading above can fail: it sees 512 MiB touched after its reset."""
    before = reset_peak_memory()
    block = bytearray(512 * 2**20)
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    assert peak_memory() - before > 400 * 2**20
    del block


@FUZZ
@given(text=st.sampled_from([
    "{", "[]", "null", '"x"', '{"a": 1}', '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
    '"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',  # duplicate keys
    "{" * 5000 + "}" * 5000,  # deep nesting
    '{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\x00\xff',
]), tail=st.binary(max_size=16))  # fmt: skip
def test_malformed_header_json(tmp_path_factory, text, tail):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(safetensors_bytes(text, b"\x00" * 8 + tail))
    checked(path, probe, read_tensors)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".safetensors", ".bin", ".pt", ".ckpt"]))
def test_random_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"x{suffix}"
    path.write_bytes(data)
    checked(path, probe, read_tensors)


def _real_adapter_bytes(pack) -> bytes:
    return (pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors").read_bytes()


@FUZZ
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_truncated_and_bit_flipped_real_files(pack, tmp_path_factory, cut, flips):
    data = bytearray(_real_adapter_bytes(pack)[: max(0, int(cut * 600_000))])
    for where, value in flips:
        if data:
            data[int(where * (len(data) - 1))] = value
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(bytes(data))
    checked(path, probe, read_tensors)


class _Global:
    """Pickles a reference to an arbitrary callable: exactly what weights_only refuses."""

    def __init__(self, target, args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


@FUZZ
@given(target=st.sampled_from([print, eval, exec, getattr, zipfile.ZipFile, io.BytesIO, dict.fromkeys]),
       wrap=st.sampled_from(["plain", "nested", "torch"]))  # fmt: skip
def test_pickles_with_unexpected_globals(tmp_path_factory, target, wrap):
    payload = _Global(target, ("1+1",) if target in (eval, exec) else ())
    obj = {"image_proj": {"proj.weight": payload}} if wrap == "nested" else payload
    path = tmp_path_factory.mktemp("fuzz") / "x.bin"
    if wrap == "torch":
        torch.save({"ip_adapter": {"1.to_k_ip.weight": obj}}, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    for function in (probe, read_tensors):
        try:
            function(path)
            raise AssertionError("a pickle with a global was accepted")
        except ImpromptError as exc:
            assert "refused" in str(exc) or "cannot read" in str(exc) or "corrupt" in str(exc)
