"""End-to-end federations with real processes: a SuperLink and SuperNodes talking gRPC on 127.0.0.1.

Few clients, few rounds and a tiny CNN: these tests are about the machinery (transport, TLS, node auth,
robustness, resume, teardown), not accuracy. Every test checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.cli.app import main
from fedge.errors import RuntimeFailure
from fedge.plugins.fl import FlConfig, run
from fedge.plugins.fl.federation import _logged_node_id
from fedge.supervisor import alive as _alive
from fedge.supervisor import cmdline as _cmdline

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TINY = {"model_options": {"channels": [4], "hidden": 16}, "local_epochs": 1, "batch_size": 32}


def _our_processes(root: Path) -> list[str]:
    """Live processes started for a run under ``root``: they all inherit a FLWR_HOME inside it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not _alive(int(entry)):
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        home = next((e[len(b"FLWR_HOME="):].decode() for e in environ if e.startswith(b"FLWR_HOME=")), "")
        if home.startswith(str(root)):
            found.append(f"{entry} {_cmdline(int(entry))}")
    return found


def _pids(run_dir: Path, name: str) -> int:
    recorded = json.loads((run_dir / "flower" / "pids.json").read_text())
    return next(int(p["pid"]) for p in recorded if p["name"] == name)


def test_insecure_cli_run_rejects_nan_client_records_slow_and_dropped_ones_and_writes_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 4 clients; client 1 sends NaN updates, client 0 runs on a device 30x slower, client 2 is never
    # available, client 3 is plain (heterogeneous profiles from the TOML).
    config = tmp_path / "fl.toml"
    config.write_text(
        "clients = 4\nrounds = 2\nlocal_epochs = 1\npartition = \"shards:4\"\n"
        "model_options = { channels = [4], hidden = 16 }\n"
        "[client_profiles.0]\nslowdown = 30\n[client_profiles.2]\ndropout = 1.0\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"

    # Execute
    code = main(["fl", "run", str(config), "--fault", "1=nan", "--out", str(out), "--json"])

    # Assert
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    slow, nan, dropped, plain = (_logged_node_id(out / "flower" / "logs" / f"supernode-{i}.log") for i in range(4))
    for m in metrics:
        assert {"round", "loss", "accuracy", "num_clients", "round_s"} <= set(m)
        assert m["sampled_nodes"] == sorted([slow, nan, dropped, plain])
        # The NaN update was rejected, the dropout recorded as such, and the round aggregated the others.
        assert m["rejected"] == 1 and m["dropped"] == 1 and m["dropped_nodes"] == [dropped]
        assert plain in m["answered_nodes"] and nan not in m["answered_nodes"]
        # The slow client reported 30x its compute and its reply came only after that long (reply times from the
        # round's send; process start-up jitter between nodes is larger than a small model's compute, so the
        # two replies' order is not asserted), or it was not in time.
        assert m["compute_s"][str(plain)] > 0 and str(nan) not in m["compute_s"]
        if slow in m["late_nodes"]:
            assert m["num_clients"] == 1 and str(slow) not in m["reply_s"]
        else:
            assert m["num_clients"] == 2 and m["late_nodes"] == []
            assert m["compute_s"][str(slow)] > 5 * m["compute_s"][str(plain)], m["compute_s"]
            assert m["reply_s"][str(slow)] >= m["compute_s"][str(slow)], (m["reply_s"], m["compute_s"])
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert all("non-finite" in r["reason"] for r in rejected)
    assert result["accuracy"] == pytest.approx(metrics[-1]["accuracy"], abs=1e-4) and result["rejected"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    stats = json.loads((out / "partitions.json").read_text())["clients"]
    assert len(stats) == 4 and all(sum(c["label_histogram"]) == c["size"] for c in stats)

    from fedge.plugins.models import load_model

    model = load_model(out)
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())
    assert json.loads((out / "model.json").read_text())["dataset"] == "digits"
    assert "Fleet API (gRPC-rere)" in (out / "flower" / "logs" / "superlink.log").read_text()
    assert not _our_processes(out)


def test_tls_and_node_auth_run(tmp_path: Path) -> None:
    out = tmp_path / "run"

    result = run(FlConfig(clients=2, rounds=1, auth=True, **TINY), out=out)  # type: ignore[arg-type]

    assert len(result.metrics) == 1 and result.metrics[0]["num_clients"] == 2
    log = (out / "flower" / "logs" / "superlink.log").read_text()
    assert "--insecure" not in log and "authentication is disabled" not in log
    assert (out / "certs" / "ca.crt").is_file()
    assert not _our_processes(out)


def test_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    from fedge.plugins.fl.certs import make_certs, make_node_keys
    from fedge.plugins.fl.federation import Federation, TlsFiles

    certs = make_certs(tmp_path / "certs")
    (reg_key, reg_pub), (rogue_key, _) = make_node_keys(tmp_path / "certs", num_nodes=2)
    tls = TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key)
    with Federation(tmp_path / "fed", tls=tls, auth=True) as fed:
        fed.start_superlink(timeout_s=120)
        fed.register_node(reg_pub)
        fed.start_supernode(0, node_config={"partition-id": 0}, auth_key=reg_key)
        rogue = fed.start_supernode(1, node_config={"partition-id": 1}, auth_key=rogue_key)

        deadline = time.monotonic() + 120
        link_log = fed.workdir / "logs" / "superlink.log"
        while time.monotonic() < deadline:
            activated = link_log.read_text().count("Activated node_id")
            if activated >= 1 and (rogue.proc.poll() is not None or "UNAUTHENTICATED" in rogue.log.read_text()):
                break
            time.sleep(0.5)
        activated = link_log.read_text().count("Activated node_id")
        rogue_log = rogue.log.read_text()

    assert activated == 1
    assert rogue.proc.poll() is not None or "UNAUTHENTICATED" in rogue_log, rogue_log[-2000:]
    assert not _our_processes(tmp_path)


