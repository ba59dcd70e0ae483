"""The Mamba-2 block and the tiny LM: shapes, the parametrisation of math.md §1.1, token-by-token
inference equal to the parallel forward pass, gradients, argument checking, and the hidden attention
being exactly the matrix the block's mixer multiplies by."""
import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lecture_kit
from lecture_kit.blocks import GatedRMSNorm, HeadNorm, Mamba2Block, Mamba2Cache, TinyMamba2LM, seeded
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


def assert_causal(m):
    """Changing tokens 12.. leaves outputs 0..11 untouched and changes the later ones."""
    u = inputs(1, 20, D_MODEL)
    changed = u.clone()
    changed[:, 12:] += 1.0
    with torch.no_grad():
        assert torch.equal(m(u)[:, :12], m(changed)[:, :12])
        assert not torch.allclose(m(u)[:, 12:], m(changed)[:, 12:])


def test_the_block_is_causal():
    assert_causal(block())


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


# ---- the layers of the other mixers (retention, GLA, RWKV-7), softmax attention, and their tiny LMs ----

from lecture_kit.blocks import (GLALayer, KVCache, MultiScaleRetention, RecurrentCache,  # noqa: E402
                                RWKV7ChannelMix, RWKV7TimeMix, SoftmaxAttentionLayer, TinyAttentionLM, TinyGLALM,
                                TinyRetNetLM, TinyRWKV7LM, cache_nbytes, rotary, token_shift)

RWKV_SMALL = dict(head_size=8, decay_low_rank=8, a_low_rank=8, gate_low_rank=8, chunk_size=8)
LAYERS = {                                                   # d_model = 16, 2 heads, chunk 8: T = 21 spans 3 chunks
    "retention": lambda: MultiScaleRetention(D_MODEL, 2, chunk_size=8),                  # K = 8, V = 16
    "gla": lambda: GLALayer(D_MODEL, 2, gate_low_rank=4, chunk_size=8),                  # K = 4, V = 8
    "rwkv7_time": lambda: RWKV7TimeMix(D_MODEL, 2, layer_id=1, n_layers=3, **RWKV_SMALL),
    "rwkv7_channel": lambda: RWKV7ChannelMix(D_MODEL, layer_id=1, n_layers=3),
    "softmax": lambda: SoftmaxAttentionLayer(D_MODEL, 2),
}
RECURRENT = ["retention", "gla", "rwkv7_time", "rwkv7_channel"]
LMS = {
    "retnet": lambda **kw: TinyRetNetLM(11, D_MODEL, 2, n_heads=2, chunk_size=8, **kw),
    "gla": lambda **kw: TinyGLALM(11, D_MODEL, 2, n_heads=2, gate_low_rank=4, chunk_size=8, **kw),
    "rwkv7": lambda **kw: TinyRWKV7LM(11, D_MODEL, 2, n_heads=2, **RWKV_SMALL, **kw),
    "attention": lambda **kw: TinyAttentionLM(11, D_MODEL, 2, n_heads=2, **kw),
    "mamba2": lambda **kw: TinyMamba2LM(11, D_MODEL, 2, **SMALL, **kw),
}


def layer(name, dtype=torch.float64):
    return seeded(LAYERS[name], seed=0).to(dtype)


