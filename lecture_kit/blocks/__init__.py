"""The layers around the mixers, and tiny language models built from them.  Zone 4 of the lecture.

Every layer maps u [B, T, d_model] → [B, T, d_model] and shares one interface (``SequenceLayer``):
``forward`` runs a mixer's parallel (chunked) form, ``prefill`` does the same and returns the cache
that ``step`` continues from one token at a time.  The layers:

    Mamba2Block            SSD                 (Dao & Gu 2024; notebooks 03b, 04d)     cache O(1) in t
    MultiScaleRetention    retention           (Sun et al. 2023; notebooks 03d, 04d)   cache O(1) in t
    GLALayer               gated lin. attn.    (Yang et al. 2023; notebooks 03d, 04d)  cache O(1) in t
    RWKV7TimeMix           generalised delta   (Peng et al. 2025; notebooks 03c, 04d)  cache O(1) in t
    RWKV7ChannelMix        RWKV's feed-forward (notebooks 03c, 04d)                    cache O(1) in t
    SoftmaxAttentionLayer  softmax attention   (the baseline)                          cache O(t): the KV cache

``cache_nbytes`` measures a cache; ``TinyLM`` stacks layers of one kind into a language model.

One file per layer family: ``base`` (what the layers share: ``SequenceLayer``, ``Mixer``, ``HeadNorm``,
the caches, ``rotary``, ``seeded``), ``mamba2``, ``retention``, ``gla_layer``, ``rwkv7_layers``,
``attention`` and ``language_models``; their argument checks are in ``_validate``.  Everything public is
imported here, so ``from lecture_kit.blocks import Mamba2Block`` works as before.
"""
from .attention import KVCache, SoftmaxAttentionLayer
from .base import HeadNorm, Mixer, RecurrentCache, SequenceLayer, cache_nbytes, rotary, seeded
from .gla_layer import GLALayer
from .language_models import TinyAttentionLM, TinyGLALM, TinyLM, TinyMamba2LM, TinyRetNetLM, TinyRWKV7LM
from .mamba2 import SSD, GatedRMSNorm, Mamba2Block, Mamba2Cache, SSDInputs
from .retention import MultiScaleRetention
from .rwkv7_layers import RWKV7ChannelMix, RWKV7Inputs, RWKV7TimeMix, token_shift

__all__ = ["GLALayer", "GatedRMSNorm", "HeadNorm", "KVCache", "Mamba2Block", "Mamba2Cache", "Mixer",
           "MultiScaleRetention", "RWKV7ChannelMix", "RWKV7Inputs", "RWKV7TimeMix", "RecurrentCache", "SSD",
           "SSDInputs", "SequenceLayer", "SoftmaxAttentionLayer", "TinyAttentionLM", "TinyGLALM", "TinyLM",
           "TinyMamba2LM", "TinyRWKV7LM", "TinyRetNetLM", "cache_nbytes", "rotary", "seeded", "token_shift"]
