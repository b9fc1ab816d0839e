"""imprompt's command line: generate | embed | probe | models | serve | demo | pack | download.

User commands only: the benchmarks, soak, load test and training live in `tools/` (see the Makefile)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ImpromptError, RequestError
from .request import MAX_IMAGES, MAX_UNITS

IP_HELP = (
    'an IP-Adapter unit, repeatable: "NAME:IMAGE[+IMAGE...][:SCALE[:START[:END]]]", '
    'e.g. "Base ViT-G:ref.png:0.6" or "Plus:a.png+b.png:0.8:0:0.5". NAME is a friendly name '
    "(Base, Light, Plus, Plus Face, Full Face, Base ViT-G, Base SDXL, ...), a file stem or a path; "
    "an IMAGE ending in .safetensors is a file of saved embeddings (imprompt embed)"
)
IP_JSON_HELP = (
    "an IP-Adapter unit as JSON, repeatable, with every field: adapter, images, embeddings, scale, start, end, "
    'average, masks, layers, negative_images, encoder; e.g. \'{"adapter": "Base SDXL", "images": ["a.png"], '
    '"layers": "style", "masks": ["left.png"]}\''
)

CONTROL_HELP = (
    'a ControlNet unit, repeatable: "MODEL=IMAGE[,KEY=VALUE...]", e.g. "control_v11p_sd15_openpose=pose.png" (a '
    'finished pose map) or "control_v11p_sd15_canny=photo.jpg,module=canny,weight=0.8,start=0,end=0.6,mode=1". MODEL: '
    'a ControlNet file name, stem, folder name or "name [hash]". Keys: module (the preprocessor, the A1111 ControlNet '
    "extension's names: none (default), canny, depth_anything, dw_openpose_full, lineart_realistic, softedge_hed, "
    'scribble_xdog, tile_resample, ...), weight (0-2, default 1), start, end (fractions of the steps), mode (control '
    'mode: Balanced / 0, "My prompt is more important" / 1, "ControlNet is more important" / 2), resize ("Just '
    'Resize", "Crop and Resize" (default), "Resize and Fill" or 0, 1, 2), res (the preprocessor\'s resolution), a, b '
    "(its thresholds), pixel_perfect (true/false), union (a Union model's control type: name or index)"
)
CONTROL_KEYS = {"module": "module", "weight": "weight", "start": "start", "end": "end", "mode": "control_mode",
                "control_mode": "control_mode", "resize": "resize_mode", "resize_mode": "resize_mode",
                "res": "processor_res", "processor_res": "processor_res", "a": "threshold_a", "threshold_a": "threshold_a",
                "b": "threshold_b", "threshold_b": "threshold_b", "pixel_perfect": "pixel_perfect",
                "union": "union_type", "union_type": "union_type"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return args.run(args)
    except ImpromptError as exc:
        print(f"imprompt: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imprompt",
        description="Stable Diffusion with image prompts: any IP-Adapter, any order, any mix; the right image "
        "encoder is read from the adapter's weights.",
    )
    parser.add_argument("--version", action="version", version=f"imprompt {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = commands.add_parser("generate", help="generate images from a prompt and IP-Adapter units")
    _models_argument(g)
    g.add_argument("--request", type=Path, help="an SD.Next / A1111 txt2img JSON payload (flags below override it)")
    g.add_argument("--model", help="pipeline name (a folder name under DIR/diffusers/)")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt")
    g.add_argument("--seed", type=int, help="-1 (default) picks one at random; the result reports it")
    g.add_argument("--steps", type=int, help="denoising steps (default 20)")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 7)")
    g.add_argument("--width", type=int, help="multiple of 8 (default: the model's native size)")
    g.add_argument("--height", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--sampler", help="A1111 sampler name: Euler, Euler a, DPM++ 2M, DPM++ 2M Karras, DDIM, ...")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="a LoRA from the models folders, as <lora:NAME:WEIGHT> in the prompt does (repeatable)")
    g.add_argument("--clip-skip", type=int, help="A1111's CLIP_stop_at_last_layers (1, the default: the last layer)")
    g.add_argument("--pad-cond-uncond", action="store_true", default=None,
                   help="A1111's setting: pad a prompt and negative of unequal lengths with empty chunks and run them "
                        "as one batch (cheaper, another picture); default: each at its own length, as A1111")  # fmt: skip
    g.add_argument("--sdxl-clip-l-skip", action="store_true", default=None,
                   help="A1111's setting: --clip-skip acts on SDXL's CLIP-L (default: SDXL ignores clip skip)")
    g.add_argument("--vae", help="a VAE file from the models folders instead of the model's own (a FLUX / SD 3.5 "
                                 "transformer alone: its VAE; default: the one found in the models folders)")
    g.add_argument("--text-encoder", action="append", default=[], metavar="NAME", dest="text_encoders",
                   help="a FLUX / SD 3.5 transformer alone (ComfyUI's diffusion_models/): one of its text encoder "
                        "files (clip_l, clip_g, t5xxl; repeat the option); those not given are found in the models "
                        "folders, and info.model_parts says which and why")  # fmt: skip
    g.add_argument("--ip", action="append", default=[], metavar="UNIT", help=IP_HELP)
    g.add_argument("--ip-json", action="append", default=[], metavar="JSON", help=IP_JSON_HELP)
    g.add_argument("--control", action="append", default=[], metavar="UNIT", help=CONTROL_HELP)
    g.add_argument("--init-image", type=Path, help="img2img: start from this image")
    g.add_argument("--denoising-strength", type=float, help="img2img: how much is redrawn, 0-1 (default 0.75)")
    g.add_argument("--out", type=Path, required=True, help="output PNG (batches add -1, -2, ...)")
    g.add_argument("--json", action="store_true", help="print the result info as JSON on stdout")
    _engine_arguments(g)
    g.set_defaults(run=_generate)

    p = commands.add_parser("probe", help="say what checkpoints are, from their tensor tables")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(run=_probe)

    m = commands.add_parser("models", help="list pipelines, adapters (with the encoder each needs) and encoders")
    _models_argument(m)
    m.add_argument("--json", action="store_true")
    m.set_defaults(run=_models)

    d = commands.add_parser("demo", help="build the demo model pack (if missing) and run the switching scenario")
    d.add_argument("--pack", type=Path, default=Path("demo-models"),
                   help="the demo pack's folder: built there if new or empty, reused if it holds a demo pack; any other "
                        "folder is refused, never overwritten (default: %(default)s)")  # fmt: skip
    d.add_argument("--out", type=Path, default=Path("demo-output"), help="where images go (default: %(default)s)")
    d.add_argument("--steps", type=int, default=20)
    _weights_arguments(d)
    d.set_defaults(run=_demo)

    e = commands.add_parser("embed", help="encode reference images once and save the embeddings for reuse (FaceID: "
                                          "the face embedding and, for Plus, the face crop's hidden states)")
    _models_argument(e)
    e.add_argument("--adapter", required=True, help="the adapter the embeddings are for (decides the encoder)")
    e.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    e.add_argument("--average", action="store_true", help="average the images into one set of tokens")
    e.add_argument("--out", type=Path, required=True, help="output .safetensors")
    _engine_arguments(e)
    e.set_defaults(run=_embed)

    s = commands.add_parser("serve", help="run the HTTP API (A1111/SD.Next-compatible) and the web page")
    _models_argument(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    s.add_argument("--port", type=int, default=7860, help="default: %(default)s, as A1111 and SD.Next")
    s.add_argument("--api-key", default=os.environ.get("IMPROMPT_API_KEY"),
                   help="require this key (Bearer, or HTTP Basic password) on every endpoint but /healthz")  # fmt: skip
    s.add_argument("--allowed-hosts", type=_names, default=(), metavar="NAMES",
                   help="comma-separated host names the server answers to besides localhost, loopback addresses "
                        "and the address it is reached at (the names clients use with --host 0.0.0.0 or behind a "
                        "proxy); '*': any. Other names are refused (403): DNS-rebinding pages")  # fmt: skip
    s.add_argument("--cors-allow-origins", type=_names, default=(), metavar="ORIGINS",
                   help="comma-separated origins (https://app.example) of web pages that may call the API, as "
                        "A1111's flag; other sites' pages are refused (403)")  # fmt: skip
    s.add_argument("--cors-allow-origins-regex", type=_regex, metavar="REGEX",
                   help="origins that may call the API, as one regular expression (A1111's flag)")
    s.add_argument("--model", help="the current model at start (default: the first in the models folder)")
    s.add_argument("--no-preload", action="store_true",
                   help="load the current model at the first request, not while the server starts")  # fmt: skip
    s.add_argument("--max-queue", type=_positive, default=16, help="jobs waiting before requests get 429 (default: %(default)s)")
    s.add_argument("--batch-wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="batch requests: the worker waits up to this long for more waiting requests that can share its "
                        "pipeline call (same model, size, steps, sampler, LoRAs...) and runs them as one batch, each "
                        "with its own prompt, seed and image; 0 (default) runs one request at a time; at most 60. With "
                        "--workers each generator replica batches the requests it gets (Ray Serve's @serve.batch)")  # fmt: skip
    s.add_argument("--batch-max", type=_positive, metavar="N",
                   help="most rows (images: the sum of its requests' batch sizes) in one batch (default: sized from the "
                        "device's memory: on CUDA the rows of the requests' size its activation budget holds, at most "
                        "16; on the CPU 4)")  # fmt: skip
    s.add_argument("--max-units", type=_at_most(MAX_UNITS), default=8,
                   help=f"IP-Adapter units per request (default: %(default)s; at most {MAX_UNITS})")  # fmt: skip
    s.add_argument("--max-images", type=_at_most(MAX_IMAGES), default=16,
                   help=f"reference images per unit (default: %(default)s; at most {MAX_IMAGES})")  # fmt: skip
    s.add_argument("--max-body", default="64MiB", help="largest request body (default: %(default)s)")
    s.add_argument("--max-image", default="32MiB", help="largest image, encoded (default: %(default)s)")
    s.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image, pixels (default: %(default)s)")
    c = s.add_argument_group("cluster (Ray Serve; needs `pip install 'imprompt[cluster]'`; see docs/scale-out.md)")
    c.add_argument("--workers", type=_positive, default=1,
                   help="generator replicas; 1 (default) serves from this process, without Ray; more start a local Ray "
                        "cluster on loopback, requests routed to the replica that holds their model")  # fmt: skip
    c.add_argument("--encoder-workers", type=_positive,
                   help="image-encoder replicas (default: as many as --workers); a request's encoders run at once")
    c.add_argument("--address", metavar="HOST:PORT",
                   help="join this Ray cluster (`ray start --head` prints it) instead of starting a local one")
    c.add_argument("--models-per-worker", type=_positive, default=2,
                   help="models (encoders) a generator (encoder) replica keeps loaded (default: %(default)s)")
    c.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs Ray gives each generator replica (default: %(default)s, CPU; 1 on GPU nodes)")
    c.add_argument("--gpus-per-encoder", type=float, default=0.0,
                   help="GPUs Ray gives each encoder replica (default: %(default)s, CPU; a share such as 0.25 lets "
                        "encoders sit beside generators)")  # fmt: skip
    _engine_arguments(s)
    s.set_defaults(run=_serve)

    pk = commands.add_parser("pack", help="build the demo model pack (tiny models, trained on flat shapes) if missing")
    pk.add_argument("folder", type=Path, nargs="?", default=Path("demo-models"),
                    help="new or empty, or holding a demo pack; any other folder is refused (default: %(default)s)")  # fmt: skip
    _weights_arguments(pk)
    pk.set_defaults(run=_pack)

    import textwrap

    from .models.download import help_lines

    fetched = "\n".join(textwrap.fill(line, 110, initial_indent="  ", subsequent_indent="      ") for line in help_lines())
    dl = commands.add_parser("download", help="download published adapters and what they run with (needs internet)",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"what each NAME fetches into DIR besides its adapter file:\n{fetched}")  # fmt: skip
    _models_argument(dl)
    dl.add_argument("names", nargs="+", metavar="NAME", help='friendly names, e.g. "Base ViT-G", "PuLID" (listed below)')
    dl.set_defaults(run=_download)
    return parser


def _weights_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--weights", type=Path,
                       help="trained weights (from `make train`) for the SD 1.5 pipeline, both encoders "
                            "and the Base, Base ViT-G and Plus adapters (default: the ones shipped with imprompt)")  # fmt: skip
    group.add_argument("--random-weights", action="store_true",
                       help="random weights everywhere (pictures are noise; the plumbing is the same)")  # fmt: skip


def _pack_weights(args) -> Path | None:
    """The trained weights folder `--weights` / `--random-weights` ask for (None: random)."""
    from .demo.pack import DEMO_WEIGHTS

    return None if args.random_weights else args.weights or DEMO_WEIGHTS


def _models_argument(parser) -> None:
    parser.add_argument(
        "--models",
        type=Path,
        action="append",
        help="models folder, repeatable to use several (default: $IMPROMPT_MODELS)",
    )


def _engine_arguments(parser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--encoder-dtype", help="dtype of the image encoders (default: --dtype); bfloat16 halves them")
    parser.add_argument("--cache-budget", metavar="SIZE",
                        help="memory for loaded image encoders, e.g. 8GiB (default: 30%% of the RAM; 20%% of a GPU's)")
    parser.add_argument("--adapter-budget", metavar="SIZE",
                        help="memory for built IP-Adapters (default: 4%% of the device's, at most 4GiB)")
    parser.add_argument("--embedding-budget", metavar="SIZE",
                        help="memory for cached image embeddings (default: 0.5%% of the device's, at most 512MiB)")
    parser.add_argument("--lora-budget", metavar="SIZE",
                        help="memory for LoRAs kept loaded, one budget for every resident model (default: 3%% of the "
                             "device's, at most 4GiB)")  # fmt: skip
    parser.add_argument("--controlnet-budget", metavar="SIZE",
                        help="memory for ControlNet models kept loaded, so switching between them costs no reload "
                             "(default: 8%% of the device's)")  # fmt: skip
    parser.add_argument("--model-budget", metavar="SIZE",
                        help="memory for base models kept loaded, so switching back costs no reload (default: 32%% "
                             "of the RAM; 42%% of a GPU's)")  # fmt: skip
    parser.add_argument("--offload-budget", metavar="SIZE",
                        help="on a GPU: CPU memory where models pushed out wait to move back (default: 30%% of the RAM)")
    parser.add_argument("--activation-budget", metavar="SIZE",
                        help="memory a generation may use beyond the caches; an image whose VAE decode needs more is "
                             "decoded tile by tile (default: the 20%% of the device the caches leave)")  # fmt: skip
    parser.add_argument("--offload", default="auto", choices=("auto", "none", "encoders", "model", "group"),
                        help="memory plan for models the GPU cannot hold: auto chooses by size; none (all on the "
                             "device), encoders (text encoders on the CPU), model (each component moved in as it "
                             "runs), group (block by block)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="compile each model's UNet / transformer with torch.compile when it loads; it stays "
                             "compiled while requests switch image prompts, scales, masks and LoRAs (the first "
                             "request at a new size, batch or unit count compiles again; see docs/compile.md)")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor", metavar="NAME",
                        help="torch.compile backend for --compile (default: inductor)")
    parser.add_argument("--insightface-root", metavar="DIR", default=os.environ.get("IMPROMPT_INSIGHTFACE_ROOT"),
                        help="FaceID from images: the folder holding InsightFace's models/buffalo_l (default: "
                             "$IMPROMPT_INSIGHTFACE_ROOT, then MODELS/insightface, then ~/.insightface)")  # fmt: skip


def _engine(args, **settings):
    """The engine the command's options describe (models folders, device, dtypes, cache budgets)."""
    from .engine import Engine

    return Engine(**_engine_options(args, **settings))


