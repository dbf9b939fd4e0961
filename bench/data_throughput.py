"""Data throughput: tokens per second per DataLoader worker, for the demo mix at 8K tokens.

Ours: StreamingLoader (shard cursors, step-indexed mixture, DocumentEncoder, best-fit packing, resumable
state attached to every batch), 1 worker, counting the non-pad tokens of packed sequences.
Baseline, same run: plain webdataset pipelines over the same shards (one resampled WebDataset per data set,
taken in the order of the same source schedule, because the token rate depends mostly on how many videos a
window holds) decoding the same number of samples with the same DocumentEncoder, 1 worker, counting
document tokens, no packing and no state. The difference is the price of packing and exact resume.

Prints `RESULT data_tokens_per_s_per_worker <v>` (and the baseline and ratio) and appends to
bench/RESULTS.md. Usage: python bench/data_throughput.py [--batches N]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from bench.packing import MACHINE, append_results, demo_mix  # noqa: E402
from data.encode import DocumentEncoder, EncodeConfig  # noqa: E402
from data.errors import BadSample  # noqa: E402
from data.loader import StreamingLoader  # noqa: E402
from data.mixture import SourceSchedule, mixture_probabilities  # noqa: E402
from data.shards import list_shards  # noqa: E402
from data.synth import make_corpus  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

SEQ_LEN = 8192


def ours(corpus: str, encoder: DocumentEncoder, batches: int) -> tuple[float, int, int]:
    """(tokens/s, documents drawn before timing, documents drawn while timing). Timing starts after the
    first batch, when the worker is up and the packing buffer is full."""
    loader = StreamingLoader(demo_mix(corpus, num_workers=1, prefetch_factor=2), encoder.encode, SEQ_LEN)
    it = iter(loader)
    next(it)
    drawn_before = loader.state_dict()["workers"][0]["k"]
    start, tokens = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        tokens += batch.seq_len - batch.num_pad
    seconds = time.perf_counter() - start
    return tokens / seconds, drawn_before, loader.state_dict()["workers"][0]["k"] - drawn_before


class _ScheduledMix(IterableDataset):
    """Plain webdataset pipelines, one per data set, taken in the order our SourceSchedule draws (stream 0 =
    dp rank 0, worker 0), so that both sides decode the same kinds of documents in the same order."""

    def __init__(self, corpus: str, encoder: DocumentEncoder) -> None:
        self.cfg, self.encoder = demo_mix(corpus), encoder

    def __iter__(self):
        pipelines = [iter(wds.WebDataset(list_shards(d), resampled=True, shardshuffle=False, empty_check=False,
                                         handler=wds.warn_and_continue)) for d in self.cfg.datasets]
        probs = mixture_probabilities([d.weight for d in self.cfg.datasets], self.cfg.temperature)
        schedule = SourceSchedule(probs, self.cfg.seed, 0)
        for k in itertools.count():
            source = schedule.source(k)
            sample = next(pipelines[source])
            try:
                yield self.encoder.encode(sample, sample["__key__"], source)
            except BadSample:
                continue


def plain_webdataset(corpus: str, encoder: DocumentEncoder, skip: int, docs: int) -> float:
    loader = DataLoader(_ScheduledMix(corpus, encoder), batch_size=None, num_workers=1, prefetch_factor=2,
                        collate_fn=_passthrough)
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start, tokens = time.perf_counter(), 0
    for doc in itertools.islice(it, docs):
        tokens += len(doc)
    return tokens / (time.perf_counter() - start)


def _passthrough(item):
    return item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24, help="packed sequences timed on our side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as corpus:
        make_corpus(corpus)
        encoder = DocumentEncoder(Tokenizer.load(Path(corpus) / "tokenizer.model"), EncodeConfig(), SEQ_LEN)
        # A-B-B-A order: the machine is shared, so a load change hits both sides about equally.
        first, skip, docs = ours(corpus, encoder, args.batches)
        baseline = sum(plain_webdataset(corpus, encoder, skip, docs) for _ in range(2)) / 2
        measured = (first + ours(corpus, encoder, args.batches)[0]) / 2
    figures = {"data_tokens_per_s_per_worker": measured,
               "data_tokens_per_s_per_worker_plain_webdataset": baseline,
               "data_throughput_ratio_vs_plain_webdataset": measured / baseline}
    lines = [f"## bench/data_throughput.py — {datetime.date.today().isoformat()}, {MACHINE}", "",
             f"Demo mix (configs/data/demo.yaml, synth corpus) at {SEQ_LEN} tokens, 1 DataLoader worker, "
             f"{docs} documents each (the same source sequence), A-B-B-A order: StreamingLoader (packed, resumable) vs plain "
             "webdataset + the same DocumentEncoder (documents, no packing).", ""]
    lines += [f"- {name}: {value:.1f}" if "ratio" not in name else f"- {name}: {value:.3f}"
              for name, value in figures.items()]
    append_results(lines)
    for name, value in figures.items():
        print(f"RESULT {name} {value:.3f}")


if __name__ == "__main__":
    main()
