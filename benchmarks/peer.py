"""The kit's self-attention arm against diffusers' SD3Transformer2DModel (MMDiT), forward + backward, interleaved.

python benchmarks/peer.py [--sizes embedded,10x] [--repeats 9] [--batch N] [--threads N] [--profile]

The kit: TextToImage with SelfAttentionFusion (experiments/fusion.yaml's `self_attn` arm: the last understanding
state projected once and carried with the image stream, one weight set for both). The library: diffusers'
SD3Transformer2DModel (dual-stream joint attention, AdaLN-Zero on timestep + pooled text). Both are built from
config with random weights (nothing downloads) at the same width, depth, heads and patch size, and fed the same
latents (pixel space, the 32x32 bucket: 64 image tokens) and text (32 tokens of width 384, the embedded MiniLM's).
SD3 has no knob for its FFN, so the kit's `mlp_ratio` matches them (as fusion.yaml matches its arms), twice:
`kit` at SD3's trainable parameters (within TOLERANCE), and `kit_equal_flops` at SD3's FLOPs per step (within
FLOP_TOLERANCE), because at equal parameters the single-stream kit runs every weight on every token.

A step is forward, loss = mean square of the output, backward, zero grads; the frozen tower's states are made
once outside the timing (the kit times only `model(z_t, t, states)`). Steps alternate kit, kit_equal_flops,
diffusers after warm-up (common.interleaved_medians), so a busy machine slows all alike; the best step is printed
beside the median (load only ever slows a step). All eager, at the precision `fit` picks here (bf16 autocast
where bf16 is native, else float32). FLOPs come from torch's FlopCounterMode, CPU SDPA included. Where a kit is
slower (or with --profile), the top ops by self CPU time are printed for it and for diffusers.
"""
from __future__ import annotations

import argparse
import os
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: both models are built from config

import torch  # noqa: E402
from common import compute, header, interleaved_medians, precision  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

from mos_lightning.model.fusion import SelfAttentionFusion  # noqa: E402
from mos_lightning.model.generation import GenerationTower  # noqa: E402
from mos_lightning.model.text_to_image import TextToImage  # noqa: E402
from mos_lightning.model.understanding import UnderstandingTower  # noqa: E402
from mos_lightning.types import TowerStates  # noqa: E402

# 10x: width x10/3 at the same tokens and depth (linear FLOPs x11, attention x3.3: 10x per sample in all; head dim
# 64 as SD3's). Batches are small so that steps are short and finely interleaved on a shared machine.
SIZES = {"embedded": {"width": 192, "depth": 6, "heads": 6, "batch": 16},
         "10x": {"width": 640, "depth": 6, "heads": 10, "batch": 4}}
CHANNELS, IMAGE, PATCH = 3, 32, 4  # pixel space, the square bucket, base.yaml's patch size
TEXT_TOKENS = 32  # understanding.max_length in base.yaml
TOLERANCE = 0.01  # |kit - SD3| / SD3 trainable parameters
FLOP_TOLERANCE = 0.02  # |kit_equal_flops - SD3| / SD3 FLOPs per step
NO_COUNTERPART = {  # substrings of SD3 parameter names the kit has nothing like, and what they are
    "time_text_embed": "timestep + pooled-text projection (the kit: no timestep embedding, App. A; no pooled text)",
    "norm1.": "image-stream AdaLN-Zero, 6 modulations per block (the kit: plain RMSNorm, no modulation)",
    "norm1_context": "text-stream AdaLN-Zero, 6 modulations per block (last block: 2)",
    "norm_out": "final AdaLN (shift, scale)",
    "ff_context": "a second FFN for the text stream (the kit: one weight set for both streams)",
    "add": "text-stream q/k/v/out projections and QK-norms (dual-stream; the kit shares the image stream's)",
}
KIT_ONLY = "4 registers, 2-D RoPE on image q/k, a learned null context (m x 384) and a bias-free SwiGLU FFN"


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kit_model(width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
              tower: UnderstandingTower | None = None) -> TextToImage:
    """The kit's self-attention arm; its zero-initialised head gets random weights so gradients are not all zero."""
    generation = GenerationTower(width=width, depth=depth, heads=heads, patch_size=PATCH, mlp_ratio=mlp_ratio)
    model = TextToImage(tower or UnderstandingTower(), generation, partial(SelfAttentionFusion, layer=-1))
    torch.nn.init.normal_(model.generation.head.weight, std=0.02)
    return model


