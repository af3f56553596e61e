"""FID, CLIP score and ShapesEval at the end of training (and every n validations), logged under val/."""
from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import lightning as L
import torch

from mos_lightning.errors import ConfigError
from mos_lightning.evaluation.clip import load_clip, mean_clip_score
from mos_lightning.evaluation.fid import FrechetDistance
from mos_lightning.evaluation.prompts import EvalPrompts, EvalSet, ShapesPrompts
from mos_lightning.evaluation.shapes_eval import score as shapes_score

from .samples import images_size


@lru_cache(maxsize=4)
def cached_clip(model_name: str, pretrained: str | None):
    """One CLIP per process: every arm of an ablation reuses it."""
    return load_clip(model_name, pretrained)


@lru_cache(maxsize=4)
def cached_fid(extractor: str, weights: str | None, clip_name: str, clip_pretrained: str | None,
               cache_dir: str | None) -> FrechetDistance:
    """One extractor per process; "open-clip:<clip_model>" reuses the scoring CLIP's image tower."""
    if extractor == f"open-clip:{clip_name}" and weights is None:
        return FrechetDistance(extractor, clip_model=cached_clip(clip_name, clip_pretrained).model,
                               cache_dir=cache_dir)
    return FrechetDistance(extractor, weights, cache_dir=cache_dir)


