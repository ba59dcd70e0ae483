"""Bad input raises ValueError naming the argument, in every public form of every mixer."""
import re

import pytest
import torch

from lecture_kit.testing import matrix_args, mixer, random_inputs

ARG_NAMES = {"ssd": ["x", "dt", "A", "B", "C"], "retnet": ["q", "k", "v", "log_gamma"],
             "gla": ["q", "k", "v", "g"], "rwkv7": ["r", "w", "k", "v", "a", "b"]}
DECAY = {"ssd": "A", "retnet": "log_gamma", "gla": "g", "rwkv7": "w"}
FORMS = ["recurrent", "parallel", "chunked", "matrix"]


def call(name, form, args, kw):
    m = mixer(name)
    if form == "matrix":
        kw = {k: v for k, v in kw.items() if k not in ("D", "initial_state")}
        return m.matrix(*matrix_args(name, args), **kw)
    return getattr(m, form)(*args, **kw)


def names_of(name, form):
    names = ARG_NAMES[name]
    return matrix_args(name, names) if form == "matrix" else names


def raises_naming(arg, fn):
    with pytest.raises(ValueError, match=rf"(?<![\w]){re.escape(arg)}(?![\w])"):
        fn()


def inputs(name):
    return random_inputs(name, batch=2, length=9, heads=2, key_dim=4, value_dim=3,
                         initial_state=True, groups=2 if name == "ssd" else None)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(ARG_NAMES))
def test_wrong_rank_size_dtype_and_device_name_the_argument(name, form):
    args, kw = inputs(name)
    arg_names = ARG_NAMES[name]
    for i, arg in enumerate(arg_names):
        if arg not in names_of(name, form):
            continue
        t = args[i]
        for bad in (t[0],                                                       # one dim too few
                    t.to(torch.int64),                                          # not floating point
                    t.to("meta"),                                               # another device
                    t.tolist()):                                                # not a tensor
            raises_naming(arg, lambda: call(name, form, args[:i] + (bad,) + args[i + 1:], kw))
        if i > 0:                                                               # disagrees with arg 0 on B (or H)
            grown = torch.cat([t, t[:1]], dim=0)
            raises_naming(arg, lambda: call(name, form, args[:i] + (grown,) + args[i + 1:], kw))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(ARG_NAMES))
def test_positive_log_decay_is_rejected(name, form):
    args, kw = inputs(name)
    i = ARG_NAMES[name].index(DECAY[name])
    bad = args[i].abs() + 0.1
    raises_naming(DECAY[name], lambda: call(name, form, args[:i] + (bad,) + args[i + 1:], kw))
    nan = args[i].clone().fill_(float("nan"))
    raises_naming(DECAY[name], lambda: call(name, form, args[:i] + (nan,) + args[i + 1:], kw))


@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunked"])
@pytest.mark.parametrize("name", list(ARG_NAMES))
def test_bad_initial_state_activation_dtype_and_length(name, form):
    args, kw = inputs(name)
    raises_naming("initial_state", lambda: call(name, form, args, {**kw, "initial_state": kw["initial_state"][..., :-1]}))
    # activations (not gates) must share one dtype: try C for SSD, k for the others
    i = ARG_NAMES[name].index("C" if name == "ssd" else "k")
    raises_naming(ARG_NAMES[name][i], lambda: call(name, form, args[:i] + (args[i].float(),) + args[i + 1:], kw))
    empty = tuple(a[:, :0] if a.dim() >= 3 else a for a in args)
    raises_naming("T", lambda: call(name, form, empty, {k: v for k, v in kw.items() if k != "initial_state"}))


@pytest.mark.parametrize("name", list(ARG_NAMES))
def test_bad_chunk_size_and_scale(name):
    args, kw = inputs(name)
    for bad in (0, -16, 2.5, "64", True):
        raises_naming("chunk_size", lambda: mixer(name).chunked(*args, **kw, chunk_size=bad))
    if name != "ssd":
        raises_naming("scale", lambda: mixer(name).recurrent(*args, **kw, scale=torch.tensor(1.0)))


def test_ssd_specific_checks():
    args, kw = inputs("ssd")
    x, dt, A, B, C = args
    m = mixer("ssd")
    three_groups = torch.cat([B, B[:, :, :1]], dim=2)
    raises_naming("G", lambda: m.recurrent(x, dt, A, three_groups, torch.cat([C, C[:, :, :1]], dim=2)))
    raises_naming("dt", lambda: m.chunked(x, -dt, A, B, C))
    raises_naming("D", lambda: m.parallel(x, dt, A, B, C, D=torch.ones(5, dtype=torch.float64)))
    raises_naming("D", lambda: m.parallel(x, dt, A, B, C, D=torch.ones(2, 3, 1, dtype=torch.float64)))
