"""Where the time goes: per-GPU-kernel times of lecture_kit's kernels and their fla peers.

    source .whl/env.sh && python3 benchmarks/profile_kernels.py --mixers gla rwkv7 --T 8192

For each mixer, at the benchmark's shapes and bf16 (B = 16K / T), it runs the forward (``no_grad``)
and, with ``--backward``, forward+backward of lecture_kit ``kernel`` and of the fla peer under
``torch.profiler`` and prints one table per implementation: every CUDA kernel launched, its calls
and its total device time per iteration.  ``bench_kernels.py`` measures; this script explains.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import bench_kernels as bench

PEER = {"ssd": "fla chunk_simple_gla", "retnet": "fla chunk_retention", "gla": "fla chunk_gla",
        "rwkv7": "fla chunk_rwkv7"}


def kernel_table(fn, inputs, backward, iterations=10):
    """[(kernel name, calls per iteration, µs per iteration)], longest first, and the total µs."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    do = torch.randn_like(fn(inputs)) if backward else None

    def step():
        if backward:
            torch.autograd.grad(fn(inputs), leaves, do, allow_unused=True)
        else:
            with torch.no_grad():
                fn(inputs)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.count / iterations, e.device_time_total / iterations)
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


def host_and_device_us(fn, inputs, calls=200):
    """(host µs, wall µs) per forward call under ``no_grad``, after warming up: host is the time the
    CPU takes to enqueue ``calls`` calls back to back, wall the time until the GPU has run them.
    Host close to wall means the CPU, not the GPU, sets the pace: Python and launch overhead."""
    with torch.no_grad():
        for _ in range(10):
            fn(inputs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn(inputs)
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
    return (enqueued - start) / calls * 1e6, (done - start) / calls * 1e6


def autotuned_choices(mixer):
    """The configuration each autotuned kernel of ``mixer``'s module settled on (most recent key)."""
    from lecture_kit.kernels import gla, rwkv7, scalar_decay
    module = {"gla": gla, "rwkv7": rwkv7}.get(mixer, scalar_decay)
    for name, fn in vars(module).items():
        if isinstance(fn, triton.runtime.Autotuner) and fn.cache:
            key, config = list(fn.cache.items())[-1]
            yield f"{name} {config}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=list(PEER))
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="profile lecture_kit only (skips fla's autotuning)")
    args = parser.parse_args()
    implementations = {**bench.ours("kernel"), **bench.fla_ops()}
    B = max(1, bench.TOKENS // args.T)
    for mixer in args.mixers:
        shared = bench.BUILDERS[mixer](B, args.T)
        for name in ["lecture_kit kernel", "lecture_kit kernel unchecked"] + ([] if args.no_peers else [PEER[mixer]]):
            adapt, fn = implementations[(mixer, name)]
            inputs = adapt(shared) if adapt else shared
            rows, total = kernel_table(fn, inputs, args.backward)
            mode = "fwd+bwd" if args.backward else "fwd"
            print(f"\n{mixer} · {name} · {mode} · B{B} T{args.T}: {total / 1e3:.3f} ms of GPU kernels")
            if not args.backward:
                host, wall = host_and_device_us(fn, inputs)
                print(f"  host {host:.0f} µs per call to enqueue, {wall:.0f} µs until done")
            if name == "lecture_kit kernel":
                for kernel in autotuned_choices(mixer):
                    print(f"  autotune: {kernel}")
            for key, calls, us in rows:
                print(f"  {us / 1e3:8.3f} ms  {calls:5.1f}×  {key[:110]}")


if __name__ == "__main__":
    main()
