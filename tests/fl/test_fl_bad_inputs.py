"""A newcomer's mistakes with ``fedge fl run|superlink|supernode|certs``: each is one line on stderr (what was
expected, what was found, what to do), the right exit code, no traceback, and nothing written."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.cli.app import main


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Inputs the table refers to by name: ``{name}`` in an argv is replaced by the path."""
    made = {
        "wrong_npz": tmp_path / "wrong.npz",
        "not_npz": tmp_path / "not.npz",
        "mismatched_npz": tmp_path / "mismatched.npz",
        "garbage_pub": tmp_path / "garbage.pub",
        "nan_toml": tmp_path / "nan.toml",
        "a_file": tmp_path / "a-file",
        "a_dir": tmp_path / "a-dir",
        "certs": tmp_path / "certs",
    }
    np.savez(made["wrong_npz"], features=np.zeros((4, 2)), labels=np.zeros(4, int))
    np.savez(made["mismatched_npz"], x_train=np.zeros((4, 2)), y_train=np.zeros(3, int))
    made["not_npz"].write_text("not numpy")
    made["garbage_pub"].write_text("ssh-ed25519 AAAAnotbase64!!")
    made["nan_toml"].write_text("lr = nan\n")
    made["a_file"].write_text("x")
    made["a_dir"].mkdir()
    assert main(["fl", "certs", "--out", str(made["certs"])]) == 0
    return made


