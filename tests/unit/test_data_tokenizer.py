"""data.tokenizer: fixed special ids, round trips, tokenizer.json loading, the train CLI on shards."""
from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from data.tokenizer import SPECIAL_TOKENS, Tokenizer, main, train_sentencepiece

WORDS = "the red blue green square circle triangle is on left right of a big small".split()


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n)]


def test_sentencepiece_fixed_ids_and_round_trip(tmp_path):
    tok = train_sentencepiece(_corpus(), 2048, tmp_path / "t.model")
    assert (tok.pad_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id, tok.image_pad_id,
            tok.video_pad_id) == (0, 1 + 1, 3, 4, 5, 6)
    # A small corpus cannot fill 2048 pieces; hard_vocab_limit=False keeps what it has.
    assert 7 + 256 < tok.vocab_size <= 2048
    # Byte fallback: text never seen in training still round-trips.
    text = "the red square, 日本語 ü 123!\n\tindented  two spaces "
    assert tok.decode(tok.encode(text)) == text
    # No implicit leading "▁" per call: segments encoded apart concatenate to the whole.
    assert tok.encode("<|vision_start|><|image_pad|><|vision_end|>") == [3, 5, 4]
    reloaded = Tokenizer.load(tmp_path / "t.model")
    assert reloaded.encode(text) == tok.encode(text)


def test_digits_are_split_unless_whole_numbers_are_pieces(tmp_path):
    texts = _corpus() + [f"<{t / 10:.1f} seconds>" for t in range(0, 3000, 7)]
    split = train_sentencepiece(texts, 2048, tmp_path / "split.model")
    whole = train_sentencepiece(texts, 2048, tmp_path / "whole.model", whole_numbers=300)

    def pieces(tok: Tokenizer, text: str) -> list[str]:
        return [tok.decode([i]) for i in tok.encode(text)]

    assert pieces(split, "<107.5 seconds>") == ["<", "1", "0", "7", ".", "5", " seconds", ">"]
    assert pieces(whole, "<107.5 seconds>") == ["<", "107", ".", "5", " seconds", ">"]
    assert pieces(whole, "<0.5 seconds>")[:2] == ["<", "0"]
    assert pieces(whole, "2999") == ["299", "9"]  # longest whole-number piece first, then the rest
    for tok in (split, whole):
        assert tok.decode(tok.encode("<250.1 seconds> 12345")) == "<250.1 seconds> 12345"


def test_sentencepiece_training_is_deterministic(tmp_path):
    train_sentencepiece(_corpus(), 2048, tmp_path / "a.model")
    train_sentencepiece(_corpus(), 2048, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


def _tiny_hf_tokenizer(path, specials=SPECIAL_TOKENS) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_corpus(), trainer)
    hf.save(str(path))


def test_tokenizer_json_specials_by_name(tmp_path):
    path = tmp_path / "tokenizer.json"
    _tiny_hf_tokenizer(path, specials=["<|vision_end|>", "<|endoftext|>", "<|video_pad|>", "<|image_pad|>",
                                       "<|vision_start|>"])
    tok = Tokenizer.load(path)
    assert not tok.is_sentencepiece
    # Ids come from the file (here a shuffled order), not from the sentencepiece convention.
    assert (tok.vision_end_id, tok.eos_id, tok.video_pad_id, tok.image_pad_id, tok.vision_start_id) == (
        0, 1, 2, 3, 4)
    assert tok.pad_id == tok.eos_id  # no <pad> token: Qwen pads with <|endoftext|>
    text = "the big circle is left of a square"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("a<|image_pad|>b")
    assert ids.count(tok.image_pad_id) == 1
    assert tok.vocab_size == 300


def test_tokenizer_json_missing_special_names_it(tmp_path):
    path = tmp_path / "tokenizer.json"
    _tiny_hf_tokenizer(path, specials=["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    with pytest.raises(ValueError, match=r"no special token <\|video_pad\|>"):
        Tokenizer.load(path)


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match="x.model"):
        Tokenizer.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")


def test_cli_trains_from_shards(tmp_path, capsys):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(_corpus(200)):
            member = f"{i:06d}.txt" if i % 2 else f"{i:06d}.json"
            data = text.encode() if i % 2 else json.dumps({"type": "caption", "caption": text}).encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "tok.model"
    assert main(["train", "--shards", str(tmp_path / "*.tar"), "--vocab-size", "1024", "--out", str(out)]) == 0
    assert "image_pad=5" in capsys.readouterr().out
    tok = Tokenizer.load(out)
    # The corpus words were learned as whole pieces: one token each.
    assert len(tok.encode("triangle")) == 1
    # "caption"/"type" keys are structure, not text: they are not in the training corpus.
    assert len(tok.encode("caption")) > 1


def test_cli_errors_are_one_line(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello world\n")
    assert main(["train", "--text-files", str(text), "--vocab-size", "100", "--out", str(tmp_path / "t.model")]) == 2
    assert capsys.readouterr().err == ("error: --vocab-size 100 is too small: byte fallback needs 256 pieces "
                                       "plus 7 special ones\n")
    assert main(["train", "--text-files", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.model")]) == 2
    assert "none.txt" in capsys.readouterr().err
