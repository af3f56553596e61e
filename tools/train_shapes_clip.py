"""Train the packaged shapes CLIP contrastively on the embedded shapes domain, on CPU in a few minutes.

    python tools/train_shapes_clip.py --out mos_lightning/evaluation/assets/shapes_clip.pt

A maintainer's tool, outside the runtime package: the kit only loads the weights it wrote
(`mos_lightning.evaluation.clip`).

Loss: open_clip's ClipLoss (symmetric InfoNCE over the batch; batches hold distinct captions, so no in-batch
negative is a true caption) plus
- a NegCLIP-style hard-negative term (Yuksekgonul et al., 2023): each image must prefer its caption to each
  minimally edited "foil" (another shape, colour, count or relation, or the two colours swapped);
- a text-only paraphrase term: "A above B" must be nearer "B below A" than "A below B". Without it relations
  stay at chance: neither tower has a reason to encode them first (a symmetric saddle), and this term gives
  the text tower one. Relations are also learnt first (position scenes only for the first 15% of steps).
Data: ShapesDataset seeds 3_000_017 + seed (all categories) and 3_500_029 + seed (position only); the
held-out report uses 4_000_037; the kit trains on 0 / 1_000_003 and prompts on 2_000_003. Same seed and
machine -> same weights.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import text_global_pool
from torch.nn.attention import SDPBackend, sdpa_kernel

from mos_lightning.data.shapes import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    ShapeScene,
    ShapesDataset,
    caption,
    render,
    to_tensor,
)
from mos_lightning.errors import ConfigError
from mos_lightning.evaluation.clip import SHAPES_CLIP, SHAPES_WEIGHTS, Clip, create_clip, load_clip

DATA_SEED, POSITION_SEED, HELDOUT_SEED = 3_000_017, 3_500_029, 4_000_037
MAX_SEED = 400_000  # keeps every train stream clear of the next seed
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FOIL_KINDS = ("shape", "colour", "count", "binding", "relation")


@dataclass
class TrainConfig:
    steps: int = 1400
    batch_size: int = 96
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.1
    foil_weight: float = 1.0
    paraphrase_weight: float = 1.0
    position_share: float = 0.2  # extra position scenes: relations are the slowest thing to learn,
    position_first: float = 0.15  # and are learnt first: this fraction of the steps sees position scenes only
    seed: int = 0  # model init and the data stream
    config_path: str | None = None  # None: the packaged shapes_clip.json
    bf16: bool = True  # autocast on CPU; weights and optimiser stay float32
    log_every: int = 50


def foil_kinds(scene: ShapeScene) -> list[str]:
    """The edits that make the scene's caption false while keeping its form."""
    cat, kinds = scene.category, ["shape"]
    if cat in ("colours", "counting", "colour_attribution", "position"):
        kinds.append("colour")  # single_object and two_objects leave colour unstated
    if cat == "counting":
        kinds.append("count")
    if cat in ("colour_attribution", "position"):
        kinds.append("binding")
    if cat == "position":
        kinds.append("relation")
    return kinds


def make_foil(scene: ShapeScene, kind: str, rng: np.random.Generator) -> ShapeScene:
    """`scene` with one edit of `kind`; new shapes and colours are absent from the scene, so the foil's caption
    cannot describe it."""
    objs = scene.objects
    if kind == "count":
        n = int(rng.choice([m for m in NUMBER_WORDS if m != len(objs)]))
        return replace(scene, objects=(objs[0],) * n)
    if kind == "relation":
        return replace(scene, relation=OPPOSITE[scene.relation])
    if kind == "binding":
        a, b = objs
        return replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))
    present = {getattr(o, kind) for o in objs}
    new = str(rng.choice([v for v in (SHAPES if kind == "shape" else COLOURS) if v not in present]))
    j = int(rng.integers(len(objs)))  # counting scenes repeat one object: edit them all
    edited = tuple(replace(o, **{kind: new}) if scene.category == "counting" or k == j else o
                   for k, o in enumerate(objs))
    return replace(scene, objects=edited)


def paraphrase(scene: ShapeScene) -> ShapeScene:
    """The same picture told the other way round: "a red circle above a blue square" -> "a blue square below
    a red circle"."""
    return replace(scene, objects=scene.objects[::-1], relation=OPPOSITE[scene.relation])


