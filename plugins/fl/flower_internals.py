"""Every place fedge reaches into Flower 1.39's internals, each checked against the code it was written for.

Flower gives no setting for either of these, so they are patched here and nowhere else. Each patch first
checks that Flower's code is the code it was written for (:func:`check_supernode_poll`,
:func:`check_tensorflow_import`); if Flower changed, fedge stops with one line saying so, instead of going on
silently slow.

- **The SuperNode's idle poll.** ``flower-supernode`` sleeps a hard-coded 3 s whenever the SuperLink has no
  message for it (``flwr/supernode/start_client_internal.py``), so each round's message waits 1.5 s on
  average and up to 3 s before a node picks it up. fedge starts its SuperNodes as
  ``python -m fedge.plugins.fl.flower_internals flower-supernode --poll-s S ARGS...`` (:func:`supernode_argv`):
  Flower's own SuperNode, with that one sleep shortened to ``S``.
- **TensorFlow in the Simulation Engine.** ``flwr.simulation.ray_transport.utils`` imports TensorFlow when it
  is installed (only to offer GPU memory growth to TensorFlow clients), and both the driver and every Ray
  actor import that module, so each pays seconds and hundreds of MB for a framework fedge's torch clients
  never use. :func:`without_tensorflow` hides TensorFlow from that one import in the driver;
  :func:`block_tensorflow` is the Ray worker setup hook that does the same in every actor.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from fedge.errors import ConfigError

__all__ = [
    "DEFAULT_POLL_S",
    "SUPERNODE_IDLE_SLEEP_S",
    "block_tensorflow",
    "check_poll_s",
    "check_supernode_poll",
    "check_tensorflow_import",
    "supernode_argv",
    "without_tensorflow",
]

WRITTEN_FOR = "1.39.0"
"""The Flower release these patches were written and tested against."""
SUPERNODE_IDLE_SLEEP_S = 3
"""What Flower 1.39's SuperNode sleeps when it has no message (``time.sleep(3)`` in its pull loop)."""
DEFAULT_POLL_S = 0.5
"""fedge's SuperNode idle poll (Flower's own is 3 s): the setting's, the flag's and the Federation's default."""
MAX_POLL_S = 60.0
"""The longest idle poll fedge accepts (Flower's own is 3 s)."""
_IDLE_SLEEP_CALL = f"time.sleep({SUPERNODE_IDLE_SLEEP_S})"
_TF_IMPORT = "import tensorflow as TF"
_TF_MODULE = "flwr.simulation.ray_transport.utils"


def _changed(what: str) -> ConfigError:
    from flwr.supercore.version import package_version

    return ConfigError(
        f"fedge's {what} is written for flwr {WRITTEN_FOR}, but the installed flwr {package_version} changed that "
        f"code; install the release fedge supports: pip install 'flwr=={WRITTEN_FOR}'"
    )


# -- the SuperNode's idle poll ------------------------------------------------------------------------------
class _ShortIdleSleep(ModuleType):
    """Stands in for ``time`` inside Flower's SuperNode loop: its idle ``sleep(3)`` becomes ``sleep(poll_s)``."""

    def __init__(self, poll_s: float) -> None:
        super().__init__("time")
        self.poll_s = poll_s

    def sleep(self, seconds: float) -> None:
        time.sleep(self.poll_s if seconds == SUPERNODE_IDLE_SLEEP_S else seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _supernode_loop_module() -> ModuleType:
    import flwr.supernode.start_client_internal as loop

    return loop


def check_supernode_poll() -> None:
    """Check that Flower's SuperNode loop still sleeps ``time.sleep(3)`` when idle, through its ``time`` module.

    Raises:
        ConfigError: the installed Flower's SuperNode loop is not the code the patch was written for.
    """
    loop = _supernode_loop_module()
    source = inspect.getsource(loop.start_client_internal)
    if source.count(_IDLE_SLEEP_CALL) != 1 or getattr(loop, "time", None) is not time:
        raise _changed("shorter SuperNode idle poll")


def check_poll_s(poll_s: float, *, name: str = "supernode_poll_s") -> None:
    """Refuse an idle poll that is not a number of seconds in (0, :data:`MAX_POLL_S`]."""
    if not (math.isfinite(poll_s) and 0 < poll_s <= MAX_POLL_S):
        raise ConfigError(f"{name} must be a number of seconds in (0, {MAX_POLL_S:g}]; got {poll_s}")


def patch_supernode_poll(poll_s: float) -> None:
    """Shorten the SuperNode's idle sleep to ``poll_s`` in this process (before Flower's SuperNode starts)."""
    check_poll_s(poll_s, name="--poll-s")
    check_supernode_poll()
    _supernode_loop_module().time = _ShortIdleSleep(poll_s)  # type: ignore[attr-defined]


def supernode_argv(args: list[str], *, poll_s: float) -> list[str]:
    """The command line of Flower's SuperNode with ``args``, polling every ``poll_s`` when idle.

    The line names ``flower-supernode``, so whatever finds Flower's processes by name still finds it.
    """
    return [sys.executable, "-m", __name__, "flower-supernode", "--poll-s", str(poll_s), *args]


def _main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "flower-supernode" or argv[1] != "--poll-s":
        sys.exit(f"usage: python -m {__name__} flower-supernode --poll-s SECONDS [flower-supernode arguments]")
    try:
        patch_supernode_poll(float(argv[2]))
    except (ConfigError, ValueError) as err:
        sys.exit(f"fedge: {err}")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[3:]]
    flower_supernode()


# -- TensorFlow in the Simulation Engine ---------------------------------------------------------------------
def _tf_import_source() -> str:
    import importlib.util

    # Found from flwr's own location: find_spec of the submodule would import flwr.simulation, hence TensorFlow.
    spec = importlib.util.find_spec("flwr")
    if spec is None or spec.origin is None:
        return ""
    path = Path(spec.origin).parent.joinpath(*_TF_MODULE.split(".")[1:]).with_suffix(".py")
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def check_tensorflow_import() -> None:
    """Check that ``flwr.simulation.ray_transport.utils`` still imports TensorFlow optionally, as fedge hides it.

    Raises:
        ConfigError: the installed Flower imports it differently.
    """
    source = _tf_import_source()
    if source.count(_TF_IMPORT) != 1 or "except ModuleNotFoundError" not in source:
        raise _changed("Simulation Engine without TensorFlow")


@contextlib.contextmanager
def without_tensorflow() -> Iterator[None]:
    """Import Flower's Simulation Engine with TensorFlow hidden (``import tensorflow`` raises ModuleNotFoundError).

    A process that already imported TensorFlow keeps it. Everything else in the process sees TensorFlow again
    afterwards.
    """
    if "tensorflow" in sys.modules or _TF_MODULE in sys.modules:
        yield
        return
    check_tensorflow_import()
    sys.modules["tensorflow"] = None  # type: ignore[assignment]
    try:
        import flwr.simulation.ray_transport.utils  # noqa: F401
        yield
    finally:
        if sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]


def block_tensorflow() -> None:
    """Ray's ``worker_process_setup_hook`` for fedge's simulation: TensorFlow cannot be imported in the actor.

    fedge's clients are torch; the only import of TensorFlow in an actor is Flower's optional one, which then
    finds none, as on a machine without it.
    """
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]


if __name__ == "__main__":
    _main(sys.argv[1:])
