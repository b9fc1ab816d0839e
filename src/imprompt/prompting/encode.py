"""Prompt text -> the embeddings diffusers' pipelines take (`prompt_embeds`, ...), the way A1111 makes them.

diffusers cuts a prompt at 77 tokens and has no attention weights; A1111 clients rely on both. So the text is
parsed (`syntax.py`), cut into chunks of 75 tokens (a chunk ends at BREAK, and a chunk that fills up moves the
words after its last comma, if that comma is at most 20 tokens back, into the next one), each chunk is framed by
the begin / end tokens and encoded on its own, the weights multiply each token's vectors and the chunk's mean is
restored (A1111's "Original" emphasis), and the chunks are concatenated. Textual-inversion embeddings replace the
token vectors of their name, found token by token as A1111 finds them.

For a prompt of at most 75 tokens without weights this is exactly what diffusers' `encode_prompt` computes (the
tests hold it to that), so the IP-Adapter path after it is diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LimitError
from .syntax import BREAK, MAX_CHUNKS, parse_attention

CHUNK = 75  # tokens per chunk, between the begin and end tokens
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`


@dataclass(frozen=True)
class Inversion:
    """A textual-inversion embedding ready to use: its name and its vectors for each text encoder."""

    name: str
    vectors: tuple[torch.Tensor, ...]  # one [n, width] tensor per text encoder of the pipeline
    hash: str  # A1111's short hash (for `TI hashes` in the infotext)


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, vectors) of embeddings


@dataclass(frozen=True)
class Reading:
    """Which layer of each text encoder a prompt is read from, as A1111 reads it (its settings' names). SD 1.5:
    `clip_skip` layers from the end, through the final layer norm (1: the last). SDXL: CLIP-L's and CLIP-G's
    penultimate layers whatever the clip skip (A1111's default), unless `sdxl_clip_l_skip`: then CLIP-L's
    `clip_skip`-th layer from the end (1: the last), CLIP-G's still the penultimate."""

    clip_skip: int = 1
    sdxl_clip_l_skip: bool = False

    def layers(self, xl: bool) -> list[tuple[int, bool] | None]:
        """Per text encoder: (which hidden state from the end, through the final norm?), or None for its output."""
        if not xl:
            return [None if self.clip_skip == 1 else (self.clip_skip, True)]
        return [(self.clip_skip if self.sdxl_clip_l_skip else 2, False), (2, False)]


def zero_negative(positive: torch.Tensor, pooled: torch.Tensor):
    """SDXL's empty negative prompt: zeros of one chunk and of the pooled vector (diffusers, and A1111's
    `force_zero_negative_prompt`)."""
    return torch.zeros_like(positive[:, :77]), torch.zeros_like(pooled)


def lengthen(embeds: torch.Tensor, other: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """`embeds` followed by as many empty-prompt chunks as make it as long as `other`."""
    missing = (other.shape[1] - embeds.shape[1]) // empty.shape[1]
    return torch.cat([embeds] + [empty] * missing, dim=1) if missing > 0 else embeds


def encode_text(pipeline, text: str, reading: Reading, inversions: list[Inversion], used: dict, field: str):
    """One text through every text encoder of the pipeline: [1, 77 * chunks, width] and SDXL's pooled vector."""
    xl = getattr(pipeline, "text_encoder_2", None) is not None
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if xl:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    per_encoder, pooled = [], None
    chunk_lists = [chunks(text, tokenizer, [(i.name, i.vectors[e], i) for i in inversions], used)
                   for e, (tokenizer, _) in enumerate(pairs)]  # fmt: skip
    count = max(len(c) for c in chunk_lists)
    if count > MAX_CHUNKS:
        raise LimitError(f"{field}: {count} chunks of 75 tokens (BREAK starts one) is more than the {MAX_CHUNKS} a "
                         f"prompt may fill; shorten it")  # fmt: skip
    for (tokenizer, encoder), chunk_list, layer in zip(pairs, chunk_lists, reading.layers(xl)):
        chunk_list = chunk_list + [empty_chunk(tokenizer)] * (count - len(chunk_list))
        outputs = []
        for i, chunk in enumerate(chunk_list):
            z, chunk_pooled = _encode_chunk(tokenizer, encoder, chunk, layer)
            outputs.append(z)
            if i == 0 and chunk_pooled is not None:
                pooled = chunk_pooled  # SDXL: the pooled vector of the first chunk, as A1111 takes it
        per_encoder.append(torch.cat(outputs, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


def _encode_chunk(tokenizer, encoder, chunk: Chunk, layer: tuple[int, bool] | None):
    ids = [tokenizer.bos_token_id] + chunk.tokens + [tokenizer.eos_token_id]
    pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad != end:  # SDXL's second tokenizer: everything after the first end token is padding
        first_end = ids.index(end)
        ids = ids[: first_end + 1] + [pad] * (len(ids) - first_end - 1)
    device = encoder.device
    input_ids = torch.tensor([ids], device=device)
    hook = None
    if chunk.fixes:
        def replace(module, args, output):
            output = output.clone()
            for position, vectors in chunk.fixes:
                output[0, 1 + position : 1 + position + len(vectors)] = vectors.to(output.dtype)
            return output

        hook = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        out = encoder(input_ids, output_hidden_states=layer is not None)
    finally:
        if hook is not None:
            hook.remove()
    pooled = out[0] if out[0].ndim == 2 else None  # SDXL's CLIP-G with its projection: the pooled vector
    if layer is None:
        z = out[0]
    else:
        back, normed = layer
        z = out.hidden_states[-back]
        if normed:  # A1111's CLIP_stop_at_last_layers on SD 1.5: that layer, through the final layer norm
            z = getattr(encoder, "text_model", encoder).final_layer_norm(z)
    if any(w != 1.0 for w in chunk.weights):
        weights = torch.tensor([1.0] + chunk.weights + [1.0], device=z.device, dtype=z.dtype)
        original_mean = z.mean()
        z = z * weights.reshape(1, -1, 1).expand(z.shape)
        z = z * (original_mean / z.mean())
    return z, pooled


def empty_chunk(tokenizer) -> Chunk:
    return Chunk([tokenizer.eos_token_id] * CHUNK, [1.0] * CHUNK)


def chunks(text: str, tokenizer, inversions: list[tuple[str, torch.Tensor, Inversion]], used: dict) -> list[Chunk]:
    """The text as 75-token chunks with a weight per token, A1111's way (see the module docstring)."""
    names = sorted(((tokenizer(name, add_special_tokens=False, verbose=False).input_ids, vectors, inv)
                    for name, vectors, inv in inversions), key=lambda n: -len(n[0]))  # fmt: skip
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    done: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        missing = CHUNK - len(chunk.tokens)
        chunk.tokens += [tokenizer.eos_token_id] * missing
        chunk.weights += [1.0] * missing
        done.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment in parse_attention(text):
        if fragment is BREAK:
            close()
            continue
        words, weight = fragment
        tokens = tokenizer(words, add_special_tokens=False, verbose=False).input_ids if words else []
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK and last_comma != -1 and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                moved_tokens, moved_weights = chunk.tokens[last_comma + 1 :], chunk.weights[last_comma + 1 :]
                chunk.tokens, chunk.weights = chunk.tokens[: last_comma + 1], chunk.weights[: last_comma + 1]
                close()
                chunk.tokens, chunk.weights = moved_tokens, moved_weights
            if len(chunk.tokens) == CHUNK:
                close()
            match = next(((ids, vectors, inv) for ids, vectors, inv in names
                          if ids and tokens[position : position + len(ids)] == ids), None)  # fmt: skip
            if match is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            ids, vectors, inversion = match
            if len(chunk.tokens) + len(vectors) > CHUNK:
                close()
            chunk.fixes.append((len(chunk.tokens), vectors))
            chunk.tokens += [0] * len(vectors)
            chunk.weights += [weight] * len(vectors)
            used[inversion.name] = inversion
            position += len(ids)
    if chunk.tokens or not done:
        close()
    return done
