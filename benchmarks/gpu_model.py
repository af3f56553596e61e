"""What benchmarks/gpu.py measures, without the timing: the paper-size model of a training step built from the
overlays (a stand-in frozen tower and cached latents), its inputs, the step, the router's pass, FLOP counting, MFU,
the kernel cases and the report. The model parts run on any device, so tests/test_gpu_benchmark.py checks them on
CPU at a tiny size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mos_lightning.describe import TOWERS
from mos_lightning.flow import flow_loss, interpolate, velocity_target
from mos_lightning.model.autoencoder import Autoencoder
from mos_lightning.model.blocks import SwiGLU, ffn_hidden
from mos_lightning.model.fusion.mos import MoSFusion
from mos_lightning.model.generation import GenerationTower
from mos_lightning.model.text_to_image import TextToImage
from mos_lightning.types import TowerStates

ROOT = Path(__file__).resolve().parents[1]
SCALES = ROOT / "experiments" / "scale"
PAPER_SIZES = ("paper_ablation", "mos_s", "mos_l")
# dense bf16 peak FLOP/s by device name, first match wins (datasheets, without sparsity)
BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("H800", 989e12), ("A100", 312e12), ("A800", 312e12))


# --- what is measured: sizes, the model, a step ---------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """The trained model of a step: generation tower, MoS fusion and the frozen tower's output shape."""

    width: int
    depth: int
    heads: int
    patch_size: int
    channels: int  # latent channels (the autoencoder's)
    tower_layers: int  # m
    tower_width: int  # D_u
    context: int  # prompt tokens (the tower's max_length)
    fusion: dict = field(default_factory=dict)  # MoSFusion arguments
    latent: int = 64  # latent side: (latent / patch)^2 image tokens
    ffn_multiple: int = 1  # the generation blocks' FFN hidden width rounded up to this (the router's: in fusion)

    @property
    def tokens(self) -> int:
        return (self.latent // self.patch_size) ** 2


def scale_model(name: str) -> dict:
    """The `model` section of experiments/scale/<name>.yaml."""
    return yaml.safe_load((SCALES / f"{name}.yaml").read_text())["model"]


def shipped_config(path: str, subfolder: str | None = None) -> dict:
    """A tower's architecture as describe reads it: configs/towers/<last part of path>[/subfolder]/config.json."""
    return json.loads((TOWERS / Path(path.rstrip("/")).name / (subfolder or "") / "config.json").read_text())


def paper_size(name: str = "paper_ablation", latent: int = 64) -> Size:
    model = scale_model(name)
    gen, tower_args = model["generation"]["init_args"], model["understanding"]["init_args"]
    tower = shipped_config(tower_args["path"])
    vae_args = model["autoencoder"]["init_args"]
    channels = gen.get("channels") or shipped_config(vae_args["path"], vae_args.get("subfolder"))["z_dim"]
    fusion = dict(model["fusion"]["init_args"])
    return Size(gen["width"], gen["depth"], gen["heads"], gen["patch_size"], channels, tower["num_hidden_layers"] + 1,
                tower["hidden_size"], tower_args["max_length"], fusion, latent, gen.get("ffn_multiple", 1))


def unaligned(size: Size) -> Size:
    """The same size with every FFN hidden width left at int(8/3 x width) (ffn_multiple 1, the generation tower's
    and the router's): what the paper-size overlays ran before they set ffn_multiple."""
    return replace(size, ffn_multiple=1, fusion={**size.fusion, "router_ffn_multiple": 1})


class StandInTower(nn.Module):
    """The frozen tower's geometry without its weights: the step is fed random states of its shape."""

    def __init__(self, num_layers: int, width: int, max_length: int, kv_heads: int = 1, head_dim: int = 1):
        super().__init__()
        self.num_layers, self.width, self.max_length = num_layers, width, max_length
        self.kv_heads, self.head_dim, self.capture_keys_values = kv_heads, head_dim, False
        self.model = nn.Identity()  # the tower's network, empty: parallel.shard leaves it out of FSDP2


class CachedLatents(Autoencoder):
    """An autoencoder known by its channels only: the step starts from (cached) latents."""

    def __init__(self, channels: int, factor: int = 16):
        super().__init__()
        self.channels, self.factor = channels, factor


def build_model(size: Size, device: torch.device | str = "cpu") -> TextToImage:
    with torch.device(device):
        tower = StandInTower(size.tower_layers, size.tower_width, size.context)
        generation = GenerationTower(size.width, size.depth, size.heads, size.patch_size,
                                     ffn_multiple=size.ffn_multiple)
        return TextToImage(tower, generation, partial(MoSFusion, **size.fusion), CachedLatents(size.channels))


@dataclass
class StepInputs:
    z0: torch.Tensor  # (B, C, h, w) latents
    noise: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,)
    states: TowerStates  # hidden (B, m, L, D_u) in bf16, every token real


