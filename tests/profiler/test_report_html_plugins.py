"""The report is built from the registered analyses: every one renders in the terminal, --json and --html
(a contract test over the registry), a third-party analysis (the example package's launch-delay, installed
for real) appears in all three like a built-in, the HTML page is self-contained, and the CLI module stays light."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedge.errors import ConfigError
from fedge.profiler import JobView, Mode, load_job, run_report
from fedge.profiler.analyses.base import AnalysisConfig, Result, Section
from fedge.profiler.report import analyses, choose_analyses, render_html, render_terminal
from fedge.registry import Registry, plugin

BIN = Path(sys.executable).parent
NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"
ANALYSES = analyses().names()


def _traces(tmp_path, builder):
    for rank in (0, 1):
        b = builder(rank=rank).kernel("gemm <T>&", 0, 100).kernel(NCCL, 50 + 30 * rank, 200 - 30 * rank, stream=20)
        b.write(tmp_path / f"rank{rank}.json")
    return tmp_path


def _report(tmp_path, builder, registry=None):
    return run_report(load_job(_traces(tmp_path, builder), max_workers=1), registry=registry)


def _terminal(report) -> str:
    console = Console(record=True, width=200)
    render_terminal(report, console=console)
    return console.export_text()


@pytest.mark.parametrize("name", ANALYSES)
def test_every_registered_analysis_renders_in_all_three_forms(tmp_path, builder, name):
    # Prepare: the analysis on its own, as the report configures it (an analysis of two runs, the diff, compares
    # the job with itself; one that belongs to a mode, tb-profiler's view, runs under that mode)
    job = load_job(_traces(tmp_path, builder), max_workers=1)
    inputs = getattr(analyses().get(name), "inputs", 1)
    mode = Mode((getattr(analyses().get(name), "modes", None) or (Mode.FEDGE,))[0])
    baseline = job if inputs == 2 else None
    (chosen,), _ = choose_analyses({"mode": mode, "include_last_step": False, "top": 10},
                                   registry=_only(name, analyses().get(name)), inputs=inputs)
    result = chosen.plugin.run(JobView(job, mode=mode, baseline=JobView(job, mode=mode) if baseline else None), chosen.config)
    # Execute
    report = run_report(job, baseline=baseline, mode=mode)
    # Assert: it gave titled sections, shown in the terminal and the HTML; its JSON is where the rule says
    assert isinstance(result, Result)
    sections = dict(report.sections)
    assert name in sections, report.data["notes"]
    assert sections[name] and all(isinstance(s, Section) and s.title for s in sections[name])
    text = _terminal(report)
    assert all(s.title in text for s in sections[name])
    assert f'<section id="{name}">' in render_html(report)
    data = json.loads(json.dumps(report.data))
    own, per_rank = result.report_fields(), result.rank_fields()
    if own or per_rank:
        assert set(own) <= set(data) and name not in data["analyses"]
        assert all(set(per_rank.get(r["rank"], {})) <= set(r) for r in data["ranks"])
    else:
        assert data["analyses"][name] == json.loads(json.dumps(result.to_json()))


def test_the_contract_keys_come_from_the_analyses(tmp_path, builder):
    data = _report(tmp_path, builder).data
    for key in ("ranks", "collectives", "collective_wait", "stragglers", "recommendations", "kernels", "errors", "mode"):
        assert key in data
    contract = {"rank", "span_us", "idle_us", "compute_us", "non_compute_us", "comm_us", "exposed_comm_us", "overlap_pct"}
    assert all(contract <= set(r) for r in data["ranks"])
    assert data["notes"] == [n for n in data["notes"] if "failed" not in n]


def test_html_is_self_contained_and_escaped(tmp_path, builder):
    page = render_html(_report(tmp_path, builder))
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "rank 1" in page
    assert not re.search(r"<script|<link|src=|href=|@import|url\(", page)  # nothing fetched, no scripts
    assert "gemm <T>&" not in page and "gemm &lt;T&gt;&amp;" in page  # names are escaped


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
        self.name, self.value, self._obj = name, f"tests:{name}", obj

    def load(self) -> object:
        return self._obj


def _only(name: str, obj: object) -> Registry:
    return Registry("analysis", analyses().protocol, source=lambda group: [(_EntryPoint(name, obj), "x", "1")], env={})


def test_a_failing_analysis_becomes_a_note(tmp_path, builder):
    @plugin("analysis", "broken")
    class Broken:
        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

        @staticmethod
        def run(view, config):
            raise RuntimeError("boom")

    report = _report(tmp_path, builder, registry=_only("broken", Broken))
    assert any("analysis 'broken' failed: RuntimeError: boom" in n for n in report.data["notes"])


@dataclasses.dataclass(frozen=True, slots=True)
class _Claims(Result):
    """Claims a key the report owns."""

    rows: tuple[dict[str, int], ...] = ({"rank": 0},)

    def report_fields(self):
        return {"ranks": []}


def test_an_analysis_cannot_take_a_key_of_the_report(tmp_path, builder):
    @plugin("analysis", "greedy")
    class Greedy:
        @dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
        class Config(AnalysisConfig):
            pass

        @staticmethod
        def run(view, config):
            return _Claims()

    report = _report(tmp_path, builder, registry=_only("greedy", Greedy))
    assert len(report.data["ranks"]) == 2 and report.data["analyses"]["greedy"] == {"rows": [{"rank": 0}]}
    assert any("already in the report" in n for n in report.data["notes"])


def test_a_bad_analysis_setting_is_refused_before_any_work(tmp_path, builder):
    with pytest.raises(ConfigError, match=r"analysis stragglers\.min_delay_us must be a finite number"):
        run_report(load_job(_traces(tmp_path, builder), max_workers=1), options={"stragglers": {"min_delay_us": "nan"}})
    with pytest.raises(ConfigError, match="no analysis named 'nope'; installed: "):
        run_report(load_job(tmp_path, max_workers=1), options={"nope": {"x": "1"}})


@pytest.mark.slow
def test_example_package_analysis_appears_in_terminal_json_and_html(tmp_path, builder, example_plugin_site):
    # Prepare: the example package installed for real into a private target dir, traces with known launches
    env = {**os.environ, "PYTHONPATH": str(example_plugin_site)}
    traces = _traces(tmp_path / "traces", builder) if (tmp_path / "traces").mkdir() is None else None
    fedge = [str(BIN / "fedge"), "profile", "report", str(traces)]
    html = tmp_path / "report.html"
    # Execute
    as_json = subprocess.run([*fedge, "--json", "-o", "launch-delay.threshold_us=5"], env=env, capture_output=True,
                             text=True, check=True)
    terminal = subprocess.run([*fedge, "--html", str(html)], env={**env, "COLUMNS": "200"}, capture_output=True,
                              text=True, check=True)
    # Assert: launches are 10 us before each kernel and take 2 us -> 8 us delay, above the threshold of 5
    rows = json.loads(as_json.stdout)["analyses"]["launch-delay"]["rows"]
    assert [r["rank"] for r in rows] == [0, 1] and rows[0]["kernels"] == 2 and rows[0]["mean_us"] == pytest.approx(8.0)
    assert rows[0]["over_threshold"] == 2
    assert "Kernel launch delay per rank" in terminal.stdout
    page = html.read_text()
    assert '<section id="launch-delay">' in page and "Kernel launch delay per rank" in page


def test_cli_module_does_not_import_numpy_or_orjson(tmp_path):
    code = "import sys, fedge.profiler.cli; bad = {'numpy', 'orjson', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
