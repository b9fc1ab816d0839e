"""`imprompt download` per family: what it asks the hub and GitHub for, and that imprompt's own lookups then find it.

No network: the hub is a folder of tiny stand-in files in each repository's layout, served by a fake
`hf_hub_download(local_dir=...)`, and facexlib's release URLs by a fake URL fetch. Where a lookup reads tensors (the
store's adapters, encoders and ControlNets), the stand-ins are tiny real files of the published layouts; where it
looks for names only (InsightFace's pack, facexlib's files), a few bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from imprompt.cli import build_parser
from imprompt.conditioning.instantid import find_adapter, find_identitynet
from imprompt.conditioning.instantid import listing as instantid_listing
from imprompt.conditioning.ip_adapter import pick_encoder
from imprompt.conditioning.pulid import listing as pulid_listing
from imprompt.conditioning.pulid import pick_eva
from imprompt.demo.tiny_dits import build_siglip_vision, write_eva_clip, write_pulid_flux, write_pulid_sdxl, write_redux
from imprompt.demo.tiny_models import adapter_tensors
from imprompt.errors import MissingFaceAnalysisError
from imprompt.ipadapter import facexlib_files
from imprompt.ipadapter.faces import ANTELOPE_PACK, FaceAnalyzer, insightface_roots
from imprompt.models import catalog
from imprompt.models.download import download, fetch_release
from imprompt.models.store import ModelStore

ANTELOPE = {("DIAMONIK7777/antelopev2", name)
            for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")}  # fmt: skip
EVA = ("QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt")
SIGLIP = {("google/siglip-so400m-patch14-384", "config.json"), ("google/siglip-so400m-patch14-384", "model.safetensors")}
INSTANTID = {("InstantX/InstantID", "ip-adapter.bin"), ("InstantX/InstantID", "ControlNetModel/config.json"),
             ("InstantX/InstantID", "ControlNetModel/diffusion_pytorch_model.safetensors")}  # fmt: skip
VIT_H = {("h94/IP-Adapter", "models/image_encoder/config.json"), ("h94/IP-Adapter", "models/image_encoder/model.safetensors")}
CROSS = 32  # the tiny InstantID's UNet width: its adapter's and its IdentityNet's cross-attention input


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """hub/<owner>/<name>/<path>: tiny stand-ins for the files each family's download asks for."""
    from diffusers import ControlNetModel

    hub = tmp_path_factory.mktemp("hub")
    write_redux(hub / "black-forest-labs/FLUX.1-Redux-dev/flux1-redux-dev.safetensors", t5_width=32)
    build_siglip_vision(hub / "google/siglip-so400m-patch14-384")  # config.json + model.safetensors, so400m's width
    instantid = hub / "InstantX/InstantID"
    instantid.mkdir(parents=True)
    torch.save(adapter_tensors("plus", 512, [16, 16], CROSS, 1, tokens=4, dtype=torch.float32, resampler_dim=64),
               instantid / "ip-adapter.bin")  # fmt: skip
    net = ControlNetModel(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=CROSS, norm_num_groups=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=2,
                          conditioning_embedding_out_channels=(4, 8))  # fmt: skip
    net.save_pretrained(instantid / "ControlNetModel")
    write_eva_clip(hub / "QuanSun/EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt")
    write_pulid_flux(hub / "guozinan/PuLID/pulid_flux_v0.9.1.safetensors", flux_width=64, cas=2)
    write_pulid_flux(hub / "guozinan/PuLID/pulid_flux_v0.9.0.safetensors", flux_width=64, cas=2, seed=82)
    write_pulid_sdxl(hub / "guozinan/PuLID/pulid_v1.1.safetensors", [16, 32])
    for _, name in ANTELOPE:
        (hub / "DIAMONIK7777/antelopev2" / name).parent.mkdir(parents=True, exist_ok=True)
        (hub / "DIAMONIK7777/antelopev2" / name).write_bytes(b"onnx stand-in")
    return hub


