"""facexlib's BiSeNet face parser (PuLID's parsing of the aligned face) and where facexlib's files are found.

The reference is `facexlib_reference.ref_bisenet`: facexlib's forward written as plain functions over the file's
tensors, independent of imprompt's module; the files are tiny ones in `parsing_bisenet.pth`'s real key layout
(`imprompt.demo.tiny_faces`), read by imprompt's own loader as a user's file is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facexlib_reference import ref_bisenet, ref_face_features

from imprompt.demo.tiny_faces import BISENET_REAL as REAL
from imprompt.demo.tiny_faces import bisenet_table, tiny_bisenet, write_tiny_bisenet


def random_face(seed=4, size=512):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_the_parser_equals_facexlibs_forward_by_hand(tmp_path):
    from imprompt.ipadapter.face_parsing import build_bisenet, face_features_image, parse
    from imprompt.loading.tensors import read_tensors

    path = tmp_path / "facexlib" / "parsing_bisenet.pth"
    sd = write_tiny_bisenet(path, seed=0)
    parser = build_bisenet(read_tensors(path), path)
    x = torch.randn(1, 3, 96, 80, generator=torch.Generator().manual_seed(1))
    want = ref_bisenet(sd, x)
    got = parser(x)
    assert got.shape == (1, 19, 96, 80) and got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 1e-4 * want.abs().max()
    rgb = random_face()
    features = face_features_image(parser, rgb)
    reference = ref_face_features(sd, rgb)
    assert features.shape == (1, 3, 512, 512) and torch.equal(features, reference)
    # the tiny parser's argmax takes both kinds of label: some pixels white, the rest gray
    white = (features == 1).all(dim=1)
    assert 0.05 < white.float().mean() < 0.95
    labels = parse(parser, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    assert set(labels.unique().tolist()) & {0, 16, 18, 7, 8, 9, 14, 15} and set(labels.unique().tolist()) - {0, 16, 18, 7, 8, 9, 14, 15}
    gray = features[0, 0][~white[0]]
    image = torch.from_numpy(rgb).float() / 255
    luma = (0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2])[~white[0]]
    assert torch.allclose(gray, luma, atol=1e-6)  # the face is gray: PuLID's to_gray of the RGB crop


def test_the_released_layout_builds_key_for_key():
    """`parsing_bisenet.pth`'s table (facexlib's BiSeNet(19): 191 tensors, 160 of them besides the BatchNorms'
    counters, 53.25 MB of float32, the size of the 53,289,463-byte release) builds imprompt's parser exactly."""
    from imprompt.ipadapter.face_parsing import build_bisenet

    table = bisenet_table(**REAL)
    assert len(table) == 191 and len([k for k in table if not k.endswith("num_batches_tracked")]) == 160
    assert sum(int(np.prod(s)) for s in table.values() if s) * 4 == 53_252_352
    meta = {k: torch.empty(s, device="meta", dtype=torch.int64 if not s else torch.float32) for k, s in table.items()}
    parser = build_bisenet(meta, "parsing_bisenet.pth")
    assert {k: tuple(v.shape) for k, v in parser.state_dict().items()} == table


def test_files_that_are_not_the_parser_are_refused_naming_them(tmp_path):
    from imprompt.errors import CheckpointError
    from imprompt.ipadapter.face_parsing import build_bisenet

    sd = tiny_bisenet(0)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # saved by an old torch: loads
    prefixed = {f"module.{k}": v for k, v in sd.items()}  # saved from DataParallel: loads
    x = torch.rand(1, 3, 64, 64)
    for loadable in (old, prefixed):
        assert torch.equal(build_bisenet(loadable)(x), build_bisenet(sd)(x))
    missing = {k: v for k, v in sd.items() if k != "ffm.conv2.weight"}
    wrong = {**sd, "conv_out.conv_out.weight": sd["conv_out.conv_out.weight"][:11]}
    extra = {**sd, "conv_out.conv_out.bias": torch.zeros(19)}
    no_stat = {k: v for k, v in sd.items() if k != "cp.arm16.bn_atten.running_var"}
    for bad, problem in ((missing, "ffm.conv2.weight"), (wrong, "11 classes"), ({"x": x}, "not facexlib's BiSeNet"),
                         (extra, "unexpected conv_out.conv_out.bias"),
                         (no_stat, "missing cp.arm16.bn_atten.running_var")):  # fmt: skip
        with pytest.raises(CheckpointError, match=problem) as raised:
            build_bisenet(bad, tmp_path / "parser.pth")
        assert "parser.pth" in str(raised.value)
        assert ("Download parsing_bisenet.pth again from facexlib's release v0.2.0 "
                "(https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth)") in str(raised.value)


