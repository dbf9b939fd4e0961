"""Peak memory of forward+backward of a tiny Qwen3-VL on packed sequences of 8K, 16K and 32K tokens.

Compares the model's packed attention (per-document attention from cu_seqlens, no L x L mask) with a
baseline measured in the same run: the same model whose LLM core attention is swapped for one SDPA call
over the whole sequence with a dense block-diagonal causal L x L mask (what a framework without varlen
attention does). Sequences are documents of 2048 tokens packed back to back.

How memory is measured, and why: torch's CPU allocator is plain malloc, so tracemalloc and torch's CUDA
memory stats see nothing. Each measurement runs in a fresh subprocess that builds the model and inputs,
resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs one
forward+backward, and reports VmHWM (peak resident set) minus VmRSS just before the step: the memory the
step itself needed (activations, attention scratch, gradients), excluding the interpreter, torch and the
weights. glibc serves large blocks with mmap and returns them on free, so RSS tracks live tensors.

Prints `RESULT <name> <value>` lines (last: attention_memory_ratio_32k_8k) and appends the figures to
bench/RESULTS.md. Usage: python bench/attention_memory.py
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config.model import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from train.models.qwen3vl import Qwen3VLModel  # noqa: E402

DOC_LEN = 2048
PACKED_LENGTHS = [8192, 16384, 32768]
# The mask baseline grows ~3.4x per doubling here (783 MiB at 8K, 2.6 GiB at 16K); 32K would take ~9 GiB of
# this shared machine, so it stops at 16K.
DENSE_LENGTHS = [8192, 16384]
SECTION = "## Attention memory (bench/attention_memory.py)"


class DenseMaskAttention(nn.Module):
    """Baseline core attention: one SDPA call over the whole packed sequence with an L x L boolean mask."""

    def forward(self, q, k, v, cu_seqlens, causal):
        n = q.shape[0]
        doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        mask = doc[:, None] == doc[None, :]
        if causal:
            mask &= torch.ones(n, n, dtype=torch.bool).tril_()
        # 4-D inputs, as in PackedAttention, so torch may pick its fused kernel here too.
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                             attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return out[0].transpose(0, 1)


def bench_config() -> ModelConfig:
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                          num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    text = TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5])
    return ModelConfig(name="bench_tiny", vision=vision, text=text, image_token_id=500, video_token_id=501,
                       vision_start_token_id=502, vision_end_token_id=503)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(mode: str, length: int) -> dict:
    """Run in the child process: peak extra RSS (MiB) and wall time of one forward+backward."""
    import time

    torch.manual_seed(0)
    model = Qwen3VLModel(bench_config())
    if mode == "dense_mask":
        model.set_core_attention(DenseMaskAttention)
    input_ids = torch.randint(0, 400, (length,))
    cu_seqlens = torch.arange(0, length + 1, DOC_LEN, dtype=torch.int32)
    position_ids = (torch.arange(length) % DOC_LEN).expand(3, -1).contiguous()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)
    out.logits.float().logsumexp(-1).mean().backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"mode": mode, "length": length, "peak_mib": (peak - before) / 1024, "seconds": seconds}


def run_child(mode: str, length: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(length)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} at {length} tokens failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def append_results(lines: list[str]) -> None:
    """Add a dated entry at the end of this benchmark's section of bench/RESULTS.md (created if absent)."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    entry = "\n".join(lines) + "\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
    start = text.index(SECTION) + len(SECTION)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    body = text[start:end].rstrip("\n") + "\n\n" + entry
    path.write_text(text[:start] + body + ("\n" + text[end:] if nxt >= 0 else ""))


def main() -> None:
    results = {}
    for mode, lengths in (("packed", PACKED_LENGTHS), ("dense_mask", DENSE_LENGTHS)):
        for length in lengths:
            r = run_child(mode, length)
            results[mode, length] = r
            print(f"{mode:>10} {length // 1024:>3}K tokens: peak +{r['peak_mib']:8.1f} MiB, {r['seconds']:6.2f} s",
                  flush=True)
    packed = {n: results["packed", n]["peak_mib"] for n in PACKED_LENGTHS}
    dense = {n: results["dense_mask", n]["peak_mib"] for n in DENSE_LENGTHS}
    figures = {
        "attention_memory_packed_mib_8k": packed[8192],
        "attention_memory_packed_mib_16k": packed[16384],
        "attention_memory_packed_mib_32k": packed[32768],
        "attention_memory_dense_mask_mib_8k": dense[8192],
        "attention_memory_dense_mask_mib_16k": dense[16384],
        "attention_memory_dense_ratio_16k_8k": dense[16384] / dense[8192],
        "attention_memory_dense_over_packed_16k": dense[16384] / packed[16384],
        "attention_memory_ratio_16k_8k": packed[16384] / packed[8192],
        "attention_memory_ratio_32k_8k": packed[32768] / packed[8192],
    }
    today = datetime.date.today().isoformat()
    lines = [f"{today}, 2 CPU cores, no GPU, torch {torch.__version__}; tiny model (2 LLM layers, hidden 128, "
             f"4/2 heads), documents of {DOC_LEN} tokens; peak extra RSS of one forward+backward:",
             "", "| tokens | packed (cu_seqlens) MiB | dense L x L mask MiB |", "|---|---|---|"]
    for n in PACKED_LENGTHS:
        dense_cell = f"{dense[n]:.0f}" if n in dense else "not run (~9 GiB expected)"
        lines.append(f"| {n // 1024}K | {packed[n]:.0f} | {dense_cell} |")
    lines += [""] + [f"- {name}: {value:.2f}" for name, value in figures.items()]
    append_results(lines)
    for name, value in figures.items():
        print(f"RESULT {name} {value:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
