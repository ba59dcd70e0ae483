"""``lecture_kit.set_value_checks``: the checks of input *values* (a log-decay ≤ 0), which cost a
device sync per call, can be switched off and on, for a block or for good; shapes are always checked."""
from __future__ import annotations

import pytest
import torch

import lecture_kit as lk


def gla_inputs(gate_sign=-1.0):
    q = torch.randn(1, 6, 2, 16)
    return q, q.clone(), q.clone(), gate_sign * torch.rand(1, 6, 2, 16)


def test_a_positive_log_decay_is_refused_by_default():
    with pytest.raises(ValueError, match="g .* must be <= 0"):
        lk.gla.chunked(*gla_inputs(+1.0))


def test_switched_off_for_a_block_then_back_on():
    with lk.set_value_checks(False):
        o, _ = lk.gla.chunked(*gla_inputs(+1.0))          # not checked: computed as given
        assert o.shape == (1, 6, 2, 16)
    with pytest.raises(ValueError):
        lk.gla.chunked(*gla_inputs(+1.0))


def test_switched_off_for_good_and_restored():
    lk.set_value_checks(False)
    try:
        lk.gla.chunked(*gla_inputs(+1.0))
    finally:
        lk.set_value_checks(True)
    with pytest.raises(ValueError):
        lk.gla.chunked(*gla_inputs(+1.0))


def test_shapes_are_checked_even_without_value_checks():
    q, k, v, g = gla_inputs()
    with lk.set_value_checks(False), pytest.raises(ValueError, match="k must have shape"):
        lk.gla.chunked(q, k[:, :, :1], v, g)


def test_the_switch_takes_a_bool():
    with pytest.raises(ValueError, match="enabled must be True or False"):
        lk.set_value_checks(0)
