"""What users type: the CLI as a real subprocess, and its output files."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from conftest import max_diff, request, unit
from PIL import Image

from imprompt.cli import parse_ip_unit


def imprompt(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_demo_runs_the_articles_switching_scenario(pack, engine, tmp_path):
    out = tmp_path / "demo"
    done = imprompt("demo", "--pack", pack, "--random-weights", "--out", out, "--steps", 4)
    rows = json.loads((out / "demo-report.json").read_text())
    steps = [(r["step"], r["adapter"], r["encoder"]) for r in rows]
    vit_h, vit_g = "IP-Adapter/models/image_encoder", "IP-Adapter/sdxl_models/image_encoder"
    assert steps == [
        (1, "Base", vit_h),
        (2, "Base ViT-G", vit_g),
        (3, "Base", vit_h),
        (4, "Plus", vit_h),
        (5, "Full Face", vit_h),
        (6, "Plus Face", vit_h),
        (7, "Light", vit_h),
        (8, "Base", vit_h),
        (8, "Base ViT-G", vit_g),
    ]
    sources = {(r["step"], r["adapter"]): r["encoder_source"] for r in rows}
    assert sources[(1, "Base")] == sources[(2, "Base ViT-G")] == "loaded"
    assert sources[(3, "Base")] == "not needed"  # same image, same encoder: the embedding came from cache
    assert sources[(4, "Plus")] == "cache"  # hidden states are new, the ViT-H encoder is still loaded
    # the log says which encoder was loaded, for which adapter, and why
    assert "encoder IP-Adapter/sdxl_models/image_encoder loaded for Base ViT-G" in done.stderr
    assert "consumes image_embeds[1280]" in done.stderr
    assert "wrong pairing refused" in done.stdout and "image_embeds[1280]" in done.stdout
    assert (out / "demo-report.md").is_file()
    grid = Image.open(out / "demo-grid.png").convert("L")
    cell = grid.width // 9  # the reference and the eight steps, each labelled underneath
    assert grid.height > cell
    for i in range(9):  # under every picture, its label: dark text on white
        band = grid.crop((i * cell, cell, (i + 1) * cell, grid.height))
        assert min(band.getdata()) < 100, f"cell {i} has no label"
    # a demo image is exactly what the Python API gives for the same request
    reference = Image.open(pack / "images" / "red-circle.png").convert("RGB")
    same = engine.generate(
        model="tiny-sd15", prompt="", seed=7, steps=4, cfg_scale=1.5,
        ip_adapters=[{"adapter": "Base ViT-G", "images": [reference], "scale": 1.0}],
    )  # fmt: skip
    assert max_diff(Image.open(out / "02-base-vit-g.png").convert("RGB"), same.images[0]) == 0


def test_generate_with_ip_units_and_json(pack, engine, red_circle, tmp_path):
    image = pack / "images" / "red-circle.png"
    out = tmp_path / "out.png"
    done = imprompt(
        "generate", "--models", pack, "--model", "tiny-sd15", "--prompt", "a cat", "--seed", 1, "--steps", 4,
        "--cfg-scale", 7, "--width", 64, "--height", 64,
        "--ip", f"Base:{image}:0.6", "--ip", f"Base ViT-G:{image}:0.5", "--out", out, "--json",
    )  # fmt: skip
    info = json.loads(done.stdout)
    assert [(u["adapter"], u["variant"], u["encoder"]) for u in info["ip_adapters"]] == [
        ("Base", "base", "IP-Adapter/models/image_encoder"),
        ("Base ViT-G", "base", "IP-Adapter/sdxl_models/image_encoder"),
    ]
    for u in info["ip_adapters"]:
        assert u["file"].endswith(".safetensors") and u["encoder_source"] == "loaded" and u["embeddings"] == ["encoded"]
    expected = engine.generate(request(unit("Base", red_circle, 0.6), unit("Base ViT-G", red_circle, 0.5)))
    written = Image.open(out)
    assert max_diff(written.convert("RGB"), expected.images[0]) == 0
    parameters = written.text["parameters"]  # A1111's PNG text chunk
    assert parameters.startswith("a cat\n") and "Seed: 1" in parameters
    assert 'IP Adapter: "Base:0.6:0.0:1.0;Base ViT-G:0.5:0.0:1.0"' in parameters


def test_generate_from_an_sdnext_payload(pack, engine, red_circle, tmp_path):
    encoded = base64.b64encode((pack / "images" / "red-circle.png").read_bytes()).decode()
    payload = {
        "prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 4, "cfg_scale": 7.0, "width": 64, "height": 64,
        "sampler_name": "Euler a", "restore_faces": False, "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": "tiny-sd15"},
        "ip_adapter": [{"adapter": "Plus", "images": ["data:image/png;base64," + encoded], "scale": 0.6,
                        "start": 0.0, "end": 0.5}],
    }  # fmt: skip
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    out = tmp_path / "out.png"
    imprompt("generate", "--models", pack, "--request", tmp_path / "payload.json", "--out", out)
    expected = engine.generate(request(unit("Plus", red_circle, 0.6, end=0.5), sampler="Euler a"))
    assert max_diff(Image.open(out).convert("RGB"), expected.images[0]) == 0


def test_models_lists_each_adapter_with_the_encoder_it_needs(pack):
    listing = json.loads(imprompt("models", "--models", pack, "--json").stdout)
    adapters = {a["friendly_name"]: a for a in listing["adapters"]}
    sd15 = {"Base", "Light", "Plus", "Plus Face", "Full Face", "Base ViT-G", "Ostris Composition ViT-H"}
    sdxl = {"Base SDXL", "Base ViT-H SDXL", "Plus ViT-H SDXL", "Plus Face ViT-H SDXL", "Ostris Composition ViT-H SDXL"}
    transformers = {"SD3.5 Large": "tiny-sd35", "FLUX XLabs": "tiny-flux", "FLUX XLabs v2": "tiny-flux"}
    assert set(adapters) == sd15 | sdxl | set(transformers)
    assert adapters["Base ViT-G"]["needs"] == "image_embeds[1280] (ViT-bigG-14)"
    assert adapters["Base ViT-G"]["encoder"] == adapters["Base SDXL"]["encoder"] == "IP-Adapter/sdxl_models/image_encoder"
    assert adapters["Plus"]["encoder"] == adapters["Base ViT-H SDXL"]["encoder"] == "IP-Adapter/models/image_encoder"
    assert all(a["encoder_present"] for a in adapters.values())
    assert all(adapters[n]["fits_models"] == ["tiny-sd15"] for n in sd15)
    assert all(adapters[n]["fits_models"] == ["tiny-sdxl"] for n in sdxl)
    assert all(adapters[n]["fits_models"] == [m] for n, m in transformers.items())
    # each with the encoder its tensors ask for: SigLIP's hidden states for SD 3.5, ViT-L's image_embeds for FLUX
    assert (adapters["SD3.5 Large"]["needs"], adapters["SD3.5 Large"]["encoder"]) == (
        "siglip hidden_states[1152] (SigLIP-so400m-14-384)", "siglip-so400m-patch14-384")
    assert (adapters["FLUX XLabs"]["needs"], adapters["FLUX XLabs v2"]["encoder"]) == ("image_embeds[768] (ViT-L-14)", "clip_vision_l")
    assert (adapters["FLUX XLabs"]["tokens"], adapters["FLUX XLabs v2"]["tokens"]) == (4, 16)
    models = {m["name"]: set(m["adapters"]) for m in listing["models"]}
    assert models == {"tiny-sd15": sd15, "tiny-sdxl": sdxl, "tiny-sd35": {"SD3.5 Large"},
                      "tiny-flux": {"FLUX XLabs", "FLUX XLabs v2"}}  # per model, only the adapters that fit it
    text = imprompt("models", "--models", pack).stdout
    assert "Base ViT-G" in text and "needs image_embeds[1280]" in text
    assert "needs siglip hidden_states[1152]" in text and "FLUX.1" in text and "siglip hidden_states[1152]" in text


def test_models_says_when_an_encoder_is_missing(pack, tmp_path):
    root = tmp_path / "models"
    (root / "ipadapter").mkdir(parents=True)
    (root / "ipadapter" / "ip-adapter_sd15_vit-G.safetensors").write_bytes(
        (pack / "IP-Adapter" / "models" / "ip-adapter_sd15_vit-G.safetensors").read_bytes()
    )
    text = imprompt("models", "--models", root).stdout
    assert "MISSING ENCODER" in text


def test_probe_prints_one_json_object_per_file(pack, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    done = imprompt(
        "probe", pack / "IP-Adapter" / "models" / "ip-adapter_sd15_vit-G.safetensors",
        pack / "IP-Adapter" / "sdxl_models" / "image_encoder", pack / "diffusers" / "tiny-sd15", broken, check=False,
    )  # fmt: skip
    assert done.returncode == 1  # one file was unreadable
    adapter, encoder, pipeline, bad = (json.loads(line) for line in done.stdout.splitlines())
    assert adapter == {**adapter, "kind": "ip-adapter", "variant": "base", "consumes": "image_embeds",
                       "embed_dim": 1280, "tokens": 4, "cross_attention_dim": 768}  # fmt: skip
    assert encoder == {**encoder, "kind": "image-encoder", "projection_dim": 1280, "hidden_size": 96,
                       "num_layers": 3, "image_size": 224, "architecture": "custom"}  # fmt: skip
    assert pipeline["kind"] == "pipeline" and pipeline["cross_attention_dim"] == 768
    assert bad["kind"] == "unreadable" and "broken.safetensors" in bad["error"]


def test_errors_are_one_clear_line_and_exit_1(pack, tmp_path):
    done = imprompt(
        "generate", "--models", pack, "--model", "tiny-sd15", "--prompt", "x", "--ip", f"Base Turbo:{pack}/images/red-circle.png",
        "--out", tmp_path / "x.png", check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("imprompt: error: IP-Adapter 'Base Turbo' not found")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Base:a.png", {"adapter": "Base", "images": ["a.png"]}),
        ("Base ViT-G:a.png:0.6", {"adapter": "Base ViT-G", "images": ["a.png"], "scale": 0.6}),
        ("Plus:a.png+b.png:0.8:0:0.5", {"adapter": "Plus", "images": ["a.png", "b.png"], "scale": 0.8, "start": 0.0, "end": 0.5}),
        ("Base:C:/refs/a.png:0.5", {"adapter": "Base", "images": ["C:/refs/a.png"], "scale": 0.5}),
        ("Base:2024.png", {"adapter": "Base", "images": ["2024.png"]}),
    ],
)  # fmt: skip
def test_ip_unit_syntax(text, expected):
    assert parse_ip_unit(text) == expected


def test_help_mentions_every_command():
    text = imprompt("--help").stdout
    for command in ("generate", "probe", "models", "demo", "download"):
        assert command in text
    assert "NAME:IMAGE" in imprompt("generate", "--help").stdout


def test_embed_then_generate_from_saved_embeddings(pack, engine, red_circle, tmp_path):
    saved = tmp_path / "circle.safetensors"
    imprompt("embed", "--models", pack, "--adapter", "Base ViT-G", pack / "images" / "red-circle.png", "--out", saved)
    probed = json.loads(imprompt("probe", saved).stdout)
    assert (probed["kind"], probed["output"], probed["width"]) == ("ip-embeddings", "image_embeds", 1280)
    out = tmp_path / "out.png"
    done = imprompt(
        "generate", "--models", pack, "--model", "tiny-sd15", "--prompt", "a cat", "--seed", 1, "--steps", 4,
        "--width", 64, "--height", 64, "--ip", f"Base ViT-G:{saved}:0.6", "--out", out, "--json",
    )  # fmt: skip
    assert json.loads(done.stdout)["ip_adapters"][0]["encoder_source"] == "saved embeddings"
    expected = engine.generate(request(unit("Base ViT-G", red_circle, 0.6)))
    assert max_diff(Image.open(out).convert("RGB"), expected.images[0]) == 0


def test_full_units_as_json_and_img2img(pack, engine, red_circle, yellow_square, tmp_path):
    mask = tmp_path / "left.png"
    left = Image.new("RGB", (64, 64), "black")
    left.paste((255, 255, 255), (0, 0, 32, 64))
    left.save(mask)
    image, init = pack / "images" / "red-circle.png", pack / "images" / "yellow-square.png"
    unit_json = {"adapter": "Base SDXL", "images": [str(image)], "scale": 0.8, "layers": "style", "masks": [str(mask)]}
    out = tmp_path / "out.png"
    imprompt(
        "generate", "--models", pack, "--model", "tiny-sdxl", "--prompt", "a cat", "--seed", 2, "--steps", 4,
        "--ip-json", json.dumps(unit_json), "--init-image", init, "--denoising-strength", 0.7,
        "--width", 64, "--height", 64, "--out", out,
    )  # fmt: skip
    expected = engine.generate(
        request(
            {**unit_json, "images": [red_circle], "masks": [left]},
            model="tiny-sdxl", seed=2, init_images=[yellow_square], denoising_strength=0.7,
        )
    )  # fmt: skip
    assert max_diff(Image.open(out).convert("RGB"), expected.images[0]) == 0


def test_the_demo_never_builds_into_or_clears_a_folder_it_did_not_create(tmp_path):
    """`imprompt demo --pack ~/ComfyUI/models` must not wipe the user's models: any folder that is not new, empty
    or a demo pack is refused, naming it, and nothing in it is touched."""
    models = tmp_path / "ComfyUI" / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "mine.safetensors").write_bytes(b"the user's own")
    for command in (["demo", "--pack", models, "--random-weights"], ["pack", models, "--random-weights"]):
        done = imprompt(*command, check=False)
        assert done.returncode == 1
        assert f"{models} is not empty and is not a demo pack" in done.stderr and "never deletes" in done.stderr
    assert sorted(p.name for p in models.rglob("*")) == ["loras", "mine.safetensors"]


def test_rebuilding_a_demo_pack_removes_only_its_own_files(tmp_path):
    pack = tmp_path / "demo-models"
    imprompt("pack", pack, "--random-weights")
    stamp = json.loads((pack / "pack.json").read_text())
    assert stamp["files"] and all((pack / name).is_file() for name in stamp["files"])
    (pack / "ipadapter" / "my-adapter.safetensors").write_bytes(b"put there by the user")
    imprompt("pack", pack)  # the trained weights: another pack, rebuilt in place
    assert (pack / "ipadapter" / "my-adapter.safetensors").read_bytes() == b"put there by the user"
    rebuilt = json.loads((pack / "pack.json").read_text())
    assert rebuilt["weights"] is not None and "ipadapter/my-adapter.safetensors" not in rebuilt["files"]
    assert (pack / "diffusers" / "tiny-sd15" / "imprompt.json").is_file()  # the trained model's own defaults
