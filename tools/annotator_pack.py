"""Tiny ControlNet preprocessor (annotator) weights, in the folders and file names where users keep the real ones.

The preprocessor tests need the real loading code to run end to end, offline: the file lookup in A1111's and
ComfyUI's trees, the key renaming of original checkpoints, the model built from the tensors' shapes. The real
files are hundreds of MB, so this writes random, deterministic weights of tiny widths with the real key names,
in three trees:

- `<folder>/a1111/`: the ControlNet extension's `extensions/sd-webui-controlnet/annotator/downloads/<sub>/<file>`
  (plus an empty `models/`, the root a user's models folder would be);
- `<folder>/comfyui/`: comfyui_controlnet_aux's `custom_nodes/comfyui_controlnet_aux/ckpts/<repo>/<file>` (and
  `models/`);
- `<folder>/imprompt/annotators/`: imprompt's own folder; Depth Anything there as a transformers folder.

`write_annotator_pack(folder)` returns the roots to search and, per part, what each writer returns. Each
preprocessor family has its own `write_<family>(pack_dirs) -> dict` function (helper A: Depth Anything; helper B:
DWPose, lineart, HED), listed in `WRITERS`.
"""

from __future__ import annotations

from pathlib import Path

A1111_DOWNLOADS = Path("extensions/sd-webui-controlnet/annotator/downloads")
COMFY_CKPTS = Path("custom_nodes/comfyui_controlnet_aux/ckpts")

# Tiny Depth Anything: 8 DINOv2 blocks of width 128 (2 heads of 64, as every real size), a DPT head of widths
# 16/32/64/64 fused at 32. 8 blocks make v1 (the last four) and v2 (every second) read different blocks.
DEPTH_TINY = dict(hidden=128, layers=8, mlp=512, neck=[16, 32, 64, 64], features=32, head=8)


