"""Where a federated round's time goes, and the default job against centralized training of the same model.

Runs the README's main job (``fedge fl run`` defaults: digits, non-IID, cnn) with and without the warm
per-SuperNode training workers, and trains the same CNN centrally (all training data in one place, batch 32)
for as many epochs as each federated sample sees (rounds x local epochs). Prints one JSON object. Timings are noisy on a shared machine: compare within one run.

    .venv/bin/python benchmarks/fl_round_time.py [--rounds R] [--clients N] [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _split(metrics: list[dict]) -> dict[str, float]:
    """Mean per-round seconds: total, client compute (training), client process (start, imports, data,
    training), and everything else (Flower polling and transport, server aggregation and evaluation)."""
    def mean(key: str) -> float:
        values = [float(m[key]) for m in metrics if m.get(key) is not None]
        return round(statistics.mean(values), 2) if values else float("nan")

    round_s, compute_s, process_s = mean("round_s"), mean("client_compute_s"), mean("client_process_s")
    return {
        "round_s": round_s,
        "client_compute_s": compute_s,
        "client_process_overhead_s": round(process_s - compute_s, 2),
        "other_s": round(round_s - process_s, 2),
        "first_round_s": float(metrics[0]["round_s"]),
    }


def federated(warm: bool, rounds: int | None, clients: int | None, out: Path) -> dict:
    from fedge.plugins.fl import FlConfig, run
    from fedge.plugins.fl.config import load_config

    overrides = {"warm_workers": warm, "rounds": rounds, "clients": clients}
    cfg: FlConfig = load_config(None, overrides)
    start = time.perf_counter()
    result = run(cfg, out=out)
    return {
        "warm_workers": warm,
        "clients": cfg.clients,
        "rounds": cfg.rounds,
        "wall_s": round(time.perf_counter() - start, 1),
        "accuracy": round(result.accuracy, 4),
        "per_round": _split(result.metrics),
        "steady_rounds": _split(result.metrics[1:]) if len(result.metrics) > 1 else None,
    }


def centralized(epochs: int) -> dict:
    import torch

    from fedge.plugins.data import load_dataset
    from fedge.plugins.fl.config import FlConfig
    from fedge.plugins.models import build_model
    from fedge.plugins.train.single_process import evaluate, train_epochs

    cfg = FlConfig()
    torch.set_num_threads(1)
    data = load_dataset(cfg.dataset, cfg.dataset_options)
    model = build_model(cfg.model, cfg.model_options, input_shape=data.input_shape, num_classes=data.num_classes)
    start = time.perf_counter()
    # Batch 32: with all 1,437 samples in one place, the clients' batch of 16 at lr 0.05 is too noisy.
    train_epochs(model, data.x_train, data.y_train, epochs=epochs, batch_size=32, lr=cfg.lr, seed=cfg.seed)
    loss, acc = evaluate(model, data.x_test, data.y_test)
    return {"epochs": epochs, "accuracy": round(acc, 4), "loss": round(loss, 4), "train_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--skip-cold", action="store_true", help="Skip the run without warm workers.")
    args = parser.parse_args()
    from fedge.plugins.fl.config import load_config

    cfg = load_config(None, {"rounds": args.rounds, "clients": args.clients})
    report: dict = {"centralized": centralized(cfg.rounds * cfg.local_epochs)}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp:
        report["federated_warm"] = federated(True, args.rounds, args.clients, Path(tmp) / "warm")
        if not args.skip_cold:
            report["federated_cold"] = federated(False, args.rounds, args.clients, Path(tmp) / "cold")
    if "federated_cold" in report:
        report["cold_over_warm_wall"] = round(report["federated_cold"]["wall_s"] / report["federated_warm"]["wall_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
