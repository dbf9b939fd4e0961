"""Shared pieces of the training benchmarks (train_throughput, cp_memory, long_context_262k).

Peak memory on CPU, and why it is measured this way: torch's CPU allocator is plain malloc, so neither
tracemalloc nor torch's CUDA memory statistics see tensors. `PeakMemory` resets the kernel's peak-RSS
counter (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), remembers VmRSS, and on exit reads VmHWM (peak
resident set since the reset): `extra_mib` is what the measured code needed on top of what was already
resident (interpreter, torch, weights, inputs). For RSS to follow live tensors, glibc must return freed
memory: by default its mmap threshold grows after the first large free (up to 32 MiB), after which blocks
come from the heap and stay resident once freed, so a step after a warm-up step would reuse them and
report ~0. `ALLOCATOR_ENV` fixes the threshold (a fixed value also turns the growth off) so every block of
>= 128 KiB is mmapped and unmapped on free, and `PeakMemory` calls malloc_trim(0) before resetting.

Synthetic documents: a realistic pretraining mix (log-normal text lengths, captioned images, interleaved
image-text documents, short timestamped videos) built as `data.batch.Document`s with the project's own
position ids, packed by the project's best-fit packer, so benchmarks exercise the real PackedBatch path.
Pixel values are random: the benchmarks measure cost, not learning.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks run as `python bench/<name>.py`
    sys.path.insert(0, str(ROOT))

from data.batch import Document, PackedBatch  # noqa: E402
from data.packing import BestFitPacker, BufferEntry  # noqa: E402
from train.config.model import ModelConfig  # noqa: E402
from data.positions import document_position_ids  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
MACHINE = "2 CPU cores, no GPU"
TEXT_IDS = (16, 1000)  # token ids plain text draws from (above the special ids of every bench vocabulary)


# ------------------------------------------------------------------------------------------ memory
def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB (VmRSS: resident now, VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


# Environment for measuring processes (set before they start: glibc reads it at its first malloc).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def malloc_trim() -> None:
    """Give free heap memory back to the kernel (glibc; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory() as m: ...` -> m.extra_mib (peak RSS during the block minus RSS at its start),
    m.peak_mib (absolute peak RSS of the process during the block)."""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")
        self.before_kib = status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_kib = status_kib("VmHWM")

    @property
    def extra_mib(self) -> float:
        return (self.peak_kib - self.before_kib) / 1024

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


# ------------------------------------------------------------------------------------------ results
def print_results(figures: dict[str, float]) -> None:
    for name, value in figures.items():
        print(f"RESULT {name} {value:.4g}", flush=True)


def append_section(title: str, lines: Iterable[str], path: Path = RESULTS) -> None:
    """Append a dated entry `## <title> — <date>, <machine>` with `lines` at the end of RESULTS.md."""
    header = "" if path.exists() else "# Benchmark results\n"
    entry = [f"## {title} — {datetime.date.today().isoformat()}, {MACHINE}, torch {torch.__version__}", ""]
    with open(path, "a") as f:
        f.write(header + "\n" + "\n".join(entry + list(lines)) + "\n")


def publish(figures: dict[str, float], title: str, write: bool = True) -> None:
    """Print the figures as RESULT lines and (when `write`) append them to RESULTS.md under `title`."""
    print_results(figures)
    if write:
        append_section(title, [f"RESULT {k} {v:.4g}" for k, v in figures.items()])


def median(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------ documents
@dataclass
class Mix:
    """Share of each document kind and their sizes (defaults: a web-scale pretraining mix in miniature)."""

    text: float = 0.5
    caption: float = 0.25
    interleaved: float = 0.15
    video: float = 0.10
    text_median: int = 400  # log-normal text lengths (tokens), sigma below; ~2% exceed 8x the median
    text_sigma: float = 1.0
    image_side: tuple[int, int] = (8, 32)  # image patch grid side range (even numbers; /2 per merged token)
    video_groups: tuple[int, int] = (2, 8)  # temporal patch groups per video
    video_side: int = 16  # patch grid side of video frames: 64 tokens per frame group


def _text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TEXT_IDS) for _ in range(n)]


