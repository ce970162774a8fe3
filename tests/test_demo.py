"""`pisa doctor --demo DIR`: a tiny model, weights and sample images, and the exact lines
that run on them (run here as printed, through the CLI in process)."""

from __future__ import annotations

import json
import shlex

import pytest
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from tests.helpers import REPO

runner = CliRunner()


@pytest.mark.slow
def test_the_demo_lines_work_as_printed(tmp_path):
    folder = tmp_path / "demo folder"  # a space: the lines must quote it
    result = runner.invoke(app, ["doctor", "--demo", str(folder)])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("pisa ")]
    assert [command[1] for command in commands] == ["upscale", "sweep"]
    for command in commands:
        ran = runner.invoke(app, command[1:])
        assert ran.exit_code == 0, (command, ran.output)
    upscaled = folder / "upscaled"
    modes = {path.name: Image.open(path).mode for path in upscaled.glob("*.png")}
    assert modes == {"shapes.png": "RGB", "transparent.png": "RGBA", "grey.png": "L"}
    assert Image.open(upscaled / "shapes.png").size == (128, 96)
    sweep = json.loads((folder / "sweeps" / "shapes" / "sweep.json").read_text())
    assert len(sweep["points"]) == 6 and (folder / "sweeps" / "shapes" / "viewer.html").exists()


def test_the_demo_never_writes_into_a_folder_in_use(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["doctor", "--demo", str(folder)])
    assert result.exit_code == 2
    assert f"error: --demo {folder}: exists and is not an empty folder" in result.output
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]


def test_the_readme_shows_the_demo_and_a_cpu_install():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "$ pisa doctor --demo demo/" in readme
    venv = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    installs = [line for line in venv if "pip install . " in line]  # the tool's, not the tests'
    cpu = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu &&"
    assert any(cpu in line for line in installs), installs
    assert any("pip install torch==2.13.0 &&" in line for line in installs)  # the default too
