"""RMSNorm as Triton kernels: forward (one row per program) and backward (input and weight gradients).

Semantics are torch's `rms_norm`: statistics in float32 whatever the input dtype, eps None meaning
float32's machine epsilon (torch uses its compute type's epsilon, not the input's), the result in the
input's dtype (float32 under CUDA autocast, whose float32 list holds rms_norm). The kernels load,
upcast to float32, compute and cast on store, which is also what the Triton interpreter needs (it has
no bf16 arithmetic); they use `tl` ops only (no libdevice) for the same reason.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn

MAX_WIDTH = 65536  # one row lives in one block of registers
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton path applies to `x`: on CUDA, or on CPU under the interpreter (the tests)."""
    return x.dtype in KERNEL_DTYPES and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


def resolve_eps(eps: float | None) -> float:
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """torch ops only: x / rms(x) * weight over the trailing weight.numel() elements, in >= float32."""
    compute = torch.promote_types(x.dtype, torch.float32)
    rows = x.to(compute).reshape(-1, weight.numel())
    out = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + resolve_eps(eps))
    return (out * weight.to(compute).reshape(-1)).reshape(x.shape).to(x.dtype)


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_cols, eps,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * y_stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, dy_stride, x_stride, dx_stride,
                              n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
    # each program takes a run of rows and keeps its share of dW in float32; the host sums the shares
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row in range(start, end):
        dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
        dx = rstd * (g - x * (rstd * rstd * tl.sum(g * x, axis=0) / n_cols))
        tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x * rstd
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def rows_view(t: torch.Tensor, width: int) -> torch.Tensor:
    """A (rows, width) view with unit column stride (copied only when it has to be)."""
    t = t.reshape(-1, width)
    return t if t.stride(1) == 1 else t.contiguous()


def _launch_config(width: int) -> tuple[int, int]:
    if width > MAX_WIDTH:
        raise ValueError(f"Triton RMSNorm handles rows up to {MAX_WIDTH} wide, got {width}")
    block = triton.next_power_of_2(width)
    return block, min(max(block // 256, 1), 16)  # warps: enough threads to cover the row


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(rows, 4)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y (x's shape, out_dtype or x's dtype) and the float32 inverse RMS of each row, saved for backward."""
    width = weight.numel()
    block, warps = _launch_config(width)
    rows = rows_view(x, width)
    y = torch.empty(rows.shape, dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _rms_norm_forward_kernel[(rows.shape[0],)](rows, weight.contiguous(), y, rstd, rows.stride(0), y.stride(0),
                                                   width, resolve_eps(eps), BLOCK=block, num_warps=warps)
    return y.reshape(x.shape), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's shape and dtype) and dW (weight's shape and dtype, accumulated in float32)."""
    width = weight.numel()
    block, warps = _launch_config(width)
    rows, grad = rows_view(x, width), rows_view(dy, width)
    dx = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    programs = _programs(rows.shape[0], x.device)
    partial = torch.zeros(max(programs, 1), width, dtype=torch.float32, device=x.device)
    if programs:
        per_program = triton.cdiv(rows.shape[0], programs)
        _rms_norm_backward_kernel[(programs,)](grad, rows, weight.contiguous(), rstd, dx, partial, grad.stride(0),
                                               rows.stride(0), dx.stride(0), rows.shape[0], width, per_program,
                                               BLOCK=block, num_warps=warps)
    return dx.reshape(x.shape), partial.sum(0).to(weight.dtype).reshape(weight.shape)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float | None,
                out_dtype: torch.dtype | None) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps, out_dtype)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """float32 where CUDA autocast would run eager rms_norm in float32 (it is on autocast's fp32 list);
    the kernel then reads x as it is and writes float32, where eager copies x to float32 first."""
    return torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else None


class TritonRMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same `weight`, `eps`, `normalized_shape`, so state dicts load either way) on the kernels.
    Off CUDA (outside the interpreter), without a weight or for other dtypes it runs nn.RMSNorm's forward."""

    @classmethod
    def from_eager(cls, norm: nn.RMSNorm) -> "TritonRMSNorm":
        """A kernel module holding `norm`'s own weight Parameter (optimisers and FSDP see the same one)."""
        new = cls(norm.normalized_shape, norm.eps, norm.elementwise_affine, device="meta")
        new.weight = norm.weight
        return new.train(norm.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trailing = tuple(x.shape[-len(self.normalized_shape):])
        if self.weight is None or trailing != tuple(self.normalized_shape) or not runs_kernels(x):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps, autocast_dtype(x))