def _engine_options(args, **settings) -> dict:
    """Engine's keyword arguments from the command's options (a cluster's workers each build their engine from them)."""
    return dict(models=_require_models(args), device=args.device, dtype=args.dtype, encoder_dtype=args.encoder_dtype,
                cache_budget=args.cache_budget, adapter_cache_budget=args.adapter_budget,
                embedding_cache_budget=args.embedding_budget, lora_cache_budget=args.lora_budget,
                controlnet_cache_budget=args.controlnet_budget,
                pipeline_cache_budget=args.model_budget, offload_budget=args.offload_budget,
                activation_budget=args.activation_budget, insightface_root=args.insightface_root,
                offload=args.offload, compile=args.compile, compile_backend=args.compile_backend,
                **settings)  # fmt: skip


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _at_most(ceiling: int):
    """A limit of the engine's, which may not pass the ceiling every request is parsed against (`request.py`)."""

    def limit(text: str) -> int:
        value = _positive(text)
        if value > ceiling:
            raise argparse.ArgumentTypeError(
                f"{value} is over {ceiling}, the most any request is read with (a longer list is refused while the "
                f"request is parsed); give at most {ceiling}"
            )
        return value

    return limit


def _seconds(text: str) -> float:
    """--batch-wait's seconds: 0 to BATCH_WAIT_MAX (a lone request waits that long before it runs)."""
    from .server.jobs import BATCH_WAIT_MAX

    value = float(text)
    if not 0 <= value <= BATCH_WAIT_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds from 0 to {BATCH_WAIT_MAX:g} (a lone "
                                         f"request waits that long before it runs); give at most {BATCH_WAIT_MAX:g}")  # fmt: skip
    return value


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list, as A1111's --cors-allow-origins takes it."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _regex(text: str) -> str:
    """A regular expression, checked when the command is read (not at the first request it would fail)."""
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") from None
    return text


