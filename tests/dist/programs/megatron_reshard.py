"""torchrun program (2 ranks, gloo): a Qwen3-VL MegatronBackend checkpoint saved at TP=2 (+ sequence
parallel) resumes at TP=1 (DP=2) and at PP=2 (elastic resume), and hands its weights alone to those layouts
(the stage handoff across layouts).

    megatron_reshard.py CHECKPOINT_DIR

TP=2: one training step (weights away from the init, Adam state present), backend.save (dist_checkpointing),
the exported native state dict and the full logits of a probe sequence are what every later layout must
reproduce. Then for TP=1 and PP=2, each from another seed (checked to differ first, else the test would be
vacuous):
  - backend.load (model + fully reshardable distributed-optimizer state): the export equals the saved one
    bitwise; saved again at once, every tensor of the checkpoint in model space (weights, fp32 master
    copies, Adam's exp_avg and exp_avg_sq, each gathered whole by dist_checkpointing.load_plain_tensors)
    equals the original checkpoint's bitwise; and the next step equals the saving run's next step within 1e-5 (another reduction order),
    while a fresh optimizer on the same weights is far from it (so the moments really were loaded),
  - load_model_weights_from_checkpoint: the export equals the saved one bitwise; the logits equal bitwise
    those of the same layout handed the saved weights natively (load_model_weights), and those of the
    saving TP=2 model within 1e-6 (TP=2 sums its row-parallel halves in another order: rounding),
  - the next step equals that natively loaded backend's step bitwise: the optimizer starts fresh and steps
    the loaded weights, not the ones the backend was built with.
Then a change of expert-parallel size: the tiny MoE model saved at EP=2 (each rank 2 of the 4 experts, expert
DP 1) resumes at EP=1 (DP=2, every rank all experts), and what that run saves resumes at EP=2 again, with the
same full-load checks (weights, fp32 masters and moments bitwise in model space, the next step within 1e-5 of
the saving run's).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_common import compare_states, global_batch
from megatron_backend import mode_config, train
from rank_harness import finish, start
from train.backends.base import gathered_state_dict
from train.backends.megatron.backend import MegatronBackend
from train.backends.megatron.checkpoint import SUBDIR
from train.models.weight_source import StateDictSource

TOLERANCE = 1e-7  # exported weights (they come out bitwise equal)
CROSS_LAYOUT_LOGITS = 1e-6  # logits of the TP=2 model vs TP=1 / PP=2: another reduction order
NEXT_STEP = 1e-5  # weights after one more step at TP=2 vs after a full load + step at TP=1 / PP=2
LAYOUTS = {"tp2": dict(tp=2, pp=1, sequence_parallel=True), "tp1": dict(tp=1, pp=1, sequence_parallel=False),
           "pp2": dict(tp=1, pp=2, sequence_parallel=False)}


def layout_config(name: str, seed: int):
    cfg = mode_config("pp")  # 4 text layers, DeepStack on layers 0-1: runs in all three layouts
    for key, value in LAYOUTS[name].items():
        setattr(cfg.parallel, key, value)
    cfg.seed = seed
    return cfg


@torch.no_grad()
def full_logits(backend: MegatronBackend, batch) -> torch.Tensor | None:
    """[n, V] logits of one packed sequence on the last pipeline stage (None elsewhere); earlier stages
    hand their activations on point-to-point, as the schedule would."""
    model, mpu = backend.model, backend.mpu
    model.eval()
    if not mpu.is_pipeline_first_stage():
        received = torch.empty(batch.seq_len, 1, backend.cfg.model.text.hidden_size)
        dist.recv(received, src=mpu.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(received)
    hidden = model(batch)
    model.train()
    if not mpu.is_pipeline_last_stage():
        dist.send(hidden.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
        return None
    return model.gather_sequence_parallel(hidden) @ model.lm_head_weight().t()


def compare_exports(got: dict, want: dict, failures: list[str], what: str) -> float:
    """Rank 0 holds the exports: same tensor names, values within TOLERANCE."""
    if dist.get_rank() != 0:
        return 0.0
    if got.keys() != want.keys():
        failures.append(f"{what}: tensor names differ: {sorted(set(got) ^ set(want))[:5]}")
        return float("inf")
    return compare_states(got, want, TOLERANCE, failures, what)


def compare_logits(got: torch.Tensor | None, want: torch.Tensor | None, failures: list[str], what: str,
                   tolerance: float = 0.0) -> float:
    """Max |logit diff| over the ranks holding logits (the last stage), the same on every rank."""
    diff = torch.tensor([0.0 if got is None else float((got - want).abs().max())])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() > tolerance:
        failures.append(f"{what}: logits differ by {diff.item():.3g}")
    return diff.item()


def compare_model_space(got_dir: Path, want_dir: Path, failures: list[str], what: str) -> str:
    """Every tensor of two megatron checkpoints, whole (keys are layout-free: global layer numbers, model-space
    optimizer state), compared bitwise; the optimizer moments must be among them."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    got, want = (load_plain_tensors(str(d / SUBDIR)) for d in (got_dir, want_dir))
    flat_got, flat_want = _flatten(got), _flatten(want)
    if flat_got.keys() != flat_want.keys():
        failures.append(f"{what}: keys differ: {sorted(set(flat_got) ^ set(flat_want))[:4]}")
    moments = [k for k in flat_want if "exp_avg_sq" in k]
    if not moments:
        failures.append(f"{what}: no Adam moments in the checkpoint: {sorted(flat_want)[:4]}")
    unequal = [k for k in flat_want.keys() & flat_got.keys() if not torch.equal(flat_got[k], flat_want[k])]
    if unequal:
        failures.append(f"{what}: {len(unequal)} tensors differ, e.g. {sorted(unequal)[:3]}")
    return f"{len(flat_want)} checkpoint tensors ({len(moments)} exp_avg_sq) {len(unequal)} unequal"


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def check_full_load(name: str, ckpt: Path, want_state: dict, want_logits: torch.Tensor, probe, step_batches,
                    want_next: dict, failures: list[str], cfg=None) -> str:
    """backend.load (model + optimizer, fully reshardable) into layout `name` (or `cfg`): the weights come back
    bitwise, and the next step continues the saving run's: Adam's moments were resharded too, not afresh."""
    backend = MegatronBackend(cfg or layout_config(name, seed=3000))
    backend.load(ckpt)
    weights = compare_exports(gathered_state_dict(backend), want_state, failures, f"{name} full-load weights")
    resaved = ckpt.with_name(f"{ckpt.name}_{name}")
    backend.save(resaved)
    moments = compare_model_space(resaved, ckpt, failures, f"{name} full-load state in model space")
    logits = compare_logits(full_logits(backend, probe), want_logits, failures, f"{name} full-load logits",
                            CROSS_LAYOUT_LOGITS)
    train(backend, step_batches)
    stepped = gathered_state_dict(backend)
    backend.close()
    step_diff = compare_states(stepped, want_next, NEXT_STEP, failures, f"{name} step after full load") \
        if dist.get_rank() == 0 else 0.0
    return f"weights diff {weights:.3g}, {moments}, logits vs tp2 {logits:.3g}, next step vs tp2's next step {step_diff:.3g}"