Foil = tuple[int, str, str]  # (image index in the batch, edit kind, foil caption)
Batch = tuple[torch.Tensor, list[str], list[Foil], list[tuple[int, str]]]


def batches(seed: int, batch_size: int, position_share: float = 0.0, position_first: int = 0) -> Iterator[Batch]:
    """Endless (images, captions, foils, paraphrases) batches, skipping a sample whose caption is already in
    the batch; one foil per applicable edit. Samples come in order from the train stream (all categories), or
    with probability `position_share` (1 for the first `position_first` batches) from a position-only stream.
    Deterministic in `seed`."""
    streams = [ShapesDataset(10**12, DATA_SEED + seed), ShapesDataset(10**12, POSITION_SEED + seed,
                                                                      categories=("position",))]
    rng, taken = np.random.default_rng([DATA_SEED, seed]), [0, 0]
    for b in itertools.count():
        share = 1.0 if b < position_first else position_share
        images, captions, foils, paraphrases = [], [], [], []
        while len(captions) < batch_size:
            which = int(rng.random() < share)
            scene, taken[which] = streams[which].scene(taken[which]), taken[which] + 1
            text = caption(scene)
            if text in captions:
                continue
            foils += [(len(captions), kind, caption(make_foil(scene, kind, rng))) for kind in foil_kinds(scene)]
            if scene.relation is not None:
                paraphrases.append((len(captions), caption(paraphrase(scene))))
            images.append(to_tensor(render(scene)))
            captions.append(text)
        yield torch.stack(images), captions, foils, paraphrases


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases, embeddings or the logit scale."""
    no_decay = ("ln", "bias", "logit_scale", "embedding")
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim < 2 or any(k in name for k in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine to a tenth of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip CLIP.encode_text on tokens cut after the longest caption: under the causal mask the cut-off
    padding cannot reach the pooled end-of-text token, so this is exact, and ~2.5x cheaper at 32 tokens."""
    if getattr(model, "attn_mask", None) is None or model.text_pool_type != "argmax":
        return model.encode_text(tokens)  # a tower where padding is visible: no shortcut
    n = int((tokens != 0).sum(1).max())
    tokens = tokens[:, :n]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x, proj = text_global_pool(x, tokens, "argmax"), model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Module) else x if proj is None else x @ proj


def loss_step(clip: Clip, images: torch.Tensor, captions: list[str], foils: list[Foil],
              paraphrases: list[tuple[int, str]], cfg: TrainConfig, clip_loss: ClipLoss):
    """ClipLoss over the batch + foil_weight * the 2-way CE (caption vs foil), averaged within each edit kind
    and then over kinds, so the rarer edits (relation: position scenes only) weigh as much as the rest,
    + paraphrase_weight * a text-only 2-way CE: a position caption must be nearer its paraphrase than its
    relation foil."""
    model = clip.model
    texts = captions + [f for _, _, f in foils] + [p for _, p in paraphrases]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        img = model.encode_image(clip.prepare(images))
        txt = encode_text(model, clip.tokenize(texts))
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    n, m = len(captions), len(foils)
    true, foil, para = txt[:n], txt[n:n + m], txt[n + m:]
    scale = model.logit_scale.exp()
    contrastive = clip_loss(img, true, scale)
    owner = torch.tensor([k for k, _, _ in foils], dtype=torch.long)
    per_foil = _two_way_ce(scale, img[owner], true[owner], foil)
    kinds = [kind for _, kind, _ in foils]
    weights = torch.tensor([1 / kinds.count(k) for k in kinds]) / len(set(kinds))
    loss = contrastive + cfg.foil_weight * (weights * per_foil).sum()
    if paraphrases:
        flip = {k: j for j, (k, kind, _) in enumerate(foils) if kind == "relation"}
        anchor = torch.tensor([k for k, _ in paraphrases], dtype=torch.long)
        flips = foil[torch.tensor([flip[k] for k, _ in paraphrases], dtype=torch.long)]
        loss = loss + cfg.paraphrase_weight * _two_way_ce(scale, true[anchor], para, flips).mean()
    return loss, contrastive.detach()


def _two_way_ce(scale: torch.Tensor, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor):
    """Per row: cross-entropy of preferring `positive` over `negative` given `anchor` (all L2-normalised)."""
    logits = scale * torch.stack([(anchor * positive).sum(-1), (anchor * negative).sum(-1)], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long), reduction="none")