def _require_models(args) -> list[Path]:
    """The models folders: every --models given, else $IMPROMPT_MODELS."""
    folders = args.models or ([Path(os.environ["IMPROMPT_MODELS"])] if os.environ.get("IMPROMPT_MODELS") else [])
    if not folders:
        raise RequestError("no models folder: pass --models DIR or set IMPROMPT_MODELS")
    return folders


# ---------------------------------------------------------------------------------------------------- commands


def _generate(args) -> int:
    from .request import parse_request
    from .server.a1111 import from_sdnext_payload

    quiet_libraries()
    engine = _engine(args)
    if args.request:
        try:
            payload = json.loads(args.request.read_text())
        except (OSError, ValueError) as exc:
            raise RequestError(f"--request {args.request}: cannot read JSON ({exc})") from None
        converted = from_sdnext_payload(payload, store=engine.store)
        request = converted.request
        for warning in converted.warnings:
            logging.getLogger("imprompt").warning("%s", warning)
    else:
        request = parse_request({})
    overrides = {
        field: value
        for field, value in {
            "model": args.model,
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "seed": args.seed,
            "steps": args.steps,
            "cfg_scale": args.cfg_scale,
            "width": args.width,
            "height": args.height,
            "batch_size": args.batch_size,
            "sampler": args.sampler,
            "clip_skip": args.clip_skip,
            "pad_cond_uncond": args.pad_cond_uncond,
            "sdxl_clip_l_skip": args.sdxl_clip_l_skip,
            "vae": args.vae,
            "text_encoders": args.text_encoders or None,
        }.items()
        if value is not None
    }
    if args.denoising_strength is not None:
        overrides["denoising_strength"] = args.denoising_strength
    if args.init_image:
        overrides["init_images"] = [str(args.init_image)]
    if args.lora:
        overrides["loras"] = [parse_lora(text) for text in args.lora]
    if args.ip or args.ip_json:
        overrides["ip_adapters"] = [parse_ip_unit(text) for text in args.ip] + [_json_unit(t) for t in args.ip_json]
    if args.control:
        overrides["controlnets"] = [parse_control_unit(text) for text in args.control]
    request = parse_request(request.model_dump() | overrides)
    result = engine.generate(request)
    outputs = []
    for i in range(len(result.images)):
        path = args.out if len(result.images) == 1 else args.out.with_stem(f"{args.out.stem}-{i + 1}")
        outputs.append(str(result.save(path, index=i)))
    if args.json:
        print(json.dumps(result.info | {"outputs": outputs}, indent=2))
    else:
        for path in outputs:
            print(path)
    return 0


