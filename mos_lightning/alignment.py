"""REPA-style representation alignment (Yu et al., 2024, "Representation Alignment for Generation", arXiv
2410.06940): an optional training loss that pulls one middle generation block's image tokens, through a small
MLP, towards a frozen image encoder's patch features of the clean image. Not in the paper; off in the paper-scale
overlays. In the embedded domain the encoder is the shipped shapes-CLIP's ViT, whose 8x8 patch grid at 32x32 is
the generation tower's own token grid at patch 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class Repa(nn.Module):
    """Args:
        block: the generation block (0-based) whose output tokens are aligned (REPA: an early-middle one).
        weight: lambda, the loss's weight next to Eq. 1's.
        encoder: an open_clip model name for `evaluation.clip.load_clip` ("shapes-clip": the shipped one).
        hidden: the projector MLP's width.
    """

    def __init__(self, block: int = 2, weight: float = 0.5, encoder: str = "shapes-clip", hidden: int = 512):
        super().__init__()
        if weight <= 0 or block < 0:
            raise ConfigError(f"model.repa: block={block} must be >= 0 and weight={weight} > 0")
        self.block, self.weight, self.encoder_name, self.hidden = block, weight, encoder, hidden
        self.projector: nn.Module | None = None
        self._frozen: list = []  # the encoder, kept out of the module tree: never trained, never checkpointed
        self._captured: dict[str, torch.Tensor] = {}

    def bind(self, generation: nn.Module) -> None:
        """Load the encoder, build the projector for the tower's width and watch block `block`'s output."""
        from .evaluation.clip import load_clip

        if self.block >= generation.depth:
            raise ConfigError(f"model.repa.block={self.block}: the generation tower has blocks "
                              f"0-{generation.depth - 1}")
        clip = load_clip(self.encoder_name)
        visual = clip.model.visual.float().eval().requires_grad_(False)
        visual.output_tokens = True
        self._frozen[:] = [visual, clip.image_size]
        features = visual.ln_post.normalized_shape[0]
        self.projector = nn.Sequential(nn.Linear(generation.width, self.hidden), nn.SiLU(),
                                       nn.Linear(self.hidden, self.hidden), nn.SiLU(), nn.Linear(self.hidden, features))
        generation.blocks[self.block].register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self._captured["tokens"] = output

    @torch.no_grad()
    def targets(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the encoder's patch features on the tower's (h, w) token grid, (B, h*w, D).
        Any bucket is resized to the encoder's input size, and its token grid resized back to the tower's."""
        visual, size = self._frozen
        visual.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
            _, tokens = visual(x)  # (B, g*g, D) after ln_post
        side = int(tokens.shape[1] ** 0.5)
        tokens = tokens.transpose(1, 2).reshape(len(images), -1, side, side)
        tokens = F.interpolate(tokens, size=grid, mode="bilinear", align_corners=False)
        return tokens.flatten(2).transpose(1, 2)

    def loss(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-sample 1 - cos(projected tokens, targets), averaged over tokens, for the forward just run."""
        hidden = self._captured.pop("tokens")
        tokens = hidden[:, -grid[0] * grid[1]:]  # image tokens come last (after registers and any stream)
        predicted = self.projector(tokens.float())
        return 1 - F.cosine_similarity(predicted, self.targets(images, grid), dim=-1).mean(dim=1)
