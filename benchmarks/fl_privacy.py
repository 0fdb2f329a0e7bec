"""What privacy costs in a federated run: SecAgg+'s time per round, and accuracy against ε with central DP.

``overhead``: the same federation (digits, IID, the small MLP) with plain FedAvg and with ``--secagg``, one after
the other in this process; prints the mean round time of each (the first, cold round left out) and their ratio.
``epsilon``: central DP (server-side fixed clipping) at several noise multipliers, plus a run without DP; prints
the held-out accuracy after the last round and the (ε, δ) Flower's RDP accountant reports, as a Markdown table.
Timings are noisy on a shared machine: compare within one run.

    .venv/bin/python benchmarks/fl_privacy.py overhead [--clients 3] [--rounds 4]
    .venv/bin/python benchmarks/fl_privacy.py epsilon [--clients 5] [--rounds 10] [--noise 0.02 0.05 0.1 0.3 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

JOB: dict[str, Any] = {
    "model": "mlp",
    "model_options": {"hidden": [32]},
    "partition": "iid",
    "local_epochs": 1,
    "batch_size": 32,
}


def _run(settings: dict[str, Any], out: Path) -> Any:
    from fedge.plugins.fl import run
    from fedge.plugins.fl.config import load_config

    return run(load_config(None, {**JOB, **settings}), out=out)


def overhead(clients: int, rounds: int, base: Path) -> dict[str, Any]:
    rows = {}
    for name, privacy in (("fedavg", {}), ("secagg", {"secagg": True})):
        result = _run({"clients": clients, "rounds": rounds, "privacy": privacy}, base / name)
        warm = [float(m["round_s"]) for m in result.metrics[1:]] or [float(result.metrics[0]["round_s"])]
        rows[name] = {"round_s": round(statistics.mean(warm), 2), "accuracy": round(result.accuracy, 4)}
    ratio = rows["secagg"]["round_s"] / rows["fedavg"]["round_s"]
    return {"clients": clients, "rounds": rounds, **rows, "secagg_over_fedavg": round(ratio, 2)}


def epsilon(clients: int, rounds: int, noise: list[float], clip: float, base: Path) -> list[dict[str, Any]]:
    rows = []
    for z in [0.0, *noise]:
        privacy = {"dp": "central", "noise_multiplier": z, "clip": clip} if z > 0 else {}
        result = _run({"clients": clients, "rounds": rounds, "privacy": privacy}, base / f"z{z}")
        last = result.metrics[-1]
        rows.append({"noise_multiplier": z, "epsilon": last.get("epsilon"), "delta": last.get("delta"),
                     "accuracy": round(result.accuracy, 4)})  # fmt: skip
    return rows


def _table(rows: list[dict[str, Any]], clients: int, rounds: int, clip: float) -> str:
    lines = [
        f"| noise multiplier | ε (δ = 1e-5) after {rounds} rounds | held-out accuracy |",
        "|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        lines.append(f"| {r['noise_multiplier'] or '— (no DP)'} | {eps} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + f"\n\n({clients} clients, clip {clip}, {JOB['model']} {JOB['model_options']}, IID)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overhead", "epsilon"))
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3, 1.0])
    parser.add_argument("--clip", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-privacy-") as tmp:
        if args.mode == "overhead":
            print(json.dumps(overhead(args.clients or 3, args.rounds or 4, Path(tmp)), indent=2))
        else:
            clients, rounds = args.clients or 5, args.rounds or 10
            rows = epsilon(clients, rounds, args.noise, args.clip, Path(tmp))
            print(json.dumps(rows, indent=2))
            print(_table(rows, clients, rounds, args.clip))


if __name__ == "__main__":
    main()
