"""lecture_kit picks the device once: CUDA when present, otherwise Triton's CPU interpreter."""
import os
import subprocess
import sys
import textwrap

import lecture_kit


def run_without_cuda(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""                       # hide any GPU, as on a laptop or in CI
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_the_real_triton_kernels_run_through_the_interpreter():
    done = run_without_cuda("""
        import os, sys
        import lecture_kit
        assert not lecture_kit.HAS_CUDA and lecture_kit.DEVICE.type == "cpu"
        assert os.environ["TRITON_INTERPRET"] == "1" and lecture_kit.TRITON_INTERPRETED
        import torch, triton, triton.language as tl

        @triton.jit
        def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

        x = torch.arange(5.0)
        y = torch.zeros(5)
        double[(1,)](x, y, 5, BLOCK=8)                     # CPU tensors: only the interpreter can do this
        assert torch.equal(y, 2 * x), y
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_by_device_picks_the_size_for_this_machine():
    expected = "gpu" if lecture_kit.HAS_CUDA else "cpu"
    assert lecture_kit.by_device(gpu="gpu", cpu="cpu") == expected
    if not lecture_kit.HAS_CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"
