"""One description of a mixer's inputs, which everything that handles them reads.

Each mixer module declares ``SPEC``, a :class:`MixerSpec`: its positional inputs in order (name,
shape in the dimension names of design.md, whether it is an *activation*, which shares the call's
dtype, or a decay, gate or parameter, which may be any float dtype, and the sign its values must
have), its tensor keywords, its state, its defaults (scale, chunk size), how its log-decay is formed
and how to draw typical inputs.  Read from it:

- validation: ``SPEC.check(form, ...)`` runs every check of every form, so the five forms accept
  the same inputs (the Triton kernel then checks only its own limits: dtypes, head and chunk sizes);
- the reference docs: ``SPEC.descriptions(form)`` is the Parameters table of ``_docs.document``;
- ``testing.random_inputs``, ``testing.matrix_args`` and ``values_of``, and the tests'
  parametrisation (``SPEC.inputs``, ``SPEC.parameters(form)``);
- the layers: ``SPEC.Inputs`` is the named tuple of a mixer's positional inputs.

Adding a mixer is writing its module, ``SPEC`` included, and naming it in ``testing.MIXERS``.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._validate import Signature

#: The five forms every mixer has.
FORMS = ("recurrent", "parallel", "chunked", "matrix", "kernel")

_FINAL_STATE = "Also return the state after the last token."


def _reflow(text: str) -> str:
    """One paragraph, wrapped to the width of a numpy docstring's descriptions."""
    text = re.sub(r"\.\s*\n\s*", ".  ", inspect.cleandoc(text))            # a sentence's end: two spaces
    return textwrap.fill(re.sub(r"\s*\n\s*", " ", text), 84,
                         break_on_hyphens=False, break_long_words=False)


@dataclass(frozen=True)
class Arg:
    """One tensor argument of a mixer.

    ``dims`` names its dimensions (``"B T H K"``), or lists alternative shapes (``"H | H P"``).
    ``activation``: it shares the dtype of the call's other activations; otherwise (decays, gates,
    parameters, states) any float dtype, e.g. fp32 beside bf16 activations.  ``sign``: a rule of
    ``_validate.VALUE_RULES`` its values must satisfy.  ``description`` is its entry in the
    Parameters section of every form; ``kernel`` a sentence that the kernel form's entry adds.
    """
    name: str
    dims: str
    description: str
    activation: bool = True
    sign: str | None = None
    kernel: str = ""

    @property
    def shapes(self) -> list[str]:
        return [s.strip() for s in self.dims.split("|")]


# ---- what several mixers declare alike ----

def kernel_note(dim: str) -> str:
    """What ``kernel`` adds to the description of a mixer's first activation, whose last dim is ``dim``."""
    return (f"``kernel`` takes float16, bfloat16 (on a GPU, compute capability 8.0 or newer) or float32, "
            f"and {dim} a power of two from 16 to 256, on CUDA or on the CPU through Triton's interpreter "
            f"(lecture_kit turns it on when no GPU is visible).")


def queries(name: str = "q", what: str = "Queries", shared_with: str = "``k`` and ``v``") -> Arg:
    """The first input of the attention-like mixers ``[B, T, H, K]``, which binds the call's dtype."""
    return Arg(name, "B T H K", f"""
        {what} ``[B, T, H, K]``, T ≥ 1 and K ≥ 1: float16, bfloat16, float32 or float64.
        {shared_with} share its dtype and every tensor its device.  B = 0 or H = 0 give empty
        results of the right shapes.""", kernel=kernel_note("K"))


KEYS = Arg("k", "B T H K", "Keys ``[B, T, H, K]``.")
VALUES = Arg("v", "B T H V", "Values ``[B, T, H, V]``; V = 0 gives empty results.",
             kernel="``kernel``: V a power of two from 16 to 256.")