def check_layout(name: str, ckpt: Path, want_state: dict, want_logits: torch.Tensor, probe, step_batches,
                 want_next: dict, failures: list[str]) -> None:
    t0 = time.time()
    full = check_full_load(name, ckpt, want_state, want_logits, probe, step_batches, want_next, failures)
    backend = MegatronBackend(layout_config(name, seed=1000))
    before = compare_logits(full_logits(backend, probe), want_logits, [], name)
    if not before > 1e-3:
        failures.append(f"{name}: fresh model already gives the saved logits (diff {before}): vacuous")
    backend.load_model_weights_from_checkpoint(ckpt)
    state_diff = compare_exports(gathered_state_dict(backend), want_state, failures, f"{name} weights")
    logits = full_logits(backend, probe)
    saved_diff = compare_logits(logits, want_logits, failures, f"{name} vs tp2 logits", CROSS_LAYOUT_LOGITS)
    stepped = train(backend, step_batches)
    after_step = gathered_state_dict(backend)
    backend.close()

    native = MegatronBackend(layout_config(name, seed=2000))
    native.load_model_weights(StateDictSource(want_state))
    native_diff = compare_logits(logits, full_logits(native, probe), failures, f"{name} vs native-load logits")
    reference = train(native, step_batches)
    step_diff = compare_exports(after_step, gathered_state_dict(native), failures, f"{name} step after load")
    native.close()
    if stepped.loss != reference.loss:
        failures.append(f"{name}: step after weights-only load: loss {stepped.loss!r} vs {reference.loss!r}")
    fresh_vs_continued = max((after_step[k] - want_next[k]).abs().max().item() for k in want_next) \
        if dist.get_rank() == 0 else 0.0
    if dist.get_rank() == 0 and not fresh_vs_continued > 100 * NEXT_STEP:
        failures.append(f"{name}: a fresh optimizer steps like the resharded one ({fresh_vs_continued:.3g}): "
                        f"the full-load check cannot tell them apart")
    if dist.get_rank() == 0:
        print(f"[{name}] fresh logits diff {before:.3g}; full load: {full}; fresh optimizer instead: "
              f"{fresh_vs_continued:.3g}", flush=True)
        print(f"[{name}] weights-only load: max weight diff {state_diff:.3g}; max logit diff vs native load "
              f"{native_diff:.3g}, vs tp2 {saved_diff:.3g}; next step loss {stepped.loss!r} vs native load "
              f"{reference.loss!r} (weights diff {step_diff:.3g}) time {time.time() - t0:.1f}s", flush=True)


