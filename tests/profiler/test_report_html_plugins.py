"""The HTML page (self-contained; screenshot in headless Chromium when installed), third-party analyses
through the registry (the example package's launch-delay), and import hygiene of the CLI module."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.profiler import build_report, load_job
from fedge.profiler.report import render_html
from fedge.registry import Registry

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_plugin" / "src" / "fedge_example_plugin" / "launch_delay.py"
NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"


def _report(tmp_path, builder, registry=None):
    for rank in (0, 1):
        b = builder(rank=rank).kernel("gemm <T>&", 0, 100).kernel(NCCL, 50 + 30 * rank, 200 - 30 * rank, stream=20)
        b.write(tmp_path / f"rank{rank}.json")
    return build_report(load_job(tmp_path, max_workers=1), registry=registry)


def test_html_is_self_contained_and_escaped(tmp_path, builder):
    page = render_html(_report(tmp_path, builder))
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "rank 1" in page
    assert not re.search(r"<script|<link|src=|href=|@import|url\(", page)  # nothing fetched, no scripts
    assert "gemm <T>&" not in page  # names are escaped


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_html_opens_in_headless_chromium(tmp_path, builder):
    html = tmp_path / "report.html"
    html.write_text(render_html(_report(tmp_path, builder)))
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--screenshot={png}", "--window-size=1200,1600", html.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert png.exists() and png.stat().st_size > 1000, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "CONSOLE" not in proc.stderr.upper().replace("CONSOLE_", "")


class _EntryPoint:
    def __init__(self, name: str, obj: object) -> None:
        self.name, self.value, self._obj = name, f"fedge_example_plugin.launch_delay:{name}", obj

    def load(self) -> object:
        return self._obj


def test_third_party_analysis_runs_in_the_report(tmp_path, builder, monkeypatch):
    # Prepare: the example package's module, advertised through a fake entry point
    spec = importlib.util.spec_from_file_location("fedge_example_launch_delay", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    registry = Registry("analysis", source=lambda group: [(_EntryPoint("launch-delay", module.LaunchDelay), "fedge-example-plugin", "0.1.0")], env={})
    # Execute
    report = _report(tmp_path, builder, registry=registry)
    # Assert: launches are 10 us before each kernel and take 2 us -> 8 us delay
    rows = report["analyses"]["launch-delay"]["rows"]
    assert [r["rank"] for r in rows] == [0, 1] and rows[0]["kernels"] == 2 and rows[0]["mean_us"] == pytest.approx(8.0)


def test_a_failing_third_party_analysis_becomes_a_note(tmp_path, builder):
    import dataclasses

    class Broken:
        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

        @staticmethod
        def run(job, config):
            raise RuntimeError("boom")

    from fedge.registry import plugin

    plugin("analysis", "broken")(Broken)
    registry = Registry("analysis", source=lambda group: [(_EntryPoint("broken", Broken), "x", "1")], env={})
    report = _report(tmp_path, builder, registry=registry)
    assert any("analysis 'broken' failed: RuntimeError: boom" in n for n in report["notes"])


def test_cli_module_does_not_import_numpy_or_orjson(tmp_path):
    code = "import sys, fedge.profiler.cli; bad = {'numpy', 'orjson', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
