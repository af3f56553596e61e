"""Train the packaged shapes autoencoder (a small diffusers AutoencoderKL) on the embedded shapes domain, on CPU.

    python tools/train_shapes_autoencoder.py --out mos_lightning/model/assets/shapes_autoencoder

A maintainer's tool, outside the runtime package: the kit only loads the folder it wrote
(`mos_lightning.model.autoencoder.DiffusersAutoencoder`, from config.json + diffusion_pytorch_model.safetensors).

Model: spatial factor 4 (three blocks, two downsamplings), 4 latent channels, ~1M parameters, float32. It learns
from all three canvases of the default bucket table (40x24, 32x32, 24x40, one shape per batch, in turn), since
BucketedShapesDataset feeds the generation tower all three. Loss on images in [-1, 1], with a posterior sample
as the decoder's input: MSE + L1, weighted up on and next to shapes, + a term on the worst pixels (see
`loss_step`: ShapesEval fails on single wrong pixels) + 1e-6 KL; AdamW, linear warm-up, cosine to a tenth of
the peak.

Normalisation written into the config: per-channel `latents_mean` / `latents_std` of the posterior mean over
training renders. The kit uses these (z_norm = (z - latents_mean) / latents_std * scaling_factor, as diffusers'
pipelines do), so `scaling_factor` is written as 1.0: anything else would scale the kit's latents twice.
`shift_factor` is the mean over channels (unused when per-channel statistics exist); a tool that knows only the
scalar form should be given scaling_factor = 1 / mean(latents_std), which the report prints.

Data: ShapesDataset seeds 5_000_011 + seed (training and the latent statistics) and 5_500_003 (held-out PSNR);
ShapesEval uses the Evaluation callback's prompt set (seed 2_000_003, 24 per category). The kit trains on
0 / 1_000_003; shapes CLIP used 3_000_017 / 3_500_029 / 4_000_037. Same seed, machine and thread count -> same
weights. Writes a Markdown result file to benchmarks/results/ (see its README).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the checkout, not an installed package

from benchmarks.record import git, result_path, versions  # noqa: E402
from mos_lightning.data.buckets import bucket_table  # noqa: E402
from mos_lightning.data.shapes import CATEGORIES, ShapesDataset, render, to_tensor  # noqa: E402
from mos_lightning.errors import ConfigError  # noqa: E402
from mos_lightning.evaluation import shapes_eval  # noqa: E402
from mos_lightning.machine import describe_cpu  # noqa: E402

DATA_SEED, HELDOUT_SEED = 5_000_011, 5_500_003
MAX_SEED = 400_000  # keeps the train stream clear of the held-out seed
SHIPPED = ROOT / "mos_lightning" / "model" / "assets" / "shapes_autoencoder"
BUCKETS = tuple(bucket_table(32, 8, 2.0))  # (40, 24), (32, 32), (24, 40): BucketedShapesDataset's defaults
ARCHITECTURE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                    latent_channels=4, norm_num_groups=16, sample_size=32)
HELDOUT = 384  # held-out renders per canvas for PSNR
PACKAGES = ("torch", "diffusers", "numpy", "pillow")


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    l1_weight: float = 1.0
    fg_weight: float = 4.0  # extra weight of pixels on or next to a shape
    worst_weight: float = 0.1  # weight of the mean error of the worst pixels
    worst_fraction: float = 0.005  # of the batch's pixels
    kl_weight: float = 1e-6
    seed: int = 0  # model init and the data stream
    log_every: int = 50


def batches(seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Endless batches of renders in [-1, 1]; batch b is canvas BUCKETS[b % 3], the next `batch_size` samples
    of that canvas's stream. Deterministic in `seed`."""
    streams = [ShapesDataset(10**12, DATA_SEED + seed, size) for size in BUCKETS]
    taken = [0] * len(BUCKETS)
    for b in range(10**12):
        k = b % len(BUCKETS)
        images = [streams[k][i][0] for i in range(taken[k], taken[k] + batch_size)]
        taken[k] += batch_size
        yield torch.stack(images)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to a tenth of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def loss_step(vae: AutoencoderKL, x: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, MSE) of decoding a posterior sample. ShapesEval segments pixel by pixel, so one wrong pixel at a
    diamond's tip or in a small cross's corner gap changes a shape: pixels on or next to a shape weigh
    1 + fg_weight (most of a canvas is easy black), and the worst `worst_fraction` of pixels (summed squared
    error) add worst_weight times their mean. The KL is summed per image (as diffusers' kl()), batch-mean."""
    posterior = vae.encode(x).latent_dist
    d = vae.decode(posterior.sample()).sample - x
    near = F.max_pool2d((x.amax(1, keepdim=True) > -0.5).float(), 3, stride=1, padding=1)  # shapes, dilated 1 px
    per_pixel = ((1 + cfg.fg_weight * near) * (d.pow(2) + cfg.l1_weight * d.abs())).mean(1)
    worst = d.pow(2).sum(1).flatten().topk(max(1, round(cfg.worst_fraction * per_pixel.numel()))).values
    loss = per_pixel.mean() + cfg.worst_weight * worst.mean() + cfg.kl_weight * posterior.kl().mean()
    return loss, d.pow(2).mean().detach()


def train(cfg: TrainConfig, log: Callable[[str], None] | None = print) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL (seeded), trained for cfg.steps steps; returned in eval mode."""
    if cfg.steps < 1 or cfg.batch_size < 1 or not 0 <= cfg.seed < MAX_SEED:
        raise ConfigError(f"steps/batch_size/seed: need steps >= 1, batch_size >= 1, 0 <= seed < {MAX_SEED}; "
                          f"got {cfg.steps}/{cfg.batch_size}/{cfg.seed}")
    torch.manual_seed(cfg.seed)  # init and posterior samples
    vae = AutoencoderKL(**ARCHITECTURE).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    data, start = batches(cfg.seed, cfg.batch_size), time.perf_counter()
    for step in range(cfg.steps):
        loss, mse = loss_step(vae, next(data), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            spent = time.perf_counter() - start
            log(f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} mse {mse.item():.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {spent:.0f}s, eta {spent / (step + 1) * (cfg.steps - step - 1):.0f}s")
    return vae.eval()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Encode with the posterior mean (as the kit does), decode, clamp to [-1, 1] (as the kit's decode)."""
    parts = [vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) for x in images.split(batch)]
    return torch.cat(parts)


