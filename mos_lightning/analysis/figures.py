"""Matplotlib figures of the router statistics (App. B.7, Fig. 14); each function returns a Figure.

Figures are built with `matplotlib.figure.Figure`, not pyplot, so nothing accumulates in pyplot's
global state when a callback draws them at every validation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from . import routing as R
from .trace import Trace

UNDERSTANDING, GENERATION = "understanding layer i", "generation layer j"


def _t_labels(timesteps: torch.Tensor) -> list[str]:
    return [f"{t:.2f}" for t in timesteps.tolist()]


def _draw(ax, matrix: torch.Tensor, diverging: bool):
    values = matrix.double().numpy()
    if not diverging:
        return ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    limit = max(abs(values).max(), 1e-12)
    return ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")


def heatmap(matrix: torch.Tensor, xlabel: str, ylabel: str, title: str, xticks: Sequence[str] | None = None,
            yticks: Sequence[str] | None = None, diverging: bool = False, size=(5.0, 4.0)) -> Figure:
    """A labelled heat map of a 2-D tensor (rows on y); `diverging` centres a red-blue map on 0."""
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    fig.colorbar(_draw(ax, matrix, diverging), ax=ax)
    _label(ax, xlabel, ylabel, title, xticks, yticks)
    return fig


def _label(ax, xlabel, ylabel, title, xticks=None, yticks=None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), list(xticks), rotation=90 if max(map(len, xticks), default=0) > 3 else 0)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), list(yticks))


def contribution_figure(contributions: torch.Tensor, timesteps: torch.Tensor,
                        title: str = "layer contribution per step", diverging: bool = False) -> Figure:
    """(S, m) per-step contributions: steps along x (labelled with the t each step starts from), layers on y."""
    steps = contributions.shape[0]
    return heatmap(contributions.T, "denoising step (t)", UNDERSTANDING, title, _t_labels(timesteps[:steps]),
                   diverging=diverging, size=(max(4.0, 0.35 * steps + 2), 4.0))


def token_figure(matrices: Sequence[torch.Tensor], tokens: Sequence[Sequence[str]], titles: Sequence[str]) -> Figure:
    """One panel per prompt: (T, m) routed weight per token (rows labelled with the token strings)."""
    rows = max(m.shape[0] for m in matrices)
    fig = Figure(figsize=(3.6 * len(matrices), max(3.0, 0.28 * rows + 1.5)), layout="constrained")
    for k, (matrix, toks, title) in enumerate(zip(matrices, tokens, titles)):
        ax = fig.add_subplot(1, len(matrices), k + 1)
        image = _draw(ax, matrix, diverging=False)
        _label(ax, UNDERSTANDING, "token", title, yticks=toks)
        fig.colorbar(image, ax=ax)
    return fig


def layer_pair_figure(matrix: torch.Tensor, title: str, diverging: bool = False) -> Figure:
    """(m, n) map between understanding layer i (rows) and generation layer j (columns)."""
    m, n = matrix.shape
    return heatmap(matrix, GENERATION, UNDERSTANDING, title, [str(j) for j in range(n)], [str(i) for i in range(m)],
                   diverging=diverging)


def entropy_figure(entropy: torch.Tensor, sparsity: torch.Tensor, timesteps: torch.Tensor, m: int) -> Figure:
    """Eq. 3 entropy (left axis, with log m for uniform routing) and top-k mass (right axis) over steps."""
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    x = timesteps[: len(entropy)].numpy()
    ax.plot(x, entropy.numpy(), "o-", color="tab:blue", label="entropy")
    uniform = torch.tensor(float(m)).log().item()
    ax.axhline(uniform, color="tab:blue", linestyle=":", label="log m (uniform)")
    ax.set_ylim(0, 1.05 * uniform)
    ax.set_xlim(max(x.max(), 1e-3) + 0.02, min(x.min(), 1.0) - 0.02)  # time runs from noise (1) to image (0)
    _label(ax, "denoising step (t)", "routing entropy (nats)", "routing entropy and top-k mass")
    right = ax.twinx()
    right.plot(x, sparsity.numpy(), "s--", color="tab:orange", label="top-k mass")
    right.set_ylabel("fraction of Eq. 3 mass on the top-k set")
    right.set_ylim(0, 1.05)
    fig.legend(loc="outside lower center", ncols=3)
    return fig


def trajectory_strip(frames: torch.Tensor) -> torch.Tensor:
    """(S, B, C, H, W) in [0, 1] -> one (C, H', W') image: a row per prompt, a column per step."""
    steps, batch = frames.shape[:2]
    ordered = frames.transpose(0, 1).reshape(steps * batch, *frames.shape[2:])  # prompt-major
    return make_grid(ordered, nrow=steps, padding=1, pad_value=1.0)


def trajectory_figure(frames: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str]) -> Figure:
    """The denoising trajectory as an image strip, columns labelled with the t reached after each step."""
    steps, batch, _, h, w = frames.shape
    fig = Figure(figsize=(max(4.0, 1.0 * steps), 1.2 * batch + 0.8), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(trajectory_strip(frames).permute(1, 2, 0).numpy())
    _label(ax, "t after the step", "prompt", "denoising trajectory")
    ax.set_xticks([1 + (w + 1) * s + w / 2 for s in range(steps)], _t_labels(timesteps[1: steps + 1]))
    ax.set_yticks([1 + (h + 1) * b + h / 2 for b in range(batch)], [p[:24] for p in prompts])
    return fig


def trace_figures(trace: Trace, token_step: int = 0, trajectory: bool = True) -> dict[str, Figure]:
    """Every router figure of one Trace: (a) contributions, (b) tokens, (c) affinity, selection frequency,
    entropy, and (d) the trajectory (unless `trajectory` is False). Keys are short tags for loggers."""
    routings, m = trace.routings, trace.routings[0].logits.shape[-2]
    t = trace.timesteps[token_step if token_step >= 0 else len(routings) + token_step].item()
    tokens = [R.token_routing(routings, token_step, b) for b in range(len(trace.prompts))]
    figures = {
        "contribution": contribution_figure(R.step_contributions(routings), trace.timesteps),
        "tokens": token_figure(tokens, trace.tokens, [f"{p[:28]} (t={t:.2f})" for p in trace.prompts]),
        "affinity": layer_pair_figure(R.affinity(routings), "affinity: Eq. 3 weight, mean over tokens and steps"),
        "selection_frequency": layer_pair_figure(R.selection_frequency(routings), "top-k selection frequency"),
        "entropy": entropy_figure(R.routing_entropy(routings), R.sparsity(routings), trace.timesteps, m),
    }
    if trajectory:
        figures["trajectory"] = trajectory_figure(trace.frames, trace.timesteps, trace.prompts)
    return figures


def difference_figures(a: Trace, b: Trace, labels: tuple[str, str] = ("A", "B")) -> dict[str, Figure]:
    """Arm A minus arm B (same prompts, seed and steps): contributions per step and selection frequencies."""
    diff = R.arm_difference(a.routings, b.routings)
    name = f"{labels[0]} - {labels[1]}"
    return {"contribution": contribution_figure(diff["contribution"], a.timesteps, f"contribution: {name}", True),
            "selection_frequency": layer_pair_figure(diff["selection_frequency"], f"selection frequency: {name}", True)}
