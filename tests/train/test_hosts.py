"""Two-node ``fedge train`` across two hosts: two network namespaces (own stacks, addresses from
198.18.0.0/15, hostnames) joined by a veth pair, one ``fedge train`` on each with the documented
``--nnodes 2 --rdzv-endpoint HOST0:PORT``. torchrun's c10d rendezvous, gloo's connections and the
MASTER_ADDR lookup all go over the link between them, as between two machines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 6
_FEDGE = [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())"]


def test_two_hosts_train_the_single_process_model(tmp_path: Path, netns_hosts, write_run, fedge_env, reference_state) -> None:
    # Prepare: the same command on both hosts, the endpoint on host 0's address
    hosts = netns_hosts(2)
    settings = write_run(tmp_path / "settings") / "config.toml"
    args = ["train", settings, "--strategy", "allreduce", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint",
            f"{hosts[0].address}:29400", "--rdzv-timeout", "60", "--steps", str(STEPS), "--json"]  # fmt: skip
    # Execute
    procs = [
        subprocess.Popen(h.argv(*_FEDGE, *args, "--out", tmp_path / f"node{i}"), env=fedge_env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i, h in enumerate(hosts)
    ]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=240))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            raise
    # Assert: both finish; node 0 (wherever the rendezvous put it) holds the single-process model
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    reports = [json.loads(out) for out, _ in outs]
    assert sorted(r["node_rank"] for r in reports) == [0, 1]
    assert {r["rank0_host"] for r in reports} <= {h.hostname for h in hosts}  # rank 0's host, by its own name
    node0 = next(tmp_path / f"node{i}" for i, r in enumerate(reports) if r["node_rank"] == 0)
    assert json.loads((node0 / "summary.json").read_text())["world_size"] == 2
    ref_state, _ = reference_state(STEPS)
    for key, value in ref_state.items():
        torch.testing.assert_close(torch.load(node0 / "model.pt", weights_only=True)[key], value, rtol=1e-5, atol=1e-6)
