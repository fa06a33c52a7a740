"""The data card: what went in, what came out, and why everything else was removed.

`write_card(out_dir, card)` writes `data_card.json` (the numbers, for programs), `data_card.md` (the same
for people) and the PNG plots it links: document lengths before and after curation, and the distribution of
near-duplicate cluster sizes (FineWeb-2 suggests upsampling kept documents by it).

Removal examples are shown with personal data replaced (the removal happened before the PII step, so the
exclusion files still hold the original text; the card does not repeat it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfoundry.data.curate.pii import redact
from kfoundry.fileio import atomic_write_json, atomic_write_text

LENGTH_PNG = "length_hist.png"
CLUSTER_PNG = "cluster_sizes.png"
EXAMPLE_CHARS = 120
# Length bands (characters) for the near-duplicate cluster sizes: short documents are shingled by characters
# and long ones by words (stages.ShingleMinhashSignature), and near-copies are far more common among short
# texts, so one histogram for all lengths would hide how each band was deduplicated.
LENGTH_BANDS = (0, 60, 200, 500, 2000, 10000)


def length_band(n: int) -> str:
    """The band of a length in characters: "0-59", "60-199", ..., "10000+"."""
    lo = max(b for b in LENGTH_BANDS if b <= n)
    i = LENGTH_BANDS.index(lo)
    return f"{lo}+" if i == len(LENGTH_BANDS) - 1 else f"{lo}-{LENGTH_BANDS[i + 1] - 1}"


def _bin_label(k: int) -> str:
    return "0" if k == 0 else f"{2 ** (k - 1)}"


def plot_lengths(path: Path, before: dict[str, int], after: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({int(k) for k in (*before, *after)})
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    x = list(range(len(keys)))
    ax.bar([i - 0.2 for i in x], [before.get(str(k), 0) for k in keys], width=0.4, label="input (read)")
    ax.bar([i + 0.2 for i in x], [after.get(str(k), 0) for k in keys], width=0.4, label="curated")
    ax.set_xticks(x, [_bin_label(k) for k in keys], rotation=60, fontsize=7)
    ax.set_xlabel("document length in characters (bin starts; power-of-two bins)")
    ax.set_ylabel("documents")
    ax.set_yscale("symlog")
    ax.legend()
    ax.set_title("Document lengths before and after curation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_clusters(path: Path, sizes: dict[str, int], exact: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), dpi=100)
    for ax, hist, title in ((axes[0], sizes, "near-duplicate cluster size (MinHash)"),
                            (axes[1], exact, "exact copies per kept document")):
        keys = sorted(int(k) for k in hist) or [0]
        ax.bar([str(k) for k in keys], [hist.get(str(k), 0) for k in keys])
        ax.set_yscale("symlog")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("kept documents")
        ax.tick_params(axis="x", labelsize=7, rotation=60)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _snippet(text: str) -> str:
    clean, _ = redact(text)
    clean = " ".join(clean.split())
    return clean[:EXAMPLE_CHARS] + ("…" if len(clean) > EXAMPLE_CHARS else "")


def redact_examples(steps: list[dict[str, Any]]) -> None:
    """Replace personal data in every step's removal examples, in place (they predate the PII step)."""
    for s in steps:
        for reason, examples in s.get("examples", {}).items():
            s["examples"][reason] = [{**e, "text": redact(e.get("text", ""))[0]} for e in examples]