def train(cfg: TrainConfig, log: Callable[[str], None] | None = print) -> Clip:
    """A randomly initialised shapes CLIP (seeded), trained for cfg.steps steps; returned in eval mode."""
    if cfg.steps < 1 or cfg.batch_size < 2 or not 0 <= cfg.seed < MAX_SEED:
        raise ConfigError(f"steps/batch_size/seed: need steps >= 1, batch_size >= 2, 0 <= seed < {MAX_SEED}; "
                          f"got {cfg.steps}/{cfg.batch_size}/{cfg.seed}")
    torch.manual_seed(cfg.seed)
    clip = create_clip(SHAPES_CLIP, None, cfg.config_path)
    model = clip.model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    data = batches(cfg.seed, cfg.batch_size, cfg.position_share, round(cfg.position_first * cfg.steps))
    clip_loss, start = ClipLoss(), time.perf_counter()
    for step in range(cfg.steps):
        with sdpa_kernel(SDPBackend.MATH):  # at these sizes ~1.6x faster on CPU than the flash kernel
            loss, contrastive = loss_step(clip, *next(data), cfg, clip_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop
        if log and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log(f"step {step + 1}/{cfg.steps} loss {loss.item():.3f} (clip {contrastive.item():.3f}) "
                f"scale {model.logit_scale.exp().item():.1f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return clip


def save_weights(clip: Clip, path: str | Path) -> Path:
    """A plain state dict, floats stored as float16 (half the bytes; open_clip casts back on load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.model.state_dict().items()}
    torch.save(state, path)
    return path


@torch.no_grad()
def evaluate(clip: Clip, pairs: int = 512, batch: int = 64, seed: int = HELDOUT_SEED) -> dict[str, float]:
    """Held-out numbers: image->text top-1 among `batch` pairs (a hit if the chosen caption equals the true
    one), CLIP score of matching vs shuffled (rolled by one) captions, and per-edit foil accuracy
    (score(caption) > score(foil); chance 0.5)."""
    data, rng = ShapesDataset(pairs, seed=seed), np.random.default_rng(seed)
    hits, match, shuffled, foil_hits = [], [], [], {k: [] for k in FOIL_KINDS}
    for lo in range(0, pairs, batch):
        scenes = [data.scene(i) for i in range(lo, min(pairs, lo + batch))]
        captions = [caption(s) for s in scenes]
        img = clip.encode_images(torch.stack([to_tensor(render(s)) for s in scenes]))
        sims = 100 * (img @ clip.encode_texts(captions).T).clamp(min=0)
        hits += [captions[j] == c for j, c in zip(sims.argmax(1).tolist(), captions)]
        match += sims.diag().tolist()
        shuffled += sims.roll(-1, dims=1).diag().tolist()
        foils = [(k, kind, caption(make_foil(s, kind, rng))) for k, s in enumerate(scenes) for kind in foil_kinds(s)]
        foil_sims = 100 * (img[[k for k, _, _ in foils]] * clip.encode_texts([f for _, _, f in foils])).sum(-1)
        for (k, kind, _), f in zip(foils, foil_sims.clamp(min=0).tolist()):
            foil_hits[kind].append(sims[k, k].item() > f)
    out = {"top1": float(np.mean(hits)), "match": float(np.mean(match)), "shuffled": float(np.mean(shuffled))}
    out["gap"] = out["match"] - out["shuffled"]
    out.update({f"foil_{k}": float(np.mean(v)) for k, v in foil_hits.items()})
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help=f"weights file to write (the packaged one is {SHAPES_WEIGHTS})")
    defaults = TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--config", default=None, help="open_clip model config .json (default: the packaged one)")
    args = p.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                      warmup=min(defaults.warmup, max(1, args.steps // 10)), config_path=args.config)
    start = time.perf_counter()
    path = save_weights(train(cfg, log=lambda line: print(line, flush=True)), args.out)
    print(f"trained {cfg.steps} steps in {time.perf_counter() - start:.0f}s; wrote {path} "
          f"({path.stat().st_size / 2**20:.1f} MiB)")
    metrics = evaluate(load_clip(SHAPES_CLIP, str(path), cfg.config_path))  # the saved file, reloaded
    print(f"held-out (seed {HELDOUT_SEED}, 512 pairs, batches of 64): "
          + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    return metrics


if __name__ == "__main__":
    main()
