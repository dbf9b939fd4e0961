"""`python -m train.doctor` (`make doctor`): first contact with a machine, before a real run.

Prints the devices, the versions of the GPU stack (torch, CUDA, NCCL, deepspeed, megatron-core, flash-attn,
Transformer Engine) and what a run will use on this machine (train/fast_path.py, the same lines the
trainer logs at start-up), then runs checks on the local devices:
- model: the tiny model's loss and gradients on this device in bf16 against the fp32 CPU reference;
- attention: flash-attn varlen, torch's varlen_attn and Transformer Engine's THD attention against
  per-segment SDPA in fp32 on one packed batch (forward and the query gradient), when the package and a
  GPU are present;
- ranks: with two or more GPUs, one training step per backend on 2 ranks over NCCL equals the same step on
  one device (fp32). `--ranks-on-cpu` runs it over gloo on the CPU instead (slow; for debugging a setup).
Without a GPU the CPU variant runs (bf16 on the CPU against fp32, GPU-only checks reported as skipped).
Exit status 0 when every check passed or was skipped (with its reason), 1 when one failed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data.batch import Document, PackedBatch
from data.packing import build_packed
from data.positions import document_position_ids
from train.config.compose import load_config
from train.config.model import ModelConfig
from train.config.schema import TrainConfig
from train.device import compute_device, move_batch
from train.fast_path import describe
from train.models.qwen3vl import Qwen3VLModel
from train.models.qwen3vl import attention as reference_attention

PACKAGES = {"torch": ("torch",), "deepspeed": ("deepspeed",), "megatron-core": ("megatron-core", "megatron_core"),
            "flash-attn": ("flash-attn", "flash_attn"),
            "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-torch")}
# The releases the code is written against (version prefixes): megatron-core's API, and the Transformer Engine
# range that megatron-core release is tested with.
SUPPORTED = {"megatron-core": ("0.16.",), "transformer-engine": ("2.9.", "2.10.", "2.11."),
             "flash-attn": ("2.",)}
# Relative errors allowed against the fp32 CPU reference: (loss, gradient norm of the difference).
MODEL_TOLERANCE = {torch.bfloat16: (2e-2, 1e-1), torch.float32: (1e-4, 1e-3)}
ATTENTION_TOLERANCE = 2e-2  # bf16 kernels against fp32 SDPA, max abs error on unit-variance inputs
RANKS_TOLERANCE = 1e-4  # fp32 2-rank step against 1 rank (reduction order only)
SEQ_LEN = 128


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str

    def line(self) -> str:
        return f"  [{self.status:>4}] {self.name}: {self.detail}"


# ------------------------------------------------------------------------------------------ report
def versions() -> dict[str, str]:
    """Installed versions (package metadata: nothing heavy is imported), CUDA and NCCL as torch sees them."""
    found: dict[str, str] = {}
    for name, dists in PACKAGES.items():
        found[name] = "not installed"
        for dist_name in dists:
            try:
                found[name] = importlib.metadata.version(dist_name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    found["CUDA (torch build)"] = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        found["NCCL"] = ".".join(map(str, torch.cuda.nccl.version()))
    return found


def version_warnings(found: dict[str, str]) -> list[str]:
    """One line per installed package outside the releases in SUPPORTED."""
    return [f"{name} {found[name]} is not a release the code was written for ({' or '.join(p + 'x' for p in prefixes)})"
            for name, prefixes in SUPPORTED.items()
            if found.get(name, "not installed") != "not installed" and not found[name].startswith(prefixes)]


def devices() -> list[str]:
    lines = [f"cpu: {os.cpu_count()} cores, {len(os.sched_getaffinity(0))} usable by this process"]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    return lines


def doctor_config(backend: str, precision: str = "fp32") -> TrainConfig:
    """The tiny model with one packed SEQ_LEN sequence per rank and step (2 per step)."""
    return load_config([f"backend={backend}", f"backend.precision={precision}", "model=tiny",
                        f"stage.seq_len={SEQ_LEN}", "stage.global_batch_size=2"])


def run_paths(device: torch.device) -> list[str]:
    precision = "bf16" if device.type == "cuda" else "fp32"
    return [describe(doctor_config(backend, precision), device) for backend in ("deepspeed", "megatron")]


# ------------------------------------------------------------------------------------------ inputs
def _document(cfg: ModelConfig, key: str, gen: torch.Generator, text: int, image_side: int = 0) -> Document:
    """`text` random tokens, preceded by an image of image_side x image_side patches when image_side > 0."""
    ids = torch.randint(16, cfg.text.vocab_size, (text,), generator=gen)
    grid = None
    if image_side:
        merged = image_side * image_side // cfg.vision.spatial_merge_size ** 2
        vision = [cfg.vision_start_token_id, *[cfg.image_token_id] * merged, cfg.vision_end_token_id]
        ids = torch.cat([torch.tensor(vision), ids])
        grid = torch.tensor([[1, image_side, image_side]])
    positions = document_position_ids(ids, grid, None, image_token_id=cfg.image_token_id,
                                      video_token_id=cfg.video_token_id,
                                      spatial_merge_size=cfg.vision.spatial_merge_size)
    target = ids != cfg.image_token_id
    target[0] = False
    v = cfg.vision
    pixels = None if grid is None else torch.randn(
        image_side * image_side, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=gen)
    return Document(key=key, source=0, input_ids=ids, position_ids=positions, target_mask=target,
                    pixel_values=pixels, image_grid_thw=grid)


def doctor_batch(cfg: ModelConfig, seed: int = 0) -> PackedBatch:
    """One packed sequence: a text document, an image + caption, another text document, padding."""
    gen = torch.Generator().manual_seed(seed)
    docs = [_document(cfg, "text0", gen, 40), _document(cfg, "caption", gen, 20, image_side=4),
            _document(cfg, "text1", gen, 50)]
    return build_packed(docs, SEQ_LEN, "sqrt")


# ------------------------------------------------------------------------------------------ checks
def _loss_and_grads(model: Qwen3VLModel, batch: PackedBatch) -> tuple[float, torch.Tensor]:
    from train.backends.deepspeed.module import LossModule
    from train.loss import global_weight_sum

    weight = global_weight_sum([(batch.labels, batch.loss_weights)])
    objective, *_ = LossModule(model)(batch, weight, 1, 1.0)
    objective.backward()
    grads = [p.grad.detach().float().cpu().reshape(-1) for p in model.parameters() if p.grad is not None]
    return float(objective.detach()), torch.cat(grads)


def check_model(device: torch.device, dtype: torch.dtype) -> Check:
    name = f"model forward+backward on {device} {str(dtype).removeprefix('torch.')} vs fp32 CPU"
    cfg = doctor_config("deepspeed").model
    torch.manual_seed(0)
    reference = Qwen3VLModel(cfg)
    candidate = copy.deepcopy(reference).to(device=device, dtype=dtype)
    batch = doctor_batch(cfg)
    ref_loss, ref_grads = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(candidate, move_batch(batch, device))
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    grad_err = float((grads - ref_grads).norm() / ref_grads.norm())
    loss_tol, grad_tol = MODEL_TOLERANCE[dtype]
    ok = loss_err <= loss_tol and grad_err <= grad_tol
    return Check(name, "ok" if ok else "FAIL", f"loss {loss:.5f} vs {ref_loss:.5f} (rel err {loss_err:.1e}, "
                 f"max {loss_tol:.0e}), gradients rel err {grad_err:.1e} (max {grad_tol:.0e})")


def _attention_inputs(device: torch.device):
    cfg = doctor_config("deepspeed").model
    gen = torch.Generator().manual_seed(1)
    t = cfg.text
    shapes = [(SEQ_LEN, t.num_attention_heads, 64), *[(SEQ_LEN, t.num_key_value_heads, 64)] * 2]
    qkv = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return qkv, doctor_batch(cfg).cu_seqlens.to(device)


def compare_attention(name: str, kernel, device: torch.device) -> Check:
    """`kernel(q, k, v, cu_seqlens) -> out [L, Hq, D]` in bf16 against per-segment SDPA in fp32 (causal)."""
    (q, k, v), cu = _attention_inputs(device)
    results = []
    for dtype, fn in ((torch.float32, lambda *a: reference_attention.PackedAttention()(*a, True)),
                      (torch.bfloat16, kernel)):
        q_in = q.detach().to(dtype).clone().requires_grad_()
        out = fn(q_in, k.to(dtype), v.to(dtype), cu)
        out.float().square().sum().backward()
        results.append((out.float(), q_in.grad.float()))
    (ref_out, ref_grad), (out, grad) = results
    out_err = float((out - ref_out).abs().max())
    grad_err = float((grad - ref_grad).norm() / ref_grad.norm())
    ok = out_err <= ATTENTION_TOLERANCE and grad_err <= 10 * ATTENTION_TOLERANCE
    return Check(name, "ok" if ok else "FAIL", f"max abs err {out_err:.1e} (max {ATTENTION_TOLERANCE:.0e}), "
                 f"dq rel err {grad_err:.1e} (max {10 * ATTENTION_TOLERANCE:.0e})")


def _varlen_kernel(device: torch.device, call, kernel):
    """`call` (flash_varlen or torch_varlen) with `kernel`, as a (q, k, v, cu) causal attention."""
    def run(q, k, v, cu):
        return call(q, k, v, reference_attention.segments_of(cu, device), True, kernel)
    return run


def _te_kernel(device: torch.device):  # pragma: no cover - needs Transformer Engine and a GPU
    from transformer_engine.pytorch import DotProductAttention

    (q, k, _), _ = _attention_inputs(device)
    te_attention = DotProductAttention(q.shape[1], q.shape[2], num_gqa_groups=k.shape[1], attention_dropout=0.0,
                                       qkv_format="thd", attn_mask_type="padding_causal")

    def run(q, k, v, cu):
        segments = reference_attention.segments_of(cu, device)
        out = te_attention(q, k, v, cu_seqlens_q=segments.cu, cu_seqlens_kv=segments.cu,
                           max_seqlen_q=segments.max_len, max_seqlen_kv=segments.max_len)
        return out.reshape(q.shape)
    return run


def check_attention(device: torch.device) -> list[Check]:
    att = reference_attention
    flash_name = "flash-attn varlen vs per-segment SDPA"
    torch_name = "torch varlen_attn vs per-segment SDPA"
    te_name = "Transformer Engine THD attention vs per-segment SDPA"
    if device.type != "cuda":
        return [Check(name, "skip", "no GPU") for name in (flash_name, torch_name, te_name)]
    support = att.KernelSupport.detect(device)
    if not support.flash_capable_gpu:
        return [Check(name, "skip", f"needs compute capability {att.FLASH_MIN_CAPABILITY} or newer")
                for name in (flash_name, torch_name, te_name)]
    checks = []
    if support.flash_attn:
        checks.append(compare_attention(flash_name, _varlen_kernel(device, att.flash_varlen,
                                                                   att.flash_attn_varlen_func), device))
    else:
        checks.append(Check(flash_name, "skip", "flash-attn is not importable (pip install -e '.[gpu]')"))
    if support.torch_varlen:
        checks.append(compare_attention(torch_name, _varlen_kernel(device, att.torch_varlen, att.varlen_attn),
                                        device))
    else:
        checks.append(Check(torch_name, "skip", f"torch {torch.__version__} has no varlen_attn"))
    if importlib.util.find_spec("transformer_engine") is not None:
        checks.append(compare_attention(te_name, _te_kernel(device), device))
    else:
        checks.append(Check(te_name, "skip", "transformer_engine is not importable (pip install -e '.[gpu]')"))
    return checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_worker(rank: int, world: int, port: int, backend: str, device_type: str, out: str) -> None:
    """One rank: the doctor batches' first training step; rank 0 writes loss and gradient norm to `out`."""
    from launch.env import detect_env, init_distributed, shutdown_distributed
    from train.backends import build_backend

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed(detect_env(cuda=device_type == "cuda"))
    cfg = doctor_config(backend)
    batches = [doctor_batch(cfg.model, seed=i) for i in range(cfg.stage.global_batch_size)]
    metrics = build_backend(cfg).train_step(batches[rank::world])
    if rank == 0:
        Path(out).write_text(json.dumps({"loss": metrics.loss, "grad_norm": metrics.grad_norm}))
    shutdown_distributed(0)