def initial_state(dims: str, symbol: str) -> Arg:
    """The ``initial_state`` keyword, the state ``symbol`` with layout ``dims`` before the first token."""
    return Arg("initial_state", dims, f"""
        The state {symbol} ``[{", ".join(dims.split())}]`` before the first token, any float dtype; None
        means zeros.  Passing one call's final state continues the sequence.""", activation=False)


def scale_description(output: str, default: str) -> str:
    return (f"Multiplies every output, {output}: a finite Python (or numpy) number, not a tensor.  "
            f"{default}")


def chunk_description(last_chunk: str) -> str:
    return (f"Tokens per chunk, a positive integer (a numpy or 0-d tensor integer too); T need not be "
            f"a multiple ({last_chunk}).")


KERNEL_CHUNKS = "Tokens per chunk: 16, 32, 64 or 128.  T need not be a multiple."


class Draw:
    """Seeded random numbers for a spec's ``sample``, in float32, from one ``torch.Generator``."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(*shape).uniform_(low, high, generator=self.generator)


class Checked(NamedTuple):
    """What ``MixerSpec.check`` returns: the bound sizes (``sig.sizes``), the scale (a float, the
    default resolved; None for a mixer without one) and the chunk size (None for the forms
    without one)."""
    sig: Signature
    scale: float | None
    chunk_size: int | None


@dataclass(frozen=True)
class MixerSpec:
    """A mixer's inputs, their checks and their defaults (module docstring).

    ``inputs``: the positional inputs, in order.  ``log_decay`` names the inputs whose product is
    the log-decay of a token (the last of them is the decay argument).  ``sample(draw, size, gate)``
    draws typical inputs from ``draw`` (a :class:`Draw`) with sizes ``size`` (by dim name),
    returning (inputs, keywords) before any cast.  ``scale``: None for no scale argument,
    ``"K^-1/2"`` for a ``scale=None`` that means key_dim^(-1/2), or the float default.

    The rest default to flash-linear-attention's layout, which SSD alone leaves: ``values``, the
    input that ``matrix`` leaves out (output = matrix @ values); ``keywords``, the tensor keywords,
    ``initial_state`` last (its dims are the state's); ``key_dim`` and ``value_dim``, the state's
    two sizes (K and V; N and P for SSD), ``key_dim`` at least 1; the chunk sizes of ``chunked``
    and ``kernel``.  ``constraint`` checks what dims alone cannot (SSD: G divides H);
    ``kernel_names`` are the words of the Triton kernel that ``kernel`` runs, translated into this
    mixer's (``Signature(names=...)``).
    """
    name: str
    title: str
    inputs: tuple[Arg, ...]
    log_decay: tuple[str, ...]
    sample: Callable
    scale: None | str | float
    scale_description: str
    chunk_description: str
    values: str = "v"
    keywords: tuple[Arg, ...] = (initial_state("B H K V", "S_0"),)
    key_dim: str = "K"
    value_dim: str = "V"
    chunk_size: int = 64
    kernel_chunk_size: int = 64
    kernel_chunk_description: str = KERNEL_CHUNKS
    constraint: Callable[[Signature], None] | None = None
    kernel_names: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        inputs = namedtuple(f"{self.title.replace('-', '')}Inputs", [a.name for a in self.inputs])
        inputs.__doc__ = (f"The positional inputs of lecture_kit.{self.name}'s forms: "
                          + ", ".join(f"{a.name} [{a.dims}]" for a in self.inputs) + ".")
        object.__setattr__(self, "Inputs", inputs)

    # ---- names ----

    @property
    def state(self) -> Arg:
        """The ``initial_state`` argument; its dims are the state's layout."""
        return self.keywords[-1]

    @property
    def decay(self) -> str:
        """The argument that holds the decay (A for SSD, whose log-decay is Δ·A)."""
        return self.log_decay[-1]

    def arg(self, name: str) -> Arg:
        return next(a for a in self.inputs + self.keywords if a.name == name)

    def positional(self, form: str) -> tuple[Arg, ...]:
        """The positional inputs of ``form``: ``matrix`` takes all but the values."""
        return tuple(a for a in self.inputs if form != "matrix" or a.name != self.values)

    def values_of(self, inputs) -> torch.Tensor:
        """The input that ``matrix`` multiplies (x for SSD, v for the others), from the positional
        inputs ``inputs``, in order."""
        return inputs[[a.name for a in self.inputs].index(self.values)]

    def matrix_args(self, inputs) -> tuple:
        """The positional arguments of ``matrix``: ``inputs`` without the values."""
        i = [a.name for a in self.inputs].index(self.values)
        return tuple(inputs[:i]) + tuple(inputs[i + 1:])

    def parameters(self, form: str) -> list[str]:
        """Every parameter of ``form``, in its signature's order."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        names = [a.name for a in self.positional(form)]
        if form != "matrix":
            names += [a.name for a in self.keywords[:-1]]
        if self.scale is not None:
            names.append("scale")
        if form != "matrix":
            names += ["initial_state", "output_final_state"]
        if form in ("chunked", "kernel"):
            names.append("chunk_size")
        return names

    def defaults(self, form: str) -> dict[str, object]:
        """The default of every keyword parameter of ``form``."""
        defaults = {a.name: None for a in self.keywords}
        defaults.update(scale=None if self.scale == "K^-1/2" else self.scale, output_final_state=False,
                        chunk_size=self.kernel_chunk_size if form == "kernel" else self.chunk_size)
        return {n: defaults[n] for n in self.parameters(form) if n in defaults}

    def descriptions(self, form: str) -> dict[str, str]:
        """The Parameters table of ``form`` (``_docs.document``): one description per argument,
        the kernel's limits added for ``kernel``."""
        table = {a.name: a.description + (f"  {a.kernel}" if form == "kernel" and a.kernel else "")
                 for a in self.inputs + self.keywords}
        chunk = self.kernel_chunk_description if form == "kernel" else self.chunk_description
        table.update(scale=self.scale_description, output_final_state=_FINAL_STATE, chunk_size=chunk)
        return {n: _reflow(table[n]) for n in self.parameters(form)}

    # ---- validation ----

    def check(self, form: str, *inputs, **keywords) -> Checked:
        """Check a call of ``form`` with its positional ``inputs`` and every keyword argument (each
        form passes all of its own): types, shapes, dtypes and devices first, in the order of the
        signature, so a wrong first argument is reported before anything is computed; then scale,
        chunk size and flags; the sign of the decays last (one device sync, or none when value
        checks are off).  Raises ``ValueError`` naming the argument."""
        expected = self.parameters(form)
        given = [a.name for a in self.positional(form)][:len(inputs)] + list(keywords)
        if sorted(given) != sorted(expected):
            raise TypeError(f"{self.name}.{form}: the check got {given}, the form takes {expected}")
        sig = Signature(f"{self.name}.{form}", self.kernel_names if form == "kernel" else None)
        bound = list(zip(self.positional(form), inputs))
        bound += [(a, keywords[a.name]) for a in self.keywords if keywords.get(a.name) is not None]
        for arg, t in bound:
            if len(arg.shapes) > 1:
                sig.one_of(arg.name, t, *arg.shapes)
            else:
                sig.tensor(arg.name, t, arg.dims, same_dtype=arg.activation)
        sig.at_least_one("T")
        sig.at_least_one(self.key_dim)
        if self.constraint is not None:
            self.constraint(sig)
        scale = None
        if self.scale is not None:
            given_scale = keywords["scale"]
            scale = sig.sizes[self.key_dim] ** -0.5 if given_scale is None and self.scale == "K^-1/2" \
                else sig.scalar("scale", given_scale)
        chunk_size = sig.chunk_size(keywords["chunk_size"]) if "chunk_size" in keywords else None
        if "output_final_state" in keywords:
            sig.flag("output_final_state", keywords["output_final_state"])
        sig.values([(arg.name, t, arg.sign) for arg, t in bound if arg.sign])
        return Checked(sig, scale, chunk_size)