def sd3_model(width: int, depth: int, heads: int, text_width: int = 384) -> SD3Transformer2DModel:
    """SD3 (3.0 layout: no dual-attention layers) with QK RMSNorm like the kit; pooled text has the text's width."""
    return SD3Transformer2DModel(sample_size=IMAGE, patch_size=PATCH, in_channels=CHANNELS, out_channels=CHANNELS,
                                 num_layers=depth, attention_head_dim=width // heads, num_attention_heads=heads,
                                 joint_attention_dim=text_width, caption_projection_dim=width,
                                 pooled_projection_dim=text_width, pos_embed_max_size=IMAGE // PATCH,
                                 qk_norm="rms_norm")


def hidden(kit: TextToImage) -> int:
    return kit.generation.blocks[0].ffn.down.in_features


def ratio_for(kit: TextToImage, units: int) -> float:
    return (units + 0.5) * 1.5 / kit.generation.width  # int(width * ratio * 2 / 3) == units


def params_matched_ratio(kit: TextToImage, target: int) -> float:
    """The mlp_ratio whose SwiGLU hidden size brings the kit's trainable parameters nearest `target`."""
    gen = kit.generation
    per_unit = 3 * gen.width * gen.depth  # gate, up and down weights per hidden unit, every block
    return ratio_for(kit, round((target - trainable(kit) + per_unit * hidden(kit)) / per_unit))


def flops_matched_ratio(a: TextToImage, b: TextToImage, flops_a: int, flops_b: int, target: int) -> float:
    """The mlp_ratio whose FLOPs are nearest `target`, from two kits that differ only in it (FLOPs are linear in
    the hidden size)."""
    slope = (flops_b - flops_a) / (hidden(b) - hidden(a))
    return ratio_for(a, max(1, round(hidden(a) + (target - flops_a) / slope)))


