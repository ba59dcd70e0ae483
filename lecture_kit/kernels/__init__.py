"""Triton implementations of the chunked algorithms, one file per mixer, with their autograd wiring.

``scalar_decay.py`` serves SSD and RetNet (one log-decay per head and token), ``gla.py`` gated linear
attention, ``rwkv7.py`` the generalised delta rule.  Each mixer module exposes its kernel as
``<mixer>.kernel`` with the calling convention of the other forms.  Without CUDA the same kernels run
through Triton's interpreter (``lecture_kit/__init__.py`` arranges that before Triton is imported).
"""
