"""torch-tb-profiler 0.4.3, the TensorBoard plugin: a 2-rank ``fedge train --profile`` run opens in it (loaded with
the plugin's own RunLoader, distributed view and comm-ops table found for both workers), and ``fedge profile
report --mode tb-profiler`` gives the numbers of its distributed view: computed by the plugin's own parsing code
in the test on a synthetic job, the shared multi-rank set and that run, and stored (made by
scripts/tb-profiler-reference, the same code) for the other shared sets."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge.cli.app import main
from fedge.profiler import JobView, load_job
from fedge.profiler.analyses.collectives import collective_ops, match_collectives
from fedge.profiler.analyses.tb_profiler import TbProfilerView, tb_profiler_view

pytest.importorskip("torch_tb_profiler")

BIN = Path(sys.executable).parent
STORED = Path(__file__).parent / "data" / "tb-profiler-reference.json"


def _plugin_view(files: list[Path]) -> dict[str, Any]:
    """The plugin's distributed view of ``files`` (workers named by file), as scripts/tb-profiler-reference makes it."""
    from torch_tb_profiler.profiler.data import DistributedRunProfileData, RunProfileData
    from torch_tb_profiler.profiler.loader import RunLoader
    from torch_tb_profiler.profiler.run_generator import DistributedRunGenerator

    with tempfile.TemporaryDirectory() as cache:
        profiles = [DistributedRunProfileData(RunProfileData.parse(f.name, None, str(f), cache)) for f in files]
    loader = RunLoader.__new__(RunLoader)  # its merging of the workers' collectives, without its processes
    loader.run_name = "test"
    view = loader._process_distributed_profiles(profiles, None)
    return {"distributed": view is not None,
            "overlap": (view.steps_to_overlap if view else DistributedRunGenerator(profiles, None)._generate_overlap_graph())["data"],
            "wait": view.steps_to_wait["data"] if view else None,
            "ops": {w: t["rows"] for w, t in view.comm_ops["data"].items()} if view else None}


def _step(step: str | None) -> str:
    return "null" if step is None else step  # collectives outside every step, as JSON spells the plugin's None


def _per_worker(table: dict[str | None, dict[str, Any]] | None, worker: str) -> dict[str, Any]:
    return {_step(step): values[worker] for step, values in (table or {}).items() if worker in values}


def _assert_equal(mine: TbProfilerView, ref: dict[str, Any], worker_of: dict[int, str]) -> None:
    assert mine.distributed == ref["distributed"], mine.reason
    for rank, worker in worker_of.items():
        overview = {r.step: [r.computation_us, r.overlapping_us, r.communication_us, r.other_us]
                    for r in mine.overview if r.rank == rank}
        assert overview == _per_worker(ref["overlap"], worker), (rank, worker)
        wait = {_step(r.step): [r.data_transfer_us, r.synchronizing_us] for r in mine.wait if r.rank == rank}
        assert wait == _per_worker(ref["wait"], worker), (rank, worker)
        ops = [[r.name, r.calls, r.total_bytes, r.avg_bytes, r.total_latency_us, r.avg_latency_us, r.data_transfer_us,
                r.avg_data_transfer_us] for r in mine.comm_ops if r.rank == rank]
        assert ops == ((ref["ops"] or {}).get(worker) or []), (rank, worker)


def _by_file(job) -> dict[int, str]:
    return {t.rank: Path(t.path).name for t in job.traces}


