"""How many steps the needle miniature's text decoder needs to copy the timestamp written before a needle.

The needle miniature's timestamp error (docs/eval.md) comes from the tiny model placing the needle by its
position in the sequence instead of copying the `<t seconds>` text before the needle's patch. This bench
isolates the copying: the tiny model of configs/model/tiny.yaml (its text decoder; random init) trains on
a symbolic haystack, the needle pipeline's document layout with text tokens standing in for the patches:

    per patch: <t seconds> <|vision_start|> p p p p <|vision_end|>    then the question, then the answer
    `<t seconds> N` (t the stamp before the needle's patch, N the needle's kind)

p is one of 20 "gray" tokens, the needle's patch repeats one of 21 needle tokens. Clips are 4-30 s at
2.07 s per patch and start at a uniform offset in a 144 s video (as `--preset needle_clips` does), so
the position does not tell the time: only copying does. A step packs 8 documents (about what a needle_s1
step holds) into one sequence; Adam at the needle stages' 3e-3 with a cosine decay over --steps.

Figures: the share of 200 unseen documents whose answer time is right token for token (teacher forced),
after 1/3, 2/3 and all of the steps, for timestamps tokenized digit by digit (`1` `0` `7` `.` `5`, as
Qwen's tokenizer) and with whole seconds as one piece (`107` `.` `5`, `data.synth --whole-numbers`); the
baseline is answering the stamp of a uniformly chosen patch of the clip (computed on the same documents).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import publish  # noqa: E402
from train.models.native_io import load_model_config_yaml  # noqa: E402
from train.models.qwen3vl.model import Qwen3VLModel  # noqa: E402

# Token ids inside the tiny vocabulary (2048), clear of the project's special ids 0-6.
VSTART, VEND = 3, 4
LT, DOT, SECONDS, GT, QUESTION, EOS = 10, 11, 12, 13, 14, 2
DIGITS, WHOLE, GRAY, NEEDLE = 20, 100, 600, 700
PATCH_SECONDS, SOURCE_SECONDS = 2.07, 144


def stamp(seconds: float, whole: bool) -> list[int]:
    integer, tenths = f"{seconds:.1f}".split(".")
    middle = [WHOLE + int(integer)] if whole else [DIGITS + int(c) for c in integer]
    return [LT, *middle, DOT, DIGITS + int(tenths), SECONDS, GT]


def document(rng: random.Random, whole: bool) -> tuple[list[int], list[bool], int, list[float]]:
    """(ids, learned mask, index of the answer's first time token, the clip's patch stamps)."""
    seconds = rng.randint(4, 30)
    offset = rng.randint(0, SOURCE_SECONDS - seconds)
    stamps = [offset + 0.5 + PATCH_SECONDS * k for k in range(seconds // 2)]
    needle, kind = rng.randrange(len(stamps)), rng.randrange(21)
    ids: list[int] = []
    for k, t in enumerate(stamps):
        pads = [NEEDLE + kind] * 4 if k == needle else [GRAY + rng.randrange(20) for _ in range(4)]
        ids += stamp(t, whole) + [VSTART, *pads, VEND]
    ids.append(QUESTION)
    answer = stamp(stamps[needle], whole) + [NEEDLE + kind, EOS]
    learn = [False] * len(ids) + [True] * len(answer)
    return ids + answer, learn, len(ids) + 1, stamps


def packed(docs: list[tuple[list[int], list[bool], int, list[float]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([i for d in docs for i in d[0]])
    learn = torch.tensor([m for d in docs for m in d[1]])
    cu = torch.tensor([0] + [len(d[0]) for d in docs]).cumsum(0).to(torch.int32)
    return ids, learn, cu


def copy_accuracy(model: Qwen3VLModel, docs: list) -> float:
    """Share of documents whose answer time tokens (after `<`) are all predicted right, teacher forced."""
    ids, _, cu = packed(docs)
    with torch.no_grad():
        predicted = model(ids, cu_seqlens=cu).logits.argmax(-1)
    right = 0
    for (doc_ids, _, first, _), start in zip(docs, cu[:-1].tolist()):
        n = doc_ids.index(SECONDS, first) - first  # the seconds' digits or piece, the dot, the tenths
        position = start + first
        right += predicted[position - 1:position - 1 + n].tolist() == doc_ids[first:first + n]
    return right / len(docs)


def train(whole: bool, steps: int, seed: int, lr: float = 3e-3,
          docs_per_step: int = 8) -> tuple[dict[int, float], list[float]]:
    """({step: copy accuracy} after 1/3, 2/3 and all of the steps, the loss of every step)."""
    torch.manual_seed(seed)
    model = Qwen3VLModel(load_model_config_yaml(ROOT / "configs" / "model" / "tiny.yaml"))
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual")]
    opt = torch.optim.AdamW(text_params, lr=lr, weight_decay=0.0)
    rng, held_out = random.Random(seed), [document(random.Random(f"eval/{i}"), whole) for i in range(200)]
    marks, out, losses = {steps // 3, 2 * steps // 3, steps}, {}, []
    for step in range(1, steps + 1):
        scale = min(1.0, step / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids, learn, cu = packed([document(rng, whole) for _ in range(docs_per_step)])
        logits = model(ids, cu_seqlens=cu).logits
        target = learn[1:]
        loss = F.cross_entropy(logits[:-1][target], ids[1:][target])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(text_params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step in marks:
            out[step] = copy_accuracy(model, held_out)
            print(f"{'whole' if whole else 'digits'} step {step}: loss {loss.item():.3f}, copy {out[step]:.3f}",
                  flush=True)
    return out, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", choices=["digits", "whole", "both"], default="both")
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    held_out = [document(random.Random(f"eval/{i}"), False) for i in range(200)]
    figures = {"needle_copy_baseline_random_patch": sum(1 / len(d[3]) for d in held_out) / len(held_out)}
    start = time.time()
    for whole in {"digits": [False], "whole": [True], "both": [False, True]}[args.tokens]:
        for step, accuracy in train(whole, args.steps, args.seed)[0].items():
            figures[f"needle_copy_{'whole' if whole else 'digits'}_step{step}"] = accuracy
    figures["needle_copy_seconds"] = time.time() - start
    publish(figures, f"needle_copy (--steps {args.steps} --seed {args.seed} --tokens {args.tokens})",
            not args.no_append)


if __name__ == "__main__":
    main()
