"""`python -m mos_lightning consolidate CHECKPOINT_FOLDER [--out FILE]`: a sharded (FSDP2) checkpoint -> one file."""
from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from ..checkpoints import consolidate, is_complete
from ..errors import ConfigError


def consolidate_main(args: list[str]) -> Path:
    p = ArgumentParser(prog="python -m mos_lightning consolidate", description=__doc__)
    p.add_argument("folder", type=str, help="a sharded checkpoint: <run>/checkpoints/<name>.ckpt/ (a folder)")
    p.add_argument("--out", type=str, default=None, help="default: <folder>.consolidated.ckpt beside it")
    cfg = p.parse_args(args)
    folder = Path(cfg.folder)
    if not folder.is_dir() or not is_complete(folder):
        raise ConfigError(f"consolidate {folder}: not a complete sharded checkpoint (a folder with .metadata and "
                          "meta.pt, as FSDP2 runs write)")
    out = Path(cfg.out) if cfg.out else folder.with_name(folder.stem + ".consolidated.ckpt")
    consolidate(folder, out)
    print(f"wrote {out}")
    return out
