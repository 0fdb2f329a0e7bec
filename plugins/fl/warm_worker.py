"""A SuperNode's warm training worker: keeps torch imported and the node's data loaded across rounds.

Flower starts a fresh ``flwr-clientapp`` process for every message; importing torch there costs seconds
per client per round. With ``worker="<socket>"`` in its node config, fedge's ClientApp hands the round's
training to this process over a Unix socket (``multiprocessing.connection`` with an auth key read from
``<socket>.key``) and falls back to training in-process when no worker answers.

Run (``fedge fl run`` and ``fedge fl supernode`` start one per SuperNode)::

    python -m fedge.plugins.fl.warm_worker /path/to/worker.sock
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

__all__ = ["call_worker", "make_key", "serve"]


def make_key(socket_path: Path) -> None:
    """Write a fresh auth key beside ``socket_path`` (owner-only)."""
    key_file = Path(f"{socket_path}.key")
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)


def call_worker(socket_path: str, request: dict[str, Any], *, timeout_s: float = 3600.0) -> Any:
    """Send one training request; returns the worker's result.

    Raises:
        OSError / EOFError: no worker listens there (the caller falls back).
        RuntimeError: the worker failed on this request.
    """
    key = Path(f"{socket_path}.key").read_bytes()
    with Client(socket_path, family="AF_UNIX", authkey=key) as conn:
        conn.send(request)
        if not conn.poll(timeout_s):
            raise RuntimeError(f"the training worker gave no answer within {timeout_s:.0f} s")
        status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(f"training worker failed: {payload}")
    return payload


def _warm_up() -> None:
    # torch initialises lazily: the first optimizer step of a process takes seconds (the first round's compute
    # looked 40x that of later rounds, and a slowed-down client profile multiplied it), so take it here.
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.zeros(2, 1, 4, 4)), torch.tensor([0, 1])).backward()
    opt.step()


def serve(socket_path: str) -> None:
    """Answer training requests one at a time until killed."""
    # Imported and initialised once here (before the socket exists), so that no request pays for them.
    import fedge.plugins.models
    import fedge.plugins.train.single_process  # noqa: F401
    from fedge.plugins.fl.local import train_round

    _warm_up()

    path = Path(socket_path)
    key = Path(f"{socket_path}.key").read_bytes()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with Listener(str(path), family="AF_UNIX", authkey=key) as listener:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):  # a client that failed the handshake
                continue
            with conn:
                try:
                    request = conn.recv()
                    conn.send(("ok", train_round(request["config"], request["node"], request["arrays"])))
                except (EOFError, OSError):
                    continue
                except Exception as err:  # noqa: BLE001 - any training failure goes back to the ClientApp
                    with contextlib.suppress(OSError):
                        conn.send(("error", f"{type(err).__name__}: {err}"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedge.plugins.fl.warm_worker SOCKET_PATH")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    serve(sys.argv[1])
