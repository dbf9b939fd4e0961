"""Peak memory per rank of one forward+backward at context parallelism CP=1 and CP=2, per backend.

The same 32K-token packed batch (synthetic pretraining mix of bench/common.py: text, images, short videos;
documents up to 8K tokens), the tiny model (configs/model/tiny.yaml), the shared chunked loss:
  deepspeed: the DeepSpeed backend's LossModule (CP: this rank's contiguous share embedded with the vision
             tower sharded by item over the CP group, train/parallel/vision_shard.py -> decode -> chunked
             loss) with UlyssesAttention over the CP group, exactly as the backend wires it; the DeepSpeed
             engine itself is not built (ZeRO's buffers for a 0.4M-parameter model are not what is measured
             here: activations are).
  megatron:  the megatron backend (train/backends/megatron: megatron-core model, DDP grad buffers, its CP
             split and cp_attention), one forward+backward through its schedule (`MegatronBackend._run`,
             everything of train_step but the optimizer step).
  megatron_cp_attention (optional, --backends): what was measured before that backend landed: the
             reference model's decoder with megatron's CP core attention (cp_attention.ContextParallelAttention:
             all-gather K/V, load-balanced 2*cp chunks) swapped in through an adapter, load-balanced split.
CP=2 runs under torchrun with 2 ranks (gloo); every rank measures its own peak (bench/common.PeakMemory:
peak RSS during the step minus RSS before it, in a fresh process, after a small warm-up step).

Prints `RESULT cp2_memory_ratio_<backend> <r>` (max over ranks of the CP=2 peak / the CP=1 peak) and the
per-rank MiB, and appends them to bench/RESULTS.md. A second measurement on a text-only batch of the same
length distribution (`_text_only` figures) separates the decoder from the vision tower, which CP shards by
item (each rank runs its share of the images / video frame groups).
Usage: python bench/cp_memory.py [--skip-text-only] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

import common  # noqa: F401 - puts the repo root on sys.path
from common import ALLOCATOR_ENV, MACHINE, ROOT, Mix, PeakMemory, append_section, document_stream, pack, print_results, real_tokens

SEQ_LEN = 32768
MAX_DOC = 8192
BACKENDS = ("deepspeed", "megatron", "megatron_cp_attention")
DEFAULT_BACKENDS = "deepspeed,megatron"


def tiny_config():
    from train.models.native_io import load_model_config_yaml

    return load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml")


def the_batch(cfg, seq_len: int = SEQ_LEN, max_doc: int = MAX_DOC, skip: int = 4, text_only: bool = False):
    """The deterministic packed batch every run measures (past the packer's buffer-filling sequences).
    text_only: the same length distribution without vision (shows what the replicated vision part costs)."""
    mix = Mix(text=1.0, caption=0.0, interleaved=0.0, video=0.0) if text_only else Mix()
    return pack(document_stream(cfg, max_doc, seed=3, mix=mix), seq_len, skip + 1)[-1][0]


class MegatronCore(torch.nn.Module):
    """Adapter: the reference model's core_attention(q, k, v, cu_seqlens, causal) on [n, H, D] shares ->
    megatron's ContextParallelAttention on [n, 1, H, D] with the document bounds as PackedSeqParams."""

    def __init__(self, cfg, group) -> None:
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.transformer_config import TransformerConfig

        from train.backends.megatron.cp_attention import ContextParallelAttention

        text = cfg.text
        config = TransformerConfig(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                                   num_attention_heads=text.num_attention_heads,
                                   num_query_groups=text.num_key_value_heads, kv_channels=text.head_dim,
                                   attention_dropout=0.0)
        self.core = ContextParallelAttention(config, 1, AttnMaskType.causal, "self",
                                             pg_collection=SimpleNamespace(cp=group))

    def forward(self, q, k, v, cu_seqlens, causal):
        from megatron.core.packed_seq_params import PackedSeqParams

        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
        out = self.core(q[:, None], k[:, None], v[:, None], None, packed_seq_params=packed)
        return out.reshape(q.shape)


def megatron_backend_step(cfg, seq_len: int):
    """One forward+backward through the megatron backend (megatron-core schedule, DDP grad buffers, CP via
    its own layout and cp_attention), without the optimizer step: `MegatronBackend._run`."""
    import torch.distributed as dist

    from train.backends.megatron.backend import MegatronBackend
    from train.config.schema import TrainConfig

    train_cfg = TrainConfig()
    train_cfg.model = cfg
    train_cfg.backend.name, train_cfg.backend.precision = "megatron", "fp32"
    train_cfg.parallel.cp = dist.get_world_size()
    train_cfg.stage.seq_len, train_cfg.stage.global_batch_size, train_cfg.stage.max_steps = seq_len, 1, 1
    backend = MegatronBackend(train_cfg)

    def step(batch):
        backend._run([batch], forward_only=False)
    return step, backend


def make_step(backend: str, model, group, cp: int, rank: int):
    """A function batch -> None running one forward+backward of `backend`'s CP path on this rank."""
    from train.loss import global_weight_sum, micro_batch_loss
    from train.parallel.context import shard_index
    from train.parallel.vision_shard import embed_context_share

    if backend == "deepspeed":
        from train.backends.deepspeed.module import LossModule
        from train.parallel.ulysses import UlyssesAttention

        if group is not None:
            model.set_core_attention(lambda: UlyssesAttention(group))
        module = LossModule(model, group)

        def step(batch):
            index = module.token_share(batch.seq_len)
            share = (batch.labels, batch.loss_weights) if index is None else (batch.labels[index],
                                                                               batch.loss_weights[index])
            objective, *_ = module(batch, global_weight_sum([share]), cp, float(cp))
            objective.backward()
        return step

    model.set_core_attention(lambda: MegatronCore(model.cfg, group))  # megatron_cp_attention

    def step(batch):
        shares = [shard_index(batch.seq_len, cp, r, load_balanced=True) for r in range(cp)]
        shard = embed_context_share(model, batch, shares, group)
        hidden, _ = model.decode(shard.inputs_embeds, shard.position_ids, shard.cu_seqlens, shard.visual_mask,
                                 shard.deepstack)
        total = global_weight_sum([(shard.labels, shard.loss_weights)])
        micro_batch_loss(hidden, model.lm_head.weight, shard.labels, shard.loss_weights,
                         global_weight=total).objective.backward()
    return step


def worker(backend: str, seq_len: int, max_doc: int, out_dir: str, text_only: bool) -> None:
    """One rank (under torchrun): warm up on a small batch, then measure one step on the big one."""
    import torch.distributed as dist

    from train.models.qwen3vl import Qwen3VLModel

    torch.set_num_threads(1)  # two ranks share the machine's 2 cores
    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if cp > 1 else None
    cfg = tiny_config()
    torch.manual_seed(0)
    if backend == "megatron":
        step, model = megatron_backend_step(cfg, seq_len)
        # Warm-up at the stage's length (megatron checks it): text only, short documents, as cheap as it gets.
        warm = pack(document_stream(cfg, 1024, seed=9, mix=Mix(1.0, 0.0, 0.0, 0.0)), seq_len, 1)[0][0]
    else:
        model = Qwen3VLModel(cfg).train()
        step = make_step(backend, model, group, cp, rank)
        warm = the_batch(cfg, 2048, 1024, skip=0)
    step(warm)  # first-call costs (thread pools, kernels) outside the measurement
    if backend == "megatron":
        model.ddp.zero_grad_buffer()
    else:
        model.zero_grad(set_to_none=True)
    batch = the_batch(cfg, seq_len, max_doc, text_only=text_only)
    dist.barrier()
    with PeakMemory() as mem:
        step(batch)
    result = {"backend": backend, "cp": cp, "rank": rank, "extra_mib": mem.extra_mib, "peak_mib": mem.peak_mib,
              "tokens": real_tokens(batch), "docs": len(batch.doc_keys)}
    # One file per rank: the ranks share torchrun's stdout, where lines can interleave.
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # end every rank the way that does not abort at exit (notes/cpu-backends.md)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def run(backend: str, cp: int, seq_len: int, max_doc: int, text_only: bool = False,
        script: str = __file__) -> list[dict]:
    """Launch `cp` ranks with torchrun; returns every rank's measurement."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **ALLOCATOR_ENV)
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}", script,
               "--worker", backend, "--seq-len", str(seq_len), "--max-doc", str(max_doc), "--out-dir", out_dir]
        cmd += ["--worker-text-only"] if text_only else []
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
        rows = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    if proc.returncode != 0 or len(rows) != cp:
        raise RuntimeError(f"{backend} CP={cp} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=BACKENDS)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--max-doc", type=int, default=MAX_DOC)
    parser.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"any of {', '.join(BACKENDS)}")
    parser.add_argument("--out-dir")
    parser.add_argument("--worker-text-only", action="store_true")
    parser.add_argument("--skip-text-only", action="store_true",
                        help="skip the second measurement on a batch without vision")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seq_len, args.max_doc, args.out_dir, args.worker_text_only)
        return
    figures: dict[str, float] = {}
    lines = []
    variants = [(b, False) for b in args.backends.split(",")]
    variants += [(b, True) for b in args.backends.split(",")] if not args.skip_text_only else []
    for backend, text_only in variants:
        one = run(backend, 1, args.seq_len, args.max_doc, text_only)[0]
        two = run(backend, 2, args.seq_len, args.max_doc, text_only)
        label = backend + ("_text_only" if text_only else "")
        worst = max(r["extra_mib"] for r in two)
        print(f"{label}: CP=1 {one['extra_mib']:.0f} MiB; CP=2 ranks " +
              ", ".join(f"{r['extra_mib']:.0f}" for r in two) + f" MiB ({one['tokens']} real tokens, "
              f"{one['docs']} documents)", flush=True)
        figures[f"cp1_step_memory_mib_{label}"] = one["extra_mib"]
        for r in two:
            figures[f"cp2_step_memory_mib_{label}_rank{r['rank']}"] = r["extra_mib"]
        figures[f"cp2_memory_ratio_{label}"] = worst / one["extra_mib"]
        lines.append(f"| {label} | {one['extra_mib']:.0f} | " + " / ".join(f"{r['extra_mib']:.0f}" for r in two)
                     + f" | {worst / one['extra_mib']:.3f} |")
    if not args.no_write:
        text = [f"One forward+backward of the tiny model on the same {args.seq_len}-token packed batch (synthetic "
                f"mix, documents <= {args.max_doc} tokens), peak RSS during the step minus RSS before it, per "
                f"rank (torchrun, gloo, 1 thread per rank). deepspeed = the DeepSpeed backend's LossModule + "
                f"Ulysses (no engine); megatron = the megatron backend's forward+backward (MegatronBackend._run); "
                f"megatron_cp_attention = reference decoder with its cp_attention swapped in. {MACHINE}.", "",
                "| backend | CP=1 MiB | CP=2 MiB rank0 / rank1 | ratio (worst rank / CP=1) |", "|---|---|---|---|"]
        text += lines + [""] + [f"- {name}: {value:.4g}" for name, value in figures.items()]
        append_section("Context-parallel memory (bench/cp_memory.py)", text)
    print_results(figures)


if __name__ == "__main__":
    main()
