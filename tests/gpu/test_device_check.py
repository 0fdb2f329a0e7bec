"""scripts/device-check's parts that need no GPU: the offline install set it carries (one wheel per
requirement the GPU machine lacks, for its Python 3.12), fedge built from the working tree without
network, and a dry run's summary."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device-check"


@pytest.fixture(scope="module")
def device_check() -> ModuleType:
    loader = SourceFileLoader("device_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("device_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]).lower()


def test_install_set_covers_every_core_and_profiler_requirement(device_check: ModuleType) -> None:
    # Prepare
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]}
    for extra in ("torch", "profiler"):
        needed |= {_name(r) for r in project["optional-dependencies"][extra] if not r.startswith("fedge[")}
    # Execute
    carried = {_name(r) for r in device_check.requirements()}
    # Assert: each is either on the GPU machine already or carried, and torch is never carried
    assert needed <= carried | device_check.PREINSTALLED
    assert "torch" not in carried and "setuptools" in carried


def test_prepare_downloads_one_wheel_per_requirement_for_python_312(device_check: ModuleType, tmp_path: Path) -> None:
    # Execute (pip asks the package registry)
    wheels = device_check.prepare(tmp_path / "wheels", pip=[sys.executable, "-m", "pip"])
    # Assert
    assert sorted(_name(w.name.split("-")[0]) for w in wheels) == sorted(_name(r) for r in device_check.requirements())
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        with contextlib.suppress(metadata.PackageNotFoundError):  # the versions the tests here ran with
            assert version == metadata.version(name), wheel.name
        python_tag, _abi, plat = wheel.name[:-4].split("-")[-3:]
        assert python_tag in ("py3", "cp312") or python_tag.startswith("py3"), wheel.name
        assert plat == "any" or "x86_64" in plat, wheel.name


@pytest.mark.slow
def test_fedge_builds_from_the_working_tree_without_network(device_check: ModuleType, tmp_path: Path) -> None:
    # Prepare: no carried wheels, so only fedge itself is built (this venv has setuptools)
    log = device_check.Log(tmp_path / "log")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    # Execute
    result = device_check.install(tmp_path / "site", log, dict(os.environ), wheel_dir=empty)
    # Assert
    assert result["ok"], (tmp_path / "log").read_text()[-3000:]
    (dist_info,) = (tmp_path / "site").glob("fedge-*.dist-info")
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "[fedge.strategies]" in entry_points and "[fedge.analyses]" in entry_points
    assert (tmp_path / "site" / "fedge" / "plugins" / "strategies" / "_host_staging.py").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run without a GPU skips every gpu test")
def test_dry_run_writes_a_well_formed_summary(tmp_path: Path) -> None:
    # Execute
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, timeout=300, check=False)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["summary_version"] == 1 and summary["dry_run"] is True
    assert summary["device"]["cuda_available"] is False and summary["device"]["torch"] == torch.__version__
    tests = summary["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] == len(tests["per_test"]) >= 10
    assert all(v == "skipped: needs a CUDA GPU" for v in tests["per_test"].values())
    assert any("test_cuda_train" in k for k in tests["per_test"]) and any("test_cuda_profile" in k for k in tests["per_test"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["device-check.log", "gpu-tests.xml", "pytest.log", "summary.json"]


def test_out_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", str(tmp_path / "f")], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"device-check: {tmp_path / 'f'} is a file; give a folder for the results"
