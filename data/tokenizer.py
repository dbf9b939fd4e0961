"""The project's tokenizer: one interface over a sentencepiece `.model` or a HuggingFace `tokenizer.json`.

The sentencepiece models this project trains reserve fixed ids for the special tokens, so the tiny model
configs can hard-code them:

    0 <pad>   1 <unk>   2 <|endoftext|> (eos)   3 <|vision_start|>   4 <|vision_end|>
    5 <|image_pad|>   6 <|video_pad|>

A HuggingFace `tokenizer.json` (e.g. Qwen's) is used with its own ids, looked up by token name.

Train:  python -m data.tokenizer train --shards 'DIR/*.tar' --vocab-size 2048 --out tok.model
        python -m data.tokenizer train --text-files a.txt b.txt --vocab-size 2048 --out tok.model
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

EOS = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order matters: sentencepiece gives user-defined symbols the ids right after pad/unk/eos (3, 4, 5, 6).
VISION_SYMBOLS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
SPECIAL_TOKENS = (EOS,) + VISION_SYMBOLS
SP_FIXED_IDS = {"<pad>": 0, "<unk>": 1, EOS: 2, VISION_START: 3, VISION_END: 4, IMAGE_PAD: 5, VIDEO_PAD: 6}


class Tokenizer:
    """encode/decode text; exposes the special token ids the data pipeline and the model need."""

    def __init__(self, backend: object, path: str) -> None:
        self._backend = backend
        self.path = path
        self.eos_id = self._required_id(EOS)
        self.vision_start_id = self._required_id(VISION_START)
        self.vision_end_id = self._required_id(VISION_END)
        self.image_pad_id = self._required_id(IMAGE_PAD)
        self.video_pad_id = self._required_id(VIDEO_PAD)
        self.pad_id = self._pad_id()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a sentencepiece `.model` or a HuggingFace `tokenizer.json` (chosen by content, not name)."""
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head.startswith(b"{"):
            import tokenizers

            return cls(tokenizers.Tokenizer.from_file(path), path)
        import sentencepiece as spm

        try:
            return cls(spm.SentencePieceProcessor(model_file=path), path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer file {path} is neither a tokenizer.json nor a sentencepiece model: "
                             f"{e}") from e

    @property
    def is_sentencepiece(self) -> bool:
        return not hasattr(self._backend, "token_to_id")

    @property
    def vocab_size(self) -> int:
        if self.is_sentencepiece:
            return int(self._backend.get_piece_size())
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any bos/eos added."""
        if self.is_sentencepiece:
            return list(self._backend.encode(text, out_type=int))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.is_sentencepiece:
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        if self.is_sentencepiece:
            tid = self._backend.piece_to_id(token)
            # sentencepiece maps unknown pieces to unk; only a real piece of that name counts.
            return tid if self._backend.id_to_piece(tid) == token else None
        return self._backend.token_to_id(token)

    def _required_id(self, token: str) -> int:
        tid = self.token_id(token)
        if tid is None:
            raise ValueError(f"tokenizer {self.path} has no special token {token}")
        return int(tid)

    def _pad_id(self) -> int:
        if self.is_sentencepiece and self._backend.pad_id() >= 0:
            return int(self._backend.pad_id())
        # Qwen's tokenizer.json has no pad piece; Qwen pads with <|endoftext|>.
        tid = self.token_id("<pad>") if not self.is_sentencepiece else None
        return int(tid) if tid is not None else self.eos_id

    def __repr__(self) -> str:
        kind = "sentencepiece" if self.is_sentencepiece else "tokenizer.json"
        return f"Tokenizer({kind}, {self.path}, vocab_size={self.vocab_size})"


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: str | os.PathLike,
                        model_type: str = "bpe", whole_numbers: int = 0) -> Tokenizer:
    """Train a sentencepiece model with the fixed special ids (see the module docstring) and load it.

    Digits are split one by one (as Qwen's tokenizer does), except that with whole_numbers = N each whole
    number 0..N-1 is one piece: `<107.5 seconds>` is then `<` `107` `.` `5` ` seconds` `>`, so reading a
    time off a timestamp is copying two tokens instead of four digits."""
    import sentencepiece as spm

    out = Path(out)
    if out.suffix != ".model":
        raise ValueError(f"--out {out} must end with .model")
    if vocab_size <= len(SP_FIXED_IDS) + 256:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte fallback needs 256 pieces plus "
                         f"{len(SP_FIXED_IDS)} special ones")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_nonempty_lines(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, unk_id=1, bos_id=-1, eos_id=2, eos_piece=EOS,
        user_defined_symbols=list(VISION_SYMBOLS) + [str(i) for i in range(whole_numbers)],
        # A small demo corpus may not have vocab_size distinct pieces: take what it has.
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0,
        # Encode text as is: the encoder concatenates separately encoded segments (text, timestamps, vision
        # spans), so no implicit leading "▁" per segment; newlines, tabs and runs of spaces survive.
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True,
        # Deterministic output: no sentence sampling, one thread.
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2)
    out.write_bytes(model.getvalue())
    tok = Tokenizer.load(out)
    for piece, want in SP_FIXED_IDS.items():
        if tok.token_id(piece) != want:
            raise RuntimeError(f"trained tokenizer {out} has {piece} at id {tok.token_id(piece)}, want {want}")
    return tok


def _nonempty_lines(texts: Iterable[str]) -> Iterator[str]:
    seen_any = False
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                seen_any = True
                yield line
    if not seen_any:
        raise ValueError("no text to train the tokenizer on")


def texts_from_shards(patterns: Iterable[str]) -> Iterator[str]:
    """Every text a shard holds: `.txt` members and the string fields of `.json` members."""
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or [pat])})
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} does not exist")
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if name.endswith(".txt"):
                    yield data.decode("utf-8", errors="replace")
                elif name.endswith(".json"):
                    try:
                        yield from _json_strings(json.loads(data))
                    except json.JSONDecodeError:
                        continue  # a malformed member is the encoder's to report; the tokenizer skips it


def _json_strings(obj: object) -> Iterator[str]:
    """The free text of a sample's JSON: string values, minus member names and type tags."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _json_strings(item)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("type", "image", "video"):
                yield from _json_strings(v)


def _text_files(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        yield Path(path).read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a sentencepiece model with the fixed special ids")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="tar shards (globs allowed)")
    src.add_argument("--text-files", nargs="+", help="plain UTF-8 text files")
    tr.add_argument("--vocab-size", type=int, default=2048)
    tr.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tr.add_argument("--out", required=True, help="output PATH.model")
    args = parser.parse_args(argv)
    texts = texts_from_shards(args.shards) if args.shards else _text_files(args.text_files)
    try:
        tok = train_sentencepiece(texts, args.vocab_size, args.out, args.model_type)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: vocab_size={tok.vocab_size} eos={tok.eos_id} vision_start={tok.vision_start_id} "
          f"vision_end={tok.vision_end_id} image_pad={tok.image_pad_id} video_pad={tok.video_pad_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
