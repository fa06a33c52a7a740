"""Shared fixtures. `shared_data` points at ../shared/data (or $KFOUNDRY_SHARED_DATA).

Tests that need it skip with a reason when it is absent; `.ci/run` sets KFOUNDRY_REQUIRE_SHARED=1 so that a
missing shared folder fails CI instead of silently skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The mixed-script sample every text test uses: Korean, English, digits, emoji, and NFD-decomposed Hangul.
MIXED_TEXTS = [
    "대한민국 헌법 제1조 ① 대한민국은 민주공화국이다.",
    "The quick brown fox jumps over the lazy dog.",
    "2026년 11월 29일, 가격은 12,345원 (3.14%)",
    "오늘 기분 최고 😀🎉 Let's go!",
    "\u1112\u1161\u11ab\u1100\u1173\u11af NFD 한글",  # "한글" decomposed into jamo
    "",
]


def shared_data_dir() -> Path:
    return Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        if os.environ.get("KFOUNDRY_REQUIRE_SHARED"):
            pytest.fail(f"shared data required but missing at {path}")
        pytest.skip(f"shared data not found at {path} (set KFOUNDRY_SHARED_DATA)")
    return path


@pytest.fixture
def mixed_texts() -> list[str]:
    return list(MIXED_TEXTS)
