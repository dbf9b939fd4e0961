"""torchrun program (2 ranks, gloo): MegatronBackend in several layouts against the one-process reference
(Qwen3VLModel + torch AdamW + train/loss.py on the DeepSpeed parity tests' batches).

    megatron_backend.py CHECKPOINT_DIR MODE...     MODE: dp | tp | cp | cp_doc | ep | pp | vpp | ...

Every mode: load_model_weights of the reference's initial weights, 3 steps on the same global batches,
each step's loss within 1e-5 relative and the exported parameters within 1e-5 of the reference; the
pre-clip grad norms too. dp and ep also: save after step 2, step 3, load, step 3 again -> bitwise the same
loss and weights (exact resume); vpp (PP=2 x 2 virtual stages) also resumes bitwise, and its checkpoint
loads fully (model and optimizer) into PP=2 without virtual stages and back (cross_layout_check); dp then
a step with a NaN loss weight on one rank is skipped without touching the weights.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_common import (check_random_init, compare_losses, compare_states, global_batch, initial_state,
                              make_config, reference_training)
from rank_harness import finish, start
from train.backends.base import gathered_state_dict
from train.backends.megatron.backend import MegatronBackend
from train.models.weight_source import StateDictSource
from train.trainer import join_micro_batches

MODES = {
    "dp": dict(parallel={}),
    "tp": dict(parallel=dict(tp=2, sequence_parallel=True)),
    "cp": dict(cp=2, parallel={}),
    # Transformer Engine's THD layout on the local attention: every document in 2*cp chunks, padded to 4
    "cp_doc": dict(cp=2, parallel=dict(cp_layout="document")),
    "ep": dict(moe=True, ep=2, parallel={}),
    "pp": dict(parallel=dict(pp=2), text=dict(num_hidden_layers=4), deepstack=[0, 1]),
    # stage.micro_batch_size=2: the 4 sequences joined in pairs, 2 micro-batches of twice the length
    "pp_joined": dict(parallel=dict(pp=2), text=dict(num_hidden_layers=4), deepstack=[0, 1], micro_batch_size=2),
    "cp_doc_joined": dict(cp=2, parallel=dict(cp_layout="document"), micro_batch_size=2),
    # MoE over 2 pipeline stages: megatron's per-layer aux loss (each stage adds its own layers' share), with
    # a coefficient large enough that a wrong aux gradient moves the compared parameters
    # the published 235B fold on 2 ranks: experts over the TP ranks (expert TP 1, EP 2 = TP 2, expert-DP 1)
    "tp_ep": dict(moe=True, ep=2, parallel=dict(tp=2, sequence_parallel=True)),
    "pp_moe": dict(moe=True, parallel=dict(pp=2), text=dict(router_aux_loss_coef=0.05), deepstack=[0, 1]),
    # interleaved 1F1B: each rank holds 2 one-layer chunks (rank 0: layers 0 and 2, rank 1: 1 and 3)
    "vpp": dict(parallel=dict(pp=2, vpp=2), text=dict(num_hidden_layers=4), deepstack=[0]),
    # MoE chunks: each rank sums its chunks' per-layer aux shares per micro-batch
    "vpp_moe": dict(moe=True, parallel=dict(pp=2, vpp=2), text=dict(num_hidden_layers=4, router_aux_loss_coef=0.05),
                    deepstack=[0]),
}
# save after step 2, load, redo step 3 bitwise; ep's model mixes a dense layer (mlp_only_layers) with MoE ones
RESUMED = ("dp", "ep", "vpp")


def mode_config(mode: str):
    spec = dict(MODES[mode])
    parallel, text, deepstack = spec.pop("parallel"), spec.pop("text", {}), spec.pop("deepstack", None)
    micro_batch_size = spec.pop("micro_batch_size", 1)
    cfg = make_config(**spec)
    cfg.stage.micro_batch_size = micro_batch_size
    cfg.backend.name, cfg.backend.precision, cfg.backend.distributed_optimizer = "megatron", "fp32", True
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    for key, value in text.items():
        setattr(cfg.model.text, key, value)
    if deepstack is not None:
        cfg.model.vision.deepstack_visual_indexes = deepstack
    return cfg


def train(backend, batches):
    info = backend.info
    return backend.train_step(join_micro_batches(batches[info.dp_rank::info.dp_size],
                                                 backend.cfg.stage.micro_batch_size))


def resume_check(backend, ckpt: Path, batches, want_loss: float, want_state: dict, failures: list[str],
                 mode: str) -> None:
    """Load the checkpoint written before the last step and redo that step: bitwise the same loss and
    weights as the uninterrupted run."""
    backend.load(ckpt)
    got = train(backend, batches).loss
    if got != want_loss:
        failures.append(f"resumed step loss {got!r} != uninterrupted {want_loss!r}")
    exported = gathered_state_dict(backend)
    if dist.get_rank() == 0:
        compare_states(exported, want_state, 0.0, failures, f"{mode} resumed step")
        print(f"[{mode}] resume: loss {got!r} vs uninterrupted {want_loss!r}", flush=True)


def nan_skip_check(backend, cfg, failures: list[str]) -> None:
    before = gathered_state_dict(backend)
    poisoned = global_batch(cfg.model, 3)
    poisoned[0].loss_weights = poisoned[0].loss_weights.clone()
    poisoned[0].loss_weights[5] = float("nan")  # only rank 0's micro-batch
    schedule_step = backend.step
    metrics = train(backend, poisoned)
    if not metrics.skipped:
        failures.append(f"NaN step not reported as skipped: {metrics}")
    if backend.step != schedule_step:
        failures.append(f"skipped step advanced the LR schedule: {schedule_step} -> {backend.step}")
    after = gathered_state_dict(backend)
    if dist.get_rank() == 0:
        compare_states(after, before, 0.0, failures, "skipped step changed weights")
        print(f"[dp] NaN step skipped={metrics.skipped} grad_norm={metrics.grad_norm}", flush=True)


def cross_layout_check(cfg, ckpt: Path, saved_state: dict, want_loss: float, batches, failures: list[str]) -> None:
    """The PP=2 x VPP=2 checkpoint (after step 2) fully loaded into PP=2 without virtual stages: bitwise the
    saved weights, and its step 3 equals the VPP run's; that run's checkpoint loaded back into VPP=2:
    bitwise its weights, and the same eval loss (one micro-batch: VPP pads the schedule with a repeat)."""
    plain_cfg = mode_config("vpp")
    plain_cfg.parallel.vpp = None
    plain = MegatronBackend(plain_cfg)
    plain.load(ckpt)
    loaded = gathered_state_dict(plain)
    got = train(plain, batches).loss
    after = gathered_state_dict(plain)
    plain_eval = plain.eval_step(batches[0]).loss
    plain.save(ckpt.with_name("vpp_to_plain"))
    plain.close()
    back = MegatronBackend(cfg)
    back.load(ckpt.with_name("vpp_to_plain"))
    reloaded = gathered_state_dict(back)
    back_eval = back.eval_step(batches[0]).loss
    back.close()
    if dist.get_rank() == 0:
        compare_states(loaded, saved_state, 0.0, failures, "vpp checkpoint loaded without vpp")
        compare_states(reloaded, after, 0.0, failures, "no-vpp checkpoint loaded with vpp")
        rel = abs(got - want_loss) / abs(want_loss)
        if not rel <= 1e-6:
            failures.append(f"vpp -> no vpp: step 3 loss {got!r} vs {want_loss!r}")
        eval_rel = abs(back_eval - plain_eval) / abs(plain_eval)
        if not eval_rel <= 1e-6:
            failures.append(f"vpp eval loss {back_eval!r} vs no vpp {plain_eval!r}")
        print(f"[vpp] eval of one micro-batch: {back_eval!r} vs no vpp {plain_eval!r} (rel {eval_rel:.2e})",
              flush=True)
        print(f"[vpp] cross-layout: loaded without vpp, step 3 loss {got!r} vs {want_loss!r} (rel {rel:.2e}); "
              f"weights bitwise both ways", flush=True)


def run_mode(mode: str, ckpt: Path, failures: list[str]) -> None:
    cfg = mode_config(mode)
    init = initial_state(cfg)
    multiple = 2 * cfg.parallel.cp if cfg.parallel.cp_layout == "document" else 1
    steps = [global_batch(cfg.model, s, multiple) for s in range(3)]
    ref_losses, ref_state = reference_training(cfg, init, steps)
    ref_norms = reference_training.grad_norms
    t0 = time.time()
    backend = MegatronBackend(cfg)  # built from RandomInit(cfg.seed): other weights until load_model_weights
    if mode in ("tp", "ep", "pp"):
        check_random_init(backend, cfg, failures, f"{mode} construction")
    backend.load_model_weights(StateDictSource(init))
    if backend.info.document_multiple != multiple:  # what the trainer's loader pads documents to
        failures.append(f"{mode}: backend asks for documents padded to {backend.info.document_multiple}, "
                        f"the layout needs {multiple}")
    metrics = [train(backend, steps[0]), train(backend, steps[1])]
    if mode in RESUMED:
        saved_state = gathered_state_dict(backend) if mode == "vpp" else {}
        backend.save(ckpt)
    metrics.append(train(backend, steps[2]))
    exported = gathered_state_dict(backend)
    losses = [m.loss for m in metrics]
    loss_diff = compare_losses(losses, ref_losses, 1e-5, failures, mode)
    compare_losses([m.grad_norm for m in metrics], ref_norms, 1e-5, failures, f"{mode} grad norms")
    param_diff = compare_states(exported, ref_state, 1e-5, failures, mode) if dist.get_rank() == 0 else 0.0
    if mode in RESUMED:
        resume_check(backend, ckpt, steps[2], losses[2], exported, failures, mode)
    if mode == "dp":
        nan_skip_check(backend, cfg, failures)
    if dist.get_rank() == 0:
        print(f"[{mode}] losses {losses} reference {ref_losses} max rel loss diff {loss_diff:.2e} "
              f"max param diff {param_diff:.2e} aux {[round(m.aux_loss, 4) for m in metrics]} "
              f"time {time.time() - t0:.1f}s", flush=True)
    backend.close()
    if mode == "vpp":
        cross_layout_check(cfg, ckpt, saved_state, losses[2], steps[2], failures)


def main(ckpt: str, modes: list[str]) -> None:
    start()
    failures: list[str] = []
    for mode in modes:
        run_mode(mode, Path(ckpt) / mode, failures)
    finish(failures)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2:])