def psnr(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, MSE) of the whole set, both on images mapped to [0, 1]."""
    mse = ((x - y) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse), mse


def renders(seed: int, size: tuple[int, int], n: int, start: int = 0) -> torch.Tensor:
    data = ShapesDataset(start + n, seed, size)
    return torch.stack([data[i][0] for i in range(start, start + n)])


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, seed: int, per_bucket: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mean over `per_bucket` training renders of each canvas (every
    latent cell of every image counts once)."""
    zs = [vae.encode(x).latent_dist.mode().permute(1, 0, 2, 3).flatten(1)
          for size in BUCKETS for x in renders(DATA_SEED + seed, size, per_bucket).split(128)]
    z = torch.cat(zs, dim=1).double()
    return z.mean(1).tolist(), z.std(1).tolist()


def save(vae: AutoencoderKL, out: Path, mean: list[float], std: list[float]) -> list[Path]:
    """save_pretrained (safetensors) with the normalisation in the config; see the module docstring."""
    vae.register_to_config(latents_mean=[round(v, 6) for v in mean], latents_std=[round(v, 6) for v in std],
                           scaling_factor=1.0, shift_factor=round(float(np.mean(mean)), 6))
    vae.save_pretrained(out, safe_serialization=True)
    return sorted(out.iterdir())


def evaluate(vae: AutoencoderKL, per_category: int = 24, heldout: int = HELDOUT) -> dict:
    """Held-out PSNR/MSE per canvas, and ShapesEval of the prompt set's renders vs their reconstructions."""
    out: dict = {"psnr": {}, "shapes_eval": {}}
    for size in BUCKETS:
        x = renders(HELDOUT_SEED, size, heldout)
        out["psnr"][size] = psnr(reconstruct(vae, x), x)
        scenes = shapes_eval.prompt_set(per_category, image_size=size)
        x = torch.stack([to_tensor(render(s)) for s in scenes])
        out["shapes_eval"][size] = (shapes_eval.score(scenes, x), shapes_eval.score(scenes, reconstruct(vae, x)))
    return out


def check_saved(out: Path, mean: list[float], std: list[float]) -> AutoencoderKL:
    """Reload the folder as the kit would and confirm the statistics survived in its config."""
    vae = AutoencoderKL.from_pretrained(out, torch_dtype=torch.float32, use_safetensors=True,
                                        low_cpu_mem_usage=False).eval()  # no accelerate: say so, no warning
    got = vae.config
    if not (np.allclose(got.latents_mean, mean, atol=1e-5) and np.allclose(got.latents_std, std, atol=1e-5)):
        raise RuntimeError(f"{out}: latents_mean/latents_std did not round-trip: {got.latents_mean} {got.latents_std}")
    return vae


