"""Where in the needle pipeline the text decoder learns to copy a timestamp, and at which lengths.

`python bench/needle_stamp_copy.py runs/needle` reads every stage's final weights of a needle run (in pipeline
order) and scores each on unseen stamp texts (`data.synth.stamp_text_sample`: a needle clip written in words,
per patch its `<t seconds>` and two words, the needle's color and shape at one; the eval's question) that
start at 0 s as the eval's haystacks do, at three lengths: 4-30 s (needle_lm's), 60-72 s and 140-144 s (the
eval's longest). Figure: the share of 200 documents per length whose answer time, `<t seconds>`, is predicted
right token for token, teacher forced. Baseline in the same run: answering the stamp of a uniformly chosen
patch of the document (1 / patches, averaged over the same documents), and each stage against the ones before
it. Text only, so it separates the decoder's copy from the vision path (docs/eval.md "The long copy").
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench.common import publish  # noqa: E402
from data.encode import DocumentEncoder  # noqa: E402
from data.synth import stamp_text_sample  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from train.eval.generate import load_model  # noqa: E402

LENGTHS = {"4_30s": (4, 30), "60_72s": (60, 72), "140_144s": (140, 144)}
STAMP = re.compile(r"^<[^>]*>")


def documents(tokenizer: Tokenizer, seconds: tuple[int, int], count: int) -> list[tuple]:
    """(ids, position ids, index of the answer's first token, its stamp's token count, patches) per document;
    seeds no training corpus uses (`data.synth` seeds its shards by data set and index)."""
    encoder = DocumentEncoder(tokenizer, seq_len=2048)
    docs = []
    for i in range(count):
        members, _ = stamp_text_sample(random.Random(f"bench-stamp-copy/{seconds}/{i}"), seconds=seconds,
                                       from_start=1.0)
        content = json.loads(members["json"])["content"]
        answer = content[-1]["text"]
        doc = encoder.encode(members, f"doc{i}", 0)
        first = int(doc.target_mask.nonzero()[0])
        stamp_ids = tokenizer.encode(STAMP.match(answer).group(0))
        if doc.input_ids[first:first + len(stamp_ids)].tolist() != stamp_ids:
            raise RuntimeError(f"answer {answer!r} does not start with its stamp's tokens")
        patches = (len(content) - 2) // 2
        docs.append((doc.input_ids, doc.position_ids, first, len(stamp_ids), patches))
    return docs


@torch.no_grad()
def copy_accuracy(model: torch.nn.Module, docs: list[tuple]) -> float:
    right = 0
    for ids, positions, first, n, _ in docs:
        logits = model(ids, cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32),
                       position_ids=positions).logits
        predicted = logits[first - 1:first - 1 + n].argmax(-1)
        right += bool(torch.equal(predicted, ids[first:first + n]))
    return right / len(docs)


def stage_dirs(run_dir: Path) -> list[Path]:
    """The run's stage final/ dirs in the order the stages ran (each summary.json is written at its end)."""
    done = sorted(run_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    finals = [p.parent / "final" for p in done if (p.parent / "final").is_dir()]
    if not finals:
        raise SystemExit(f"{run_dir}: no finished stage (no */summary.json with a final/ beside it)")
    return finals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a needle run, e.g. runs/needle")
    parser.add_argument("--tokenizer", default="needle_read_data/tokenizer.model")
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.load(args.tokenizer)
    docs = {name: documents(tokenizer, seconds, args.documents) for name, seconds in LENGTHS.items()}
    figures = {f"chance_{name}": sum(1 / d[4] for d in ds) / len(ds) for name, ds in docs.items()}
    for final in stage_dirs(args.run_dir):
        model = load_model(final)
        for name, ds in docs.items():
            figures[f"{final.parent.name}_{name}"] = copy_accuracy(model, ds)
    publish(figures, f"needle_stamp_copy ({args.run_dir}, {args.documents} documents per length)",
            write=not args.no_write)


if __name__ == "__main__":
    main()
