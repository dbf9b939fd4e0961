"""A 262,144-token packed batch (one long video + many documents) through forward+backward at CP=2.

The tiny model (configs/model/tiny.yaml) on 2 ranks (torchrun, gloo, 1 thread each), wired as the
DeepSpeed backend wires context parallelism: its LossModule (vision tower on the full sequence, contiguous
CP split after the merge, decode, chunked loss) with UlyssesAttention; activation checkpointing on (decoder
layers and ViT blocks), as a 262K stage would run. The batch: one video of `--video-tokens` LLM tokens
(frame groups of 32 x 32 patches = 256 tokens each, random pixel patches, timestamp stand-ins) followed by
documents of the synthetic pretraining mix (bench/common.py, <= 8K tokens each), best-fit packed to 262,144.

"No L x L allocation", shown two ways on every rank:
- the largest tensor any aten op produced during the step, forward, backward and recomputation included,
  recorded by a TorchDispatchMode (`LargestTensor`), against one L x L fp32 matrix (262144^2 * 4 B =
  256 GiB) and against the dense scores of the video document alone (video_tokens^2 * 4 B);
- the step's peak RSS (bench/common.PeakMemory), which is far below either.
(What a dispatch mode cannot see is scratch memory inside a kernel; the peak RSS bounds that too.)

Prints RESULT lines (peak MiB per rank, seconds, largest tensor MiB, ratios to the L x L matrix) and
appends them to bench/RESULTS.md. Usage: python bench/long_context_262k.py [--video-tokens N] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common  # noqa: F401 - puts the repo root on sys.path
from common import (ALLOCATOR_ENV, MACHINE, ROOT, PeakMemory, append_section, document_stream, make_document,
                    pack, print_results, real_tokens)

SEQ_LEN = 262144
VIDEO_SIDE = 32  # patches per frame side: 32 x 32 patches -> 256 LLM tokens per frame group
MIB = 1 << 20


class LargestTensor(TorchDispatchMode):
    """Remembers the largest tensor (bytes) output by any aten op run while active, and which op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.op, self.shape = 0, "", ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes() if t.layout == torch.strided else t.numel() * t.element_size()
                if size > self.bytes:
                    self.bytes, self.op, self.shape = size, str(func), tuple(t.shape)
        return out


