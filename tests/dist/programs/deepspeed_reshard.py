"""torchrun program (gloo): a DeepSpeed ZeRO checkpoint written by one number of data-parallel ranks resumes
on another (elastic resume), compared in model space.

    deepspeed_reshard.py STAGE SAVED_DIR OUT_DIR STEP [moe] [ep=N] [frozen=GROUP] [bf16]

`moe`: the tiny MoE model with its experts sliced over every rank (parallel.ep = world size), so a change
of world size changes the expert-parallel size too; `ep=N` slices them over N ranks instead (with more
ranks than N, each expert slice is held by world / N ranks: its expert-data-parallel group). `frozen=GROUP`: that trainable group (merger, llm: the
experts too) is frozen, so the load must restore parameters the optimizer does not own (the backend is built
with other weights). `bf16`: bf16 training (fp32 masters).

Loads SAVED_DIR/ckpt (written by a run at any world size; SAVED_DIR/model_space.pt holds that run's model-space
state after its save and its next step) unless STEP is 0, in which case it starts from the reference initial
weights. Checks, on the loading side:
  - the weights, fp32 master weights and both Adam moments, gathered per parameter in model space
    (DeepSpeed's safe_get_full_* API; expert parameters also over the expert-parallel group: all experts),
    equal the saved ones bitwise, and so does the Adam step count,
  - the next step (global batch STEP, the same global batch at any DP size) gives the saving run's next loss
    within 1e-4 relative and its weights after that step within 1e-4,
Then it trains that step, saves OUT_DIR/ckpt and writes OUT_DIR/model_space.pt for the next launch: the
state right after the save and the loss/weights of the step after it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deepspeed_common import compare_states, global_batch, initial_state, make_config
from rank_harness import finish, start
from train.backends import build_backend
from train.backends.base import gathered_state_dict
from train.models.weight_source import StateDictSource

NEXT_STEP = 1e-4  # another DP size sums the gradients in another order
MOMENTS = ("exp_avg", "exp_avg_sq")


def model_space(backend) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam moments of every trainable parameter, full (collective), plus the step
    count: the optimizer state independent of how ZeRO partitions it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = backend.engine.optimizer
    experts = backend.experts
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link each parameter to its Adam state after the first step(), but step() runs one param
        # group at a time and links every group after the first group's update, before torch's AdamW has
        # created the later groups' state: re-link now that every group has it.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    fp32, moment = safe_get_full_fp32_param, safe_get_full_optimizer_state
    if backend.cfg.backend.zero_stage == 0:  # torch AdamW keyed by the parameters (fp32) or their fp32 copies
        masters = {id(low): high for lows, highs in zip(getattr(zero, "fp16_groups", []),
                                                        getattr(zero, "fp32_groups", []))
                   for low, high in zip(lows, highs)}
        inner = zero.optimizer if masters else zero
        fp32 = lambda param: masters.get(id(param), param).detach()  # noqa: E731
        moment = lambda param, key: inner.state[masters.get(id(param), param)][key]  # noqa: E731
    out: dict[str, torch.Tensor] = {}
    for name, param in backend.engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = experts.gather if experts is not None and experts.is_expert_param(name.removeprefix("model.")) \
            else torch.Tensor.clone
        out[f"{name}/fp32"] = full(fp32(param))
        for key in MOMENTS:
            out[f"{name}/{key}"] = full(moment(param, key))
    optimizer = getattr(zero, "optimizer", zero)
    steps = {float(state["step"]) for state in optimizer.state.values() if "step" in state}
    out["adam_step"] = torch.tensor(sorted(steps))
    return out


def train(backend, step: int):
    cfg = backend.cfg
    batches = global_batch(cfg.model, step)
    info = backend.info
    return backend.train_step(batches[info.dp_rank::info.dp_size])


def compare_bitwise(got: dict, want: dict, failures: list[str], what: str) -> None:
    if got.keys() != want.keys():
        failures.append(f"{what}: names differ: {sorted(set(got) ^ set(want))[:4]}")
        return
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    if differ:
        failures.append(f"{what}: {len(differ)} tensors differ, first {differ[0]}")


def main(stage: int, saved: Path, out: Path, step: int, flags: list[str]) -> None:
    rank = start()
    failures: list[str] = []
    moe = "moe" in flags
    ep = next((int(flag.split("=", 1)[1]) for flag in flags if flag.startswith("ep=")), dist.get_world_size())
    cfg = make_config(moe=moe, zero_stage=stage, ep=ep if moe else 1, precision="bf16" if "bf16" in flags else "fp32")
    frozen = [flag.split("=", 1)[1] for flag in flags if flag.startswith("frozen=")]
    cfg.stage.trainable = [group for group in cfg.stage.trainable if group not in frozen]
    backend = build_backend(cfg)
    if step == 0:
        backend.load_model_weights(StateDictSource(initial_state(cfg)))
        train(backend, 0)
        step = 1
    else:
        backend.load(saved / "ckpt")
        want = torch.load(saved / "model_space.pt")
        compare_bitwise(model_space(backend), want["state"], failures, "optimizer state after load")
        weights = gathered_state_dict(backend)
        if rank == 0:
            compare_bitwise(weights, want["weights"], failures, "weights after load")
        loss = train(backend, step).loss
        if abs(loss - want["next_loss"]) > NEXT_STEP * abs(want["next_loss"]):
            failures.append(f"next step loss {loss} vs the saving run's {want['next_loss']}")
        diff = compare_states(gathered_state_dict(backend), want["next_weights"], NEXT_STEP, failures,
                              "weights after the next step")
        print(f"[stage {stage}{' moe' if moe else ''}] world {dist.get_world_size()}: loaded the checkpoint of step "
              f"{step}; next loss {loss!r} vs {want['next_loss']!r}, weights after it within {diff:.3g}", flush=True)
        step += 1
    backend.save(out / "ckpt")
    record = {"state": model_space(backend), "weights": gathered_state_dict(backend)}
    record["next_loss"] = train(backend, step).loss
    record["next_weights"] = gathered_state_dict(backend)
    if rank == 0:
        torch.save(record, out / "model_space.pt")
    finish(failures)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
