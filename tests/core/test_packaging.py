"""Packaging hygiene: the wheel holds only fedge/..., with the entry points; a third-party plugin is found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_wheel_holds_only_fedge_with_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fedge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("fedge/", "fedge-")) for n in names), [n for n in names if not n.startswith("fedge")]
    for module in ("fedge/registry.py", "fedge/plugins/data/digits.py", "fedge/edge/__init__.py",
                   "fedge/profiler/__init__.py", "fedge/py.typed"):
        assert module in names
    (ep_file,) = [n for n in names if n.endswith("entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(ep_file).decode()
    for group in ("[fedge.datasets]", "[fedge.models]", "[fedge.commands]", "[console_scripts]"):
        assert group in entry_points

    # The dependency direction (core -> nothing heavy), checked on the installed layout, outside the checkout.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (site / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    lint = subprocess.run([str(BIN / "lint-imports")], cwd=site, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout[-2000:] + lint.stderr[-2000:]


def test_bare_plugins_import_is_refused() -> None:
    code = "import runpy; runpy.run_path('plugins/__init__.py', run_name='plugins')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "must be imported as fedge.plugins" in out.stderr


@pytest.mark.slow
def test_custom_plugin_package_is_discovered_and_usable(example_plugin_site: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example_plugin_site)}
    listing = subprocess.run([str(BIN / "fedge"), "plugins", "--kind", "model", "--json"],
                             env=env, capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["logreg"]["distribution"] == "fedge-example-plugin"
    assert rows["logreg"]["summary"].startswith("Multinomial logistic regression")

    code = (
        "from fedge.plugins.models import build_model; import torch;"
        "m = build_model('logreg', {'bias': False}, input_shape=(1, 8, 8), num_classes=10);"
        "print(tuple(m(torch.zeros(2, 1, 8, 8)).shape))"
    )
    used = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert used.stdout.strip() == "(2, 10)"

    # Without autoload, only fedge's own plugins (and those named in FEDGE_PLUGINS) are visible.
    env_off = {**env, "FEDGE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    hidden = subprocess.run([str(BIN / "fedge"), "plugins", "--kind", "model", "--json"],
                            env=env_off, capture_output=True, text=True, check=True)
    assert "logreg" not in {r["name"] for r in json.loads(hidden.stdout)}


@pytest.mark.slow
def test_core_passes_mypy_strict(tmp_path: Path) -> None:
    core = [str(ROOT / "fedge" / name) for name in ("errors.py", "failure.py", "registry.py", "config.py", "rundir.py", "supervisor.py", "cli")]
    out = subprocess.run(
        [str(BIN / "mypy"), "--strict", "--cache-dir", str(tmp_path / "mypy"), *core],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout[-3000:]
