"""Multi-node ``fedge train`` end to end: two ``fedge train`` processes on this machine that share
``--rdzv-endpoint 127.0.0.1:PORT`` are two torchrun agents ("nodes") meeting in a real c10d rendezvous over
TCP, exactly as on two hosts. Two nodes train the model single-process training gives; an elastic
``--nnodes 1:2`` job starts on one node once its last call ends; nodes started with different settings
stop with one line instead of hanging in mismatched collectives."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 20


def _rdzv_port() -> int:
    """A free port below the kernel's ephemeral range: no outgoing connection (of this test session or anyone
    else's) can be handed it between this check and torchrun binding its rendezvous store there."""
    try:
        ephemeral_lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_lo = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, ephemeral_lo))
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found below the ephemeral range")


class _Node:
    """One ``fedge train`` process (one node), its output in files so a full pipe never blocks it."""

    def __init__(self, args: list[str], out: Path, env: dict[str, str], tag: str = "") -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        logs = out.with_name(out.name + tag)
        self.stdout_path, self.stderr_path = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", *args, "--out", str(out)],
                env=env, stdout=so, stderr=se, start_new_session=True,
            )  # fmt: skip

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def _wait(nodes: list[_Node], timeout_s: float = 180) -> list[int]:
    """Exit codes of all nodes; on a timeout SIGTERM them (fedge then stops torchrun and its workers)."""
    deadline, timed_out = time.monotonic() + timeout_s, False
    try:
        for node in nodes:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
    assert not timed_out, f"timed out after {timeout_s:g}s: {[n.stderr[-2000:] for n in nodes]}"
    return [node.proc.returncode for node in nodes]


def _job_args(config: Path, nnodes: str, *extra: str) -> list[str]:
    return [
        "train", str(config), "--strategy", "allreduce", "--nproc", "1", "--nnodes", nnodes,
        "--rdzv-endpoint", f"127.0.0.1:{_rdzv_port()}", "--rdzv-timeout", "60", "--steps", str(STEPS), "--json", *extra,
    ]  # fmt: skip


def _assert_same(state: dict, ref: dict) -> None:
    for key, value in ref.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def settings(tmp_path: Path, write_run) -> Path:
    """config.toml with the tiny model and data (flags give the rest)."""
    return write_run(tmp_path / "settings") / "config.toml"