def long_batch(cfg, seq_len: int, video_tokens: int, seed: int = 5):
    """One video of ~video_tokens tokens first, then mix documents, best-fit packed into one sequence."""
    per_group = VIDEO_SIDE * VIDEO_SIDE // cfg.vision.spatial_merge_size ** 2
    groups = max(1, video_tokens // (per_group + 6))  # + vision start/end and 4 timestamp tokens per group
    video = make_document(cfg, "video", "long_video", random.Random(seed),
                          video_grid=(groups, VIDEO_SIDE, VIDEO_SIDE))

    def stream():
        yield video
        yield from document_stream(cfg, min(8192, seq_len), seed=seed)

    # A buffer large enough to fill the sequence after the video: ~seq_len / 700 short documents.
    batch, docs = pack(stream(), seq_len, 1, buffer=512)[0]
    return batch, len(video)


def worker(seq_len: int, video_tokens: int, out_dir: str, trace: bool) -> None:
    import torch.distributed as dist

    from train.backends.deepspeed.module import LossModule
    from train.loss import global_weight_sum
    from train.models.native_io import load_model_config_yaml
    from train.models.qwen3vl import Qwen3VLModel
    from train.parallel.ulysses import UlyssesAttention

    torch.set_num_threads(1)  # two ranks share the machine's 2 cores
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if cp > 1 else None
    cfg = load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg).train()
    if group is not None:
        model.set_core_attention(lambda: UlyssesAttention(group))
    model.enable_activation_checkpointing()
    module = LossModule(model, group)

    def step(batch) -> None:
        index = module.token_share(batch.seq_len)
        share = (batch.labels, batch.loss_weights) if index is None else (batch.labels[index],
                                                                           batch.loss_weights[index])
        objective, *_ = module(batch, global_weight_sum([share]), cp, float(cp))
        objective.backward()

    warm, _ = long_batch(cfg, 4096, 1024)
    step(warm)  # first-call costs outside the measurement
    model.zero_grad(set_to_none=True)
    batch, video_len = long_batch(cfg, seq_len, video_tokens)
    largest = LargestTensor()
    dist.barrier()
    with PeakMemory() as mem:
        start = time.perf_counter()
        if trace:
            with largest:
                step(batch)
        else:
            step(batch)
        seconds = time.perf_counter() - start
    result = {"rank": rank, "extra_mib": mem.extra_mib, "peak_mib": mem.peak_mib, "seconds": seconds,
              "largest_mib": largest.bytes / MIB, "largest_op": largest.op, "largest_shape": list(largest.shape),
              "tokens": real_tokens(batch), "docs": len(batch.doc_keys), "video_len": video_len,
              "video_patches": int(batch.video_grid_thw.prod(-1).sum())}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # end every rank the way that does not abort at exit (notes/cpu-backends.md)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--video-tokens", type=int, default=65536)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--no-trace", action="store_true", help="skip the largest-tensor dispatch mode")
    parser.add_argument("--out-dir")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.seq_len, args.video_tokens, args.out_dir, not args.no_trace)
        return
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **ALLOCATOR_ENV)
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.cp}",
               __file__, "--worker", "--seq-len", str(args.seq_len), "--video-tokens", str(args.video_tokens),
               "--out-dir", out_dir] + (["--no-trace"] if args.no_trace else [])
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
        rows = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    if proc.returncode != 0 or len(rows) != args.cp:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lxl_mib = args.seq_len ** 2 * 4 / MIB
    video_lxl_mib = rows[0]["video_len"] ** 2 * 4 / MIB
    figures: dict[str, float] = {"long_context_tokens": rows[0]["tokens"],
                                 "long_context_video_tokens": rows[0]["video_len"]}
    for r in rows:
        figures[f"long_context_peak_mib_rank{r['rank']}"] = r["peak_mib"]
        figures[f"long_context_step_mib_rank{r['rank']}"] = r["extra_mib"]
        figures[f"long_context_step_seconds_rank{r['rank']}"] = r["seconds"]
        if not args.no_trace:
            figures[f"long_context_largest_tensor_mib_rank{r['rank']}"] = r["largest_mib"]
    worst_peak = max(r["peak_mib"] for r in rows)
    figures["long_context_peak_over_lxl_fp32"] = worst_peak / lxl_mib
    if not args.no_trace:
        biggest = max(rows, key=lambda r: r["largest_mib"])
        figures["long_context_largest_tensor_over_lxl_fp32"] = biggest["largest_mib"] / lxl_mib
        figures["long_context_largest_tensor_over_video_lxl_fp32"] = biggest["largest_mib"] / video_lxl_mib
        print(f"largest tensor: {biggest['largest_mib']:.0f} MiB from {biggest['largest_op']} "
              f"{biggest['largest_shape']}", flush=True)
    print(f"{rows[0]['docs']} documents, video {rows[0]['video_len']} tokens ({rows[0]['video_patches']} patches); "
          f"wall {wall:.0f} s incl. start-up", flush=True)
    if not args.no_write:
        lines = [f"Tiny model, CP={args.cp} (Ulysses via the DeepSpeed backend's LossModule, torchrun gloo, 1 thread "
                 f"per rank), activation checkpointing, one forward+backward of a {args.seq_len}-token packed "
                 f"batch: {rows[0]['docs']} documents incl. one video of {rows[0]['video_len']} tokens "
                 f"({rows[0]['video_patches']} patches of random pixels). One L x L fp32 matrix would be "
                 f"{lxl_mib / 1024:.0f} GiB; the video's own dense scores {video_lxl_mib / 1024:.1f} GiB. "
                 f"{MACHINE}.", ""]
        if not args.no_trace:
            lines.append(f"Largest tensor of any op (TorchDispatchMode, fwd+bwd+recompute): "
                         f"{biggest['largest_mib']:.0f} MiB, {biggest['largest_op']} {biggest['largest_shape']}.")
            lines.append("")
        lines += [f"- {name}: {value:.4g}" for name, value in figures.items()]
        append_section("Long context 262K (bench/long_context_262k.py)", lines)
    print_results(figures)


if __name__ == "__main__":
    main()
