# One command to set up and run the demo, one to run the tests. Both work on a fresh machine with only
# python3 (3.11+) and make: they create .venv, install torch==2.13.0 first, then imprompt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test serve bench bench-lora bench-models bench-controlnet bench-cold bench-cluster bench-transformers bench-flux bench-image-prompts scan soak load train evaluate install clean

demo: install
	$(BIN)/imprompt demo --pack demo-models --out demo-output

serve: install
	$(BIN)/imprompt pack demo-models
	$(BIN)/imprompt serve --models demo-models

test: install
	$(BIN)/python -m pytest -q

# Development tools (tools/, not installed with imprompt).
# Not part of the tests: real-size models (about 7 GB, built once into .bench-cache), about 40 minutes on 2 AVX-512
# cores (two to three times that on AVX2-only ones); imprompt and the expert script alternate over 2 rounds.
# `python -m tools.bench --quick` runs each phase once.
bench: install
	$(BIN)/python -m tools.bench --size real --trials 5

# Switching LoRA sets and a step with a LoRA, real SD 1.5 size (the same .bench-cache), about 15 minutes.
bench-lora: install
	$(BIN)/python -m tools.bench_lora

# Switching between two real-size SD 1.5 models: resident vs reloaded (the same .bench-cache), about 10 minutes.
bench-models: install
	$(BIN)/python -m tools.bench_models

# Switching two real-size SD 1.5 ControlNets (resident vs diffusers' reload), the preprocessor cache (canny, Depth
# Anything v2 ViT-L), a step with one ControlNet vs none (the same .bench-cache, plus 2.7 GB once); about 20 minutes on
# 2 shared cores at 1 thread, most of it the 512 px steps and their decodes.
# On a machine shared with other work, THREADS=1 keeps torch from waiting on a descheduled thread.
bench-controlnet: install
	$(BIN)/python -m tools.bench_controlnet $(if $(THREADS),--threads $(THREADS))

# Time from `imprompt generate` / `imprompt serve` to the first image on the demo pack, this tree alone or against
# BASELINE=<an older checkout, e.g. a git worktree>, alternated; about 10 minutes.
bench-cold: install
	$(BIN)/python -m tools.bench_cold --size tiny $(if $(BASELINE),--baseline-src $(BASELINE)/src)

# One process against a local Ray Serve cluster (2 + 2 replicas), the same requests side by side, and the routing
# simulation of docs/scale-out.md; about 5 minutes.
bench-cluster: install
	$(BIN)/python -m tools.bench_cluster --out docs/scale-out.json
	$(BIN)/python -m tools.scale_sim --requests 5000 --rate 1.5

# SD 3.5 and FLUX at real size (random weights; adapters and encoders only, the transformers do not fit in fp32):
# switching between their adapters against diffusers' reload path and an expert script, and SigLIP's cache.
# Writes about 7 GB into .bench-cache/ once; about 5 minutes.
bench-transformers: install
	$(BIN)/python -m tools.bench_transformers --out docs/transformers-benchmark.json

# FLUX.1-dev's transformer at real size (random weights) as bf16, fp8 and GGUF Q8_0 files in ComfyUI's split layout:
# loading each on the CPU (imprompt vs diffusers' from_single_file, a fresh process each, memory-capped) and the memory
# plan for a 16 / 24 GB GPU; one format on disk at a time (up to 24 GB in .bench-cache); about 15 minutes.
# GPU=1: the steps at 1024x1024 and the plans under a simulated 16 / 24 GB device instead (one CUDA device).
bench-flux: install
	$(BIN)/python -m tools.bench_flux_formats $(if $(GPU),--gpu)

# FLUX Redux, XLabs and PuLID at real size (random weights; FLUX at real width, 1 + 1 blocks): switching among them
# resident vs reloaded per request, and EVA-CLIP's / SigLIP's embedding caches. About 8 GB into .bench-cache once.
bench-image-prompts: install
	$(BIN)/python -m tools.bench_image_prompts $(if $(THREADS),--threads $(THREADS))

# How long scanning a tree of 1,000 files takes: first, again, and in a new process.
scan: install
	$(BIN)/python -m tools.scan --files 1000

# Not part of the tests: 5,000 random requests through one engine, and 8 clients x 50 requests through the server.
soak: install
	$(BIN)/python -m tools.soak --requests 5000

load: install
	$(BIN)/python -m tools.loadtest --clients 8 --requests 50

# Not part of the tests: train tiny SD 1.5 weights and adapters on flat shapes into src/imprompt/demo/weights/
# (about an hour on 2 cores), then judge them on 100 held-out references (docs/demo-pack.json and a grid image).
train: install
	$(BIN)/python -m tools.training

evaluate: install
	$(BIN)/python -m tools.evaluation

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,faceid,cluster,controlnet]"
	touch $@

clean:
	rm -rf $(VENV) demo-models demo-output .pytest_cache .hypothesis .soak