def test_facexlib_files_are_found_where_users_keep_them_and_missing_ones_named(tmp_path, monkeypatch):
    from imprompt.errors import MissingFaceAnalysisError
    from imprompt.ipadapter import facexlib_files
    from imprompt.ipadapter.facexlib_files import DETECTOR, PARSER, locate, presence

    monkeypatch.setattr(facexlib_files, "facexlib_package_weights", lambda: tmp_path / "site" / "facexlib" / "weights")
    models, faces = tmp_path / "models", tmp_path / "insightface"
    roots = ([models], [faces])
    with pytest.raises(MissingFaceAnalysisError) as raised:
        locate((DETECTOR, PARSER), *roots, "PuLID")
    message = str(raised.value)
    for part in (DETECTOR, PARSER, "releases/download/v0.1.0/detection_Resnet50_Final.pth",
                 "releases/download/v0.2.0/parsing_bisenet.pth", f"into {models / 'facexlib'}", str(faces),
                 str(tmp_path / "site" / "facexlib" / "weights")):  # fmt: skip
        assert part in message, part
    write_tiny_bisenet(models / "facexlib" / PARSER)  # ComfyUI's models/facexlib
    (faces / "models").mkdir(parents=True)
    (faces / "models" / DETECTOR).write_bytes(b"x")  # beside the antelopev2 pack
    assert locate((DETECTOR, PARSER), *roots, "PuLID") == {DETECTOR: faces / "models" / DETECTOR,
                                                            PARSER: models / "facexlib" / PARSER}  # fmt: skip
    assert presence(*roots) == {DETECTOR: str(faces / "models" / DETECTOR), PARSER: str(models / "facexlib" / PARSER)}
    (faces / "models" / DETECTOR).unlink()
    package = tmp_path / "site" / "facexlib" / "weights"
    package.mkdir(parents=True)
    (package / DETECTOR).write_bytes(b"x")  # facexlib's own download folder
    assert locate((DETECTOR,), *roots, "PuLID") == {DETECTOR: package / DETECTOR}
    (package / DETECTOR).unlink()
    with pytest.raises(MissingFaceAnalysisError, match=r"needs detection_Resnet50_Final\.pth.*face_embeddings"):
        locate((DETECTOR,), *roots, "PuLID")  # the parser alone is there: a given embedding and crop would do


