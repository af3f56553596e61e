"""The FLOP formula that benchmarks/strategies.py reports, against torch's own FLOP counter."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mos_lightning.model.router import MoSRouter
from mos_lightning.types import TowerGeometry, TowerStates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import router as router_flops  # noqa: E402


@pytest.mark.parametrize("depth", [1, 3])
def test_router_formula_counts_every_matmul(rng, depth):
    """Width 48 gives the house SwiGLU a hidden width of exactly 8/3 x 48, which the formula assumes."""
    m, n, d_u, d_g, prompt, latent = 5, 4, 32, 40, 7, 12
    r = MoSRouter(TowerGeometry(m, d_u, n, d_g), inputs=["prompt", "latent"], width=48, depth=depth, heads=2)
    hidden = torch.randn(1, m, prompt, d_u, generator=rng)
    states = TowerStates(hidden=hidden, mask=torch.ones(1, prompt, dtype=torch.bool))
    with FlopCounterMode(display=False) as counter:
        r(states, torch.randn(1, latent, d_g, generator=rng), torch.rand(1, generator=rng))
    assert counter.get_total_flops() == router_flops(r, prompt, latent, d_u, d_g, m, n)
