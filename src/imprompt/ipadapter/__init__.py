"""Image prompts: adapter modules, their attachment to the UNet, embeddings, per-block weights.

`build` turns an adapter file into modules, `block_weights` expands per-block weights, `embeddings` turns
reference images into embeddings with the encoder each adapter needs, `attach` puts a set of adapters on a UNet.
"""
