"""Packing efficiency (non-pad tokens / capacity) of the streaming loader's best-fit packer.

Runs the real pipeline (synth demo corpus -> StreamingLoader with the demo mix of configs/data/demo.yaml ->
DocumentEncoder -> best-fit packing) at 8K and 32K tokens and measures, on the very same documents in
stream order, the pad-to-longest baseline: consecutive documents batched while count x longest <= seq_len,
each padded to the batch's longest (capacity = count x longest, the most favourable reading of it).
A second, heavy-tailed length mix (log-normal lengths, 5% longer than the sequence) is packed directly,
because the demo corpus' documents are all short.

Vision balance across data-parallel ranks: the same demo mix read by 8 simulated DP ranks (a loader each,
dp_rank r of 8), `--ga` micro-batches per rank and step; per step the max / mean over ranks of the ViT cost
(train.parallel.vision_balance.vit_cost, Qwen3-VL's tower width) as each rank's own loader fills it (today)
and after the balanced exchange of micro-batches (plan_balanced), averaged over the steps.

Prints `RESULT packing_efficiency_8k <v>`, `RESULT packing_efficiency_32k <v>` (and the baselines),
`RESULT vit_balance_max_over_mean <v>` (the worse of 8K and 32K; per length and today's figures beside it)
and appends the figures to bench/RESULTS.md.
Usage: python bench/packing.py [--batches-8k N] [--batches-32k N] [--steps N] [--ga N]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from data.batch import Document  # noqa: E402
from data.config import DataConfig, DatasetConfig  # noqa: E402
from data.encode import DocumentEncoder, EncodeConfig  # noqa: E402
from data.loader import StreamingLoader  # noqa: E402
from data.packing import BestFitPacker, BufferEntry, VisionTokens, fit_document  # noqa: E402
from data.synth import make_corpus  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from train.config.model import VisionConfig  # noqa: E402
from train.parallel.vision_balance import max_over_mean, plan_balanced, vit_cost  # noqa: E402

MACHINE = "2 CPU cores, no GPU"


def demo_mix(corpus: str, **overrides) -> DataConfig:
    """configs/data/demo.yaml with data_root pointing at `corpus`."""
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "data" / "demo.yaml"))
    datasets = [DatasetConfig(d["name"], [s.replace("${data_root}", corpus) for s in d["shards"]], d["weight"])
                for d in raw.pop("datasets")]
    raw.update(overrides)
    return DataConfig(datasets=datasets, **raw)


def pad_to_longest_efficiency(lengths: list[int], seq_len: int) -> float:
    used = capacity = 0
    batch: list[int] = []
    for n in lengths + [seq_len + 1]:  # the sentinel flushes the last batch
        if batch and (len(batch) + 1) * max(max(batch), n) > seq_len:
            used, capacity = used + sum(batch), capacity + len(batch) * max(batch)
            batch = []
        batch.append(min(n, seq_len))
    return used / capacity


def measure_demo(corpus: str, tok: Tokenizer, seq_len: int, batches: int) -> dict[str, float]:
    encoder = DocumentEncoder(tok, EncodeConfig(), seq_len)
    tokens = VisionTokens.from_tokenizer(tok, encoder.merge)
    pulled: list[int] = []

    def encode(sample, key, source):  # records document lengths in stream order for the baseline
        doc = encoder.encode(sample, key, source)
        fitted = fit_document(doc, seq_len, tokens)
        if fitted is not None:
            pulled.append(len(fitted))
        return doc

    loader = StreamingLoader(demo_mix(corpus, num_workers=0), encode, seq_len, tokens=tokens)
    start = time.perf_counter()
    packed = list(itertools.islice(loader, batches))
    used = sum(b.seq_len - b.num_pad for b in packed)
    return {"packed": used / (batches * seq_len), "baseline": pad_to_longest_efficiency(pulled, seq_len),
            "docs": sum(len(b.doc_keys) for b in packed), "seconds": time.perf_counter() - start}


def measure_vit_balance(corpus: str, tok: Tokenizer, seq_len: int, steps: int, ga: int,
                        dp: int = 8) -> dict[str, float]:
    """Mean over steps of max/mean per-rank ViT cost: each rank's own micro-batches vs the balanced plan."""
    encoder = DocumentEncoder(tok, EncodeConfig(), seq_len)
    tokens = VisionTokens.from_tokenizer(tok, encoder.merge)
    hidden = VisionConfig().hidden_size
    streams = [iter(StreamingLoader(demo_mix(corpus, num_workers=0), encoder.encode, seq_len, dp_rank=r,
                                    dp_size=dp, tokens=tokens)) for r in range(dp)]
    today, balanced = [], []
    for _ in range(steps):
        costs = [[vit_cost(next(s), hidden) for _ in range(ga)] for s in streams]
        today.append(max_over_mean([sum(c) for c in costs]))
        plan = plan_balanced(costs)
        balanced.append(max_over_mean([sum(costs[r][i] for r, i in items) for items in plan]))
    return {"today": sum(today) / steps, "balanced": sum(balanced) / steps, "worst_balanced": max(balanced)}


