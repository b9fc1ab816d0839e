"""`make bench-cold` (`python -m tools.bench_cold`): time from a command to its first image, two versions side by side.

What a user waits for after typing the command, measured from outside as whole processes (each a fresh Python):
- `imprompt generate` with one IP-Adapter unit: process start to the image written (imports, model-folder scan,
  pipeline load, encoder load, denoising);
- `imprompt serve`: process start to `/healthz` answering, and to the first txt2img image, for a client that
  asks as soon as the server answers and for one that asks `--think` seconds after the start (someone opening the
  page and typing a prompt).
Two source trees are compared (`--src` and `--baseline-src`, e.g. a `git worktree` of an earlier commit), their
runs alternated round by round (A B, B A, ...) so that drifts of the machine hit both alike; each row gives the
median and min-max over the rounds. The probe cache is warm (a first run of each tree is not counted): the
numbers are those of a user's second start. Servers bind 127.0.0.1 and are stopped by their PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from .bench import build_models, machine, reference_image

MODEL = {"tiny": "tiny-sd15", "real": "sd15"}
POLL_SECONDS = 0.1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(src: Path, cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "IMPROMPT_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}


def time_generate(src: Path, root: Path, args, work: Path) -> dict:
    out, ref = work / "out.png", work / "ref.png"
    reference_image().save(ref)
    command = [sys.executable, "-m", "imprompt.cli", "generate", "--models", str(root), "--model", MODEL[args.size],
               "--prompt", "a shape", "--steps", str(args.steps), "--width", str(args.px), "--height", str(args.px),
               "--seed", "1", "--ip", f"Base:{ref}", "--out", str(out), "--json"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=environment(src, work / "cache"), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"generate failed with {src}:\n{done.stderr[-3000:]}")
    info = json.loads(done.stdout)
    timings = info.get("timings", {})
    return {"first_image_s": wall, "request_s": timings.get("total"), "load_s": timings.get("load")}


def time_serve(src: Path, root: Path, args, work: Path, think: float) -> dict:
    """Start `imprompt serve`, wait for /healthz (bounded), then for `think` seconds after the start, then one
    txt2img; the server is stopped by its PID whatever happens."""
    port = free_port()
    command = [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(root), "--model", MODEL[args.size],
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = (work / f"serve-{port}.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment(src, work / "cache"), stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError(f"serve did not answer: {(work / f'serve-{port}.log').read_text()[-2000:]}")
                time.sleep(POLL_SECONDS)
        answering = time.perf_counter() - started
        time.sleep(max(0.0, think - answering))
        asked = time.perf_counter()
        payload = {"prompt": "a shape", "steps": args.steps, "width": args.px, "height": args.px, "seed": 1}
        httpx.post(f"{url}/sdapi/v1/txt2img", json=payload, timeout=900).raise_for_status()
        now = time.perf_counter()
        return {"answering_s": answering, "first_image_s": now - started, "request_s": now - asked}
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone (it failed): its log says why
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and anything it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


CASES = {
    "generate": lambda src, root, args, work: time_generate(src, root, args, work),
    "serve, request at once": lambda src, root, args, work: time_serve(src, root, args, work, 0.0),
    "serve, request after think time": lambda src, root, args, work: time_serve(src, root, args, work, args.think),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_cold", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny", help="the demo pack, or real SD 1.5 size")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"), help="where the models are built once")
    parser.add_argument("--src", type=Path, default=Path("src"), help="the imprompt source tree to time")
    parser.add_argument("--baseline-src", type=Path, help="another source tree, timed alternately (before/after)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--think", type=float, default=20.0, help="seconds from the start to the later request")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--px", type=int, help="image size (default 64 tiny, 256 real)")
    parser.add_argument("--out", type=Path, help="append the report to this markdown file (and .json beside it)")
    args = parser.parse_args(argv)
    args.px = args.px or (64 if args.size == "tiny" else 256)
    root = build_models(args.cache, args.size)
    trees = {"this tree": args.src.resolve()} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    results: dict[str, dict[str, list[dict]]] = {label: {case: [] for case in CASES} for label in trees}
    with tempfile.TemporaryDirectory(prefix="imprompt-cold-") as tmp:
        works = {label: Path(tmp) / label.replace(" ", "-") for label in trees}
        for label, src in trees.items():  # warm-up, not counted: the probe cache and the page cache
            works[label].mkdir()
            time_generate(src, root, args, works[label])
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for case, run in CASES.items():
                for label in order:
                    print(f"bench-cold: round {round_ + 1}, {case}, {label} ...", file=sys.stderr, flush=True)
                    results[label][case].append(run(trees[label], root, args, works[label]))
    report = render(results, trees, args)
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")
        raw = args.out.with_suffix(".json")
        runs = json.loads(raw.read_text()) if raw.is_file() else []
        runs.append({"machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "args": {k: str(v) for k, v in vars(args).items()}, "trees": {k: str(v) for k, v in trees.items()},
                     "results": results})  # fmt: skip
        raw.write_text(json.dumps(runs, indent=2))
    return 0


def render(results: dict, trees: dict, args) -> str:
    m = machine()

    def cell(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return "–"
        return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"

    lines = [f"### {args.size} models, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; torch {m['torch']}. "
             f"`python -m tools.bench_cold --size {args.size} --rounds {args.rounds} --think {args.think:g}` "
             f"({args.px} px, {args.steps} steps; median and min–max over {args.rounds} alternated rounds). Trees: "
             + ", ".join(f"{label} `{src}`" for label, src in trees.items()) + ".", "",
             "| case | tree | server answers | first image (from the command) | the request itself |",
             "|---|---|---|---|---|"]  # fmt: skip
    for case in CASES:
        for label in trees:
            runs = results[label][case]
            lines.append(f"| {case} | {label} | {cell(runs, 'answering_s')} | {cell(runs, 'first_image_s')} | "
                         f"{cell(runs, 'request_s')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