class Evaluation(L.Callback):
    """Generates the prompt set's images with the module's sampler, then logs `val/fid` (and `eval/fid/<category>`),
    `val/clip` (100 x cosine, averaged over prompts) and, on the shapes domain, `val/shapes/overall` plus
    `val/shapes/<category>`. Each evaluation's scores and every setting that produced them go to
    `<log_dir>/eval/step=<N>.json`.

    Args:
        prompts: ShapesPrompts (default) or MJHQPrompts.
        fid_extractor: "open-clip:<clip_model>" (FID in that CLIP's image-feature space; the embedded default)
            or "inception-v3-compat" (the paper's 2048-d InceptionV3; give fid_weights to stay offline).
        clip_model, clip_pretrained: open_clip model name and tag or local file ("shapes-clip" ships its weights).
        every_n_validations: also evaluate at every n-th validation; 0 evaluates only at the end of training.
        seed, steps, cfg_scale: sampler settings; None takes the module's.
        samples_per_prompt: images per prompt (GenEval draws 4), each from its own seed; CLIP and ShapesEval average
            over all of them, FID takes the first per prompt. More samples shrink the standard error of a score
            (a category of 24 prompts scored once has one of about 0.08).
        final_samples_per_prompt: the same for the evaluation at the end of training only (None: as above), so a
            run can evaluate cheaply along the way and precisely at the end.
        cache_dir: reference statistics cache (default: <save_dir>/.cache/fid).
    """

    def __init__(self, prompts: EvalPrompts | None = None, fid_extractor: str = "open-clip:shapes-clip",
                 fid_weights: str | None = None, clip_model: str = "shapes-clip", clip_pretrained: str | None = None,
                 every_n_validations: int = 0,
                 seed: int = 0, steps: int | None = None, cfg_scale: float | None = None, batch_size: int = 64,
                 cache_dir: str | None = None, samples_per_prompt: int = 1,
                 final_samples_per_prompt: int | None = None):
        if not isinstance(every_n_validations, int) or every_n_validations < 0:
            raise ConfigError(f"every_n_validations: must be an int >= 0, got {every_n_validations!r}")
        final_samples_per_prompt = final_samples_per_prompt or samples_per_prompt
        for name, value in (("samples_per_prompt", samples_per_prompt),
                            ("final_samples_per_prompt", final_samples_per_prompt)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an int >= 1, got {value!r}")
        self.samples_per_prompt, self.final_samples_per_prompt = samples_per_prompt, final_samples_per_prompt
        self.prompts = prompts or ShapesPrompts()
        self.fid_extractor, self.fid_weights = fid_extractor, fid_weights
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.every, self.seed, self.steps, self.cfg_scale = every_n_validations, seed, steps, cfg_scale
        self.batch_size, self.cache_dir = batch_size, cache_dir
        self.eval_set: EvalSet | None = None
        self._validations = 0

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        """Everything that can be wrong is found here, before training or generation starts."""
        if self.eval_set is not None:
            return
        self.eval_set = self.prompts.build(images_size(trainer))
        self.clip = cached_clip(self.clip_model, self.clip_pretrained)
        cache = self.cache_dir or (str(Path(trainer.logger.save_dir) / ".cache" / "fid") if trainer.logger else None)
        self.fid = cached_fid(self.fid_extractor, self.fid_weights, self.clip_model, self.clip_pretrained, cache)
        self.fid.check_reference(self.eval_set.reference, len(self.eval_set.captions))

    def images_sampled(self, validations: int) -> int:
        """How many images a run with this many validations samples here (mos_lightning.budget)."""
        along = validations // self.every if self.every else 0
        return len(self.prompts) * (self.final_samples_per_prompt + along * self.samples_per_prompt)

    def due(self, trainer: L.Trainer) -> int:
        """Samples per prompt for this validation's evaluation; 0: not due."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return 0
        self._validations += 1
        final = 0 < trainer.max_steps <= trainer.global_step or (
            trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if final:
            return self.final_samples_per_prompt
        return self.samples_per_prompt if self.every > 0 and self._validations % self.every == 0 else 0

    def generate(self, pl_module, size, samples_per_prompt: int = 1) -> torch.Tensor:
        """(samples_per_prompt x prompts) images, repeat-major; the first repeat's seeds are seed + i, as with one."""
        captions, chunks = self.eval_set.captions, []
        for r in range(samples_per_prompt):
            for i in range(0, len(captions), self.batch_size):
                chunks.append(pl_module.generate(captions[i:i + self.batch_size], size,
                                                 seed=self.seed + r * len(captions) + i,
                                                 steps=self.steps, cfg_scale=self.cfg_scale).float().cpu())
        return torch.cat(chunks)

    def scores(self, images: torch.Tensor, sampler: dict) -> tuple[dict, dict]:
        es, n = self.eval_set, len(self.eval_set.captions)
        repeats = len(images) // n
        fid = self.fid.score(images[:n], es.reference, data_id=es.data_id, categories=es.categories,
                             reference_categories=es.categories, sampler=sampler)
        metrics = {"val/fid": fid.value, "val/clip": mean_clip_score(self.clip, images, es.captions * repeats)}
        metrics.update({f"eval/fid/{c}": v for c, v in fid.per_category.items() if math.isfinite(v)})
        per_repeat = []
        if es.scenes is not None:
            shapes = shapes_score(es.scenes * repeats, images)
            metrics.update({f"val/shapes/{k}": v for k, v in shapes.items() if math.isfinite(v)})
            per_repeat = [shapes_score(es.scenes, images[r * n:(r + 1) * n]) for r in range(repeats)]
        return metrics, {"fid": fid.to_dict(), "clip": {"model": self.clip_model, "pretrained": self.clip_pretrained},
                         "sampler": sampler, "prompts": es.data_id, "count": n, "samples_per_prompt": repeats,
                         "metrics": metrics, "shapes_per_repeat": per_repeat}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        samples_per_prompt = self.due(trainer)
        if not samples_per_prompt:
            return
        size = images_size(trainer)
        steps = self.steps or pl_module.sample_steps
        cfg = pl_module.cfg_scale if self.cfg_scale is None else self.cfg_scale
        sampler = {"cfg": cfg, "steps": steps, "seed": self.seed, "precision": str(trainer.precision),
                   "shift": pl_module.sample_shift, "image_size": list(size), "samples_per_prompt": samples_per_prompt}
        start = time.perf_counter()
        metrics, record = self.scores(self.generate(pl_module, size, samples_per_prompt), sampler)
        metrics["eval/seconds"] = record["seconds"] = time.perf_counter() - start  # the cost benchmark reads it
        for name, value in metrics.items():
            pl_module.log(name, value)
        if trainer.log_dir is not None and trainer.is_global_zero:
            out = Path(trainer.log_dir) / "eval" / f"step={trainer.global_step}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2, default=str))