def parse_lora(text: str) -> dict:
    """'NAME[:WEIGHT]' -> {"name", "weight"} (a name may hold ':' only if a weight follows)."""
    name, sep, weight = text.rpartition(":")
    if not sep or not _is_number(weight):
        name, weight = text, "1"
    if not name.strip():
        raise RequestError(f"--lora {text!r}: expected NAME or NAME:WEIGHT")
    return {"name": name.strip(), "weight": float(weight)}


def parse_ip_unit(text: str) -> dict:
    """'NAME:IMAGE[+IMAGE...][:SCALE[:START[:END]]]' -> a unit dict. Trailing numbers are scale/start/end;
    whatever lies between the name and them is the image list (so image paths may contain ':')."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest:
        raise RequestError(f"--ip {text!r}: expected NAME:IMAGE[+IMAGE...][:SCALE[:START[:END]]]")
    parts = rest.split(":")
    numbers = []
    while len(parts) > 1 and len(numbers) < 3 and _is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    images = [p for p in ":".join(parts).split("+") if p]
    if not images:
        raise RequestError(f"--ip {text!r}: no image given")
    if len(images) == 1 and images[0].endswith(".safetensors"):
        unit = {"adapter": name.strip(), "embeddings": images[0]}
    else:
        unit = {"adapter": name.strip(), "images": images}
    unit.update(zip(("scale", "start", "end"), numbers))
    return unit


def parse_control_unit(text: str) -> dict:
    """'MODEL=IMAGE[,KEY=VALUE...]' -> a ControlNet unit dict. A comma starts a key only where `key=` follows, so
    image paths may contain commas."""
    model, sep, rest = text.partition("=")
    if not sep or not model.strip() or not rest:
        raise RequestError(f"--control {text!r}: expected MODEL=IMAGE[,KEY=VALUE...]")
    parts = rest.split(",")
    image = parts.pop(0)
    while parts and not _is_key(parts[0]):
        image += "," + parts.pop(0)
    unit: dict = {"model": model.strip(), "image": image}
    for part in parts:
        key, _, value = part.partition("=")
        field = CONTROL_KEYS.get(key.strip().lower())
        if field is None:
            raise RequestError(f"--control {text!r}: unknown key {key.strip()!r}; keys: {', '.join(sorted(set(CONTROL_KEYS)))}")
        value = value.strip()
        if field in ("weight", "start", "end", "threshold_a", "threshold_b"):
            if not _is_number(value):
                raise RequestError(f"--control {text!r}: {key.strip()} must be a number, got {value!r}")
            unit[field] = float(value)
        elif field in ("processor_res", "control_mode", "resize_mode", "union_type") and value.isdigit():
            unit[field] = int(value)
        elif field == "pixel_perfect":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise RequestError(f"--control {text!r}: pixel_perfect must be true or false, got {value!r}")
            unit[field] = value.lower() in ("true", "1", "yes")
        else:
            unit[field] = value
    if isinstance(unit.get("control_mode"), int):
        from .request import CONTROL_MODES

        if unit["control_mode"] >= len(CONTROL_MODES):
            raise RequestError(f"--control {text!r}: mode {unit['control_mode']} is not 0, 1 or 2")
        unit["control_mode"] = CONTROL_MODES[unit["control_mode"]]
    if isinstance(unit.get("resize_mode"), int):
        from .preprocess.resize import resize_mode

        unit["resize_mode"] = resize_mode(unit["resize_mode"])
    return unit


def _is_key(part: str) -> bool:
    key, sep, _ = part.partition("=")
    return bool(sep) and key.strip().lower() in CONTROL_KEYS


def _json_unit(text: str) -> dict:
    try:
        unit = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"--ip-json {text[:60]!r}: not JSON ({exc})") from None
    if not isinstance(unit, dict):
        raise RequestError(f"--ip-json {text[:60]!r}: expected a JSON object")
    return unit


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _probe(args) -> int:
    from .models.probe import probe

    status = 0
    for path in args.files:
        try:
            print(json.dumps(probe(path).to_dict()))
        except ImpromptError as exc:
            print(json.dumps({"path": str(path), "kind": "unreadable", "error": str(exc)}))
            status = 1
    return status


def _models(args) -> int:
    from .models.store import ModelStore
    from .plan import describe_store

    listing = describe_store(ModelStore(_require_models(args)))
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print("Models (and the adapters that fit each):")
    for m in listing["models"]:
        kind = f"{m['family']:<8} {m['pipeline_class']}" + (f" ({m['model_type']})" if m["model_type"] else "")
        stored = f"  [{m['quantization']}]" if m["quantization"] else ""
        print(f"  {m['name']:<28} {kind}{stored}")
        if m["unsupported"]:
            print(f"    not runnable: {m['unsupported']}")
            continue
        if m["parts"]:  # a transformer alone (ComfyUI's split layout): what it runs with, from other files
            chosen = m.get("model_parts", {})
            shown = ", ".join(f"{role} {chosen[role]['name']}" if role in chosen else role for role in m["parts"])
            extra = ", ".join(f"{role} {p['name']}" for role, p in chosen.items() if role not in m["parts"])
            print(f"    transformer alone, runs with: {shown}" + (f" (and {extra})" if extra else ""))
            if "parts_problem" in m:
                print(f"    missing part: {m['parts_problem']}")
        print(f"    adapters: {', '.join(m['adapters']) or 'none in this folder'}")
    print("IP-Adapters:")
    for a in listing["adapters"]:
        label = a["friendly_name"] or a["name"]
        encoder = f"-> {a['encoder']}" if a["encoder_present"] else "-> MISSING ENCODER"
        fits = ", ".join(a["fits_models"]) or "no model here"
        print(f"  {label:<28} {a['variant']:<10} {a['family']:<7} needs {a['needs']:<34} {encoder}  (fits: {fits})")
        if a["variant"] == "instantid":  # its face pack and its IdentityNet ControlNet
            net = a["identitynet"] or f"MISSING ({a['identitynet_problem']})"
            pack = a["face_pack_path"] or "MISSING (unzip antelopev2.zip into <models>/insightface/models/)"
            print(f"    face pack {a['face_pack']}: {pack}; IdentityNet: {net}")
        elif a["variant"].startswith("pulid"):  # its face pack beside its EVA-CLIP tower
            pack = a["face_pack_path"] or "MISSING (unzip antelopev2.zip into <models>/insightface/models/)"
            files = ", ".join(f"{name}: {path or 'MISSING'}" for name, path in a["facexlib"].items())
            print(f"    face pack {a['face_pack']}: {pack}; facexlib (<models>/facexlib/): {files}")
    print("Image encoders:")
    for e in listing["encoders"]:
        print(f"  {e['name']:<40} {e['architecture']:<12} {e['outputs']}")
    if listing["controlnets"]:
        print("ControlNets:")
        for c in listing["controlnets"]:
            fits = "" if c["unsupported"] else f"  (fits: {', '.join(c['fits_models']) or 'no model here'})"
            print(f"  {c['name']:<40} {c['detail']}{fits}")
    for kind, entries in listing["other"].items():
        if entries:
            print(f"{OTHER_TITLES[kind]}:")
            for e in entries:
                print(f"  {e['name']:<40} {_describe_other(e)}")
    if listing["unreadable"]:
        print("Unreadable files:")
        for u in listing["unreadable"]:  # the error names the file already
            print(f"  {u['error'] if u['error'].startswith(u['path']) else u['path'] + ': ' + u['error']}")
    return 0


OTHER_TITLES = {
    "lora": "LoRAs", "vae": "VAEs", "textual-inversion": "Textual-inversion embeddings",
    "t2i-adapter": "T2I-Adapters", "upscaler": "Upscalers", "face-restorer": "Face restorers",
    "text-encoder": "Text encoders", "diffusion-model": "Diffusion models alone", "image-encoder-other":
    "Other image encoders", "ip-embeddings": "Saved IP-Adapter embeddings", "unknown": "Other files",
}  # fmt: skip


def _describe_other(e: dict) -> str:
    """One line for a LoRA, VAE, embedding or another recognised file."""
    if e["kind"] == "lora":
        return f"{e['family']:<8} {e['format']}, rank {e['rank']}, {'+'.join(e['parts'])}"
    if e["kind"] == "vae":
        return f"{e['family']} ({e['format']} names)"
    if e["kind"] == "textual-inversion":
        return f"{e['family']:<8} {e['vectors']} vector(s)"
    if e["kind"] == "ip-embeddings":
        return f"{e['output']}[{e['width']}] from {e['encoder']}"
    return e["detail"]


def _demo(args) -> int:
    from .demo.scenario import run_demo

    quiet_libraries()
    run_demo(args.pack, args.out, steps=args.steps, weights=_pack_weights(args))
    return 0


def _embed(args) -> int:
    quiet_libraries()
    engine = _engine(args)
    unit = {"adapter": args.adapter, "images": [str(p) for p in args.images], "average": args.average}
    print(engine.save_embeddings(unit, args.out))
    return 0


def _serve(args) -> int:
    import uvicorn

    from .engine import Engine
    from .server.app import ServerSettings, create_app
    from .util.cache import parse_bytes

    quiet_libraries()
    options = _engine_options(args, allow_paths=False, max_image_pixels=args.max_pixels,
                              max_image_bytes=parse_bytes(args.max_image, 0), max_units=args.max_units,
                              max_images=args.max_images)  # fmt: skip
    engine = Engine(**options)
    clustered = args.workers > 1 or args.encoder_workers is not None or args.address is not None
    bound = () if args.host in ("0.0.0.0", "::", "") else (args.host,)  # a name given as --host is one it answers to
    settings = ServerSettings(
        api_key=args.api_key, max_body_bytes=parse_bytes(args.max_body, 0), max_queue=args.max_queue, model=args.model,
        batch_max=args.batch_max, batch_wait=args.batch_wait,
        preload=not args.no_preload and not clustered,  # a cluster loads each model where Ray routes it first
        allowed_hosts=bound + args.allowed_hosts, cors_allow_origins=args.cors_allow_origins,
        cors_allow_origins_regex=args.cors_allow_origins_regex,
    )
    if args.model:
        engine.store.pipeline(args.model)  # unknown model: fail now, not at the first request
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("imprompt").warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.allowed_hosts:
        logging.getLogger("imprompt").warning(
            "clients must reach %s by IP address: names (a DNS name, a proxy's) are refused unless listed with "
            "--allowed-hosts", args.host)  # fmt: skip
    if clustered:
        from .cluster.start import ClusterSettings, serve_cluster  # Ray is imported only here

        cluster = ClusterSettings(args.workers, args.encoder_workers or args.workers, args.address,
                                  args.models_per_worker, args.gpus_per_worker, args.gpus_per_encoder,
                                  batch_max=args.batch_max, batch_wait=args.batch_wait)  # each generator replica batches
        serve_cluster(options, settings, cluster, args.host, args.port)
        return 0
    logging.getLogger("imprompt").info("serving on http://%s:%d (API docs at /docs)", args.host, args.port)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="warning")
    return 0


def _pack(args) -> int:
    from .demo.pack import build_demo_pack

    quiet_libraries()
    print(build_demo_pack(args.folder, weights=_pack_weights(args)))
    return 0


def _download(args) -> int:
    from .models.download import download

    for path in download(args.names, _require_models(args)[0]):
        print(path)
    return 0


def _configure_logging(quiet: bool) -> None:
    """imprompt's own log (encoder loads, reuse, evictions and why) goes to stderr; libraries only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("imprompt: %(message)s"))
    log = logging.getLogger("imprompt")
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def quiet_libraries() -> None:
    """diffusers' and transformers' loading progress bars are noise on a command line (only these switch them off)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