def tokens_of(*shape, vocab=11, seed=0):
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def run_prefill_then_steps(model, sequence, prompt):
    """Outputs of prefill(sequence[:, :prompt]) then step() token by token (no prefill when prompt = 0)."""
    outputs, cache = [], None
    if prompt:
        out, cache = model.prefill(sequence[:, :prompt])
        outputs.append(out)
    for t in range(prompt, sequence.shape[1]):
        out_t, cache = model.step(sequence[:, t], cache)
        outputs.append(out_t[:, None])
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("name", LAYERS)
def test_layer_shapes_and_caches(name):
    m = layer(name)
    u = inputs(3, 11, D_MODEL)
    assert m(u).shape == (3, 11, D_MODEL)
    y, cache = m.prefill(u)
    assert y.shape == (3, 11, D_MODEL)
    y_t, after = m.step(u[:, 0], cache)
    assert y_t.shape == (3, D_MODEL) and type(after) is type(cache)
    if name == "softmax":
        assert isinstance(cache, KVCache) and cache.keys.shape == cache.values.shape == (3, 11, 2, 8)
        assert after.keys.shape == (3, 12, 2, 8)
    else:
        assert isinstance(cache, RecurrentCache) and cache.position == 11 and after.position == 12
        expected_state = {"retention": (3, 2, 8, 16), "gla": (3, 2, 4, 8), "rwkv7_time": (3, 2, 8, 8),
                          "rwkv7_channel": None}[name]
        assert (None if cache.state is None else tuple(cache.state.shape)) == expected_state
        assert (cache.last is None) == (name in ("retention", "gla"))
    if hasattr(m, "hidden_attention"):
        assert m.hidden_attention(u).shape == (3, 2, 11, 11)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("prompt", [0, 1, 13], ids=["no-prompt", "prompt=1", "prompt"])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_prefill_then_steps_equals_forward(name, dtype, bound, prompt):
    m = layer(name, dtype)
    u = inputs(2, 21, D_MODEL, dtype=dtype)
    with torch.no_grad():
        e = errors(run_prefill_then_steps(m, u, prompt)[0], m(u))
    assert e.rel_rms <= bound and e.max_abs <= bound, e


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", LMS)
def test_lm_prefill_then_steps_equals_forward(name, dtype, bound):
    lm = seeded(LMS[name], seed=0).to(dtype)
    tokens = tokens_of(2, 17)
    with torch.no_grad():
        logits, caches = run_prefill_then_steps(lm, tokens, 9)
        e = errors(logits, lm(tokens))
    assert logits.shape == (2, 17, 11) and len(caches) == len(lm.blocks), (logits.shape, len(caches))
    assert e.rel_rms <= bound and e.max_abs <= bound, e


@pytest.mark.parametrize("name", LAYERS)
def test_layers_are_causal(name):
    assert_causal(layer(name))


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_every_parameter_of_each_layer(name):
    m = layer(name, torch.float32)
    m(inputs(2, 19, D_MODEL, dtype=torch.float32)).square().mean().backward()
    assert_every_parameter_has_a_gradient(m)


