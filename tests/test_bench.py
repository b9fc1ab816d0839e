"""Smoke test of the benchmark harness at tiny size: it runs end to end as `make bench` runs it and writes its report.
It asserts that numbers were produced, never how large they are (benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.md"
    phases = "switch_imprompt,switch_expert,switch_sdnext,embeddings,workload_expert,workload_small_budget"
    command = [sys.executable, "-m", "tools.bench", "--size", "tiny", "--trials", "1", "--cache",
               str(tmp_path / "cache"), "--out", str(out), "--phases", phases, "--workload-size", "64",
               "--workload-steps", "2", "--workload-requests", "3", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]

    report = out.read_text()
    for heading in ("# Benchmarks", "## Switching adapters", "## Embedding reuse", "## The article's workload"):
        assert heading in report
    raw = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(raw) == set(phases.split(","))
    for phase in ("switch_imprompt", "switch_expert", "switch_sdnext"):
        assert len(raw[phase]["result"]["switch_s"]) == 3
    assert raw["workload_expert"]["result"]["requests"] == ["Base", "Base ViT-G", "Plus"]
    assert "Against the expert script" in report
    small = raw["workload_small_budget"]["result"]
    assert small["requests"] == ["Base", "Base ViT-G", "Plus"] and small["evictions"] >= 1  # nothing failed, evictions happened


def test_model_switch_bench_runs_at_tiny_size(tmp_path):
    out = tmp_path / "models.md"
    command = [sys.executable, "-m", "tools.bench_models", "--size", "tiny", "--switches", "2", "--cache",
               str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(raw) == {"imprompt_resident", "imprompt_one_at_a_time", "diffusers_reload"}
    for system in raw.values():
        assert len(system["result"]["switch_s"]) == 2 and len(system["result"]["first_loads_s"]) == 2
    assert "| imprompt, both resident" in out.read_text()
