"""Data configuration schema of one stage: which data sets, how they are mixed, packed and streamed.

Every stage carries its own `DataConfig` (Hydra group `data/`); the stage's sequence length is passed to the
loader separately because it belongs to the stage, not to the mix. `validate()` raises `DataError` naming the
dotted key and the bad value before any shard is opened.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.encode import EncodeConfig
from data.errors import DataError

LOSS_WEIGHTINGS = ("sqrt", "per_token", "per_sample")


@dataclass
class DatasetConfig:
    """One data set of the mixture: a name (used in logs and loss-per-source metrics) and its shards."""

    name: str = ""
    # Shard URLs (see data/sources.py): local globs or paths ("/data/caption/shard-*.tar"), brace ranges
    # ("shard-{000..099}.tar") expanded like webdataset does, "pipe:COMMAND", "http(s)://...", fsspec URLs
    # ("s3://bucket/cap/shard-*.tar" with the s3 extra, "gs://..." with the gcs extra), "@list.txt" (one URL
    # a line); .tar, .tar.gz or .tgz.
    shards: list[str] = field(default_factory=list)
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    # sentencepiece .model or HuggingFace tokenizer.json; None means the corpus' own <data_root>/tokenizer.model.
    tokenizer: str | None = None
    # How samples become documents: image/video resolution budgets, fps, timestamps, what is learned.
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    # Sampling probability p_i ∝ weight_i ** temperature: 1 keeps the weights, 0.5 is square-root sampling,
    # 0 samples the data sets uniformly.
    temperature: float = 1.0
    # Per-document loss weight from its number of supervised targets N_s: "sqrt" 1/sqrt(N_s) (Qwen3-VL),
    # "per_token" 1, "per_sample" 1/N_s. See data/packing.py for why the global sum is the normaliser.
    loss_weighting: str = "sqrt"
    # Documents held back for best-fit packing; larger fills sequences better and costs restore time.
    packing_buffer: int = 64
    # ... and at most this many bytes of document tensors per worker (plus the one document that crosses
    # it); None: documents only. 2 GiB holds ~350K visual tokens of uint8 pixels (6 KiB each).
    buffer_bytes: int | None = 2 * 1024 ** 3
    num_workers: int = 2
    prefetch_factor: int = 2
    # The run stops once a data set's (bad samples + bad shards) / (everything read from it), summed over
    # every rank and worker, passes this fraction; only after `bad_sample_grace` reads of that data set, so
    # that one early bad sample does not end a run. The trainer checks it every step.
    max_bad_fraction: float = 0.05
    bad_sample_grace: int = 200
    # A shard whose source fails (connection refused or cut, a pipe command exiting with an error) is opened
    # again this many times, from the sample it stopped at, waiting fetch_backoff_s, then twice as long...;
    # then it is counted and skipped as a bad shard.
    fetch_retries: int = 3
    fetch_backoff_s: float = 1.0
    # At most one warning per worker in this many seconds; the rest are counted in the stats only.
    warn_interval_s: float = 30.0
    # None streams forever (each data set restarts with a new shard order when it runs out); N stops each
    # data set after N passes, and the loader after the last data set ran out (evaluation, epoch tests).
    max_epochs: int | None = None
    seed: int = 0

    def validate(self, prefix: str = "data") -> None:
        if not self.datasets:
            raise DataError(f"{prefix}.datasets is empty: a stage needs at least one data set")
        names = [d.name for d in self.datasets]
        for i, d in enumerate(self.datasets):
            where = f"{prefix}.datasets[{i}]"
            if not d.name:
                raise DataError(f"{where}.name is empty")
            if names.count(d.name) > 1:
                raise DataError(f"{where}.name={d.name!r} appears {names.count(d.name)} times")
            if not d.shards:
                raise DataError(f"{where}.shards is empty (data set {d.name!r})")
            if not d.weight > 0:
                raise DataError(f"{where}.weight={d.weight} must be > 0 (data set {d.name!r})")
        self.encode.validate(f"{prefix}.encode")
        if self.temperature < 0:
            raise DataError(f"{prefix}.temperature={self.temperature} must be >= 0")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise DataError(f"{prefix}.loss_weighting={self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        for key in ("packing_buffer", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise DataError(f"{prefix}.{key}={getattr(self, key)} must be >= 1")
        if self.buffer_bytes is not None and self.buffer_bytes < 1:
            raise DataError(f"{prefix}.buffer_bytes={self.buffer_bytes} must be >= 1 or None")
        if self.num_workers < 0:
            raise DataError(f"{prefix}.num_workers={self.num_workers} must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise DataError(f"{prefix}.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.bad_sample_grace < 0:
            raise DataError(f"{prefix}.bad_sample_grace={self.bad_sample_grace} must be >= 0")
        if self.fetch_retries < 0 or self.fetch_backoff_s < 0:
            raise DataError(f"{prefix}.fetch_retries={self.fetch_retries} / {prefix}.fetch_backoff_s="
                            f"{self.fetch_backoff_s} must be >= 0")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise DataError(f"{prefix}.max_epochs={self.max_epochs} must be >= 1 or None")