def step_inputs(size: Size, batch: int, device: torch.device | str = "cpu", seed: int = 0) -> StepInputs:
    g = torch.Generator(device).manual_seed(seed)
    latents = (batch, size.channels, size.latent, size.latent)
    hidden = torch.randn(batch, size.tower_layers, size.context, size.tower_width, generator=g, device=device)
    mask = torch.ones(batch, size.context, dtype=torch.bool, device=device)
    z0, noise = (torch.randn(latents, generator=g, device=device) for _ in range(2))
    return StepInputs(z0, noise, torch.rand(batch, generator=g, device=device), TowerStates(hidden.bfloat16(), mask))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW as lit.MoSModule builds it (App. A: betas 0.9, 0.95; weight decay 0.01 on matrices only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))


def forward_backward(model: TextToImage, x: StepInputs, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """Eq. 1's loss under autocast (`dtype` None: none) and its backward; returns the loss."""
    with torch.autocast(x.z0.device.type, dtype=dtype, enabled=dtype is not None):
        velocity, _ = model(interpolate(x.z0, x.noise, x.t), x.t, x.states)
    loss = flow_loss(velocity, velocity_target(x.z0, x.noise)).mean()
    loss.backward()
    return loss.detach()


def train_step(model: TextToImage, optimizer: torch.optim.Optimizer, x: StepInputs,
               dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    loss = forward_backward(model, x, dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def fusion_tokens(model: TextToImage, x: StepInputs, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """The patchified z_t that the fusion reads, (B, N, D_g): a leaf, so the router's backward still computes the
    gradient it sends back to the shared patchify in a step, without timing the patchify itself."""
    with torch.autocast(x.z0.device.type, dtype=dtype, enabled=dtype is not None), torch.no_grad():
        return model.generation.patchify(interpolate(x.z0, x.noise, x.t)).requires_grad_()


def router_pass(model: TextToImage, x: StepInputs, tokens: torch.Tensor, whole_fusion: bool = False,
                dtype: torch.dtype | None = torch.bfloat16) -> None:
    """The router alone (or the whole fusion: router, Eq. 4, Proj_j), forward + backward on a step's inputs."""
    with torch.autocast(x.z0.device.type, dtype=dtype, enabled=dtype is not None):
        fusion = model.fusion
        out = fusion(x.states, tokens, x.t).context if whole_fusion else fusion.router(x.states, tokens, x.t)
    out.float().sum().backward()


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """FLOPs of running fn() (forward and backward, if fn runs both), in total and by module path."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK if key in device_name), None)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None where the peak is unknown)."""
    return None if not peak or seconds <= 0 else flops / seconds / peak


# --- the kernel cases -------------------------------------------------------------------------------------------------

@dataclass
class KernelCase:
    name: str
    width: int
    shape: str
    impls: dict  # impl -> zero-argument callable running forward + backward
    bytes: int = 0  # what a fused pass moves (for GB/s)
    flops: int = 0  # matmul FLOPs (for TFLOP/s)


def grads(forward, inputs: list[torch.Tensor], dy: torch.Tensor):
    """A call running forward() and the backward of its output (gradient dy) to `inputs`."""
    return lambda: torch.autograd.grad(forward(), inputs, dy)


def norm_case(name: str, width: int, x: torch.Tensor, eager: nn.RMSNorm) -> KernelCase:
    from mos_lightning.kernels.rms_norm import TritonRMSNorm

    compiled = torch.compile(eager, dynamic=False)
    modules = {"eager": eager, "compile": compiled, "triton": TritonRMSNorm.from_eager(eager)}
    dy = torch.randn_like(x)
    impls = {k: grads(partial(m, x), [x, eager.weight], dy) for k, m in modules.items()}
    return KernelCase(name, width, "x".join(map(str, x.shape)), impls, bytes=5 * x.numel() * x.element_size())


def kernel_cases(width: int, heads: int, tokens: int, multiple: int = 1, device: str = "cuda") -> list[KernelCase]:
    from mos_lightning.kernels.swiglu import swiglu, swiglu_reference

    bf16, hidden = torch.bfloat16, ffn_hidden(width, 4.0, multiple)
    new = partial(torch.randn, device=device, dtype=bf16, requires_grad=True)
    cases = [norm_case("rms_norm", width, new(tokens, width), nn.RMSNorm(width, device=device, dtype=bf16))]
    q = new(tokens, width).view(1, tokens, heads, width // heads).transpose(1, 2)  # the block's (B, H, N, d) q view
    cases.append(norm_case("qk_norm", width // heads, q, nn.RMSNorm(width // heads, device=device, dtype=bf16)))
    gate_up = new(tokens, 2 * hidden)
    dy = torch.randn(tokens, hidden, device=device, dtype=bf16)
    acts = {"eager": swiglu_reference, "compile": torch.compile(swiglu_reference, dynamic=False), "triton": swiglu}
    cases.append(KernelCase("swiglu_act", hidden, f"{tokens}x{2 * hidden}",
                            {k: grads(partial(f, gate_up), [gate_up], dy) for k, f in acts.items()},
                            bytes=8 * tokens * hidden * 2))
    cases.append(ffn_case("swiglu_ffn", width, hidden, new(tokens, width)))
    if ffn_hidden(width) != hidden:  # the hidden width before ffn_multiple: int(8/3 x width)
        cases.append(ffn_case("ffn_unaligned", width, ffn_hidden(width), new(tokens, width)))
    return cases


def ffn_case(name: str, width: int, hidden: int, x: torch.Tensor) -> KernelCase:
    from mos_lightning.kernels.swiglu import TritonSwiGLU

    ffn = SwiGLU(width, hidden).to(x.device, x.dtype)
    modules = {"eager": ffn, "compile": torch.compile(ffn, dynamic=False), "triton": TritonSwiGLU.from_eager(ffn)}
    inputs, dy = [x, ffn.gate_up.weight, ffn.down.weight], torch.randn_like(x)
    tokens = x.shape[0]
    return KernelCase(name, width, f"{tokens}x{width}, hidden {hidden}",
                      {k: grads(partial(m, x), inputs, dy) for k, m in modules.items()},
                      flops=3 * 2 * tokens * width * 3 * hidden)


# --- the report -------------------------------------------------------------------------------------------------------

class Report:
    """Figures and errors of every section, written to --json after each one."""

    def __init__(self, path: str | None, args: argparse.Namespace):
        self.path, self.data, self.start = path, {"args": vars(args), "errors": []}, time.time()

    def section(self, name: str, fn, *args, banner: bool = True):
        if banner:
            print(f"\n== {name}", flush=True)
        try:
            return fn(*args)
        except Exception as error:
            print(f"{name} FAILED, continuing: {type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}")
            self.data["errors"].append({"section": name, "error": f"{type(error).__name__}: {error}"[:2000]})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()

    def write(self) -> None:
        self.data["wall_s"] = round(time.time() - self.start, 1)
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1, default=str))


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    except OSError:  # no git where the working tree was copied to
        return "unknown"
    return done.stdout.strip() or "unknown"


def header(report: Report) -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    props = torch.cuda.get_device_properties(0)
    peak = bf16_peak(props.name)
    info = {"gpu": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "commit": git_commit(), "bf16_peak_tflop_s": peak and peak / 1e12}
    report.data["device"] = info
    print(f"GPU: {info['gpu']} ({info['sms']} SMs, {info['memory_gib']} GiB); torch {info['torch']} (CUDA "
          f"{info['cuda']}), triton {triton_version}, commit {info['commit']}")
    print(f"dense bf16 peak: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU)'}", flush=True)
