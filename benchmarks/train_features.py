"""Layer freezing, activation recomputation, PowerSGD and fsdp against their plain counterparts, as ratios
measured in one run each (so machine load mostly cancels).

- ``freezing``: step time and gradient bytes of ``allreduce`` with ``freeze=first:K`` over plain ``allreduce``
  (``fedge bench strategies``, interleaved), and the test accuracy of short ``fedge train`` runs with
  no freezing, ``first:1`` from half-way, and ``progressive``.
- ``recompute``: rank 0's peak RSS and median step time of ``fedge train`` on a tiny-gpt with a large batch,
  with and without ``recompute=all`` (allreduce and fsdp).
- ``powersgd``: gradient bytes per step and test accuracy of ``comm_hook`` allreduce / fp16 / powersgd
  (ranks 1 and 4) after the same ``fedge train`` run.
- ``fsdp``: step time of ``fsdp`` over ``allreduce`` (``fedge bench strategies``) on an MLP and a tiny-gpt.

Run::

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/train_features.py [--only freezing,recompute,powersgd,fsdp] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedge.plugins.train.bench import run_bench

FEDGE = [sys.executable, "-c", "import sys; from fedge.cli.app import main; sys.exit(main())"]


def _train(tmp: Path, name: str, settings: dict[str, Any], nproc: int) -> dict[str, Any]:
    """One ``fedge train`` run from a TOML of ``settings``: its summary plus the metrics lines."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for table in ("strategy_options", "model_options"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.get(table, {}).items()]
    (tmp / f"{name}.toml").write_text("\n".join(lines) + "\n")
    out = tmp / name
    cmd = [*FEDGE, "train", str(tmp / f"{name}.toml"), "--nproc", str(nproc), "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"fedge train {name} failed: {proc.stderr.strip()[-500:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**json.loads(proc.stdout), "metrics": metrics}


def _bench(nproc: int, model: str, options: dict[str, Any], strategies: dict[str, dict[str, Any]], reps: int) -> dict[str, dict]:
    spec = {"model": model, "model_options": options, "batch_size": 64, "bucket_mb": 25.0, "reps": reps, "iters": 5,
            "strategies": strategies}  # fmt: skip
    return {r["impl"]: r for r in run_bench("strategies", nproc, spec)}


def freezing(tmp: Path, nproc: int, reps: int) -> None:
    plain = {"plugin": "allreduce"}
    rows = _bench(nproc, "mlp", {"hidden": [1024, 1024]}, {
        "allreduce": {}, "freeze-first:1": {**plain, "freeze": "first:1"}, "freeze-first:2": {**plain, "freeze": "first:2"},
    }, reps)  # fmt: skip
    base = rows["allreduce"]
    print(f"freezing, mlp 64-1024-1024-10 ({base['params']} params), global batch 64, {nproc} processes:")
    for name in ("freeze-first:1", "freeze-first:2"):
        r = rows[name]
        print(f"  {name}: step {r['step_ms']:.2f} ms vs {base['step_ms']:.2f} ms = {base['step_ms'] / r['step_ms']:.2f}x faster; "
              f"gradient bytes {r['grad_bytes']:.0f} vs {base['grad_bytes']:.0f} = {base['grad_bytes'] / r['grad_bytes']:.1f}x fewer")  # fmt: skip
    job = {"strategy": "allreduce", "steps": 300, "batch_size": 64, "model_options": {"hidden": [128, 64]}}
    for name, freeze in (("none", ""), ("first:1@150", "first:1@150"), ("progressive:100", "progressive:100")):
        s = _train(tmp, f"freeze-{name.replace(':', '-').replace('@', '-')}", {**job, "strategy_options": {"freeze": freeze}}, nproc)
        step_ms = statistics.median(m["step_s"] for m in s["metrics"][-100:]) * 1e3
        print(f"  train 300 steps freeze={name}: test accuracy {s['test_accuracy']:.4f}, median step of the last 100 {step_ms:.2f} ms, "
              f"last grad_bytes {s['metrics'][-1]['grad_bytes']:.0f}")  # fmt: skip


def recompute(tmp: Path, nproc: int) -> None:
    job = {"model": "tiny-gpt", "steps": 4, "batch_size": 1024, "model_options": {"d_model": 128, "num_layers": 6, "num_heads": 4}}
    print(f"recompute, tiny-gpt d_model 128 x 6 blocks, global batch 1024, {nproc} processes (rank 0's peak RSS):")
    for strategy in ("allreduce", "fsdp"):
        runs = {}
        for spec in ("", "all"):
            runs[spec] = _train(tmp, f"rc-{strategy}-{spec or 'none'}", {**job, "strategy": strategy, "strategy_options": {"recompute": spec}}, nproc)
        off, on = runs[""], runs["all"]
        t_off = statistics.median(m["step_s"] for m in off["metrics"][1:])
        t_on = statistics.median(m["step_s"] for m in on["metrics"][1:])
        print(f"  {strategy}: peak RSS {off['peak_rss_bytes'] / 2**20:.0f} MiB -> {on['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({(off['peak_rss_bytes'] - on['peak_rss_bytes']) / 2**20:.0f} MiB saved, {on['peak_rss_bytes'] / off['peak_rss_bytes']:.2f}x); "
              f"step {t_off * 1e3:.0f} ms -> {t_on * 1e3:.0f} ms ({t_on / t_off:.2f}x time)")  # fmt: skip


def powersgd(tmp: Path, nproc: int) -> None:
    job = {"strategy": "allreduce", "steps": 300, "batch_size": 64, "model_options": {"hidden": [256, 128]}}
    hooks = {"fp32": {}, "fp16": {"comm_hook": "fp16"},
             "powersgd-r1": {"comm_hook": "powersgd", "powersgd_rank": 1},
             "powersgd-r4": {"comm_hook": "powersgd", "powersgd_rank": 4}}  # fmt: skip
    print(f"PowerSGD, mlp 64-256-128-10, 300 steps, global batch 64, {nproc} processes (start after 10 plain steps):")
    base: dict[str, Any] = {}
    for name, opts in hooks.items():
        s = _train(tmp, f"psgd-{name}", {**job, "strategy_options": opts}, nproc)
        sent = s["metrics"][-1]["grad_bytes"]
        base = base or {"bytes": sent, "acc": s["test_accuracy"]}
        print(f"  {name}: {sent:.0f} bytes per step ({base['bytes'] / sent:.1f}x fewer than fp32), test accuracy "
              f"{s['test_accuracy']:.4f} ({100 * (s['test_accuracy'] - base['acc']):+.2f} points)")  # fmt: skip


def fsdp(nproc: int, reps: int) -> None:
    print(f"fsdp vs allreduce, global batch 64, {nproc} processes (fedge bench strategies):")
    for model, options in (("mlp", {"hidden": [1024, 1024]}), ("tiny-gpt", {"d_model": 64, "num_layers": 4})):
        rows = _bench(nproc, model, options, {"allreduce": {}, "fsdp": {}}, reps)
        a, f = rows["allreduce"], rows["fsdp"]
        print(f"  {model} ({a['params']} params): fsdp {f['step_ms']:.2f} ms, allreduce {a['step_ms']:.2f} ms, "
              f"fsdp / allreduce step time = {f['step_ms'] / a['step_ms']:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="freezing,recompute,powersgd,fsdp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    chosen = {s.strip() for s in args.only.split(",")}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-features-") as tmp:
        if "freezing" in chosen:
            freezing(Path(tmp), args.nproc, args.reps)
        if "recompute" in chosen:
            recompute(Path(tmp), args.nproc)
        if "powersgd" in chosen:
            powersgd(Path(tmp), args.nproc)
        if "fsdp" in chosen:
            fsdp(args.nproc, args.reps)


if __name__ == "__main__":
    main()
