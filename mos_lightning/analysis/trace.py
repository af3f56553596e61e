"""One sampling run with everything the router figures need: Routing per step, intermediates, token strings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..sampling import timestep_schedule
from ..types import Routing


@dataclass
class Trace:
    """What `trace` recorded for `prompts` (App. B.7, Fig. 14).

    routings[i] was predicted at t = timesteps[i]; frames[i] is the image after step i (t = timesteps[i + 1]).
    """

    prompts: list[str]
    tokens: list[list[str]]  # per prompt, the token strings of its real (masked-in) context positions
    routings: list[Routing]  # one per step, on CPU; empty when the fusion strategy does not route
    frames: torch.Tensor  # (S, B, C, H, W) in [0, 1]: the decoded denoising trajectory
    timesteps: torch.Tensor  # (S + 1,) from 1 (noise) to 0 (image)

    @property
    def routes(self) -> bool:
        return bool(self.routings)


def token_strings(tower, caption: str) -> list[str]:
    """The tokens the understanding tower sees for `caption`, in order, with its truncation.

    They are the real positions of the caption's row in Routing.mask: the tower pads on the right
    (or its memo re-pads per caption with `unpad`), so padding never interleaves with them.
    """
    ids = tower.tokenizer(caption, truncation=True, max_length=tower.max_length)["input_ids"]
    return tower.tokenizer.convert_ids_to_tokens(ids)


def _to_cpu(routing: Routing) -> Routing:
    return Routing(*(x.detach().cpu() for x in (routing.logits, routing.weights, routing.selected, routing.mask)))


def trace(module, prompts: Sequence[str], image_size: tuple[int, int], seed: int = 0, steps: int | None = None,
          cfg_scale: float | None = None) -> Trace:
    """Generate `prompts` with a MoSModule's sampler settings, in eval mode (eps = 0), recording the
    conditional branch's Routing at every step and the decoded intermediate images."""
    steps = steps or module.sample_steps
    routings, frames = [], []
    decode = module.model.autoencoder.decode
    module.generate(list(prompts), tuple(image_size), seed, routings, steps, cfg_scale,
                    on_step=lambda i, z: frames.append((decode(z).float().cpu() + 1) / 2))
    tower = module.model.understanding
    return Trace(list(prompts), [token_strings(tower, p) for p in prompts], [_to_cpu(r) for r in routings],
                 torch.stack(frames), timestep_schedule(steps, module.sample_shift))
