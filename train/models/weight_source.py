"""Where a model's weights come from, read one tensor slice at a time, in NATIVE parameter names.

Every backend builds its model on the meta device, decides which shard each rank owns, materialises only
that shard and fills it from a `WeightSource` (train/models/materialize.py): the random initialisation, a
native `final/` directory (stage handoff, `stage.init_from`) or a transformers directory. A source only
ever produces the slice asked for, so no rank holds more than its shard plus the tensor being converted.

    names()            the native state-dict names it can give (a tied `lm_head.weight` included)
    shape(name)        the full (unsharded) shape
    read(name, index)  the tensor, or only `tensor[index]` for a tuple of unit-step slices

`RandomInit` is THE random initialisation of every backend (the reference model's own `init_weights` reads
it too): each value depends only on (seed, parameter name, position in the full tensor), generated in
blocks of dim-0 rows of a fixed size, so a TP=2 piece or a ZeRO-3 partition holds exactly the values of
the TP=1 / unsharded tensor, whatever the layout, and any slice costs at most one block plus the slice.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from train.config.model import ModelConfig
from train.models.native_io import EMBED, LM_HEAD, CheckpointError, expected_native_shapes

Index = tuple[slice, ...]
BLOCK_ELEMENTS = 1 << 20  # random values are generated in blocks of whole dim-0 rows of about this many elements
INIT_STD = 0.02  # transformers' initializer_range for Qwen3-VL


@runtime_checkable
class WeightSource(Protocol):
    def names(self) -> set[str]:
        """Native names this source holds (with `lm_head.weight`, tied or not)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of tensor `name`."""

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        """Tensor `name` (fp32 or its stored dtype), or only `tensor[index]`; nothing else is read."""


def full_index(index: Index | None, shape: tuple[int, ...]) -> Index:
    """`index` with one unit-step, bounded slice per dimension (missing trailing dims: whole)."""
    given = tuple(index or ())
    if len(given) > len(shape):
        raise IndexError(f"index {given} has more dimensions than shape {list(shape)}")
    out = []
    for i, size in enumerate(shape):
        start, stop, step = (given[i] if i < len(given) else slice(None)).indices(size)
        if step != 1:
            raise IndexError(f"index {given}: only unit-step slices are supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def sliced_shape(index: Index) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


def row_blocks(shape: tuple[int, ...], rows: slice, elements: int) -> Iterator[tuple[int, int]]:
    """(first, stop) dim-0 row ranges covering `rows`, cut at multiples of about `elements` elements of the
    full tensor (fixed boundaries, whatever the slice: RandomInit's blocks)."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    per_block = max(1, elements // row)
    for b in range(rows.start // per_block, -(-rows.stop // per_block)):
        yield max(rows.start, b * per_block), min(rows.stop, (b + 1) * per_block, shape[0])


def _check_out(name: str, out: torch.Tensor, index: Index) -> None:
    if tuple(out.shape) != sliced_shape(index):
        raise ValueError(f"{name}: the weight source gives shape {list(sliced_shape(index))}, the model holds "
                         f"{list(out.shape)}")


@torch.no_grad()
def read_into(source: WeightSource, name: str, out: torch.Tensor, index: Index | None = None) -> None:
    """Copy `tensor[index]` of `source` into `out` (converted to out's dtype). Sources on disk write
    straight into `out` (a 64 MB block at most in between); others give the slice one block of dim-0
    rows at a time, so the transient is one block, never the whole slice."""
    shape = tuple(source.shape(name))
    index = full_index(index, shape)
    _check_out(name, out, index)
    direct = getattr(source, "read_into", None)
    if direct is not None:
        direct(name, out, index)
    elif not shape or out.numel() == 0:
        out.copy_(source.read(name, index))
    else:
        rows = index[0]
        for first, stop in row_blocks(shape, rows, BLOCK_ELEMENTS):
            out[first - rows.start: stop - rows.start].copy_(source.read(name, (slice(first, stop), *index[1:])))


@torch.no_grad()
def flat_range_into(source: WeightSource, name: str, start: int, out: torch.Tensor) -> None:
    """Elements [start, start + out.numel()) of the flattened tensor `name` into the 1-D `out` (what a
    ZeRO-3 partition holds), reading only the dim-0 rows they lie in, a block at a time."""
    shape = tuple(source.shape(name))
    stop = start + out.numel()
    if out.dim() != 1 or stop > math.prod(shape):
        raise ValueError(f"{name}: flat range [{start}, {stop}) into a tensor of shape {list(out.shape)}, the "
                         f"source's tensor has {math.prod(shape)} elements")
    direct = getattr(source, "read_flat_into", None)
    if direct is not None:
        direct(name, start, out)
    else:
        flat_range_by_rows(source, name, start, out)


def flat_range_by_rows(source: WeightSource, name: str, start: int, out: torch.Tensor) -> None:
    """flat_range_into through `source.read` of one block of dim-0 rows at a time."""
    shape = tuple(source.shape(name))
    stop = start + out.numel()
    if not shape or out.numel() == 0:
        out.copy_(source.read(name).reshape(-1)[start:stop])
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    for first, last in row_blocks(shape, slice(start // row, -(-stop // row)), BLOCK_ELEMENTS):
        lo, hi = max(start, first * row), min(stop, last * row)
        block = source.read(name, (slice(first, last),)).reshape(-1)
        out[lo - start: hi - start].copy_(block[lo - first * row: hi - first * row])


def check_source_fits(source: WeightSource, cfg: ModelConfig, where: str) -> None:
    """One line naming the first missing, unexpected or mis-shaped tensor, before any expensive work."""
    expected = expected_native_shapes(cfg)
    names = source.names()
    for name, shape in expected.items():
        if name not in names:
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {list(shape)})")
        if tuple(source.shape(name)) != shape:
            location = getattr(source, "location", None)  # the file holding it, for sources on disk
            raise CheckpointError(f"{location(name) if location else where}: tensor {name!r} has shape "
                                  f"{list(source.shape(name))}, the model config expects {list(shape)}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s), first {unexpected[0]!r}")


class StateDictSource:
    """A full native state dict held in memory (tests, small models, the reference model's weights)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def names(self) -> set[str]:
        return set(self.state_dict)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        tensor = self.state_dict[name]
        return tensor[full_index(index, tuple(tensor.shape))]


class _GeneratedSource:
    """A source that makes its values (no files): the native model's parameter names and shapes."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.kinds, self.shapes = init_kinds(cfg)
        if cfg.text.tie_word_embeddings:
            self.shapes[LM_HEAD] = self.shapes[EMBED]

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]


class RandomInit(_GeneratedSource):
    """The reference model's initialisation, layout-independent: normal(0, 0.02) for matrices, embeddings,
    the MoE router and experts; zeros for biases; ones for norm gains (RMSNorm and LayerNorm)."""

    def __init__(self, cfg: ModelConfig, seed: int, std: float = INIT_STD) -> None:
        super().__init__(cfg)
        self.seed, self.std = int(seed), std

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        if name == LM_HEAD and self.cfg.text.tie_word_embeddings:
            name = EMBED
        shape = self.shapes[name]
        index = full_index(index, shape)
        kind = self.kinds[name]
        if kind == "ones":
            return torch.ones(sliced_shape(index))
        if kind == "zeros":
            return torch.zeros(sliced_shape(index))
        parts = [block[(slice(first, stop), *index[1:])] for block, first, stop in self._blocks(name, index[0])]
        if not parts:
            return torch.empty(sliced_shape(index))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _blocks(self, name: str, rows: slice) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(block of rows, first wanted row in it, stop) for every row block overlapping `rows`."""
        shape = self.shapes[name]
        per_block = max(1, BLOCK_ELEMENTS // (math.prod(shape[1:]) if len(shape) > 1 else 1))
        for first, stop in row_blocks(shape, rows, BLOCK_ELEMENTS):
            b = first // per_block
            begin = b * per_block
            count = min(per_block, shape[0] - begin)
            generator = torch.Generator().manual_seed(_block_seed(self.seed, name, b))
            block = torch.empty((count, *shape[1:])).normal_(0.0, self.std, generator=generator)
            yield block, first - begin, stop - begin


class ZeroInit(_GeneratedSource):
    """Zeros for every parameter: the initial values of a backend that a resume checkpoint is about to
    overwrite in full (train/trainer.py). RandomInit would generate every value of the model (row blocks
    whole, so a row-parallel TP piece costs the full tensor) only for the load to replace it; zeros cost a
    memset. The load itself refuses a checkpoint that misses a tensor, so no zero survives it."""

    def read(self, name: str, index: Index | None = None) -> torch.Tensor:
        return torch.zeros(sliced_shape(full_index(index, self.shapes[name])))

    def read_into(self, name: str, out: torch.Tensor, index: Index | None = None) -> None:
        out.zero_()  # read_into / flat_range_into have checked the shape and range: nothing to copy

    def read_flat_into(self, name: str, start: int, out: torch.Tensor) -> None:
        out.zero_()


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_kinds(cfg: ModelConfig) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(name -> "normal" | "zeros" | "ones", name -> shape) of the native model's parameters, decided by the
    owning module's type on a meta-device build (no memory)."""
    from train.models.qwen3vl.common import RMSNorm
    from train.models.qwen3vl.model import Qwen3VLModel
    from train.models.qwen3vl.moe import Experts, TopKRouter

    with torch.device("meta"):
        model = Qwen3VLModel(cfg)
    kinds: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, module in model.named_modules():
        for key, param in module.named_parameters(prefix=prefix, recurse=False):
            local = key.rsplit(".", 1)[-1]
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                kind = "ones" if local == "weight" else "zeros"
            elif isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding, TopKRouter, Experts)):
                kind = "zeros" if local == "bias" else "normal"
            else:
                raise TypeError(f"no initialisation rule for parameter {key!r} of a {type(module).__name__}")
            kinds.setdefault(key, kind)
            shapes.setdefault(key, tuple(param.shape))
    return kinds, shapes
