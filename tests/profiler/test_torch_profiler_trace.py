"""A trace written by this machine's torch.profiler (gloo, CPU, tensorboard_trace_handler layout, as
``fedge train --profile`` writes them) is read and analysed end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedge.cli.app import main

SCRIPT = """
import sys, torch, torch.distributed as dist
out, store = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
schedule = torch.profiler.schedule(wait=0, warmup=1, active=3, repeat=1)
handler = torch.profiler.tensorboard_trace_handler(out, worker_name="rank0", use_gzip=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule, record_shapes=True,
                            on_trace_ready=handler) as prof:
    for _ in range(4):
        model(torch.randn(32, 64)).sum().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step(); opt.zero_grad(); prof.step()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_report_on_a_real_torch_profiler_trace(tmp_path, capsys):
    pytest.importorskip("torch")
    # Prepare: a real trace from torch.profiler
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "traces"), str(tmp_path / "store")], check=True,
                   capture_output=True, timeout=300, cwd=tmp_path)
    # Execute
    code = main(["profile", "report", str(tmp_path / "traces"), "--json"])
    report = json.loads(capsys.readouterr().out)
    # Assert: CPU-only, gloo all-reduces of the 4 parameters in the 2 steps kept (last of 3 active dropped)
    assert code == 0 and not report["gpu_activity"] and report["ranks"][0]["device"] == "cpu"
    rows = {r["collective"]: r for r in report["collectives"]}
    assert rows["all_reduce"]["count"] == 8 and rows["all_reduce"]["size_source"] == "input dims"
    assert rows["all_reduce"]["total_bytes"] == 2 * (64 * 64 + 64 + 64 * 10 + 10) * 4
