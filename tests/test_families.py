"""Model families as plug-ins (``core.families``): a family registered in-process or
installed as a distribution's entry point runs through `pisa upscale` and is listed by
`pisa doctor`; outside the families package, the code asks the family instead of naming
one."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pisa_cli.cli import app
from pisa_cli.core import families
from pisa_cli.core.families.base import Family, LoadedWeights
from pisa_cli.core.passes import PassWeights
from pisa_cli.errors import OptionsError, WeightsError
from pisa_cli.imaging.manifest import MANIFEST_NAME
from pisa_cli.models.lora import UnetAdapter
from pisa_cli.options import UpscaleOptions
from tests.builders import noise_image

PACKAGE = Path(__file__).parents[1] / "pisa_cli"
FAMILIES = PACKAGE / "core" / "families"
MAGIC = b"FAKEFAMILY\n"
runner = CliRunner()


class FakeFamily(Family):
    """A family of no LoRA at all: the plain base model at one x0 step, recognised from the
    file's first bytes (the weights file holds nothing else)."""

    name = "fake"
    title = "Fake (plain UNet, one x0 step)"
    short = "the fake family"
    summary = "a test family"
    color_fix = "none"

    def recognises(self, path: Path, role) -> bool:
        try:
            with open(path, "rb") as handle:
                return handle.read(len(MAGIC)) == MAGIC
        except OSError:
            return False

    def load(self, path: Path, role) -> LoadedWeights:
        return LoadedWeights(self, str(path), {role: UnetAdapter((), str(path))}, detail="none")

    def timestep(self, flag, recorded, steps, source, role) -> tuple[int, str]:
        return (500, "fixed") if flag is None else (flag, "--timestep")


@pytest.fixture
def fake_weights(tmp_path) -> Path:
    path = tmp_path / "weights.bin"  # the name says nothing: the bytes do
    path.write_bytes(MAGIC + b"no tensors\n")
    return path


@pytest.fixture
def fake_family():
    family = FakeFamily()
    families.register(family)
    yield family
    families.unregister(family)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_family_registered_in_process_runs_through_pisa_upscale(
    tiny_base, fake_family, fake_weights, tmp_path
):
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    noise_image(24, 20, 7).save(source)
    out = tmp_path / "out"
    args = ["--base-model", tiny_base, "--weights", fake_weights, "--device", "cpu"]
    dry = run("upscale", source, "-o", out, *args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"model: {FakeFamily.title} {fake_weights}, timestep 500 (fixed)" in dry.output
    result = run("upscale", source, "-o", out, *args, "--dtype", "fp32", "--process-size", "64")
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(out / "photo.png"))
    assert written.shape == (80, 96, 3) and written.std() > 0
    record = json.loads((out / MANIFEST_NAME).read_text().splitlines()[-1])
    model = record["settings"]["model"]
    assert (model["family"], model["timestep"]) == ("fake", 500)
    assert '"color_fix": "none"' in json.dumps(record["settings"])  # the family's default
    # a second pass the family did not declare it can serve is refused with one line
    refused = run("upscale", source, "-o", out, *args, "--second-pass", "tudsr",
                  "--second-pass-weights", fake_weights, "--overwrite")  # fmt: skip
    assert refused.exit_code != 0
    assert "weights run as the first pass only" in refused.output


def test_the_family_plans_its_pass_and_refuses_lambdas(fake_family, fake_weights):
    family = families.family_of(fake_weights)
    assert family is fake_family
    weights = PassWeights(family, str(fake_weights))
    plan = family.first_pass(weights, UpscaleOptions(timestep=321), 1000)
    assert (plan.family, plan.timestep, plan.rule, plan.variants) == ("fake", 321, "x0", ("first",))
    with pytest.raises(OptionsError, match="only PiSA-SR has lambdas; the fake family has none"):
        family.first_pass(weights, UpscaleOptions(lambda_pix=0.5), 1000)


def _distribution(root: Path, target: str) -> None:
    """A tiny installed distribution whose entry point names ``target``."""
    package = root / "fake_pisa_family"
    package.mkdir(parents=True)
    source = Path(__file__).read_text(encoding="utf-8")
    start = source.index("class FakeFamily(Family):")
    end = source.index("@pytest.fixture")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n\n"
        "from pisa_cli.core.families.base import Family, LoadedWeights\n"
        "from pisa_cli.models.lora import UnetAdapter\n\n"
        f"MAGIC = {MAGIC!r}\n\n\n{source[start:end]}",
        encoding="utf-8",
    )
    info = root / "fake_pisa_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-pisa-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pisa_cli.families]\nfake = {target}\n")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    def install(target: str) -> None:
        root = tmp_path / "site"
        _distribution(root, target)
        monkeypatch.syspath_prepend(str(root))
        families.plugins.cache_clear()

    yield install
    sys.modules.pop("fake_pisa_family", None)
    families.plugins.cache_clear()


def test_a_family_from_an_entry_point_runs_and_is_listed_by_doctor(
    installed, fake_weights, tiny_base, tmp_path
):
    installed("fake_pisa_family:FakeFamily")
    assert families.family_of(fake_weights).name == "fake"
    source = tmp_path / "photo.png"
    noise_image(24, 20, 3).save(source)
    args = ["--base-model", tiny_base, "--weights", fake_weights, "--device", "cpu"]
    out = tmp_path / "out"
    result = run("upscale", source, "-o", out, *args, "--process-size", "64")
    assert result.exit_code == 0, result.output
    record = json.loads((out / MANIFEST_NAME).read_text().splitlines()[-1])
    assert record["settings"]["model"]["family"] == "fake"
    result = run("doctor", "--base-model", tiny_base, "--weights", fake_weights, "--device", "cpu")
    families_line = next(line for line in result.output.splitlines() if "families" in line)
    assert "fake (first pass, plug-in)" in families_line
    assert "pisa-sr (first pass)" in families_line and "lora (second pass)" in families_line
    assert "Fake (plain UNet, one x0 step)" in result.output  # its own weights line


def test_a_broken_plugin_is_one_line_in_doctor_not_a_crash(installed, tiny_base, fake_weights):
    installed("fake_pisa_family:Missing")
    assert [f.name for f in families.families()] == [f.name for f in families.BUILT_IN]
    assert families.family_of(fake_weights).name == "pisa-sr"  # nobody else claims it
    result = run("doctor", "--base-model", tiny_base, "--device", "cpu")
    line = next(line for line in result.output.splitlines() if "families" in line)
    assert "fake (fake_pisa_family:Missing)" in line


def test_weights_of_a_first_pass_family_are_refused_as_a_second_pass(fake_family, fake_weights):
    with pytest.raises(WeightsError, match="the fake family weights run as the first pass only"):
        families.family_of(fake_weights, "second")


FAMILY_WORDS = re.compile(r"omgsr|hypir", re.IGNORECASE)


def test_outside_the_families_package_at_most_three_modules_name_a_family():
    """The done-when of issue 21: the rest of the package asks the family. A module names a
    family when its text says OMGSR or HYPIR, or its code holds a family's id as a string
    (a comparison such as ``== "omgsr"``)."""
    ids = {family.name for family in families.BUILT_IN}
    naming = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if FAMILIES in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        strings = {
            node.value
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        if FAMILY_WORDS.search(text) or ids & strings:
            naming.append(str(path.relative_to(PACKAGE)))
    assert len(naming) <= 3, naming