@pytest.mark.parametrize("name", [n for n in LMS if n != "mamba2"])
def test_gradients_reach_every_parameter_of_each_lm(name):
    lm = seeded(LMS[name], seed=0, tie_embeddings=False)
    tokens = tokens_of(2, 19)
    F.cross_entropy(lm(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert_every_parameter_has_a_gradient(lm)


@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_cache_size_is_constant_in_t(name):
    m = layer(name, torch.float32)
    with torch.no_grad():
        sizes = [cache_nbytes(m.prefill(inputs(2, T, D_MODEL, dtype=torch.float32))[1]) for T in (1, 4, 32)]
        _, cache = m.prefill(inputs(2, 4, D_MODEL, dtype=torch.float32))
        for t in range(3):
            _, cache = m.step(inputs(2, D_MODEL, dtype=torch.float32, seed=t), cache)
        sizes.append(cache_nbytes(cache))
    state = {"retention": 2 * 2 * 8 * 16, "gla": 2 * 2 * 4 * 8, "rwkv7_time": 2 * 2 * 8 * 8, "rwkv7_channel": 0}[name]
    last = 0 if name in ("retention", "gla") else 2 * D_MODEL
    assert sizes == [4 * (state + last)] * 4, sizes


def test_kv_cache_grows_linearly_in_t():
    m = layer("softmax", torch.float32)
    with torch.no_grad():
        sizes = {T: cache_nbytes(m.prefill(inputs(2, T, D_MODEL, dtype=torch.float32))[1]) for T in (1, 4, 32)}
        _, cache = m.prefill(inputs(2, 32, D_MODEL, dtype=torch.float32))
        _, cache = m.step(inputs(2, D_MODEL, dtype=torch.float32), cache)
    assert sizes == {T: 2 * 2 * T * D_MODEL * 4 for T in (1, 4, 32)}, sizes         # keys + values, fp32
    assert cache_nbytes(cache) == 2 * 2 * 33 * D_MODEL * 4


def test_lm_caches_one_per_block_and_their_sizes():
    rwkv = seeded(LMS["rwkv7"], seed=0)
    attention = seeded(LMS["attention"], seed=0)
    with torch.no_grad():
        _, short = rwkv.prefill(tokens_of(2, 3))
        _, long = rwkv.prefill(tokens_of(2, 30))
        _, kv_short = attention.prefill(tokens_of(2, 3))
        _, kv_long = attention.prefill(tokens_of(2, 30))
    assert [type(b).__name__ for b in rwkv.blocks] == ["RWKV7TimeMix", "RWKV7ChannelMix"] * 2
    assert [b.layer_id for b in rwkv.blocks[::2]] == [0, 1]
    assert [cache_nbytes(c) for c in short] == [cache_nbytes(c) for c in long]
    assert [cache_nbytes(c) * 10 for c in kv_short] == [cache_nbytes(c) for c in kv_long]


# ---- each layer against an independent reference written from math.md ----

def rotate_every_two_reference(x, n):
    """torchscale's theta_shift at positions n: x·cos + rotate_every_two(x)·sin, angles repeated pairwise."""
    D = x.shape[-1]
    angle = (1.0 / 10000 ** torch.linspace(0, 1, D // 2, dtype=x.dtype)).repeat_interleave(2)
    phase = n.to(x.dtype)[:, None, None] * angle
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * torch.cos(phase) + rotated * torch.sin(phase)


def test_rotary_is_torchscale_theta_shift_and_relative():
    x, y = inputs(2, 9, 3, 8), inputs(2, 9, 3, 8, seed=2)
    n = torch.arange(9)
    assert errors(rotary(x, n), rotate_every_two_reference(x, n)).within(TOLERANCE["fp64"])
    shifted = torch.einsum("bthd,bthd->bth", rotary(x, n + 5), rotary(y, n))        # ⟨rot_{n+5} x, rot_n y⟩
    assert torch.allclose(shifted, torch.einsum("bthd,bthd->bth", rotary(x, n * 0 + 5), y), atol=1e-12)


def test_retention_layer_matches_the_parallel_form_with_torchscale_conventions():
    m = layer("retention")
    u = inputs(2, 21, D_MODEL)
    gamma = 1 - 2.0 ** (-5 - torch.arange(2, dtype=torch.float64))
    assert torch.allclose(m.log_gamma.exp(), gamma, rtol=0, atol=1e-15)
    n = torch.arange(21)
    q = rotate_every_two_reference(m.q_proj(u).unflatten(-1, (2, 8)), n)
    k = rotate_every_two_reference(m.k_proj(u).unflatten(-1, (2, 8)), n) * 8 ** -0.5   # torchscale scales k
    v = m.v_proj(u).unflatten(-1, (2, 16))
    decay = torch.where(n[:, None] >= n, gamma[:, None, None] ** (n[:, None] - n).clamp(min=0), 0.0)   # D [H, T, T]
    o = torch.einsum("bnhk,bmhk,hnm,bmhv->bnhv", q, k, decay, v)
    o = F.rms_norm(o, (16,), eps=1e-6).flatten(-2)
    reference = m.out_proj(F.silu(m.g_proj(u)) * o)
    assert errors(m(u), reference).within(TOLERANCE["fp64"])


def test_gla_layer_matches_its_definition():
    m = layer("gla")
    u = inputs(2, 21, D_MODEL)
    q, k = (p(u).unflatten(-1, (2, 4)) for p in (m.q_proj, m.k_proj))
    v = m.v_proj(u).unflatten(-1, (2, 8))
    alpha = torch.sigmoid(m.gate_proj[1](m.gate_proj[0](u))) ** (1 / 16)                # σ(x W1 W2 + b)^{1/τ}
    S, o = torch.zeros(2, 2, 4, 8, dtype=torch.float64), []
    for t in range(21):
        S = alpha.unflatten(-1, (2, 4))[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * 4 ** -0.5)
    normed = F.rms_norm(torch.stack(o, 1), (8,), eps=1e-5).flatten(-2) * m.norm.weight
    reference = m.out_proj(F.silu(m.r_proj(u)) * normed)
    assert errors(m(u), reference).within(TOLERANCE["fp64"])


def test_rwkv7_time_mix_matches_blinkdl_layout_reference():
    """math.md §4.1 in BlinkDL's form: S ∈ R^{V×K}, w_raw = −softplus(−d) − 0.5, decay exp(−exp(w_raw)),
    sa = S a; S = S·diag(w) + sa bᵀ + v kᵀ; y = S r; GroupNorm(H, C, eps=64e-5); bonus; (· ∘ g) W_o."""
    m = layer("rwkv7_time")
    u = inputs(2, 21, D_MODEL)
    B, T, H, N = 2, 21, 2, 8
    xx = F.pad(u, (0, 0, 1, -1)) - u                                                   # time_shift(x) − x
    xr, xw, xk, xv, xa, xg = (u + xx * m.mu[i] for i in range(6))
    r, k, v = m.r_proj(xr), m.k_proj(xk), m.v_proj(xv)
    w_raw = -F.softplus(-(m.w0 + torch.tanh(xw @ m.w1) @ m.w2)) - 0.5
    a = torch.sigmoid(m.a0 + (xa @ m.a1) @ m.a2)
    g = torch.sigmoid(xg @ m.g1) @ m.g2
    kk = F.normalize((k * m.k_k).view(B, T, H, N), dim=-1).view(B, T, -1)
    k = k * (1 + (a - 1) * m.k_a)
    heads = [t.view(B, T, H, N) for t in (r, torch.exp(-torch.exp(w_raw)), k, v, -kk, kk * a)]
    S, ys = torch.zeros(B, H, N, N, dtype=torch.float64), []
    for t in range(T):
        r_t, w_t, k_t, v_t, a_t, b_t = (x[:, t] for x in heads)
        sa = torch.einsum("bhvk,bhk->bhv", S, a_t)
        S = S * w_t[:, :, None, :] + sa[..., None] * b_t[:, :, None, :] + v_t[..., None] * k_t[:, :, None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", S, r_t))
    x = F.group_norm(torch.stack(ys, 1).reshape(B * T, -1), H, m.norm.weight, m.norm.bias, eps=64e-5).view(B, T, -1)
    r, k, v = (t.view(B, T, H, N) for t in (r, k, v))
    x = x + ((r * k * m.r_k).sum(-1, keepdim=True) * v).view(B, T, -1)
    assert errors(m(u), m.out_proj(x * g)).within(TOLERANCE["fp64"])


def test_rwkv7_channel_mix_and_softmax_attention_match_their_definitions():
    cm, att = layer("rwkv7_channel"), layer("softmax")
    u = inputs(2, 21, D_MODEL)
    xk = u + (F.pad(u, (0, 0, 1, -1)) - u) * cm.mu_k
    assert errors(cm(u), cm.value(torch.relu(cm.key(xk)) ** 2)).within(TOLERANCE["fp64"])
    n = torch.arange(21)
    q, k = (rotate_every_two_reference(p(u).unflatten(-1, (2, 8)), n) for p in (att.q_proj, att.k_proj))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / 8 ** 0.5
    weights = scores.masked_fill(n[:, None] < n, float("-inf")).softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", weights, att.v_proj(u).unflatten(-1, (2, 8)))
    assert errors(att(u), att.out_proj(o.flatten(-2))).within(TOLERANCE["fp64"])
    assert errors(att.hidden_attention(u), weights).within(TOLERANCE["fp64"])


@pytest.mark.parametrize("name", ["retention", "gla", "rwkv7_time"])
def test_layer_hidden_attention_is_the_matrix_its_mixer_multiplies_by(name):
    m = layer(name)
    u = inputs(2, 19, D_MODEL)
    seen = {}
    hook = m.mixer.register_forward_hook(lambda mod, args, out: seen.update(args=args, o=out[0]))
    with torch.no_grad():
        m(u)
        M = m.hidden_attention(u)
    hook.remove()
    v = seen["args"][3 if name == "rwkv7_time" else 2]
    assert errors(torch.einsum("bhij,bjhv->bihv", M, v), seen["o"]).within(TOLERANCE["fp64"])


def test_lm_hidden_attention_skips_channel_mixes():
    lm = seeded(LMS["rwkv7"], seed=0).double()
    with torch.no_grad():
        maps = lm.hidden_attention(tokens_of(2, 9))
    assert len(maps) == 2 and all(M.shape == (2, 2, 9, 9) for M in maps)


# ---- argument checking of the new layers and LMs ----

@pytest.mark.parametrize("name", LAYERS)
def test_bad_layer_input_names_the_argument(name):
    m = layer(name)
    u = inputs(2, 5, D_MODEL)
    for bad in (u[0], u[..., :-1], u.float(), u.long(), u.tolist(), u[:, :0]):
        raises_naming("u", lambda: m(bad))
        raises_naming("u", lambda: m.prefill(bad))
    for bad in (u, u[:, 0, :-1], u[:, 0].float()):
        raises_naming("u_t", lambda: m.step(bad))
    _, cache = m.prefill(u)
    raises_naming("cache", lambda: m.step(u[:, 0], list(cache)))
    raises_naming("cache", lambda: m.step(u[:, 0], cache[:1]))
    for field, value in cache._asdict().items():
        if isinstance(value, torch.Tensor):
            raises_naming(f"cache.{field}", lambda: m.step(u[:, 0], cache._replace(**{field: value[:1]})))
            raises_naming(f"cache.{field}", lambda: m.step(u[:, 0], cache._replace(**{field: value.float()})))
        elif value is None:
            raises_naming(f"cache.{field}", lambda: m.step(u[:, 0], cache._replace(**{field: u[:, 0]})))
        else:
            raises_naming(f"cache.{field}", lambda: m.step(u[:, 0], cache._replace(**{field: -1})))
    if name == "softmax":
        raises_naming("cache", lambda: m.step(u[:, 0], KVCache(cache.keys, cache.values[:, 1:])))
    if hasattr(m, "hidden_attention"):
        raises_naming("u", lambda: m.hidden_attention(u[0]))


def test_bad_layer_arguments_name_the_argument():
    raises_naming("n_heads", lambda: MultiScaleRetention(D_MODEL, 0))
    raises_naming("expand_k", lambda: MultiScaleRetention(D_MODEL, 16))            # K = 1: the rotation needs pairs
    raises_naming("expand_v", lambda: MultiScaleRetention(D_MODEL, 2, expand_v=0.1))
    raises_naming("chunk_size", lambda: MultiScaleRetention(D_MODEL, 2, chunk_size=0))
    raises_naming("norm_eps", lambda: MultiScaleRetention(D_MODEL, 2, norm_eps=-1.0))
    raises_naming("expand_k", lambda: GLALayer(D_MODEL, 3))
    raises_naming("gate_low_rank", lambda: GLALayer(D_MODEL, 2, gate_low_rank=0))
    raises_naming("gate_temperature", lambda: GLALayer(D_MODEL, 2, gate_temperature=0))
    raises_naming("head_size", lambda: RWKV7TimeMix(D_MODEL, 2, head_size=0))
    raises_naming("layer_id", lambda: RWKV7TimeMix(D_MODEL, 2, 8, layer_id=3, n_layers=3))
    raises_naming("decay_low_rank", lambda: RWKV7TimeMix(D_MODEL, 2, 8, decay_low_rank=1.5))
    raises_naming("n_layers", lambda: RWKV7ChannelMix(D_MODEL, n_layers=0))
    raises_naming("expand", lambda: RWKV7ChannelMix(D_MODEL, expand=0))
    raises_naming("n_heads", lambda: SoftmaxAttentionLayer(D_MODEL, 3))
    raises_naming("d_model", lambda: GLALayer(0, 2))
    x = inputs(1, 4, 2, 6)
    raises_naming("x", lambda: rotary(x[..., :5], torch.arange(4)))
    raises_naming("positions", lambda: rotary(x, torch.arange(5)))
    raises_naming("positions", lambda: rotary(x, torch.arange(4.0)))
    raises_naming("previous", lambda: token_shift(x[:, :, 0], x[:, 0, 0, :5]))


@pytest.mark.parametrize("name", [n for n in LMS if n != "mamba2"])
def test_bad_lm_input_names_the_argument(name):
    lm = seeded(LMS[name], seed=0)
    tokens = tokens_of(2, 5)
    for bad in (tokens.float(), tokens[0], tokens + 11, tokens.tolist()):
        raises_naming("tokens", lambda: lm(bad))
        raises_naming("tokens", lambda: lm.prefill(bad))
    for bad in (tokens, tokens[:, 0].float(), tokens[:, 0] + 11):
        raises_naming("token", lambda: lm.step(bad))
    _, caches = lm.prefill(tokens)
    raises_naming("caches", lambda: lm.step(tokens[:, 0], caches[:-1]))
    raises_naming("caches", lambda: lm.step(tokens[:, 0], caches[0]))


# ---- edge cases: an empty batch, norms of the wrong width, the package's imports ----

@pytest.mark.parametrize("name", [*LAYERS, "mamba2"])
def test_an_empty_batch_gives_empty_results(name):
    """B = 0 through forward, prefill, step and hidden_attention (Mamba2Block crashed in ssd.chunked)."""
    m = block() if name == "mamba2" else layer(name)
    u = inputs(0, 5, D_MODEL)
    assert m(u).shape == (0, 5, D_MODEL)
    out, cache = m.prefill(u)
    assert out.shape == (0, 5, D_MODEL)
    out_t, _ = m.step(u[:, 0], cache)
    assert out_t.shape == (0, D_MODEL)
    if hasattr(m, "hidden_attention"):
        assert m.hidden_attention(u).shape[::2] == (0, 5)


def test_norms_check_their_width_and_sizes():
    raises_naming("y", lambda: HeadNorm(2, 4)(torch.randn(3, 7)))
    raises_naming("y", lambda: HeadNorm(2, 4)(torch.randint(3, (3, 8))))
    raises_naming("group_size", lambda: GatedRMSNorm(16, 0))           # was a ZeroDivisionError
    raises_naming("dim", lambda: GatedRMSNorm(0, 4))
    raises_naming("group_size", lambda: GatedRMSNorm(16, 5))
    norm = GatedRMSNorm(8, 4)
    raises_naming("y", lambda: norm(torch.randn(3, 7), torch.randn(3, 7)))
    raises_naming("z", lambda: norm(torch.randn(3, 8), torch.randn(2, 8)))


def test_no_module_imports_another_modules_private_names():
    """Each module of lecture_kit keeps its private names to itself: the validators the layers, the
    vision model and the tasks share are public (``lecture_kit._validate``, ``blocks/_validate.py``)."""
    root = Path(lecture_kit.__file__).parent
    private = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private
