"""A tiny GPT-style transformer: causal self-attention blocks for pipeline and tensor parallelism.

Image inputs (C, H, W) become H tokens of C*W features (one per row); integer inputs (T,) are
token ids when ``vocab_size`` > 0. The class is read from the last token, which sees the whole
sequence under the causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedge.plugins.models.base import ModelConfig
from fedge.registry import plugin


class Embed(nn.Module):
    """Token (or row-feature) embedding plus a learned position embedding: (B, ...) -> (B, T, d_model)."""

    def __init__(self, *, in_features: int, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tok = nn.Embedding(vocab_size, d_model) if vocab_size > 0 else nn.Linear(in_features, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size > 0:
            h = self.tok(x.long())
        else:
            if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W): one token per image row
                x = x.permute(0, 2, 1, 3).flatten(2)
            elif x.dim() == 2:  # (B, T) -> (B, T, 1)
                x = x.unsqueeze(-1)
            h = self.tok(x)
        return h + self.pos[: h.shape[1]]


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (split by heads under TP)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim); heads is local under tensor parallelism.
        q, k, v = (lin(x).view(b, t, self.num_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class MLPBlock(nn.Module):
    """Position-wise feed-forward: Linear(d, 4d), GELU, Linear(4d, d)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLPBlock(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and classifier on the last token: (B, T, d) -> (B, classes)."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x[:, -1]))


@plugin("model", "tiny-gpt")
class TinyGPT:
    """Tiny GPT-style transformer (causal attention blocks) classifying sequences or image rows."""

    @dataclass(frozen=True, kw_only=True, slots=True)
    class Config(ModelConfig):
        d_model: int = 64
        """Width of the residual stream."""
        num_heads: int = 4
        """Attention heads (d_model must divide by it; tensor parallelism splits them)."""
        num_layers: int = 4
        """Transformer blocks."""
        mlp_ratio: int = 4
        """Feed-forward width as a multiple of d_model."""
        vocab_size: int = 0
        """Token vocabulary for integer inputs; 0 embeds float rows linearly."""

        def __post_init__(self) -> None:
            if self.d_model < 1 or self.num_heads < 1 or self.d_model % self.num_heads:
                raise ValueError(f"d_model ({self.d_model}) must be a positive multiple of num_heads ({self.num_heads})")
            if self.num_layers < 1 or self.mlp_ratio < 1 or self.vocab_size < 0:
                raise ValueError("num_layers and mlp_ratio must be >= 1 and vocab_size >= 0")

    @staticmethod
    def build(config: Config, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if config.vocab_size > 0:
            seq_len, features = input_shape[0], 1
        else:
            seq_len = input_shape[1] if len(input_shape) == 3 else input_shape[0]
            features = math.prod(input_shape) // seq_len
        embed = Embed(in_features=features, vocab_size=config.vocab_size, seq_len=seq_len, d_model=config.d_model)
        blocks = [Block(config.d_model, config.num_heads, config.mlp_ratio * config.d_model) for _ in range(config.num_layers)]
        return nn.Sequential(embed, *blocks, Head(config.d_model, num_classes))
