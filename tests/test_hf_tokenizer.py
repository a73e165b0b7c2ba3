"""The exported Hugging Face tokenizer gives our SentencePiece ids.

Held-out text: the part of the built-in corpus (Python's documentation) the tokenizers did not
train on, over 1 MB, plus strings built to break tokenizers (accents, CJK, emoji with joiners,
tabs, long whitespace runs, NBSP, ligatures, zero-width characters); with and without byte
fallback; through AutoTokenizer and PreTrainedTokenizerFast. Every line's ids are equal, runs of
one repeated character ('-----', several segmentations of exactly equal score) included: the
trained scores lie on a grid where SentencePiece's float32 sums and tokenizers' float64 sums are
both exact (without it, 2 of these 6,550 lines differed)."""

import unicodedata

import pytest

from data_prep.tokenizer import train_tokenizer
from deberta_ds.data.tokenizer import UNK_ID, load_tokenizer
from deberta_ds.hf_tokenizer import write_hf_tokenizer
from tests.data_helpers import corpus_file

HARD = ["Hello world, the assert statement.", "  leading and   multiple   spaces  ", "tab\there\tand\nnewline",
        "Café naïve résumé Ångström façade", "日本語のテキスト 中文 한국어", "emoji 😀🎉 and ZWJ 👩‍👩‍👧",
        "QUEEN ELIZABETH & co. ☃ 𝔘𝔫𝔦", "x" * 300, "mixed\u00a0nbsp\u2003em space", "①②③ ﬁ ligature Ⅻ",
        "\u200bzero\u200dwidth", "\t\t  \n", "a" + " " * 50 + "b", "ÉCOLE ÉTÉ Øre ß ẞ"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = corpus_file(tmp_path_factory.mktemp("corpus"), max_bytes=None).read_text(encoding="utf-8").splitlines()
    cut = next(i for i in range(len(lines)) if sum(len(line) for line in lines[:i]) > 400_000)
    held_out = lines[cut:]
    assert sum(len(line.encode()) for line in held_out) > 1_000_000
    return lines[:cut], held_out


@pytest.fixture(scope="module", params=[True, False], ids=["byte-fallback", "no-byte-fallback"])
def exported(request, corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(iter(corpus[0]), folder / "spm", 2000, sample_sentences=100_000, byte_fallback=request.param)
    write_hf_tokenizer(folder / "spm", folder / "hf")
    return folder / "spm", folder / "hf", request.param


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_ids_equal_sentencepiece_on_held_out_and_hard_text(exported, corpus, loader):
    import transformers

    spm_dir, hf_dir, _ = exported
    processor, meta = load_tokenizer(spm_dir)
    tokenizer = getattr(transformers, loader).from_pretrained(hf_dir)
    texts = corpus[1] + HARD
    expected = [[meta.cls_id, *ids, meta.sep_id] for ids in processor.encode(texts)]
    actual = tokenizer(texts)["input_ids"]
    mismatched = [text[:200] for text, want, got in zip(texts, expected, actual) if want != got]
    assert mismatched == []
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (meta.pad_id, meta.cls_id, meta.sep_id, meta.unk_id, meta.mask_id)
    pair = tokenizer("first part", "second part")["input_ids"]
    assert pair == [1, *processor.encode("first part"), 2, *processor.encode("second part"), 2]
    padded = tokenizer(["short", "a longer text here"], padding=True)
    assert padded["input_ids"][0][-1] == meta.pad_id and padded["attention_mask"][0][-1] == 0
    assert tokenizer("a [MASK] b")["input_ids"][2] == meta.mask_id


def test_byte_fallback_keeps_every_character(exported):
    spm_dir, hf_dir, byte_fallback = exported
    from transformers import AutoTokenizer

    processor, _ = load_tokenizer(spm_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rare = "QUEEN ELIZABETH & co. ☃ 𝔘𝔫𝔦 日本語 😀"
    ids = tokenizer(rare, add_special_tokens=False)["input_ids"]
    if byte_fallback:
        assert UNK_ID not in ids and processor.get_piece_size() > 2000 - 1
        # SentencePiece's nmt_nfkc normalisation maps compatibility characters (the fraktur letters)
        assert tokenizer.decode(ids) == processor.decode(ids) == unicodedata.normalize("NFKC", rare)
    else:  # without it the same characters are lost, as they were before byte fallback
        assert UNK_ID in ids


def test_byte_fallback_tokenizer_has_no_unknown_tokens_on_its_corpus(tmp_path):
    from data_prep.cli import main as cli

    corpus = corpus_file(tmp_path, max_bytes=300_000)
    assert cli(["train-tokenizer", "--input", str(corpus), "--output-dir", str(tmp_path / "tok"), "--vocab-size",
                "1000", "--character-coverage", "0.99"]) == 0
    assert cli(["tokenize", "--input", str(corpus), "--output-prefix", str(tmp_path / "s"), "--tokenizer",
                str(tmp_path / "tok"), "--no-progress"]) == 0
    import json
    stats = json.loads((tmp_path / "s.manifest.json").read_text())["final_stats"]
    assert stats["unknown_tokens"] == 0 and stats["tokens"] > 50_000
