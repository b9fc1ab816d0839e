"""Files that change under a running engine: deleted, truncated, replaced by another variant, unreadable, or a
load that fails half-way. Each time: a clear error for the requests that need the file, correct results for the
others, correct results again once the file is restored, and nothing stale served."""

from __future__ import annotations

import builtins
import os
import shutil
from pathlib import Path

import pytest
from conftest import max_diff, request, unit

from imprompt import Engine
from imprompt.errors import ImpromptError

ADAPTER = "models/ip-adapter_sd15_vit-G.safetensors"  # what "Base ViT-G" resolves to
ENCODER = "sdxl_models/image_encoder"  # the only encoder giving image_embeds[1280]


@pytest.fixture
def world(pack, adapters_copy, red_circle, yellow_square):
    """An engine over a private copy of the adapters, warmed on the requests, and each request's fresh image."""
    roots = [pack / "diffusers", adapters_copy]
    needs = request(unit("Base ViT-G", red_circle))  # needs the adapter file and the bigG encoder
    other = request(unit("Plus", yellow_square), seed=2)  # needs neither
    engine = Engine(roots)
    engine.store.rescan_interval = 0  # a file restored is found by the next miss (not only after the interval)
    fresh = {name: Engine(roots).generate(r).images[0] for name, r in (("needs", needs), ("other", other))}
    for r in (needs, other):
        engine.generate(r)
    return engine, roots, adapters_copy, needs, other, fresh


def check_other_and_restore(engine, world_, backup, target):
    _, roots, _, needs, other, fresh = world_
    assert max_diff(engine.generate(other).images[0], fresh["other"]) == 0
    restore(backup, target)
    assert max_diff(engine.generate(needs).images[0], fresh["needs"]) == 0
    assert max_diff(engine.generate(other).images[0], fresh["other"]) == 0


def backup_of(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "backup" / path.name
    copy.parent.mkdir(exist_ok=True)
    (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
    return copy


def restore(backup: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    (shutil.copytree if backup.is_dir() else shutil.copy2)(backup, target)


def cold(engine):
    """Forget what is loaded, so the next request must read the files again."""
    engine.clear_cache()


@pytest.mark.parametrize("target", [ADAPTER, ENCODER])
def test_deleted(world, tmp_path, target):
    engine, _, folder, needs, *_ = world
    path = folder / target
    backup = backup_of(path, tmp_path)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ImpromptError) as caught:
        engine.generate(needs)
    message = str(caught.value)
    assert "ip-adapter_sd15_vit-G" in message or "image_embeds[1280]" in message
    check_other_and_restore(engine, world, backup, path)


@pytest.mark.parametrize("target", [ADAPTER, ENCODER + "/model.safetensors"])
def test_truncated(world, tmp_path, target):
    engine, _, folder, needs, *_ = world
    path = folder / target
    backup = backup_of(path, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImpromptError) as caught:
        engine.generate(needs)
    assert "truncated" in str(caught.value) or "outside the file" in str(caught.value) or "claims" in str(caught.value)
    assert str(path.parent if "image_encoder" in target else path) in str(caught.value) or path.name in str(caught.value)
    check_other_and_restore(engine, world, backup, path)


def test_adapter_replaced_by_another_variant(world, tmp_path):
    """The file now holds a Base (ViT-H) adapter: it is probed again and served as what it now is."""
    engine, roots, folder, needs, *_ = world
    path = folder / ADAPTER
    backup = backup_of(path, tmp_path)
    shutil.copy2(folder / "models" / "ip-adapter_sd15.safetensors", path)
    result = engine.generate(needs)
    u = result.info["ip_adapters"][0]
    assert (u["embed_dim"], u["encoder"]) == (1024, "models/image_encoder")  # named relative to its root
    assert max_diff(result.images[0], Engine(roots).generate(needs).images[0]) == 0  # not the old, cached one
    check_other_and_restore(engine, world, backup, path)


def test_encoder_replaced_by_another_variant(world, tmp_path):
    """The bigG folder now holds the ViT-H encoder: nothing gives image_embeds[1280] any more."""
    engine, _, folder, needs, *_ = world
    path = folder / ENCODER
    backup = backup_of(path, tmp_path)
    shutil.rmtree(path)
    shutil.copytree(folder / "models" / "image_encoder", path)
    with pytest.raises(ImpromptError, match=r"image_embeds\[1280\]"):
        engine.generate(needs)
    check_other_and_restore(engine, world, backup, path)


@pytest.mark.parametrize("target", [ADAPTER, ENCODER + "/model.safetensors"])
def test_unreadable(world, tmp_path, monkeypatch, target):
    """Permission denied. As root, chmod cannot deny a read, so the refusal is simulated at the open() calls."""
    engine, _, folder, needs, *_ = world
    path = folder / target
    cold(engine)
    if os.geteuid() != 0:
        path.chmod(0)
        undo = lambda: path.chmod(0o644)  # noqa: E731
    else:
        import safetensors

        real_open, real_safe_open = builtins.open, safetensors.safe_open

        def denied(file, *args, **kwargs):
            if Path(str(file)).resolve() == path.resolve():
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        def denied_safe(file, *args, **kwargs):
            if Path(str(file)).resolve() == path.resolve():
                raise PermissionError(13, "Permission denied", str(file))
            return real_safe_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denied)
        monkeypatch.setattr(safetensors, "safe_open", denied_safe)
        undo = monkeypatch.undo
    try:
        with pytest.raises(ImpromptError, match="ermission denied|cannot read"):
            engine.generate(needs)
    finally:
        undo()
    check_other_and_restore(engine, world, backup_of(path, tmp_path), path)


@pytest.mark.parametrize("where", ["adapter", "encoder"])
def test_load_fails_half_way(world, tmp_path, monkeypatch, where):
    """An exception inside loading (after some tensors were read): a typed error, nothing half-loaded."""
    engine, _, folder, needs, *_ = world
    cold(engine)
    import safetensors

    real_safe_open = safetensors.safe_open

    target = folder / (ADAPTER if where == "adapter" else ENCODER + "/model.safetensors")

    class FailsAfterTwoTensors:
        """safe_open whose third get_tensor fails, for the target file only."""

        def __init__(self, file, *args, **kwargs):
            self.inner, self.count = real_safe_open(file, *args, **kwargs), 0
            self.failing = Path(str(file)).resolve() == target.resolve()

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):  # keys, get_slice, metadata: as the real one
            return getattr(self.inner, name)

        def get_tensor(self, key):
            self.count += 1
            if self.failing and self.count > 2:
                raise RuntimeError("simulated I/O failure half-way through the file")
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", FailsAfterTwoTensors)
    with pytest.raises(ImpromptError, match="simulated"):
        engine.generate(needs)
    assert engine.cache_info()["encoders"]["entries"] == [] or where == "adapter"
    monkeypatch.undo()
    check_other_and_restore(engine, world, backup_of(folder / ADAPTER, tmp_path), folder / ADAPTER)


