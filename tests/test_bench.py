"""Smoke test of the benchmark harness at tiny size: it runs end to end as `make bench` runs it and writes its report.
It asserts that numbers were produced, never how large they are (benchmarks are not tests)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench_cache(pack, tmp_path) -> Path:
    """The tools' model cache with its tiny models already there: at tiny size `build_models` builds the demo pack,
    which the session has built (a copy: the tools read it as theirs)."""
    cache = tmp_path / "cache"
    shutil.copytree(pack, cache / "tiny")
    (cache / "tiny" / "done.json").write_text(json.dumps({"size": "tiny"}))  # build_models' mark of a finished build
    return cache


def bench(cache, out, phases, *extra):
    command = [sys.executable, "-m", "tools.bench", "--size", "tiny", "--trials", "1", "--cache",
               str(cache), "--out", str(out), "--phases", phases, "--workload-size", "64",
               "--workload-steps", "2", "--workload-requests", "3", "--device", "cpu", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())["results"]


def test_bench_runs_at_tiny_size(bench_cache, tmp_path):
    out = tmp_path / "bench.md"
    phases = "switch_imprompt,switch_expert,switch_sdnext,embeddings,workload_expert,workload_small_budget"
    report, raw = bench(bench_cache, out, phases, "--rounds", "2")
    for heading in ("# Benchmarks", "## Switching adapters", "## Embedding reuse", "## The article's workload"):
        assert heading in report
    assert set(raw) == set(phases.split(","))
    # imprompt and the expert script alternate over the rounds, each round a process of its own; the others run once
    assert [len(raw[p]["runs"]) for p in ("switch_imprompt", "switch_expert", "switch_sdnext")] == [2, 2, 1]
    for phase in ("switch_imprompt", "switch_expert", "switch_sdnext"):
        assert all(len(run["result"]["switch_s"]) == 3 and run["machine"]["cores"] for run in raw[phase]["runs"])
    expert = raw["workload_expert"]["runs"][0]["result"]
    assert expert["requests"] == ["Base", "Base ViT-G", "Plus"] and len(expert["request_s"]) == 3
    assert "Against the expert script" in report and "none recorded" in report
    small = raw["workload_small_budget"]["runs"][0]["result"]
    assert small["requests"] == ["Base", "Base ViT-G", "Plus"] and small["evictions"] >= 1  # nothing failed, evictions happened

    # --quick runs each phase once; the previous run's numbers stand beside the new ones, so a regression shows
    report, raw = bench(bench_cache, out, "switch_imprompt", "--quick", "--update")
    assert len(raw["switch_imprompt"]["runs"]) == 1 and len(raw["switch_expert"]["runs"]) == 2  # the latter kept
    assert "workload_small_budget" in raw  # --update kept the phases it did not measure
    row = next(line for line in report.splitlines() if line.startswith("| imprompt (plan"))
    assert not row.rstrip(" |").endswith("–")  # the previous p50 is there


def test_model_switch_bench_runs_at_tiny_size(bench_cache, tmp_path):
    out = tmp_path / "models.md"
    command = [sys.executable, "-m", "tools.bench_models", "--size", "tiny", "--switches", "2", "--cache",
               str(bench_cache), "--out", str(out), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(raw) == {"imprompt_resident", "imprompt_one_at_a_time", "diffusers_reload"}  # no offload tier on a CPU
    for system in raw.values():
        assert len(system["result"]["switch_s"]) == 2 and len(system["result"]["first_loads_s"]) == 2
    assert "| imprompt, both resident" in out.read_text()


def test_batching_bench_runs_at_tiny_size(pack, tmp_path):
    """tools/bench_batching.py end to end on the demo pack: two real servers (batching off, on), concurrent clients,
    the report and its raw numbers; the batched mode ran batches and its images are the unbatched ones within 1/255."""
    out = tmp_path / "batching.md"
    command = [sys.executable, "-m", "tools.bench_batching", "--models", str(pack), "--family", "sd15", "--size", "64",
               "--steps", "2", "--clients", "3", "--requests", "2", "--batch-wait", "0.5", "--batch-max", "8",
               "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["modes"] == ["off", "on"] and raw["machine"]["cores"] and raw["machine"]["torch"]
    for name in ("off", "on"):
        row = raw["summary"][name]
        assert row["images"] == 6 and row["failures"] == 0 and row["images_per_s"] > 0 and row["p95_s"] >= row["p50_s"]
        assert len(raw["results"][name]["latency_s"]) == 6 and raw["results"][name]["server_cpu_s"] > 0
    assert raw["summary"]["off"]["batch_sizes"] == []  # --batch-wait 0: one request at a time
    assert max(raw["summary"]["on"]["batch_sizes"], default=0) >= 2 and raw["summary"]["on"]["max_pixel_diff_vs_first"] <= 1
    report = out.read_text()
    assert "| batching off (`--batch-wait 0`) |" in report and "Batching on vs off:" in report
