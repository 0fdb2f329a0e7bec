"""A federation across hosts: network namespaces (own stacks and addresses from 198.18.0.0/15) joined on
one link, the SuperLink on host 0 and a SuperNode on each other host, started with the documented recipe
(README: ``fedge fl certs --host ADDR --nodes N``, ``fedge fl superlink``, ``fedge fl supernode``).

TLS with a certificate naming the real address and SuperNode authentication; a SuperNode whose link is
cut mid-run is dropped and the run finishes; a SuperLink or SuperNode on a non-loopback address refuses
plaintext unless told ``--insecure``. A tiny CNN, few rounds: the machinery, not accuracy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

FLEET_PORT = 9092  # each host has its own stack: the documented default ports are free in every namespace
_FEDGE = [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())"]
SETTINGS = 'local_epochs = 1\nbatch_size = 32\npartition = "iid"\n[model_options]\nchannels = [4]\nhidden = 16\n'

_PROBE = """
import socket, ssl, sys, time
host, port, ca, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
deadline = time.monotonic() + 90
while True:
    try:
        raw = socket.create_connection((host, port), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("nothing listens on %s:%d" % (host, port))
        time.sleep(0.5)
if ca == "-":
    sys.exit(0)
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["h2"])
try:
    with ctx.wrap_socket(raw, server_hostname=name):
        print("verified")
except ssl.SSLCertVerificationError as err:
    print("refused:", err.verify_message)