def test_two_nodes_train_the_single_process_model(tmp_path: Path, settings: Path, fedge_env, reference_state) -> None:
    # Prepare: the same command on both nodes, each with its own run directory
    args = _job_args(settings, "2")
    # Execute
    nodes = [_Node(args, tmp_path / f"node{i}", fedge_env) for i in range(2)]
    codes = _wait(nodes)
    # Assert: both succeed; the rendezvous made one of them node 0, which holds rank 0's outputs
    assert codes == [0, 0], [n.stderr[-3000:] for n in nodes]
    reports = [json.loads(n.stdout) for n in nodes]
    assert sorted(r["node_rank"] for r in reports) == [0, 1]
    assert all(r["num_nodes"] == 2 for r in reports)
    first, second = sorted(zip(reports, nodes), key=lambda rn: rn[0]["node_rank"])
    run0, run1 = first[1].out, second[1].out
    assert first[0]["world_size"] == 2 and first[0]["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (run0 / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    ref_state, _ = reference_state(STEPS)
    _assert_same(torch.load(run0 / "model.pt", weights_only=True), ref_state)  # = one process on the global batches
    # node 1's directory: its config, its torchrun log and which node it was; no second model
    assert not any((run1 / name).exists() for name in ("model.pt", "metrics.jsonl", "summary.json"))
    assert (run1 / "config.toml").is_file() and (run1 / "logs" / "train.log").is_file()
    [node_file] = (run1 / "nodes").glob("*.json")
    assert json.loads(node_file.read_text())["ranks"] == [1, 1]
    assert "node 1 of 2 (rank 1 of 2); node 0 (" in second[1].stderr
    assert "done: node 1 of 2 finished" not in second[1].stdout  # --json prints JSON only
    assert "Traceback" not in first[1].stderr + second[1].stderr


def test_elastic_job_starts_on_one_node_after_the_last_call(
    tmp_path: Path, settings: Path, fedge_env, reference_state
) -> None:
    # Prepare: --nnodes 1:2, but only one node ever comes
    args = _job_args(settings, "1:2", "--rdzv-last-call", "1")
    # Execute
    [code] = _wait([node := _Node(args, tmp_path / "node0", fedge_env)])
    # Assert: it trained alone, having waited the 1 s last call instead of torchrun's default 30 s
    assert code == 0, node.stderr[-3000:]
    report = json.loads(node.stdout)
    assert (report["node_rank"], report["num_nodes"], report["world_size"]) == (0, 1, 1)
    assert "waiting for 1 to 2 nodes" in node.stderr and "1s (--rdzv-last-call) after 1 have" in node.stderr
    [node_file] = (node.out / "nodes").glob("*.json")
    started_s = node_file.stat().st_mtime - (node.out / "config.toml").stat().st_mtime  # launch -> workers up
    assert started_s < 25, f"the rendezvous took {started_s:.0f}s; --rdzv-last-call 1 did not reach torchrun"
    ref_state, _ = reference_state(STEPS)
    _assert_same(torch.load(node.out / "model.pt", weights_only=True), ref_state)


def test_nodes_started_with_different_settings_stop_with_one_line(tmp_path: Path, settings: Path, fedge_env) -> None:
    # Prepare: node B was given another --steps
    args = _job_args(settings, "2")
    other = [*args[: args.index("--steps") + 1], str(STEPS + 1), *args[args.index("--steps") + 2 :]]
    # Execute
    nodes = [_Node(args, tmp_path / "node0", fedge_env), _Node(other, tmp_path / "node1", fedge_env)]
    codes = _wait(nodes)
    # Assert: both nodes exit 1 at once with the same line, before any step
    assert codes == [1, 1], [n.stderr[-3000:] for n in nodes]
    for node in nodes:
        [line] = [x for x in node.stderr.splitlines() if x.startswith("fedge: error:")]
        assert "the nodes of this job were started with different settings: steps is " in line
        assert "Traceback" not in node.stderr
    assert not any((n.out / "metrics.jsonl").exists() for n in nodes)


def test_a_node_leaves_an_elastic_job_and_it_finishes_on_one_node_from_its_checkpoint(
    tmp_path: Path, settings: Path, fedge_env
) -> None:
    # Prepare: --nnodes 1:2 on one shared run directory, checkpointing; node A hosts the rendezvous store
    steps = 1500
    args = _job_args(settings, "1:2", "--rdzv-last-call", "2", "--max-restarts", "2", "--checkpoint-every", "50")
    args[args.index("--steps") + 1] = str(steps)
    shared = tmp_path / "shared"
    node_a = _Node(args, shared, fedge_env, tag="-a")
    deadline = time.monotonic() + 60
    while "waiting for 1 to 2 nodes" not in node_a.stderr and time.monotonic() < deadline:
        time.sleep(0.2)
    node_b = _Node(args, shared, fedge_env, tag="-b")
    # Execute: once both train and a checkpoint exists, node B goes away (its fedge and torchrun die)
    latest = shared / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 180
    while not (latest.is_file() and json.loads(latest.read_text())["world_size"] == 2):
        assert node_a.proc.poll() is None and node_b.proc.poll() is None, node_a.stderr[-2000:] + node_b.stderr[-2000:]
        assert time.monotonic() < deadline, "the two-node job never checkpointed"
        time.sleep(0.2)
    left_at = json.loads(latest.read_text())["step"]
    os.kill(node_b.proc.pid, signal.SIGKILL)
    [code] = _wait([node_a], timeout_s=300)
    node_b.proc.wait(timeout=30)
    # Assert: A's torchrun restarted the group at one node, which resumed from a checkpoint and finished
    assert code == 0, node_a.stderr[-3000:]
    report = json.loads(node_a.stdout)
    assert (report["world_size"], report["steps"]) == (1, steps)
    assert report["restarts"] >= 1 and report["resumed_from_step"] >= left_at
    records = [json.loads(line) for line in (shared / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # redone steps replaced, none missing
    assert report["test_accuracy"] > 0.9
