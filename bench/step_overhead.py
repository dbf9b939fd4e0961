"""Per-step overhead on small models: how batches leave the loader worker, and how many forward passes a step makes.

A cProfile of the needle miniature's stages (tiny model, 256-1024 tokens, 4 packed sequences per step) found
two costs that do not scale with the model: receiving each batch from the loader worker (torch hands every
tensor storage over with its own socket handshake) and running the step's sequences as separate forward and
backward passes. This benchmark measures each against its baseline in the same run:

  transfer: a DataLoader worker sends the same packed batches (tiny model, --seq-len tokens, the bench mix:
            text, images, short videos) the plain way (every tensor through shared memory) and wrapped in
            data.transfer.ByValue; the figure is milliseconds per batch received, measured in the trainer
            process (median of --reps passes over --batches batches).
  joining:  one training step (the DeepSpeed backend's LossModule forward + backward per micro-batch, then
            torch AdamW) on --per-step packed sequences, one forward per sequence (stage.micro_batch_size=1)
            and joined into one (micro_batch_size = per-step); steps per second, repetitions interleaved.

Prints `RESULT transfer_ms_per_batch_{plain,by_value}`, `RESULT transfer_speedup`,
`RESULT steps_per_s_micro{1,N}` and `RESULT joined_speedup`, and appends them to bench/RESULTS.md.
Usage: python bench/step_overhead.py [--seq-len 256] [--per-step 4] [--batches 200] [--reps 3] [--no-write]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

import common  # noqa: F401 - puts the repo root on sys.path
from common import ROOT, document_stream, median, pack, publish

from data.batch import PackedBatch  # noqa: E402
from data.transfer import ByValue  # noqa: E402
from train.backends.deepspeed.module import LossModule  # noqa: E402
from train.loss import global_weight_sum  # noqa: E402
from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.models.qwen3vl import Qwen3VLModel  # noqa: E402
from train.trainer import join_micro_batches  # noqa: E402


class _Batches(IterableDataset):
    def __init__(self, batches: list[PackedBatch], count: int, by_value: bool) -> None:
        self.batches, self.count, self.by_value = batches, count, by_value

    def __iter__(self):
        for i in range(self.count):
            batch = self.batches[i % len(self.batches)]
            yield ByValue(batch) if self.by_value else batch


def transfer_ms(batches: list[PackedBatch], count: int, by_value: bool) -> float:
    """Milliseconds per batch received from one worker (after its first batch: process start excluded)."""
    loader = DataLoader(_Batches(batches, count + 1, by_value), batch_size=None, num_workers=1,
                        collate_fn=lambda item: item, prefetch_factor=4)
    items = iter(loader)
    got = next(items)
    time.sleep(0.5)  # let the worker fill its prefetch queue: what is timed is the receiving
    start = time.perf_counter()
    for got in items:
        assert isinstance(got, PackedBatch)
    return (time.perf_counter() - start) * 1000 / count


def step_seconds(model: Qwen3VLModel, optimizer: torch.optim.Optimizer, micro: list[PackedBatch]) -> float:
    start = time.perf_counter()
    weight = global_weight_sum([(b.labels, b.loss_weights) for b in micro])
    for batch in micro:
        objective, *_ = LossModule(model)(batch, weight, 1, 1.0)
        objective.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def joining(sequences: list[list[PackedBatch]], per_step: int, reps: int) -> dict[int, float]:
    """Steps per second with micro_batch_size 1 and per_step (interleaved; warm-up steps not counted)."""
    cfg = load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[int, list[float]] = {1: [], per_step: []}
    for rep in range(reps + 1):
        for size in ([1, per_step] if rep % 2 == 0 else [per_step, 1]):
            total = sum(step_seconds(model, optimizer, join_micro_batches(step, size)) for step in sequences)
            if rep:
                times[size].append(total / len(sequences))
    return {size: 1 / median(values) for size, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--per-step", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="distinct steps per joining repetition")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")
    packed = [b for b, _ in pack(document_stream(cfg, args.seq_len, seed=0), args.seq_len,
                                 args.steps * args.per_step)]
    plain = median([transfer_ms(packed, args.batches, by_value=False) for _ in range(args.reps)])
    by_value = median([transfer_ms(packed, args.batches, by_value=True) for _ in range(args.reps)])
    steps = [packed[i:i + args.per_step] for i in range(0, len(packed), args.per_step)]
    rates = joining(steps, args.per_step, args.reps)
    n = args.per_step
    figures = {"transfer_ms_per_batch_plain": plain, "transfer_ms_per_batch_by_value": by_value,
               "transfer_speedup": plain / by_value, "steps_per_s_micro1": rates[1],
               f"steps_per_s_micro{n}": rates[n], "joined_speedup": rates[n] / rates[1]}
    publish(figures, f"step_overhead (--seq-len {args.seq_len} --per-step {n}, tiny model)", not args.no_write)


if __name__ == "__main__":
    main()