def _spawn_step(backend: str, world: int, device_type: str) -> dict[str, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "step.json")
        mp.spawn(_step_worker, args=(world, _free_port(), backend, device_type, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def check_ranks(backend: str, device_type: str) -> Check:
    name = f"{backend}: 2-rank step over {'NCCL' if device_type == 'cuda' else 'gloo'} vs 1 rank (fp32)"
    if device_type == "cuda" and torch.cuda.device_count() < 2:
        return Check(name, "skip", f"needs 2 GPUs, found {torch.cuda.device_count()}")
    one, two = _spawn_step(backend, 1, device_type), _spawn_step(backend, 2, device_type)
    errors = {key: abs(two[key] - one[key]) / max(abs(one[key]), 1e-12) for key in ("loss", "grad_norm")}
    ok = max(errors.values()) <= RANKS_TOLERANCE
    return Check(name, "ok" if ok else "FAIL", f"loss {two['loss']:.6f} vs {one['loss']:.6f}, grad norm "
                 f"{two['grad_norm']:.6f} vs {one['grad_norm']:.6f} (max rel err {max(errors.values()):.1e}, "
                 f"max {RANKS_TOLERANCE:.0e})")


def run_checks(device: torch.device, ranks_on_cpu: bool = False) -> list[Check]:
    checks = [check_model(device, torch.bfloat16), *check_attention(device)]
    ranks_device = "cpu" if ranks_on_cpu else "cuda"
    if device.type == "cuda" or ranks_on_cpu:
        checks += [check_ranks(backend, ranks_device) for backend in ("deepspeed", "megatron")]
    else:
        checks.append(Check("2-rank step per backend", "skip", "no GPU (--ranks-on-cpu runs it over gloo)"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-checks", action="store_true", help="only print devices, versions and run paths")
    parser.add_argument("--ranks-on-cpu", action="store_true", help="run the 2-rank step check over gloo on CPU")
    args = parser.parse_args(argv)
    device = compute_device()
    found = versions()
    print("devices:\n" + "\n".join(f"  {line}" for line in devices()))
    print("versions:\n" + "\n".join(f"  {name}: {version}" for name, version in found.items()))
    for warning in version_warnings(found):
        print(f"  warning: {warning}")
    print("a run here uses:\n" + "\n".join(f"  {line}" for line in run_paths(device)))
    if args.no_checks:
        return 0
    print(f"checks on {device}:", flush=True)
    failed = False
    for check in run_checks(device, args.ranks_on_cpu):
        print(check.line(), flush=True)
        failed |= check.status == "FAIL"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