def measure_heavy_tail(seq_len: int, docs: int, seed: int = 0) -> dict[str, float]:
    """Log-normal lengths (median seq_len/16, sigma 1.3, ~5% longer than seq_len, which are cut)."""
    rng = random.Random(seed)
    lengths = [max(2, int(rng.lognormvariate(0, 1.3) * seq_len / 16)) for _ in range(docs)]
    stream = iter(lengths)

    def pull() -> BufferEntry | None:
        n = next(stream, None)
        if n is None:
            return None
        doc = Document(key="", source=0, input_ids=torch.full((n,), 9), position_ids=torch.zeros(3, n,
                       dtype=torch.long), target_mask=torch.ones(n, dtype=torch.bool))
        return BufferEntry(fit_document(doc, seq_len, VisionTokens()), None)

    packer, used, sequences = BestFitPacker(seq_len, 64, "sqrt"), 0, 0
    while (batch := packer.next_sequence(pull)) is not None and len(packer.buffer) == packer.buffer_size:
        used, sequences = used + seq_len - batch.num_pad, sequences + 1  # steady state: buffer still full
    return {"packed": used / (sequences * seq_len), "baseline": pad_to_longest_efficiency(lengths, seq_len)}


def append_results(lines: list[str]) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    header = "" if path.exists() else "# Benchmark results\n"
    with open(path, "a") as f:
        f.write(header + "\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches-8k", type=int, default=40)
    parser.add_argument("--batches-32k", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="steps of the DP=8 vision-balance simulation")
    parser.add_argument("--ga", type=int, default=4, help="micro-batches per rank and step (8K; 32K uses half)")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as corpus:
        make_corpus(corpus)
        tok = Tokenizer.load(Path(corpus) / "tokenizer.model")
        for label, seq_len, batches in (("8k", 8192, args.batches_8k), ("32k", 32768, args.batches_32k)):
            r = measure_demo(corpus, tok, seq_len, batches)
            print(f"demo mix {label}: {r['docs']} documents in {batches} sequences, {r['seconds']:.1f} s", flush=True)
            figures[f"packing_efficiency_{label}"] = r["packed"]
            figures[f"packing_efficiency_{label}_pad_to_longest"] = r["baseline"]
        for label, seq_len, ga in (("8k", 8192, args.ga), ("32k", 32768, max(1, args.ga // 2))):
            start = time.perf_counter()
            v = measure_vit_balance(corpus, tok, seq_len, args.steps, ga)
            print(f"vision balance {label}: DP=8 x GA={ga} x {args.steps} steps, {time.perf_counter() - start:.1f} s",
                  flush=True)
            figures[f"vit_balance_max_over_mean_{label}"] = v["balanced"]
            figures[f"vit_balance_max_over_mean_{label}_worst_step"] = v["worst_balanced"]
            figures[f"vit_balance_max_over_mean_{label}_today"] = v["today"]
        figures["vit_balance_max_over_mean"] = max(figures["vit_balance_max_over_mean_8k"],
                                                   figures["vit_balance_max_over_mean_32k"])
    for label, seq_len in (("8k", 8192), ("32k", 32768)):
        r = measure_heavy_tail(seq_len, 6000)
        figures[f"packing_efficiency_heavy_tail_{label}"] = r["packed"]
        figures[f"packing_efficiency_heavy_tail_{label}_pad_to_longest"] = r["baseline"]
    lines = [f"## bench/packing.py — {datetime.date.today().isoformat()}, {MACHINE}", "",
             "Non-pad tokens / capacity. Best fit (buffer 64) vs pad-to-longest on the same documents: the demo "
             "mix (configs/data/demo.yaml on the synth corpus, real encoder) and a log-normal length mix.", ""]
    lines += [f"- {name}: {value:.4f}" for name, value in figures.items()]
    append_results(lines)
    for name, value in figures.items():
        print(f"RESULT {name} {value:.4f}")


if __name__ == "__main__":
    main()
