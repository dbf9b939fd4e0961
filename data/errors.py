"""Errors of the data pipeline.

A bad sample (truncated image, undecodable video, malformed JSON, a member without its pair) raises
`BadSample` where it is decoded; the loader catches it, counts it and skips the sample. A shard that cannot
be read raises `ShardError` (`FetchError` when the source failed to deliver it: retried first); the stream
counts it and skips it. The loader only counts; the trainer sums the counts over every rank and worker and
stops the run once a data set's bad fraction passes `data.max_bad_fraction` (`over_limit`).
"""
from __future__ import annotations


class DataError(RuntimeError):
    """The data cannot be used (missing shards, too many bad samples, a state that does not fit the mix)."""


class BadSample(ValueError):
    """One sample cannot be decoded. `reason` is short and names what is wrong (member, format)."""

    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(f"{key}: {reason}" if key else reason)
        self.reason = reason
        self.key = key


class ShardError(Exception):
    """A shard cannot be (fully) read. Counted and skipped by the stream, never fatal on its own."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class FetchError(ShardError):
    """The shard's source did not deliver it (connection refused or cut, a pipe command that failed, an object
    store error): worth retrying, unlike a shard whose bytes are corrupt."""


def bad_counts(counts: dict[str, int]) -> tuple[int, int]:
    """(bad, read) of one data set's loader counters: bad samples and bad shards, and everything read."""
    bad = counts.get("bad_samples", 0) + counts.get("bad_shards", 0)
    return bad, bad + counts.get("samples", 0)


def bad_fractions(counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Bad fraction per data set (0 for a data set nothing was read from yet)."""
    return {name: bad / read if read else 0.0 for name, (bad, read) in
            ((name, bad_counts(c)) for name, c in counts.items())}


def over_limit(counts: dict[str, dict[str, int]], max_fraction: float, grace: int) -> list[str]:
    """`"name 12/200 = 0.060"` for each data set whose bad fraction passed `max_fraction` after at least
    `grace` reads; `counts` are the loader counters summed over every rank and worker."""
    exceeded = []
    for name, c in counts.items():
        bad, read = bad_counts(c)
        if read and read >= grace and bad > max_fraction * read:
            exceeded.append(f"{name} {bad}/{read} = {bad / read:.3f}")
    return exceeded