def top_removals(steps: list[dict[str, Any]], limit: int = 12) -> list[dict[str, Any]]:
    rows = []
    for s in steps:
        for reason, r in s["removed"].items():
            rows.append({"step": s["step"], "reason": reason, "docs": r["docs"], "chars": r["chars"],
                         "examples": [{"id": e["id"], "text": _snippet(e.get("text", ""))}
                                      for e in s["examples"].get(reason, [])]})
    rows.sort(key=lambda r: (-r["docs"], r["step"], r["reason"]))
    return rows[:limit]


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def render_markdown(card: dict[str, Any]) -> str:
    t = card["totals"]
    lines = [
        f"# Data card: {card['corpus']}",
        "",
        f"Recipe `{card['recipe']['name']}`: {card['recipe'].get('description') or ''}".rstrip(),
        "",
        f"- documents: {t['docs_read']:,} read -> **{t['docs_curated']:,} curated** "
        f"({_pct(t['docs_curated'], t['docs_read'])})",
        f"- characters: {t['chars_read']:,} read -> **{t['chars_curated']:,} curated** "
        f"({_pct(t['chars_curated'], t['chars_read'])})",
        f"- accounting identity (in = kept + removed, per step and overall): "
        f"**{'holds' if card['identity']['ok'] else 'BROKEN'}**",
    ]
    for failure in card["identity"]["failures"]:
        lines.append(f"  - {failure}")
    lines += ["", "## Sources", "", "| source | kind | licence | weight |", "|---|---|---|---|"]
    for s in card["sources"]:
        lines.append(f"| `{s.get('path') or s.get('source')}` | {s.get('kind')} | {s.get('licence') or 'not declared'} "
                     f"| {s.get('weight', 1.0)} |")
    lines += ["", "## Steps", "",
              "| step | docs in | kept | removed | chars in | chars removed | chars out | main reasons |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in card["steps"]:
        reasons = ", ".join(f"{k} {v['docs']:,}" for k, v in list(s["removed"].items())[:4]) or "-"
        lines.append(f"| {s['step']} | {s['docs_in']:,} | {s['docs_kept']:,} | {s['docs_removed']:,} | "
                     f"{s['chars_in']:,} | {s['chars_removed']:,} | {s['chars_out']:,} | {reasons} |")
    lines += ["", "Characters out can be fewer than in minus removed: normalization trims whitespace and PII "
              "placeholders are shorter than what they replace."]
    changes = [(s["step"], k, v) for s in card["steps"] for k, v in s["changes"].items() if v]
    if changes:
        lines += ["", "Changes to kept documents: " + ", ".join(f"{st}.{k} {v:,}" for st, k, v in changes)]
    lines += ["", "## Languages", "", "| route | curated docs | curated chars | share of chars |",
              "|---|---:|---:|---:|"]
    for lang, row in card["languages"]["curated"].items():
        lines.append(f"| {lang} | {row['docs']:,} | {row['chars']:,} | {_pct(row['chars'], t['chars_curated'])} |")
    removed_lang = card["languages"].get("removed", {})
    if removed_lang:
        lines += ["", "Removed by routing: " + ", ".join(f"{k} {v:,}" for k, v in removed_lang.items())]
    lines += ["", "## Lengths", "", f"![document lengths]({LENGTH_PNG})", ""]
    ls = card["lengths"]
    if ls["curated"]:
        c = ls["curated"]
        lines.append(f"Curated documents: median {c['p50']:,} chars, p90 {c['p90']:,}, max {c['max']:,}, "
                     f"mean {c['mean']:,.0f}.")
    lines += ["", "## Deduplication", ""]
    dd = card["dedup"]
    lines.append(f"- exact duplicates removed: {dd['exact_removed']:,}; near duplicates removed: "
                 f"{dd['near_removed']:,}")
    lines.append(f"- kept documents in a near-duplicate cluster (size > 1): {dd['kept_in_clusters']:,}; "
                 "`minhash_cluster_size` on each curated document gives its cluster size for upsampling")
    bands = dd.get("cluster_size_by_band") or {}
    if bands:
        lines += ["", "Near-duplicate cluster sizes of the curated documents by length (characters; documents of "
                  "at most 500 characters are compared by character 4-grams, longer ones by word 5-grams):", "",
                  "| length | documents | in a cluster (size > 1) | cluster sizes (size: documents) |",
                  "|---|---:|---:|---|"]
        for band in sorted(bands, key=lambda b: int(b.split("-")[0].rstrip("+"))):
            hist = bands[band]
            total = sum(hist.values())
            clustered = sum(v for k, v in hist.items() if int(k) > 1)
            sizes = ", ".join(f"{k}: {v:,}" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {band} | {total:,} | {clustered:,} | {sizes} |")
    lines += ["", f"![cluster sizes]({CLUSTER_PNG})", ""]
    lines += ["## Personal data", ""]
    pii = card["pii"]
    lines.append(", ".join(f"{k} {v:,}" for k, v in pii.items()) if pii else "none found")
    lines += ["", "## Decontamination", ""]
    dc = card["decontamination"]
    if not dc.get("enabled"):
        lines.append(dc.get("note", "off"))
    else:
        lines.append(f"{dc['items_indexed']:,} of {dc['items']:,} evaluation items indexed "
                     f"({dc['items_too_short']:,} shorter than {dc['min_item_words']} words), "
                     f"{dc['n_grams']}-word n-grams; documents removed: {dc['removed']:,}")
        for task, n in dc.get("removed_by_task", {}).items():
            lines.append(f"- {task}: {n:,}")
        for e in dc.get("examples", []):  # matched documents (kfoundry.data.curate.finalize._matched)
            lines.append(f"  - `{e['id']}` ({e['task']}): shared {dc['n_grams']}-gram (or whole short item) "
                         f"\"{e['ngram']}\" in: {_snippet(e['text'])}")
    lines += ["", "## Top removal reasons", ""]
    for r in card["top_removals"]:
        lines.append(f"- **{r['step']} / {r['reason']}**: {r['docs']:,} documents, {r['chars']:,} chars")
        for e in r["examples"]:
            lines.append(f"  - `{e['id']}`: {e['text']}")
    lines += ["", "## Outputs", ""]
    for k, v in card["outputs"].items():
        lines.append(f"- {k}: `{v}`")
    return "\n".join(lines) + "\n"


def write_card(out_dir: Path, card: dict[str, Any]) -> None:
    plot_lengths(out_dir / LENGTH_PNG, card["lengths"]["hist_read"], card["lengths"]["hist_curated"])
    plot_clusters(out_dir / CLUSTER_PNG, card["dedup"]["cluster_size_hist"], card["dedup"]["exact_copies_hist"])
    atomic_write_text(out_dir / "data_card.md", render_markdown(card))
    atomic_write_json(out_dir / "data_card.json", card)