def kit_latent_check(out: Path, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the kit's normalised latents on fresh training renders: ~0 / ~1 if the config's
    normalisation is what the kit reads."""
    from mos_lightning.model.autoencoder import DiffusersAutoencoder

    ae = DiffusersAutoencoder(str(out))
    z = torch.cat([ae.encode(renders(DATA_SEED + seed, size, 256, start=10**6)).permute(1, 0, 2, 3).flatten(1)
                   for size in BUCKETS], dim=1)
    return z.mean(1).tolist(), z.std(1).tolist()


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def results_table(metrics: dict) -> list[str]:
    """Markdown: PSNR/MSE per canvas, then ShapesEval per category (ceiling = the renders themselves)."""
    lines = ["| canvas (HxW) | PSNR (dB) | MSE ([0,1]) |", "|---|---|---|"]
    lines += [f"| {h}x{w} | {p:.2f} | {m:.5f} |" for (h, w), (p, m) in metrics["psnr"].items()]
    cols = (*CATEGORIES, "overall")
    lines += ["", "| canvas | images | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (h, w), (ceiling, recon) in metrics["shapes_eval"].items():
        for name, acc in (("renders (ceiling)", ceiling), ("reconstructions", recon)):
            lines.append(f"| {h}x{w} | {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")
    return lines


def write_report(path: Path, argv: list[str], cfg: TrainConfig, facts: dict, output: list[str]) -> Path:
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    lines = [f"# shapes autoencoder on {facts['started']:%Y-%m-%d %H:%M} UTC", "",
             f"- command: `python tools/train_shapes_autoencoder.py {' '.join(argv)}`".rstrip(),
             f"- commit: {git('rev-parse', '--short', 'HEAD')}{dirty}", f"- packages: {versions(PACKAGES)}",
             f"- CPU: {describe_cpu()}", "- precision: 32-true (float32 training and evaluation)",
             f"- conditions: {torch.get_num_threads()} threads, load average {facts['load']:.2f} at the start",
             f"- training: {cfg.steps} steps of batch {cfg.batch_size} in {facts['train_s']:.0f}s; {asdict(cfg)}",
             f"- architecture: AutoencoderKL {ARCHITECTURE}, {facts['params']:,} parameters",
             f"- written: {facts['files']}", "", "## Results", "",
             f"Held-out PSNR: {facts['heldout']} renders per canvas, seed {HELDOUT_SEED}, posterior mean. ShapesEval: "
             "`shapes_eval.prompt_set(per_category=24)` at each canvas (144 prompts), renders vs reconstructions.",
             "", *results_table(facts["metrics"]), "", "## Output", "", "```", *output, "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    p.add_argument("--out", default=str(SHIPPED), help="folder to write (default: the packaged one)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--report", default=None, help="Markdown file (default: benchmarks/results/<dated name>.md)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                      warmup=min(defaults.warmup, max(1, args.steps // 10)))
    output: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        output.append(line)

    started, load = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0]  # others' work slows steps
    tick = time.perf_counter()
    vae = train(cfg, log)
    train_s = time.perf_counter() - tick
    mean, std = latent_stats(vae, cfg.seed)
    out = Path(args.out)
    files = save(vae, out, mean, std)
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.2f} MB" for f in files)
    log(f"trained {cfg.steps} steps in {train_s:.0f}s; wrote {out} ({sizes})")
    log(f"latents (posterior mean, {3 * 1024} training renders): mean {fmt(mean)} std {fmt(std)}; "
        f"scalar form: shift_factor {np.mean(mean):.4f}, scaling_factor 1/mean(std) = {1 / np.mean(std):.4f}")
    vae = check_saved(out, mean, std)  # every figure below is of the saved folder, reloaded
    metrics = evaluate(vae)
    for line in results_table(metrics):
        log(line)
    k_mean, k_std = kit_latent_check(out, cfg.seed)
    log(f"kit-normalised latents (DiffusersAutoencoder, 768 fresh renders): mean {fmt(k_mean)} std {fmt(k_std)}")
    worst = min(metrics["shapes_eval"][(32, 32)][1][c] for c in CATEGORIES)
    log(f"bar (>= 0.98 in every category at 32x32): {'met' if worst >= 0.98 else 'NOT met'} (worst {worst:.3f}); "
        f"total {time.perf_counter() - tick:.0f}s")
    facts = {"started": started, "load": load, "train_s": train_s, "files": sizes, "heldout": HELDOUT,
             "metrics": metrics, "params": sum(p.numel() for p in vae.parameters())}
    path = Path(args.report) if args.report else result_path("shapes_autoencoder", f"{started:%Y-%m-%d}")
    print(f"report written to {write_report(path, argv, cfg, facts, output)}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
