"""Every input of every form of every mixer is computed right or refused with a ValueError naming it.

Parametrised from each mixer's ``SPEC`` (lecture_kit/_spec.py): its arguments, their shapes, which
are decays and their signs, its defaults.  ``kernel`` is one of the forms where Triton can be imported
(tests/test_without_triton.py covers the rest): on a CPU it runs through Triton's interpreter, so the
inputs are tiny (T = 9, K = V = 16) and fp32, and most calls here are refused before any launch.  Classes of input covered: wrong type, rank, size, dtype and device of each
tensor; a non-tensor first argument with everything after it wrong too; decays of the wrong sign,
NaN or inf (and the same accepted when value checks are off); chunk sizes of every integer type and
of none; scale (finite numbers only, never a tensor); output_final_state; empty batches, no heads and
no value channels (computed, empty); T = 0 and K = 0 (refused); gates and states in another float
dtype than the activations (accepted by every form); and SSD's groups and skip weight.
"""
import inspect
import math
import re

import numpy as np
import pytest
import torch

from lecture_kit._spec import FORMS
from lecture_kit._validate import set_value_checks
from lecture_kit.hardware import HAS_TRITON
from lecture_kit.testing import MIXERS, assert_close, matrix_args, mixer, random_inputs, spec, to_reference

#: The forms to test here: all five, or all but ``kernel`` where Triton cannot be imported.
FORMS_HERE = [f for f in FORMS if HAS_TRITON or f != "kernel"]
SIZES = dict(length=9, heads=2, key_dim=16, value_dim=16)


def inputs(name, *, batch=2, dtype=torch.float32, **sizes):
    """Small valid inputs, with an initial state (and SSD with two groups of B and C)."""
    return random_inputs(name, batch=batch, dtype=dtype, initial_state=True,
                         groups=2 if name == "ssd" and sizes.get("heads", 2) else None,
                         **{**SIZES, **sizes})


def call(name, form, args, kw, **options):
    """``form`` of mixer ``name`` on (args, kw), with the keywords it does not take dropped."""
    params = spec(name).parameters(form)
    kw = {k: v for k, v in {**kw, **options}.items() if k in params}
    if form == "matrix":
        return mixer(name).matrix(*matrix_args(name, args), **kw)
    return getattr(mixer(name), form)(*args, **kw)


def raises_naming(arg, fn):
    """``fn()`` raises a ValueError whose message, after the function's name, is about ``arg``."""
    with pytest.raises(ValueError, match=rf"^\w+\.?\w*: (the number of groups )?{re.escape(arg)}(?![\w])"):
        fn()


def tensor_args(name, form):
    """The tensor arguments ``form`` takes: (name, index among the positional inputs or None)."""
    s = spec(name)
    positional = [(a.name, i) for i, a in enumerate(s.inputs) if a in s.positional(form)]
    return positional + ([(a.name, None) for a in s.keywords] if form != "matrix" else [])


def replaced(args, kw, arg, index, value):
    """(args, kw) with the tensor argument ``arg`` replaced by ``value``."""
    if index is None:
        return args, {**kw, arg: value}
    return args[:index] + (value,) + args[index + 1:], kw


def cases(rows):
    """pytest parameters from rows (mixer, form, ...), with ids from the rows."""
    return [pytest.param(*row, id="-".join(str(x).removeprefix("torch.") for x in row if x is not None))
            for row in rows]


CASES = cases((n, f) for n in MIXERS for f in FORMS_HERE)
ARG_CASES = cases((n, f, a, i) for n in MIXERS for f in FORMS_HERE for a, i in tensor_args(n, f))


