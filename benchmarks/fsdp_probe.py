"""The callback `benchmarks/fsdp.py` puts into each fit it launches (this folder on PYTHONPATH): per rank, to
`<path>.rank<k>.json`, the loss, samples and wall time of every training step, the peak RSS, the process's
threads, and the bytes of this rank's trainable parameters and AdamW states (local shards under FSDP2).

With `shared_noise` (the default) it also makes the step's randomness a function of the step and of each
sample's place in the GLOBAL batch, the same whatever the number of processes: the module keys it by (seed,
step, rank) instead, so rank 1 of a 2-process run would draw other timesteps and noise than the second half of
a 1-process batch, and the losses would differ by the draw, not by the strategy. Each rank draws the global
batch's timesteps, caption-dropout mask, noise and eps-greedy routing draws from generators seeded by (seed,
step, purpose) and keeps its own rows (the routing draws over `understanding.max_length` tokens, cropped to the
batch's padded prompt length, so the valid tokens of a prompt get the same draws however its batch was padded).
That replaces `MoSModule.training_step` on the instance with the same computation (lit.py: training_step and
loss) with the draws swapped; nothing in the kit is changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import time

import lightning as L
import torch

from mos_lightning.flow import flow_loss, interpolate, velocity_target
from mos_lightning.seeds import mix_seed

TIMESTEPS, DROPOUT, NOISE, ROUTING = 1, 2, 3, 4  # a generator per purpose, so one draw's size never moves another


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def sample_key(image: torch.Tensor, caption: str) -> str:
    """Caption and pixel hash (as tests/test_resume.py): the batch does not carry dataset indices."""
    pixels = image.detach().to("cpu").contiguous().numpy().tobytes()
    return f"{caption}|{hashlib.sha1(pixels).hexdigest()[:16]}"


class _Draws:
    """The current step's generators and this rank's rows of the global batch."""

    def __init__(self, seed: int, step: int, lo: int, total: int, max_tokens: int):
        self.seed, self.step, self.lo, self.total, self.max_tokens = seed, step, lo, total, max_tokens

    def generator(self, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, self.step, purpose))

    def rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t[self.lo:self.lo + n]


def install_shared_noise(module, trainer) -> None:
    """Replace the module's training_step (on the instance) and MoS's eps-greedy selection (in this process)
    with versions whose draws are keyed by the global batch; see the module docstring."""
    import mos_lightning.model.fusion.mos as mos
    from mos_lightning.model.router import _k_hot

    current: dict[str, _Draws | None] = {"draws": None}
    original = mos.select_top_k

    def select_top_k(weights, top_k, epsilon, generator=None):
        draws = current["draws"]
        if draws is None or epsilon <= 0:
            return original(weights, top_k, epsilon, generator)
        b, tokens, m, n = weights.shape  # (B, L, m, n)
        g = draws.generator(ROUTING)
        noise = draws.rows(torch.rand((draws.total, draws.max_tokens, m, n), generator=g), b)[:, :tokens]
        explore = draws.rows(torch.rand((draws.total, draws.max_tokens, n), generator=g), b)[:, :tokens] < epsilon
        noise, explore = noise.to(weights.device), explore.to(weights.device)
        greedy = _k_hot(weights.topk(top_k, dim=-2).indices, weights, -2)
        random = _k_hot(noise.topk(top_k, dim=-2).indices, weights, -2)
        return torch.where(explore.unsqueeze(-2), random, greedy)

    mos.select_top_k = select_top_k

    def training_step(batch, batch_idx):
        n, model = len(batch), module.model
        draws = _Draws(int(os.environ.get("PL_GLOBAL_SEED", 0)), trainer.global_step, n * trainer.global_rank,
                       n * trainer.world_size, max(model.understanding.max_length, 1))
        t = draws.rows(module.timesteps(draws.total, generator=draws.generator(TIMESTEPS)), n).to(module.device)
        drop = draws.rows(torch.rand(draws.total, generator=draws.generator(DROPOUT)), n) < module.caption_dropout
        drop = drop.to(module.device)
        z0 = model.autoencoder.encode(batch.images)
        noise = draws.rows(torch.randn((draws.total, *z0.shape[1:]), generator=draws.generator(NOISE)), n).to(z0)
        current["draws"] = draws
        try:
            states = model.states(batch.captions)
            velocity, _ = model(interpolate(z0, noise, t), t, states, drop)
        finally:
            current["draws"] = None
        module.latent_grid = (z0.shape[-2] // model.generation.patch_size, z0.shape[-1] // model.generation.patch_size)
        return module.training_loss(flow_loss(velocity, velocity_target(z0, noise)).mean(), batch)

    module.training_step = training_step


class FsdpProbe(L.Callback):
    """Per-rank figures of one fit, written at the end of training to `<path>.rank<k>.json`.

    Args:
        path: the files' prefix.
        shared_noise: draw the step's randomness per global-batch row (module docstring); False keeps the
            module's own (seed, step, rank) keying.
    """

    def __init__(self, path: str, shared_noise: bool = True):
        self.path, self.shared_noise = path, shared_noise
        self.seen: dict = {}
        self._start = 0.0

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.shared_noise:
            install_shared_noise(pl_module, trainer)

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        self.seen = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision), "threads": torch.get_num_threads(),
            "shared_noise": self.shared_noise,
            "trainable_params": sum(p.numel() for p in trainable),  # a DTensor's numel is the whole parameter's
            "local_params": sum(_local(p).numel() for p in trainable),
            "param_bytes": sum(_nbytes(p) for p in trainable),
            "sharded": [isinstance(p, DTensor) for p in trainable].count(True), "parameters": len(trainable),
            "block_dtype": None,
            "rss_train_start_kb": _status_kb("VmRSS"),
            "peak_rss_before_train_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "steps": [],
        }
        self.seen["peak_reset"] = _reset_peak_rss()
        block = pl_module.model.generation.blocks[0]

        def gathered(module, inputs):  # after FSDP's own pre-forward hook: what the block computes in
            p = next(module.parameters())
            self.seen["block_dtype"] = str(p.dtype).removeprefix("torch.")

        self._hook = block.register_forward_pre_hook(gathered)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seconds = time.perf_counter() - self._start
        self.seen["steps"].append({
            "step": trainer.global_step - 1, "loss": float(outputs["loss"]), "seconds": seconds,
            "rss_kb": _status_kb("VmRSS"), "shape": list(batch.images.shape[-2:]),
            "samples": [sample_key(image, caption) for image, caption in zip(batch.images, batch.captions)]})

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()
        optimizer = trainer.optimizers[0]
        states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        self.seen.update(
            optimizer_bytes=sum(_nbytes(v) for v in states),
            optimizer_moment_bytes=sum(_nbytes(v) for v in states if v.dim() > 0),  # exp_avg, exp_avg_sq
            peak_rss_train_kb=_status_kb("VmHWM") if self.seen["peak_reset"] else None,
            peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.seen, f)