# (command x bad input) -> exit code + what the one line says
CASES = [
    # fl run: the listed defects
    ("run-round-timeout-nan", ["fl", "run", "--round-timeout", "nan"], 1, "must be a finite number"),
    ("run-dirichlet-nan", ["fl", "run", "--partition", "dirichlet:nan"], 1, "ALPHA must be a finite number"),
    ("run-toml-lr-nan", ["fl", "run", "{nan_toml}"], 1, "fl.lr must be a finite number"),
    ("run-bulyan-too-few", ["fl", "run", "-a", "bulyan", "-O", "num_malicious_nodes=1", "-n", "5"], 1, "needs at least 7 clients per round, but a round samples 5"),
    ("run-config-is-dir", ["fl", "run", "{a_dir}"], 1, "is a directory, not a TOML file; to continue a run there: fedge fl run --resume"),
    ("run-out-is-file", ["fl", "run", "--out", "{a_file}"], 1, "is a file, not a directory"),
    # fl run: more
    ("run-krum-too-few", ["fl", "run", "-a", "krum", "-n", "3"], 1, "needs at least 5 clients per round"),
    ("run-multikrum-select-more", ["fl", "run", "-a", "multikrum", "-O", "num_nodes_to_select=6", "-n", "5"], 1, "needs at least 6 clients"),
    ("run-round-timeout-inf", ["fl", "run", "--round-timeout", "inf"], 1, "must be a finite number"),
    ("run-round-timeout-negative", ["fl", "run", "--round-timeout", "-5"], 1, "round_timeout_s and startup_timeout_s must be > 0"),
    ("run-zero-clients", ["fl", "run", "-n", "0"], 1, "clients must be >= 1"),
    ("run-zero-rounds", ["fl", "run", "-r", "0"], 1, "rounds must be >= 1"),
    ("run-fraction-zero", ["fl", "run", "--fraction-train", "0"], 1, "fraction_train must be in (0, 1]"),
    ("run-fraction-above-one", ["fl", "run", "--fraction-train", "1.5"], 1, "fraction_train must be in (0, 1]"),
    ("run-negative-lr", ["fl", "run", "--lr", "-0.1"], 1, "lr > 0"),
    ("run-zero-batch", ["fl", "run", "--batch-size", "0"], 1, "batch_size must be >= 1"),
    ("run-min-clients-above", ["fl", "run", "-n", "2", "--min-clients", "3"], 1, "min_clients must be between 0 and clients (2)"),
    ("run-dirichlet-zero", ["fl", "run", "--partition", "dirichlet:0"], 1, "alpha must be > 0"),
    ("run-partition-unknown", ["fl", "run", "--partition", "random"], 1, "use iid, dirichlet:ALPHA"),
    ("run-option-no-equals", ["fl", "run", "-O", "beta"], 1, "bad --aggregator-option 'beta'; use KEY=VALUE"),
    ("run-option-unknown", ["fl", "run", "-O", "beta=0.2"], 1, "unknown setting aggregator.fedavg.beta"),
    ("run-option-out-of-range", ["fl", "run", "-a", "fedtrimmedavg", "-O", "beta=0.7"], 1, "aggregator.fedtrimmedavg"),
    ("run-fault-unknown-client", ["fl", "run", "-n", "2", "--fault", "7=nan"], 1, "faults must map a partition id < 2"),
    ("run-resume-with-flags", ["fl", "run", "--resume", "{a_dir}", "-n", "3"], 1, "drop --clients"),
    ("run-resume-empty-dir", ["fl", "run", "--resume", "{a_dir}"], 1, "cannot resume"),
    ("run-fraction-samples-nobody", ["fl", "run", "-n", "10", "--fraction-train", "0.05"], 1, "samples nobody; raise it to at least 0.1"),
    ("run-engine-unknown", ["fl", "run", "--engine", "ray"], 1, "fl.engine must be one of deployment, simulation"),
    ("run-ray-address-without-simulation", ["fl", "run", "--ray-address", "127.0.0.1:6379"], 1, "ray_address is for engine = simulation"),
    ("run-ray-address-not-answering", ["fl", "run", "--engine", "simulation", "--ray-address", "127.0.0.1:{free_port}"], 1, "no Ray cluster answers at 127.0.0.1:"),
    ("run-ray-address-not-ray", ["fl", "run", "--engine", "simulation", "--ray-address", "127.0.0.1:{busy_port}"], 1, "something listens there but gave no gRPC answer within 5 s"),
    ("run-supernode-poll-zero", ["fl", "run", "--supernode-poll-s", "0"], 1, "supernode_poll_s must be a number of seconds in (0, 60]; got 0.0"),
    ("run-heterogeneity-nan", ["fl", "run", "--heterogeneity", "lognormal:nan"], 1, "heterogeneity must be lognormal:SIGMA with a finite SIGMA"),
    ("run-client-cpus-zero", ["fl", "run", "--engine", "simulation", "--client-cpus", "0"], 1, "client_cpus must be > 0"),
    ("run-client-cpus-over-cores", ["fl", "run", "--engine", "simulation", "--client-cpus", "4096"], 1, "client_cpus = 4096 is more than the "),
    ("run-client-gpus-without-gpu", ["fl", "run", "--engine", "simulation", "--client-gpus", "0.5"], 1, "client_gpus = 0.5 needs a GPU, and torch sees none here"),
    ("run-unknown-model", ["fl", "run", "--model", "resnet9000"], 1, "unknown model 'resnet9000'"),
    # fl superlink
    ("superlink-port-zero", ["fl", "superlink", "--host", "127.0.0.1", "--fleet-port", "0"], 1, "--fleet-port must be a TCP port in 1..65535; got 0"),
    ("superlink-port-too-big", ["fl", "superlink", "--host", "127.0.0.1", "--control-port", "70000"], 1, "--control-port must be a TCP port in 1..65535"),
    ("superlink-same-ports", ["fl", "superlink", "--host", "127.0.0.1", "--fleet-port", "9500", "--control-port", "9500"], 1, "must differ"),
    ("superlink-port-in-use", ["fl", "superlink", "--host", "127.0.0.1", "--fleet-port", "{busy_port}"], 1, "is already in use; stop what holds it or choose another --fleet-port"),
    ("superlink-garbage-auth-key", ["fl", "superlink", "--certs", "{certs}", "--auth-key", "{garbage_pub}"], 1, "is not an OpenSSH public key"),
    ("superlink-missing-auth-key", ["fl", "superlink", "--certs", "{certs}", "--auth-key", "nope.pub"], 1, "public key 'nope.pub' not found"),
    ("superlink-auth-without-tls", ["fl", "superlink", "--host", "127.0.0.1", "--auth-key", "{garbage_pub}"], 1, "--auth-key needs TLS"),
    ("superlink-missing-certs", ["fl", "superlink", "--certs", "{a_dir}"], 1, "missing TLS files"),
    ("superlink-plaintext-public", ["fl", "superlink", "--host", "0.0.0.0"], 1, "refusing to serve plaintext on 0.0.0.0"),
    ("superlink-timeout-nan", ["fl", "superlink", "--host", "127.0.0.1", "--round-timeout", "nan"], 1, "must be a finite number"),
    ("superlink-bulyan-too-few", ["fl", "superlink", "--host", "127.0.0.1", "-n", "3", "-a", "bulyan", "-O", "num_malicious_nodes=1"], 1, "needs at least 7 clients"),
    # fl supernode
    ("supernode-port-zero", ["fl", "supernode", "--superlink", "127.0.0.1:0", "--partition", "0/2"], 1, "--superlink port must be a TCP port in 1..65535; got 0"),
    ("supernode-port-too-big", ["fl", "supernode", "--superlink", "127.0.0.1:99999", "--partition", "0/2"], 1, "must be a TCP port in 1..65535"),
    ("supernode-no-port", ["fl", "supernode", "--superlink", "127.0.0.1", "--partition", "0/2"], 1, "bad --superlink"),
    ("supernode-wrong-arrays", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--data", "{wrong_npz}"], 1, "lacks x_train, y_train (it holds features, labels)"),
    ("supernode-not-npz", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--data", "{not_npz}"], 1, "is not a readable .npz file"),
    ("supernode-mismatched-rows", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--data", "{mismatched_npz}"], 1, "x_train has 4 rows and y_train shape (3,)"),
    ("supernode-share-out-of-range", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "3/2"], 1, "I must be in 0..N-1"),
    ("supernode-unknown-dataset", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--dataset", "digitz", "--workdir", "{a_dir}/node"], 1, "unknown dataset 'digitz'"),
    ("supernode-share-not-numbers", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "a/b"], 1, "use I/N"),
    ("supernode-both-data-sources", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--data", "{wrong_npz}"], 1, "exactly one of --data"),
    ("supernode-connect-timeout-zero", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--connect-timeout", "0"], 1, "--connect-timeout must be a finite number"),
    ("supernode-connect-timeout-nan", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--connect-timeout", "nan"], 1, "--connect-timeout must be a finite number"),
    ("supernode-split-nan", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--split", "dirichlet:nan"], 1, "ALPHA must be a finite number"),
    ("supernode-key-without-tls", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--auth-key", "{garbage_pub}"], 1, "--auth-key needs TLS"),
    ("supernode-workdir-holds-certs", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--workdir", "{certs}"], 1, "--workdir '{certs}' already holds a certs run; the node's files would mix into it"),
    ("supernode-workdir-is-file", ["fl", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0/2", "--workdir", "{a_file}"], 1, "--workdir '{a_file}' is a file, not a directory"),
    # fl certs
    ("certs-again", ["fl", "certs", "--out", "{certs}"], 1, "already holds certificates; nodes deployed with them would stop working"),
    ("certs-negative-nodes", ["fl", "certs", "--out", "{a_dir}", "--nodes", "-1"], 1, "--nodes must be between 0 and 10000"),
    ("certs-zero-days", ["fl", "certs", "--out", "{a_dir}", "--days", "0"], 1, "--days must be between 1 and 36500"),
    ("certs-too-many-days", ["fl", "certs", "--out", "{a_dir}", "--days", "100000"], 1, "--days must be between 1 and 36500"),
    ("certs-out-is-file", ["fl", "certs", "--out", "{a_file}"], 1, "is a file, not a directory"),
    ("certs-empty-host", ["fl", "certs", "--out", "{a_dir}", "--host", " "], 1, "bad --host"),
]  # fmt: skip


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("argv", "code", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(
    argv: list[str], code: int, expected: str, files: dict[str, Path], busy_port: int, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    if "needs a GPU" in expected:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    # Prepare: a working directory to see that nothing (no runs/) appears; the inputs as files.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    from fedge.supervisor import free_port

    names = {k: str(v) for k, v in files.items()} | {"busy_port": str(busy_port), "free_port": str(free_port())}
    before = _tree(tmp_path)
    capsys.readouterr()

    # Execute
    got = main([a.format(**names) for a in argv])

    # Assert
    err = capsys.readouterr().err.strip()
    assert got == code, err
    expected = expected.format(**names)
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert _tree(tmp_path) == before
    assert list(cwd.iterdir()) == []


def test_second_run_into_the_same_out_is_refused_and_the_first_stays_byte_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedge.rundir import RunDir

    # Prepare: a finished run's directory (marker, config, metrics, a checkpoint, client data).
    out = tmp_path / "old"
    with RunDir.create("fl", out) as run:
        run.write_config({"clients": 5, "rounds": 5})
        run.append_metrics({"round": 1, "accuracy": 0.9})
        run.write_bytes("checkpoints/round-0001.pt", b"weights")
        run.write_bytes("data/client-0.npz", b"data")
    before = _tree(out)

    # Execute: a new run and new certificates into it, without --overwrite.
    codes = [main(["fl", "run", "--out", str(out), "--clients", "3"]), main(["fl", "superlink", "--host", "127.0.0.1", "--out", str(out)])]

    # Assert
    err = capsys.readouterr().err
    assert codes == [1, 1]
    assert err.count("already holds an fl run; choose a new directory, --resume") == 2, err
    assert _tree(out) == before


def test_waiting_for_supernodes_is_said(tmp_path: Path) -> None:
    from fedge.plugins.fl.config import FlConfig
    from fedge.plugins.fl.runner import _Federated, _Watch
    from fedge.plugins.fl.server_app import STATUS_FILE
    from fedge.rundir import RunDir

    # Prepare: the ServerApp's status while 1 of 3 SuperNodes is connected.
    run = RunDir(tmp_path)
    run.write_json(STATUS_FILE, {"required": 3, "connected": 1, "waiting": True})
    lines: list[str] = []
    follower = _Federated(run, FlConfig(clients=3), on_status=lines.append)
    watch = _Watch(follower.cfg, 1)

    # Execute: two polls with the same status, then a change.
    follower._report_waiting(watch)
    follower._report_waiting(watch)
    run.write_json(STATUS_FILE, {"required": 3, "connected": 2, "waiting": True})
    follower._report_waiting(watch)

    # Assert: each change said once.
    assert lines == ["waiting for 2 of 3 SuperNodes", "waiting for 1 of 3 SuperNodes"]


@pytest.mark.multiproc
def test_supernode_that_cannot_reach_its_superlink_says_so_and_gives_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedge.supervisor import free_port

    port = free_port()  # nothing listens there

    code = main(["fl", "supernode", "--superlink", f"127.0.0.1:{port}", "--partition", "0/2", "--connect-timeout", "6",
                 "--workdir", str(tmp_path / "node")])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 3, err
    assert f"cannot reach the SuperLink at 127.0.0.1:{port} yet; retrying for up to 6 s" in err
    assert f"could not join the SuperLink at 127.0.0.1:{port} within 6 s (--connect-timeout)" in err
    assert "Traceback" not in err

    # The same workdir with another split of the same share would replace the node's data file: refused.
    data = tmp_path / "node" / "digits-0-of-2.npz"
    kept = data.read_bytes()
    code = main(["fl", "supernode", "--superlink", f"127.0.0.1:{port}", "--partition", "0/2", "--split", "iid",
                 "--workdir", str(tmp_path / "node")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err == (
        f"fedge: error: --workdir {str(tmp_path / 'node')!r} holds the node of another data share (split is "
        "'dirichlet:0.5' there but 'iid' here); its data file would be replaced: give the same "
        "--dataset/--partition/--split/--seed, or another --workdir"
    )
    assert data.read_bytes() == kept


@pytest.mark.multiproc
def test_superlink_that_cannot_start_says_the_cause_from_its_log(
    busy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.errors import RuntimeFailure
    from fedge.plugins.fl import federation

    # Prepare: skip fedge's own port check, so the real flower-superlink meets the busy port (a port taken
    # between the check and the start looks the same).
    monkeypatch.setattr(federation, "check_port_free", lambda *args: None)

    # Execute / Assert: the message is the cause Flower logged, not "nothing listened".
    with federation.Federation(tmp_path / "flower") as fed, pytest.raises(RuntimeFailure) as caught:
        fed.start_superlink(fleet_port=busy_port, timeout_s=60)
    assert f"the SuperLink did not start: Port in server address 127.0.0.1:{busy_port} is already in use" in str(caught.value)


def test_client_data_on_a_full_disk_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from fedge.plugins.fl.config import FlConfig
    from fedge.plugins.fl.runner import load_and_split, write_data
    from fedge.rundir import RunDir

    cfg = FlConfig(clients=3, partition="iid")
    split = load_and_split(cfg, num_clients=3)
    real_savez, calls = np.savez, []

    def savez_until_full(file: object, **arrays: object) -> None:
        calls.append(1)
        if len(calls) == 2:  # the second client's file: half written, then the disk is full
            file.write(b"PK\x03\x04 half")  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", savez_until_full)

    with pytest.raises(OSError, match="No space left"):
        write_data(RunDir(tmp_path), cfg, *split)

    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["client-0.npz"]


@pytest.mark.multiproc
def test_ctrl_c_on_a_supernode_is_one_line_and_stops_its_processes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from fedge.supervisor import free_port, processes_with_env, terminate_tree

    port, workdir = free_port(), tmp_path / "node"  # nothing listens there: the node keeps retrying
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())", "fl", "supernode",
         "--superlink", f"127.0.0.1:{port}", "--partition", "0/2", "--workdir", str(workdir)],
        env=dict(os.environ, PYTHONSAFEPATH="1"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if "cannot reach the SuperLink" in line:
                break
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:  # the test failed: leave nothing running behind it
            terminate_tree([proc.pid], grace_s=2.0)

    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"fedge: error: stopped the SuperNode for 127.0.0.1:{port}; kept {workdir}; the same command starts it again"]
    assert not processes_with_env("FEDGE_FEDERATION", str((workdir / "flower").resolve()))
