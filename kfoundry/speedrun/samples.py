"""Stage 5, samples: what the freshly pretrained model writes after a few Korean and English prompts.

Sampled (temperature 0.8, top-k 50, top-p 0.95) with the run's seed, so a rerun of the same run shows the same text.
"""

from __future__ import annotations

from typing import Any

from kfoundry.model.generate import SamplingParams
from kfoundry.serve.generate_cli import complete
from kfoundry.speedrun.stage import Section

SAMPLE_PROMPTS = [
    ("ko", "대한민국은"),
    ("ko", "모든 국민은"),
    ("en", "The function"),
    ("en", "In Python,"),
]


def run(model, tok, seed: int) -> Section:
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, top_p=0.95, seed=seed)
    texts = complete(model, tok, [p for _, p in SAMPLE_PROMPTS], params)
    samples = [{"lang": lang, "prompt": p, "completion": c} for (lang, p), c in zip(SAMPLE_PROMPTS, texts)]
    return Section({"samples": samples}, markdown(samples))


def markdown(samples: list[dict[str, Any]]) -> str:
    """The "Samples" section: each prompt and its continuation."""
    if not samples:
        return ""
    lines = ["", "## Samples", ""]
    for s in samples:
        lines += [f"**{s['lang']}** prompt: `{s['prompt']}`", "", "```text", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines)
