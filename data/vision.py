"""Images -> Qwen3-VL pixel patches: dynamic resolution, resize, patchify, normalize.

Matches transformers' Qwen2VLImageProcessorPil as configured by Qwen3-VL (patch 16, merge 2, temporal
patch 2, mean = std = 0.5) value for value: RGB conversion (alpha composited on white), PIL bicubic resize
of the uint8 image, x/255 in float64 then float32, (x - mean) / std, and the patch order of its patchify.
Videos use the same resize rule per frame (data.video) and the same patch order over temporal patches.

Compact pixels: by default (`pixel_dtype: uint8`) patches leave the worker as the resized uint8 values
(1 byte a value instead of 4, so a visual token costs 6 KiB instead of 24 KiB in the packing buffer, the
DataLoader queues and the host-to-device copy) and the model's first op, the vision patch embedding,
normalises them on the device with `normalize_pixels`, the same arithmetic the worker runs for
`pixel_dtype: float32`, so both give bit-identical fp32 inputs to the tower.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from data.errors import BadSample, DataError

# Pillow refuses images above ~179M pixels (decompression bomb); a real image above this many is data
# we do not want to decode in the loader either.
MAX_DECODE_PIXELS = 64 * 1024 * 1024
MAX_ASPECT_RATIO = 200
PIXEL_DTYPES = ("uint8", "float32")


@dataclass
class ImageConfig:
    """How images become patches. Defaults are Qwen3-VL's preprocessor_config.json."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 64 * 32 * 32  # 65,536: at least 64 LLM tokens per image
    max_pixels: int = 16384 * 32 * 32  # 16,777,216: at most 16,384 LLM tokens per image
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # What the workers emit: "uint8" (resized values; the model normalises on the device with
    # model.vision.image_mean/std) or "float32" (normalised in the worker, 4x the bytes).
    pixel_dtype: str = "uint8"

    @property
    def factor(self) -> int:
        """Side granularity in pixels: one LLM token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def validate(self, prefix: str = "data.image") -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, key) <= 0:
                raise DataError(f"{prefix}.{key}={getattr(self, key)} must be > 0")
        if self.min_pixels > self.max_pixels:
            raise DataError(f"{prefix}.min_pixels={self.min_pixels} exceeds {prefix}.max_pixels={self.max_pixels}")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != 3:
                raise DataError(f"{prefix}.{key}={getattr(self, key)} must have 3 values (RGB)")
        if self.pixel_dtype not in PIXEL_DTYPES:
            raise DataError(f"{prefix}.pixel_dtype={self.pixel_dtype!r} is not one of {PIXEL_DTYPES}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' qwen2_vl smart_resize (round, then floor/ceil by a square-root factor).
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image size {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, member: str = "image") -> Image.Image:
    """Decode image bytes fully (so truncation shows here, not later); BadSample naming `member` if not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_DECODE_PIXELS:
                raise BadSample(f"{member}: {img.width}x{img.height} image exceeds {MAX_DECODE_PIXELS} pixels")
            img.load()
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(f"{member}: undecodable image ({type(e).__name__}: {e})") from e
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers' convert_to_rgb does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_rgb(img: Image.Image, height: int, width: int) -> np.ndarray:
    """[C, height, width] uint8: bicubic resize of the RGB uint8 image."""
    resized = np.asarray(to_rgb(img).resize((width, height), resample=Image.Resampling.BICUBIC))
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def normalize_pixels(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 values whose last dim is channel-major ([..., C * k]: a patch row, or a flattened [C, H, W])
    -> float32 (x / 255 - mean) / std, on pixels' device.

    float64 rescale then float32, mean/std in float32: the exact arithmetic of transformers' numpy path, so
    the worker (pixel_dtype float32) and the model's first op (uint8 input) give the same bits."""
    channels = len(mean)
    x = (pixels.to(torch.float64) * (1 / 255)).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None]
    return ((x.reshape(*x.shape[:-1], channels, -1) - m) / s).reshape(x.shape)


def resize_normalize(img: Image.Image, height: int, width: int, cfg: ImageConfig) -> np.ndarray:
    """[C, height, width] float32: bicubic resize of the RGB uint8 image, rescale, normalize."""
    resized = resize_rgb(img, height, width)
    return normalize_pixels(torch.from_numpy(resized).reshape(-1), cfg.image_mean,
                            cfg.image_std).reshape(resized.shape).numpy()


def finish_pixels(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """uint8 patches as the workers emit them: kept (uint8) or normalised here (float32), per cfg."""
    return pixels if cfg.pixel_dtype == "uint8" else normalize_pixels(pixels, cfg.image_mean, cfg.image_std)


def patchify(frames: np.ndarray, cfg: ImageConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """frames [T, C, H, W] (T a multiple of temporal_patch_size) -> ([gt*gh*gw, C*tps*ps*ps], (gt, gh, gw)).

    Patch order: temporal patch, then 2x2 merge blocks row-major, then the 4 patches of a block; each patch
    vector is (C, tps, ps, ps). This is the order the vision tower's merger expects.
    """
    t, c, h, w = frames.shape
    ps, m, tps = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if t % tps or h % (ps * m) or w % (ps * m):
        raise ValueError(f"frames of shape {frames.shape} are not multiples of (temporal {tps}, side {ps * m})")
    gt, gh, gw = t // tps, h // ps, w // ps
    x = frames.reshape(gt, tps, c, gh // m, m, ps, gw // m, m, ps)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, c * tps * ps * ps)), (gt, gh, gw)


def process_image(img: Image.Image, cfg: ImageConfig | None = None,
                  max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values [gh*gw, C*tps*ps*ps] uint8 or float32 per cfg.pixel_dtype,
    grid_thw [1, 3] int64 = (1, gh, gw)).

    `max_pixels` lowers cfg.max_pixels for this image (a document's budget shared by several images).
    """
    cfg = cfg or ImageConfig()
    limit = cfg.max_pixels if max_pixels is None else max(cfg.min_pixels, min(cfg.max_pixels, max_pixels))
    try:
        height, width = smart_resize(img.height, img.width, cfg.factor, cfg.min_pixels, limit)
    except ValueError as e:
        raise BadSample(str(e)) from e
    frame = resize_rgb(img, height, width)
    # An image is one temporal patch: the frame repeated temporal_patch_size times.
    frames = np.broadcast_to(frame, (cfg.temporal_patch_size, *frame.shape))
    pixels, grid = patchify(frames, cfg)
    return finish_pixels(pixels, cfg), torch.tensor([grid], dtype=torch.long)


def image_tokens(grid_thw: torch.Tensor, merge_size: int) -> int:
    """LLM placeholder tokens of one image or video grid row (t, h, w)."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1)[:3])
    return t * h * w // (merge_size * merge_size)
