"""The SwiGLU activation as Triton kernels: silu(gate) * up read straight from the `gate_up` projection.

The kernels index the two halves of each row (gate first, like `.chunk(2, -1)`), so no chunk copies are
made, and compute in float32 with one rounding on store. Backward recomputes the sigmoid from the saved
`gate_up` rather than saving it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..model.blocks import SwiGLU
from .rms_norm import rows_view, runs_kernels

BLOCK = 1024  # columns per program; wider rows take several programs


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(gu_ptr, out_ptr, gu_stride, out_stride, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: axis 1 is limited to 65535 programs
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_stride + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dy_ptr, gu_ptr, dgu_ptr, dy_stride, gu_stride, dgu_stride, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_stride + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = sig(g) (1 + g (1 - sig(g)))
    d_up = dy * gate * sig
    tl.store(dgu_ptr + row * dgu_stride + cols, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + row * dgu_stride + hidden + cols, d_up.to(dgu_ptr.dtype.element_ty), mask=mask)


def _hidden(gate_up: torch.Tensor) -> int:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"SwiGLU needs an even last dimension (gate ; up), got {gate_up.shape[-1]}")
    return gate_up.shape[-1] // 2


def _grid(rows: int, hidden: int) -> tuple[int, int]:
    return rows, triton.cdiv(hidden, BLOCK)


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, of shape (..., hidden), in gate_up's dtype."""
    hidden = _hidden(gate_up)
    rows = rows_view(gate_up, 2 * hidden)
    out = torch.empty(rows.shape[0], hidden, dtype=gate_up.dtype, device=gate_up.device)
    if out.numel():
        _swiglu_forward_kernel[_grid(*out.shape)](rows, out, rows.stride(0), out.stride(0), hidden, BLOCK=BLOCK)
    return out.reshape(*gate_up.shape[:-1], hidden)


def swiglu_backward(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The gradient of gate_up (its shape and dtype) given the gradient of the activation."""
    hidden = _hidden(gate_up)
    rows, grad = rows_view(gate_up, 2 * hidden), rows_view(dy, hidden)
    dgu = torch.empty(rows.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgu.numel():
        _swiglu_backward_kernel[_grid(rows.shape[0], hidden)](grad, rows, dgu, grad.stride(0), rows.stride(0),
                                                              dgu.stride(0), hidden, BLOCK=BLOCK)
    return dgu.reshape(gate_up.shape)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu_forward(gate_up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(dy, gate_up)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate_up)


class TritonSwiGLU(SwiGLU):
    """blocks.SwiGLU (same `gate_up` and `down` Linears, so state dicts load either way) with the fused
    activation. Off CUDA (outside the interpreter) it runs the eager activation."""

    @classmethod
    def from_eager(cls, ffn: SwiGLU) -> "TritonSwiGLU":
        """A kernel module holding `ffn`'s own Linear submodules (hence the same Parameters)."""
        with torch.device("meta"):  # the placeholders are replaced at once: allocate nothing
            new = cls(ffn.gate_up.in_features, ffn.down.in_features)
        new.gate_up, new.down = ffn.gate_up, ffn.down
        return new.train(ffn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        return self.down(swiglu(gate_up) if runs_kernels(gate_up) else swiglu_reference(gate_up))