def _broadcast_state(state: dict) -> dict:
    """The export lives on rank 0; load_model_weights wants the full state dict on every rank."""
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_expert_parallel_change(ckpt: Path, failures: list[str]) -> None:
    """Saved at EP=2, fully loaded at EP=1 (DP=2); the other seed's weights differ first (not vacuous)."""
    t0 = time.time()
    cfg = mode_config("ep")
    cfg.seed = 21
    saved = MegatronBackend(cfg)
    train(saved, global_batch(cfg.model, 0))
    saved.save(ckpt)
    want_state = _broadcast_state(gathered_state_dict(saved))
    probe = global_batch(cfg.model, 5)[1]
    want_logits = full_logits(saved, probe)
    train(saved, global_batch(cfg.model, 1))
    want_next = gathered_state_dict(saved)
    saved.close()
    target = mode_config("ep")
    target.parallel.ep, target.seed = 1, 3000
    fresh = MegatronBackend(target)
    before = compare_logits(full_logits(fresh, probe), want_logits, [], "ep1")
    fresh.close()
    if not before > 1e-3:
        failures.append(f"ep1: fresh model already gives the saved logits (diff {before}): vacuous")
    full = check_full_load("ep1", ckpt, want_state, want_logits, probe, global_batch(cfg.model, 1), want_next,
                           failures, target)
    cfg.seed = 4000
    back = check_full_load("ep2", ckpt.with_name(f"{ckpt.name}_ep1"), want_state, want_logits, probe,
                           global_batch(cfg.model, 1), want_next, failures, cfg)  # what ep1 saved, at ep2
    if dist.get_rank() == 0:
        print(f"[ep1] saved at ep2, fresh logits diff {before:.3g}; full load: {full}; then its re-save at ep2: "
              f"{back}; time {time.time() - t0:.1f}s", flush=True)


def main(ckpt: Path) -> None:
    start()
    failures: list[str] = []
    cfg = layout_config("tp2", seed=11)
    probe = global_batch(cfg.model, 5)[1]  # the sequence with an image
    t0 = time.time()
    saved = MegatronBackend(cfg)
    train(saved, global_batch(cfg.model, 0))
    saved.save(ckpt)
    want_state = _broadcast_state(gathered_state_dict(saved))
    want_logits = full_logits(saved, probe)
    train(saved, global_batch(cfg.model, 1))  # what every full load's next step must reproduce
    want_next = gathered_state_dict(saved)
    saved.close()
    if dist.get_rank() == 0:
        print(f"[tp2] saved after one step; time {time.time() - t0:.1f}s", flush=True)
    for name in ("tp1", "pp2"):
        check_layout(name, ckpt, want_state, want_logits, probe, global_batch(cfg.model, 1), want_next, failures)
    check_expert_parallel_change(ckpt.with_name(f"{ckpt.name}_moe"), failures)
    finish(failures)


if __name__ == "__main__":  # required: the checkpoint writer's spawn Manager re-imports __main__
    main(Path(sys.argv[1]))