def test_a_fifo_in_the_models_folder_is_skipped_not_opened(pack, tmp_path, red_circle):
    """Opening a FIFO blocks forever; the scan takes regular files only, and probe refuses anything else."""
    from imprompt.models.probe import probe
    from imprompt.models.store import ModelStore

    os.mkfifo(tmp_path / "trap.safetensors")
    store = ModelStore([pack, tmp_path])
    assert all(e.name != "trap" for e in store.entries)
    with pytest.raises(ImpromptError, match="not a regular file"):
        probe(tmp_path / "trap.safetensors")


# ---------------------------------------------------------------------------------------- switching models


def test_a_failed_model_switch_keeps_the_current_model(pack, tmp_path, red_circle):
    """Refused in the plan (an inpainting pipeline) or failing while it loads (a broken VAE): either way the model
    in use stays loaded and the next request for it loads nothing."""
    broken = shutil.copytree(pack / "diffusers" / "tiny-sdxl", tmp_path / "models" / "tiny-sdxl-broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    inpaint = shutil.copytree(pack / "diffusers" / "tiny-sd15", tmp_path / "models" / "tiny-inpaint")
    index = (inpaint / "model_index.json").read_text()
    (inpaint / "model_index.json").write_text(index.replace("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"))
    engine = Engine([pack / "diffusers", pack / "IP-Adapter", tmp_path / "models"])
    first = engine.generate(request(unit("Base", red_circle)))
    for model, error in (("tiny-inpaint", "StableDiffusionInpaintPipeline"), ("tiny-sdxl-broken", "tiny-sdxl-broken")):
        with pytest.raises(ImpromptError, match=error):
            engine.generate(request(model=model))
        again = engine.generate(request(unit("Base", red_circle)))
        assert [e["event"] for e in again.info["events"] if e["event"].startswith("model_")] == []  # nothing reloaded
        assert max_diff(again.images[0], first.images[0]) == 0
