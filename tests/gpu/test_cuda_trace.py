"""``fedge profile report --mode hta`` on the CUDA traces brought back from a GPU machine
(tests/gpu/data/cuda-*/, gzip'ed, each with the hta-reference.json that scripts/hta-reference wrote from
Holistic Trace Analysis 0.5.0) gives HTA's temporal breakdown and overlap. Runs on the CPU; skips, saying
why, until the traces are committed. The same check runs on a shared trace set with its HTA reference,
so the comparison itself is exercised either way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.cli.app import main

DATA = Path(__file__).parent / "data"
SETS = ["cuda-nccl-1", "cuda-gloo-cuda-2", "shared:hta-amd-mi250-minitoy"]  # the first two: scripts/device-check's


def _folder(name: str, request: pytest.FixtureRequest) -> Path:
    if name.startswith("shared:"):
        return request.getfixturevalue("shared_traces") / name.partition(":")[2]
    folder = DATA / name
    if not any(folder.glob("*.json.gz")):
        pytest.skip(
            f"no CUDA trace committed at {folder} yet: run scripts/device-check on a GPU machine, unpack its "
            "cuda-traces.tar.gz here (gzip the traces) and run scripts/hta-reference on each folder"
        )
    return folder


@pytest.mark.parametrize("variant", ["default", "include_last_step"])
@pytest.mark.parametrize("name", SETS)
def test_report_in_hta_mode_gives_htas_breakdown(
    name: str, variant: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    folder = _folder(name, request)
    ref = json.loads((folder / "hta-reference.json").read_text())[variant]
    last = ["--include-last-step"] if variant == "include_last_step" else []
    # Execute
    code = main(["profile", "report", str(folder), "--mode", "hta", "--json", *last])
    out = capsys.readouterr()
    # Assert
    assert code == 0, out.err
    ranks = {r["rank"]: r for r in json.loads(out.out)["ranks"]}
    assert sorted(ranks) == sorted(row["rank"] for row in ref["temporal_breakdown"])
    for want in ref["temporal_breakdown"]:
        got = ranks[want["rank"]]
        assert got["device"] == "gpu" and got["num_kernels"] > 0
        assert got["span_us"] == pytest.approx(want["kernel_time(us)"], rel=1e-3)
        for key in ("idle", "compute", "non_compute"):
            assert got[f"{key}_pct"] == pytest.approx(want[f"{key}_time_pctg"], abs=0.5), key
    for want in ref["comm_comp_overlap"]:
        expected, got = want["comp_comm_overlap_pctg"], ranks[want["rank"]]["overlap_pct"]
        assert got is None if expected is None else got == pytest.approx(expected, abs=0.5)
