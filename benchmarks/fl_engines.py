"""fedge's federations against the same work run with Flower alone, as ratios measured in one run.

- ``simulation``: ``fedge fl run --engine simulation`` against Flower's own ``flwr.simulation.run_simulation``
  on an equivalent app (Flower's FedAvg loop, centralized evaluation, a ClientApp that trains the same model
  on the same split with the same SGD). Goal: fedge <= 1.0x Flower's wall time, same accuracy.
- ``deployment``: ``fedge fl run`` against the same app hand-launched as Flower's docs do it
  (``flower-superlink``, ``flower-supernode`` x N, ``flwr run``), one torch thread per client. Goal <= 0.5x.
- ``rounds``: a steady ``fedge fl run`` round against its clients' compute time, split into where it goes
  (from ``metrics.jsonl``). Goal: round <= compute + 2 s.

Each side runs in a fresh process tree, one after the other. The machine may be shared: the load average is
printed with each figure; compare within one run.

    .venv/bin/python benchmarks/fl_engines.py simulation [--clients 10] [--rounds 3]
    .venv/bin/python benchmarks/fl_engines.py deployment [--clients 3] [--rounds 3]
    .venv/bin/python benchmarks/fl_engines.py rounds [--clients 3] [--rounds 5] [--poll-s 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedge.plugins.fl.flower_internals import DEFAULT_POLL_S
from fedge.supervisor import free_port

BIN = Path(sys.executable).parent
# The work both sides do: fedge's defaults but the MLP and IID digits, so a round is short and even.
JOB = {"partition": "iid", "model": "mlp", "local_epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 0}

APP = '''\
"""The job as a plain Flower app: FedAvg's own loop, centralized evaluation (no evaluate round trip),
a ClientApp that trains with torch. fedge supplies only the data split, the model and the SGD loop."""
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

S = json.loads({settings!r})
torch.set_num_threads(1)


def _data():
    from fedge.config import parse_partition
    from fedge.plugins.data import load_dataset, partition

    ds = load_dataset("digits", {{}})
    return ds, partition(ds.y_train, S["clients"], parse_partition(S["partition"], seed=S["seed"]))


def _model(ds):
    from fedge.plugins.models import build_model

    return build_model(S["model"], {{}}, input_shape=ds.input_shape, num_classes=ds.num_classes)


clientapp = ClientApp()


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    from fedge.plugins.fl.local import client_seed
    from fedge.plugins.train.single_process import train_epochs

    ds, parts = _data()
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    model = _model(ds)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    idx = parts[pid]
    seed = client_seed(S["seed"], server_round, pid)  # fedge's per-client seed
    loss = train_epochs(model, ds.x_train[idx], ds.y_train[idx], epochs=S["local_epochs"], batch_size=S["batch_size"],
                        lr=S["lr"], seed=seed)
    metrics = MetricRecord({{"train-loss": float(loss), "num-examples": len(idx)}})
    return Message(RecordDict({{"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}}), reply_to=msg)


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    from fedge.plugins.train.single_process import evaluate

    ds, _ = _data()
    model = _model(ds)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, ds.x_test, ds.y_test)
        Path(S["out"]).write_text(json.dumps({{"round": server_round, "accuracy": acc, "loss": loss}}))
        return MetricRecord({{"accuracy": acc, "loss": loss}})

    n = S["clients"]
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=S["rounds"], evaluate_fn=central)
'''

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "benchapp"
version = "1.0.0"
dependencies = ["flwr>=1.39,<1.40"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "benchapp.app:serverapp"
clientapp = "benchapp.app:clientapp"
"""


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def write_app(root: Path, clients: int, rounds: int, out: Path) -> Path:
    settings = json.dumps({**JOB, "clients": clients, "rounds": rounds, "out": str(out)})
    (root / "benchapp").mkdir(parents=True)
    (root / "benchapp" / "__init__.py").write_text("")
    (root / "benchapp" / "app.py").write_text(APP.format(settings=settings))
    (root / "pyproject.toml").write_text(PYPROJECT)
    return root


def fedge_run(clients: int, rounds: int, out: Path, *extra: str) -> dict:
    argv = [str(BIN / "fedge"), "fl", "run", "--clients", str(clients), "--rounds", str(rounds), "--partition", JOB["partition"],
            "--model", JOB["model"], "--local-epochs", str(JOB["local_epochs"]), "--batch-size", str(JOB["batch_size"]),
            "--lr", str(JOB["lr"]), "--seed", str(JOB["seed"]), "--out", str(out), "--json", *extra]  # fmt: skip
    started, load_before = time.perf_counter(), load()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"fedge fl run failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return {"wall_s": round(wall, 1), "accuracy": round(result["accuracy"], 4), "load": load_before, "metrics": result["metrics"]}


def flower_simulation(clients: int, rounds: int, tmp: Path) -> dict:
    out = tmp / "flower-sim.json"
    app = write_app(tmp / "flower-sim-app", clients, rounds, out)
    script = (
        f"import sys; sys.path.insert(0, {str(app)!r})\n"
        "from flwr.simulation import run_simulation\n"
        "from benchapp.app import clientapp, serverapp\n"
        f"run_simulation(server_app=serverapp, client_app=clientapp, num_supernodes={clients},\n"
        "               backend_config={'client_resources': {'num_cpus': 1, 'num_gpus': 0.0}})\n"
    )
    started, load_before = time.perf_counter(), load()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=tmp)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"Flower's run_simulation failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return {"wall_s": round(wall, 1), "accuracy": round(json.loads(out.read_text())["accuracy"], 4), "load": load_before}


