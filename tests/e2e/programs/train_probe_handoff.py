"""`python -m train` that also writes, for every stage that starts from weights (stage.init_from, or the
previous stage's final/ inside a pipeline), what the backend holds right after loading them.

    python train_probe_handoff.py HYDRA_OVERRIDES...

Right after the backend is built from them (the trainer hands a fresh stage's initial weights to the build),
every rank calls `gathered_state_dict(backend)` (collective: it gathers TP/PP/DP shards) and rank 0 writes it as a native model dir <run_dir>/<stage>/loaded/, in the same
format as final/. A test compares loaded/ with the directory the stage was initialised from: equal bitwise
means the handoff (native -> this backend's layout -> native) lost nothing, whichever backend wrote the dir.
Building happens before the first step, so the probe changes no number of the run.
Everything else is the real pipeline: real config, loader, backend, checkpoints, final/, hf/.
"""
from __future__ import annotations

import sys
from pathlib import Path

from train.backends.base import gathered_state_dict
from train.checkpoint import barrier, rank
from train.config.compose import stage_configs
from train.models.native_io import save_native_checkpoint
from train.pipeline import build_stage_backend, run_pipeline
from train.trainer import StageRuntime, build_stage_loader

LOADED = "loaded"


def main() -> int:
    configs = stage_configs(sys.argv[1:])

    def backend(cfg, weights):
        built = build_stage_backend(cfg, weights)
        if weights is not None:  # built from the stage's initial weights: what it holds now
            exported = gathered_state_dict(built)  # every rank: the gather is collective
            if rank() == 0:
                save_native_checkpoint(Path(cfg.run_dir) / cfg.stage.name / LOADED, cfg.model, exported,
                                       force=True)
            barrier()
        return built

    return run_pipeline(configs, StageRuntime(build_backend=backend, build_loader=build_stage_loader))


if __name__ == "__main__":  # dist_checkpointing's writer is a spawn Manager that re-imports __main__
    sys.exit(main())
