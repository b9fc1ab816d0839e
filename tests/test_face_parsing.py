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
    for bad, problem in ((missing, "ffm.conv2.weight"), (wrong, "11 classes"), ({"x": x}, "not facexlib's BiSeNet")):
        with pytest.raises(CheckpointError, match=problem) as raised:
            build_bisenet(bad, tmp_path / "parser.pth")
        assert "parser.pth" in str(raised.value)


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


def test_facexlib_is_found_without_importing_it():
    """find_spec only: facexlib imports torchvision, which imprompt never loads."""
    import sys

    from imprompt.ipadapter.facexlib_files import facexlib_package_weights

    facexlib_package_weights()
    assert "facexlib" not in sys.modules and "torchvision" not in sys.modules
