"""fedge's two patches of Flower internals, against the pinned Flower: each applies, does what it says, and
stops with one line when Flower's code is not the code it was written for."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedge.errors import ConfigError
from fedge.plugins.fl import flower_internals


def test_supernode_idle_sleep_is_shortened_and_nothing_else() -> None:
    # Prepare: the pinned Flower's SuperNode loop is what the patch expects.
    import flwr.supernode.start_client_internal as loop

    flower_internals.check_supernode_poll()
    shim = flower_internals._ShortIdleSleep(0.01)

    # Execute
    started = time.perf_counter()
    shim.sleep(flower_internals.SUPERNODE_IDLE_SLEEP_S)
    idle_s = time.perf_counter() - started
    started = time.perf_counter()
    shim.sleep(0.2)
    other_s = time.perf_counter() - started

    # Assert: the 3 s idle sleep is the patched one; any other sleep and every other name are time's.
    assert idle_s < flower_internals.SUPERNODE_IDLE_SLEEP_S / 2 <= 1.5
    assert other_s >= 0.2
    assert shim.monotonic is time.monotonic and shim.time is time.time
    assert loop.time is time  # checking patched nothing in this process


def test_the_patch_reaches_flowers_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: Flower's own loop module (restored afterwards)
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    # Execute
    flower_internals.patch_supernode_poll(0.01)
    started = time.perf_counter()
    loop.time.sleep(flower_internals.SUPERNODE_IDLE_SLEEP_S)  # what the loop's idle branch calls
    idle_s = time.perf_counter() - started
    # Assert: the loop's `time` is the shim, and its idle sleep is the short one
    assert isinstance(loop.time, flower_internals._ShortIdleSleep) and loop.time.poll_s == 0.01
    assert idle_s < flower_internals.SUPERNODE_IDLE_SLEEP_S / 2


def test_supernode_argv_names_flower_supernode_and_runs_the_patched_one() -> None:
    argv = flower_internals.supernode_argv(["--superlink", "127.0.0.1:1"], poll_s=0.5)

    quiet = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    done = subprocess.run([*argv[:6], "--help"], capture_output=True, text=True, timeout=300, check=False, env=quiet)

    assert "flower-supernode" in argv and argv[-2:] == ["--superlink", "127.0.0.1:1"]
    assert done.returncode == 0 and "--superlink" in done.stdout  # Flower's own SuperNode answered
    bad = subprocess.run([*argv[:5], "0"], capture_output=True, text=True, timeout=300, check=False, env=quiet)
    assert bad.returncode == 1 and "--poll-s must be a number of seconds in (0, 60]; got 0.0" in bad.stderr


def test_a_changed_supernode_loop_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    import flwr.supernode.start_client_internal as loop

    from fedge.cli.app import main

    monkeypatch.setattr(loop, "time", object())  # e.g. `from time import sleep` in a later release

    with pytest.raises(ConfigError, match=r"written for flwr 1\.39\.0.*pip install 'flwr==1\.39\.0'"):
        flower_internals.check_supernode_poll()
    # fedge fl run says so before its run directory exists, so the same --out works once Flower is right
    assert main(["fl", "run", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shorter SuperNode idle poll is written for flwr 1.39.0" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_changed_tensorflow_import_stops_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    flower_internals.check_tensorflow_import()  # the pinned Flower imports it optionally, in one place

    monkeypatch.setattr(flower_internals, "_tf_import_source", lambda: "import tensorflow as tf\n")

    with pytest.raises(ConfigError, match="Simulation Engine without TensorFlow is written for flwr 1.39.0"):
        flower_internals.check_tensorflow_import()


def test_simulation_engine_imports_without_tensorflow_and_actors_cannot_import_it() -> None:
    # In a fresh interpreter (this one may hold TensorFlow already): Flower's Simulation Engine imported under
    # without_tensorflow() finds none, the rest of the process could import it afterwards, and the Ray worker
    # hook makes the import fail at once, as on a machine without TensorFlow.
    script = """
import sys
from fedge.plugins.fl.flower_internals import block_tensorflow, without_tensorflow
with without_tensorflow():
    from flwr.simulation import run_simulation
import flwr.simulation.ray_transport.utils as utils
print("tf-in-flower", utils.TF, "tensorflow" in sys.modules)
block_tensorflow()
try:
    import tensorflow
except ModuleNotFoundError:
    print("blocked")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "tf-in-flower None False" in done.stdout and "blocked" in done.stdout
