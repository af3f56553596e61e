"""Which checkpoints can be used (a save killed half-way must never be picked), and sharded checkpoints made
into one file."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

EXTRA = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards: step, loops, callbacks


def is_complete(path: Path) -> bool:
    """A file: torch.save writes a zip whose directory comes last, so a truncated file has none. A sharded
    checkpoint (a folder): torch.distributed.checkpoint writes `.metadata` once every shard is written, and
    rank 0 writes meta.pt after that."""
    if path.is_dir():
        return (path / ".metadata").is_file() and is_complete(path / EXTRA)
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete(folder: Path) -> tuple[Path | None, list[Path]]:
    """(the newest complete *.ckpt in `folder` by modification time, or None; the incomplete ones skipped).
    Saves within one timestamp tick tie; the name breaks the tie, so the pick is the same every time."""
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    skipped = []
    for path in found:
        if is_complete(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def consolidate(folder: Path, out: Path) -> Path:
    """A sharded checkpoint (ModelParallelStrategy's folder) -> one file that `sample`, the notebook and
    `fit --ckpt_path` read like any other. Lightning's own consolidate_checkpoint expects its FSDPStrategy's
    layout (a "model" key) and fails on this one's ("state_dict"), hence this. The shards are read with
    torch.distributed.checkpoint, which unpickles: consolidate only checkpoints you trust (your own runs)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not is_complete(folder):
        raise FileNotFoundError(f"{folder}: not a complete sharded checkpoint (no .metadata or {EXTRA})")
    dcp_to_torch_save(folder, out)
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    optimizers = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    checkpoint.update(torch.load(folder / EXTRA, map_location="cpu", weights_only=True))
    torch.save(checkpoint, out)
    return out
