"""A textual-inversion file from the tree (A1111's embeddings/) as vectors for the prompt encoder.

Formats: A1111's `.pt` (`string_to_param`), `emb_params` safetensors, a diffusers concept (one token -> vectors),
and SDXL's two-encoder files (`clip_l`, `clip_g`). The vectors are not added to the tokenizer (as diffusers'
`load_textual_inversion` would, for good): the prompt encoder puts them where their name is, for this request
only, so a name never changes how any other prompt is read.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.recognise import unwrapped
from ..models.store import Entry
from ..prompting.encode import Inversion
from .tensors import read_tensors


def load_inversion(entry: Entry, device: torch.device, dtype: torch.dtype, short_hash: str) -> Inversion:
    """`short_hash`: A1111's "TI hashes" entry for the file (the store's `a1111_hash`)."""
    tensors = unwrapped(read_tensors(entry.path))
    if len(entry.spec.widths) == 2:
        vectors = (tensors["clip_l"], tensors["clip_g"])
    else:
        keys = [k for k in tensors if k.startswith("string_to_param.")] or list(tensors)
        vectors = (tensors[keys[0]],)
    vectors = tuple(v.reshape(-1, v.shape[-1]).to(device=device, dtype=dtype) for v in vectors)
    if tuple(v.shape[-1] for v in vectors) != entry.spec.widths:
        raise CheckpointError(entry.path, "its vectors changed shape since it was scanned", "Refresh the models list")
    return Inversion(entry.name, vectors, short_hash)
