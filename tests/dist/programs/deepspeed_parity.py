"""torchrun program (2 ranks, gloo): the DeepSpeed backend in one layout against the one-process reference.

    deepspeed_parity.py MODE CHECKPOINT_DIR      MODE: zero1 | zero3 | cp2 | ep2 | bf16 (ZeRO-2)

Every mode: load_model_weights of the reference's initial weights, 3 steps on the same global batches
(4 packed sequences with images, one straddling the CP boundary; with DP=2 rank 0 gets the text-only
sequences and rank 1 the image ones), losses and exported parameters vs the reference; save before the
3rd step, load and redo it (same loss and weights). zero1/zero3 also: a step with a NaN loss weight on one
rank is skipped without touching the weights, and the following step still matches the reference;
per-source losses and eval_step against the reference.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from deepspeed_common import (check_random_init, compare_losses, compare_states, global_batch, initial_state,
                              make_config, reference_per_source, reference_training)
from rank_harness import finish, start
from train.backends.base import gathered_state_dict
from train.backends import build_backend
from train.models.weight_source import StateDictSource

MODES = {
    "zero1": dict(zero_stage=1),
    "zero3": dict(zero_stage=3),
    "cp2": dict(zero_stage=1, cp=2),
    "ep2": dict(moe=True, zero_stage=2, ep=2),
    "bf16": dict(zero_stage=2, precision="bf16"),
}
# bf16 keeps 8 mantissa bits: it is compared with the fp32 reference at bf16 resolution.
TOLERANCE = {"bf16": 2e-2}


def _train(backend, batches):
    info = backend.info
    return backend.train_step(batches[info.dp_rank::info.dp_size])


def _resume_check(backend, ckpt: Path, batches, want_loss: float, want_state: dict, failures: list[str]) -> None:
    backend.load(ckpt)
    again = _train(backend, batches).loss
    if abs(again - want_loss) > 1e-6 * abs(want_loss):
        failures.append(f"resumed step loss {again} != {want_loss}")
    compare_states(gathered_state_dict(backend), want_state, 1e-6, failures, "resumed step")


def _nan_skip_check(backend, cfg, init, steps, failures: list[str]) -> None:
    before = gathered_state_dict(backend)
    poisoned = [b.to("cpu") for b in global_batch(cfg.model, 3)]
    poisoned[0].loss_weights = poisoned[0].loss_weights.clone()
    poisoned[0].loss_weights[5] = float("nan")  # only rank 0's micro-batch
    metrics = _train(backend, poisoned)
    if not metrics.skipped:
        failures.append(f"NaN step not reported as skipped: {metrics}")
    compare_states(gathered_state_dict(backend), before, 0.0, failures, "skipped step changed weights")
    # Steps 0-2 were applied, the 4th was skipped and did not advance the LR schedule: the next step trains on
    # batch 3 at schedule index 3, as if the skipped step had never happened.
    ref_losses, ref_state = reference_training(cfg, init, steps + [global_batch(cfg.model, 3)], [0, 1, 2, 3])
    after = _train(backend, global_batch(cfg.model, 3))
    compare_losses([after.loss], ref_losses[3:], 1e-5, failures, "step after the skipped one")
    compare_states(gathered_state_dict(backend), ref_state, 1e-5, failures, "after the skipped step")


def _metrics_check(backend, cfg, init, batches, first, failures: list[str]) -> None:
    want = reference_per_source(cfg, init, batches)
    got = first.loss_per_source
    if set(got) != set(want) or any(abs(got[s] - want[s]) > 1e-5 * abs(want[s]) for s in want):
        failures.append(f"per-source losses {got} vs {want}")
    if first.tokens != sum(int((b.source_ids >= 0).sum()) for b in batches):
        failures.append(f"tokens {first.tokens}")


def main(mode: str, ckpt: str) -> None:
    rank = start()
    failures: list[str] = []
    cfg = make_config(**MODES[mode])
    init = initial_state(cfg)
    steps = [global_batch(cfg.model, s) for s in range(3)]
    ref_losses, ref_state = reference_training(cfg, init, steps)
    ref_norms = reference_training.grad_norms
    t0 = time.time()
    backend = build_backend(cfg)  # built from RandomInit(cfg.seed): other weights until load_model_weights
    if mode in ("zero3", "ep2"):
        check_random_init(backend, cfg, failures, f"{mode} construction")
    backend.load_model_weights(StateDictSource(init))
    t_init = time.time() - t0
    metrics = [_train(backend, steps[0]), _train(backend, steps[1])]
    backend.save(Path(ckpt))
    metrics.append(_train(backend, steps[2]))
    losses = [m.loss for m in metrics]
    tol = TOLERANCE.get(mode, 1e-5)
    loss_diff = compare_losses(losses, ref_losses, tol, failures, mode)
    exported = gathered_state_dict(backend)
    param_diff = compare_states(exported, ref_state, tol, failures, mode)
    if any(m.skipped for m in metrics):
        failures.append(f"unexpected skip: {metrics}")
    # Adam hides a uniform gradient scale; the norm does not: it checks the DP/accumulation compensation.
    compare_losses([m.grad_norm for m in metrics], ref_norms, tol, failures, f"{mode} grad norms")
    _resume_check(backend, Path(ckpt), steps[2], losses[2], exported, failures)
    if mode in ("zero1", "zero3"):
        _metrics_check(backend, cfg, init, steps[0], metrics[0], failures)
        _nan_skip_check(backend, cfg, init, steps, failures)
    print(f"[{mode}] rank {rank}: losses {losses} reference {ref_losses} max rel loss diff {loss_diff:.2e} "
          f"max param diff {param_diff:.2e} init {t_init:.1f}s total {time.time() - t0:.1f}s", flush=True)
    finish(failures)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2])
