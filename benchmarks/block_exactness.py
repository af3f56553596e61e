"""Speed-up of the context-token optimisation (keys/values only for context) over the naive block.

python benchmarks/block_exactness.py
"""
from __future__ import annotations

import torch
from common import header, median_seconds

from mos_lightning.model.blocks import Block, naive_block
from mos_lightning.model.embeddings import rope_2d


def main(batch: int = 64, image_tokens: int = 68, context_tokens: int = 16, width: int = 192, heads: int = 6) -> None:
    header()
    torch.manual_seed(0)
    block = Block(width, heads)
    x = torch.randn(batch, image_tokens, width)
    grid = int((image_tokens - 4) ** 0.5)  # 4 registers, then a square grid of patches, as the default tower
    rope = rope_2d(grid, grid, width // heads, leading=image_tokens - grid * grid)
    print(f"block width {width}, {image_tokens} image + {context_tokens} context tokens, batch {batch}, "
          "2-D RoPE on the image stream, forward+backward")
    for label, ctx_len in (("embedded size", context_tokens), ("long prompt (4x context)", 4 * context_tokens)):
        context = torch.randn(batch, ctx_len, width)
        mask = torch.ones(batch, ctx_len, dtype=torch.bool)

        def step(fn):
            return lambda: fn().sum().backward()

        fast = median_seconds(step(lambda: block(x, context, mask, rope=rope)), repeats=30)
        naive = median_seconds(step(lambda: naive_block(block, x, context, mask, rope=rope)), repeats=30)
        print(f"{label:>26}: optimised {fast * 1e3:7.2f} ms  naive {naive * 1e3:7.2f} ms  speed-up {naive / fast:.2f}x")


if __name__ == "__main__":
    main()
