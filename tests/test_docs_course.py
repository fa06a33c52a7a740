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

The guides are independent of one another and of chapters 2-8, and read only the speedrun, so they do not wait in
line: most of their commands keep one core busy (Python imports, a tiny model), and on a 2-core machine the other
core is free. As soon as chapter 1 has made the speedrun they start in two lanes of threads beside the course, each
lane one guide after another. `LEDGER_LANE` holds every guide that appends to the speedrun's ledger (an export, an
evaluation) or verifies it, verification last; chapters from `LEDGER_READERS_FROM` on read that ledger whole (a
model card's lineage, `provenance verify`), so they wait until that lane has finished: nothing reads the ledger's
lines and head while something appends to it. A guide outside `LEDGER_LANE` that appends to it fails and says so;
chapters 2-6 only read the speedrun.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
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
    # One torch thread per process: up to three scripts (the course and two lanes of guides) share the cores, and
    # a small-scale model's two threads would mostly spin waiting for each other (what is shown is not a speed).
    env = {**os.environ, **SMALL, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "KFOUNDRY_SHARED_DATA": str(shared_data), "PORT": str(_free_port()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    return {"dir": work, "env": env, "failed": []}


def _run_script(script: str, cwd: Path, env: dict, name: str) -> tuple[str, str | None]:
    """Run one chapter's or guide's script: (a line with its wall and CPU seconds, None), or (that line, why it
    failed). CPU seconds are the script's own (its rusage), so they stay right when two scripts run at once."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out, tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        timer = threading.Timer(600, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        seconds = time.perf_counter() - t
        line = f"{name}: {seconds:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU"
        if rc == 0:
            return line, None
        out.seek(0)
        err.seek(0)
        return line, (f"{name} failed (exit {rc}) after {seconds:.0f} s\n"
                      f"--- stdout\n{out.read()[-4000:]}\n--- stderr\n{err.read()[-6000:]}")


def _run(script: str, cwd: Path, env: dict, name: str) -> None:
    line, failure = _run_script(script, cwd, env, name)
    print(line)
    if failure:
        pytest.fail(failure)


# a chapter's own script is capped at 600 s; chapter 7 may first wait for the ledger lane of guides beside it
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_commands_run(chapter, course_env, request):
    if course_env["failed"]:
        pytest.fail(f"an earlier chapter failed ({course_env['failed'][0]}); this one reads its outputs")
    course_env["failed"].append(chapter.stem)  # until it has passed
    if chapter.stem >= LEDGER_READERS_FROM and "guides" in course_env:
        course_env["guides"].wait_lane(ledger_lane=True)
    _run(chapter_script(chapter), course_env["dir"], course_env["env"], chapter.name)
    course_env["failed"].remove(chapter.stem)
    if chapter == CHAPTERS[0]:  # the speedrun exists: the guides start beside the course
        runs = _guide_runs(request, course_env)
        runs.start(ledger_lane=False)
        runs.start(ledger_lane=True)


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


# The guides that append to the speedrun's ledger (export, eval, edge, growth) or verify it (provenance), run one
# after another; verification last, after every append.
LEDGER_LANE = ("edge", "eval", "export", "growth", "provenance")
# The first chapter that reads the speedrun's ledger whole (chapter 7's export writes a model card from the lineage,
# chapter 8 verifies it): from here on the course waits for LEDGER_LANE to finish.
LEDGER_READERS_FROM = "07"


class GuideRuns:
    """The selected guides, run in two lanes of threads; `result(stem)` waits for one guide's outcome."""

    def __init__(self, guides: list[Path], course_env: dict):
        self.speedrun = course_env["dir"] / "runs" / "speedrun"
        self.env, self.dir = course_env["env"], course_env["dir"] / "guides"
        self.before, self.ledger = _snapshot(self.speedrun), (self.speedrun / "ledger.jsonl").read_bytes()
        self.done: dict[str, tuple[str, str | None]] = {}
        self.ready = {g.stem: threading.Event() for g in guides}
        self.lanes = {flag: threading.Thread(target=self._lane, daemon=True,
                                             args=([g for g in guides if (g.stem in LEDGER_LANE) == flag],))
                      for flag in (True, False)}

    def start(self, ledger_lane: bool) -> None:
        if self.lanes[ledger_lane].ident is None:  # once
            self.lanes[ledger_lane].start()

    def wait_lane(self, ledger_lane: bool) -> None:
        if self.lanes[ledger_lane].ident is not None:
            self.lanes[ledger_lane].join()

    def join(self) -> None:
        for flag in self.lanes:
            self.wait_lane(flag)

    def _lane(self, lane: list[Path]) -> None:
        for guide in lane:
            try:
                self.done[guide.stem] = self._one(guide)
            except Exception as e:  # a harness error fails that guide's test instead of hanging it
                self.done[guide.stem] = (guide.name, f"{guide.name}: {type(e).__name__}: {e}")
            self.ready[guide.stem].set()

    def _one(self, guide: Path) -> tuple[str, str | None]:
        work = self.dir / guide.stem
        (work / "runs").mkdir(parents=True)
        (work / "runs" / "speedrun").symlink_to(self.speedrun, target_is_directory=True)
        line, failure = _run_script(chapter_script(guide, GUIDE_SKIP_REASONS), work, self.env, guide.name)
        if failure:
            return line, failure
        # checked after each guide against the speedrun as chapter 1 left it: the first guide to finish after a stray
        # write reports it (the writer may be the other lane's guide, or a chapter running beside this lane)
        after = _snapshot(self.speedrun)
        changed = sorted(k for k in self.before.keys() | after.keys() if self.before.get(k) != after.get(k))
        if changed:
            return line, (f"runs/speedrun changed by the time {guide.name} ended ({changed[:5]}); guides and chapters "
                          "2-8 write only their own folders (two lanes of guides run beside the course: the writer may "
                          "be another guide or a chapter)")
        ledger = (self.speedrun / "ledger.jsonl").read_bytes()
        if not ledger.startswith(self.ledger):
            return line, f"the speedrun's ledger was rewritten while {guide.name} ran"
        # an entry appended for this guide's output (an export's `out`, an evaluation's `results_file`) outside the
        # ledger lane could race a `provenance verify` in the other lane
        if guide.stem not in LEDGER_LANE and str(work).encode() in ledger[len(self.ledger):]:
            return line, f"{guide.name} appends to the speedrun's ledger: add {guide.stem!r} to LEDGER_LANE"
        return line, None

    def result(self, stem: str) -> tuple[str, str | None]:
        self.ready[stem].wait()
        return self.done[stem]


def _guide_runs(request, course_env: dict) -> GuideRuns:
    """The session's GuideRuns (made once): every guide this session selected, in its lane, none started yet."""
    if "guides" not in course_env:
        selected = {item.callspec.params["guide"] for item in request.session.items
                    if item.originalname == "test_guide_commands_run" and hasattr(item, "callspec")}
        course_env["guides"] = GuideRuns([g for g in GUIDES if g in selected], course_env)
    return course_env["guides"]


@pytest.fixture(scope="module")
def guide_runs(request, course_env) -> GuideRuns:
    """Both lanes of guides started (after the course, or after chapter 1 when the guides run alone)."""
    speedrun = course_env["dir"] / "runs" / "speedrun"
    if not (speedrun / "report.json").is_file():  # run alone (-k guide): make the speedrun the guides start from
        first = CHAPTERS[0]
        if first.stem in course_env["failed"]:
            pytest.fail(f"{first.name} failed; the guides start from its speedrun")
        course_env["failed"].append(first.stem)
        _run(chapter_script(first), course_env["dir"], course_env["env"], first.name)
        course_env["failed"].remove(first.stem)
    runs = _guide_runs(request, course_env)
    runs.start(ledger_lane=False)
    runs.start(ledger_lane=True)
    yield runs
    runs.join()  # a failed or interrupted session still waits for the lanes (each script is capped at 600 s)


def test_ledger_lane_names_guides_and_a_chapter():
    assert set(LEDGER_LANE) <= {g.stem for g in GUIDES}
    assert any(c.stem.startswith(LEDGER_READERS_FROM) for c in CHAPTERS)


@pytest.mark.parametrize("guide", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_commands_run(guide, guide_runs):
    line, failure = guide_runs.result(guide.stem)
    print(line)
    if failure:
        pytest.fail(failure)
