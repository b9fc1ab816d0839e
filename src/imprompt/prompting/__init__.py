"""Prompt text -> text-encoder embeddings, as A1111 reads it: LoRA tags, attention weights, 75-token chunks."""
