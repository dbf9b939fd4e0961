"""`python -m train` with injected faults, for the resume and NaN tests.

    python train_with_faults.py [--signal-after N] [--nan-from K] [--max-steps A,B,..] HYDRA_OVERRIDES...

--signal-after N: SIGUSR1 to this process right after the N-th optimizer step of this run (what SLURM sends
    before a time limit); the trainer must checkpoint after that step and exit 0.
--nan-from K: from the K-th training batch of this run on, loss weights are NaN (a diverged step), so the
    loss and the gradients are not finite and the backend must skip the step.
--max-steps A,B,...: stage.max_steps of each stage of a pipeline, one value per stage (a command-line
    stage.max_steps=N would give every stage the same N).
Everything else is the real pipeline: real config, loader, DeepSpeed backend, checkpoints.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, Iterator

import torch

from data.batch import PackedBatch
from train.config.compose import stage_configs
from train.pipeline import build_stage_backend, run_pipeline
from train.trainer import StageRuntime, build_stage_loader


class NaNAfter:
    """A loader whose batches from the k-th on carry NaN loss weights; state passes through unchanged."""

    def __init__(self, loader: Any, first_bad: int) -> None:
        self.loader, self.first_bad = loader, first_bad

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def stats(self) -> dict:
        return self.loader.stats()

    def __iter__(self) -> Iterator[PackedBatch]:
        for i, batch in enumerate(self.loader, start=1):
            if i >= self.first_bad:
                batch.loss_weights = torch.full_like(batch.loss_weights, float("nan"))
            yield batch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--signal-after", type=int, default=0)
    parser.add_argument("--nan-from", type=int, default=0)
    parser.add_argument("--max-steps", default="")
    args, overrides = parser.parse_known_args()
    configs = stage_configs(overrides)
    for cfg, steps in zip(configs, filter(None, args.max_steps.split(","))):
        cfg.stage.max_steps = int(steps)

    def backend(cfg, weights):
        built = build_stage_backend(cfg, weights)
        if args.signal_after:
            step, steps = built.train_step, [0]

            def counted(micro):
                metrics = step(micro)
                steps[0] += 1
                if steps[0] == args.signal_after:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return metrics

            built.train_step = counted
        return built

    def loader(cfg, info, seed):
        built = build_stage_loader(cfg, info, seed)
        is_training_loader = seed == cfg.data.seed  # the held-out eval loader uses another seed
        return NaNAfter(built, args.nan_from) if args.nan_from and is_training_loader else built

    return run_pipeline(configs, StageRuntime(build_backend=backend, build_loader=loader))


if __name__ == "__main__":
    sys.exit(main())
