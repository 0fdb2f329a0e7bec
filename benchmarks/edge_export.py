"""Export time, file size and accuracy of the default CNN on digits at every quantization, through the real
`fedge edge export` pipeline (conversion child process, LiteRT + TFLite Micro verification).

Run from the repository root:

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/edge_export.py [--epochs 3] [--channels 32,64 --hidden 128]
    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/edge_export.py --startup [--reps 3]

Prints one JSON line per quantization and a summary with the int8 / float32 size ratio; times are wall-clock
seconds on this machine, and CPU seconds (this process + the converter child), which vary less when cores are shared.

``--startup`` times an int8 export of the default CNN three ways in the same run, alternating: the conversion
child started ahead, importing litert-torch while the model and data load, with one OpenMP thread (what fedge
does); the same with the libraries' default threads (one per core: what fedge did before); and the child started
only when the conversion begins, default threads (what fedge did first). It prints each time and the ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--channels", default="32,64", help="cnn conv channels (default: the plugin's default)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--startup", action="store_true", help="child started ahead vs at conversion, int8 only")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    from fedge.edge.export_workflow import ExportConfig, export_model
    from fedge.edge.tflite_info import inspect_tflite
    from fedge.plugins.data import load_dataset
    from fedge.plugins.models import build_model, save_model
    from fedge.plugins.train.single_process import train_epochs

    ds = load_dataset("digits")
    options = {"channels": [int(c) for c in args.channels.split(",")], "hidden": args.hidden}
    model = build_model("cnn", options, input_shape=ds.input_shape, num_classes=ds.num_classes)
    train_epochs(model, ds.x_train, ds.y_train, epochs=args.epochs)
    num_params = sum(p.numel() for p in model.parameters())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "run", extra={"dataset": "digits"})
        if args.startup:
            _startup(Path(tmp), args.reps)
            return
        for quant in ("none", "float16", "dynamic", "int8"):
            t0, cpu0 = time.perf_counter(), _cpu_s()
            report = export_model(Path(tmp) / "run", ExportConfig(quantize=quant), out=Path(tmp) / quant)
            total_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
            data = (Path(tmp) / quant / "model.tflite").read_bytes()
            info = inspect_tflite(data)
            const_bytes = sum(len(t.shape) and _const_size(t) for t in info.tensors if t.is_constant)
            rows[quant] = {
                "quantization": quant,
                "params": num_params,
                "size_bytes": report["size_bytes"],
                "constant_bytes": const_bytes,
                "arena_bytes": report["arena_bytes"],
                "accuracy_source": report["accuracy_source"],
                "accuracy_exported": report["accuracy_exported"],
                "tflm_agreed": report["runtimes"]["agreed"],
                "convert_s": report["convert_s"],
                "verify_s": report["verify_s"],
                "export_total_s": round(total_s, 2),
                "export_cpu_s": round(cpu_s, 2),
            }
            print(json.dumps(rows[quant]))
    int8, fp32 = rows["int8"], rows["none"]
    print(
        json.dumps(
            {
                "int8_over_float32_file": round(int8["size_bytes"] / fp32["size_bytes"], 3),
                "int8_over_float32_constants": round(int8["constant_bytes"] / fp32["constant_bytes"], 3),
                "int8_accuracy_drop_points": round(100 * (int8["accuracy_source"] - int8["accuracy_exported"]), 2),
            }
        )
    )


def _startup(tmp: Path, reps: int) -> None:
    from fedge.edge.convert import ConversionWorker
    from fedge.edge.export_workflow import ExportConfig, ExportWorkflow

    times: dict[str, list[float]] = {"ahead": [], "ahead_default_threads": [], "at_conversion": []}
    for rep in range(reps):
        for how, runs in times.items():
            t0 = time.perf_counter()
            worker = None
            if how == "ahead_default_threads":  # started now: it imports while the workflow loads, as "ahead"
                worker = ConversionWorker("torch", num_threads=None)
            if how == "at_conversion":  # a closed worker starts its child again on the first job, as before
                worker = ConversionWorker("torch", num_threads=None)
                worker.close()
            out = tmp / f"{how}-{rep}"
            ExportWorkflow(tmp / "run", ExportConfig(quantize="int8"), out=out, worker=worker).run()
            if worker is not None:
                worker.close()
            runs.append(time.perf_counter() - t0)
            print(json.dumps({"rep": rep, "child": how, "export_s": round(runs[-1], 2)}))
    best = {how: min(t) for how, t in times.items()}
    print(
        json.dumps(
            {
                "best_s": {k: round(v, 2) for k, v in best.items()},
                "ahead_over_at_conversion": round(best["ahead"] / best["at_conversion"], 3),
                "ahead_over_ahead_default_threads": round(best["ahead"] / best["ahead_default_threads"], 3),
            }
        )
    )


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the converter): steadier than wall time on shared cores."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _const_size(t) -> int:  # bytes of a constant tensor's data: weights and biases
    import math

    width = {"float32": 4, "int32": 4, "float16": 2, "int8": 1, "int64": 8}.get(t.dtype, 4)
    return math.prod(t.shape) * width


if __name__ == "__main__":
    main()