"""


@pytest.fixture
def fl_env() -> dict[str, str]:
    return dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")


class _Daemon:
    """A long-running ``fedge`` command on one host, its output in files so a full pipe never blocks it."""

    def __init__(self, host, args: list[str | Path], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(host.argv(*_FEDGE, *args), env=env, stdout=f, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM (fedge then stops the Flower processes it started), SIGKILL if that takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _probe(host, address: str, *, ca: Path | None = None, name: str = "", env: dict[str, str]) -> str:
    """From ``host``: wait for the SuperLink's Fleet API; with ``ca``, a TLS handshake checking ``name``."""
    proc = subprocess.run(host.argv(sys.executable, "-c", _PROBE, address, str(FLEET_PORT), str(ca or "-"), name),
                          env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _federation(
    tmp: Path, hosts, env: dict[str, str], *, rounds: int, round_timeout_s: float,
    on_round: Callable[[dict], None] | None = None, rogue: bool = False,
) -> tuple[subprocess.CompletedProcess[str] | None, _Daemon, list[_Daemon], Path]:
    """The README's recipe across ``hosts``: certificates for host 0's address, the SuperLink there with every
    node's public key, one authenticated SuperNode per other host; waits for the SuperLink to finish.

    ``rogue``: one more SuperNode on the last host, with a key pair the SuperLink was not given (last in the list).
    """
    certs, run_dir, link = tmp / "certs", tmp / "run", hosts[0].address
    nodes = len(hosts) - 1
    subprocess.run([*_FEDGE, "fl", "certs", "--out", str(certs), "--host", link, "--nodes", str(nodes + rogue)],
                   env=env, check=True, capture_output=True, timeout=60)  # fmt: skip
    (tmp / "fl.toml").write_text(f"round_timeout_s = {round_timeout_s}\n{SETTINGS}", encoding="utf-8")
    keys = [a for i in range(nodes) for a in ("--auth-key", certs / f"node-{i}.pub")]
    server = _Daemon(hosts[0], ["fl", "superlink", tmp / "fl.toml", "--clients", str(nodes), "--rounds", str(rounds),
                                "--host", link, "--certs", certs, *keys, "--out", run_dir, "--json"],
                     tmp / "superlink.out", env)  # fmt: skip
    clients: list[_Daemon] = []
    try:
        _probe(hosts[1], link, env=env)
        for i, host in enumerate(hosts[1:]):
            clients.append(_Daemon(host, ["fl", "supernode", "--superlink", f"{link}:{FLEET_PORT}", "--partition",
                                          f"{i}/{nodes}", "--split", "iid", "--root-certificates", certs / "ca.crt",
                                          "--auth-key", certs / f"node-{i}.key", "--workdir", tmp / f"node-{i}",
                                          "--device", "cpu"], tmp / f"supernode-{i}.out", env))  # fmt: skip
        if rogue:
            clients.append(_Daemon(hosts[-1], ["fl", "supernode", "--superlink", f"{link}:{FLEET_PORT}", "--partition",
                                               f"0/{nodes}", "--split", "iid", "--root-certificates", certs / "ca.crt",
                                               "--auth-key", certs / f"node-{nodes}.key", "--workdir", tmp / "rogue",
                                               "--device", "cpu"], tmp / "rogue.out", env))  # fmt: skip
        seen, deadline = 0, time.monotonic() + 420
        while server.proc.poll() is None and time.monotonic() < deadline:
            metrics = run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines() if metrics.is_file() else []
            for line in lines[seen:]:
                if on_round is not None:
                    on_round(json.loads(line))
            seen = len(lines)
            time.sleep(0.5)
        done = server.proc.poll() is not None
    finally:
        server.stop()
        for client in clients:
            client.stop()
    result = subprocess.CompletedProcess(server.proc.args, server.proc.returncode, server.output(), "") if done else None
    return result, server, clients, run_dir


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tls_and_node_auth_across_hosts(tmp_path: Path, netns_hosts, fl_env) -> None:
    # Prepare
    hosts = netns_hosts(3)
    # Execute
    result, server, clients, run_dir = _federation(tmp_path, hosts, fl_env, rounds=1, round_timeout_s=60, rogue=True)
    # Assert: the run finished with the two registered remote nodes; the unregistered one never took part
    assert result is not None and result.returncode == 0, server.output()[-3000:]
    assert [(r["round"], r["num_clients"]) for r in _rounds(run_dir)] == [(1, 2)]
    log = (run_dir / "flower" / "logs" / "superlink.log").read_text()
    assert "--insecure" not in log and "authentication is disabled" not in log
    for client in clients[:-1]:
        assert "refusing" not in client.output() and "Traceback" not in client.output()
    rogue_log = (tmp_path / "rogue" / "flower" / "logs" / "supernode-0.log").read_text(errors="replace")
    # Flower 1.39 refuses an unknown key at activation (exit code 305) or with UNAUTHENTICATED later
    assert "Failed to activate SuperNode" in rogue_log or "UNAUTHENTICATED" in rogue_log, rogue_log[-2000:]
    assert log.count("Activated node_id") == 2


def test_certificate_names_the_real_address(tmp_path: Path, netns_hosts, fl_env) -> None:
    # Prepare: the recipe's certificates, a SuperLink serving them on host 0's address
    hosts = netns_hosts(2)
    certs, link = tmp_path / "certs", hosts[0].address
    subprocess.run([*_FEDGE, "fl", "certs", "--out", str(certs), "--host", link], env=fl_env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    server = _Daemon(hosts[0], ["fl", "superlink", "--clients", "1", "--host", link, "--certs", certs, "--out",
                                tmp_path / "run"], tmp_path / "superlink.out", fl_env)  # fmt: skip
    try:
        # Execute: TLS handshakes from host 1, as a SuperNode makes them
        by_address = _probe(hosts[1], link, ca=certs / "ca.crt", name=link, env=fl_env)
        other = _probe(hosts[1], link, ca=certs / "ca.crt", name="198.18.0.99", env=fl_env)
    finally:
        server.stop()
    # Assert: the certificate is good for exactly the address it was made for
    assert by_address == "verified", server.output()[-2000:]
    assert other.startswith("refused:") and "IP address mismatch" in other


def test_supernode_whose_link_is_cut_is_dropped_and_the_run_finishes(tmp_path: Path, netns_hosts, fl_env) -> None:
    # Prepare: cut host 2's cable once round 1 is recorded
    hosts = netns_hosts(3)
    round_timeout_s = 15.0
    cut: list[int] = []

    def on_round(m: dict) -> None:
        if m["round"] == 1 and not cut:
            hosts[2].set_link(False)
            cut.append(1)

    # Execute
    result, server, _, run_dir = _federation(
        tmp_path, hosts, fl_env, rounds=3, round_timeout_s=round_timeout_s, on_round=on_round
    )
    # Assert: round 2 waited out its deadline for the lost node; round 3 no longer waited for it
    assert cut and result is not None and result.returncode == 0, server.output()[-3000:]
    rounds = _rounds(run_dir)
    assert [(r["round"], r["num_clients"]) for r in rounds] == [(1, 2), (2, 1), (3, 1)]
    assert rounds[1]["timed_out"] >= 1
    assert rounds[2]["round_s"] < round_timeout_s


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (["fl", "superlink", "--clients", "1", "--host", "{addr}"], "refusing to serve plaintext on {addr}; pass --certs DIR"),
        (["fl", "superlink", "--clients", "1"], "refusing to serve plaintext on 0.0.0.0; pass --certs DIR"),
        (["fl", "supernode", "--superlink", "{addr}:9092", "--partition", "0/1"], "refusing plaintext to {addr}; pass --root-certificates"),
    ],
)
def test_plaintext_on_a_real_address_is_refused_in_one_line(
    tmp_path: Path, netns_hosts, fl_env, command: list[str], line: str
) -> None:
    # Prepare
    hosts = netns_hosts(2)
    addr = hosts[0].address
    args = [a.format(addr=addr) for a in command]
    # Execute
    proc = subprocess.run(hosts[0].argv(*_FEDGE, *args, "--out" if args[1] == "superlink" else "--workdir", tmp_path / "x"),
                          env=fl_env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    # Assert
    assert proc.returncode == 1
    assert line.format(addr=addr) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_insecure_superlink_on_a_real_address_serves_other_hosts(tmp_path: Path, netns_hosts, fl_env) -> None:
    # Prepare / Execute: told --insecure, the SuperLink starts and host 1 reaches its Fleet API
    hosts = netns_hosts(2)
    server = _Daemon(hosts[0], ["fl", "superlink", "--clients", "1", "--host", hosts[0].address, "--insecure",
                                "--out", tmp_path / "run"], tmp_path / "superlink.out", fl_env)  # fmt: skip
    try:
        _probe(hosts[1], hosts[0].address, env=fl_env)
        alive = server.proc.poll() is None
    finally:
        server.stop()
    # Assert
    assert alive, server.output()[-2000:]
