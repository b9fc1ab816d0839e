"""ControlNets beside the image prompts: the pipeline that runs them, and the A1111 extension's rules on them.

Which diffusers pipeline runs them (`pipelines.py`); the extension's weights, windows and control modes on their
outputs (`guidance.py`)."""
