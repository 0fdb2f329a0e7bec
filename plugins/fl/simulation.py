"""The same federated run on Flower's Simulation Engine (``flwr.simulation.run_simulation``, Ray backend).

fedge's ServerApp and ClientApp run unchanged: the engine is a choice, not a second implementation. The
clients are virtual SuperNodes in Ray actors; each takes its partition (``partition-id`` of
``num-partitions``, which the Simulation Engine gives every node) from one copy of the dataset per actor
process, split lazily (:func:`.local.load_local_data`), so a thousand clients cost a thousand index
arrays, never a thousand models or datasets. Ray reserves ``client_cpus`` / ``client_gpus`` per client;
``ray_address`` joins a Ray cluster the user runs instead of starting one. fedge starts Ray itself (Flower's
backend then uses it as it is), so that neither this process nor the Ray actors import TensorFlow through
Flower's optional import (:mod:`.flower_internals`): under load that import alone took most of a minute per
process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError
from fedge.plugins.fl.runner import _Federated, write_data
from fedge.plugins.fl.server_app import app_for
from fedge.supervisor import alive, cmdline, descendants, terminate_tree

__all__ = ["SimulationFederation", "check_simulation"]

logger = logging.getLogger(__name__)

_POLL_S = 0.25
_GCS_PROBE_S = 5.0


def check_simulation(ray_address: str, *, client_cpus: float = 1.0, client_gpus: float = 0.0) -> None:
    """Refuse, in one line, a simulation that cannot start: Ray missing, a Ray address that does not answer,
    or (on the local Ray) a client that asks for more CPUs or GPUs than this machine has."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("the simulation engine needs Ray; install it with: pip install 'fedge[simulation]'") from None
    from fedge.plugins.fl.flower_internals import check_tensorflow_import

    check_tensorflow_import()
    if ray_address:
        _check_ray_head(ray_address)
        return
    cores = os.cpu_count() or 1
    if client_cpus > cores:
        raise ConfigError(
            f"client_cpus = {client_cpus:g} is more than the {cores} CPUs of this machine, so Ray could never place a "
            f"client; give client_cpus <= {cores}"
        )
    if client_gpus > 0 and _local_gpus() == 0:
        raise ConfigError(
            f"client_gpus = {client_gpus:g} needs a GPU, and torch sees none here; leave client_gpus at 0, "
            "or use a ray_address of a cluster with GPUs"
        )


@functools.cache
def _check_ray_head(ray_address: str) -> None:
    # Cached: a head that answered is not probed again by the same process (only success is cached).
    host, _, port = ray_address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"bad ray_address {ray_address!r}; use HOST:PORT of the Ray head (its GCS port, e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=3.0):
            pass
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at {ray_address} ({err.strerror or err}); start one with `ray start --head` "
            "or leave ray_address empty to use a local Ray"
        ) from None
    if not _answers_grpc(host, int(port), timeout_s=_GCS_PROBE_S):
        # Ray would wait for a GCS there for minutes, logging retries.
        raise ConfigError(
            f"no Ray cluster answers at {ray_address}: something listens there but gave no gRPC answer within "
            f"{_GCS_PROBE_S:.0f} s; give the Ray head's GCS address (what `ray start --head` printed, port 6379 by default)"
        )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _answers_grpc(host: str, port: int, *, timeout_s: float) -> bool:
    """Whether a gRPC server (as Ray's GCS is) completes a connection at ``host:port`` within ``timeout_s``."""
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def _local_ray_processes() -> list[int]:
    # Ray's processes run from its package (.../ray/...) or are named ray::<actor>; not any "ray" substring.
    return [p for p in descendants(os.getpid()) if "/ray/" in (c := cmdline(p)) or c.startswith("ray::")]


class SimulationFederation(_Federated):
    """``cfg.clients`` virtual SuperNodes in Flower's Simulation Engine, in this process and its Ray workers."""

    where = "virtual"

    def prepare(self) -> list[Path]:
        if self.split is not None:
            write_data(self.run, self.cfg, *self.split, client_files=False)  # clients split lazily
        return []

    def backend_config(self) -> dict[str, Any]:
        # Only the client resources: Flower reads "init_args" only when it starts Ray, and fedge starts Ray.
        return {"client_resources": {"num_cpus": self.cfg.client_cpus, "num_gpus": self.cfg.client_gpus}}

    def ray_init_args(self) -> dict[str, Any]:
        # Flower's run_simulation defaults (logging_level, log_to_driver).
        init: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        if self.cfg.ray_address:
            init["address"] = self.cfg.ray_address
        else:
            init["num_cpus"] = os.cpu_count() or 1
            init["num_gpus"] = _local_gpus() if self.cfg.client_gpus > 0 else 0
        return init

    def init_ray(self) -> None:
        """Start (or join, with ``ray_address``) Ray with fedge's worker setup: no TensorFlow in the actors."""
        import ray

        from fedge.plugins.fl.flower_internals import block_tensorflow

        # Ray workers get the driver's import path, as Flower's own RayBackend.init_ray gives them.
        paths = [*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])]
        runtime_env = {
            "env_vars": {"PYTHONPATH": os.pathsep.join(paths)},
            "worker_process_setup_hook": f"{block_tensorflow.__module__}.{block_tensorflow.__name__}",
        }
        try:
            ray.init(runtime_env=runtime_env, **self.ray_init_args())
        except (ConnectionError, TimeoutError, ray.exceptions.RaySystemError) as err:
            if not self.cfg.ray_address:
                raise
            first = str(err).strip().splitlines()[:1] or [type(err).__name__]
            raise ConfigError(
                f"no Ray cluster answers at {self.cfg.ray_address} ({first[0]}); start one with `ray start --head` "
                "or leave ray_address empty to use a local Ray"
            ) from None

    def execute(self) -> dict[str, Any]:
        from fedge.plugins.fl.flower_internals import without_tensorflow

        with without_tensorflow():  # Flower's optional import of it; fedge's clients are torch
            import ray
            from flwr.simulation import run_simulation

        from fedge.plugins.fl.client_app import app as client_app

        self.prepare()
        where = self.cfg.ray_address or "a local Ray"
        self.status(f"run directory {self.run.path}; {self.cfg.clients} virtual clients on {where} (Flower Simulation Engine)")
        stop, self._ray_pids = threading.Event(), set[int]()
        follower = threading.Thread(target=self._follow_rounds, args=(stop,), daemon=True)
        follower.start()
        try:
            self.init_ray()
            run_simulation(
                server_app=app_for(self.run.path), client_app=client_app, num_supernodes=self.cfg.clients,
                backend_config=self.backend_config(),  # type: ignore[arg-type]
            )  # fmt: skip
        finally:
            stop.set()
            follower.join(timeout=5)
            if ray.is_initialized():
                ray.shutdown()
            # An actor whose ClientApp raised can outlive ray.shutdown() (orphaned, still running): end what
            # the local Ray of this run started (seen while it ran). A cluster the user runs is left alone.
            if not self.cfg.ray_address:
                terminate_tree([p for p in self._ray_pids if alive(p)], grace_s=3.0)
        self._report_new_rounds()
        result = self._result(None)  # type: ignore[arg-type]
        if result is None:
            raise ConfigError(f"the simulation ended without a result; see the log above and {self.run.path}")
        return result

    def _follow_rounds(self, stop: threading.Event) -> None:
        while not stop.wait(_POLL_S):
            with contextlib.suppress(Exception):  # a torn line or a display hiccup must not end the run
                self._report_new_rounds()
                self._ray_pids.update(_local_ray_processes())
