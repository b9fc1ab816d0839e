"""Specs -> modules, safely: checkpoint tensors, pipelines and image encoders."""
