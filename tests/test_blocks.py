"""The context-token optimisation equals the naive full block (DESIGN §3: context needs only K/V)."""
import torch

from mos_lightning.model.blocks import Block, naive_block


def test_optimised_block_equals_naive(rng):
    torch.manual_seed(rng.initial_seed() % 2**31)
    block = Block(dim=48, heads=4).double()
    for p in block.parameters():  # RMSNorm weights start at one; perturb so they matter
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 10, 48, dtype=torch.float64, generator=rng)
    context = torch.randn(3, 6, 48, dtype=torch.float64, generator=rng)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    torch.testing.assert_close(block(x, context, mask), naive_block(block, x, context, mask), rtol=1e-10, atol=1e-10)


def test_padded_context_is_ignored(rng):
    block = Block(dim=32, heads=2)
    x = torch.randn(2, 8, 32, generator=rng)
    context = torch.randn(2, 5, 32, generator=rng)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    changed = context.clone()
    changed[:, 3:] = torch.randn(2, 2, 32, generator=rng) * 10
    torch.testing.assert_close(block(x, context, mask), block(x, changed, mask))
    other = torch.randn(2, 5, 32, generator=rng)
    assert not torch.allclose(block(x, context, mask), block(x, other, mask))  # real tokens do matter
