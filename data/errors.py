"""Errors of the data pipeline.

A bad sample (truncated image, undecodable video, malformed JSON, a member without its pair) raises
`BadSample` where it is decoded; the loader catches it, counts it and skips the sample. Only when the bad
fraction passes the configured limit does the run stop, with `DataError`.
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
