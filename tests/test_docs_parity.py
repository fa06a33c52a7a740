"""Bilingual parity of the docs: every page has its English/Korean twin, the two link to each other, and they show
the same code.

Pairs: `X.md` <-> `X.ko.md` in docs/, docs/course/ and the repository root (README). "The same code" means:
- course chapters, the course index, the glossary and the install guide: every fenced block identical, byte for byte
  (the course test runs the English blocks once for both languages, so this equality is what makes that honest);
- the other reference guides: the same command blocks (bash/sh/python/yaml/json/toml) once comments and the text
  inside string literals are set aside, because those guides translate their comments and example sentences
  (a Korean system prompt in a Korean page is right). Flags, paths, option names and the order of commands must
  match; untagged/`text` blocks are diagrams with translated labels and are not compared.
- `benchmarks.ko.md` is a summary of `benchmarks.md` (figures copied with their commands), so it has no block
  equality, but every command it shows must appear in `benchmarks.md`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
COMMAND_LANGS = {"bash", "sh", "python", "yaml", "json", "toml"}
STRICT = {"README.md", "glossary.md", "install.md"}  # in docs/, plus everything in docs/course/
SUMMARY_PAIRS = {"benchmarks.md"}


def english_pages() -> list[Path]:
    pages = [p for p in DOCS.glob("*.md") if not p.name.endswith(".ko.md")]
    pages += [p for p in (DOCS / "course").glob("*.md") if not p.name.endswith(".ko.md")]
    return sorted(pages) + [ROOT / "README.md"]


def korean_of(en: Path) -> Path:
    return en.with_name(en.name[:-3] + ".ko.md")


def fenced(page: Path) -> list[tuple[str, str]]:
    return [(info.strip(), code) for info, code in FENCE.findall(page.read_text(encoding="utf-8"))]


_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')


def skeleton(code: str) -> list[str]:
    """A command block without comments and string contents: what must not differ between languages."""
    lines = []
    for line in code.splitlines():
        line = _STRING.sub('""', line)  # strings first, so a '#' inside a string is not a comment
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if line:
            lines.append(line)
    return lines


def links_to(page: Path, other: Path) -> bool:
    link = r"\]\((\./)?" + re.escape(other.name) + r"(#[^)]*)?\)"  # a markdown link, not a mention in `code`
    return re.search(link, page.read_text(encoding="utf-8")) is not None


PAGES = english_pages()


def test_the_page_list_is_real():
    names = {p.name for p in PAGES}
    assert {"README.md", "install.md", "glossary.md", "pretrain.md", "01-speedrun.md"} <= names


@pytest.mark.parametrize("en", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pair_exists_and_links_both_ways(en):
    ko = korean_of(en)
    assert ko.is_file(), f"{ko.relative_to(ROOT)} missing: every page needs its Korean twin"
    assert links_to(en, ko), f"{en.relative_to(ROOT)} does not link to {ko.name}"
    assert links_to(ko, en), f"{ko.relative_to(ROOT)} does not link to {en.name}"


@pytest.mark.parametrize("en", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pair_shows_the_same_code(en):
    ko = korean_of(en)
    if not ko.is_file():
        pytest.fail(f"{ko.name} missing")
    if en.name in SUMMARY_PAIRS:
        source = en.read_text(encoding="utf-8")
        for info, code in fenced(ko):
            for line in skeleton(code):
                assert line in source, f"{ko.name} shows a command that {en.name} does not have: {line!r}"
        return
    if en.parent.name == "course" or (en.parent == DOCS and en.name in STRICT):
        assert fenced(en) == fenced(ko), f"{en.name} and {ko.name}: code blocks differ"
        return
    a = [skeleton(c) for info, c in fenced(en) if info.split(" ")[0] in COMMAND_LANGS]
    b = [skeleton(c) for info, c in fenced(ko) if info.split(" ")[0] in COMMAND_LANGS]
    assert len(a) == len(b), f"{en.name} has {len(a)} command blocks, {ko.name} {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{en.name} / {ko.name}, command block {i + 1}:\n  en: {x}\n  ko: {y}"


def test_skeleton_ignores_comments_and_strings_but_not_flags():
    en = 'kfoundry chat --model A  # talk to it\nclient = OpenAI(api_key="KEY or anything")\n'
    ko = 'kfoundry chat --model A  # 대화하기\nclient = OpenAI(api_key="키 (없으면 아무 값)")\n'
    assert skeleton(en) == skeleton(ko)
    assert skeleton("kfoundry chat --model A") != skeleton("kfoundry chat --model B")
    assert skeleton('x = "a # not a comment"') == ['x = ""']
