"""A small UNet for images (B, C, H, W) with a time embedding (DDPM/ADM-style, scaled down), conditioned on a
class label or on text (token embeddings by cross-attention, their pooled mean in the time embedding)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from rayflow.nets.layers import ClassEmbedding, FourierTime, TextContext


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


class CrossAttention(nn.Module):
    """Pixels attend to the text tokens (queries from pixels, keys and values from the context), einsum-written
    for the same forward-mode AD reason as SelfAttention. Padded tokens are masked out; the context always holds
    a learned null token, so a caption-free (null) condition still has something to attend to."""

    def __init__(self, ch: int, ctx_dim: int, heads: int = 4):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention channels {ch} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.kv = nn.Linear(ctx_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, mask = ctx  # (B, L, E), (B, L) bool
        b, c, h, w = x.shape
        nh, hs = self.heads, c // self.heads
        q = self.q(self.norm(x)).reshape(b, nh, hs, h * w)  # (B, nh, hs, T)
        k, v = self.kv(tokens).reshape(b, tokens.shape[1], 2, nh, hs).unbind(2)  # (B, L, nh, hs) each
        logits = torch.einsum("bnct,blnc->bntl", q, k) / math.sqrt(hs)  # (B, nh, T, L)
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bntl,blnc->bnct", torch.softmax(logits, dim=-1), v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """F(x_in, t, cond): (B, C, H, W) -> (B, C, H, W). H and W must be divisible by 2^(levels - 1).

    channels: base width; channel_mult: width multiplier per level; attn_levels: levels with self-attention.
    cond is a class index (B,) when num_classes > 0, or with text_dim > 0 the packed text condition (B, L, D + 1):
    token embeddings (D = text_dim) and, in the last channel, the token mask (all zero = the null condition);
    text then also enters every attention level by cross-attention.
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
        text_dim: int = 0,
    ):
        super().__init__()
        if num_classes > 0 and text_dim > 0:
            raise ValueError("a UNet is conditioned on classes (num_classes) or on text (text_dim), not both")
        self.in_channels, self.num_classes, self.text_dim = in_channels, num_classes, text_dim
        emb_dim = 4 * channels
        self.time = FourierTime(emb_dim)
        self.cls = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        self.text = TextContext(text_dim, emb_dim) if text_dim > 0 else None

        def attention(ch: int) -> list[nn.Module]:
            return [SelfAttention(ch)] + ([CrossAttention(ch, emb_dim)] if text_dim > 0 else [])

        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if level in attn_levels:
                    blocks += attention(ch)
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), *attention(ch), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)]
                ch = channels * mult
                if level in attn_levels:
                    blocks += attention(ch)
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(
                    nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)])
                )
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, ctx) -> torch.Tensor:
        for m in blocks:
            if isinstance(m, CrossAttention):
                h = m(h, ctx)
            else:
                h = m(h, emb) if isinstance(m, (ResBlock, SelfAttention)) else m(h)
        return h

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t)  # (B, E)
        ctx = None
        if self.cls is not None:
            emb = emb + self.cls(cond, x_in.shape[0], x_in.device)
        elif self.text is not None:
            ctx, pooled = self.text(cond, x_in.shape[0], x_in.device, emb.dtype)  # ((B, L+1, E), (B, L+1)), (B, E)
            emb = emb + pooled
        h = self.inp(x_in)  # (B, C, H, W)
        hs = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, emb, ctx)
            hs.append(h)
        h = self._run_blocks(self.mid, h, emb, ctx)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_blocks(blocks, h, emb, ctx)
        return self.out(h)  # (B, C, H, W)
