"""Activation checkpointing per decoder layer and per ViT block: layers really are recomputed in backward,
and gradients equal those without checkpointing."""
from __future__ import annotations

import pytest
import torch
from model_fixtures import image_span, random_pixels, tiny_dense_config, tiny_moe_config

from train.models.qwen3vl import Qwen3VLModel


def _count_forward_calls(module: torch.nn.Module, counts: dict, key: str) -> None:
    # Wrap forward itself: module forward hooks do not fire when checkpoint recomputes.
    inner = type(module).forward.__get__(module)

    def counted(*args):
        counts[key] += 1
        return inner(*args)
    module.forward = counted


def _grads_and_forward_calls(model: Qwen3VLModel, inputs: dict) -> tuple[dict, int, int]:
    counts = {"decoder": 0, "vit": 0}
    _count_forward_calls(model.language_model.layers[0], counts, "decoder")
    _count_forward_calls(model.visual.blocks[0], counts, "vit")
    model.zero_grad()
    out = model(**inputs)
    (out.logits.float().square().mean() + 0.1 * out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, counts["decoder"], counts["vit"]


@pytest.mark.parametrize("make_cfg", [tiny_dense_config, tiny_moe_config], ids=["dense", "moe"])
def test_checkpointing_recomputes_and_keeps_gradients(make_cfg):
    cfg = make_cfg()
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg)
    grid = [1, 4, 4]
    pix, g = random_pixels([grid], cfg)
    inputs = dict(input_ids=torch.tensor([1, 2] + image_span(grid, cfg) + [3, 4, 5]),
                  pixel_values=pix, image_grid_thw=g)
    plain, dec_plain, vit_plain = _grads_and_forward_calls(model, inputs)
    model.enable_activation_checkpointing(decoder=True, vision=True)
    ckpt, dec_ckpt, vit_ckpt = _grads_and_forward_calls(model, inputs)
    assert (dec_plain, vit_plain) == (1, 1)
    assert (dec_ckpt, vit_ckpt) == (2, 2)  # forward once, again in backward
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
