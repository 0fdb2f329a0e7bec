"""The same apps on Flower's Simulation Engine (Ray): one job on both engines, hundreds of virtual clients,
and a Ray cluster the user runs (a local Ray head this test starts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray")

from fedge.plugins.fl import FlConfig, run
from fedge.supervisor import cmdline, free_port, processes_with_env, terminate_tree, wait_for_port

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

SMALL = {"partition": "iid", "local_epochs": 2, "batch_size": 16, "model": "mlp", "model_options": {"hidden": [32]}}


def _layout(run_dir: Path) -> set[str]:
    # Every file both engines write; the deployment engine also keeps per-client data files, the app it
    # submitted and Flower's daemons' state and logs.
    files = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    return {f for f in files if f.split("/")[0] not in {"flower", "app"} and not f.startswith("data/client-")}


def test_same_job_on_both_engines_reaches_comparable_accuracy_with_the_same_layout(tmp_path: Path) -> None:
    # Execute: 4 clients, 3 rounds, the same seed and split, once per engine.
    results = {
        engine: run(FlConfig(clients=4, rounds=3, engine=engine, **SMALL), out=tmp_path / engine)  # type: ignore[arg-type]
        for engine in ("deployment", "simulation")
    }

    # Assert
    deployed, simulated = results["deployment"], results["simulation"]
    assert [m["round"] for m in simulated.metrics] == [1, 2, 3] == [m["round"] for m in deployed.metrics]
    assert all(m["num_clients"] == 4 for m in simulated.metrics + deployed.metrics)
    assert simulated.accuracy > 0.6 and deployed.accuracy > 0.6
    assert abs(simulated.accuracy - deployed.accuracy) < 0.1
    assert _layout(simulated.run_dir) == _layout(deployed.run_dir)
    assert [sorted(m) for m in simulated.metrics] == [sorted(m) for m in deployed.metrics]  # the same records
    assert (simulated.run_dir / "checkpoints" / "round-0003.pt").is_file()


def test_hundreds_of_virtual_clients_a_few_sampled_per_round(tmp_path: Path) -> None:
    cfg = FlConfig(clients=240, fraction_train=0.05, rounds=2, engine="simulation", **SMALL)  # type: ignore[arg-type]

    result = run(cfg, out=tmp_path / "run")

    assert [m["sampled"] for m in result.metrics] == [12, 12]
    assert all(m["num_clients"] == 12 for m in result.metrics)
    # (the session's leftover-process check covers Ray's raylet, gcs_server and ray:: workers)


_HEAD_MARK = "FEDGE_TEST_RAY_HEAD"


@dataclass(frozen=True, slots=True)
class RayHead:
    address: str
    proc: subprocess.Popen[bytes]
    mark: str

    def processes(self) -> list[str]:
        """Command lines of the cluster's processes (the head's and its workers': they inherit its mark)."""
        return [cmdline(p) for p in processes_with_env(_HEAD_MARK, self.mark)]


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1 started as a user would (``ray start --head``), and every process of it ended
    afterwards, by its own environment mark: ``ray stop`` would also stop other Ray clusters on this machine."""
    port, mark = free_port(), f"{os.getpid()}-{os.urandom(4).hex()}"
    temp_dir = tempfile.mkdtemp(prefix="fgray-")  # Ray's Unix socket paths must stay short
    argv = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
        "--num-cpus", "2", "--include-dashboard=false", "--disable-usage-stats",
        "--temp-dir", temp_dir, "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env={**os.environ, _HEAD_MARK: mark}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    head = RayHead(f"127.0.0.1:{port}", proc, mark)
    try:
        wait_for_port("127.0.0.1", port, timeout_s=180, alive=proc)
        deadline = time.monotonic() + 180  # the GCS listens first; the head is up once `ray start` says so
        while b"Ray runtime started" not in (Path(temp_dir) / "ray-start.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (Path(temp_dir) / "ray-start.log").read_text()
            time.sleep(0.5)
        yield head
    finally:
        terminate_tree([proc.pid, *processes_with_env(_HEAD_MARK, mark)], grace_s=5.0)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not processes_with_env(_HEAD_MARK, mark)


def test_ray_address_runs_the_clients_on_the_users_cluster_a_dropout_recorded(tmp_path: Path, ray_head: RayHead) -> None:
    # Prepare: a Ray cluster the user runs; client 1 is never available, client 0 trains one local epoch
    # instead of the run's two. Note which of the cluster's processes run the virtual clients meanwhile.
    actors: set[str] = set()

    def on_round(m: dict) -> None:
        actors.update(c for c in ray_head.processes() if "ClientAppActor" in c)

    profiles = {"0": {"local_epochs": 1}, "1": {"dropout": 1.0}}
    cfg = FlConfig(clients=4, rounds=2, engine="simulation", ray_address=ray_head.address, client_profiles=profiles, **SMALL)  # type: ignore[arg-type]

    # Execute
    result = run(cfg, out=tmp_path / "run", on_round=on_round)

    # Assert: the clients ran in actors of the user's cluster, which is still up afterwards.
    assert actors, ray_head.processes()
    assert ray_head.proc.poll() is None
    # All four sampled each round; the dropout is recorded as such (not as a rejected update), always the same
    # node; the others were aggregated.
    first, second = result.metrics
    assert [len(m["sampled_nodes"]) for m in result.metrics] == [4, 4]
    assert first["dropped"] == second["dropped"] == 1 and first["rejected"] == second["rejected"] == 0
    assert first["dropped_nodes"] == second["dropped_nodes"]
    assert first["num_clients"] == second["num_clients"] == 3
    assert set(first["answered_nodes"]).isdisjoint(first["dropped_nodes"])
    assert set(first["reply_s"]) == {str(n) for n in first["sampled_nodes"]}
