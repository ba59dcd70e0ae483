"""Every mixer's Triton ``kernel`` under ``torch.compile(fullgraph=True)``.

Under compilation the kernels run as registered operators (``lecture_kit/kernels/_compile.py``), so a
function that calls them compiles into one graph, with no graph break; the operators run the same
kernels in the same order as an eager call, so outputs, final states and gradients are equal bit for
bit.  On a machine without CUDA the kernels run through Triton's interpreter, as everywhere in CI.
"""
from __future__ import annotations

import pytest
import torch

import lecture_kit
from lecture_kit.testing import MIXERS, mixer, random_inputs

pytestmark = pytest.mark.skipif(not lecture_kit.HAS_TRITON, reason="Triton cannot be imported")


@pytest.mark.parametrize("name", MIXERS)
def test_kernel_compiles_with_fullgraph_and_matches_eager(name):
    args, kw = random_inputs(name, batch=1, length=37, heads=2, key_dim=16, value_dim=16,
                             dtype=torch.float32, initial_state=True, seed=3,
                             device=lecture_kit.DEVICE)
    kw = {**kw, "chunk_size": 16}
    leaves = [t.clone().requires_grad_() for t in (*args, kw.pop("initial_state"))]
    kernel = mixer(name).kernel

    def run(*tensors):
        o, state = kernel(*tensors[:-1], initial_state=tensors[-1], output_final_state=True, **kw)
        return o.square().sum() + state.sum(), o, state

    loss_eager, *eager = run(*leaves)
    loss_compiled, *compiled = torch.compile(run, fullgraph=True)(*leaves)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    grads_eager = torch.autograd.grad(loss_eager, leaves)
    grads_compiled = torch.autograd.grad(loss_compiled, leaves)
    for i, (got, want) in enumerate(zip(grads_compiled, grads_eager)):
        assert torch.equal(got, want), f"gradient of input {i}"
