"""Tokenizer: exact round trips on mixed Korean/English/digit/emoji/NFD text, the pipeline llama.cpp needs,
bounded training, saving and loading, the chat template (checked against transformers), stats, and the CLI."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import transformers

from kfoundry.cli import main
from kfoundry.fileio import sha256_file
from kfoundry.text import nfc
from kfoundry.tokenizer import SPECIAL_TOKENS, KTokenizer, format_stats, tokenizer_stats, train_tokenizer
from kfoundry.tokenizer.pipeline import LLAMA3_SPLIT_PATTERN, byte_decoder
from kfoundry.tokenizer.stats import ksx1001_hangul
from kfoundry.tokenizer.train import BATCH_DOCS

# A small parallel corpus: enough repeated words that BPE learns whole Korean and English words.
KO_SENTENCES = [
    "대한민국은 민주공화국이다.",
    "오늘 날씨가 정말 좋아서 한강에서 산책을 했다.",
    "한국어 토크나이저는 한글 음절을 하나의 토큰으로 묶어야 효율적이다.",
    "서울의 인구는 약 9,400,000명이며 2024년에 조사되었다.",
    "이 영화 정말 재미있었어요 😀 강력 추천합니다!",
    "학생들은 도서관에서 시험 공부를 열심히 하고 있다.",
]
EN_SENTENCES = [
    "The Republic of Korea is a democratic republic.",
    "The weather was so nice today that I took a walk along the Han River.",
    "A Korean tokenizer should merge Hangul syllables into single tokens to be efficient.",
    "Seoul has a population of about 9,400,000 people, surveyed in 2024.",
    "This movie was really fun 😀 highly recommended!",
    "The students are studying hard for the exam in the library.",
]


def corpus(repeats: int = 40) -> list[str]:
    # Vary the digits so numbers are not all the same pre-token.
    out = []
    for r in range(repeats):
        for ko, en in zip(KO_SENTENCES, EN_SENTENCES):
            out += [f"{ko} ({r})", f"{en} [{r * 7}]"]
    return out


@pytest.fixture(scope="module")
def tok() -> KTokenizer:
    return train_tokenizer(corpus(), vocab_size=800)


@pytest.fixture(scope="module")
def saved(tok: KTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save(d)
    return d


# ------------------------------------------------------------------------------------------ round trip

EXTRA_TEXTS = [
    "👨‍👩‍👧‍👦 가족 🇰🇷 flags and ZWJ emoji",
    "漢字 العربية ελληνικά — never seen in training",
    "tabs\tand\r\nnewlines\n\n  leading and trailing spaces  ",
    "ㅋㅋㅋ ㅠㅠ compatibility jamo",
    "1234567890 3.14159 -42 1e-9",
    "\x00\x01 control bytes \x7f",
    "<|eot_id|> written literally",
]


def test_round_trip_is_exact(tok: KTokenizer, mixed_texts: list[str]) -> None:
    for text in mixed_texts + EXTRA_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == nfc(text), text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_nfd_input_gives_the_nfc_ids(tok: KTokenizer, mixed_texts: list[str]) -> None:
    nfd_text = mixed_texts[4]
    assert nfd_text != nfc(nfd_text)  # the fixture really is decomposed
    assert tok.encode(nfd_text) == tok.encode(nfc(nfd_text))
    for text in mixed_texts:
        assert tok.encode(unicodedata.normalize("NFD", text)) == tok.encode(text)
    # The NFC normalizer inside tokenizer.json does the same for tools that bypass KTokenizer.encode.
    assert tok.hf.encode(nfd_text, add_special_tokens=False).ids == tok.encode(nfd_text)


def test_bos_eos_and_batch(tok: KTokenizer, mixed_texts: list[str]) -> None:
    for text in mixed_texts:
        plain = tok.encode(text)
        assert tok.encode(text, bos=True) == [tok.bos_id, *plain]
        assert tok.encode(text, eos=True) == [*plain, tok.eos_id]
        assert tok.decode(tok.encode(text, bos=True, eos=True), skip_special=True) == nfc(text)
    assert tok.encode_batch(mixed_texts, bos=True) == [tok.encode(t, bos=True) for t in mixed_texts]
    with pytest.raises(TypeError):
        tok.encode_batch(["ok", 3])  # type: ignore[list-item]


def test_special_tokens(tok: KTokenizer) -> None:
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    ids = [tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id]
    assert len(set(ids)) == 4
    assert tok.special_tokens["<|begin_of_text|>"] == tok.bos_id
    assert tok.special_tokens["<|eot_id|>"] == tok.eot_id
    # A special token written in the text is that token (what makes a rendered chat template work).
    assert tok.encode("<|eot_id|>") == [tok.eot_id]
    assert tok.decode([tok.pad_id, *tok.encode("안녕 hi"), tok.eot_id], skip_special=True) == "안녕 hi"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_token_bytes_account_for_every_byte(tok: KTokenizer, mixed_texts: list[str]) -> None:
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size
    assert all(tb[i] == 0 for i in tok.special_tokens.values())
    assert all(b >= 1 for i, b in enumerate(tb) if i not in tok.special_tokens.values())
    for text in mixed_texts + EXTRA_TEXTS[:-1]:
        assert sum(tb[i] for i in tok.encode(text, bos=True, eos=True)) == len(nfc(text).encode("utf-8")), text
    # A special token written in the text is a control token: it stands for no text bytes.
    literal = EXTRA_TEXTS[-1]
    assert sum(tb[i] for i in tok.encode(literal)) == len(literal.encode("utf-8")) - len("<|eot_id|>")


def test_all_256_bytes_are_tokens(tok: KTokenizer) -> None:
    vocab = tok.hf.get_vocab()
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert all(ch in vocab for ch in table)


def test_pipeline_matches_llama3_for_llama_cpp(tok: KTokenizer) -> None:
    spec = json.loads(tok.hf.to_str())
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": LLAMA3_SPLIT_PATTERN}
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level["type"] == "ByteLevel"
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert spec["model"]["type"] == "BPE" and spec["model"]["ignore_merges"] is True
    assert spec["decoder"]["type"] == "ByteLevel"
    # The Llama-3 split keeps punctuation off words and digits in groups of at most three.
    pieces = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("1234567 won't")]
    assert pieces == ["123", "456", "7", "Ġwon", "'t"]


def test_training_learns_frequent_words(tok: KTokenizer) -> None:
    # ignore_merges + enough repetitions: frequent words become one token each.
    assert len(tok.encode("대한민국은")) == 1
    assert len(tok.encode(" Republic")) == 1
    info = tok.training
    assert info is not None and info["docs_read"] == len(corpus())
    # The corpus runs out of pairs before 800: the vocabulary is what it supports, and says so.
    assert info["vocab_size_requested"] == 800 and info["vocab_size"] == tok.vocab_size < 800


def test_training_is_deterministic(tok: KTokenizer) -> None:
    assert train_tokenizer(corpus(), vocab_size=800).hash == tok.hash


# ------------------------------------------------------------------------------------- bounded training


def test_max_chars_per_doc_cuts_documents() -> None:
    # A word that only appears after the cut must not be learned.
    texts = ["짧은 문장 short text " * 3 + "초장문전용단어 " * 50] * 20
    cut = len("짧은 문장 short text " * 3)
    tok = train_tokenizer(texts, vocab_size=400, max_chars_per_doc=cut)
    assert tok.training["docs_truncated"] == 20
    assert tok.training["chars_used"] == 20 * cut
    assert len(tok.encode("초장문전용단어")) > 3
    full = train_tokenizer(texts, vocab_size=400)
    assert len(full.encode(" 초장문전용단어")) == 1


def test_max_total_chars_stops_reading_the_stream() -> None:
    pulled = 0

    def stream():
        nonlocal pulled
        for i in range(10 * BATCH_DOCS):
            pulled += 1
            yield f"문서 {i} document text"

    tok = train_tokenizer(stream(), vocab_size=300, max_total_chars=1000)
    info = tok.training
    assert info["chars_used"] == 1000 and info["stopped_at_max_total_chars"] is True
    assert pulled == info["docs_read"] < 100  # lazily read and abandoned, not drained


def test_training_input_errors(mixed_texts: list[str]) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(mixed_texts, vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(TypeError, match="str"):
        train_tokenizer(["ok", b"bytes"], vocab_size=300)  # type: ignore[list-item]
    empty_counted = train_tokenizer(mixed_texts, vocab_size=300)
    assert empty_counted.training["docs_empty"] == 1  # the fixture's "" is counted, not silently lost


# ------------------------------------------------------------------------------------------- save/load


def test_save_and_load(tok: KTokenizer, saved: Path, mixed_texts: list[str]) -> None:
    names = {p.name for p in saved.iterdir()}
    assert {"tokenizer.json", "tokenizer_meta.json", "chat_template.jinja", "tokenizer_config.json"} <= names
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".tmp-")]
    meta = json.loads((saved / "tokenizer_meta.json").read_text(encoding="utf-8"))
    assert meta["tokenizer_json_sha256"] == tok.hash == sha256_file(saved / "tokenizer.json")
    assert meta["bos_id"] == tok.bos_id and meta["eot_id"] == tok.eot_id
    assert meta["training"]["docs_read"] == len(corpus())
    loaded = KTokenizer.load(saved)
    assert loaded.hash == tok.hash and loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens and loaded.chat_template == tok.chat_template
    assert loaded.token_bytes() == tok.token_bytes()
    assert loaded.encode_batch(mixed_texts) == tok.encode_batch(mixed_texts)
    # Saving again replaces the old tokenizer directory and keeps the same hash.
    loaded.save(saved)
    assert KTokenizer.load(saved).hash == tok.hash


def test_load_rejects_a_modified_tokenizer_json(tok: KTokenizer, tmp_path: Path) -> None:
    d = tmp_path / "tok"
    tok.save(d)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["ignore_merges"] = False
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="changed after it was saved"):
        KTokenizer.load(d)
    with pytest.raises(FileNotFoundError):
        KTokenizer.load(tmp_path / "missing")


def test_save_refuses_to_replace_other_directories(tok: KTokenizer, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="refusing"):
        tok.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "keep me"


# ----------------------------------------------------------------------------------------------- chat

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. 친절하게 답하세요."},
    {"role": "user", "content": "  서울의 인구는? 😀  "},
    {"role": "assistant", "content": "약 940만 명입니다."},
]


def test_chat_template_layout(tok: KTokenizer) -> None:
    text = tok.render_chat(MESSAGES[:2], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. 친절하게 답하세요.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n서울의 인구는? 😀<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not tok.render_chat(MESSAGES).endswith("<|end_header_id|>\n\n")
    ids = tok.encode_chat(MESSAGES)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id and ids.count(tok.eot_id) == 3
    with pytest.raises(ValueError, match="message 0"):
        tok.render_chat([{"role": "user"}])


def test_transformers_loads_the_directory_and_agrees(tok: KTokenizer, saved: Path, mixed_texts: list[str]) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in mixed_texts:
        assert hf(nfc(text), add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf(nfc(text))["input_ids"] == tok.encode(text, bos=True)  # Llama-3 habit: BOS by default
        assert hf.decode(tok.encode(text)) == nfc(text)
    for gen in (False, True):
        assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == \
            tok.render_chat(MESSAGES, add_generation_prompt=gen)
        ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert list(ids) == tok.encode_chat(MESSAGES, add_generation_prompt=gen)


# ---------------------------------------------------------------------------------------------- stats


def test_ksx1001_syllables() -> None:
    syl = ksx1001_hangul()
    assert len(syl) == len(set(syl)) == 2350
    assert syl[0] == "가" and syl[-1] == "힝" and "한" in syl
    assert "똠" not in syl  # the classic syllable missing from KS X 1001


def test_stats_figures_are_consistent(tok: KTokenizer) -> None:
    s = tokenizer_stats(tok, {"ko": KO_SENTENCES, "en": EN_SENTENCES}, parallel=(KO_SENTENCES, EN_SENTENCES))
    ko, en = s["languages"]["ko"], s["languages"]["en"]
    assert ko["tokens"] == sum(len(tok.encode(t)) for t in KO_SENTENCES)
    assert ko["chars"] == sum(len(t) for t in KO_SENTENCES)
    assert ko["words"] == sum(len(t.split()) for t in KO_SENTENCES)
    assert ko["tokens_per_char"] == pytest.approx(ko["tokens"] / ko["chars"])
    assert ko["chars_per_token"] == pytest.approx(1 / ko["tokens_per_char"])
    assert en["tokens_per_word"] == pytest.approx(en["tokens"] / en["words"])
    assert s["parallel"]["ko_en_token_ratio"] == pytest.approx(ko["tokens"] / en["tokens"])
    syllables = {c for t in KO_SENTENCES for c in t if "가" <= c <= "힣"}
    assert ko["hangul_syllables_distinct"] == len(syllables)
    single = [c for c in syllables if len(tok.encode(c)) == 1]
    assert single and ko["hangul_single_token_share"] == pytest.approx(len(single) / len(syllables))
    assert en["hangul_single_token_share"] is None and en["hangul_syllables_distinct"] == 0
    # Syllables of the training text are covered far better than the 2,350 common ones in general.
    assert s["ksx1001_syllables"] == 2350
    assert 0 < s["ksx1001_single_token_share"] < 0.1 < ko["hangul_single_token_share"]
    table = format_stats(s)
    assert "ko" in table and "Korean/English token ratio" in table and "KS X 1001" in table
    with pytest.raises(ValueError, match="align"):
        tokenizer_stats(tok, {"ko": KO_SENTENCES}, parallel=(KO_SENTENCES, EN_SENTENCES[:2]))


def test_stats_on_flores_dev(tok: KTokenizer, shared_data: Path) -> None:
    flores = shared_data / "flores200" / "dev"
    ko = (flores / "kor_Hang.dev").read_text(encoding="utf-8").splitlines()
    en = (flores / "eng_Latn.dev").read_text(encoding="utf-8").splitlines()
    s = tokenizer_stats(tok, {"ko": ko, "en": en}, parallel=(ko, en))
    assert s["parallel"]["pairs"] == 997
    # A sub-1,000-token vocabulary is close to bytes: Korean (3 bytes/syllable) costs more than one token a character.
    assert s["languages"]["ko"]["tokens_per_char"] > 1.0 > s["languages"]["en"]["tokens_per_char"]


# ------------------------------------------------------------------------------------------------ CLI


def write_flores(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kor_Hang.dev").write_text("\n".join(KO_SENTENCES) + "\n", encoding="utf-8")
    (folder / "eng_Latn.dev").write_text("\n".join(EN_SENTENCES) + "\n", encoding="utf-8")
    return folder


def test_cli_stats_json_and_table(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  mixed_texts: list[str]) -> None:
    flores = write_flores(tmp_path / "flores")
    assert main(["tokenizer", "stats", "--tokenizer", str(saved), "--text", str(flores), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["languages"]) == {"ko", "en"} and out["parallel"]["pairs"] == len(KO_SENTENCES)

    plain = tmp_path / "mixed.txt"
    plain.write_text("\n".join(mixed_texts), encoding="utf-8")
    assert main(["tokenizer", "stats", "--tokenizer", str(saved), "--text", str(plain)]) == 0
    table = capsys.readouterr().out
    assert "tok/char" in table and "ko " in table and "parallel" not in table

    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "nope"), "--text", str(plain)]) == 2
    assert "tokenizer directory not found" in capsys.readouterr().err
    assert main(["tokenizer", "stats", "--tokenizer", str(saved), "--text", str(tmp_path)]) == 2
    assert "FLORES" in capsys.readouterr().err


def test_cli_train(tmp_path: Path, mixed_texts: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for text in corpus(10) + mixed_texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--corpus", str(docs), "--vocab-size", "500", "--out", str(out),
               "--max-chars-per-doc", "40", "--max-total-chars", "100000"])
    assert rc == 0, capsys.readouterr().err
    tok = KTokenizer.load(out)
    assert tok.vocab_size <= 500
    config = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    assert config["vocab_size"] == 500 and config["corpus"] == str(docs) and config["max_chars_per_doc"] == 40
    corpus_stats = json.loads((out / "corpus_stats.json").read_text(encoding="utf-8"))
    assert corpus_stats["read"] == len(corpus(10)) + len(mixed_texts)
    assert corpus_stats["dropped"] == {"empty": 1}  # the empty fixture text, counted by the corpus reader
    assert tok.training["docs_used"] == corpus_stats["yielded"]
    for text in mixed_texts:
        assert tok.decode(tok.encode(text)) == nfc(text)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x", encoding="utf-8")
    rc = main(["tokenizer", "train", "--corpus", str(docs), "--vocab-size", "500", "--out", str(tmp_path / "other")])
    assert rc == 2 and "refusing" in capsys.readouterr().err
    rc = main(["tokenizer", "train", "--corpus", str(tmp_path / "missing.jsonl"), "--vocab-size", "500",
               "--out", str(tmp_path / "t2")])
    assert rc == 2 and not (tmp_path / "t2").exists()
