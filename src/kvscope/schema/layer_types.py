"""Layer-type words the recorder writes beside Hugging Face's own (`full_attention`, `sliding_attention`,
...), and which of them hold bytes that do not grow with the decoded tokens. Imports nothing: the
recorder (torch) and the analyzer (no torch) both read it."""

from __future__ import annotations

LATENT = "latent"  # MLA layers that cache the compressed latent (grows with tokens)
CROSS_ATTENTION = "cross_attention"  # an encoder-decoder's cross-attention KV: its length is the encoder's
SSM = "ssm"  # a state-space layer's state (mamba's conv + ssm states)
CONV = "conv"  # a short-convolution layer's state alone (lfm2)
RECURRENT = "recurrent"  # a linear-attention or RNN layer's state (rwkv, RG-LRU, xLSTM, gated delta net)

# Layer types whose bytes are constant in the decoded tokens: growth and per-token checks leave them out.
CONSTANT_IN_TOKENS = frozenset({CROSS_ATTENTION, SSM, CONV, RECURRENT})


def constant_in_tokens(layer_type: object) -> bool:
    return layer_type in CONSTANT_IN_TOKENS


def constant_types_sql() -> str:
    """The constant layer types as an SQL list, for `layer_type NOT IN (...)`."""
    return "(" + ", ".join(f"'{t}'" for t in sorted(CONSTANT_IN_TOKENS)) + ")"
