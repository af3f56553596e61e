"""The LightningModule: connects the plain model to flow matching, optimisation and logging."""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Callable, Sequence

import lightning as L
import torch

from .alignment import Repa
from .ema import Ema
from .errors import ConfigError
from .flow import LogitNormal, TimestepSampler, flow_loss, interpolate, velocity_target
from .model.autoencoder import Autoencoder
from .model.fusion import MoSFusion
from .model.generation import GenerationTower
from .model.text_to_image import FusionFactory, TextToImage
from .model.understanding import UnderstandingTower
from .parallel import Parallelism, parallelize
from .sampling import generate
from .seeds import mix_seed
from .types import Batch

NO_DECAY = ("registers", "null_context", "null_keys_values", "cls")  # embeddings: no weight decay (App. A recipe)


class MoSModule(L.LightningModule):
    """Rectified-flow training of a TextToImage model (Eq. 1) with the App. A optimiser.

    Args:
        understanding, generation, fusion, autoencoder: the model's components (class_path in YAML);
            `fusion` is given the towers' geometry when the model is built.
        timesteps: the training timestep sampler (App. A: logit-normal, later mode sampling).
        prediction: "velocity" (the tower outputs v, Eq. 1) or "data" (it outputs z0; the loss is still
            Eq. 1's velocity MSE). "data" learns faster at the embedded budget (docs/training-recipe.md).
        caption_dropout: fraction of captions replaced by the learned null context (for CFG).
        lr, min_lr, weight_decay, betas, warmup_steps: AdamW, linear warm-up, cosine to min_lr.
        val_timesteps: val/loss is averaged over these fixed t, with fixed noise, so arms compare.
        sample_steps, cfg_scale, sample_shift: defaults for `sample` and the sample-grid callback.
        repa: an optional REPA alignment loss on one generation block (alignment.Repa); training only, so
            val/loss stays Eq. 1's and comparable across arms.
        ema: an optional EMA of the model's trainable parameters (ema.Ema); when set, validation, evaluation,
            the sample grid and `sample` use the averaged weights; the average is in the state dict (`ema.*`).
        parallelism: activation checkpointing and how the frozen tower is placed under FSDP2 (parallel.Parallelism);
            sharding itself happens only under Lightning's ModelParallelStrategy (docs/scaling.md).
        compile: torch.compile the generation tower's blocks and the MoS router's (TextToImage.compile_regions),
            in `configure_model` (before any sharding).
            A one-off cold compile (a training and a no-grad graph per region), cached on disk by inductor
            for later runs, for faster steps after it (docs/performance.md). Needs a C++ compiler on CPU
            (checked in `setup`).
    """

    def __init__(self, understanding: UnderstandingTower | None = None, generation: GenerationTower | None = None,
                 fusion: FusionFactory | None = None, autoencoder: Autoencoder | None = None,
                 timesteps: TimestepSampler | None = None, prediction: str = "velocity", caption_dropout: float = 0.1,
                 lr: float = 1e-4, min_lr: float = 1.5e-5, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 4000,
                 val_timesteps: Sequence[float] = (0.2, 0.4, 0.6, 0.8), sample_steps: int = 20, cfg_scale: float = 1.0,
                 sample_shift: float = 1.0, repa: Repa | None = None, ema: Ema | None = None,
                 parallelism: Parallelism | None = None, compile: bool = False):
        super().__init__()
        # logger=False: the CLI logs each arm's HParams itself, with its final metrics (results.log_row).
        self.save_hyperparameters(logger=False, ignore=["understanding", "generation", "fusion", "autoencoder",
                                                        "timesteps", "repa", "ema", "parallelism"])
        self.strict_loading = False  # checkpoints leave out the frozen understanding tower
        if not 0.0 <= caption_dropout < 1.0:
            raise ConfigError(f"model.caption_dropout={caption_dropout} out of range: allowed [0, 1)")
        self.parallelism, self._configured = parallelism or Parallelism(), False
        understanding = understanding or UnderstandingTower()
        with torch.device("meta") if self.parallelism.meta_init else nullcontext():  # materialised in configure_model
            self.model = TextToImage(understanding, generation or GenerationTower(), fusion or MoSFusion,
                                     autoencoder, prediction)
        self.repa = repa
        if repa is not None:
            repa.bind(self.model.generation)
        self.register_state_dict_post_hook(drop_frozen)
        self.ema = ema
        if ema is not None:
            ema.bind(self.model.named_parameters())
        self.timesteps = timesteps or LogitNormal()
        self.caption_dropout = caption_dropout
        self.lr, self.min_lr, self.weight_decay, self.betas = lr, min_lr, weight_decay, tuple(betas)
        self.warmup_steps, self.val_timesteps = warmup_steps, tuple(val_timesteps)
        self.sample_steps, self.cfg_scale, self.sample_shift = sample_steps, cfg_scale, sample_shift

    def setup(self, stage: str) -> None:
        self.parallelism.check_device(self.trainer.strategy.root_device)
        if self.hparams.compile:
            check_compiler(self.trainer.strategy.root_device)

    def configure_model(self) -> None:
        """Compile and, under ModelParallelStrategy, shard (parallel.parallelize); once, however many times a
        trainer asks (`fit` validates first, then fits)."""
        if self._configured:
            return
        self._configured = True
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        parallelize(self.model, None if mesh is None else mesh["data_parallel"], self.parallelism,
                    compile=self.hparams.compile, extra=[self.repa.projector] if self.repa is not None else [],
                    device=self.trainer.strategy.root_device if self._trainer is not None else "cpu")
        if self.ema is not None:  # sharding (or materialising) replaced the parameters
            self.ema.bind(self.model.named_parameters())

    def loss(self, batch: Batch, t: torch.Tensor, drop: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample Eq. 1 loss at timesteps t; the noise z1 comes from `generator` (global RNG if None)."""
        z0 = self.model.autoencoder.encode(batch.images)
        noise = torch.randn(z0.shape, generator=generator, device="cpu" if generator is not None else z0.device).to(z0)
        states = self.model.states(batch.captions)
        velocity, _ = self.model(interpolate(z0, noise, t), t, states, drop)
        self.latent_grid = (z0.shape[-2] // self.model.generation.patch_size,
                            z0.shape[-1] // self.model.generation.patch_size)
        return flow_loss(velocity, velocity_target(z0, noise))

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Training randomness (t, noise, caption dropout, eps-greedy) from (seed, step, rank), not from a
        running stream: Lightning does not checkpoint RNG state, and this makes `fit --ckpt_path` continue
        exactly as the uninterrupted run would."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything (LightningCLI's seed_everything)
        torch.manual_seed(mix_seed(seed, self.trainer.global_step, self.trainer.global_rank))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        n = len(batch)
        t = self.timesteps(n, device=self.device)
        drop = torch.rand(n, device=self.device) < self.caption_dropout
        return self.training_loss(self.loss(batch, t, drop).mean(), batch)

    def training_loss(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Log the batch's Eq. 1 loss and add REPA's alignment term (if on): what a training step returns."""
        n = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if self.repa is not None:
            alignment = self.repa.loss(batch.images, self.latent_grid).mean()
            self.log("train/repa", alignment, batch_size=n)
            loss = loss + self.repa.weight * alignment
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # A parameter an arm never uses (cross-attention leaves the blocks' context norms idle) gets a zero
        # gradient, so the optimiser holds a state for every parameter: a sharded checkpoint's load asks for one.
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: ModelCheckpoint saves in its on_train_batch_end, which runs first.
        if self.ema is not None:
            self.ema.update(self.trainer.global_step + 1)  # global_step counts this step once the hook returns

    def on_validation_epoch_start(self) -> None:
        # Module hooks run after the callbacks' at epoch start and end, so the Evaluation, sample-grid and
        # router callbacks see the EMA weights, and ModelCheckpoint (on_validation_end) the raw ones.
        if self.ema is not None:
            self.ema.swap()

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.swap()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        losses = []
        for t_value in self.val_timesteps:
            t = torch.full((len(batch),), t_value, device=self.device)
            generator = torch.Generator().manual_seed(batch_idx)  # the same noise for every arm, epoch and t
            losses.append(self.loss(batch, t, generator=generator).mean())
            self.log(f"val/loss_t{t_value:g}", losses[-1], batch_size=len(batch))
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=len(batch))

    def generate(self, captions: list[str], image_size: tuple[int, int], seed: int = 0, routings: list | None = None,
                 steps: int | None = None, cfg_scale: float | None = None, on_step=None) -> torch.Tensor:
        """Images in [-1, 1], in eval mode (eps = 0); `routings` and `on_step` as in sampling.generate.

        Under a trainer, sampling runs as validation inside `fit` does: no grad, the trainer's precision (bf16
        autocast by default), so with `model.compile` it reuses validation's compiled graphs rather than
        adding float32 ones. Without a trainer (`sample`, notebooks) it runs in the weights' dtype."""
        was_training = self.training
        self.eval()
        precision = self._trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        try:
            with precision:
                return generate(self.model, captions, image_size, steps or self.sample_steps,
                                self.cfg_scale if cfg_scale is None else cfg_scale, self.sample_shift, seed, routings,
                                on_step=on_step)
        finally:
            self.train(was_training)

    def configure_optimizers(self):
        decay, no_decay = [], []
        trainable = [*self.model.named_parameters(), *(self.repa.named_parameters() if self.repa else [])]
        for name, p in trainable:
            if p.requires_grad:
                (no_decay if p.ndim < 2 or name.endswith(NO_DECAY) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        factor = warmup_cosine(self.warmup_steps, total, self.min_lr / self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU builds C++ kernels: find the compiler inductor would use (CXX, else g++ or clang++)
    before the first step, rather than failing inside it."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # inductor's InvalidCxxCompiler, or whatever its search raises
        raise ConfigError(f"model.compile=true on CPU needs a C++ compiler for torch.compile, and none was found "
                          f"({type(err).__name__}); install g++ or set --model.compile=false") from None


def drop_frozen(module, state_dict: dict, prefix: str, local_metadata) -> None:
    """The frozen tower and the autoencoder are not ours to save: they reload from their paths. Left out of
    the state dict itself (not only the checkpoint), so a sharded checkpoint's load does not ask for them."""
    frozen = (f"{prefix}model.understanding.", f"{prefix}model.autoencoder.")
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def warmup_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over `warmup` steps, then cosine 1 -> floor at `total` (App. A)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
