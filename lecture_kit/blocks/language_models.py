"""Tiny language models: a residual stack of one kind of layer between an embedding and a head."""
from __future__ import annotations

import torch
from torch import nn

from .._validate import positive_int
from .attention import SoftmaxAttentionLayer
from .base import SequenceLayer
from .gla_layer import GLALayer
from .mamba2 import Mamba2Block
from .retention import MultiScaleRetention
from .rwkv7_layers import RWKV7ChannelMix, RWKV7TimeMix


class TinyLM(nn.Module):
    """A small residual language model around one kind of block (``block_type``, set by a subclass):

        h_0 = embedding(tokens)                           tokens [B, T] (int) → h [B, T, d_model]
        h ← h + block(RMSNorm(h))                         for each block, in order   (pre-norm residual)
        logits = head(RMSNorm(h))                         [B, T, vocab_size]

    Each of the ``n_layers`` layers holds one block (two for RWKV-7: time mix, then channel mix;
    a subclass may override ``_layer``).  ``tie_embeddings`` shares the head's weight with the
    embedding; the embedding is initialised N(0, 0.02²) as in mamba_ssm's language model.
    ``block_options`` go to every block.

    Inference: ``prefill(tokens)`` returns the logits and one cache per block; ``step(token, caches)``
    advances every block by one token (``cache_nbytes`` of each cache: its memory).
    """
    block_type: type[SequenceLayer]

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, *, tie_embeddings: bool = True,
                 norm_eps: float = 1e-5, **block_options):
        super().__init__()
        owner = type(self).__name__
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            positive_int(owner, name, value)
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(block for layer_id in range(n_layers)
                                    for block in self._layer(d_model, layer_id, n_layers, **block_options))
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=norm_eps) for _ in self.blocks)
        self.final_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embedding.weight

    def _layer(self, d_model: int, layer_id: int, n_layers: int, **block_options) -> list[SequenceLayer]:
        """The blocks of layer ``layer_id``, each to sit in its own pre-norm residual: one ``block_type``."""
        return [self.block_type(d_model, **block_options)]

    def _check_tokens(self, fn: str, tokens, name: str = "tokens", dims: str = "B T") -> None:
        where, shape = f"{type(self).__name__}.{fn}", f"[{', '.join(dims.split())}]"
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: {name} must be an int64 (or int32) tensor {shape}, got "
                             f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        if tokens.dim() != len(dims.split()) or tokens.numel() == 0:
            raise ValueError(f"{where}: {name} must have shape {shape}, non-empty, got {tuple(tokens.shape)}")
        if tokens.device != self.embedding.weight.device:
            raise ValueError(f"{where}: {name} are on {tokens.device} but the model is on "
                             f"{self.embedding.weight.device}")
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"{where}: {name} must lie in [0, vocab_size = {self.vocab_size}), "
                             f"got values in [{tokens.min().item()}, {tokens.max().item()}]")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → logits [B, T, vocab_size]."""
        self._check_tokens("forward", tokens)
        h = self.embedding(tokens)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.final_norm(h))

    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """``forward`` over a prompt tokens [B, T], plus one cache per block for ``step``."""
        self._check_tokens("prefill", tokens)
        h, caches = self.embedding(tokens), []
        for norm, block in zip(self.norms, self.blocks):
            out, cache = block.prefill(norm(h))
            h = h + out
            caches.append(cache)
        return self.head(self.final_norm(h)), caches

    def step(self, token: torch.Tensor, caches: list[tuple] | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """One token per sequence: token [B] (int) → (logits [B, vocab_size], the caches one token on).
        ``caches=None`` starts from an empty sequence; else the list ``prefill`` or ``step`` returned."""
        self._check_tokens("step", token, name="token", dims="B")
        if caches is None:
            caches = [None] * len(self.blocks)
        elif not isinstance(caches, list) or len(caches) != len(self.blocks):
            raise ValueError(f"{type(self).__name__}.step: caches must be None or the list of {len(self.blocks)} "
                             f"caches, one per block, that prefill or step returned, got {type(caches).__name__}"
                             f"{f' of length {len(caches)}' if isinstance(caches, list) else ''}")
        h, advanced = self.embedding(token), []
        for norm, block, cache in zip(self.norms, self.blocks, caches):
            out, cache = block.step(norm(h), cache)
            h = h + out
            advanced.append(cache)
        return self.head(self.final_norm(h)), advanced

    def hidden_attention(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [B, T] → one [B, H, T, T] per token-mixing block: each block's ``hidden_attention`` on
        the (normalised) residual stream that this block reads (blocks without one, RWKV-7's channel
        mixes, are skipped)."""
        self._check_tokens("hidden_attention", tokens)
        h = self.embedding(tokens)
        matrices = []
        for norm, block in zip(self.norms, self.blocks):
            if hasattr(block, "hidden_attention"):
                matrices.append(block.hidden_attention(norm(h)))
            h = h + block(norm(h))
        return matrices


class TinyMamba2LM(TinyLM):
    """``TinyLM`` of Mamba-2 blocks: TinyMamba2LM(vocab_size, d_model, n_layers, d_state=16, headdim=16, …)."""
    block_type = Mamba2Block


class TinyRetNetLM(TinyLM):
    """``TinyLM`` of multi-scale retention layers: TinyRetNetLM(vocab_size, d_model, n_layers, n_heads=2, …)."""
    block_type = MultiScaleRetention


class TinyGLALM(TinyLM):
    """``TinyLM`` of GLA layers: TinyGLALM(vocab_size, d_model, n_layers, n_heads=2, …)."""
    block_type = GLALayer


class TinyAttentionLM(TinyLM):
    """``TinyLM`` of softmax attention layers, without MLPs like the others:
    TinyAttentionLM(vocab_size, d_model, n_layers, n_heads=2)."""
    block_type = SoftmaxAttentionLayer


class TinyRWKV7LM(TinyLM):
    """``TinyLM`` of RWKV-7 layers, each a time mix then a channel mix in their own pre-norm residuals
    (RWKV's LayerNorms are RMSNorms here, and there is no ln0 after the embedding):
    TinyRWKV7LM(vocab_size, d_model, n_layers, n_heads=2, head_size=8, ffn_expand=4, …).
    ``ffn_expand`` goes to the channel mixes, the other options to the time mixes; each layer gets
    its ``layer_id`` for RWKV's depth-dependent initialisation."""

    def _layer(self, d_model, layer_id, n_layers, *, ffn_expand: int = 4, **block_options):
        return [RWKV7TimeMix(d_model, layer_id=layer_id, n_layers=n_layers, **block_options),
                RWKV7ChannelMix(d_model, ffn_expand, layer_id=layer_id, n_layers=n_layers)]


