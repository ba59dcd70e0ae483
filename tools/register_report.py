"""Registers, spills and shared memory of the project's Triton kernels on sm_90, without a GPU.

    python tools/register_report.py            # every preset below
    python tools/register_report.py gla        # the presets whose name starts with "gla"

Triton compiles a kernel for a target it is given (here Hopper, sm_90) on any machine: its bundled
ptxas assembles the cubin and ``cuobjdump -res-usage`` reads what one thread of the kernel needs.
A kernel at 255 registers with a non-zero STACK spills to local memory, and a program that needs
many registers leaves few warps per SM to hide memory latency: both show up as slow kernels on the
GPU, and both can be seen here first.  The presets are the bf16 shapes of
``benchmarks/bench_kernels.py`` (GLA H16 K=V=128, chunk 64; RWKV-7 H32 K=V=64, chunk 16) with the
tiles the host code launches.  The numbers quoted in the kernels' comments come from ``resource_usage``
here: at these presets, or at the other shapes and tiles a comment names (pass them to it).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import types

os.environ["TRITON_INTERPRET"] = "0"          # compile for real, even on a machine without CUDA

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lecture_kit", "kernels")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 1) -> str:
    """'REG:n STACK:m SHARED:s' of one compiled specialisation (autotuned kernels: the given config).

    A type written with a ``:16`` suffix (``"*bf16:16"``, ``"i32:16"``) marks the argument as a
    multiple of 16 (a pointer aligned to 16 bytes), which is what Triton's JIT assumes of such
    values at run time and what lets it vectorise loads whose strides are runtime integers."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    types_ = {name: kind.split(":")[0] for name, kind in signature.items()}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in signature.items() if kind.endswith(":16")}
    source = ASTSource(fn=fn, signature={**types_, **{name: "constexpr" for name in constexprs}},
                       constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = next(line for line in usage.splitlines() if "REG:" in line).split()
    return f"{fields[0]} {fields[1]} SHARED:{compiled.metadata.shared}"


def kernel_module(name):
    """lecture_kit.kernels.<name>, imported without running lecture_kit/__init__.py: that would set
    TRITON_INTERPRET=1 on a machine without CUDA, and the kernels would not compile.  An empty
    package object stands in for lecture_kit, so the kernels' relative imports still resolve."""
    if "lecture_kit" not in sys.modules:
        package = types.ModuleType("lecture_kit")
        package.__path__ = [os.path.dirname(KERNELS)]
        sys.modules["lecture_kit"] = package
    return importlib.import_module(f"lecture_kit.kernels.{name}")


def presets():
    """(name, kernel, signature, constexprs, num_warps, num_stages) for the benchmark shapes."""
    gla, rwkv7, scalar = kernel_module("gla"), kernel_module("rwkv7"), kernel_module("scalar_decay")
    # the scalar-decay kernels take their sizes at run time: aligned pointers and sizes as the JIT sees them
    sizes = dict(T="i32:16", H="i32:16", G="i32", K="i32:16", V="i32:16", NT="i32:16", scale="fp32")
    f32, bf16 = "*fp32:16", "*bf16:16"
    states = dict(x_ptr=bf16, y_ptr=bf16, dt_ptr=f32, log_decay_ptr=f32, first_ptr=f32, states_ptr=bf16,
                  last_ptr=f32, **sizes)
    for mixer, has_dt in (("retnet", False), ("ssd", True)):
        bk, bv = scalar._tiles("states", 128, 128 if mixer == "retnet" else 64, 64, None)
        for warps, stages in ((4, 2), (4, 3), (8, 2)):
            yield (f"{mixer} states BK={bk} BV={bv}", scalar._chunk_states_kernel, states,
                   dict(BT=64, BK=bk, BV=bv, HAS_DT=has_dt, HAS_FIRST=False, STORE_LAST=False, REVERSE=False,
                        DOT_PRECISION="tf32"), warps, stages)
    output = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, dt_ptr=f32, log_decay_ptr=f32, states_ptr=bf16, D_ptr=f32,
                  o_ptr=bf16, **sizes)
    for mixer, has_dt, V in (("retnet", False, 128), ("ssd", True, 64)):
        bk, bv = scalar._tiles("output", 128, V, 64, torch.bfloat16)
        for warps, stages in ((4, 2), (8, 2), (8, 3)):
            heads = scalar._heads_per_program(32 if has_dt else 1)      # SSD: 32 heads, one group
            yield (f"{mixer} output BV={bv} HEADS={heads}", scalar._chunk_output_kernel, output,
                   dict(BT=64, BK=bk, BV=bv, HEADS=heads, HAS_DT=has_dt, HAS_D=has_dt, DOT_PRECISION="tf32"),
                   warps, stages)
    grad = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, dt_ptr=f32, log_decay_ptr=f32, D_ptr=f32, states_ptr=bf16,
                dstates_ptr=bf16, do_ptr=bf16, dq_ptr=bf16, dk_ptr=bf16, dv_ptr=bf16, dl_ptr=f32, dw_ptr=f32,
                dD_ptr=f32, **sizes)
    for mixer, has_dt, V in (("retnet", False, 128), ("ssd", True, 64)):
        for warps, stages in ((4, 2), (8, 1), (8, 2)):
            yield (f"{mixer} grad", scalar._chunk_grad_kernel,
                   grad | (dict(dq_ptr=f32, dk_ptr=f32) if has_dt else {}),
                   dict(BT=64, BK=64, BV=64, HAS_DT=has_dt, HAS_D=has_dt, DECAY_GRAD=has_dt, PER_HEAD=has_dt,
                        DOT_PRECISION="tf32"), warps, stages)
    f32, bf16 = "*fp32", "*bf16"
    half = dict(DOT_PRECISION="tf32", EMULATE_BF16=False)
    # GLA: pointers aligned and T, NT multiples of 16, as the JIT sees them at the benchmark
    f32a, bf16a, T_NT = "*fp32:16", "*bf16:16", dict(T="i32:16", NT="i32:16")
    shape = dict(H=16, K=128, C=64, c=16)
    gates = dict(q=bf16a, k=bf16a, g=f32a, beta=f32a, q_dec=bf16a, k_dec=bf16a, k_sub=bf16a, decay_C=f32a, **T_NT)
    for cfg in gla._chunk_gates_kernel.configs:                                   # the autotuned choices
        yield (f"gla gates BK={cfg.kwargs['BK']}", gla._chunk_gates_kernel, gates,
               dict(shape, BK=cfg.kwargs["BK"], EMULATE_BF16=False), cfg.num_warps, cfg.num_stages)
    scores = dict(q=bf16a, beta=f32a, k_sub=bf16a, A=bf16a, T=T_NT["T"])
    for cfg in gla._chunk_scores_kernel.configs:
        yield (f"gla scores BK={cfg.kwargs['BK']}", gla._chunk_scores_kernel, scores,
               dict(shape, BK=cfg.kwargs["BK"], **half), cfg.num_warps, cfg.num_stages)
    diagonal = dict(q=bf16a, k=bf16a, g=f32a, A=bf16a, T=T_NT["T"])
    for cfg in gla._chunk_diagonal_kernel.configs:
        yield (f"gla diagonal BK={cfg.kwargs['BK']}", gla._chunk_diagonal_kernel, diagonal,
               dict(shape, BK=cfg.kwargs["BK"], EMULATE_BF16=False), cfg.num_warps, cfg.num_stages)
    states = dict(x=bf16a, y=bf16a, decay_C=f32a, h=bf16a, h0=f32a, ht=f32a, scale="fp32", **T_NT)
    yield ("gla states BV=64", gla._chunk_states_kernel, states,
           dict(H=16, K=128, V=128, C=64, BK=64, BV=64, HAS_INITIAL_STATE=False, STORE_FINAL_STATE=False,
                REVERSE=False, **half), 4, 3)
    output = dict(x=bf16a, A=bf16a, h=bf16a, y=bf16a, o=bf16a, state_scale="fp32", score_scale="fp32", **T_NT)
    yield ("gla output BV=128", gla._chunk_output_kernel, output,
           dict(H=16, K=128, V=128, C=64, BK=64, BV=128, TRANSPOSE_A=False, **half), 4, 3)
    score_grad = dict(do=bf16a, v=bf16a, dA=f32a, scale="fp32", T=T_NT["T"])
    for cfg in gla._chunk_score_grad_kernel.configs:
        yield (f"gla score_grad BV={cfg.kwargs['BV']}", gla._chunk_score_grad_kernel, score_grad,
               dict(H=16, V=128, C=64, BV=cfg.kwargs["BV"], **half), cfg.num_warps, cfg.num_stages)
    intra_grad = dict(q=bf16a, k=bf16a, g=f32a, beta=f32a, k_sub=bf16a, dA=f32a, dq_intra=f32a, dk_intra=f32a,
                      R_intra=f32a, T=T_NT["T"])
    for cfg in gla._chunk_intra_grad_kernel.configs:
        yield (f"gla intra_grad BK={cfg.kwargs['BK']}", gla._chunk_intra_grad_kernel, intra_grad,
               dict(shape, BK=cfg.kwargs["BK"], **half), cfg.num_warps, cfg.num_stages)
    grad = dict(q=bf16a, k=bf16a, v=bf16a, g=f32a, h=f32a, dh=f32a, do=bf16a, dq_intra=f32a, dk_intra=f32a,
                R_intra=f32a, dq=bf16a, dk=bf16a, dg=f32a, scale="fp32", **T_NT)
    for cfg in gla._chunk_grad_kernel.configs:
        yield (f"gla grad BK={cfg.kwargs['BK']} BV={cfg.kwargs['BV']}", gla._chunk_grad_kernel, grad,
               dict(H=16, K=128, V=128, C=64, BK=cfg.kwargs["BK"], BV=cfg.kwargs["BV"], **half), cfg.num_warps,
               cfg.num_stages)

    phase1 = {name: bf16 for name in ("r", "w", "k", "v", "a", "b")}
    phase1.update({name: f32 for name in ("A_qk", "A_qb", "U", "W", "r_dec", "k_dec", "b_dec", "g_last",
                                          "A_ak", "T_solve")}, T="i32", NT="i32")
    for warps in (2, 4):
        yield ("rwkv7 phase1", rwkv7._rwkv7_chunk_intra_kernel, phase1,
               dict(H=32, K=64, V=64, C=16, BK=16, BKW=64, BV=64, DOT_PRECISION="tf32", FOR_BACKWARD=False,
                    FACTORED_SPAN=rwkv7.FACTORED_SPAN), warps, 1)
    grad = {name: bf16 for name in ("r", "w", "k", "v", "a", "b", "do", "dr", "dw", "dk", "da", "db")}
    grad.update({name: f32 for name in ("h", "dh", "pseudo", "Y")}, T="i32", NT="i32", scale="fp32")
    for C, bk, pairs, warps in ((16, 32, 2, 4), (16, 32, 2, 8), (32, 32, 2, 8), (64, 16, 2, 8)):
        yield (f"rwkv7 grad C={C} BK={bk}", rwkv7._rwkv7_chunk_grad_kernel, grad,
               dict(H=32, K=64, V=64, C=C, BK=bk, BV=32, PAIRS=pairs, DOT_PRECISION="tf32",
                    FACTORED_SPAN=rwkv7.FACTORED_SPAN), warps, 1)


def main():
    prefix = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, kernel, signature, constexprs, warps, stages in presets():
        if name.startswith(prefix):
            usage = resource_usage(kernel, signature, constexprs, warps, stages)
            print(f"{name:<28} {warps} warps, {stages} stages: {usage}")


if __name__ == "__main__":
    main()
