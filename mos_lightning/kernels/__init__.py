"""Triton kernels for the generation blocks: RMSNorm and the SwiGLU activation (docs/kernels.md).

Importing this package does not import triton: the kernel modules load inside `use_triton_kernels`,
so a machine without a working triton only fails when the kernels are asked for.
"""
from __future__ import annotations

from torch import nn


def use_triton_kernels(model: nn.Module) -> int:
    """Replace, in place, every nn.RMSNorm with a weight and every blocks.SwiGLU under `model` by its kernel
    module, holding the same Parameter objects (an optimiser built before still sees them). Call it before
    fully_shard or torch.compile: FSDP2 records which module owns each parameter. A module registered under
    several names gets one kernel module everywhere. `model` itself is never swapped (no parent holds it).
    Returns how many modules were swapped."""
    try:
        from .rms_norm import TritonRMSNorm
        from .swiglu import TritonSwiGLU
    except ImportError as error:
        raise ImportError(f"the Triton kernels need a working triton installation: {error}") from error
    from ..model.blocks import SwiGLU

    def replacement(module: nn.Module) -> nn.Module | None:
        # exact types: a subclass may have its own forward, and the kernel modules are subclasses themselves
        if type(module) is nn.RMSNorm and module.weight is not None:
            return TritonRMSNorm.from_eager(module)
        if type(module) is SwiGLU:
            return TritonSwiGLU.from_eager(module)
        return None

    swapped: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (old, new); old kept alive so ids stay unique
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # not named_children(): it skips repeated children
            if child is None:
                continue
            if id(child) not in swapped:
                new = replacement(child)
                if new is None:
                    continue
                swapped[id(child)] = (child, new)
            setattr(parent, name, swapped[id(child)][1])
    return len(swapped)