def make_inputs(tower: UnderstandingTower, batch: int, seed: int = 0) -> dict:
    """The same latents and text for all: z (B, C, H, W), t (B,), text (B, L, D_u), pooled (B, D_u), states."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, tower.num_layers, TEXT_TOKENS, tower.width, generator=g)  # (B, m, L, D_u)
    return {"z": torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g), "t": torch.rand(batch, generator=g),
            "states": TowerStates(states, torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)),
            "text": states[:, -1], "pooled": states[:, -1].mean(1)}  # the kit's arm reads the last state too


def kit_output(kit: TextToImage, x: dict) -> torch.Tensor:
    return kit(x["z"], x["t"], x["states"])[0]


def sd3_output(sd3: SD3Transformer2DModel, x: dict) -> torch.Tensor:
    return sd3(x["z"], encoder_hidden_states=x["text"], pooled_projections=x["pooled"],
               timestep=1000 * x["t"]).sample


def output_fn(name: str):
    return sd3_output if name == "diffusers" else kit_output


def step(model: torch.nn.Module, output, x: dict) -> None:
    """Forward, loss = mean square of the output, backward, zero grads."""
    with compute():
        out = output(model, x)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def step_flops(fn) -> int:
    """FLOPs of one call, with the CPU flash-attention ops (which torch's counter leaves out) counted too."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
               lambda g, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def build(width: int, depth: int, heads: int, tower: UnderstandingTower | None = None) -> tuple[dict, dict, dict]:
    """({name: model in train mode}, {name: kit mlp_ratio}, {name: FLOPs of a one-sample step}) at one size:
    "kit" (at SD3's parameter count), "kit_equal_flops" (at SD3's FLOPs, fewer parameters) and "diffusers"."""
    tower = tower or UnderstandingTower()
    one = make_inputs(tower, 1)  # FLOPs are per sample: one sample is enough to match them
    sd3 = sd3_model(width, depth, heads, tower.width)
    probe = kit_model(width, depth, heads, tower=tower)
    ratios = {"kit": params_matched_ratio(probe, trainable(sd3))}
    kit = kit_model(width, depth, heads, ratios["kit"], tower)
    flops = {name: step_flops(partial(step, m, output_fn(name), one))
             for name, m in (("probe", probe), ("kit", kit), ("diffusers", sd3))}
    ratios["kit_equal_flops"] = flops_matched_ratio(probe, kit, flops.pop("probe"), flops["kit"], flops["diffusers"])
    equal = kit_model(width, depth, heads, ratios["kit_equal_flops"], tower)
    flops["kit_equal_flops"] = step_flops(partial(step, equal, kit_output, one))
    models = {"kit": kit, "kit_equal_flops": equal, "diffusers": sd3}
    return {name: m.train() for name, m in models.items()}, ratios, flops


def timed(fn, log: list):
    """`fn`, appending each call's seconds to `log` (interleaved_medians gives only medians; the best is kept too)."""
    def run():
        start = time.perf_counter()
        fn()
        log.append(time.perf_counter() - start)
    return run


def top_ops(fn, rows: int = 10) -> str:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def describe(name: str, models: dict, ratios: dict) -> None:
    sd3, n_sd3 = models["diffusers"], trainable(models["diffusers"])
    gen = models["kit"].generation
    print(f"\n## {name}: width {gen.width}, depth {gen.depth}, heads {gen.heads}, patch {gen.patch_size} (all)")
    print(f"diffusers SD3: {n_sd3:,} trainable parameters (GELU FFN x4, per stream)")
    for k, ratio in ratios.items():
        n = trainable(models[k])
        print(f"{k}: {n:,} ({n / n_sd3 - 1:+.2%}), mlp_ratio {ratio:.3f}, SwiGLU hidden {hidden(models[k])}")
    for part, what in NO_COUNTERPART.items():
        count = sum(p.numel() for n, p in sd3.named_parameters() if part in n)
        print(f"  SD3 only: {count:>11,} ({count / n_sd3:5.1%}) {part.rstrip('.')}: {what}")
    print(f"  kit only: {KIT_ONLY}")


def measure(name: str, tower: UnderstandingTower, batch: int | None, repeats: int, profile: bool) -> dict:
    size = {k: v for k, v in SIZES[name].items() if k != "batch"}
    batch = batch or SIZES[name]["batch"]
    models, ratios, flops = build(**size, tower=tower)
    describe(name, models, ratios)
    x = make_inputs(tower, batch)
    fns = {k: partial(step, m, output_fn(k), x) for k, m in models.items()}
    logs = {k: [] for k in fns}
    seconds = interleaved_medians({k: timed(fn, logs[k]) for k, fn in fns.items()}, repeats, warmup=1)
    grid = IMAGE // PATCH
    print(f"batch {batch}, {grid}x{grid} = {grid * grid} image + {TEXT_TOKENS} text tokens; median of {repeats} "
          f"interleaved steps after 1 warm-up each")
    for k in fns:
        total = flops[k] * batch
        print(f"  {k:>15}: {1e3 * seconds[k]:8.1f} ms/step (best {1e3 * min(logs[k][1:]):8.1f}), "
              f"{total / 1e9:7.1f} GFLOP/step, {total / seconds[k] / 1e9:6.1f} GFLOP/s")
    result = {"size": name, "batch": batch}
    for k in ("kit", "kit_equal_flops"):
        time_ratio, flop_ratio = seconds[k] / seconds["diffusers"], flops[k] / flops["diffusers"]
        best = min(logs[k][1:]) / min(logs["diffusers"][1:])
        result[k] = (time_ratio, flop_ratio)
        print(f"{k} / diffusers: step time {time_ratio:.2f}x (of the best steps {best:.2f}x), FLOPs {flop_ratio:.2f}x, "
              f"time per FLOP {time_ratio / flop_ratio:.2f}x")
    slower = [k for k in ("kit", "kit_equal_flops") if profile or result[k][0] > 1]
    for k in (*slower, "diffusers") if slower else ():
        print(f"\ntop ops by self CPU time, {k} at {name} (one step, batch {batch}):\n{top_ops(fns[k])}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="embedded,10x", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=None, help="for every size (default: each size's own)")
    parser.add_argument("--profile", action="store_true", help="print the top ops even where the kit is faster")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 on a machine shared with another multi-threaded job, whose threads "
                             "otherwise stall every parallel op's barrier and make step time follow the op count")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header()
    print(f"compute: {'bf16 autocast' if precision()[1] == torch.bfloat16 else 'float32'}, eager (no compile)")
    tower = UnderstandingTower()  # the embedded MiniLM, for its geometry (m = 7, width 384); never run here
    rows = [measure(name, tower, args.batch, args.repeats, args.profile) for name in args.sizes.split(",")]
    print("\n| size | batch | kit / diffusers time (FLOPs) | kit_equal_flops / diffusers time (FLOPs) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['kit'][0]:.2f}x ({r['kit'][1]:.2f}x) | "
              f"{r['kit_equal_flops'][0]:.2f}x ({r['kit_equal_flops'][1]:.2f}x) |")


if __name__ == "__main__":
    main()