def test_an_installed_facexlib_is_found_without_importing_it(tmp_path, monkeypatch):
    """A facexlib package on sys.path (its __init__ raises if run): found by find_spec alone, its `weights/` folder
    is where a file is looked for, and the package is never imported (facexlib imports torchvision)."""
    import importlib
    import sys

    from imprompt.ipadapter.facexlib_files import DETECTOR, facexlib_package_weights, locate

    site = tmp_path / "site-packages"
    (site / "facexlib").mkdir(parents=True)
    (site / "facexlib" / "__init__.py").write_text("raise ImportError('facexlib was imported')\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "facexlib", raising=False)
    importlib.invalidate_caches()
    assert facexlib_package_weights() == site / "facexlib" / "weights"
    write_tiny_bisenet(site / "facexlib" / "weights" / "parsing_bisenet.pth")
    (site / "facexlib" / "weights" / DETECTOR).write_bytes(b"x")
    found = locate((DETECTOR, "parsing_bisenet.pth"), [tmp_path / "models"], [], "PuLID")
    assert found == {DETECTOR: site / "facexlib" / "weights" / DETECTOR,
                     "parsing_bisenet.pth": site / "facexlib" / "weights" / "parsing_bisenet.pth"}  # fmt: skip
    assert "facexlib" not in sys.modules and "torchvision" not in sys.modules


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """No Hugging Face cache or home of this machine's: HOME, HF_HOME, HF_HUB_CACHE and XDG_CACHE_HOME in tmp_path."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "IMPROMPT_INSIGHTFACE_ROOT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def sdnext_tree(base, hf="huggingface"):
    """An SD.Next install as its PuLID leaves it: `models/<hf>/facexlib/` (nunchaku's FLUX PuLID: facexlib in
    HF_HUB_CACHE, which SD.Next sets to models/huggingface), `models/<hf>/insightface/models/antelopev2/` (its
    antelopev2) and `models/<hf>/models--ToTheBeginning--PuLID/models/antelopev2/` (the SDXL PuLID's)."""
    models = base / "sdnext" / "models"
    write_tiny_bisenet(models / hf / "facexlib" / "parsing_bisenet.pth")
    (models / hf / "facexlib" / "detection_Resnet50_Final.pth").write_bytes(b"x")
    for pack in (models / hf / "insightface" / "models" / "antelopev2",
                 models / hf / "models--ToTheBeginning--PuLID" / "models" / "antelopev2"):  # fmt: skip
        pack.mkdir(parents=True)
        (pack / "glintr100.onnx").write_bytes(b"x")
    return models


def test_sdnext_users_files_and_pack_are_found(no_caches):
    """SD.Next's models folder given as imprompt's: facexlib's files in models/huggingface/facexlib and the antelopev2
    pack in models/huggingface/insightface (FLUX PuLID), or only in models--ToTheBeginning--PuLID (SDXL PuLID), with
    facexlib's files in SD.Next's venv (its SDXL PuLID lets facexlib download into its package folder)."""
    import shutil

    from imprompt.ipadapter.faces import FaceAnalyzer, insightface_roots
    from imprompt.ipadapter.facexlib_files import DETECTOR, PARSER, locate

    models = sdnext_tree(no_caches)
    hf = models / "huggingface"
    roots = insightface_roots([models])
    assert FaceAnalyzer(roots).find_pack("antelopev2") == hf / "insightface" / "models" / "antelopev2"
    assert locate((DETECTOR, PARSER), [models], roots, "PuLID") == {DETECTOR: hf / "facexlib" / DETECTOR,
                                                                    PARSER: hf / "facexlib" / PARSER}  # fmt: skip
    shutil.rmtree(hf / "insightface")  # the SDXL PuLID's pack alone
    assert FaceAnalyzer(roots).find_pack("antelopev2") == hf / "models--ToTheBeginning--PuLID" / "models" / "antelopev2"
    venv = models.parent / "venv" / "lib" / "python3.10" / "site-packages" / "facexlib" / "weights"
    venv.mkdir(parents=True)
    for name in (DETECTOR, PARSER):
        (hf / "facexlib" / name).rename(venv / name)
    assert locate((DETECTOR, PARSER), [models], roots, "PuLID") == {DETECTOR: venv / DETECTOR, PARSER: venv / PARSER}


@pytest.mark.parametrize("where", ["HF_HUB_CACHE", "HF_HOME", "home"])
def test_the_hub_caches_of_this_environment_are_looked_in(no_caches, monkeypatch, where):
    """facexlib's files and the pack where nunchaku's and SD.Next's PuLID put them in the hub cache of this
    environment: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub."""
    from imprompt.ipadapter.faces import FaceAnalyzer, insightface_roots
    from imprompt.ipadapter.facexlib_files import DETECTOR, PARSER, locate

    hub = {"HF_HUB_CACHE": no_caches / "cache", "HF_HOME": no_caches / "hf" / "hub",
           "home": no_caches / "home" / ".cache" / "huggingface" / "hub"}[where]  # fmt: skip
    if where != "home":
        monkeypatch.setenv(where, str(hub if where == "HF_HUB_CACHE" else hub.parent))
    tree = sdnext_tree(no_caches)
    (hub / "facexlib").mkdir(parents=True)
    for name in (DETECTOR, PARSER):
        (tree / "huggingface" / "facexlib" / name).rename(hub / "facexlib" / name)
    pack = hub / "models--ToTheBeginning--PuLID" / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "scrfd_10g_bnkps.onnx").write_bytes(b"x")
    models = no_caches / "elsewhere"  # not SD.Next's models folder
    roots = insightface_roots([models])
    assert FaceAnalyzer(roots).find_pack("antelopev2") == pack
    assert locate((DETECTOR, PARSER), [models], roots, "PuLID") == {DETECTOR: hub / "facexlib" / DETECTOR,
                                                                    PARSER: hub / "facexlib" / PARSER}  # fmt: skip


def test_a1111s_gfpgan_detector_is_found_and_the_error_names_sdnexts_folder(no_caches):
    from imprompt.errors import MissingFaceAnalysisError
    from imprompt.ipadapter.facexlib_files import DETECTOR, PARSER, locate

    models = no_caches / "models"
    (models / "GFPGAN").mkdir(parents=True)
    (models / "GFPGAN" / DETECTOR).write_bytes(b"x")
    assert locate((DETECTOR,), [models], [], "PuLID") == {DETECTOR: models / "GFPGAN" / DETECTOR}
    with pytest.raises(MissingFaceAnalysisError) as raised:
        locate((DETECTOR, PARSER), [models], [], "PuLID")
    message = str(raised.value)
    assert "needs parsing_bisenet.pth" in message and "needs detection" not in message
    assert str(models / "huggingface" / "facexlib") in message and "SD.Next keeps them in models/huggingface" in message
