"""Every command of the course (docs/course/NN-*.md and .ko.md) runs, in order, the way a learner would type it.

Each chapter's ```bash and ```python blocks are extracted in order from the English page and from the Korean page;
the two sequences must be identical (a flag fixed in one language only fails here), so running the shared sequence
once covers both languages. A chapter becomes one bash script (`set -euo pipefail`; a python block becomes
`python - <<'EOF' ... EOF`) run in one temporary directory shared by all chapters, so the run folder that chapter 1's
speedrun makes (`runs/speedrun`) is the one the later chapters read, exactly as in the course.

Small scale: the chapters read four knobs with defaults for a learner (`PRESET=${PRESET:-cpu-tiny}`,
`STEPS=${STEPS:-40}`, `LIMIT=${LIMIT:-100}`, `STUDENT=${STUDENT:-nano}`); this test sets PRESET=test-micro, STEPS=3,
LIMIT=4, STUDENT=test-micro, the small-scale settings that chapter 1 and docs/README.md document. A block whose
info string carries `skip=gpu` or `skip=network` needs what CI does not have; it is listed in the chapter as such
and never run here (the test checks that the reason is one of those).

The reference guides (docs/*.md and their .ko.md twins, outside the course) run too, after the course, each in a
fresh folder of its own that holds only `runs/speedrun` (a link to the course's speedrun run), at the same small
scale: a guide's commands start from the speedrun or from what the guide itself creates, and never write into
`runs/speedrun` (checked). A guide's Korean page must run the same commands as its English page once comments
are set aside (the comments are translated; strings, flags and paths are not), so the English blocks run once for
both. Guides have four more skip reasons than chapters, for blocks that are not commands one can run here:
`synopsis` (a usage line with placeholders such as `--corpus SPEC [--workers N]`, or alternative invocations of a
command that runs until Ctrl-C), `cluster` (needs a Slurm or Ray cluster or several machines), `bench` (a
measurement that takes minutes; its figure and command are in docs/benchmarks.md) and `server` (a client of a
server started by hand; chapter 7 of the course starts one and queries it in CI).
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "docs" / "course"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
RUN_LANGS = {"bash", "python"}
SKIP_REASONS = {"gpu", "network"}
CHAPTERS = sorted(p for p in COURSE.glob("[0-9][0-9]-*.md") if not p.name.endswith(".ko.md"))
SMALL = {"PRESET": "test-micro", "STEPS": "3", "LIMIT": "4", "STUDENT": "test-micro"}
DOCS = ROOT / "docs"
NOT_GUIDES = {"README.md", "glossary.md", "benchmarks.md"}  # the index, a word list, measured figures
GUIDES = sorted(p for p in DOCS.glob("*.md") if not p.name.endswith(".ko.md") and p.name not in NOT_GUIDES)
GUIDE_SKIP_REASONS = SKIP_REASONS | {"synopsis", "cluster", "bench", "server"}


def blocks(page: Path, reasons: set[str] = SKIP_REASONS) -> list[tuple[str, str, str]]:
    """(language, skip reason or '', code) for every runnable fenced block, in page order."""
    out = []
    for lang, info, code in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang not in RUN_LANGS:
            continue
        m = re.search(r"skip=(\w+)", info)
        reason = m.group(1) if m else ""
        assert not reason or reason in reasons, f"{page.name}: unknown skip reason {reason!r}"
        out.append((lang, reason, code))
    return out


_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')


def without_comments(code: str) -> list[str]:
    """A bash or Python block's lines without their comments (the part a translation may change); strings stay."""
    lines = []
    for line in code.splitlines():
        masked = _STRING.sub(lambda m: "x" * len(m.group()), line)  # a '#' inside a string is not a comment
        cut = re.search(r"(^|\s)#", masked)
        line = (line[:cut.start()] if cut else line).rstrip()
        if line:
            lines.append(line)
    return lines


def chapter_script(page: Path, reasons: set[str] = SKIP_REASONS) -> str:
    # a server a chapter starts in the background never outlives the chapter, even when a command fails
    parts = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for lang, reason, code in blocks(page, reasons):
        if reason:
            continue
        if lang == "bash":
            parts.append(code)
        else:
            assert "PYEOF" not in code
            parts.append(f"python - <<'PYEOF'\n{code}PYEOF")
    return "\n".join(parts) + "\n"


def test_there_is_a_course_and_each_chapter_has_its_korean_twin():
    assert len(CHAPTERS) >= 8
    for en in CHAPTERS:
        ko = en.with_name(en.name[:-3] + ".ko.md")
        assert ko.is_file(), f"{ko.name} missing"
        assert blocks(en) == blocks(ko), f"{en.name} and {ko.name} run different commands"
        assert any(reason == "" for _, reason, _ in blocks(en)), f"{en.name} runs nothing"


