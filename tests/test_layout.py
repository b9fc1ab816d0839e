"""The package's layout: what the wheel holds, what the product imports, and docs that name only real modules."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import layout

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "imprompt"
TOOLS = ("bench", "soak", "loadtest", "training", "evaluation")


def test_readme_and_architecture_show_the_layout_the_code_has():
    """`python -m tools.layout --write` wrote them; a module added, removed or renamed since fails here."""
    block = layout.render()
    for document in layout.DOCUMENTS:
        text = document.read_text()
        assert f"{layout.BEGIN}\n{block}\n{layout.END}" in text, f"{document.name} is stale: run python -m tools.layout --write"


def test_the_product_never_imports_the_tools():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n == "tools" or n.startswith("tools.") for n in names), f"{path} imports {names}"


def test_planning_and_probing_import_no_torch():
    """`imprompt models`, `imprompt probe` and the plan stay light: no torch until something is loaded."""
    code = "import sys, imprompt.plan, imprompt.models.probe, imprompt.models.store; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(REPO), "-w", str(out)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    [built] = out.glob("imprompt-*.whl")
    return built


def test_the_wheel_holds_the_product_and_none_of_the_tools(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("tools/") or any(f"/{tool}.py" in n for tool in TOOLS)]
    assert not [n for n in names if n.startswith("tests/")]
    for needed in ("imprompt/engine.py", "imprompt/server/app.py", "imprompt/models/configs/sd15/unet/config.json",
                   "imprompt/demo/weights/unet.safetensors", "imprompt/server/static/index.html"):  # fmt: skip
        assert needed in names


def test_the_installed_wheel_imports(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    code = "import imprompt, imprompt.engine, imprompt.server.app; print(imprompt.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(target))
