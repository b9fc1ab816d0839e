"""Depth Anything (v1 and v2) through transformers' DepthAnythingForDepthEstimation, from the files users keep.

The ControlNet extension and comfyui_controlnet_aux keep the original checkpoints (`depth_anything_vitl14.pth`,
`depth_anything_v2_vitl.safetensors` / `.pth`), whose keys are the original DPT + DINOv2 names
(`pretrained.blocks.N.attn.qkv`, `depth_head.scratch.refinenetN...`). They are renamed here to transformers'
names (the mapping below, written from the two layouts' key names) and the config is read from the tensors, so
no hub access is needed. A transformers folder (config.json + safetensors) loads as it is.

The run is the extension's: the padded detector input, fed to the network with its channels swapped (the
extension converts its RGB image with OpenCV's BGR2RGB), resized to at least 518 in multiples of 14 (cubic),
ImageNet-normalised; the depth resized back (bilinear), stretched to 0..255 and truncated to uint8, grey.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UnsupportedError
from .loaded import cached_model
from .resize import hwc3, resize_with_pad

NET_SIZE, MULTIPLE = 518, 14
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
HEAD_WIDTH = 64  # every published DINOv2 uses 64-wide attention heads (vits 6, vitb 12, vitl 16, vitg 24 heads)
# v2 reads fixed blocks (0-based: vits/vitb 2,5,8,11; vitl 4,11,17,23; vitg 9,19,29,39); v1 the last four.
V2_BLOCKS = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}


def out_indices(layers: int, version: int) -> list[int]:
    """transformers' stage indices (block index + 1) of the four feature maps the head reads."""
    if version == 1 or layers % 4:
        blocks = range(layers - 4, layers)
    else:
        blocks = V2_BLOCKS.get(layers, tuple(layers // 4 * k - 1 for k in range(1, 5)))
    return [b + 1 for b in blocks]


FUSION = {4: 0, 3: 1, 2: 2, 1: 3}  # the original refines from refinenet4 (deepest) down; transformers from layer 0
RULES = (
    (r"pretrained\.cls_token", "backbone.embeddings.cls_token"),
    (r"pretrained\.mask_token", "backbone.embeddings.mask_token"),
    (r"pretrained\.pos_embed", "backbone.embeddings.position_embeddings"),
    (r"pretrained\.patch_embed\.proj\.", "backbone.embeddings.patch_embeddings.projection."),
    (r"pretrained\.norm\.", "backbone.layernorm."),
    (r"pretrained\.blocks\.(\d+)\.norm(\d)\.", r"backbone.encoder.layer.\1.norm\2."),
    (r"pretrained\.blocks\.(\d+)\.attn\.proj\.", r"backbone.encoder.layer.\1.attention.o_proj."),
    (r"pretrained\.blocks\.(\d+)\.ls(\d)\.gamma", r"backbone.encoder.layer.\1.layer_scale\2.lambda1"),
    (r"pretrained\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"backbone.encoder.layer.\1.mlp.fc\2."),
    (r"depth_head\.projects\.(\d)\.", r"neck.reassemble_stage.layers.\1.projection."),
    (r"depth_head\.resize_layers\.(\d)\.", r"neck.reassemble_stage.layers.\1.resize."),
    (r"depth_head\.scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m.group(1)) - 1}."),
    (r"depth_head\.scratch\.refinenet(\d)\.out_conv\.",
     lambda m: f"neck.fusion_stage.layers.{FUSION[int(m.group(1))]}.projection."),
    (r"depth_head\.scratch\.refinenet(\d)\.resConfUnit(\d)\.conv(\d)\.",
     lambda m: f"neck.fusion_stage.layers.{FUSION[int(m.group(1))]}.residual_layer{m.group(2)}"
               f".convolution{m.group(3)}."),
    (r"depth_head\.scratch\.output_conv1\.", "head.conv1."),
    (r"depth_head\.scratch\.output_conv2\.0\.", "head.conv2."),
    (r"depth_head\.scratch\.output_conv2\.2\.", "head.conv3."),
)


def transformers_state_dict(original: dict, path: Path) -> dict:
    """The original checkpoint's tensors under transformers' names (qkv split into q, k and v)."""
    converted = {}
    for key, tensor in original.items():
        qkv = re.fullmatch(r"pretrained\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if qkv:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"backbone.encoder.layer.{qkv.group(1)}.attention.{part}.{qkv.group(2)}"] = chunk
            continue
        for pattern, target in RULES:
            new, count = re.subn(f"^{pattern}", target, key)
            if count:
                converted[new] = tensor
                break
        else:
            raise CheckpointError(path, f"tensor {key!r} is not part of a Depth Anything checkpoint (DINOv2 "
                                        "'pretrained.*' and DPT 'depth_head.*' keys were expected)",
                                  "Use the depth_anything_vitl14.pth / depth_anything_v2_vitl file as published")
    return converted


def config_from_tensors(sd: dict, version: int, path: Path):
    """transformers' DepthAnythingConfig read from an original checkpoint's tensor shapes."""
    from transformers import DepthAnythingConfig, Dinov2Config

    if any(".mlp.w12." in key for key in sd):
        raise UnsupportedError(f"{path}: a Depth Anything giant (ViT-g, SwiGLU) checkpoint; transformers' Depth "
                               "Anything has no such backbone. Use the vitl (large) file")
    if any(key.startswith("depth_head.readout_projects") for key in sd):
        raise UnsupportedError(f"{path}: a Depth Anything head with class-token readout, which transformers does "
                               "not build. Use the published depth_anything_vitl14 / v2 vitl file")
    try:
        hidden = sd["pretrained.cls_token"].shape[-1]
        patch = sd["pretrained.patch_embed.proj.weight"].shape[-1]
        grid = int(round((sd["pretrained.pos_embed"].shape[1] - 1) ** 0.5))
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks."))
        mlp = sd["pretrained.blocks.0.mlp.fc1.weight"].shape[0]
        neck = [sd[f"depth_head.projects.{i}.weight"].shape[0] for i in range(4)]
        features = sd["depth_head.scratch.layer1_rn.weight"].shape[0]
        head = sd["depth_head.scratch.output_conv2.0.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(path, f"tensor {missing} is missing: not a whole Depth Anything checkpoint",
                              "Download the file again") from None
    backbone = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_WIDTH),
        mlp_ratio=mlp // hidden, patch_size=patch, image_size=grid * patch, layerscale_value=1.0,
        out_indices=out_indices(layers, version), apply_layernorm=True, reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, patch_size=patch, reassemble_hidden_size=hidden,
                               neck_hidden_sizes=neck, fusion_hidden_size=features, head_hidden_size=head,
                               depth_estimation_type="relative")


def load_model(path: Path, version: int):
    """The model in eval mode on the CPU, from an original checkpoint file or a transformers folder."""
    import torch
    from transformers import DepthAnythingForDepthEstimation

    path = Path(path)
    if path.is_dir():
        return DepthAnythingForDepthEstimation.from_pretrained(path, local_files_only=True).eval()
    from ..loading.tensors import read_tensors

    original = read_tensors(path, dtype=torch.float32)
    config = config_from_tensors(original, version, path)
    model = DepthAnythingForDepthEstimation(config).eval()
    result = model.load_state_dict(transformers_state_dict(original, path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(path, f"the Depth Anything tensors do not fit the model read from them "
                                    f"(missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})",
                              "Download the file again")
    return model


def model_for(path: Path, version: int):
    """The model of `path`, kept while the file is unchanged (`loaded.py`)."""
    return cached_model(path, lambda: load_model(Path(path), version), f"v{version}")


def net_size(height: int, width: int) -> tuple[int, int]:
    """Depth Anything's input size: aspect kept, neither side under 518, each a multiple of 14 (lower bound)."""
    scale_h, scale_w = NET_SIZE / height, NET_SIZE / width
    scale_h = scale_w = max(scale_h, scale_w)

    def constrain(x: float) -> int:
        y = int((np.round(x / MULTIPLE) * MULTIPLE))
        return int(np.ceil(x / MULTIPLE) * MULTIPLE) if y < NET_SIZE else y

    return constrain(scale_h * height), constrain(scale_w * width)


def estimate(model, img: np.ndarray) -> np.ndarray:
    """The extension's depth map of an (already padded) RGB uint8 image, as HxW uint8."""
    import cv2
    import torch
    import torch.nn.functional as F

    h, w = img.shape[:2]
    x = img[:, :, ::-1].astype(np.float64) / 255.0
    new_h, new_w = net_size(h, w)
    x = cv2.resize(x, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    x = np.ascontiguousarray(np.transpose((x - MEAN) / STD, (2, 0, 1))).astype(np.float32)
    with torch.no_grad():
        depth = model(pixel_values=torch.from_numpy(x)[None]).predicted_depth
        depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = depth.min(), depth.max()
    if float(hi - lo) == 0.0:
        return np.zeros((h, w), np.uint8)
    return ((depth - lo) / (hi - lo) * 255.0).numpy().astype(np.uint8)


def run(image, resolution, weights: dict, file: str, version: int) -> np.ndarray:
    img, remove_pad = resize_with_pad(image, resolution)
    return hwc3(remove_pad(estimate(model_for(weights[file], version), img)))


def depth_anything(image, resolution, a, b, weights):
    """depth_anything: v1 (vitl14), grey (the extension registers it uncoloured)."""
    return run(image, resolution, weights, "depth_anything_vitl14.pth", 1)


def depth_anything_v2(image, resolution, a, b, weights):
    """depth_anything_v2: v2 (vitl), grey."""
    return run(image, resolution, weights, "depth_anything_v2_vitl.safetensors", 2)
