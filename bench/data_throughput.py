"""Data throughput: tokens per second per DataLoader worker, for the demo mix at 8K tokens.

Ours: StreamingLoader (shard cursors, step-indexed mixture, DocumentEncoder, best-fit packing, resumable
state attached to every batch), 1 worker, counting the non-pad tokens of packed sequences.
Ours over HTTP, same run: the same loader on the same shards served by a loopback HTTP server
(bench/loopback_http.py, read through webdataset's gopen/curl like any http:// shard), so the batches are
identical and the ratio is the cost of the HTTP source (`data_http_over_local`).
Baseline, same run: plain webdataset pipelines over the same local shards, one WebDataset per data set that
reads the shards in the loader's order (each epoch's shard order from the same `SourceStream.plan`), taken
in the order of the same source schedule, so both sides decode the same samples in the same order with the
same DocumentEncoder; 1 worker, counting document tokens, no packing and no state. The difference is the
price of packing and exact resume.

Compact pixels, same run: the loader run in a fresh process that plays the worker (num_workers=0: it reads,
decodes, holds the packing buffer and packs), once with `data.encode.image.pixel_dtype=float32` (before:
normalised fp32 pixels, the former path) and once with `uint8` (after: normalised by the model's first op):
pixel bytes per visual token of the packed batches and the process' peak RSS (VmHWM) while it loads.

Prints `RESULT data_tokens_per_s_per_worker <v>` (and the HTTP, baseline, ratio and compact-pixel figures)
and appends to bench/RESULTS.md. Usage: python bench/data_throughput.py [--batches N]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from bench.common import PeakMemory  # noqa: E402
from bench.loopback_http import serve_directory  # noqa: E402
from bench.packing import MACHINE, append_results, demo_mix  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.encode import DocumentEncoder, EncodeConfig  # noqa: E402
from data.errors import BadSample  # noqa: E402
from data.loader import StreamingLoader  # noqa: E402
from data.mixture import SourceSchedule, mixture_probabilities  # noqa: E402
from data.shards import SourceStream, list_shards  # noqa: E402
from data.synth import make_corpus  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

SEQ_LEN = 8192


def ours(cfg: DataConfig, encoder: DocumentEncoder, batches: int) -> tuple[float, int, int]:
    """(tokens/s, documents drawn before timing, documents drawn while timing). Timing starts after the
    first batch, when the worker is up and the packing buffer is full."""
    loader = StreamingLoader(cfg, encoder.encode, SEQ_LEN)
    it = iter(loader)
    next(it)
    drawn_before = drawn_documents(loader)
    start, tokens = time.perf_counter(), 0
    for batch in itertools.islice(it, batches):
        tokens += batch.seq_len - batch.num_pad
    seconds = time.perf_counter() - start
    return tokens / seconds, drawn_before, drawn_documents(loader) - drawn_before


def drawn_documents(loader: StreamingLoader) -> int:
    """Documents the loader's single stream (one rank, one worker) has drawn from the mixture so far."""
    streams = loader.state_dict()["streams"]
    assert len(streams) == 1, f"the bench reads one stream, the loader serves {len(streams)}"
    return next(iter(streams.values()))["k"]


class _ScheduledMix(IterableDataset):
    """Plain webdataset pipelines, one per data set, taken in the order our SourceSchedule draws (stream 0 =
    dp rank 0, worker 0), each reading its shards in the order our SourceStream plans them, so that both
    sides decode the same samples in the same order."""

    def __init__(self, corpus: str, encoder: DocumentEncoder) -> None:
        self.cfg, self.encoder = demo_mix(corpus), encoder

    def _in_loader_order(self, source: int, shards: list[str]):
        plan = SourceStream(source, "", shards, 0, 1, self.cfg.seed, None, lambda *_: None)
        for epoch in itertools.count():
            urls = [shards[shard] for shard, _, _ in plan.plan(epoch)]
            yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=wds.warn_and_continue)

    def __iter__(self):
        pipelines = [self._in_loader_order(i, list_shards(d)) for i, d in enumerate(self.cfg.datasets)]
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


