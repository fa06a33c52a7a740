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
"""

from __future__ import annotations

import os
import re
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


def blocks(page: Path) -> list[tuple[str, str, str]]:
    """(language, skip reason or '', code) for every runnable fenced block, in page order."""
    out = []
    for lang, info, code in FENCE.findall(page.read_text(encoding="utf-8")):
        if lang not in RUN_LANGS:
            continue
        m = re.search(r"skip=(\w+)", info)
        reason = m.group(1) if m else ""
        assert not reason or reason in SKIP_REASONS, f"{page.name}: unknown skip reason {reason!r}"
        out.append((lang, reason, code))
    return out


def chapter_script(page: Path) -> str:
    # a server a chapter starts in the background never outlives the chapter, even when a command fails
    parts = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for lang, reason, code in blocks(page):
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


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_commands_run(chapter, course_env):
    if course_env["failed"]:
        pytest.fail(f"an earlier chapter failed ({course_env['failed'][0]}); this one reads its outputs")
    script = chapter_script(chapter)
    t = time.perf_counter()
    proc = subprocess.run(["bash", "-c", script], cwd=course_env["dir"], env=course_env["env"], text=True,
                          capture_output=True, timeout=600)
    seconds = time.perf_counter() - t
    print(f"{chapter.stem}: {seconds:.1f} s")
    if proc.returncode != 0:
        course_env["failed"].append(chapter.stem)
        pytest.fail(f"{chapter.name} failed (exit {proc.returncode}) after {seconds:.0f} s\n"
                    f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
