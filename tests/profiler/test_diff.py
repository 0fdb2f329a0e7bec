"""``fedge profile diff``: a trace against itself is empty; the obvious regressions are obvious (a kernel that
doubled, a new memcpy, communication that moved from hidden to exposed); two ranks of a shared multi-rank set
name the collective whose wait differs most."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.cli.app import main
from fedge.profiler import JobView, load_job
from fedge.profiler.analyses.collectives import collective_ops, match_collectives
from fedge.profiler.analyses.diff import diff_traces

NCCL = "ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)"
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "hta-sampled-128gpu-2rank"


def _run(path: Path, builder, *, gemm_us: float, comm_at: float, memcpy: bool) -> Path:
    path.mkdir()
    for rank in (0, 1):
        b = builder(rank=rank).step(1, 0, 1000).step(2, 1000, 1000)
        b.kernel("gemm", 10, gemm_us).kernel(NCCL, comm_at, 100, stream=20, **{"In msg nelems": 1024, "dtype": "Float"})
        if memcpy:
            b.kernel("Memcpy HtoD (Pageable -> Device)", 500, 40, cat="gpu_memcpy", stream=30)
        b.write(path / f"rank{rank}_trace.json")
    return path


def test_a_trace_against_itself_is_empty(tmp_path, builder, capsys):
    run = _run(tmp_path / "a", builder, gemm_us=200, comm_at=50, memcpy=False)
    assert main(["profile", "diff", str(run), str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changes"] == [] and out["pairs"] == [[0, 0], [1, 1]] and out["errors"] == []


def test_the_obvious_regressions_are_named(tmp_path, builder, capsys):
    # Prepare: the candidate's gemm takes twice as long, a memcpy is new, and the all-reduce starts after the
    # gemm ends (exposed) instead of under it (hidden)
    old = _run(tmp_path / "old", builder, gemm_us=200, comm_at=50, memcpy=False)
    new = _run(tmp_path / "new", builder, gemm_us=400, comm_at=420, memcpy=True)
    # Execute
    assert main(["profile", "diff", str(old), str(new), "--json"]) == 0
    changes = json.loads(capsys.readouterr().out)["changes"]
    # Assert
    by = {(c["scope"], c["category"], c["name"]): c for c in changes}
    gemm = by[("rank 0", "computation kernel", "gemm")]
    assert gemm["delta_us"] == pytest.approx(200) and gemm["delta_pct"] == pytest.approx(100) and gemm["status"] == "grew"
    memcpy = by[("rank 1", "memory kernel", "Memcpy HtoD (Pageable -> Device)")]
    assert memcpy["status"] == "new" and memcpy["candidate_us"] == pytest.approx(40)
    exposed = by[("rank 0", "time", "exposed communication")]
    hidden = by[("rank 0", "time", "hidden communication")]
    assert exposed["delta_us"] == pytest.approx(100) and hidden["delta_us"] == pytest.approx(-100)
    assert by[("all ranks", "computation kernel", "gemm")]["delta_us"] == pytest.approx(400)
    assert abs(changes[0]["delta_us"]) == max(abs(c["delta_us"]) for c in changes)  # ranked by time


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/traces")
def test_two_ranks_of_a_shared_set_name_the_collective_whose_wait_differs_most(shared_job):
    # Prepare: the wait per collective on each rank, from the two ranks' collectives matched one by one: the
    # transfer is the shortest duration across ranks (torch-tb-profiler's definition), the rest of each is wait
    files = sorted(SHARED.glob("sampled_rank-*.json.gz"))
    both = JobView(shared_job(SHARED.name))
    per_rank = {t.rank: collective_ops(both, t) for t in both.traces}
    wait_gap = {}
    for m in match_collectives(per_rank):
        dur = m.end - m.start
        wait = (dur - dur.min(axis=0)).sum(axis=1)
        wait_gap[m.collective] = abs(float(wait[1] - wait[0]))
    expected = max(wait_gap, key=wait_gap.__getitem__)
    # Execute: rank 0 against rank 1, each file on its own
    d = diff_traces(JobView(load_job(files[0])), JobView(load_job(files[1])))
    # Assert
    top = next(r for r in d.rows if r.category == "collective")
    assert d.pairs == ((0, 1),)
    assert top.name.startswith(f"{expected} [") and len(wait_gap) >= 2