def _pixel_worker(corpus: str, pixel_dtype: str, batches: int) -> dict[str, float]:
    """In its own process: load `batches` packed sequences with pixels of `pixel_dtype`; pixel bytes per visual
    token and peak RSS (MiB) of the loading process."""
    tok = Tokenizer.load(Path(corpus) / "tokenizer.model")
    base = EncodeConfig()
    encode_cfg = replace(base, image=replace(base.image, pixel_dtype=pixel_dtype))
    encoder = DocumentEncoder(tok, encode_cfg, SEQ_LEN)
    pixel_bytes = visual_tokens = 0
    with PeakMemory() as memory:
        loader = StreamingLoader(demo_mix(corpus, num_workers=0), encoder.encode, SEQ_LEN)
        for batch in itertools.islice(iter(loader), batches):
            pixel_bytes += sum(p.numel() * p.element_size() for p in (batch.pixel_values, batch.pixel_values_videos)
                               if p is not None)
            visual_tokens += int(((batch.input_ids == tok.image_pad_id) | (batch.input_ids == tok.video_pad_id)).sum())
    return {"bytes_per_visual_token": pixel_bytes / visual_tokens, "peak_rss_mib": memory.peak_mib,
            "rss_growth_mib": memory.extra_mib}


def compact_pixels(corpus: str, batches: int) -> dict[str, float]:
    """Before (float32 pixels from the worker) and after (uint8), each in a fresh spawned process."""
    figures: dict[str, float] = {}
    ctx = multiprocessing.get_context("spawn")
    for label, dtype in (("before_fp32", "float32"), ("after_uint8", "uint8")):
        with ctx.Pool(1) as pool:
            r = pool.apply(_pixel_worker, (corpus, dtype, batches))
        figures[f"data_bytes_per_visual_token_{label}"] = r["bytes_per_visual_token"]
        figures[f"data_worker_peak_rss_mib_{label}"] = r["peak_rss_mib"]
        figures[f"data_worker_rss_growth_mib_{label}"] = r["rss_growth_mib"]
    return figures


def over_http(cfg: DataConfig, corpus: str, url: str) -> DataConfig:
    """The same mix with every shard read from `url` (the corpus served over HTTP) instead of the disk."""
    datasets = [replace(d, shards=[p.replace(corpus, url, 1) for p in list_shards(d)]) for d in cfg.datasets]
    return replace(cfg, datasets=datasets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24, help="packed sequences timed on our side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as corpus, serve_directory(corpus) as server:
        make_corpus(corpus)
        encoder = DocumentEncoder(Tokenizer.load(Path(corpus) / "tokenizer.model"), EncodeConfig(), SEQ_LEN)
        local = demo_mix(corpus, num_workers=1, prefetch_factor=2)
        remote = over_http(local, corpus, server.url)
        # A-B-C-C-B-A order: the machine is shared, so a load change hits every side about equally.
        first, skip, docs = ours(local, encoder, args.batches)
        http_first = ours(remote, encoder, args.batches)[0]
        baseline = sum(plain_webdataset(corpus, encoder, skip, docs) for _ in range(2)) / 2
        http = (http_first + ours(remote, encoder, args.batches)[0]) / 2
        measured = (first + ours(local, encoder, args.batches)[0]) / 2
        pixels = compact_pixels(corpus, args.batches)
    figures = {"data_tokens_per_s_per_worker": measured,
               "data_tokens_per_s_per_worker_http": http,
               "data_tokens_per_s_per_worker_plain_webdataset": baseline,
               "data_throughput_ratio_vs_plain_webdataset": measured / baseline,
               "data_http_over_local": http / measured, **pixels}
    lines = [f"## bench/data_throughput.py — {datetime.date.today().isoformat()}, {MACHINE}", "",
             f"Demo mix (configs/data/demo.yaml, synth corpus) at {SEQ_LEN} tokens, 1 DataLoader worker, "
             f"{docs} documents each (the same samples in the same order), A-B-C-C-B-A order: StreamingLoader "
             "(packed, resumable) on local shards, the same on the same shards over loopback HTTP (curl via "
             "webdataset.gopen), plain webdataset + the same DocumentEncoder on local shards in the loader's "
             "shard order (documents, no packing). Compact pixels: the loader alone in a spawned process "
             "(num_workers=0), float32 pixels (before) vs uint8 (after), pixel bytes per visual token of the "
             "packed batches and the process' peak RSS / RSS growth while loading.", ""]
    lines += [f"- {name}: {value:.1f}" if "ratio" not in name and "over" not in name else f"- {name}: {value:.3f}"
              for name, value in figures.items()]
    append_results(lines)
    for name, value in figures.items():
        print(f"RESULT {name} {value:.3f}")


if __name__ == "__main__":
    main()