def flower_deployment(clients: int, rounds: int, tmp: Path) -> dict:
    """Flower's deployment recipe by hand: a SuperLink, N SuperNodes, ``flwr run``; then stop them all."""
    out = tmp / "flower-dep.json"
    app = write_app(tmp / "flower-dep-app", clients, rounds, out)
    home = tmp / "flwr-home"
    home.mkdir()
    fleet, control = free_port(), free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{control}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    logs = open(tmp / "flower-dep.log", "wb")  # noqa: SIM115 - closed below
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> None:
        procs.append(subprocess.Popen(argv, env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))

    started, load_before = time.perf_counter(), load()
    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--fleet-api-address", f"127.0.0.1:{fleet}", "--host", "127.0.0.1",
               "--port", str(control)])  # fmt: skip
        for i in range(clients):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}", "--port", str(free_port()),
                   "--node-config", f"partition-id={i} num-partitions={clients}"])  # fmt: skip
        deadline = time.monotonic() + 300
        while subprocess.run([str(BIN / "flwr"), "run", str(app), "local"], env=env, cwd=tmp, capture_output=True,
                             check=False).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline:
                sys.exit(f"flwr run never reached the SuperLink; see {tmp / 'flower-dep.log'}")
            time.sleep(0.5)  # the SuperLink is still starting
        while _round_done(out) != rounds:
            if time.monotonic() > deadline + 1800:
                sys.exit(f"the hand-launched Flower run did not finish; see {tmp / 'flower-dep.log'}")
            time.sleep(0.25)
    finally:
        for proc in procs:  # each in its own session: its group holds the SuperExec and the apps it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        wall = time.perf_counter() - started  # the stop below is not Flower's work
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a SuperNode can sit out SIGTERM
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
        logs.close()
    return {"wall_s": round(wall, 1), "accuracy": round(json.loads(out.read_text())["accuracy"], 4), "load": load_before}


def _round_done(out: Path) -> int:
    """The last round the hand-launched app recorded; 0 while the file is missing or half written."""
    try:
        return int(json.loads(out.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def round_split(metrics: list[dict]) -> dict:
    """Mean seconds of the steady rounds (all but the first) that aggregated a reply: the round, the clients'
    training, the rest."""
    answered = [m for m in metrics if m["reply_s"] and m["client_compute_s"] is not None]
    steady = [m for m in answered if m["round"] > 1] or answered
    if not steady:
        raise SystemExit("no round aggregated a client's reply; see the run's flower/logs")

    def mean(values: list[float]) -> float:
        return round(statistics.mean(values), 2)

    compute = mean([m["client_compute_s"] for m in steady])
    process = mean([m["client_process_s"] for m in steady])
    last_reply = mean([max(m["reply_s"].values()) for m in steady])
    return {
        "round_s": mean([m["round_s"] for m in steady]),
        "client_compute_s": compute,
        "clientapp_process_s": process,  # the ClientApp process: start, imports, FAB, hand-off, training
        "pickup_s": round(last_reply - process, 2),  # message pick-up by the SuperNode and the process launch
        "server_s": mean([m["round_s"] - m["wait_s"] for m in steady]),  # aggregate, evaluate, checkpoint
        "goal_s": round(compute + 2.0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["simulation", "deployment", "rounds"])
    parser.add_argument("--clients", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S, help="rounds: fedge's SuperNode idle poll")
    args = parser.parse_args()
    report: dict = {"job": JOB, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="fedge-engines-") as name:
        tmp = Path(name)
        if args.what == "simulation":
            clients, rounds = args.clients or 10, args.rounds or 3
            fedge = fedge_run(clients, rounds, tmp / "fedge", "--engine", "simulation")
            flower = flower_simulation(clients, rounds, tmp)
            report.update(clients=clients, rounds=rounds, goal="<= 1.0")
        elif args.what == "deployment":
            clients, rounds = args.clients or 3, args.rounds or 3
            fedge = fedge_run(clients, rounds, tmp / "fedge")
            flower = flower_deployment(clients, rounds, tmp)
            report.update(clients=clients, rounds=rounds, goal="<= 0.5")
        else:
            clients, rounds = args.clients or 3, args.rounds or 5
            fast = fedge_run(clients, rounds, tmp / "fast", "--supernode-poll-s", str(args.poll_s))
            flower_poll = fedge_run(clients, rounds, tmp / "flower-poll", "--supernode-poll-s", "3")
            report.update(clients=clients, rounds=rounds, goal="steady round <= client compute + 2 s")
            report[f"poll_{args.poll_s:g}s"] = {"wall_s": fast["wall_s"], "load": fast["load"], **round_split(fast["metrics"])}
            report["poll_3s (Flower's)"] = {"wall_s": flower_poll["wall_s"], "load": flower_poll["load"],
                                            **round_split(flower_poll["metrics"])}  # fmt: skip
            print(json.dumps(report, indent=2))
            return
    fedge.pop("metrics")
    report.update(fedge=fedge, flower=flower, ratio_wall=round(fedge["wall_s"] / flower["wall_s"], 2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
