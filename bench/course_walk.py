"""Walk the whole course (docs/course/NN-*.md) at the learning scale and time each chapter.

    python bench/course_walk.py WORKDIR [--json OUT]

Each chapter's commands are extracted exactly as the CI course test does (tests/test_docs_course.py:
`chapter_script`), but run with the chapters' own defaults (PRESET=cpu-tiny, STEPS=40, LIMIT=100, STUDENT=nano:
nothing overridden), in order, in WORKDIR, as a learner types them. Prints one JSON line per chapter (wall seconds,
CPU seconds of the chapter's processes, load average at start and end) and the totals; stops at the first chapter
that fails (its output is in WORKDIR/NN-name.out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_docs_course import CHAPTERS, chapter_script  # noqa: E402  (the CI test's own extraction)

KNOBS = ("PRESET", "STEPS", "LIMIT", "STUDENT")


def learner_env(work: Path) -> dict[str, str]:
    """`kfoundry` and `python` on PATH as in an activated venv, offline, a free port, the knobs at their defaults."""
    bin_dir = work / ".bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, cmd in (("kfoundry", f'"{sys.executable}" -m kfoundry'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PORT": str(port), "PYTHONPATH": str(ROOT),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.setdefault("KFOUNDRY_SHARED_DATA", str(ROOT.parent / "shared" / "data"))
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env, rows = learner_env(args.workdir), []
    for chapter in CHAPTERS:
        load0 = os.getloadavg()[0]
        t, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(["bash", "-c", chapter_script(chapter)], cwd=args.workdir, env=env, text=True,
                              capture_output=True)
        wall, now = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)
        (args.workdir / f"{chapter.stem}.out").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
        rows.append({"chapter": chapter.stem, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rc": proc.returncode,
                     "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
        if proc.returncode:
            break
    total = {"total_wall_s": round(sum(r["wall_s"] for r in rows), 1),
             "total_cpu_s": round(sum(r["cpu_s"] for r in rows), 1), "chapters": rows}
    if args.json:
        args.json.write_text(json.dumps(total, indent=2))
    print(json.dumps({k: v for k, v in total.items() if k != "chapters"}))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
