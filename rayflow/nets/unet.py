"""A small class-conditional UNet for images (B, C, H, W) with a time embedding (DDPM/ADM-style, scaled down)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rayflow.nets.layers import ClassEmbedding, FourierTime


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding enters as a scale and shift (adaptive group norm)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels, written out with einsum.

    nn.MultiheadAttention's eval-mode fast path has no forward-mode AD, which the parameter-space
    moment matching needs (torch.func.jvp through the frozen teacher); plain ops support it.
    """

    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)  # (B, nh, hs, T)
        att = torch.softmax(torch.einsum("bnct,bncs->bnts", q, k) / math.sqrt(c // self.heads), dim=-1)  # (B, nh, T, T)
        out = torch.einsum("bnts,bncs->bnct", att, v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """F(x_in, t, cond): (B, C, H, W) -> (B, C, H, W). H and W must be divisible by 2^(levels - 1).

    channels: base width; channel_mult: width multiplier per level; attn_levels: levels with self-attention.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_levels: tuple[int, ...] = (2,),
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        emb_dim = 4 * channels
        self.time = FourierTime(emb_dim)
        self.cls = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if level in attn_levels:
                    blocks.append(SelfAttention(ch))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if level in attn_levels:
                    blocks.append(SelfAttention(ch))
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(
                    nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)])
                )
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for m in blocks:
            h = m(h, emb) if isinstance(m, (ResBlock, SelfAttention)) else m(h)
        return h

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t)  # (B, E)
        if self.cls is not None:
            emb = emb + self.cls(cond, x_in.shape[0], x_in.device)
        h = self.inp(x_in)  # (B, C, H, W)
        hs = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, emb)
            hs.append(h)
        h = self._run_blocks(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_blocks(blocks, h, emb)
        return self.out(h)  # (B, C, H, W)
