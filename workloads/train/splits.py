"""The held-out split every training job uses: a hash of (seed, key), so a record's side does not
depend on file order or on how Ray Data cut the blocks, and reruns hold out the same records."""

from __future__ import annotations

import hashlib


def is_held_out(key: str, *, eval_fraction: float, seed: int) -> bool:
    """Whether the record (or document) identified by `key` is held out."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction
