"""The FLUX formats benchmark (`tools/bench_flux_formats.py`) writes FLUX.1-dev's real tensor table, real Q8_0 blocks,
and runs its GPU script's path at tiny size on the CPU. It asserts behaviour, never timings (benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.bench_flux_formats import FLUX_DEV, TINY, Values, diffusers_config, flux_table, q8_0, write_gguf  # noqa: E402


def test_the_table_is_flux1_dev_as_diffusers_converts_it():
    """Every tensor of the written file converts, by diffusers' own converter, to FluxTransformer2DModel's
    FLUX.1-dev config with its shape, and nothing is left over (on the meta device: nothing is allocated)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    for shape in (FLUX_DEV, TINY):
        table = flux_table(shape)
        converted = convert_flux_transformer_checkpoint_to_diffusers({n: torch.empty(s, device="meta") for n, s in table})
        with torch.device("meta"):
            model = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(shape).items() if k != "_class_name"})
        state = model.state_dict()
        assert set(converted) == set(state)
        assert all(tuple(converted[k].shape) == tuple(state[k].shape) for k in state)
    assert sum(torch.Size(s).numel() for _, s in flux_table(FLUX_DEV)) == 11_901_408_320  # FLUX.1-dev: 11.9 B


def test_q8_0_blocks_are_gguf_own_and_the_file_reads_back(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, quants

    values = Values(pool=2**16)
    x = values("a.weight", (8, 4096))
    x[0, :32] = 0  # an all-zero block: scale 0
    assert (q8_0(x).numpy() == quants.quantize(x.float().numpy(), GGMLQuantizationType.Q8_0)).all()
    quantized, plain = Values(pool=2**16), Values(pool=2**16)  # the same slices: blocks are the values' quantization
    assert torch.equal(quantized.blocks("a.weight", (8, 4096)), q8_0(plain("a.weight", (8, 4096))))

    table = [("img_in.weight", (64, 96)), ("img_in.bias", (64,)), ("odd.weight", (4, 40))]
    path = write_gguf(tmp_path / "t.gguf", table, Values(pool=2**16))
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "flux"
    found = {t.name: t for t in reader.tensors}
    assert [found[n].tensor_type.name for n, _ in table] == ["Q8_0", "F32", "F16"]
    weight = gguf.quants.dequantize(found["img_in.weight"].data, GGMLQuantizationType.Q8_0)
    assert weight.shape == (64, 96)  # torch order back
    expected = Values(pool=2**16)("img_in.weight", (64, 96)).float().numpy()
    assert abs(weight - expected).max() <= abs(expected).max() / 127  # within one Q8_0 step


def test_tiny_mode_runs_the_gpu_script_path_on_the_cpu(tmp_path):
    """imprompt and diffusers' FluxPipeline both run the GGUF transformer kept quantized, and the plan part chooses
    a plan for a simulated 16 GB and 24 GB GPU from the real-size tables."""
    out = tmp_path / "flux.json"
    command = [sys.executable, "-m", "tools.bench_flux_formats", "--size", "tiny", "--parts", "steps,plan",
               "--formats", "gguf_Q8_0", "--steps", "1", "--warmup", "0", "--cache", str(tmp_path / "cache"),
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    steps = results["steps"]["gguf_Q8_0"]
    for way in ("imprompt", "diffusers"):
        assert "error" not in steps[way], steps[way]
        assert len(steps[way]["step_s"]) == 1
        assert "gguf Q8_0" in steps[way]["transformer"]["by_dtype"]  # kept quantized in memory, both ways
    plans = results["plan"]["gguf_Q8_0"]["plans"]
    assert set(plans) == {"16 GB", "24 GB"}
    assert all(p["plan"] in ("none", "encoders", "model", "group") for p in plans.values())
    assert results["plan"]["gguf_Q8_0"]["sizes"]["transformer"] > 12e9  # Q8_0 of 11.9 B weights, from the table
    report = out.with_suffix(".md").read_text()
    assert "## Steps at 64x64" in report and "## The memory plan" in report
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # each format's file deleted after its measurement
