"""Chat rendering with the assistant mask, parity with transformers' apply_chat_template, and post-training data
loading (messages JSONL, Q/A CSV, preference pairs, the shipped starter set) with counted bad rows."""

from __future__ import annotations

import gzip
import json
import sys
import unicodedata

import pytest

from kfoundry.post.chat_format import render
from kfoundry.post.data import LoadStats, load_chats, load_preferences, starter_path
from kfoundry.text import nfc


@pytest.fixture(scope="module")
def tok():
    from kfoundry.tokenizer import train_tokenizer

    texts = ["대한민국 헌법 제1조 ① 대한민국은 민주공화국이다.", "The quick brown fox jumps over the lazy dog.",
             "2026년 11월 29일, 가격은 12,345원 (3.14%)", "오늘 기분 최고 😀🎉 Let's go!", "안녕하세요! 무엇을 도와드릴까요?", "Hello, how can I help you today?",
                                             "대한민국의 수도는 서울입니다.", "print('Hello') 2 + 3 = 5"]
    return train_tokenizer(texts * 30, 500)


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of True."""
    out, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_single_turn_mask_is_exactly_the_reply(tok, mixed_texts):
    for text in [t for t in mixed_texts if t.strip()]:
        msgs = [{"role": "system", "content": "친절하게 답하세요."}, {"role": "user", "content": text},
                {"role": "assistant", "content": text + " 👍"}]
        ids, mask = render(tok, msgs)
        assert ids == tok.encode_chat(msgs) and len(mask) == len(ids)
        (start, end), = runs(mask)  # one contiguous run
        assert ids[start:end] == tok.encode(nfc(text + " 👍")) + [tok.eot_id]
        assert end == len(ids)  # the reply and its end-of-turn token close the chat
        assert tok.decode(ids[start:end]) == nfc(text) + " 👍<|eot_id|>"


def test_multi_turn_mask_covers_every_reply_and_nothing_else(tok, mixed_texts):
    replies = ["안녕하세요! 😀", "2 + 3 = 5", "\u1112\u1161\u11ab\u1100\u1173\u11af 입니다."]  # the last one is NFD
    msgs = [{"role": "system", "content": "You are helpful."}]
    for question, reply in zip(mixed_texts, replies):
        msgs += [{"role": "user", "content": question or "?"}, {"role": "assistant", "content": reply}]
    msgs.append({"role": "user", "content": "고마워요"})  # a trailing user turn is context only
    ids, mask = render(tok, msgs)
    found = runs(mask)
    assert len(found) == 3
    for (start, end), reply in zip(found, replies):
        assert ids[start:end] == tok.encode(nfc(reply)) + [tok.eot_id]
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "You are helpful." in unmasked and "고마워요" in unmasked and "안녕하세요! 😀" not in unmasked
    assert sum(mask) == sum(len(tok.encode(nfc(r))) + 1 for r in replies)


def test_generation_prompt_and_bad_messages(tok):
    msgs = [{"role": "user", "content": "대한민국의 수도는?"}]
    ids, mask = render(tok, msgs, add_generation_prompt=True)
    assert ids == tok.encode_chat(msgs, add_generation_prompt=True)
    assert not any(mask)
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="role 'tool'"):
        render(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        render(tok, [{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="at least one"):
        render(tok, [])


def test_ids_identical_to_transformers_apply_chat_template(tok, mixed_texts, tmp_path):
    from transformers import AutoTokenizer

    from kfoundry.checkpoint import save_checkpoint
    from kfoundry.config import ModelConfig
    from kfoundry.export.hf import export_hf
    from kfoundry.model.llama import Transformer

    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=64)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer.build(cfg, seed=0), tok)
    hf_tok = AutoTokenizer.from_pretrained(export_hf(ckpt, tmp_path / "hf"), local_files_only=True)
    chats = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}] for t in mixed_texts
    ] + [[{"role": "system", "content": mixed_texts[3]}, {"role": "user", "content": mixed_texts[0]},
          {"role": "assistant", "content": mixed_texts[2]}, {"role": "user", "content": mixed_texts[4]}]]
    for msgs in chats:
        for gen in (False, True):
            ours, _ = render(tok, msgs, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False)
            assert ours == theirs, msgs
            # the text agrees too once the caller's input is NFC (transformers does not normalize the text,
            # its tokenizer.json does, which is why the ids above agree even for the NFD message)
            nfc_msgs = [{**m, "content": nfc(m["content"])} for m in msgs]
            assert hf_tok.apply_chat_template(nfc_msgs, add_generation_prompt=gen, tokenize=False) == \
                tok.render_chat(nfc_msgs, add_generation_prompt=gen)


# ------------------------------------------------------------------------------------------------------ data


def write_lines(path, lines):
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def test_messages_jsonl_counts_every_bad_row(tmp_path, mixed_texts):
    good = {"messages": [{"role": "developer", "content": "짧게 답하세요."},
                         {"role": "user", "content": mixed_texts[4]},  # NFD in, NFC out
                         {"role": "assistant", "content": [{"type": "text", "text": "한글 "},
                                                           {"type": "text", "text": "😀 123"}]}]}
    lines = [json.dumps(good, ensure_ascii=False), "{not json", json.dumps([1, 2]), json.dumps({"messages": []}),
             json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": [{"type": "image_url"}]}]}),
             json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
             ""]
    stats = LoadStats()
    chats = load_chats(write_lines(tmp_path / "c.jsonl", lines), stats)
    assert chats == [[{"role": "system", "content": "짧게 답하세요."},
                      {"role": "user", "content": unicodedata.normalize("NFC", mixed_texts[4])},
                      {"role": "assistant", "content": "한글 😀 123"}]]
    assert stats.kept == 1
    assert dict(stats.bad) == {"invalid_json": 1, "not_an_object": 1, "no_messages": 1, "unsupported_role": 1,
                               "no_assistant_reply": 2, "non_text_content": 1, "bad_message": 1}
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress((tmp_path / "c.jsonl").read_bytes()))
    assert load_chats(gz) == chats
    with pytest.raises(ValueError, match="no usable conversation"):
        load_chats(write_lines(tmp_path / "bad.jsonl", lines[1:]))
    with pytest.raises(FileNotFoundError):
        load_chats(tmp_path / "missing.jsonl")


def test_question_answer_csv(tmp_path, shared_data):
    stats = LoadStats()
    chats = load_chats(shared_data / "ko" / "chatbot" / "ChatbotData.csv", stats)
    assert stats.kept == len(chats) and stats.kept + sum(stats.bad.values()) == 11823
    assert len(chats) > 11_000
    assert chats[0][0]["role"] == "user" and chats[0][1]["role"] == "assistant"
    assert all(unicodedata.is_normalized("NFC", m["content"]) for c in chats[:500] for m in c)

    csv_text = "\ufeffQuestion,Answer,extra\n\u1112\u1161\u11ab\u1100\u1173\u11af?,한글 😀,1\n,빈 질문,2\n질문만,,3\n" \
               "too,many,fields,here\nWhat is 2+3?,5,4\n"
    (tmp_path / "qa.csv").write_text(csv_text, encoding="utf-8")
    stats = LoadStats()
    chats = load_chats(tmp_path / "qa.csv", stats)
    assert [c[0]["content"] for c in chats] == ["한글?", "What is 2+3?"]
    assert dict(stats.bad) == {"empty_field": 2, "malformed_row": 1}
    (tmp_path / "nocols.csv").write_text("text,label\nx,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="columns like Q and A"):
        load_chats(tmp_path / "nocols.csv")


def test_preference_pairs(tmp_path):
    lines = [json.dumps({"prompt": "안녕?", "chosen": "안녕하세요! 😀", "rejected": "No."}, ensure_ascii=False),
             json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}],
                         "chosen": [{"role": "assistant", "content": "5"}], "rejected": "6"}),
             json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}),
             json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
             json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "chosen": "a", "rejected": "b"}),
             json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
             "[]"]
    stats = LoadStats()
    prefs = load_preferences(write_lines(tmp_path / "p.jsonl", lines), stats)
    assert [(p.chosen, p.rejected) for p in prefs] == [("안녕하세요! 😀", "No."), ("5", "6")]
    assert prefs[1].prompt[0] == {"role": "system", "content": "Be brief."}
    assert dict(stats.bad) == {"identical_responses": 1, "empty_prompt": 1, "bad_prompt": 1, "bad_response": 1,
                               "not_an_object": 1}


def test_starter_set_is_clean_bilingual_and_reproducible():
    from kfoundry.post.starter_data import build_starter_chat, build_starter_prefs
    from kfoundry.text import hangul_share

    stats = LoadStats()
    chats = load_chats("starter", stats)
    assert stats.kept == len(chats) >= 300 and not stats.bad
    replies = [m["content"] for c in chats for m in c if m["role"] == "assistant"]
    korean = sum(hangul_share(r) > 0.5 for r in replies)
    assert 0.3 < korean / len(replies) < 0.9  # both languages, in real numbers
    assert sum(len(c) > 3 for c in chats) >= 10  # multi-turn conversations
    assert sum(c[0]["role"] == "system" for c in chats) >= 20
    assert max(len(r) for r in replies) <= 300
    prefs = load_preferences("starter", stats := LoadStats())
    assert len(prefs) >= 100 and not stats.bad

    rebuilt = build_starter_chat()
    assert rebuilt == build_starter_chat()  # deterministic
    shipped = [json.loads(x) for x in starter_path("starter_chat.jsonl").read_text(encoding="utf-8").splitlines()]
    meta = json.loads(starter_path("starter_meta.json").read_text(encoding="utf-8"))
    assert meta["conversations"] == len(shipped) and meta["preference_pairs"] == len(prefs)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if meta["python"] != here:
        pytest.skip(f"the shipped set was generated with Python {meta['python']}, whose pydoc topics differ from {here}")
    assert shipped == rebuilt
    shipped_prefs = starter_path("starter_prefs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in shipped_prefs] == build_starter_prefs(rebuilt)