def test_tb_profiler_mode_equals_the_plugin_and_says_where_all_to_all_hides(tmp_path, builder, capsys):
    # Prepare: 2 ranks, 2 steps each; an all_reduce (kernel tied to its nccl: op by External id), an all_to_all
    # (its SendRecv kernel, unknown to the plugin) and a gemm that overlaps the all_reduce
    for rank in (0, 1):
        b = builder(rank=rank)
        for step, t0 in ((1, 0.0), (2, 3000.0)):
            b.step(step, t0, 2500)
            b.cpu_op("nccl:all_reduce", t0 + 100, 40, cat="user_annotation", **{"External id": 10 * step + 1,
                     "Input Dims": [[1024]], "Input type": ["float"]})
            b.kernel("ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*)", t0 + 300 + 150 * rank, 600 - 150 * rank,
                     stream=20, **{"External id": 10 * step + 1})
            b.cpu_op("nccl:all_to_all", t0 + 200, 30, cat="user_annotation", **{"External id": 10 * step + 2})
            b.kernel("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*)", t0 + 1000, 700, stream=21,
                     **{"External id": 10 * step + 2})
            b.kernel("gemm", t0 + 250, 400 + 100 * rank, **{"External id": 10 * step + 3})
        b.write(tmp_path / f"rank{rank}.1.pt.trace.json.gz")
    files = sorted(tmp_path.glob("*.json.gz"))
    # Execute
    mine = tb_profiler_view(load_job(tmp_path, max_workers=1))
    ref = _plugin_view(files)
    code = main(["profile", "report", str(tmp_path), "--mode", "tb-profiler", "--json"])
    report = json.loads(capsys.readouterr().out)
    # Assert: the plugin's numbers, all_to_all as computation there, and a note saying so
    _assert_equal(mine, ref, {0: files[0].name, 1: files[1].name})
    assert ref["distributed"] and [r[0] for r in ref["ops"][files[0].name]] == ["nccl:all_reduce"]
    assert code == 0 and report["mode"] == "tb-profiler" and "tb-profiler" in report["analyses"]
    assert any("nccl:all_to_all x4" in n and "count as Computation" in n and "--mode fedge" in n for n in report["notes"])
    assert main(["profile", "report", str(tmp_path), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert "tb-profiler" not in default["analyses"]  # the view belongs to its own mode
    assert default["ranks"][0]["comm_us"] > report["ranks"][0]["comm_us"]  # fedge counts the all_to_all


@pytest.mark.slow
def test_tb_profiler_mode_equals_the_plugin_on_the_shared_multi_rank_set(shared_traces, shared_job):
    # Prepare
    folder = shared_traces / "hta-sampled-128gpu-2rank"
    job = shared_job(folder.name)
    # Execute
    mine, ref = tb_profiler_view(job), _plugin_view(sorted(folder.glob("*.json.gz")))
    # Assert
    _assert_equal(mine, ref, _by_file(job))
    assert mine.distributed and {r.rank for r in mine.wait} == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(json.loads(STORED.read_text())) if STORED.exists() else [])
def test_tb_profiler_mode_equals_the_stored_plugin_view(shared_job, name):
    ref = json.loads(STORED.read_text())[name]
    job = shared_job(name)
    _assert_equal(tb_profiler_view(job), ref, _by_file(job))


# The plugin starts its parsers with multiprocessing's spawn, so it runs from a script file, as TensorBoard runs it.
LOADER = '''
import json, sys
from torch_tb_profiler import io
from torch_tb_profiler.profiler.loader import RunLoader

if __name__ == "__main__":
    run = RunLoader("fedge", sys.argv[1], io.Cache()).load()
    out = {}
    for (worker, span), profile in run.profiles.items():
        if type(profile).__name__ == "DistributedRunProfile":
            out = {"worker": worker, "overlap": profile.steps_to_overlap["data"], "wait": profile.steps_to_wait["data"],
                   "comm_ops": profile.comm_ops["data"]}
    print(json.dumps({"workers": sorted(w for w, _ in run.profiles), "distributed": out}))
'''


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_two_rank_fedge_train_profile_run_opens_in_torch_tb_profiler(tmp_path, capsys):
    pytest.importorskip("torch")
    # Prepare: a real 2-process run with --profile (5 steps: the profiler's whole wait/warmup/active window)
    run = tmp_path / "run"
    subprocess.run([str(BIN / "fedge"), "train", "--strategy", "allreduce", "--nproc", "2", "--steps", "5", "--profile",
                    "--out", str(run)], check=True, capture_output=True, timeout=600)
    (tmp_path / "load.py").write_text(LOADER)
    # Execute: the plugin's own loader, and fedge's report of the same traces in both modes
    loaded = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(run / "traces")], check=True,
                            capture_output=True, text=True, timeout=600)
    tb = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert main(["profile", "report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    job = load_job(run / "traces", max_workers=1)
    # Assert: the distributed view, with per-worker Computation/Overlapping/Communication/Other and comm ops
    view = tb["distributed"]
    assert {"rank0", "rank1", "All"} <= set(tb["workers"]) and view["worker"] == "All"
    assert set(view["overlap"]["all"]) == {"rank0", "rank1"} and all(len(v) == 4 for v in view["overlap"]["all"].values())
    for worker in ("rank0", "rank1"):
        table = view["comm_ops"][worker]
        assert [c["name"] for c in table["columns"]][:2] == ["Name", "Calls"]
        assert table["rows"] and table["rows"][0][0] == "gloo:all_reduce" and table["rows"][0][1] >= 1
    assert all(len(v) == 2 and v[0] > 0 for v in view["wait"]["all"].values())
    # --mode tb-profiler gives the numbers TensorBoard shows
    ops = {w: t["rows"] for w, t in view["comm_ops"].items()}
    _assert_equal(tb_profiler_view(job), {"distributed": True, "overlap": view["overlap"], "wait": view["wait"],
                                          "ops": ops}, {0: "rank0", 1: "rank1"})
    # fedge's own split: per matched collective a rank's transfer is its (clock-aligned) end minus the last peer's
    # arrival. gloo records an op's end when the rank's thread returns from it, and on a busy machine one rank's
    # thread can be scheduled late after the collective completed, so its ends trail its peer's and its transfer
    # sum is larger (4459 vs 4771 us in one loaded run): the two ranks' sums differ by exactly the sum of their end
    # differences. torch-tb-profiler gives every worker the shortest duration across workers, equal by construction.
    both = JobView(job)
    matched = match_collectives({t.rank: collective_ops(both, t) for t in both.traces})
    expected = {r: sum(float(np.clip(m.end[m.ranks.index(r)] - m.start.max(axis=0), 0, None).sum()) for m in matched)
                for r in (0, 1)}
    transfer = {w["rank"]: w["transfer_us"] for w in report["collective_wait"]}
    assert transfer == pytest.approx(expected, rel=1e-6, abs=0.01) and all(t > 0 for t in transfer.values())
    if all((m.end - m.start.max(axis=0) >= 0).all() for m in matched):  # no op ended before its last peer arrived
        ends = sum(float((m.end[m.ranks.index(0)] - m.end[m.ranks.index(1)]).sum()) for m in matched)
        assert transfer[0] - transfer[1] == pytest.approx(ends, abs=0.01)
