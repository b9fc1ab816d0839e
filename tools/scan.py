"""How long the model store takes to scan a big tree: first time, again in the same process, and in a new process.

    python -m tools.scan [--files 1000] [--tree DIR]

Writes a tree of tiny files in the real formats (LoRAs, embeddings and VAEs as safetensors, upscalers and
embeddings as pickles, in A1111's folder names) unless --tree names one, then times `ModelStore(tree)`: the first
scan probes every safetensors header (pickles are left unread), a rescan in the same process only stats, and a
scan in a new process finds everything it needs in the probe cache on disk. Prints the three times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tree(root: Path, files: int) -> Path:
    kinds = ("Lora", "embeddings", "VAE", "ESRGAN")
    for i in range(files):
        folder = root / kinds[i % len(kinds)] / f"group-{i % 17}"
        folder.mkdir(parents=True, exist_ok=True)
        if kinds[i % len(kinds)] == "Lora":
            name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
            save_file({f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(64, 4)},
                      folder / f"lora-{i}.safetensors")  # fmt: skip
        elif kinds[i % len(kinds)] == "embeddings":
            save_file({"emb_params": torch.zeros(2, 768)}, folder / f"embedding-{i}.safetensors")
        elif kinds[i % len(kinds)] == "VAE":
            save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(8, 4, 1, 1)},
                      folder / f"vae-{i}.safetensors")  # fmt: skip
        else:
            torch.save({"model.0.weight": torch.zeros(1), "model.1.sub.0.RDB1.conv1.0.weight": torch.zeros(1)},
                       folder / f"upscaler-{i}.pth")  # fmt: skip
    return root


TIMED = """
import json, sys, time
from imprompt.models.store import ModelStore
started = time.perf_counter()
store = ModelStore(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started, "probes": store.probes, "entries": len(store.entries)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.scan", description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--tree", type=Path, help="an existing models tree (default: write one of --files files)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="imprompt-scan-"))
    try:
        return timed_scans(work, args)
    finally:
        shutil.rmtree(work)  # only the folder this run created


def timed_scans(work: Path, args: argparse.Namespace) -> int:
    os.environ["IMPROMPT_CACHE_DIR"] = str(work / "cache")  # a cold cache, not the user's
    tree = args.tree or write_tree(work / "models", args.files)
    from imprompt.models.store import ModelStore

    started = time.perf_counter()
    store = ModelStore(tree)
    first = {"seconds": time.perf_counter() - started, "probes": store.probes, "entries": len(store.entries)}
    started = time.perf_counter()
    store.refresh()
    rescan = {"seconds": time.perf_counter() - started, "probes": store.probes - first["probes"]}
    done = subprocess.run([sys.executable, "-c", TIMED, str(tree)], capture_output=True, text=True, check=True)
    fresh = json.loads(done.stdout)
    print(json.dumps({"files": first["entries"], "first_scan": first, "rescan_same_process": rescan,
                      "scan_in_a_new_process": fresh}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
