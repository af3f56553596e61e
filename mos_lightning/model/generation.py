"""The generation tower G: a DiT over patchified image tokens (§3.3, App. A).

Width, depth and heads are independent of the understanding tower (asymmetric by design).
No timestep embedding by default (App. A drops it; the router sees t instead).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from ..types import Conditioning
from .blocks import Block
from .embeddings import TimestepEmbedding, rope_2d, sincos_2d


def init_registers(p: torch.Tensor) -> torch.Tensor:
    return nn.init.normal_(p, std=0.02)


class GenerationTower(nn.Module):
    """Patchify -> [registers ; image tokens] -> n blocks with per-block context -> unpatchify.

    Args:
        width, depth, heads: the DiT's size (depth is n, the number of generation layers).
        patch_size: pixels (or latent cells) per patch side.
        channels: latent channels. None (the default): the autoencoder's, set when the model is built
            (`TextToImage` calls `use_channels`); a number that differs from the autoencoder's is an error.
        registers: learnable tokens carried with the image stream (App. A uses 4).
        timestep_embedding: add a carried timestep token (off by default, App. A).
        rope_theta: base of the 2-D rotary positions on image tokens' queries and keys (None: only the
            additive sin-cos positions). At the embedded budget RoPE turns scattered patches into whole
            objects (docs/training-recipe.md).
        ffn_multiple: round each FFN's hidden width up to a multiple of this (blocks.ffn_hidden; 128 in the
            paper-size overlays, for the GPU's matmul tiles); 1 keeps 2/3 x mlp_ratio x width.
    """

    def __init__(self, width: int = 192, depth: int = 6, heads: int = 6, patch_size: int = 4,
                 channels: int | None = None, mlp_ratio: float = 4.0, registers: int = 4,
                 timestep_embedding: bool = False, rope_theta: float | None = 100.0, ffn_multiple: int = 1):
        super().__init__()
        if min(width, depth, heads, patch_size, 1 if channels is None else channels) < 1:
            raise ConfigError("generation: width, depth, heads, patch_size and channels must all be >= 1")
        if rope_theta is not None and (rope_theta <= 1 or (width // heads) % 4):
            raise ConfigError(f"generation.rope_theta={rope_theta} needs a base > 1 and width / heads "
                              f"({width}/{heads}) divisible by 4; null turns rotary positions off")
        self.width, self.depth, self.heads, self.patch_size, self.channels = width, depth, heads, patch_size, None
        self.rope_theta = rope_theta
        self.registers = nn.Parameter(init_registers(torch.empty(registers, width)))
        self.timestep = TimestepEmbedding(width) if timestep_embedding else None
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, ffn_multiple=ffn_multiple) for _ in range(depth))
        self.norm_out = nn.RMSNorm(width)
        self.asked_channels = channels
        if channels is not None:
            self.use_channels(channels)

    def use_channels(self, channels: int) -> None:
        """Build the patch embedding and the head for `channels` latent channels (the autoencoder's)."""
        if self.asked_channels is not None and channels != self.asked_channels:
            raise ConfigError(f"model.generation.init_args.channels={self.asked_channels} but the autoencoder's "
                              f"latents have {channels} channels; leave channels unset (null) to take the "
                              f"autoencoder's")
        if self.channels == channels:
            return
        self.channels, area = channels, self.patch_size * self.patch_size
        self.patch_embed = nn.Linear(area * channels, self.width)
        self.head = nn.Linear(self.width, area * channels)
        self.zero_head()

    def zero_head(self) -> None:
        nn.init.zeros_(self.head.weight)  # start by predicting zero velocity (DiT-style)
        nn.init.zeros_(self.head.bias)

    def reset_parameters(self) -> None:
        """This module's own parameters (the registers) and the zero head, after the children's own init."""
        init_registers(self.registers)
        self.zero_head()

    def check_image_size(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"image size {height}x{width} is not divisible by "
                              f"generation.patch_size={self.patch_size}")

    def patchify(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) image tokens with positions; the router shares this layer (§3.2)."""
        self.check_image_size(*z.shape[-2:])
        p = self.patch_size
        patches = rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        pos = sincos_2d(z.shape[-2] // p, z.shape[-1] // p, self.width, z.device)
        return self.patch_embed(patches) + pos.to(patches.dtype)

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p = self.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=height // p, p=p, q=p)

    def extra_tokens(self, batch: int, t: torch.Tensor) -> torch.Tensor:
        """(B, R[+1], D): registers, plus a timestep token when the switch is on."""
        extra = self.registers.expand(batch, -1, -1)
        if self.timestep is not None:
            extra = torch.cat([extra, self.timestep(t)[:, None].to(extra.dtype)], dim=1)
        return extra

    def rotary(self, z: torch.Tensor, leading: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE angles for the carried stream: `leading` unrotated tokens, then the image grid."""
        if self.rope_theta is None:
            return None
        p = self.patch_size
        rope = rope_2d(z.shape[-2] // p, z.shape[-1] // p, self.width // self.heads, leading, self.rope_theta, z.device)
        for table in rope:  # head_dim is fixed by the weights. A dynamic one would be "duck-sized" into the same
            torch._dynamo.mark_static(table, 1)  # symbol as an equal batch size and pin it (model.compile)
        return rope

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, conditioning: Conditioning | None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """z_t: (B, C, H, W), t: (B,) -> velocity (B, C, H, W). `tokens`: patchify(z_t) if already computed."""
        tokens = self.patchify(z_t) if tokens is None else tokens  # (B, N, D)
        x = torch.cat([self.extra_tokens(z_t.shape[0], t), tokens], dim=1)
        stream_mask = None
        if conditioning is not None and conditioning.stream is not None:  # self-attention fusion
            x = torch.cat([conditioning.stream.to(x.dtype), x], dim=1)
            image = torch.ones_like(x[:, conditioning.mask.shape[1]:, 0], dtype=torch.bool)
            stream_mask = torch.cat([conditioning.mask, image], 1)
        rope = self.rotary(z_t, leading=x.shape[1] - tokens.shape[1])
        for j, block in enumerate(self.blocks):
            inputs = {} if conditioning is None else conditioning.block_inputs(j)
            x = block(x, stream_mask=stream_mask, rope=rope, **inputs)
        x = self.head(self.norm_out(x[:, -tokens.shape[1]:]))  # only image tokens leave the tower
        return self.unpatchify(x, *z_t.shape[-2:])
