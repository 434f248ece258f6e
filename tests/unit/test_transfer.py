"""Bucketed weight transfer trainer -> engine ranks (rollout/transfer.py) over a real gloo group: two
ranks as two threads of this process, one sending a model's worth of HF-named tensors, one receiving."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from unittest.mock import patch

import torch
import torch.distributed as dist

from megatron_speed.rollout import transfer
from megatron_speed.rollout.buckets import tensor_bytes
from megatron_speed.rollout.transfer import pack, receive_buckets, send_weights, unpack

real_pack = transfer.pack

CPU = torch.device("cpu")


def _model() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [("embed", (64, 32), torch.float32), ("q", (32, 32), torch.float32), ("k", (16, 32), torch.float32),
              ("norm", (32,), torch.bfloat16), ("big", (128, 64), torch.float32), ("bias", (7,), torch.float64),
              ("tail", (3, 5), torch.float16)]
    return [(n, torch.randn(*s, generator=gen).to(dt)) for n, s, dt in shapes]


def test_pack_round_trips_mixed_dtypes() -> None:
    bucket = _model()
    header, flat = pack(bucket, CPU)
    assert flat.numel() == sum(tensor_bytes(t) for _, t in bucket)
    for (name, tensor), (name2, back) in zip(bucket, unpack(header, flat)):
        assert name == name2 and back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_transfer_delivers_every_tensor_in_bounded_buckets() -> None:
    """Every tensor arrives bit for bit, in order; no packed bucket on either side exceeds the bound
    (the bucket size, or the largest tensor, which travels alone); and the sender pulls the export
    lazily: whenever it sends, the tensors it pulled but has not sent are at most one bucket plus the
    one tensor that overflowed it -- never the model."""
    model = _model()
    limit = 10_000  # bytes: "big" (32 KiB) travels alone, the rest in several buckets
    store = dist.HashStore()
    timeout = datetime.timedelta(seconds=60)
    pulled: list[int] = []
    unsent_bytes: list[int] = []  # at each payload broadcast: bytes pulled from the export, not yet sent
    received: list[tuple[str, torch.Tensor]] = []
    receiver_peak = [0]
    stats = {}

    def export() -> Iterator[tuple[str, torch.Tensor]]:
        for i, item in enumerate(model):
            pulled.append(i)
            yield item

    def sender() -> None:
        group = dist.ProcessGroupGloo(store, 0, 2, timeout)
        packed = [0]

        def counting_pack(bucket: list, device: torch.device) -> tuple:
            unsent_bytes.append(sum(tensor_bytes(model[i][1]) for i in pulled[packed[0]:]))
            packed[0] += len(bucket)
            return real_pack(bucket, device)

        with patch.object(transfer, "pack", counting_pack):
            stats["refit"] = send_weights(export(), group, bucket_bytes=limit, device=CPU)

    def receiver() -> None:
        group = dist.ProcessGroupGloo(store, 1, 2, timeout)
        for bucket in receive_buckets(group, CPU):
            receiver_peak[0] = max(receiver_peak[0], sum(tensor_bytes(t) for _, t in bucket))
            received.extend((n, t.clone()) for n, t in bucket)

    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [n for n, _ in received] == [n for n, _ in model]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(received, model))
    largest = max(tensor_bytes(t) for _, t in model)
    bound = max(limit, largest)
    refit = stats["refit"]
    assert refit.buckets >= 3 and refit.tensors == len(model)
    assert refit.bytes == sum(tensor_bytes(t) for _, t in model)
    assert refit.peak_bucket_bytes <= bound and receiver_peak[0] <= bound
    assert refit.peak_bucket_bytes == largest  # "big" alone is the largest bucket
    assert unsent_bytes and max(unsent_bytes) <= bound + largest
    assert max(unsent_bytes) < sum(tensor_bytes(t) for _, t in model)


def test_a_trainer_rank_outside_the_group_drains_the_export_and_sends_nothing() -> None:
    """Non-leader trainer ranks iterate the export (a collective among the trainer ranks) but send nothing."""
    pulled = []

    def export() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in _model():
            pulled.append(name)
            yield name, tensor

    refit = send_weights(export(), None, bucket_bytes=10_000, device=CPU)
    assert pulled == [n for n, _ in _model()]
    assert refit.buckets == 0 and refit.bytes == 0
