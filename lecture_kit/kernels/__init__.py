"""Triton implementations of the chunked algorithms, one file per mixer, with their autograd wiring.

``scalar_decay.py`` serves SSD and RetNet (one log-decay per head and token), ``gla.py`` gated linear
attention, ``rwkv7.py`` the generalised delta rule.  Each mixer module exposes its kernel as
``<mixer>.kernel`` with the calling convention of the other forms.  Without CUDA the same kernels run
through Triton's interpreter (``lecture_kit/hardware.py`` arranges that before Triton is imported).

Where Triton cannot be imported (it has wheels only for Linux on x86_64 and aarch64), importing this
package, and so calling any ``kernel`` form, raises ``ModuleNotFoundError`` with a message that says
why and points to ``chunked``, instead of a bare "No module named 'triton'" from deep inside a kernel.
"""
from ..hardware import HAS_TRITON, triton_missing_message

if not HAS_TRITON:
    raise ModuleNotFoundError(triton_missing_message(), name="triton")
