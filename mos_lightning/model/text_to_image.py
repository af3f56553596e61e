"""Understanding tower + fusion strategy + generation tower, as one plain nn.Module (Eq. 1's G, R, U)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..flow import velocity_from_data
from ..types import Conditioning, TowerGeometry, TowerStates
from .autoencoder import Autoencoder, PixelSpace
from .fusion import Fusion
from .generation import GenerationTower
from .understanding import UnderstandingTower

FusionFactory = Callable[[TowerGeometry], Fusion]


class TextToImage(nn.Module):
    """G(z_t, t, R(t, c, z_t, U(c))): only the fusion and the generation tower learn (§3.1).

    `prediction`: what the generation tower's output means. "velocity": v itself (Eq. 1 as written);
    "data": z0, turned into v by flow.velocity_from_data, so the loss and the sampler are unchanged.
    """

    PREDICTIONS = ("velocity", "data")

    def __init__(self, understanding: UnderstandingTower, generation: GenerationTower, fusion: FusionFactory,
                 autoencoder: Autoencoder | None = None, prediction: str = "velocity"):
        super().__init__()
        if prediction not in self.PREDICTIONS:
            raise ConfigError(f"model.prediction={prediction!r} is not one of {list(self.PREDICTIONS)}")
        self.prediction = prediction
        self.understanding, self.generation = understanding, generation
        self.autoencoder = autoencoder or PixelSpace()
        generation.use_channels(self.autoencoder.channels)
        self.geometry = TowerGeometry(understanding.num_layers, understanding.width, generation.depth, generation.width,
                                      understanding.kv_heads, understanding.head_dim, generation.heads)
        self.fusion = fusion(self.geometry)
        understanding.capture_keys_values = self.fusion.reads_keys_values
        # the learned null context for caption dropout and classifier-free guidance
        self.null_context = nn.Parameter(torch.empty(self.geometry.understanding_layers, understanding.width))
        kv_width = understanding.kv_heads * understanding.head_dim
        self.null_keys_values = nn.Parameter(torch.empty(self.geometry.understanding_layers - 1, 2, kv_width)) \
            if self.fusion.reads_keys_values else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The null context (this module's own parameters; the towers and the fusion init their own)."""
        for p in (self.null_context, self.null_keys_values):
            if p is not None:
                nn.init.normal_(p, std=0.02)

    def states(self, captions: list[str], drop: torch.Tensor | None = None) -> TowerStates:
        """U(c) for every caption; rows where `drop` is True get the null context instead."""
        states = self.understanding(captions)
        return states if drop is None else self.with_null(states, drop)

    def with_null(self, states: TowerStates, drop: torch.Tensor) -> TowerStates:
        null = self.null_context.to(states.hidden.dtype)[None, :, None, :]  # (1, m, 1, D_u)
        hidden = torch.where(drop[:, None, None, None], null.expand_as(states.hidden), states.hidden)
        first_only = torch.zeros_like(states.mask)
        first_only[:, 0] = True
        kv = states.keys_values
        if kv is not None:
            null_kv = self.null_keys_values.to(kv.dtype)[None, :, :, None, :]  # (1, m - 1, 2, 1, D_kv)
            kv = torch.where(drop[:, None, None, None, None], null_kv.expand_as(kv), kv)
        return TowerStates(hidden=hidden, mask=torch.where(drop[:, None], first_only, states.mask), keys_values=kv)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, states: TowerStates,
                drop: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditioning]:
        """-> velocity (B, C, H, W) and the conditioning (with the Routing for MoS). Rows where `drop` is True
        see the null context (caption dropout, CFG's unconditional branch): applied here, inside forward,
        because a sharded model's own parameters (null_context) are whole only during its forward."""
        if drop is not None:
            states = self.with_null(states, drop)
        tokens = self.generation.patchify(z_t)  # (B, N, D_g), shared with the router (§3.2)
        conditioning = self.fusion(states, tokens, t)
        output = self.generation(z_t, t, conditioning, tokens=tokens)
        velocity = output if self.prediction == "velocity" else velocity_from_data(z_t, output, t)
        return velocity, conditioning

    def compile_regions(self) -> None:
        """Regional torch.compile: every generation block (they share one compiled graph per mode: training and
        no-grad, as validation and the callbacks' sampling run) and the fusion's own trainable regions (the MoS
        router's blocks). Dynamic shapes: any batch, prompt length and image size; the cold compile is paid once
        per machine (inductor's disk cache), whatever the depth and whatever the router sees. Parameter names,
        and so checkpoints, do not change.

        Inductor's pattern matcher is off for these regions: on CPU it rewrites the traced attention of the
        router's blocks into the flash kernel, whose backward made the compiled router slower than eager
        (docs/performance.md)."""
        for region in (*self.generation.blocks, *self.fusion.compiled_regions()):
            region.compile(dynamic=True, options={"pattern_matcher": False})

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