@pytest.mark.parametrize("name,form", CASES)
def test_the_signature_is_the_specs(name, form):
    """Each form's parameters, their order, kinds and defaults are the spec's."""
    s, fn = spec(name), getattr(mixer(name), form)
    params = inspect.signature(fn).parameters
    assert list(params) == s.parameters(form)
    positional = [a.name for a in s.positional(form)]
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    assert {n: p.default for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == s.defaults(form)


@pytest.mark.parametrize("name,form,arg,index", ARG_CASES)
def test_wrong_type_rank_dtype_size_and_device_name_the_argument(name, form, arg, index):
    args, kw = inputs(name)
    t = args[index] if index is not None else kw[arg]
    bad_values = [t[0], t.to(torch.int64), t.to(torch.complex64), t.tolist()]
    if arg != spec(name).positional(form)[0].name:     # (the first one binds the sizes and the device)
        bad_values += [torch.cat([t, t[:1]], dim=0), t.to("meta")]     # disagrees on its first dim
    for bad in bad_values:
        bad_args, bad_kw = replaced(args, kw, arg, index, bad)
        raises_naming(arg, lambda: call(name, form, bad_args, bad_kw))


@pytest.mark.parametrize("name,form", CASES)
def test_a_non_tensor_first_argument_is_named_before_anything_else(name, form):
    """Every other argument is wrong too (None): the first one is the one reported, so nothing ran
    before it was checked (retnet.kernel used to read ``q.shape`` first)."""
    args, kw = inputs(name)
    first = spec(name).positional(form)[0].name
    raises_naming(first, lambda: call(name, form, ([1.0, 2.0],) + (None,) * (len(args) - 1), kw))


@pytest.mark.parametrize("name,form,arg", cases((n, f, a.name) for n in MIXERS for f in FORMS_HERE
                                                 for a in spec(n).inputs if a.sign))
def test_decays_of_the_wrong_sign_nan_or_inf_are_refused_unless_value_checks_are_off(name, form, arg):
    args, kw = inputs(name)
    i = [a.name for a in spec(name).inputs].index(arg)
    rule = spec(name).arg(arg).sign
    wrong = {"<= 0": [args[i].abs() + 0.1, torch.full_like(args[i], math.inf)],
             "< 0": [torch.zeros_like(args[i]), args[i].abs()],
             ">= 0": [-args[i], torch.full_like(args[i], math.inf)]}[rule]
    wrong.append(args[i].clone().fill_(math.nan))
    for bad in wrong:
        raises_naming(arg, lambda: call(name, form, args[:i] + (bad,) + args[i + 1:], kw))
    with set_value_checks(False):                                   # not checked: computed, whatever it gives
        call(name, form, args[:i] + (wrong[0],) + args[i + 1:], kw)


def test_set_value_checks_takes_a_bool():
    with pytest.raises(ValueError, match="enabled"):
        set_value_checks(1)


@pytest.mark.parametrize("name,form", cases((n, f) for n in MIXERS for f in FORMS_HERE if f in ("chunked", "kernel")))
def test_chunk_sizes_of_any_integer_type_and_nothing_else(name, form):
    args, kw = inputs(name)
    for bad in (0, -16, 2.5, 16.0, "16", True, np.bool_(True), torch.tensor(16.0), torch.tensor([16]),
                torch.tensor(True), None):
        raises_naming("chunk_size", lambda: call(name, form, args, kw, chunk_size=bad))
    o, S = call(name, form, args, kw, chunk_size=16, output_final_state=True)
    for same in (np.int64(16), np.int32(16), torch.tensor(16), torch.tensor(16, dtype=torch.int32)):
        o2, S2 = call(name, form, args, kw, chunk_size=same, output_final_state=True)
        assert torch.equal(o, o2) and torch.equal(S, S2)
    if form == "kernel":                                            # and the kernel's own sizes
        raises_naming("chunk_size", lambda: call(name, form, args, kw, chunk_size=48))
        if name == "rwkv7":                                         # chunk_size · K ≤ 4096
            wide, wide_kw = inputs(name, batch=1, heads=1, key_dim=128)
            raises_naming("chunk_size", lambda: call(name, form, wide, wide_kw, chunk_size=64))


@pytest.mark.parametrize("name,form", cases((n, f) for n in MIXERS if spec(n).scale is not None for f in FORMS_HERE))
def test_scale_is_a_finite_number_never_a_tensor(name, form):
    """rwkv7.kernel used to take a tensor scale and drop its gradient; NaN and inf scales ran."""
    args, kw = inputs(name)
    bad_scales = [math.nan, math.inf, -math.inf, np.float64(math.nan), torch.tensor(0.5),
                  torch.tensor(0.5, requires_grad=True), "0.5", True]
    if spec(name).scale != "K^-1/2":
        bad_scales.append(None)                                     # None means K^-1/2 only where it says so
    for bad in bad_scales:
        raises_naming("scale", lambda: call(name, form, args, kw, scale=bad))
    reference = call(name, form, args, kw, scale=0.5)
    reference = reference[0] if isinstance(reference, tuple) else reference
    for same in (np.float32(0.5), np.float64(0.5)):
        got = call(name, form, args, kw, scale=same)
        assert torch.equal(got[0] if isinstance(got, tuple) else got, reference)
    if spec(name).scale == "K^-1/2":                                # the default is K^-1/2
        default, explicit = call(name, form, args, kw, scale=None), call(name, form, args, kw, scale=16 ** -0.5)
        assert torch.equal(default[0] if isinstance(default, tuple) else default,
                           explicit[0] if isinstance(explicit, tuple) else explicit)


@pytest.mark.parametrize("name,form", cases((n, f) for n in MIXERS for f in FORMS_HERE if f != "matrix"))
def test_output_final_state_is_a_bool(name, form):
    args, kw = inputs(name)
    for bad in ("yes", 1, None):
        raises_naming("output_final_state", lambda: call(name, form, args, kw, output_final_state=bad))
    assert call(name, form, args, kw, output_final_state=np.True_)[1] is not None


@pytest.mark.parametrize("empty", ["batch", "heads", "value_dim"])
@pytest.mark.parametrize("name,form", CASES)
def test_an_empty_batch_no_heads_or_no_value_channels_give_empty_results(name, form, empty):
    """B = 0, H = 0 or V = 0: nothing to compute, and results of the right shapes, as torch gives."""
    args, kw = inputs(name, **{empty: 0})
    s = spec(name)
    size = {"B": 2, "T": 9, "H": 2, s.key_dim: 16, s.value_dim: 16}
    size[{"batch": "B", "heads": "H", "value_dim": s.value_dim}[empty]] = 0
    out = call(name, form, args, kw, output_final_state=True)
    if form == "matrix":
        assert out.shape == (size["B"], size["H"], 9, 9)
        return
    o, S = out
    assert o.shape == (size["B"], 9, size["H"], size[s.value_dim]) and o.dtype == torch.float32
    assert S.shape == tuple(size[d] for d in s.state.dims.split()) and S.dtype == torch.float32


@pytest.mark.parametrize("name,form", CASES)
def test_no_tokens_or_no_key_channels_are_refused(name, form):
    args, kw = inputs(name)
    empty_T = tuple(a[:, :0] if "T" in spec(name).inputs[i].dims.split() else a for i, a in enumerate(args))
    raises_naming("T", lambda: call(name, form, empty_T, {k: v for k, v in kw.items() if k != "initial_state"}))
    no_keys, kw0 = inputs(name, key_dim=0)
    raises_naming(spec(name).key_dim, lambda: call(name, form, no_keys, kw0))


@pytest.mark.parametrize("name,form,arg,index,dtype", cases(
    (n, f, a, i, dtype) for n in MIXERS for f in FORMS_HERE for a, i in tensor_args(n, f)
    if not spec(n).arg(a).activation for dtype in (torch.float64, torch.bfloat16)))
def test_gates_parameters_and_states_in_any_float_dtype(name, form, arg, index, dtype):
    """Decays, gates, parameters and states may have any float dtype beside fp32 activations, in every
    form (rwkv7.kernel used to refuse a bf16 w and an fp64 initial state); the result is that of the
    fp64 recurrence on the same rounded inputs."""
    args, kw = inputs(name)
    t = args[index] if index is not None else kw[arg]
    args, kw = replaced(args, kw, arg, index, t.to(dtype))
    out = call(name, form, args, kw, output_final_state=True)
    ref_args, ref_kw = to_reference(args), to_reference(kw)
    if form == "matrix":
        ref = mixer(name).matrix(*matrix_args(name, ref_args))
        assert out.dtype == torch.float32
        assert_close("matrix", out, ref, "fp32")
        return
    ref = mixer(name).recurrent(*ref_args, **ref_kw, output_final_state=True)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_close("output", out[0], ref[0], "fp32")
    assert_close("final state", out[1], ref[1], "fp32")


@pytest.mark.parametrize("name,form", cases(("ssd", f) for f in FORMS_HERE))
def test_ssd_groups_and_skip_weight(name, form):
    args, kw = inputs("ssd")
    x, dt, A, B, C = args
    three = lambda t: torch.cat([t, t[:, :, :1]], dim=2)           # noqa: E731  G = 3 for H = 2
    raises_naming("G", lambda: call("ssd", form, (x, dt, A, three(B), three(C)), kw))
    if form != "matrix":
        raises_naming("D", lambda: call("ssd", form, args, {**kw, "D": torch.ones(5)}))
        raises_naming("D", lambda: call("ssd", form, args, {**kw, "D": torch.ones(2, 16, 1)}))


@pytest.mark.parametrize("name,form", CASES)
def test_float64_and_odd_head_sizes_are_the_kernels_limits_alone(name, form):
    """The PyTorch forms compute float64 inputs and head sizes that are not powers of two; the kernel
    refuses them, in the caller's words (ssd.kernel speaks of x, N and P, not of the shared kernel's
    v, K and V)."""
    s = spec(name)
    for sizes, dtype, says in (({}, torch.float64, f"{s.inputs[0].name} has dtype torch.float64"),
                               ({"key_dim": 12}, torch.float32, f"{s.key_dim} = 12"),
                               ({"value_dim": 12}, torch.float32, f"{s.value_dim} = 12")):
        args, kw = inputs(name, dtype=dtype, **sizes)
        if form == "kernel":
            with pytest.raises(ValueError, match=rf"^{name}\.kernel: {re.escape(says)}\b"):
                call(name, form, args, kw)
        else:
            call(name, form, args, kw)