def pack_dirs(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    dirs = {
        "a1111": folder / "a1111",
        "comfyui": folder / "comfyui",
        "imprompt": folder / "imprompt",
        "a1111_downloads": folder / "a1111" / A1111_DOWNLOADS,
        "comfyui_ckpts": folder / "comfyui" / COMFY_CKPTS,
        "annotators": folder / "imprompt" / "annotators",
    }
    for key in ("a1111", "comfyui"):
        (dirs[key] / "models").mkdir(parents=True, exist_ok=True)
    dirs["annotators"].mkdir(parents=True, exist_ok=True)
    return dirs


def tiny_depth_anything(version: int, seed: int):
    """A random tiny transformers DepthAnythingForDepthEstimation (v1 or v2 block choice)."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    t = DEPTH_TINY
    layers = t["layers"]
    indices = list(range(layers - 3, layers + 1)) if version == 1 else [2, 4, 6, 8]
    backbone = Dinov2Config(hidden_size=t["hidden"], num_hidden_layers=layers, num_attention_heads=t["hidden"] // 64,
                            mlp_ratio=t["mlp"] // t["hidden"], patch_size=14, image_size=518, layerscale_value=1.0,
                            out_indices=indices, apply_layernorm=True, reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=t["hidden"],
                                 neck_hidden_sizes=t["neck"], fusion_hidden_size=t["features"],
                                 head_hidden_size=t["head"], depth_estimation_type="relative")
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # no tensor left at its init constant (zeros, ones), so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.head.conv3.bias.fill_(0.5)  # the head ends in a ReLU: keep the depth positive, so the map varies
    return model


def original_depth_keys(hf_state: dict) -> dict:
    """The tensors under the original Depth Anything names (DINOv2 `pretrained.*`, DPT `depth_head.*`), q, k and v
    joined into one qkv, as the published .pth / .safetensors files hold them."""
    import torch

    out = {}
    refine = {0: 4, 1: 3, 2: 2, 3: 1}  # transformers' fusion layer i is the original refinenet(4 - i)
    for key, tensor in hf_state.items():
        parts = key.split(".")
        if key.startswith("backbone.embeddings."):
            name = {"cls_token": "pretrained.cls_token", "mask_token": "pretrained.mask_token",
                    "position_embeddings": "pretrained.pos_embed"}.get(parts[2])
            out[name or f"pretrained.patch_embed.proj.{parts[-1]}"] = tensor
        elif key.startswith("backbone.layernorm."):
            out[f"pretrained.norm.{parts[-1]}"] = tensor
        elif key.startswith("backbone.encoder.layer."):
            block, rest = parts[3], ".".join(parts[4:])
            if rest.startswith("attention.q_proj."):
                kind = parts[-1]
                q = tensor
                k = hf_state[key.replace("q_proj", "k_proj")]
                v = hf_state[key.replace("q_proj", "v_proj")]
                out[f"pretrained.blocks.{block}.attn.qkv.{kind}"] = torch.cat([q, k, v], dim=0)
            elif rest.startswith(("attention.k_proj.", "attention.v_proj.")):
                continue
            elif rest.startswith("attention.o_proj."):
                out[f"pretrained.blocks.{block}.attn.proj.{parts[-1]}"] = tensor
            elif rest.startswith("layer_scale"):
                out[f"pretrained.blocks.{block}.ls{rest[len('layer_scale')]}.gamma"] = tensor
            else:  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
                out[f"pretrained.blocks.{block}.{rest}"] = tensor
        elif key.startswith("neck.reassemble_stage.layers."):
            kind = "projects" if parts[4] == "projection" else "resize_layers"
            out[f"depth_head.{kind}.{parts[3]}.{parts[-1]}"] = tensor
        elif key.startswith("neck.convs."):
            out[f"depth_head.scratch.layer{int(parts[2]) + 1}_rn.{parts[-1]}"] = tensor
        elif key.startswith("neck.fusion_stage.layers."):
            net = f"depth_head.scratch.refinenet{refine[int(parts[3])]}"
            if parts[4] == "projection":
                out[f"{net}.out_conv.{parts[-1]}"] = tensor
            else:  # residual_layerN.convolutionM
                out[f"{net}.resConfUnit{parts[4][-1]}.conv{parts[5][-1]}.{parts[-1]}"] = tensor
        elif key.startswith("head."):
            name = {"conv1": "output_conv1", "conv2": "output_conv2.0", "conv3": "output_conv2.2"}[parts[1]]
            out[f"depth_head.scratch.{name}.{parts[-1]}"] = tensor
        else:
            raise KeyError(f"unmapped transformers key {key}")
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_depth_anything(dirs: dict[str, Path]) -> dict:
    """Depth Anything v1 (`depth_anything_vitl14.pth`) and v2 (`depth_anything_v2_vitl.safetensors` / `.pth`) in
    the extension's and ComfyUI's folders with original keys, and v1 as a transformers folder in imprompt's."""
    import torch
    from safetensors.torch import save_file

    v1, v2 = tiny_depth_anything(1, seed=11), tiny_depth_anything(2, seed=12)
    v1_sd, v2_sd = original_depth_keys(v1.state_dict()), original_depth_keys(v2.state_dict())
    paths = {
        "a1111_v1": dirs["a1111_downloads"] / "depth_anything" / "depth_anything_vitl14.pth",
        "a1111_v2": dirs["a1111_downloads"] / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors",
        "comfyui_v1": dirs["comfyui_ckpts"] / "LiheYoung" / "Depth-Anything" / "checkpoints"
        / "depth_anything_vitl14.pth",
        "comfyui_v2": dirs["comfyui_ckpts"] / "depth-anything" / "Depth-Anything-V2-Large" / "depth_anything_v2_vitl.pth",
        "imprompt_v1": dirs["annotators"] / "depth-anything",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(v1_sd, paths["a1111_v1"])
    torch.save(v1_sd, paths["comfyui_v1"])
    save_file(v2_sd, str(paths["a1111_v2"]))
    torch.save(v2_sd, paths["comfyui_v2"])
    v1.save_pretrained(paths["imprompt_v1"], safe_serialization=True)
    v2_hf = dirs["annotators"].parent / "transformers" / "depth-anything-v2"  # v2 as transformers: for the tests
    v2.save_pretrained(v2_hf, safe_serialization=True)
    paths["transformers_v2"] = v2_hf
    return paths


def in_both_trees(written: dict[str, Path], dirs: dict[str, Path], repo: str) -> dict:
    """The A1111 files a module's write_tiny_weights made, copied to ComfyUI's `ckpts/<repo>/` too."""
    import shutil

    comfy = dirs["comfyui_ckpts"] / repo
    comfy.mkdir(parents=True, exist_ok=True)
    copies = {name: Path(shutil.copyfile(path, comfy / name)) for name, path in written.items()}
    return {"a1111": written, "comfyui": copies}


def write_dwpose(dirs: dict[str, Path]) -> dict:
    """DWPose's tiny YOLOX and pose ONNX graphs (imprompt.preprocess.dwpose: real names, inputs and outputs)."""
    from imprompt.preprocess import dwpose

    return in_both_trees(dwpose.write_tiny_weights(dirs["a1111"]), dirs, "yzd-v/DWPose")


def write_lineart(dirs: dict[str, Path]) -> dict:
    """The lineart generators sk_model.pth / sk_model2.pth (real key names, width 4)."""
    from imprompt.preprocess import lineart

    return in_both_trees(lineart.write_tiny_weights(dirs["a1111"]), dirs, "lllyasviel/Annotators")


def write_hed(dirs: dict[str, Path]) -> dict:
    """ControlNet's HED, ControlNetHED.pth (real key names, widths 4..8)."""
    from imprompt.preprocess import hed

    return in_both_trees(hed.write_tiny_weights(dirs["a1111"]), dirs, "lllyasviel/Annotators")


WRITERS = [write_depth_anything, write_dwpose, write_lineart, write_hed]


def write_annotator_pack(folder) -> dict:
    """Every tiny annotator pack under `folder`. Returns {"roots": {tree: models root to search}, <writer's name
    without write_>: what it returned}."""
    dirs = pack_dirs(Path(folder))
    result: dict = {"roots": {"a1111": dirs["a1111"] / "models", "comfyui": dirs["comfyui"] / "models",
                              "imprompt": dirs["imprompt"]}, "dirs": dirs}
    for writer in WRITERS:
        result[writer.__name__.removeprefix("write_")] = writer(dirs)
    return result
