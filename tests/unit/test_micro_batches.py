"""stage.micro_batch_size: the trainer joins packed sequences into longer micro-batches; the loss and the
gradients are those of the sequences run one by one (documents, positions and loss weights are per document)."""
from __future__ import annotations

import pytest
import torch

from data.batch import concat_batches
from train.backends.deepspeed.module import LossModule
from train.doctor import doctor_batch, doctor_config
from train.loss import global_weight_sum
from train.models.qwen3vl import Qwen3VLModel
from train.trainer import join_micro_batches


def _objective_and_grads(model: Qwen3VLModel, micro: list, weight: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    total = 0.0
    for batch in micro:
        objective, *_ = LossModule(model)(batch, weight, 1, 1.0)
        objective.backward()
        total += float(objective.detach())
    return total, torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def test_joined_micro_batches_give_the_same_loss_and_gradients():
    cfg = doctor_config("deepspeed").model
    torch.manual_seed(0)
    model = Qwen3VLModel(cfg)
    sequences = [doctor_batch(cfg, seed=i) for i in range(4)]  # text, an image and a pad tail each
    weight = global_weight_sum([(b.labels, b.loss_weights) for b in sequences])
    loss, grads = _objective_and_grads(model, sequences, weight)
    for size in (2, 4):
        joined = join_micro_batches(sequences, size)
        assert len(joined) == 4 // size and joined[0].seq_len == size * sequences[0].seq_len
        got_loss, got_grads = _objective_and_grads(model, joined, weight)
        assert got_loss == pytest.approx(loss, rel=1e-5)
        assert float((got_grads - grads).norm() / grads.norm()) < 1e-5
    # Joined without their boundaries, later documents would attend to earlier ones: the gradients move.
    merged = concat_batches(sequences[:2])
    merged.cu_seqlens = merged.cu_seqlens[[0, -1]]
    unbounded = _objective_and_grads(model, [merged] + sequences[2:], weight)[1]
    assert float((unbounded - grads).norm() / grads.norm()) > 1e-2


def test_a_size_that_does_not_divide_the_step_is_refused():
    cfg = doctor_config("deepspeed").model
    with pytest.raises(ValueError, match="stage.micro_batch_size=2 does not divide the 3 packed sequences"):
        join_micro_batches([doctor_batch(cfg, seed=i) for i in range(3)], 2)


def test_a_bad_sample_in_a_joined_batch_is_still_named():
    cfg = doctor_config("deepspeed").model
    model = Qwen3VLModel(cfg)
    first, second = doctor_batch(cfg, seed=0), doctor_batch(cfg, seed=1)
    second.doc_keys = ["shard/a", "shard/b", "shard/c"]
    image_token = int((second.input_ids == cfg.image_token_id).nonzero()[0])
    second.input_ids[image_token] = 7  # one placeholder fewer than the image's features
    joined = concat_batches([first, second])
    with pytest.raises(ValueError, match="sample 'shard/b'"):
        model.embed(joined.input_ids, joined.pixel_values, joined.image_grid_thw, None, None, joined.cu_seqlens,
                    joined.doc_keys)
