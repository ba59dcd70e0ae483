"""Benchmark lecture_kit's kernels against the fastest public peers, side by side in one process.

    source .whl/env.sh && python3 benchmarks/bench_kernels.py [--out benchmarks/results/h200.json]

For T in {1K, 2K, 4K, 8K, 16K, 32K} with B = max(1, 16K / T), bf16 inputs, it times, per mixer:
  lecture_kit ``kernel`` (Triton; also with its value checks off, which removes a device sync) and
  ``chunked`` (PyTorch), and the peer kernels of
  flash-linear-attention: ``chunk_simple_gla`` for SSD (q=C, k=B, v=x·dt, g=A·dt, scale 1, then
  + D·x) and with the RetNet decays, ``chunk_retention``, ``chunk_gla``, ``chunk_rwkv7`` (the layer's
  settings: w = −e^{−1/2}·σ(·), lower_bound), and causal SDPA (H16, D128) as the attention baseline.
Shapes: SSD H32 P64 N128 G1; RetNet and GLA H16 K=V=128; RWKV-7 H32 K=V=64.

Method (peers.md, "A fair benchmark"): identical contiguous inputs built outside the timed region;
every shape warmed first (the first call's wall time, compile and autotune included, is recorded);
``triton.testing.do_bench`` median with p20/p80; forward under ``no_grad``; forward+backward as
``torch.autograd.grad(o, inputs, do)``.  Achieved bandwidth counts the compulsory bytes (inputs read
and output written once; for forward+backward also dO read and every gradient written once) against
the device-to-device copy bandwidth measured in the same run.  Failures (a peer that refuses its
backward, an out-of-memory PyTorch form) are recorded as such, never hidden.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lecture_kit import fast_dtype
from lecture_kit import set_value_checks
from lecture_kit.testing import mixer as mixer_module

DT = fast_dtype()       # bf16 from compute capability 8.0 (the H200 record); fp16 below it, e.g. a T4
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
TOKENS = 16384
RWKV_LOWER_BOUND = -0.6065306597126334      # −e^{−1/2}: the RWKV-7 layer's bound on log w


# ---------------------------------------------------------------------------------------------------
# inputs: one builder per mixer, returning (grad leaves, a dict of fixed tensors)

def _leaf(t):
    return t.to("cuda").contiguous().requires_grad_()


def ssd_inputs(B, T, H=32, P=64, N=128, G=1):
    x = _leaf(torch.randn(B, T, H, P, dtype=DT))
    dt = _leaf(F.softplus(torch.randn(B, T, H) - 3.0).float())
    A = _leaf(-(1 + 15 * torch.rand(H)))
    Bm, Cm = _leaf(torch.randn(B, T, G, N, dtype=DT)), _leaf(torch.randn(B, T, G, N, dtype=DT))
    D = _leaf(torch.randn(H))
    return dict(x=x, dt=dt, A=A, B=Bm, C=Cm, D=D)


def qkv_inputs(B, T, H=16, K=128, V=128):
    return dict(q=_leaf(torch.randn(B, T, H, K, dtype=DT)), k=_leaf(torch.randn(B, T, H, K, dtype=DT)),
                v=_leaf(torch.randn(B, T, H, V, dtype=DT)))


def retnet_inputs(B, T, H=16, K=128, V=128):
    d = qkv_inputs(B, T, H, K, V)
    d["log_gamma"] = torch.log1p(-2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))).cuda()
    return d


def gla_inputs(B, T, H=16, K=128, V=128):
    d = qkv_inputs(B, T, H, K, V)
    d["g"] = _leaf(F.logsigmoid(torch.randn(B, T, H, K)) / 16)          # the GLA layer's gate
    return d


def rwkv7_inputs(B, T, H=32, K=64, V=64):
    kappa = F.normalize(torch.randn(B, T, H, K), dim=-1)
    return dict(r=_leaf(torch.randn(B, T, H, K, dtype=DT)),
                w=_leaf(RWKV_LOWER_BOUND * torch.sigmoid(torch.randn(B, T, H, K))),
                k=_leaf((torch.randn(B, T, H, K) / K ** 0.5).to(DT)),
                v=_leaf(torch.randn(B, T, H, V, dtype=DT)),
                a=_leaf((-kappa).to(DT)), b=_leaf((kappa * torch.sigmoid(torch.randn(B, T, H, K))).to(DT)))


def sdpa_inputs(B, T, H=16, D=128):
    return dict(q=_leaf(torch.randn(B, H, T, D, dtype=DT)), k=_leaf(torch.randn(B, H, T, D, dtype=DT)),
                v=_leaf(torch.randn(B, H, T, D, dtype=DT)))


# ---------------------------------------------------------------------------------------------------
# implementations: (mixer, name) -> (adapt, forward): adapt builds the implementation's own inputs
# from the shared ones outside the timed region (None: use them as they are)

def fla_ops():
    from fla.ops.gla import chunk_gla
    from fla.ops.retention import chunk_retention
    from fla.ops.rwkv7 import chunk_rwkv7
    from fla.ops.simple_gla import chunk_simple_gla

    def ssd_in_simple_gla_terms(d):
        """fla's inputs for SSD, built outside the timed region: q=C, k=B per head, v=x·dt, g=A·dt."""
        H = d["x"].shape[2]
        with torch.no_grad():
            heads = lambda t: t.repeat_interleave(H // t.shape[2], dim=2)
            return dict(q=_leaf(heads(d["C"])), k=_leaf(heads(d["B"])), v=_leaf(d["x"] * d["dt"][..., None].to(DT)),
                        g=_leaf(d["dt"] * d["A"]), x=_leaf(d["x"]), D=_leaf(d["D"]))

    return {
        ("ssd", "fla chunk_simple_gla"): (ssd_in_simple_gla_terms, lambda d: chunk_simple_gla(
            d["q"], d["k"], d["v"], g=d["g"], scale=1.0)[0] + d["x"] * d["D"][:, None].to(DT)),
        ("retnet", "fla chunk_retention"): (None, lambda d: chunk_retention(d["q"], d["k"], d["v"])[0]),
        ("retnet", "fla chunk_simple_gla"): (None, lambda d: chunk_simple_gla(
            d["q"], d["k"], d["v"], g_gamma=d["log_gamma"])[0]),
        ("gla", "fla chunk_gla"): (None, lambda d: chunk_gla(d["q"], d["k"], d["v"], d["g"])[0]),
        ("rwkv7", "fla chunk_rwkv7"): (None, lambda d: chunk_rwkv7(d["r"], d["w"], d["k"], d["v"], d["a"], d["b"],
                                                                 scale=1.0, lower_bound=RWKV_LOWER_BOUND)[0]),
    }


def ours(form):
    call = {
        "ssd": lambda m, d: m(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"])[0],
        "retnet": lambda m, d: m(d["q"], d["k"], d["v"], d["log_gamma"])[0],
        "gla": lambda m, d: m(d["q"], d["k"], d["v"], d["g"])[0],
        "rwkv7": lambda m, d: m(d["r"], d["w"], d["k"], d["v"], d["a"], d["b"])[0],
    }
    out = {}
    for name, fn in call.items():
        m = getattr(mixer_module(name), form)
        if form == "chunked" and name == "rwkv7":
            m = lambda *a, _m=m, **k: _m(*a, **k, chunk_size=16)
        out[(name, f"lecture_kit {form}")] = (None, lambda d, fn=fn, m=m: fn(m, d))
        if form == "kernel":
            out[(name, "lecture_kit kernel unchecked")] = (None, lambda d, fn=fn, m=m: unchecked(fn, m, d))
    return out


def unchecked(fn, m, d):
    """The call without its value checks (lecture_kit.set_value_checks): no device sync, as a
    layer whose gates are valid by construction would run it, and as the peers (which check
    nothing) always run."""
    with set_value_checks(False):
        return fn(m, d)


BUILDERS = {"ssd": ssd_inputs, "retnet": retnet_inputs, "gla": gla_inputs, "rwkv7": rwkv7_inputs,
            "attention": sdpa_inputs}


# ---------------------------------------------------------------------------------------------------

def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(fn, inputs, mode):
    """(first-call seconds, median, p20, p80 ms, compulsory bytes) for one implementation and shape."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(inputs)
    else:
        with torch.no_grad():
            do = torch.randn_like(fn(inputs))

        def run():
            return torch.autograd.grad(fn(inputs), leaves, do, allow_unused=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    out = result if mode == "fwd" else fn(inputs).detach()
    moved = nbytes(inputs.values()) + nbytes([out])
    if mode == "fwdbwd":
        moved += nbytes([out]) + nbytes(leaves)
    for _ in range(5):
        run()
    med, p20, p80 = do_bench(run, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=150)
    return first, med, p20, p80, moved


def ceilings():
    src = torch.empty(2 ** 30 // 2, dtype=DT, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=20, rep=200)
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    mm_ms = do_bench(lambda: a @ a, warmup=20, rep=200)
    return {"copy_GBps": 2 * nbytes([src]) / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def device_info():
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import fla
        info["fla"] = fla.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        info["fla"] = f"unavailable: {e}"
    try:
        q = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,driver_version"
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/h200.json")
    parser.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    parser.add_argument("--mixers", nargs="*", default=["ssd", "retnet", "gla", "rwkv7", "attention"])
    parser.add_argument("--no-chunked", action="store_true", help="skip the PyTorch chunked forms")
    parser.add_argument("--no-peers", action="store_true",
                        help="time lecture_kit alone (skips fla's first-call autotuning, minutes per shape)")
    parser.add_argument("--merge", nargs="+", metavar="RUN.json",
                        help="combine the results of several runs (each keeps its own meta) into --out")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    torch.backends.cuda.matmul.allow_tf32 = False
    impls = {}
    impls.update(ours("kernel"))
    if not args.no_chunked:
        impls.update(ours("chunked"))
    if not args.no_peers:
        try:
            impls.update(fla_ops())
        except Exception as e:  # noqa: BLE001
            print(f"flash-linear-attention unavailable: {e}")
        impls[("attention", "torch SDPA causal")] = (None, lambda d: F.scaled_dot_product_attention(
            d["q"], d["k"], d["v"], is_causal=True))

    meta = device_info() | ceilings()
    print(json.dumps(meta, indent=1))
    records = []
    for mixer in args.mixers:
        for T in args.lengths:
            B = max(1, TOKENS // T)
            torch.manual_seed(0)
            inputs = BUILDERS[mixer](B, T)
            for (m, name), (adapt, fn) in impls.items():
                if m != mixer:
                    continue
                for mode in ("fwd", "fwdbwd"):
                    rec = dict(mixer=mixer, impl=name, mode=mode, B=B, T=T)
                    try:
                        first, med, p20, p80, moved = measure(fn, adapt(inputs) if adapt else inputs, mode)
                        rec |= dict(ms=med, p20=p20, p80=p80, first_call_s=first,
                                    GBps=moved / med / 1e6, frac_of_copy=moved / med / 1e6 / meta["copy_GBps"])
                    except Exception as e:  # noqa: BLE001 - a refusal or OOM is a result
                        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        torch.cuda.empty_cache()
                    records.append(rec)
                    print(json.dumps(rec))
                    save(args.out, meta, records)          # a run cut short still leaves its data
            del inputs
            torch.cuda.empty_cache()
    save(args.out, meta, records)
    print_table(records)


def save(path, meta, records):
    add_ratios(records)
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)


def merge(paths, out):
    """One results file from several (a GPU lease may end between runs).  Each input is one run
    (``{"meta", "records"}``, as ``main`` writes it) or an earlier merge (``{"runs", "records"}``);
    every record keeps the index of its run in ``runs``, and ratios are only taken within one run."""
    runs, records = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if "runs" in data:
            offset = len(runs)
            runs += data["runs"]
            records += [r | {"run": r["run"] + offset} for r in data["records"]]
        else:
            records += [r | {"run": len(runs)} for r in data["records"]]
            runs.append(data["meta"])
    with open(out, "w") as f:
        json.dump({"runs": runs, "records": records}, f, indent=1)
    print_table(records)


def add_ratios(records):
    """ratio = our time / the best peer's time (same mixer, T, mode); < 1 means faster than every peer."""
    for r in records:
        if not r["impl"].startswith("lecture_kit") or "ms" not in r:
            continue
        peers = [p["ms"] for p in records if p["mixer"] == r["mixer"] and p["T"] == r["T"] and p["mode"] == r["mode"]
                 and not p["impl"].startswith("lecture_kit") and "ms" in p]
        r["ratio_to_best_peer"] = r["ms"] / min(peers) if peers else None


def print_table(records):
    print(f"\n{'mixer':8s} {'impl':26s} {'mode':7s} {'B':>3s} {'T':>6s} {'ms':>9s} {'p20':>8s} {'p80':>8s} "
          f"{'GB/s':>7s} {'%copy':>6s} {'first s':>8s} {'×peer':>6s}")
    for r in records:
        if "ms" in r:
            ratio = f"{r['ratio_to_best_peer']:.2f}" if r.get("ratio_to_best_peer") else ""
            print(f"{r['mixer']:8s} {r['impl']:26s} {r['mode']:7s} {r['B']:3d} {r['T']:6d} {r['ms']:9.3f} {r['p20']:8.3f} "
                  f"{r['p80']:8.3f} {r['GBps']:7.0f} {100 * r['frac_of_copy']:5.0f}% {r['first_call_s']:8.2f} {ratio:>6s}")
        else:
            print(f"{r['mixer']:8s} {r['impl']:26s} {r['mode']:7s} {r['B']:3d} {r['T']:6d}   {r['error']}")


if __name__ == "__main__":
    main()
