"""The context-token optimisation equals the naive full block (DESIGN §3: context needs only K/V); 2-D RoPE."""
import numpy as np
import pytest
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.model.blocks import Block, attention, ffn_hidden, naive_block
from mos_lightning.model.embeddings import apply_rope, rope_2d
from mos_lightning.model.generation import GenerationTower


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


def test_cpu_attention_against_float64_sdpa(rng):
    """The written-out CPU attention, on bf16 inputs as under autocast, against torch's SDPA in float64."""
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64, generator=rng) for n in (7, 11, 11))
    mask = torch.rand(2, 1, 1, 11, generator=rng) > 0.4
    mask[..., 0] = True  # every query has a key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, mask), expected, rtol=1e-10, atol=1e-10)
    low = attention(*(x.bfloat16() for x in (q, k, v)), mask)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (steps of 2^-8 = 0.4 %): inputs, scores, softmax and output each rounded,
    # on values of order 1, stay within a few 1e-2 on any CPU, native bf16 or emulated
    torch.testing.assert_close(low.double(), expected, rtol=0.05, atol=0.05)


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


def _rope_reference(x, ys, xs, theta):
    """float64 complex-number RoPE: pair (x_i, x_{i+d/2}) turns by ys*f_i for the first d/4 pairs, xs*f_i after."""
    d = x.shape[-1]
    freqs = theta ** -(np.arange(d // 4) / (d // 4))
    angles = np.concatenate([np.outer(ys, freqs), np.outer(xs, freqs)], axis=1)  # (L, d/2)
    pairs = x[..., : d // 2] + 1j * x[..., d // 2:]
    turned = pairs * np.exp(1j * angles)
    return np.concatenate([turned.real, turned.imag], axis=-1)


def test_rope_matches_complex_reference_and_skips_leading_tokens(rng):
    h, w, d, leading = 3, 5, 16, 2
    x = torch.randn(2, 4, leading + h * w, d, dtype=torch.float64, generator=rng)
    out = apply_rope(x, rope_2d(h, w, d, leading=leading, theta=37.0))
    ys, xs = np.divmod(np.arange(h * w), w)
    expected = _rope_reference(x[..., leading:, :].numpy(), ys, xs, 37.0)
    np.testing.assert_allclose(out[..., leading:, :].numpy(), expected, rtol=1e-6, atol=1e-6)  # float32 angle tables
    torch.testing.assert_close(out[..., :leading, :], x[..., :leading, :])  # registers are not rotated


def test_rope_attention_depends_on_offset_only(rng):
    """q.k after rotation is a function of the 2-D offset between the tokens: shift both, same score."""
    d = 16
    q, k = torch.randn(d, dtype=torch.float64, generator=rng), torch.randn(d, dtype=torch.float64, generator=rng)
    cos, sin = rope_2d(6, 7, d, theta=100.0)
    cos, sin = cos.double(), sin.double()

    def score(a, b):  # a, b: (row, col) on the 6 x 7 grid
        i, j = a[0] * 7 + a[1], b[0] * 7 + b[1]
        return apply_rope(q, (cos[i], sin[i])) @ apply_rope(k, (cos[j], sin[j]))

    # float32 angle tables: errors scale with |q||k|, not with the score, which a random draw can put near 0
    scale = (q.norm() * k.norm()).item()
    assert score((1, 2), (3, 1)).item() == pytest.approx(score((2, 5), (4, 4)).item(), abs=1e-6 * scale)
    assert score((1, 2), (3, 1)).item() != pytest.approx(score((1, 2), (1, 3)).item(), abs=1e-3 * scale)


def test_optimised_block_equals_naive_with_rope(rng):
    block = Block(dim=48, heads=4).double()
    for p in block.parameters():
        p.data.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=rng))
    x = torch.randn(2, 3 + 12, 48, dtype=torch.float64, generator=rng)  # 3 registers + a 3 x 4 grid
    context = torch.randn(2, 5, 48, dtype=torch.float64, generator=rng)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    rope = tuple(r.double() for r in rope_2d(3, 4, 12, leading=3))
    out = block(x, context, mask, rope=rope)
    torch.testing.assert_close(out, naive_block(block, x, context, mask, rope=rope), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, block(x, context, mask))  # the rotation changes the result


def test_rope_settings_are_checked():
    with pytest.raises(ConfigError, match="rope_theta"):
        GenerationTower(width=24, depth=1, heads=4)  # head dim 6 is not divisible by 4
    with pytest.raises(ConfigError, match="rope_theta"):
        GenerationTower(width=32, depth=1, heads=2, rope_theta=1.0)
    GenerationTower(width=24, depth=1, heads=4, rope_theta=None)  # absolute positions only: any head dim


@pytest.mark.parametrize("dim, multiple", [(192, 1), (64, 1), (2048, 128), (3584, 128), (1792, 128), (100, 7)])
def test_ffn_hidden_width(dim, multiple):
    """2/3 of 4 x dim, rounded up to `multiple`; 1 keeps the embedded widths (512 at 192) as they were."""
    hidden = ffn_hidden(dim, 4.0, multiple)
    exact = int(dim * 8 / 3)
    assert hidden % multiple == 0 and exact <= hidden < exact + multiple
    assert Block(dim, 4, ffn_multiple=multiple).ffn.down.in_features == hidden
    with pytest.raises(ConfigError, match="ffn_multiple=0"):
        ffn_hidden(dim, 4.0, 0)