def _even(rng: random.Random, lo: int, hi: int) -> int:
    return 2 * rng.randint(lo // 2, hi // 2)


def make_document(cfg: ModelConfig, kind: str, key: str, rng: random.Random, mix: Mix | None = None,
                  max_len: int | None = None, video_grid: tuple[int, int, int] | None = None) -> Document:
    """One synthetic document of `kind` (text, caption, interleaved, video). `video_grid` (t, h, w) fixes
    the video's patch grid (t temporal patch groups); text is trimmed so the document fits `max_len`."""
    mix = mix or Mix()
    merge, tps = cfg.vision.spatial_merge_size, cfg.vision.temporal_patch_size
    vstart, vend = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids: list[int] = []
    target: list[bool] = []
    images: list[tuple[int, int, int]] = []
    videos: list[tuple[int, int, int]] = []

    def add(tokens: list[int], learn: bool) -> None:
        ids.extend(tokens)
        target.extend([learn] * len(tokens))

    def text_len(scale: float = 1.0) -> int:
        return max(8, int(rng.lognormvariate(math.log(mix.text_median * scale), mix.text_sigma)))

    def image() -> None:
        grid = (1, _even(rng, *mix.image_side), _even(rng, *mix.image_side))
        images.append(grid)
        add([vstart] + [cfg.image_token_id] * (grid[1] * grid[2] // merge ** 2) + [vend], False)

    if kind == "text":
        add(_text(rng, text_len()), True)
    elif kind == "caption":
        image()
        add(_text(rng, max(4, text_len(0.1))), True)
    elif kind == "interleaved":
        for _ in range(rng.randint(1, 3)):
            add(_text(rng, text_len(0.5)), True)
            image()
        add(_text(rng, text_len(0.5)), True)
    elif kind == "video":
        t, h, w = video_grid or (rng.randint(*mix.video_groups), mix.video_side, mix.video_side)
        videos.append((t, h, w))
        add(_text(rng, 12), False)  # the question / prompt
        per_group = h * w // merge ** 2
        for _ in range(t):  # timestamp stand-in (4 text tokens), then the frame group's span
            add(_text(rng, 4), False)
            add([vstart] + [cfg.video_token_id] * per_group + [vend], False)
        add(_text(rng, max(4, text_len(0.1))), True)
    else:
        raise ValueError(f"unknown document kind {kind!r}")
    if max_len is not None and len(ids) > max_len:
        last_vision = max((i for i, tok in enumerate(ids) if tok == vend), default=-1)
        if last_vision >= max_len:
            raise ValueError(f"a {kind} document's vision spans need {last_vision + 1} > {max_len} tokens")
        del ids[max_len:], target[max_len:]
    input_ids = torch.tensor(ids, dtype=torch.long)
    image_grid = torch.tensor(images, dtype=torch.long) if images else None
    video_grid_t = torch.tensor(videos, dtype=torch.long) if videos else None
    positions = document_position_ids(input_ids, image_grid, video_grid_t, image_token_id=cfg.image_token_id,
                                      video_token_id=cfg.video_token_id, spatial_merge_size=merge)
    target_mask = torch.tensor(target, dtype=torch.bool)
    target_mask[0] = False  # nothing precedes the first token
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dim = cfg.vision.in_channels * tps * cfg.vision.patch_size ** 2

    def pixels(grid: torch.Tensor | None) -> torch.Tensor | None:
        return None if grid is None else torch.randn(int(grid.prod(-1).sum()), dim, generator=gen)

    return Document(key=key, source=["text", "caption", "interleaved", "video"].index(kind), input_ids=input_ids,
                    position_ids=positions, target_mask=target_mask, pixel_values=pixels(image_grid),
                    image_grid_thw=image_grid, pixel_values_videos=pixels(video_grid_t),
                    video_grid_thw=video_grid_t)


def document_stream(cfg: ModelConfig, max_len: int, seed: int = 0, mix: Mix | None = None):
    """Endless documents of the mix, each at most max_len tokens, keys "doc<i>"."""
    mix = mix or Mix()
    rng = random.Random(seed)
    kinds, weights = ["text", "caption", "interleaved", "video"], [mix.text, mix.caption, mix.interleaved,
                                                                  mix.video]
    i = 0
    while True:
        try:
            yield make_document(cfg, rng.choices(kinds, weights)[0], f"doc{i}", rng, mix, max_len)
        except ValueError:  # its images cannot fit max_len whole (data/ would drop it too): draw another
            pass
        i += 1


def pack(docs: Iterable[Document], seq_len: int, count: int, pad_id: int = 0,
         buffer: int = 64) -> list[tuple[PackedBatch, list[Document]]]:
    """`count` best-fit packed sequences (data.packing, sqrt loss weights) with the documents of each."""
    stream = iter(docs)
    by_key: dict[str, Document] = {}

    def pull() -> BufferEntry | None:
        doc = next(stream, None)
        if doc is None:
            return None
        by_key[doc.key] = doc
        return BufferEntry(doc, None)

    packer, out = BestFitPacker(seq_len, buffer, "sqrt", pad_id), []
    while len(out) < count and (batch := packer.next_sequence(pull)) is not None:
        out.append((batch, [by_key.pop(k) for k in batch.doc_keys]))
    return out


def real_tokens(batch: PackedBatch) -> int:
    return batch.seq_len - batch.num_pad
