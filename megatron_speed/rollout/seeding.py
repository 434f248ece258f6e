"""Per-request sampling seeds, so a resumed run samples exactly what the uninterrupted run would have.

A vLLM engine's own sampling RNG advances with every request it serves; a run restarted from a
checkpoint starts a fresh engine and would draw different samples. Instead every request carries
its own seed, a hash of (sampling seed, rank, generation-call counter, request index): the counter
is part of the trainer state, so the same call after a resume gets the same seeds. vLLM gives the
i-th of a request's `n` samples the seed `seed + i`, hence seeds are kept below 2**62.
"""

from __future__ import annotations

import hashlib


def request_seed(base: int, rank: int, call: int, index: int) -> int:
    key = f"megatron-speed:{base}:{rank}:{call}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 2
