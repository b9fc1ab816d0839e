"""`ipadapter/text_attention.py` is diffusers' AttnProcessor2_0 split in two: with nothing added between the halves it
must give what diffusers' own processor gives, on the attention kinds diffusers builds (a UNet's cross-attention, a
VAE's group-normed self-attention over a 4-D input, a cross-attention that normalises its context)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from imprompt.ipadapter.text_attention import finished, text_attention

KINDS = {
    "cross-attention": dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8),
    "group-normed self-attention, 4-D, residual": dict(query_dim=32, heads=2, dim_head=16, norm_num_groups=8,
                                                       residual_connection=True, rescale_output_factor=2.0),
    "cross-attention with a normed context": dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8,
                                                  cross_attention_norm="layer_norm"),
    "cross-attention with QK norms": dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8,
                                          qk_norm="rms_norm"),
}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_two_halves_equal_diffusers_processor(kind):
    torch.manual_seed(0)
    attn = Attention(**KINDS[kind], processor=AttnProcessor2_0()).eval()
    cross = "cross_attention_dim" in KINDS[kind]
    states = torch.randn(2, 32, 4, 4) if not cross else torch.randn(2, 16, 32)
    context = torch.randn(2, 7, 24) if cross else None
    mask = torch.zeros(2, 1, 7) if cross else None  # additive, as diffusers' pipelines pass it
    if mask is not None:
        mask[1, :, 5:] = -10000.0
    with torch.no_grad():
        expected = attn(states, encoder_hidden_states=context, attention_mask=mask)
        text = text_attention(attn, states, context, mask)
        got = finished(attn, text, text.out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
