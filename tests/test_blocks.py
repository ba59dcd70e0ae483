"""The Mamba-2 block and the tiny LM: shapes, the parametrisation of math.md §1.1, token-by-token
inference equal to the parallel forward pass, gradients, argument checking, and the hidden attention
being exactly the matrix the block's mixer multiplies by."""
import re

import pytest
import torch
import torch.nn.functional as F

from lecture_kit.blocks import GatedRMSNorm, Mamba2Block, Mamba2Cache, TinyMamba2LM, seeded
from lecture_kit.testing import TOLERANCE, errors

D_MODEL = 16
SMALL = dict(d_state=8, headdim=8, chunk_size=8)        # E = 32, H = 4


def block(dtype=torch.float64, **options):
    return seeded(Mamba2Block, D_MODEL, seed=0, **{**SMALL, **options}).to(dtype)


def inputs(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def raises_naming(arg, fn):
    with pytest.raises(ValueError, match=rf"(?<![\w.]){re.escape(arg)}(?![\w])"):
        fn()


def test_shapes_of_forward_prefill_step_and_hidden_attention():
    m = block(ngroups=2)
    assert (m.d_inner, m.nheads, m.conv_dim) == (32, 4, 32 + 2 * 2 * 8)
    u = inputs(3, 11, D_MODEL)
    assert m(u).shape == (3, 11, D_MODEL)
    y, cache = m.prefill(u)
    assert y.shape == (3, 11, D_MODEL) and isinstance(cache, Mamba2Cache)
    assert cache.conv_state.shape == (3, m.conv_dim, 3) and cache.ssm_state.shape == (3, 4, 8, 8)
    y_t, cache = m.step(u[:, 0], cache)
    assert y_t.shape == (3, D_MODEL)
    assert m.hidden_attention(u).shape == (3, 4, 11, 11)


def test_initialisation_follows_mamba2():
    m = seeded(Mamba2Block, 64, seed=3, d_state=16, headdim=4)           # H = 32 heads to look at
    A = -torch.exp(m.A_log)
    dt_at_zero_input = F.softplus(m.dt_bias)
    assert ((A <= -1) & (A >= -16)).all()
    assert ((dt_at_zero_input >= 1e-3 * (1 - 1e-6)) & (dt_at_zero_input <= 1e-1 * (1 + 1e-6))).all()
    assert torch.equal(m.D.detach(), torch.ones(32)) and torch.equal(m.norm.weight.detach(), torch.ones(128))


def test_seeded_is_reproducible_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = block(), block()
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("prompt", [0, 2, 13], ids=["no-prompt", "prompt<d_conv", "prompt"])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_prefill_then_steps_equals_forward(dtype, bound, prompt, ngroups):
    m = block(dtype, ngroups=ngroups)
    u = inputs(2, 21, D_MODEL, dtype=dtype)
    with torch.no_grad():
        full = m(u)
        outputs, cache = [], None
        if prompt:
            y, cache = m.prefill(u[:, :prompt])
            outputs.append(y)
        for t in range(prompt, u.shape[1]):
            y_t, cache = m.step(u[:, t], cache if cache is None else tuple(cache))   # any (conv, ssm) pair
            outputs.append(y_t[:, None])
    e = errors(torch.cat(outputs, dim=1), full)
    assert e.rel_rms <= bound and e.max_abs <= bound, e


def test_the_block_is_causal():
    m = block()
    u = inputs(1, 20, D_MODEL)
    changed = u.clone()
    changed[:, 12:] += 1.0
    with torch.no_grad():
        assert torch.equal(m(u)[:, :12], m(changed)[:, :12])
        assert not torch.allclose(m(u)[:, 12:], m(changed)[:, 12:])


def assert_every_parameter_has_a_gradient(model):
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_reach_every_parameter_of_the_block():
    m = block(torch.float32, ngroups=2)
    m(inputs(2, 19, D_MODEL, dtype=torch.float32)).square().mean().backward()
    assert_every_parameter_has_a_gradient(m)


def test_gradients_reach_every_parameter_of_the_lm():
    lm = seeded(TinyMamba2LM, 11, D_MODEL, 2, seed=0, **SMALL)
    tokens = torch.randint(11, (2, 19), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(lm(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert_every_parameter_has_a_gradient(lm)


def test_hidden_attention_is_the_matrix_the_inner_mixer_multiplies_by():
    """y_ssd = M x + D x, with (x, y_ssd) read off the mixer inside the real forward pass."""
    m = block(ngroups=2)
    u = inputs(2, 23, D_MODEL)
    seen = {}
    hook = m.mixer.register_forward_hook(lambda mod, args, kwargs, out: seen.update(args=args, kwargs=kwargs, y=out[0]),
                                         with_kwargs=True)
    with torch.no_grad():
        m(u)
        M = m.hidden_attention(u)
    hook.remove()
    x = seen["args"][0]
    D = seen["kwargs"]["D"]
    reproduced = torch.einsum("bhij,bjhp->bihp", M, x) + D[:, None] * x
    assert errors(reproduced, seen["y"]).within(TOLERANCE["fp64"])


def test_lm_hidden_attention_is_one_matrix_per_layer_and_matches_each_mixer():
    lm = seeded(TinyMamba2LM, 10, D_MODEL, 3, seed=2, **SMALL)
    tokens = torch.randint(10, (2, 17), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [b.mixer.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args[0], kwargs["D"], out[0])),
                                           with_kwargs=True) for b in lm.blocks]
    with torch.no_grad():
        logits = lm(tokens)
        maps = lm.hidden_attention(tokens)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 17, 10) and len(maps) == 3 and all(M.shape == (2, 4, 17, 17) for M in maps)
    for M, (x, D, y) in zip(maps, seen[:3]):                        # seen[3:] are hidden_attention's own passes
        assert errors(torch.einsum("bhij,bjhp->bihp", M, x) + D[:, None] * x, y).rel_rms < 1e-5


def test_tied_and_untied_heads():
    tied = seeded(TinyMamba2LM, 10, D_MODEL, 1, seed=0, **SMALL)
    untied = seeded(TinyMamba2LM, 10, D_MODEL, 1, seed=0, tie_embeddings=False, **SMALL)
    assert tied.head.weight is tied.embedding.weight
    assert untied.head.weight is not untied.embedding.weight
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + 10 * D_MODEL


def test_gated_rmsnorm_normalises_each_group_after_the_gate():
    norm = GatedRMSNorm(12, group_size=4, eps=0.0).double()
    y, z = inputs(5, 12), inputs(5, 12, seed=2)
    out = norm(y, z).unflatten(-1, (3, 4))
    assert torch.allclose(out.square().mean(-1), torch.ones(5, 3, dtype=torch.float64))
    gated = (y * F.silu(z)).unflatten(-1, (3, 4))
    assert torch.allclose(out, gated / gated.norm(dim=-1, keepdim=True) * 2)   # RMS = norm / √4


def test_bad_input_names_the_argument():
    m = block()
    u = inputs(2, 5, D_MODEL)
    for bad in (u[0], u[..., :-1], u.float(), u.long(), u.tolist(), u[:, :0]):
        for method in (m.forward, m.prefill, m.hidden_attention):
            raises_naming("u", lambda: method(bad))
    for bad in (u, u[:, 0, :-1], u[:, 0].float()):
        raises_naming("u_t", lambda: m.step(bad))
    _, cache = m.prefill(u)
    raises_naming("cache", lambda: m.step(u[:, 0], cache.ssm_state))
    raises_naming("cache.conv_state", lambda: m.step(u[:, 0], Mamba2Cache(cache.conv_state[..., 1:], cache.ssm_state)))
    raises_naming("cache.ssm_state", lambda: m.step(u[:, 0], Mamba2Cache(cache.conv_state, cache.ssm_state[:1])))
    raises_naming("headdim", lambda: Mamba2Block(D_MODEL, headdim=5))
    raises_naming("ngroups", lambda: Mamba2Block(D_MODEL, headdim=8, ngroups=3))
    raises_naming("d_state", lambda: Mamba2Block(D_MODEL, d_state=0))
    raises_naming("A_init_range", lambda: Mamba2Block(D_MODEL, headdim=8, A_init_range=(0.0, 16.0)))
    raises_naming("dt_init_range", lambda: Mamba2Block(D_MODEL, headdim=8, dt_init_range=(0.1, 0.01)))
    lm = seeded(TinyMamba2LM, 10, D_MODEL, 1, seed=0, **SMALL)
    tokens = torch.randint(10, (2, 5))
    for bad in (tokens.float(), tokens[0], tokens + 10, tokens - 11, tokens.tolist()):
        raises_naming("tokens", lambda: lm(bad))
        raises_naming("tokens", lambda: lm.hidden_attention(bad))
    raises_naming("vocab_size", lambda: TinyMamba2LM(0, D_MODEL, 1))
