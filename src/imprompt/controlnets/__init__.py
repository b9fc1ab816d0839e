"""ControlNets beside the image prompts: which diffusers pipeline runs them (`pipelines.py`) and the A1111 ControlNet
extension's weights, windows and control modes on their outputs (`guidance.py`)."""
