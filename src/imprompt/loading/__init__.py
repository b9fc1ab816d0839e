"""Specs -> modules, safely: checkpoint tensors, pipelines, image encoders, LoRAs, VAEs, textual inversions."""
