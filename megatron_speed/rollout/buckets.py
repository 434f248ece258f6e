"""Cut the refit's stream of HF-named tensors into buckets of bounded size.

The exporter yields full tensors one at a time; the engine loads them a bucket at a time, so the
memory held in flight is at most one bucket (plus the tensor being gathered). A bucket holds at most
`max_bytes` bytes, except that a tensor larger than that travels alone: it cannot be cut, and
padding it with others would only make the overshoot worse. Order is preserved, which keeps each
vLLM layer's weights close together (vLLM buffers a layer's weights until all of them arrived).

`RefitStats` is what the trainer logs about one refit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

NamedTensor = tuple[str, torch.Tensor]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucketize(named_tensors: Iterable[NamedTensor], max_bytes: int) -> Iterator[list[NamedTensor]]:
    """Yield consecutive lists of tensors whose byte sizes sum to at most `max_bytes` each.

    Lazy: a bucket is yielded as soon as the next tensor would overflow it, so the exporter is
    never more than one bucket ahead of the engine.
    """
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes} bytes")
    bucket: list[NamedTensor] = []
    filled = 0
    for name, tensor in named_tensors:
        size = tensor_bytes(tensor)
        if bucket and filled + size > max_bytes:
            yield bucket
            bucket, filled = [], 0
        bucket.append((name, tensor))
        filled += size
    if bucket:
        yield bucket


@dataclass(frozen=True)
class RefitStats:
    """One refit: wall seconds, tensors and bytes sent, bucket count and the largest bucket."""

    seconds: float
    tensors: int
    bytes: int
    buckets: int
    peak_bucket_bytes: int

    def metrics(self) -> dict[str, float]:
        return {"refit/seconds": self.seconds, "refit/tensors": float(self.tensors),
                "refit/bytes": float(self.bytes), "refit/buckets": float(self.buckets),
                "refit/peak_bucket_bytes": float(self.peak_bucket_bytes)}