def test_the_block_parser_sees_what_a_reader_sees():
    page = "text\n```bash\necho hi\n```\n```bash skip=gpu\nnvidia-smi\n```\n```python\nprint(1)\n```\n```text\nx\n```\n"
    tmp = COURSE.parent / ".parser-probe.md"
    try:
        tmp.write_text(page, encoding="utf-8")
        assert blocks(tmp) == [("bash", "", "echo hi\n"), ("bash", "gpu", "nvidia-smi\n"), ("python", "", "print(1)\n")]
        assert chapter_script(tmp).endswith(" EXIT\necho hi\n\npython - <<'PYEOF'\nprint(1)\nPYEOF\n")
    finally:
        tmp.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def course_env(tmp_path_factory, shared_data):
    work = tmp_path_factory.mktemp("course")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    # `kfoundry` and `python` as a learner's activated venv has them, running this checkout's code
    (bin_dir / "kfoundry").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kfoundry "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, **SMALL, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "KFOUNDRY_SHARED_DATA": str(shared_data), "PORT": str(_free_port()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return {"dir": work, "env": env, "failed": []}


def _run(script: str, cwd: Path, env: dict, name: str) -> subprocess.CompletedProcess:
    t, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, text=True, capture_output=True, timeout=600)
    seconds, now = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)  # what a busy machine does not inflate
    print(f"{name}: {seconds:.1f} s wall, {cpu:.1f} s CPU")
    if proc.returncode != 0:
        pytest.fail(f"{name} failed (exit {proc.returncode}) after {seconds:.0f} s\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_commands_run(chapter, course_env):
    if course_env["failed"]:
        pytest.fail(f"an earlier chapter failed ({course_env['failed'][0]}); this one reads its outputs")
    course_env["failed"].append(chapter.stem)  # until it has passed
    _run(chapter_script(chapter), course_env["dir"], course_env["env"], chapter.name)
    course_env["failed"].remove(chapter.stem)


def test_the_comment_stripper_keeps_strings_and_flags():
    en = 'kfoundry chat --model A  # talk to it\nprint("# not a comment")  # a comment\n# only a comment\n'
    ko = 'kfoundry chat --model A  # 대화하기\nprint("# not a comment")  # 주석\n'
    assert without_comments(en) == without_comments(ko) == ["kfoundry chat --model A", 'print("# not a comment")']
    assert without_comments('print("안녕")') != without_comments('print("hello")')


def test_every_guide_has_a_korean_twin_that_runs_the_same_commands():
    assert {"pretrain.md", "curation.md", "shards.md", "provenance.md"} <= {p.name for p in GUIDES}
    for en in GUIDES:
        ko = en.with_name(en.name[:-3] + ".ko.md")
        # a block that is never run may translate its strings too (test_docs_parity compares the rest of it)
        a = [(lang, reason, reason or without_comments(code)) for lang, reason, code in blocks(en, GUIDE_SKIP_REASONS)]
        b = [(lang, reason, reason or without_comments(code)) for lang, reason, code in blocks(ko, GUIDE_SKIP_REASONS)]
        assert a == b, f"{en.name} and {ko.name} run different commands"


LEDGER = {"ledger.jsonl", "ledger.head.json"}  # an export of a run's checkpoint is appended to the run's ledger


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file of a run folder but its ledger, with size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name not in LEDGER}


@pytest.mark.parametrize("guide", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_commands_run(guide, course_env):
    speedrun = course_env["dir"] / "runs" / "speedrun"
    if not (speedrun / "report.json").is_file():  # run alone (-k guide): make the speedrun the guides start from
        first = CHAPTERS[0]
        if first.stem in course_env["failed"]:
            pytest.fail(f"{first.name} failed; the guides start from its speedrun")
        course_env["failed"].append(first.stem)
        _run(chapter_script(first), course_env["dir"], course_env["env"], first.name)
        course_env["failed"].remove(first.stem)
    script = chapter_script(guide, GUIDE_SKIP_REASONS)
    work = course_env["dir"] / "guides" / guide.stem
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "speedrun").symlink_to(speedrun, target_is_directory=True)
    before, ledger = _snapshot(speedrun), (speedrun / "ledger.jsonl").read_bytes()
    _run(script, work, course_env["env"], guide.name)
    changed = sorted(k for k in before.keys() | _snapshot(speedrun).keys() if before.get(k) != _snapshot(speedrun).get(k))
    assert not changed, f"{guide.name} wrote into runs/speedrun ({changed[:5]}); a guide writes only its own folders"
    assert (speedrun / "ledger.jsonl").read_bytes().startswith(ledger), "the speedrun's ledger was rewritten"