class FakeHub:
    """`hf_hub_download(repo_id, filename, subfolder, local_dir)` from `hub` (a few bytes where it has no stand-in),
    and a URL fetch of facexlib's files; both record what was asked."""

    def __init__(self, hub: Path | None = None):
        self.hub, self.calls, self.urls = hub, [], []

    def fetch(self, repo_id, filename, subfolder=None, local_dir=None):
        path = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append((repo_id, path))
        target = Path(local_dir) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = self.hub / repo_id / path if self.hub else None
        if source is not None and source.is_file():
            shutil.copyfile(source, target)
        else:
            target.write_bytes(b"stand-in")
        return str(target)

    def fetch_url(self, url, target):
        self.urls.append(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"pth stand-in")
        return target


def asked(names, tmp_path):
    fake = FakeHub()
    download(names, tmp_path / "models", fetch=fake.fetch, fetch_url=fake.fetch_url)
    return set(fake.calls), fake.urls, len(fake.calls)


def test_each_family_asks_for_exactly_its_files(tmp_path):
    redux, urls, _ = asked(["FLUX Redux"], tmp_path / "redux")
    assert redux == {("black-forest-labs/FLUX.1-Redux-dev", "flux1-redux-dev.safetensors")} | SIGLIP and urls == []
    instantid, urls, _ = asked(["InstantID"], tmp_path / "instantid")
    assert instantid == INSTANTID | ANTELOPE and urls == []
    releases = sorted(facexlib_files.RELEASES.values())
    for name, stem in [("PuLID", "pulid_flux_v0.9.1"), ("PuLID FLUX v0.9.0", "pulid_flux_v0.9.0"),
                       ("PuLID SDXL v1.1", "pulid_v1.1")]:  # fmt: skip
        pulid, urls, _ = asked([name], tmp_path / stem)
        assert pulid == {("guozinan/PuLID", f"{stem}.safetensors"), EVA} | ANTELOPE and sorted(urls) == releases
    both, urls, count = asked(["PuLID", "PuLID SDXL v1.1"], tmp_path / "both")  # what they share, fetched once
    assert count == len(both) == 2 + 1 + len(ANTELOPE) and sorted(urls) == releases
    plus, urls, _ = asked(["Plus"], tmp_path / "plus")  # h94's adapters keep their CLIP encoder
    assert plus == {("h94/IP-Adapter", "models/ip-adapter-plus_sd15.safetensors")} | VIT_H and urls == []


