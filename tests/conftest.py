"""Shared fixtures: the shared trace folder, the example plugin installed privately, emulated hosts (network
namespaces), and a check that no test leaves Flower or torchrun running."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"
# A suite started in the background (`make test &` in a script) inherits SIGINT ignored, and so would every
# process the Ctrl-C tests start; a Python handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_LEFTOVER_PATTERN = "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|flwr-clientapp|torchrun|torch.distributed.run|raylet|gcs_server|ray::|ray/_private"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: they hold the folder name tests/gpu too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"shared traces not found at {SHARED_TRACES}")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/custom_plugin installed into a private directory (the shared venv stays untouched).

    Put it on PYTHONPATH of the commands a test runs: ``{**os.environ, "PYTHONPATH": str(example_plugin_site)}``.
    """
    base = tmp_path_factory.mktemp("example-plugin")
    target, source = base / "site", base / "src"
    shutil.copytree(ROOT / "examples" / "custom_plugin", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True,
    )
    return target


_SESSION_MARK = "FEDGE_TEST_SESSION"


def _leftover_processes(mark: str) -> list[str]:
    """Flower/torchrun processes started by this test session (they inherit its mark in their environment);
    other sessions running on the same machine are not ours to judge."""
    out = subprocess.run(["pgrep", "-af", _LEFTOVER_PATTERN], capture_output=True, text=True, check=False).stdout
    needle = f"{_SESSION_MARK}={mark}".encode()
    found = []
    for line in out.splitlines():
        pid = line.split(" ", 1)[0]
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone already, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(line)
    return found


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_processes():
    mark = f"{os.getpid()}-{os.urandom(4).hex()}"
    os.environ[_SESSION_MARK] = mark
    yield
    after = _leftover_processes(mark)
    assert not after, f"processes left running after the test session: {after}"


# ---- network namespaces: separate hosts on one machine (tests/fl/test_hosts.py, tests/train/test_hosts.py) ----
# Host 0 holds a bridge; every other host is joined to it by a veth pair. Each host has its own network
# stack, address (198.18.0.0/15, the benchmarking range: nothing leaves the namespaces), hostname (its own
# UTS namespace) and /etc/hosts naming every host (ip netns exec mounts /etc/netns/<ns>/hosts there), so
# torchrun's and gloo's hostname lookups find the real address, as on separate machines.


@dataclass(frozen=True, slots=True)
class NetnsHost:
    """One emulated host: a network namespace with one address on the shared link."""

    namespace: str
    hostname: str
    address: str
    link: str
    """Its interface on the shared link (the bridge on host 0, its veth end elsewhere)."""

    def argv(self, *cmd: str | Path) -> list[str]:
        """``cmd`` run on this host (its network namespace and hostname)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *map(str, cmd)]  # fmt: skip

    def set_link(self, up: bool) -> None:
        """Cut (``False``) or restore this host's link, as a pulled cable would."""
        _ip("-n", self.namespace, "link", "set", self.link, "up" if up else "down")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def _kill_namespace_processes(namespace: str) -> None:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def netns_hosts() -> Iterator[Callable[[int], list[NetnsHost]]]:
    """``netns_hosts(n)``: n hosts (2 or 3) on one link, host 0 at 198.18.0.1; all removed afterwards.

    Skips, saying why, where namespaces cannot be made (not root, no ``ip``, a kernel without them).
    """
    made: list[NetnsHost] = []
    tag = f"fg{os.getpid() % 10000}{os.urandom(2).hex()}"  # several test sessions may share the machine

    def make(n: int) -> list[NetnsHost]:
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
            pytest.skip("network namespaces need root with ip (iproute2) and unshare (util-linux)")
        hosts = [NetnsHost(f"{tag}h{i}", f"{tag}-host{i}", f"198.18.0.{i + 1}", "br0" if i == 0 else f"{tag}s{i}")
                 for i in range(n)]  # fmt: skip
        names = "".join(f"{h.address} {h.hostname}\n" for h in hosts)
        try:
            for h in hosts:
                _ip("netns", "add", h.namespace)
                made.append(h)
                Path(f"/etc/netns/{h.namespace}").mkdir(parents=True, exist_ok=True)
                Path(f"/etc/netns/{h.namespace}/hosts").write_text(f"127.0.0.1 localhost\n{names}", encoding="utf-8")
                _ip("-n", h.namespace, "link", "set", "lo", "up")
            hub = hosts[0].namespace
            _ip("-n", hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub, "addr", "add", f"{hosts[0].address}/24", "dev", "br0")
            _ip("-n", hub, "link", "set", "br0", "up")
            for h in hosts[1:]:
                port = f"{h.link[:-2]}p{h.link[-1]}"  # the hub's end of this host's cable
                _ip("link", "add", port, "type", "veth", "peer", "name", h.link)
                _ip("link", "set", port, "netns", hub)
                _ip("link", "set", h.link, "netns", h.namespace)
                _ip("-n", hub, "link", "set", port, "master", "br0")
                _ip("-n", hub, "link", "set", port, "up")
                _ip("-n", h.namespace, "addr", "add", f"{h.address}/24", "dev", h.link)
                _ip("-n", h.namespace, "link", "set", h.link, "up")
        except OSError as err:
            pytest.skip(f"cannot make network namespaces here: {err}")
        return hosts

    yield make
    for h in made:
        _kill_namespace_processes(h.namespace)
        subprocess.run(["ip", "netns", "del", h.namespace], capture_output=True, check=False)
        shutil.rmtree(f"/etc/netns/{h.namespace}", ignore_errors=True)
