"""Seeds derived from several ints, shared by the data samplers and the LightningModule."""
from __future__ import annotations

import hashlib


def mix_seed(*parts: int) -> int:
    """One 32-bit generator seed from several ints, hashed: torch's CPU generator keeps only the low 32 bits of
    a seed, so shifting or adding would let tuples collide (seed + epoch makes (0, 1) == (1, 0))."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")
