"""The frontier reference table (frontier.yaml) and the arithmetic of "how far from the frontier are we".

All scores here are fractions in [0, 1] (the table stores percent; `load_table` converts).

Why chance-corrected. A four-option benchmark gives 25 % to a model that guesses, so raw ratios flatter weak
models: a guesser would be "34 % of GPT-4o" on KMMLU (25 / 72.5). The report therefore measures on the scale
where guessing is 0 and a perfect score is 1:

    chance_corrected(s)   = (s - chance) / (1 - chance)
    percent_of_frontier   = 100 * chance_corrected(s) / chance_corrected(anchor)
    target (95 %)         = chance + 0.95 * (anchor - chance)    the raw score that is 95 % of the anchor
    distance_to_target    = target - s                           in raw points; <= 0 means the target is met

For free-form benchmarks (chance 0) these reduce to the plain ratio s / anchor.
"""

from __future__ import annotations

import importlib.resources
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kfoundry.errors import DataError

PROTOCOL_KEYS = ("shots", "mode", "metric")  # the fields compared between a run and an anchor


@dataclass(frozen=True)
class Anchor:
    model: str
    score: float  # fraction
    source: str
    date: str | None
    protocol: dict[str, Any]
    verified: bool
    note: str = ""


@dataclass(frozen=True)
class Benchmark:
    key: str
    title: str
    tasks: tuple[str, ...]
    metric: str
    chance: float  # fraction
    averaging: str = ""
    anchors: tuple[Anchor, ...] = ()
    frontier_anchor: str | None = None

    def anchor(self) -> Anchor | None:
        """The anchor named by `frontier_anchor`, else the best published score (None when there is none)."""
        if not self.anchors:
            return None
        if self.frontier_anchor:
            for a in self.anchors:
                if a.model == self.frontier_anchor:
                    return a
            raise DataError(f"{self.key}: frontier_anchor {self.frontier_anchor!r} is not one of its anchors")
        return max(self.anchors, key=lambda a: a.score)


@dataclass(frozen=True)
class FrontierTable:
    benchmarks: dict[str, Benchmark]
    target_fraction: float = 0.95
    source: str = ""
    by_task: dict[str, str] = field(default_factory=dict)

    def for_task(self, task: str) -> Benchmark | None:
        """The benchmark an lm-eval task or group name reports against."""
        key = self.by_task.get(task)
        return self.benchmarks[key] if key else None


def _percent(value: Any, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise DataError(f"{where}: expected a percentage in [0, 100], got {value!r}")
    return float(value) / 100


def default_table_path() -> Path:
    return Path(str(importlib.resources.files("kfoundry.eval").joinpath("frontier.yaml")))


def load_table(path: str | Path | None = None) -> FrontierTable:
    """Read and check the table: percentages in range, chance below every anchor's possible score, named
    anchors present, each task claimed by one benchmark only."""
    path = Path(path) if path else default_table_path()
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    target = float(data.get("target_fraction", 0.95))
    if not 0 < target <= 1:
        raise DataError(f"{path}: target_fraction must be in (0, 1], got {target}")
    benchmarks: dict[str, Benchmark] = {}
    by_task: dict[str, str] = {}
    for key, b in (data.get("benchmarks") or {}).items():
        where = f"{path}: {key}"
        chance = _percent(b.get("chance", 0), f"{where}.chance")
        if chance >= 1:
            raise DataError(f"{where}: chance must be below 100")
        anchors = tuple(
            Anchor(model=str(a["model"]), score=_percent(a["score"], f"{where}.anchors[{i}].score"),
                   source=str(a.get("source", "")), date=None if a.get("date") is None else str(a["date"]),
                   protocol=dict(a.get("protocol") or {}), verified=bool(a.get("verified", False)),
                   note=str(a.get("note", "")))
            for i, a in enumerate(b.get("anchors") or []))
        bench = Benchmark(key=key, title=str(b.get("title", key)), tasks=tuple(b.get("tasks") or [key]),
                          metric=str(b.get("metric", "acc")), chance=chance, averaging=str(b.get("averaging", "")),
                          anchors=anchors, frontier_anchor=b.get("frontier_anchor"))
        bench.anchor()  # raises if frontier_anchor names no anchor
        for task in bench.tasks:
            if task in by_task:
                raise DataError(f"{where}: task {task!r} is already claimed by {by_task[task]}")
            by_task[task] = key
        benchmarks[key] = bench
    return FrontierTable(benchmarks, target, str(path), by_task)


# ---------------------------------------------------------------------------------------------------- math


def chance_corrected(score: float, chance: float) -> float:
    """0 for guessing, 1 for a perfect score; negative when below chance."""
    if not 0 <= chance < 1:
        raise DataError(f"chance must be in [0, 1), got {chance}")
    return (score - chance) / (1 - chance)


def percent_of_frontier(score: float, anchor: float, chance: float) -> float:
    """100 x (our chance-corrected score) / (the anchor's)."""
    gap = chance_corrected(anchor, chance)
    if gap <= 0:
        raise DataError(f"the anchor ({anchor}) must be above chance ({chance})")
    return 100 * chance_corrected(score, chance) / gap


def target_score(anchor: float, chance: float, fraction: float = 0.95) -> float:
    """The raw score at `fraction` of the anchor on the chance-corrected scale."""
    return chance + fraction * (anchor - chance)


def distance_to_target(score: float, anchor: float, chance: float, fraction: float = 0.95) -> float:
    """Raw points still missing to reach the target (<= 0 once it is reached)."""
    return target_score(anchor, chance, fraction) - score


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Size-weighted mean (lm-eval's `weight_by_size`: every question counts once across subtasks)."""
    if len(values) != len(weights) or not values:
        raise ValueError("weighted_mean needs as many weights as values, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return sum(v * w for v, w in zip(values, weights)) / total


def pooled_stderr(stderrs: Sequence[float], weights: Sequence[float]) -> float:
    """Standard error of a weighted mean of independent estimates: sqrt(sum (w_i / W)^2 se_i^2)."""
    total = float(sum(weights))
    return math.sqrt(sum((w / total) ** 2 * se ** 2 for se, w in zip(stderrs, weights)))


def macro_mean(values: Sequence[float]) -> float:
    """Unweighted mean: every benchmark counts once, however many questions it has."""
    if not values:
        raise ValueError("macro_mean of nothing")
    return sum(values) / len(values)


def protocol_differences(ours: dict[str, Any], anchor: Anchor) -> list[str]:
    """Human-readable differences between the run's protocol and the anchor's (unknown fields included)."""
    out = []
    for key in PROTOCOL_KEYS:
        theirs = anchor.protocol.get(key)
        mine = ours.get(key)
        if theirs is None:
            out.append(f"{key}: not recorded for {anchor.model}")
        elif str(theirs).split(" ")[0] != str(mine):
            out.append(f"{key}: ours {mine}, {anchor.model} {theirs}")
    return out
