"""lecture_kit reads the machine once (lecture_kit/hardware.py): CUDA or Triton's CPU interpreter, the
dtype by compute capability, and a warning when an NVIDIA driver is there but PyTorch cannot use it."""
import os
import re
import stat
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import lecture_kit
from lecture_kit import hardware
from lecture_kit.testing import MIXERS, mixer, random_inputs


def run_without_cuda(code, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""                       # hide any GPU, as on a laptop or in CI
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_the_real_triton_kernels_run_through_the_interpreter():
    done = run_without_cuda("""
        import os, sys
        import lecture_kit
        assert not lecture_kit.HAS_CUDA and lecture_kit.DEVICE.type == "cpu" and lecture_kit.HAS_TRITON
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


# ---------------------------------------------------------------------------------------------------
# the dtype by compute capability (simulated: the GPU is whatever torch.cuda says it is)

def pretend_gpu(monkeypatch, capability, name="NVIDIA Tesla T4"):
    """Make torch.cuda report a GPU of ``capability`` called ``name``, whatever this machine has."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability, expected", [((6, 1), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16), ((10, 0), torch.bfloat16)])
def test_fast_dtype_is_bf16_from_compute_capability_8_and_fp16_below(monkeypatch, capability, expected):
    pretend_gpu(monkeypatch, capability)
    assert lecture_kit.capability("cuda") == capability
    assert lecture_kit.fast_dtype("cuda") == expected
    assert lecture_kit.fast_dtype("cpu") == torch.float32 and lecture_kit.capability("cpu") is None


def test_fast_dtype_of_this_machine():
    expected = lecture_kit.fast_dtype("cuda") if lecture_kit.HAS_CUDA else torch.float32
    assert lecture_kit.fast_dtype() == expected


def test_bf16_is_refused_below_compute_capability_8_and_the_error_says_what_runs(monkeypatch):
    pretend_gpu(monkeypatch, (7, 5))
    on_gpu = lambda dtype: SimpleNamespace(dtype=dtype, device=torch.device("cuda"))  # noqa: E731
    with pytest.raises(ValueError, match=r"gla_chunked: q is bfloat16.*Tesla T4, is 7\.5.*float16 or float32"):
        hardware.check_kernel_dtype("gla_chunked", "q", on_gpu(torch.bfloat16))
    for dtype in (torch.float16, torch.float32):
        hardware.check_kernel_dtype("gla_chunked", "q", on_gpu(dtype))
    hardware.check_kernel_dtype("gla_chunked", "q", torch.zeros(1, dtype=torch.bfloat16))   # a CPU tensor
    pretend_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    hardware.check_kernel_dtype("gla_chunked", "q", on_gpu(torch.bfloat16))


@pytest.mark.skipif(not lecture_kit.HAS_TRITON, reason="the kernel forms need Triton")
@pytest.mark.parametrize("name", MIXERS)
def test_every_kernel_refuses_bf16_on_a_gpu_below_8_before_launching(monkeypatch, name):
    """Every kernel entry point asks: with this device made to look like a T4, bf16 is refused with a
    ValueError (before any Triton launch) and fp16 runs."""
    monkeypatch.setattr(hardware, "capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Tesla T4")
    m = mixer(name)
    args, kw = random_inputs(name, batch=1, length=5, heads=2, key_dim=16, value_dim=16,
                             dtype=torch.bfloat16, seed=0, device=lecture_kit.DEVICE)
    with pytest.raises(ValueError, match="bfloat16.*compute capability 8.0"):
        m.kernel(*args, **kw)
    args, kw = random_inputs(name, batch=1, length=5, heads=2, key_dim=16, value_dim=16,
                             dtype=torch.float16, seed=0, device=lecture_kit.DEVICE)
    out, _ = m.kernel(*args, **kw)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# an NVIDIA driver that PyTorch cannot use

BANNER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
+-----------------------------------------------------------------------------------------+
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` first on PATH that prints a driver 535 banner (newest CUDA 12.2)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{BANNER}EOF\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return smi


def test_the_driver_versions_are_read_from_nvidia_smi(fake_nvidia_smi):
    assert hardware.nvidia_driver() == hardware.Driver("535.104.05", "12.2")


@pytest.mark.parametrize("torch_cuda, says", [
    ("13.0", "built for CUDA 13.0, newer than the driver supports.*update the NVIDIA driver"),
    (None, "is a CPU-only build.*install PyTorch's CUDA build"),
    ("12.1", r"built for CUDA 12\.1\), could not initialise it")])
def test_a_driver_that_pytorch_cannot_use_is_explained(monkeypatch, fake_nvidia_smi, torch_cuda, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    message = hardware.unused_gpu_message()
    assert message is not None
    assert "driver is installed (version 535.104.05, for CUDA up to 12.2)" in message
    assert "runs on the CPU instead" in message
    assert re.search(says, message), message


def test_no_warning_without_a_driver_with_a_usable_gpu_or_with_the_gpus_hidden(monkeypatch, fake_nvidia_smi):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.unused_gpu_message() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware.unused_gpu_message() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(hardware, "nvidia_driver", lambda: None)
    assert hardware.unused_gpu_message() is None


def test_importing_lecture_kit_warns_once_when_the_driver_is_unused(fake_nvidia_smi):
    done = subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: False            # as with a driver too old for this PyTorch
        import lecture_kit, lecture_kit.gla
        assert lecture_kit.DEVICE.type == "cpu"
    """)], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("RuntimeWarning: lecture_kit: an NVIDIA driver is installed") == 1, done.stderr
    assert "PyTorch cannot use it" in done.stderr


# ---------------------------------------------------------------------------------------------------
# what the kernel forms say where Triton is missing (tests/test_without_triton.py hides it for real)

def test_the_missing_triton_message_says_why_for_this_platform(monkeypatch):
    for system, machine in (("Darwin", "arm64"), ("Windows", "AMD64")):
        monkeypatch.setattr(hardware.platform, "system", lambda: system)
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        message = hardware.triton_missing_message()
        assert f"not for this machine ({system} {machine})" in message and "use chunked" in message
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    assert "cannot be imported: pip install triton" in hardware.triton_missing_message()
