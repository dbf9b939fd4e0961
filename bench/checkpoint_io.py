"""Checkpoint saves: how long an asynchronous save stalls the step loop compared with a synchronous one, and
how fast a save writes compared with the disk itself.

One process (gloo world of 1), the DeepSpeed backend (ZeRO-1, fp32, torch AdamW) on a ~17M-parameter model
(~270 MB of model + optimizer state), packed synthetic batches (bench/common.py). Per repetition, in A-B-B-A
order, a loop of `steps` training steps with a synchronous save (train/checkpoint_save.save_checkpoint) and
the same with an asynchronous one (Checkpointer: snapshot, background writer, `poll()` after every step,
`wait()` at the end), after step 3. Stall of a loop = time in the save calls (save, poll, wait) + how much
longer the steps that ran during the background write took than the loop's other steps (median);
`checkpoint_async_stall_ratio` = median async stall / median sync stall. The disk's own sequential write
speed is measured in the same run and directory (8 MiB writes of random bytes, then fsync, as many bytes as
the checkpoint); `checkpoint_write_over_disk` = checkpoint bytes per second of a synchronous save
(snapshot, write, checksum + fsync, publish) / that speed.

Usage: python bench/checkpoint_io.py [--reps 3] [--steps 8] [--dir DIR] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import MACHINE, append_section, document_stream, median, pack, print_results  # noqa: I100
from train.checkpoint import StageDir
from train.checkpoint_save import Checkpointer, save_checkpoint
from train.config.model import TextConfig, VisionConfig
from train.config.schema import TrainConfig
from train.models.native_io import load_model_config_yaml

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
SAVE_AFTER = 3  # steps before the save (their times are the loop's unaffected step time)


def bench_config() -> TrainConfig:
    """~17M parameters: a 6 x 384 text model with an 8K vocabulary and a small ViT."""
    cfg = TrainConfig()
    tiny = load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")
    tiny.vision = VisionConfig(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=16,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    tiny.text = TextConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=64, mrope_section=[16, 8, 8],
                           tie_word_embeddings=False)
    cfg.model = tiny
    cfg.backend.name, cfg.backend.zero_stage, cfg.backend.precision = "deepspeed", 1, "fp32"
    cfg.stage.seq_len, cfg.stage.global_batch_size, cfg.stage.max_steps = SEQ_LEN, 1, 1000
    return cfg


def disk_write_speed(directory: Path, nbytes: int) -> float:
    """Bytes per second of a sequential write of `nbytes` (8 MiB chunks of random bytes) plus fsync."""
    chunk = os.urandom(8 << 20)
    path = directory / "disk_speed.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            written += f.write(chunk[: min(len(chunk), nbytes - written)])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


def run_loop(backend, batches, save: str, stage: StageDir, cfg: TrainConfig) -> float:
    """Training steps with a `save` (sync | async) after step SAVE_AFTER; returns the stall: the time the step
    loop spent in save calls (save, poll, wait) plus how much longer than the loop's own unaffected steps
    (median) the steps were while an asynchronous write was in flight."""
    checkpointer = Checkpointer(stage, cfg.model, keep_last=1, asynchronous=True)
    in_calls, affected, clean = 0.0, [], []
    for i, batch in enumerate(batches):
        pending = checkpointer.pending
        start = time.perf_counter()
        backend.train_step([batch])
        (affected if pending else clean).append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.poll()
        if i == SAVE_AFTER and save == "sync":
            save_checkpoint(stage, backend.step, backend, {}, cfg.model, {}, keep_last=1)
        elif i == SAVE_AFTER:
            checkpointer.save(backend.step, backend, {}, {})
        in_calls += time.perf_counter() - start
    start = time.perf_counter()
    checkpointer.wait()
    in_calls += time.perf_counter() - start
    step = median(clean)
    print(f"  {save}: {in_calls:.2f} s in save calls, {len(affected)} steps during the write "
          f"({sum(affected):.2f} s), unaffected step {step:.2f} s", flush=True)
    return in_calls + sum(t - step for t in affected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    port = str(29600 + os.getpid() % 1000)
    for key, value in {"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        os.environ.setdefault(key, value)  # what a launcher would set; DeepSpeed reads LOCAL_RANK
    dist.init_process_group("gloo")
    from train.backends.deepspeed.backend import DeepSpeedBackend

    cfg = bench_config()
    backend = DeepSpeedBackend(cfg)
    params = sum(p.numel() for p in backend.model.parameters())
    batches = [b for b, _ in pack(document_stream(cfg.model, SEQ_LEN), SEQ_LEN, args.steps + 2)]
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt_bench_"))
    stage = StageDir(work, "s1")
    try:
        for batch in batches[:2]:  # first-call costs out of the timing
            backend.train_step([batch])
        timed_batches = batches[2:]
        start = time.perf_counter()
        ckpt = save_checkpoint(stage, backend.step, backend, {}, cfg.model, {}, keep_last=1)
        first_save = time.perf_counter() - start
        size = checkpoint_bytes(ckpt)
        disk_speeds, save_speeds, stalls = [], [], {"sync": [], "async": []}
        for rep in range(args.reps):
            for mode in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
                stalls[mode].append(run_loop(backend, timed_batches, mode, stage, cfg))
            disk_speeds.append(disk_write_speed(work, size))
            start = time.perf_counter()
            save_checkpoint(stage, backend.step, backend, {}, cfg.model, {}, keep_last=1)
            save_speeds.append(size / (time.perf_counter() - start))
            print(f"rep {rep}: stall sync {stalls['sync'][-1]:.2f} s async {stalls['async'][-1]:.2f} s; disk "
                  f"{disk_speeds[-1] / 2 ** 20:.0f} MiB/s, sync save {save_speeds[-1] / 2 ** 20:.0f} MiB/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sync_stall, async_stall = median(stalls["sync"]), median(stalls["async"])
    figures = {
        "checkpoint_mib": size / 2 ** 20, "checkpoint_params_millions": params / 1e6,
        "checkpoint_first_save_s": first_save,
        "checkpoint_sync_stall_s": sync_stall, "checkpoint_async_stall_s": async_stall,
        "checkpoint_async_stall_ratio": max(0.0, async_stall) / sync_stall,
        "checkpoint_disk_write_mib_s": median(disk_speeds) / 2 ** 20,
        "checkpoint_save_mib_s": median(save_speeds) / 2 ** 20,
        "checkpoint_write_over_disk": median(save_speeds) / median(disk_speeds),
    }
    if not args.no_write:
        lines = [f"DeepSpeed ZeRO-1 fp32, 1 process, {params / 1e6:.1f}M parameters, {size / 2 ** 20:.0f} MiB "
                 f"checkpoint; {args.steps} steps of {SEQ_LEN} tokens per loop, save after step {SAVE_AFTER}, "
                 f"{args.reps} repetitions A-B-B-A, "
                 f"1 thread, checkpoints in {args.dir or tempfile.gettempdir()}. Stall = time in save calls + "
                 f"extra time of the steps that ran during the background write (medians over repetitions). "
                 f"Disk speed: sequential write + fsync of the same size in the same directory, same run. "
                 f"Machine: {MACHINE} (shared with other jobs).", ""]
        lines += [f"- {name}: {value:.4g}" for name, value in figures.items()]
        append_section("Checkpoint saves (bench/checkpoint_io.py)", lines)
    print_results(figures)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
