"""Build the starter chat data shipped in kfoundry/post/data/ (a small bilingual instruction set, made offline).

    python -m kfoundry.post.starter_data            # rewrites starter_chat.jsonl and starter_prefs.jsonl

Nothing here is sampled from a model or scraped: every conversation is either written by hand below or generated
by fixed rules from the same public sources as the `starter` corpus, so the set can be rebuilt bit for bit and its
licence is clear (details in kfoundry/post/data/README.md):

- hand-written (ours, Apache-2.0): greetings, who the model is, word translations, small arithmetic, a few
  multi-turn and system-prompted exchanges;
- the Constitution of the Republic of Korea (a public work, Korean Copyright Act art. 7): per article, "which
  chapter is article N in?" and "what does article N say?" (answered with its first sentence), some two-turn
  dialogues that need the first turn to answer the second, and an English question answered with the Korean text;
- the Python reference topics shipped with CPython (PSF License): "briefly explain X" in English and in Korean,
  answered with the first prose sentences of the topic.

Preference pairs (DPO) reuse the single-turn questions: the chosen reply is the right answer, the rejected one is
the answer to a different question of the same kind (a fluent but irrelevant reply), which is what a small model
can learn to tell apart.

Answers are kept short (a sentence or two) so a conversation fits the 256-token context of the cpu-tiny preset.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from pydoc_data.topics import topics

from kfoundry.corpus.starter import constitution_records, part_paths
from kfoundry.fileio import atomic_write_json, atomic_write_text
from kfoundry.post.data import STARTER_CHAT_FILE, STARTER_META_FILE, STARTER_PREFS_FILE, starter_path
from kfoundry.text import nfc

KO_MAX_CHARS = 160  # answer length caps: keeps every conversation well inside a 256-token context
EN_MAX_CHARS = 280

SYSTEM_KO = "당신은 친절하고 간결한 한국어·영어 도우미입니다."
SYSTEM_EN = "You are a concise, helpful assistant. Answer in one or two sentences."

IDENTITY_KO = "저는 kfoundry로 처음부터 학습한 작은 한국어·영어 언어 모델입니다. 대한민국 헌법과 파이썬 문서로 공부했어요."
IDENTITY_EN = ("I am a small Korean-English language model trained from scratch with kfoundry, "
               "on the Korean Constitution and the Python documentation.")

# (question, answer) pairs written for this project.
HANDWRITTEN: list[tuple[str, str]] = [
    ("안녕하세요!", "안녕하세요! 무엇을 도와드릴까요?"),
    ("안녕?", "안녕하세요! 오늘은 어떤 이야기를 나눌까요?"),
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi, who are you?", IDENTITY_EN),
    ("너는 누구야?", IDENTITY_KO),
    ("자기소개를 해 줘.", IDENTITY_KO),
    ("What can you do?", "I can answer short questions about the Korean Constitution and about Python, "
                         "in Korean or in English."),
    ("무엇을 할 수 있어?", "대한민국 헌법과 파이썬에 관한 짧은 질문에 한국어나 영어로 답할 수 있어요."),
    ("고마워!", "천만에요. 또 궁금한 것이 있으면 물어보세요."),
    ("Thank you!", "You're welcome! Ask me anything else."),
    ("잘 가!", "안녕히 가세요. 좋은 하루 보내세요!"),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("대한민국의 수도는 어디야?", "대한민국의 수도는 서울입니다."),
    ("What is the capital of South Korea?", "The capital of South Korea is Seoul."),
    ("한글은 누가 만들었어?", "한글은 조선의 세종대왕이 1443년에 만들고 1446년에 반포했습니다."),
    ("Who created Hangul?", "Hangul was created by King Sejong the Great in 1443 and promulgated in 1446."),
    ("일주일은 며칠이야?", "일주일은 7일입니다."),
    ("How many days are in a week?", "A week has 7 days."),
    ("2 더하기 3은?", "2 더하기 3은 5입니다."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("10 빼기 4는?", "10 빼기 4는 6입니다."),
    ("What is 6 times 7?", "6 × 7 = 42."),
    ("'사과'를 영어로 하면?", "'사과'는 영어로 'apple'입니다."),
    ("How do you say 'water' in Korean?", "'Water' is '물' in Korean."),
    ("'고양이'를 영어로 하면?", "'고양이'는 영어로 'cat'입니다."),
    ("How do you say 'thank you' in Korean?", "'Thank you' is '감사합니다' in Korean."),
    ("'학교'를 영어로 하면?", "'학교'는 영어로 'school'입니다."),
    ("How do you say 'friend' in Korean?", "'Friend' is '친구' in Korean."),
    ("파이썬으로 'Hello'를 출력하려면?", "print('Hello')라고 쓰면 됩니다."),
    ("How do I print 'Hello' in Python?", "Write print('Hello')."),
    ("파이썬에서 리스트의 길이는 어떻게 구해?", "len() 함수를 쓰세요. 예: len([1, 2, 3])은 3입니다."),
    ("How do I get the length of a list in Python?", "Use len(): len([1, 2, 3]) returns 3."),
    ("기분이 좋아 😀", "좋은 일이 있으셨나 봐요! 😀 어떤 일인지 들려주세요."),
    ("I'm happy today 🎉", "That's great to hear! 🎉 What made your day?"),
]

# Multi-turn and system-prompted conversations written for this project.
HANDWRITTEN_DIALOGUES: list[list[dict[str, str]]] = [
    [{"role": "system", "content": SYSTEM_KO},
     {"role": "user", "content": "안녕하세요!"},
     {"role": "assistant", "content": "안녕하세요! 무엇을 도와드릴까요?"},
     {"role": "user", "content": "대한민국의 수도는 어디인가요?"},
     {"role": "assistant", "content": "서울입니다."}],
    [{"role": "system", "content": SYSTEM_EN},
     {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5."},
     {"role": "user", "content": "And times 4?"},
     {"role": "assistant", "content": "5 × 4 = 20."}],
    [{"role": "user", "content": "'사과'를 영어로 하면?"},
     {"role": "assistant", "content": "'사과'는 영어로 'apple'입니다."},
     {"role": "user", "content": "그럼 '고양이'는?"},
     {"role": "assistant", "content": "'고양이'는 영어로 'cat'입니다."}],
    [{"role": "system", "content": "항상 영어로 답하세요."},
     {"role": "user", "content": "대한민국의 수도는 어디야?"},
     {"role": "assistant", "content": "The capital of South Korea is Seoul."}],
    [{"role": "system", "content": "Always answer in Korean."},
     {"role": "user", "content": "How many days are in a week?"},
     {"role": "assistant", "content": "일주일은 7일입니다."}],
    [{"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": IDENTITY_EN},
     {"role": "user", "content": "한국어도 할 수 있어?"},
     {"role": "assistant", "content": "네, 한국어로도 대화할 수 있어요."}],
]

KO_ARTICLE_QUESTIONS = ("대한민국 헌법 제{n}조는 무엇을 정하고 있나요?", "헌법 제{n}조의 내용을 알려 주세요.",
                        "헌법 제{n}조에는 뭐라고 쓰여 있어?")
KO_CHAPTER_QUESTIONS = ("헌법 제{n}조는 어느 장에 있나요?", "제{n}조는 헌법의 몇 장에 속해?")
EN_PY_QUESTIONS = ("Briefly explain {title} in Python.", "What does the Python reference say about {title}?")
KO_PY_QUESTIONS = ("파이썬의 {title}에 대해 간단히 설명해 줘.", "파이썬 문서에서 {title}은(는) 어떻게 설명돼 있어?")


def _clip(text: str, limit: int, sentence_end: re.Pattern) -> str | None:
    """The longest run of whole sentences within `limit` characters (None if even the first is too long)."""
    ends = [m.end() for m in sentence_end.finditer(text)]
    fitting = [e for e in ends if e <= limit]
    return text[: fitting[-1]].strip() if fitting else None


_KO_SENTENCE = re.compile(r"다\.")
_EN_SENTENCE = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(?=\s|$)")


def constitution_articles() -> list[dict]:
    """Articles of the Constitution as {"n", "chapter", "first"}: number, chapter title, first sentence."""
    out = []
    for rec in constitution_records(part_paths()["kolaw"]):
        if "-article-" not in rec.id:
            continue  # the preamble and the addenda are not articles
        chapter, body = rec.text.split("\n", 1)
        m = re.match(r"제(\d+)조\s*(.*)", body, flags=re.S)
        if not m:
            continue
        text = re.sub(r"^[①-⑳]\s*", "", m.group(2).split("\n")[0]).strip()
        first = _clip(text, KO_MAX_CHARS, _KO_SENTENCE)
        if first:
            out.append({"n": int(m.group(1)), "chapter": chapter.strip(), "first": first})
    return out


def python_topics() -> list[dict]:
    """Python reference topics as {"title", "summary"}: the first prose sentences of each (code is skipped)."""
    out, seen = [], set()
    for key in sorted(topics):
        lines = topics[key].split("\n")
        title = lines[0].strip()
        if title in seen:
            continue  # "if" and "else" share one topic
        paragraphs = "\n".join(lines[2:]).split("\n\n")
        prose = next((p for p in paragraphs if p.strip() and not p.startswith(" ") and not p.startswith("*")), None)
        if prose is None:
            continue
        summary = _clip(" ".join(prose.split()), EN_MAX_CHARS, _EN_SENTENCE)
        if summary:
            seen.add(title)
            out.append({"title": title, "summary": summary})
    return out


def _qa(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def build_starter_chat() -> list[dict]:
    """Every starter conversation, in a fixed order, as {"messages": [...], "source": ...} records."""
    records: list[dict] = []
    for q, a in HANDWRITTEN:
        records.append({**_qa(q, a), "source": "handwritten"})
    for messages in HANDWRITTEN_DIALOGUES:
        records.append({"messages": messages, "source": "handwritten"})

    articles = constitution_articles()
    for i, art in enumerate(articles):
        n = art["n"]
        q = KO_ARTICLE_QUESTIONS[i % len(KO_ARTICLE_QUESTIONS)].format(n=n)
        records.append({**_qa(q, f"헌법 제{n}조: {art['first']}", SYSTEM_KO if i % 5 == 0 else None),
                        "source": "constitution"})
        q = KO_CHAPTER_QUESTIONS[i % len(KO_CHAPTER_QUESTIONS)].format(n=n)
        records.append({**_qa(q, f"제{n}조는 {art['chapter']}에 있습니다."), "source": "constitution"})
        if i % 4 == 0:
            records.append({**_qa(f"What does Article {n} of the Korean Constitution say?",
                                  f"Article {n} reads, in Korean: {art['first']}"), "source": "constitution"})
        if i % 6 == 3:  # two turns: the second question only makes sense with the first
            records.append({"messages": [
                {"role": "user", "content": KO_CHAPTER_QUESTIONS[0].format(n=n)},
                {"role": "assistant", "content": f"제{n}조는 {art['chapter']}에 있습니다."},
                {"role": "user", "content": "그 조문의 첫 문장은 무엇인가요?"},
                {"role": "assistant", "content": art["first"]},
            ], "source": "constitution"})

    for i, topic in enumerate(python_topics()):
        title = topic["title"]
        q = EN_PY_QUESTIONS[i % len(EN_PY_QUESTIONS)].format(title=title)
        records.append({**_qa(q, topic["summary"], SYSTEM_EN if i % 5 == 0 else None), "source": "pydoc"})
        q = KO_PY_QUESTIONS[i % len(KO_PY_QUESTIONS)].format(title=title)
        records.append({**_qa(q, f"공식 문서(영어)의 설명입니다: {topic['summary']}"), "source": "pydoc"})
    return [_nfc_record(r) for r in records]


def build_starter_prefs(chat_records: list[dict]) -> list[dict]:
    """Preference pairs: for each single-turn question, the right answer over the answer of another question.

    The rejected answer comes from the record `shift` places further along among records of the same source, so
    it is on-topic in style (same kind of question) but answers the wrong thing.
    """
    single = [r for r in chat_records if len(r["messages"]) == 2]
    prefs = []
    for source in sorted({r["source"] for r in single}):
        group = [r for r in single if r["source"] == source]
        shift = max(1, len(group) // 3)
        for i, r in enumerate(group):
            other = group[(i + shift) % len(group)]
            chosen, rejected = r["messages"][1]["content"], other["messages"][1]["content"]
            if chosen != rejected:
                prefs.append({"prompt": r["messages"][0]["content"], "chosen": chosen, "rejected": rejected,
                              "source": source})
    return prefs


def _nfc_record(r: dict) -> dict:
    return {**r, "messages": [{"role": m["role"], "content": nfc(m["content"])} for m in r["messages"]]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    path.chmod(0o644)  # package data: readable by everyone (the atomic write creates files 0600)


def write_meta(path: Path, chat: list[dict], prefs: list[dict]) -> None:
    """What the set was built from: the Python whose pydoc topics it read, the konlpy version, the counts."""
    atomic_write_json(path, {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "konlpy": version("konlpy"),
        "conversations": len(chat),
        "by_source": dict(sorted(Counter(r["source"] for r in chat).items())),
        "preference_pairs": len(prefs),
        "builder": "python -m kfoundry.post.starter_data",
    })
    path.chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    chat = build_starter_chat()
    prefs = build_starter_prefs(chat)
    write_jsonl(starter_path(STARTER_CHAT_FILE), chat)
    write_jsonl(starter_path(STARTER_PREFS_FILE), prefs)
    write_meta(starter_path(STARTER_META_FILE), chat, prefs)
    print(f"wrote {len(chat)} conversations and {len(prefs)} preference pairs to {starter_path('')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