def test_killed_supernode_does_not_hold_up_later_rounds(tmp_path: Path) -> None:
    # Prepare: kill SuperNode 2 (and its worker) as soon as round 1 is recorded. Flower alone would keep
    # listing it for up to 60 s (two missed 30 s heartbeats); each round would sample it and wait for it.
    out = tmp_path / "run"
    timeout_s = 60.0
    killed: list[int] = []

    def on_round(m: dict) -> None:
        if m["round"] == 1 and not killed:
            for name in ("supernode-2", "worker-2"):
                pid = _pids(out, name)
                os.killpg(os.getpgid(pid), signal.SIGKILL)
                killed.append(pid)

    # Execute
    result = run(FlConfig(clients=3, rounds=3, round_timeout_s=timeout_s, **TINY), out=out, on_round=on_round)  # type: ignore[arg-type]

    # Assert: the run completed with the two live clients, and no later round waited out its timeout.
    assert killed and not any(_alive(p) for p in killed)
    assert [m["round"] for m in result.metrics] == [1, 2, 3]
    assert [m["num_clients"] for m in result.metrics] == [3, 2, 2]
    for m in result.metrics[1:]:
        assert m["round_s"] < timeout_s / 2, m
        assert m["timed_out"] == 0
    assert result.metrics[2]["sampled"] == 2  # Flower no longer lists the dead node
    assert "ControlServicer.UnregisterNode" in (out / "flower" / "logs" / "superlink.log").read_text()
    assert not _our_processes(out)


def _fresh_adam_moments(state_file: Path) -> bool:
    """Whether FedAdam's saved moments are those of its first aggregation (m_t and v_t started at zero)."""
    from fedge.plugins.aggregators.fedadam import FedAdam

    beta_1, beta_2 = FedAdam.Config().beta_1, FedAdam.Config().beta_2
    with np.load(state_file) as saved:
        names = [k.partition("/")[2] for k in saved.files if k.startswith("m_t/")]
        assert names and sorted(saved.files) == sorted([f"m_t/{n}" for n in names] + [f"v_t/{n}" for n in names])
        m, v = (np.concatenate([saved[f"{kind}/{n}"].ravel() for n in names]) for kind in ("m_t", "v_t"))
    assert np.abs(m).sum() > 0
    return bool(np.allclose(v, (1 - beta_2) / (1 - beta_1) ** 2 * m**2, rtol=1e-3, atol=1e-12))


def test_resume_after_superlink_is_killed(tmp_path: Path) -> None:
    # Prepare: kill the server side (SuperLink, hence its ServerApp) after round 1. FedAdam: its server-side
    # moments must come back from the checkpoint.
    out = tmp_path / "run"
    cfg = FlConfig(clients=2, rounds=2, aggregator="fedadam", **TINY)  # type: ignore[arg-type]

    def kill_server(m: dict) -> None:
        if m["round"] == 1:
            os.killpg(os.getpgid(_pids(out, "superlink")), signal.SIGKILL)

    with pytest.raises(RuntimeFailure, match="SuperLink exited|ServerApp"):
        run(cfg, out=out, on_round=kill_server)
    done = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert done == [1]
    assert not _our_processes(out)
    # A fresh FedAdam's first moments satisfy v = (1 - beta_2) / (1 - beta_1)^2 * m^2 (both start at zero).
    assert _fresh_adam_moments(out / "checkpoints" / "round-0001.strategy.npz")

    # Execute
    result = run(resume=out)

    # Assert: the rounds before the kill are kept once, the rest were added; the resumed round continued
    # from round 1's moments instead of zeros.
    rounds = [m["round"] for m in result.metrics]
    assert rounds == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0001.pt", "round-0001.strategy.npz", "round-0002.pt", "round-0002.strategy.npz"
    ]  # fmt: skip
    assert not _fresh_adam_moments(out / "checkpoints" / "round-0002.strategy.npz")
    assert (out / "model.pt").is_file()
    assert not _our_processes(out)


def test_ctrl_c_mid_round_stops_every_process(tmp_path: Path) -> None:
    from fedge.errors import Interrupted
    from fedge.plugins.fl.federation import FEDERATION_MARK
    from fedge.supervisor import processes_with_env

    out = tmp_path / "run"

    def interrupt_when_clients_train(line: str) -> None:
        # Ctrl-C while the first round's ClientApp processes are running.
        if not line.startswith("submitted"):
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any("flwr-clientapp" in _cmdline(p) for p in processes_with_env(FEDERATION_MARK, str((out / "flower").resolve()))):
                break
            time.sleep(0.1)
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=f"interrupted after round 0 of 3; kept {out.resolve()}; resume with: fedge fl run --resume"):
        run(FlConfig(clients=2, rounds=3, **TINY), out=out, on_status=interrupt_when_clients_train)  # type: ignore[arg-type]

    assert not _our_processes(out)
    assert not (out / "flower" / "pids.json").exists()