def test_pulid_lands_where_the_store_the_face_pack_and_facexlib_lookups_find_it(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("IMPROMPT_INSIGHTFACE_ROOT", raising=False)
    models = tmp_path / "models"
    fake = FakeHub(hub)
    written = download(["PuLID", "PuLID SDXL v1.1"], models, fetch=fake.fetch, fetch_url=fake.fetch_url)
    store = ModelStore(models)
    for name in ("PuLID", "PuLID SDXL v1.1"):
        adapter = store.adapter(name)
        eva, _ = pick_eva(adapter, store)
        assert eva.path == models / "EVA-CLIP" / "EVA02_CLIP_L_336_psz14_s6B.pt"
        listed = pulid_listing(adapter, store)
        assert listed["encoder_present"] and listed["face_pack_present"] and listed["facexlib_present"], listed
    roots = insightface_roots([models])
    pack = FaceAnalyzer(roots).find_pack(ANTELOPE_PACK)
    assert pack == models / "insightface" / "models" / "antelopev2"
    found = facexlib_files.locate((facexlib_files.DETECTOR, facexlib_files.PARSER), [models], roots, "PuLID")
    assert set(found.values()) == {models / "facexlib" / name for name in found}
    assert written == [models / "PuLID" / "pulid_flux_v0.9.1.safetensors", eva.path, pack, *found.values(),
                       models / "PuLID" / "pulid_v1.1.safetensors"]  # fmt: skip
    fetched = len(fake.calls), len(fake.urls)
    download(["PuLID"], models, fetch=fake.fetch, fetch_url=fake.fetch_url)  # what is there is not fetched again
    assert (len(fake.calls), len(fake.urls)) == fetched


def test_redux_lands_beside_the_siglip_encoder_the_store_pairs_it_with(hub, tmp_path):
    models = tmp_path / "models"
    fake = FakeHub(hub)
    written = download(["FLUX Redux"], models, fetch=fake.fetch)
    store = ModelStore(models)
    adapter = store.adapter("FLUX Redux")
    encoder, why = pick_encoder(adapter, store)
    assert encoder.path == models / "siglip-so400m-patch14-384" and encoder.spec.model_type == "siglip", why
    assert written == [models / "FLUX.1-Redux-dev" / "flux1-redux-dev.safetensors", encoder.path]
    assert [e.path for e in store.encoders] == [encoder.path]  # no CLIP encoder was fetched


def test_instantid_lands_with_its_identitynet_and_antelopev2(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("IMPROMPT_INSIGHTFACE_ROOT", raising=False)
    models = tmp_path / "models"
    fake = FakeHub(hub)
    written = download(["InstantID"], models, fetch=fake.fetch)
    store = ModelStore(models)
    adapter = find_adapter(store, "InstantID")
    assert adapter is not None and adapter.path == models / "InstantID" / "ip-adapter.bin"
    net = find_identitynet(adapter, store, None, "ip_adapters.0")
    assert net.path == models / "InstantID" / "ControlNetModel"
    pack = FaceAnalyzer(insightface_roots([models])).find_pack(ANTELOPE_PACK)
    assert pack == models / "insightface" / "models" / "antelopev2"
    listed = instantid_listing(adapter, store)
    assert listed["identitynet_present"] and listed["face_pack_present"], listed
    assert written == [adapter.path, net.path, pack]
    assert store.encoders == []  # no CLIP encoder was fetched


def test_release_files_arrive_whole_or_not_at_all(tmp_path):
    """The plain-URL fetch (urllib) read through file:// URLs: the file appears complete, no temporary is left
    beside it; a URL that fails leaves nothing, and `download` says which file, from where, and where it goes."""
    source = tmp_path / "release" / "parsing_bisenet.pth"
    source.parent.mkdir()
    source.write_bytes(b"x" * (3 * 2**20 + 5))
    target = tmp_path / "models" / "facexlib" / "parsing_bisenet.pth"
    assert fetch_release(source.as_uri(), target) == target
    assert target.read_bytes() == source.read_bytes() and sorted(target.parent.iterdir()) == [target]
    with pytest.raises(OSError):
        fetch_release((tmp_path / "release" / "gone.pth").as_uri(), target.parent / "gone.pth")
    assert sorted(target.parent.iterdir()) == [target]

    def failing(url, path):
        return fetch_release((tmp_path / "release" / "gone.pth").as_uri(), path)

    with pytest.raises(MissingFaceAnalysisError, match=r"detection_Resnet50_Final\.pth.*releases/download/v0\.1\.0"):
        download(["PuLID"], tmp_path / "models", fetch=FakeHub().fetch, fetch_url=failing)
    assert sorted(target.parent.iterdir()) == [target]


def test_help_lists_what_each_name_fetches(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["download", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for known in catalog.KNOWN_ADAPTERS:
        assert known.name in text
    lines = text.split("what each NAME fetches into DIR besides its adapter file:")[1]
    pulid = lines[lines.index("PuLID FLUX v0.9.1"):]
    assert pulid.index("EVA02-CLIP-L-14-336 (QuanSun/EVA-CLIP)") < pulid.index("antelopev2") < pulid.index("BiSeNet")
    redux = lines[lines.index("FLUX Redux"):lines.index("PuLID FLUX v0.9.1")]
    assert "SigLIP-so400m-14-384 (google/siglip-so400m-patch14-384)" in redux and "ViT-H" not in redux
    instantid = lines[lines.index("InstantID"):lines.index("FLUX Redux")]
    assert "ControlNetModel/" in instantid and "antelopev2" in instantid and "ViT-H" not in instantid
