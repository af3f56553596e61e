"""How the plain model is spread over processes: activation checkpointing, then regional compile, then FSDP2's
`fully_shard`, in torchtitan's order. Applied by MoSModule.configure_model; nothing in model/ knows of it.

Mixed precision follows App. A: the generation tower and the router gather their parameters in bf16 and
reduce-scatter gradients in fp32 (fp32 parameters and optimizer states stay sharded); the frozen
understanding tower runs in bf16 throughout; the autoencoder stays fp32 and unsharded.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import ConfigError
from .model.text_to_image import TextToImage
from .model.understanding import _layers
from .seeds import mix_seed

PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
KERNELS = ("eager", "triton")
FROZEN = dict(param_dtype=torch.bfloat16)


@dataclass(frozen=True)
class Parallelism:
    """model.parallelism.

    Args:
        activation_checkpointing: recompute each generation block's activations in the backward pass (less
            memory, about one more forward of compute).
        understanding: "replicate" (every rank holds the whole frozen tower: right for a small one) or
            "shard" (a FSDP2 group per layer, gathered for its forward).
        param_dtype: the dtype the trainable parameters are all-gathered and computed in: "bfloat16" (App. A)
            or "float32". Gradients are reduced in float32 either way.
        meta_init: build the trainable modules on the meta device (no memory) and allocate and initialise
            them after sharding, each rank only its shard (`materialize`); the frozen tower and the
            autoencoder are built as usual, with their loaded weights.
        kernels: "eager" (torch's modules) or "triton" (the RMSNorm and SwiGLU kernels of
            mos_lightning.kernels, App. A; CUDA only, swapped in before compile and sharding).
    """

    activation_checkpointing: bool = False
    understanding: str = "replicate"
    param_dtype: str = "bfloat16"
    meta_init: bool = False
    kernels: str = "eager"

    def __post_init__(self):
        if self.understanding not in ("replicate", "shard"):
            raise ConfigError(f"model.parallelism.understanding={self.understanding!r}: allowed 'replicate', 'shard'")
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"model.parallelism.param_dtype={self.param_dtype!r}: allowed {sorted(PARAM_DTYPES)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"model.parallelism.kernels={self.kernels!r}: allowed {', '.join(map(repr, KERNELS))}")

    def check_device(self, device: torch.device) -> None:
        """The Triton kernels run on CUDA only (on CPU they would need Triton's interpreter, far slower)."""
        if self.kernels == "triton" and torch.device(device).type != "cuda":
            raise ConfigError(f"model.parallelism.kernels='triton' needs a CUDA device, and this fit runs on "
                              f"{torch.device(device).type}; set --model.parallelism.kernels=eager")


def checkpoint_blocks(model: TextToImage) -> None:
    """Each generation block in a checkpoint wrapper (its state-dict keys are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.generation.blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def shard(model: TextToImage, mesh, understanding: str = "replicate", extra: Iterable[nn.Module] = (),
          param_dtype: str = "bfloat16") -> None:
    """fully_shard every generation block, the router's blocks, `extra` trainable modules (REPA's projector), the
    frozen tower (per layer, if sharded), then the root: patchify, head, Proj_j and the null context. Every
    trainable parameter ends up in a group: clip_grad_norm_ fails on a mix of DTensors and plain tensors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # App. A: bf16 all-gather, fp32 reduce-scatter
    trainable = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[param_dtype], reduce_dtype=torch.float32)
    for region in [*model.generation.blocks, *model.fusion.compiled_regions(), *extra]:
        fully_shard(region, mesh=mesh, mp_policy=trainable)
    ignored = set(model.autoencoder.parameters())
    tower = model.understanding.model
    if understanding == "shard":
        frozen = MixedPrecisionPolicy(**FROZEN)
        for layer in _layers(tower):
            fully_shard(layer, mesh=mesh, mp_policy=frozen)
        fully_shard(tower, mesh=mesh, mp_policy=frozen)
    else:
        ignored |= set(tower.parameters())
    fully_shard(model, mesh=mesh, mp_policy=trainable, ignored_params=ignored or None)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))


def materialize(model: nn.Module, device: torch.device | str) -> int:
    """Allocate every module whose own tensors are on the meta device on `device` (a sharded parameter: this
    rank's shard) and initialise it with its `reset_parameters`, children before parents (so the generation
    tower's zero head is not overwritten by the head's own init). Modules with real tensors, like the frozen
    tower, keep them. Returns how many modules were initialised."""
    pending = [m for m in model.modules() if _on_meta(m)]
    missing = sorted({type(m).__name__ for m in pending if not callable(getattr(m, "reset_parameters", None))})
    if missing:
        raise TypeError(f"materialize: {', '.join(missing)} built on the meta device without reset_parameters()")
    for module in pending:
        module.to_empty(device=device, recurse=False)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank and torch.device(device).type == "cpu":
            # DTensor's shard-aware RNG is CUDA-only: on CPU every rank would draw its shard from the same
            # stream, the same rows on each; a stream per rank keeps the init i.i.d. (it then depends on the
            # world size, as no CPU generator can draw one tensor's shards apart)
            torch.manual_seed(mix_seed(torch.initial_seed(), rank))
        for module in reversed(pending):  # reversed pre-order: every module after all of its descendants
            module.reset_parameters()
    return len(pending)


def parallelize(model: TextToImage, mesh=None, parallelism: Parallelism | None = None, compile: bool = False,
                extra: Iterable[nn.Module] = (), device: torch.device | str = "cpu") -> TextToImage:
    """The Triton kernels (if asked), activation checkpointing (if asked), regional compile (if asked), then
    FSDP2 over `mesh` (the data-parallel sub-mesh; none: one process, nothing sharded), then whatever was built
    on the meta device is materialised on `device`."""
    parallelism = parallelism or Parallelism()
    if parallelism.kernels == "triton":  # before sharding: FSDP2 records which module owns each parameter
        from .kernels import use_triton_kernels

        use_triton_kernels(model)
    if parallelism.activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        model.compile_regions()
    if mesh is not None:
        shard(model, mesh, parallelism.understanding, extra, parallelism.param_dtype)
    for module in (model, *extra):
        materialize(module, device)
    return model
