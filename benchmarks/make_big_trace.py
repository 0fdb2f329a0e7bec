"""Write a synthetic multi-GB torch.profiler trace (one rank) for the profiler's memory test. Not committed.
Several, each with its own ``--rank``, make a multi-rank set.

Each step has a ProfilerStep annotation, python_function events (dropped by the loader, as with_stack traces
are mostly these), CPU ops, launches, compute kernels on stream 7 and an NCCL all-reduce on stream 20 with
collective args.

Run: .venv/bin/python benchmarks/make_big_trace.py --gb 2 --out /tmp/fedge-big-trace.json
"""

from __future__ import annotations

import argparse
import os
import time


def _step(step: int, t0: int, corr0: int) -> tuple[str, int, int]:
    """One training step's events as JSON text; returns (text, end time, next correlation id)."""
    parts = []
    t, corr = t0, corr0
    step_start = t
    for i in range(400):
        parts.append(
            f'{{"ph":"X","cat":"python_function","name":"nn/modules/module.py(1501): _call_impl","pid":100,"tid":100,'
            f'"ts":{t},"dur":40,"args":{{"Python parent id":{i},"Python id":{i + 1},"Ev Idx":{corr}}}}}'
        )
        parts.append(
            f'{{"ph":"X","cat":"cpu_op","name":"aten::addmm","pid":100,"tid":100,"ts":{t + 1},"dur":30,'
            f'"args":{{"External id":{corr},"Input Dims":[[1024,1024],[1024,1024]],"Input type":["float","float"]}}}}'
        )
        parts.append(
            f'{{"ph":"X","cat":"cuda_runtime","name":"cudaLaunchKernel","pid":100,"tid":100,"ts":{t + 5},"dur":8,'
            f'"args":{{"External id":{corr},"cbid":211,"correlation":{corr}}}}}'
        )
        parts.append(
            f'{{"ph":"f","id":{corr},"pid":0,"tid":7,"ts":{t + 60},"cat":"ac2g","name":"ac2g","bp":"e"}}'
        )
        parts.append(
            f'{{"ph":"X","cat":"kernel","name":"void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>'
            f'(Params)","pid":0,"tid":7,"ts":{t + 60},"dur":35,"args":{{"External id":{corr},"queued":0,"device":0,'
            f'"context":1,"stream":7,"correlation":{corr},"registers per thread":128,"shared memory":49152,'
            f'"blocks per SM":2.5,"warps per SM":10.0,"grid":[264,1,1],"block":[128,1,1],"est. achieved occupancy %":12}}}}'
        )
        corr += 1
        t += 45
    parts.append(
        f'{{"ph":"X","cat":"cuda_runtime","name":"cudaLaunchKernel","pid":100,"tid":101,"ts":{t},"dur":8,'
        f'"args":{{"External id":{corr},"cbid":211,"correlation":{corr}}}}}'
    )
    parts.append(
        f'{{"ph":"X","cat":"kernel","name":"ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*, unsigned long, ncclWork*)",'
        f'"pid":0,"tid":20,"ts":{t - 3000},"dur":2900,"args":{{"device":0,"stream":20,"correlation":{corr},'
        f'"Collective name":"allreduce","In msg nelems":6637568,"Out msg nelems":6637568,"Group size":2,"dtype":"Float",'
        f'"Process Group Name":"0","Process Group Description":"default_pg","Process Group Ranks":"[0, 1]"}}}}'
    )
    corr += 1
    parts.append(
        f'{{"ph":"X","cat":"user_annotation","name":"ProfilerStep#{step}","pid":100,"tid":100,"ts":{step_start},'
        f'"dur":{t - step_start + 100},"args":{{"External id":{corr}}}}}'
    )
    return ",\n".join(parts), t + 200, corr + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="target size in GB (1e9 bytes)")
    parser.add_argument("--out", default="/tmp/fedge-big-trace.json", help="where to write it")
    parser.add_argument("--rank", type=int, default=0, help="the rank in distributedInfo (of a 2-rank job)")
    args = parser.parse_args()
    target = int(args.gb * 1e9)
    start = time.perf_counter()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{\n "schemaVersion": 1,\n "distributedInfo": {"backend": "nccl", "rank": ' + str(args.rank) + ', "world_size": 2},\n'
                ' "deviceProperties": [{"id": 0, "name": "NVIDIA A100-SXM4-80GB"}],\n "traceEvents": [\n')
        written, step, t, corr, first = 0, 1, 1_700_000_000_000_000, 1, True
        while written < target:
            text, t, corr = _step(step, t, corr)
            if not first:
                f.write(",\n")
            f.write(text)
            written += len(text) + 2
            step += 1
            first = False
        f.write('\n ],\n "traceName": "synthetic",\n "displayTimeUnit": "ms"\n}\n')
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e9:.2f} GB, {step - 1} steps, "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
