"""The package's layout in the order one request flows through it, written from the modules' own docstrings.

    python -m tools.layout            # print it
    python -m tools.layout --write    # put it into README.md and docs/architecture.md (between the markers)

Each module's docstring starts with a one-line summary; that line is what the listing shows, so the README can
name no module that does not exist. A test (tests/test_layout.py) checks that both files hold exactly what this
writes, and that every module of the package appears in `ORDER`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "imprompt"
DOCUMENTS = (REPO / "README.md", REPO / "docs" / "architecture.md")
BEGIN = "<!-- layout: written by `python -m tools.layout --write` from the modules' docstrings; do not edit -->"
END = "<!-- /layout -->"

# The data flow of one request, then what serves it from outside (the CLI, the server) and the demo.
ORDER = (
    "__init__.py",
    "request.py",
    "engine.py",
    "state.py",
    "plan.py",
    "conditioning/",
    "conditioning/init_image.py",
    "conditioning/image_prompts.py",
    "conditioning/ip_adapter.py",
    "conditioning/faceid.py",
    "conditioning/redux.py",
    "conditioning/pulid.py",
    "conditioning/instantid.py",
    "conditioning/loras.py",
    "conditioning/vae.py",
    "conditioning/prompt.py",
    "conditioning/controlnet.py",
    "call.py",
    "batching.py",
    "result.py",
    "errors.py",
    "models/",
    "models/store.py",
    "models/probe.py",
    "models/specs.py",
    "models/single_file.py",
    "models/recognise.py",
    "models/parts.py",
    "models/probe_cache.py",
    "models/catalog.py",
    "models/download.py",
    "loading/",
    "loading/tensors.py",
    "loading/quantized.py",
    "loading/split_files.py",
    "loading/pipelines.py",
    "loading/memory_plan.py",
    "loading/resident.py",
    "loading/encoders.py",
    "loading/loras.py",
    "loading/compiled.py",
    "loading/vaes.py",
    "loading/textual_inversions.py",
    "loading/controlnets.py",
    "prompting/",
    "prompting/syntax.py",
    "prompting/schedule.py",
    "prompting/encode.py",
    "prompting/conds.py",
    "ipadapter/",
    "ipadapter/build.py",
    "ipadapter/block_weights.py",
    "ipadapter/faces.py",
    "ipadapter/embeddings.py",
    "ipadapter/attach.py",
    "ipadapter/text_attention.py",
    "ipadapter/slots.py",
    "ipadapter/dit.py",
    "ipadapter/shells.py",
    "ipadapter/eva_clip.py",
    "ipadapter/pulid.py",
    "ipadapter/facexlib_files.py",
    "ipadapter/retinaface.py",
    "ipadapter/face_parsing.py",
    "controlnets/",
    "controlnets/pipelines.py",
    "controlnets/guidance.py",
    "preprocess/",
    "preprocess/resize.py",
    "preprocess/loaded.py",
    "preprocess/simple.py",
    "preprocess/depth.py",
    "preprocess/dwpose.py",
    "preprocess/lineart.py",
    "preprocess/hed.py",
    "util/",
    "util/devices.py",
    "util/cache.py",
    "util/images.py",
    "util/infotext.py",
    "util/samplers.py",
    "cli.py",
    "server/",
    "server/app.py",
    "server/a1111.py",
    "server/controlnet.py",
    "server/sdnext.py",
    "server/jobs.py",
    "server/origins.py",
    "cluster/",
    "cluster/start.py",
    "cluster/ingress.py",
    "cluster/routing.py",
    "cluster/workers.py",
    "cluster/board.py",
    "cluster/loopback.py",
    "demo/",
    "demo/scenario.py",
    "demo/pack.py",
    "demo/tiny_models.py",
    "demo/tiny_dits.py",
    "demo/tiny_faces.py",
    "demo/shapes.py",
)


def modules() -> list[str]:
    """Every module and package of imprompt, as ORDER names them (packages end with '/')."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.endswith("/__init__.py"):
            relative = relative.removesuffix("__init__.py")
        names.append(relative)
    return names


def summary(name: str) -> str:
    path = PACKAGE / (name + "__init__.py" if name.endswith("/") else name)
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    return docstring.split("\n", 1)[0].strip()


def render() -> str:
    missing = sorted(set(modules()) - set(ORDER))
    gone = sorted(set(ORDER) - set(modules()))
    if missing or gone:
        raise SystemExit(f"tools/layout.py ORDER is out of date: add {missing}, remove {gone}")
    lines = ["```", "src/imprompt/"]
    for name in ORDER:
        depth = name.rstrip("/").count("/")
        label = name.rsplit("/", 2)[-2] + "/" if name.endswith("/") else name.rsplit("/", 1)[-1]
        lines.append(f"  {'  ' * depth}{label:<{26 - 2 * depth}} {summary(name)}")
    lines += ["tools/                       development tools, not installed: bench, soak, load test, training, evaluation",
              "tests/                       the tests, and the tiny-model writers only they use", "```"]  # fmt: skip
    return "\n".join(lines)


def replaced(text: str, block: str, where: Path) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{where}: no layout markers ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.layout", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the layout into README.md and docs/architecture.md")
    args = parser.parse_args(argv)
    block = render()
    if not args.write:
        print(block)
        return 0
    for document in DOCUMENTS:
        document.write_text(replaced(document.read_text(), block, document))
        print(f"written into {document.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
