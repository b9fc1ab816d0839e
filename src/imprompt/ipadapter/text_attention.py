"""diffusers' `AttnProcessor2_0` in two halves, for processors that add attention of their own before `to_out`.

The first half is the text attention (its output, query and what the second half needs), the second `to_out`,
the input's shape back, the residual and the rescale. imprompt's processors that add attention of their own (the
compile-stable `SlotProcessor`, PuLID's `IDAttnProcessor`) share this instead of each repeating diffusers' prologue
and epilogue."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class TextAttention(NamedTuple):
    """The text attention's output ([batch, tokens, heads*head]) with what the epilogue and added attentions need.
    A NamedTuple so torch.compile traces it as plain tensors and ints."""

    out: torch.Tensor
    query: torch.Tensor  # [batch, heads, tokens, head]
    residual: torch.Tensor
    batch: int
    head: int
    image_shape: tuple | None  # (channel, height, width) when the input was 4-D


def text_attention(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                   temb=None) -> TextAttention:  # fmt: skip
    """The first half: what `AttnProcessor2_0` computes up to the heads' merged output."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = None
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        image_shape = (channel, height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:  # self-attention: the keys from the group-normed states, as diffusers'
        context = hidden_states
    else:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    key, value = attn.to_k(context), attn.to_v(context)
    head = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:  # QK norms (none in the UNets imprompt attaches to), as diffusers applies them
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
    return TextAttention(out, query, residual, batch, head, image_shape)


def split_heads(attn: Attention, text: TextAttention, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, heads*head] keys or values -> [batch, heads, tokens, head], as the text's."""
    return tokens.view(text.batch, -1, attn.heads, text.head).transpose(1, 2)


def merge_heads(attn: Attention, text: TextAttention, out: torch.Tensor) -> torch.Tensor:
    """An attention's [batch, heads, tokens, head] output -> [batch, tokens, heads*head] in the query's dtype."""
    return out.transpose(1, 2).reshape(text.batch, -1, attn.heads * text.head).to(text.query.dtype)


def finished(attn: Attention, text: TextAttention, out: torch.Tensor) -> torch.Tensor:
    """diffusers' epilogue: `to_out`, back to the input's shape, the residual, the output rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if text.image_shape is not None:
        out = out.transpose(-1, -2).reshape(text.batch, *text.image_shape)
    if attn.residual_connection:
        out = out + text.residual
    return out / attn.rescale_output_factor
