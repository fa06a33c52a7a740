"""`kfoundry provenance audit --model A --against B [C ...]`: does A share weights with B, beyond chance?

The ledger proves what *our* runs did. The audit answers a different question, about any two models, even
ones without a ledger: do their weights carry the same fingerprints?

**Fingerprints that survive fine-tuning.** A transformer's hidden channels have no natural order: permute the
residual channels (and every matrix along them) and you have the same function. Two models trained
independently therefore put their features on unrelated channel orders, while fine-tuning, continued
pretraining, merging or stacking layers keeps the parent's order, because every update is small next to the
weights it changes. So we compare *per-channel* statistics, position by position:

    per layer   input_layernorm and post_attention_layernorm weights            (per residual channel)
                column norms of [q; k; v] and of [gate; up]                     (how much each channel is read)
                row norms of o_proj and down_proj                               (how much each channel is written)
                row norms of gate_proj                                           (per MLP unit)
    embeddings  rows of tokens both tokenizers have (matched by token string)

Vectors are compared with the *centred* cosine (Pearson correlation). The centring matters: RMSNorm weights
start at exactly 1.0 in every model, so the raw cosine of two models' norm weights is close to 1 whether or
not they are related — the report shows that raw number next to its chance level to make the point.

**Chance, measured rather than assumed.** The same comparison is run against models that share nothing with
A or B but their shape: independently initialised ones (fresh Gaussian weights, norms at 1, with our
initialiser's distribution; every statistic is scale-free, so the std does not matter) and B with its channels
randomly re-ordered (the same function on an unrelated channel order, which keeps B's own statistics, outlier
channels included). The pooled results give the chance mean and spread; a fingerprint counts as evidence when
it exceeds mean + max(6 x spread, 0.2).

**Different depths.** Each layer of the deeper model is paired with the most similar layer of the other
(several may pair with one: a depth-up-scaled child copies some layers twice). The chance baseline pairs
layers the same way, so taking the best match does not inflate the verdict.

**What it cannot prove.** See docs/provenance.md: the audit finds shared *weights*, not shared *knowledge*
(distillation or training on another model's outputs leaves no weight fingerprint); a deliberate adversary
can permute channels; and "independent" means "no fingerprint above chance", not a proof of independence.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# name -> (what it is indexed by, how it is computed); "dim" fingerprints follow residual channels.
FINGERPRINTS: dict[str, str] = {
    "attn_norm": "dim",  # input_layernorm.weight
    "mlp_norm": "dim",  # post_attention_layernorm.weight
    "attn_in": "dim",  # column norms of [q; k; v]
    "attn_out": "dim",  # row norms of o_proj
    "mlp_in": "dim",  # column norms of [gate; up]
    "mlp_out": "dim",  # row norms of down_proj
    "mlp_units": "ffn",  # row norms of gate_proj
}
LAYER_PARAMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
Z = 6.0  # a fingerprint is evidence when it sits this many chance spreads above the chance mean...
MIN_MARGIN = 0.2  # ...and at least this far above it (a spread measured from a few samples can be too small)
LIKELY_DERIVED, INDEPENDENT, NOT_COMPARABLE = "likely derived", "independent", "not comparable"


# ------------------------------------------------------------------------------------------------- loading


@dataclass
class Weights:
    """A model as the audit sees it: fp32 tensors by Hugging Face Llama name, and its vocabulary (if known)."""

    label: str
    path: str
    state: dict[str, torch.Tensor]
    vocab: dict[str, int] | None

    @property
    def n_layers(self) -> int:
        ids = {int(m.group(1)) for k in self.state if (m := LAYER_RE.match(k))}
        return max(ids) + 1 if ids else 0


def _vocab(tokenizer_json: Path) -> dict[str, int] | None:
    if not tokenizer_json.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)


def load_weights(path: str | Path, label: str | None = None) -> Weights:
    """A kfoundry checkpoint (hash-checked, sharded ones included) or a Hugging Face Llama directory."""
    from safetensors.torch import load_file

    from kfoundry import checkpoint as ckpt_io
    from kfoundry.fileio import read_json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model directory (no config.json): {path}")
    label = label or path.name
    if "format_version" in read_json(path / "config.json"):  # ours
        state = ckpt_io.model_state(ckpt_io.load_model(path))
        return Weights(label, str(path), {k: v.float() for k, v in state.items()},
                       _vocab(path / "tokenizer" / "tokenizer.json"))
    index = path / "model.safetensors.index.json"
    files = sorted({path / f for f in read_json(index)["weight_map"].values()}) if index.is_file() \
        else [path / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path}: no safetensors weights (the audit never unpickles .bin files)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    return Weights(label, str(path), state, _vocab(path / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------- fingerprints


def fingerprint_layer(get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-channel statistics of one block; `get(name)` returns the block's parameter `name`."""
    q, k, v = get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight")
    gate, up = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")
    return {
        "attn_norm": get("input_layernorm.weight"),
        "mlp_norm": get("post_attention_layernorm.weight"),
        "attn_in": torch.cat([q, k, v]).norm(dim=0),
        "attn_out": get("self_attn.o_proj.weight").norm(dim=1),
        "mlp_in": torch.cat([gate, up]).norm(dim=0),
        "mlp_out": get("mlp.down_proj.weight").norm(dim=1),
        "mlp_units": gate.norm(dim=1),
    }


def layer_fingerprints(w: Weights) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(w.n_layers):
        prefix = f"model.layers.{i}."
        missing = [p for p in LAYER_PARAMS if prefix + p not in w.state]
        if missing:
            raise ValueError(f"{w.path}: layer {i} lacks {missing}; the audit reads Llama-style blocks")
        out.append(fingerprint_layer(lambda name, prefix=prefix: w.state[prefix + name].float()))
    return out


def layer_shapes(w: Weights) -> list[dict[str, tuple[int, ...]]]:
    return [{p: tuple(w.state[f"model.layers.{i}.{p}"].shape) for p in LAYER_PARAMS} for i in range(w.n_layers)]


def random_init_fingerprints(shapes: list[dict[str, tuple[int, ...]]], gen: torch.Generator
                             ) -> list[dict[str, torch.Tensor]]:
    """Fingerprints of an independently initialised model of these shapes, one block at a time (no full model
    is allocated): Gaussian matrices, RMSNorm weights at 1, as `Transformer.init_weights` makes them."""
    out = []
    for layer in shapes:
        params = {p: (torch.ones(s) if p.endswith("layernorm.weight") else torch.randn(s, generator=gen))
                  for p, s in layer.items()}
        out.append(fingerprint_layer(params.__getitem__))
    return out


def permuted_fingerprints(fps: list[dict[str, torch.Tensor]], gen: torch.Generator
                          ) -> list[dict[str, torch.Tensor]]:
    """The fingerprints of the same model with its residual channels and MLP units re-ordered (one order for
    the whole model, as a real re-basing would use): the same function on an unrelated channel order."""
    if not fps:
        return []
    dim, ffn = len(fps[0]["attn_norm"]), len(fps[0]["mlp_units"])
    perm = {"dim": torch.randperm(dim, generator=gen), "ffn": torch.randperm(ffn, generator=gen)}
    return [{name: vec[perm[FINGERPRINTS[name]]] for name, vec in layer.items()} for layer in fps]


def _centred_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows minus their mean, scaled to unit length; a constant row becomes all zeros (no direction at all)."""
    x = x.double()
    x = x - x.mean(dim=1, keepdim=True)
    norms = x.norm(dim=1, keepdim=True)
    scale = x.abs().amax(dim=1, keepdim=True)
    return torch.where(norms > 1e-9 * (scale + 1e-30), x / norms.clamp_min(1e-300), torch.zeros_like(x))


def similarity_matrix(fa: list[dict[str, torch.Tensor]], fb: list[dict[str, torch.Tensor]]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """S[i, j] = mean over comparable fingerprints of the Pearson correlation of A's layer i and B's layer j."""
    per: dict[str, torch.Tensor] = {}
    for name in FINGERPRINTS:
        xa = torch.stack([layer[name] for layer in fa])
        xb = torch.stack([layer[name] for layer in fb])
        if xa.shape[1] == xb.shape[1]:
            per[name] = _centred_rows(xa) @ _centred_rows(xb).T
    if not per:
        return torch.zeros(len(fa), len(fb), dtype=torch.float64), per
    return torch.stack(list(per.values())).mean(dim=0), per


def match_layers(sim: torch.Tensor) -> list[tuple[int, int]]:
    """Pair every layer of the deeper model with its most similar layer in the other (A's layers when equal)."""
    if sim.shape[0] >= sim.shape[1]:
        return [(i, int(sim[i].argmax())) for i in range(sim.shape[0])]
    return [(int(sim[:, j].argmax()), j) for j in range(sim.shape[1])]


def matched_score(sim: torch.Tensor) -> float:
    pairs = match_layers(sim)
    return float(sum(sim[i, j] for i, j in pairs) / len(pairs)) if pairs else 0.0


def raw_norm_cosine(fa, fb, pairs) -> float:
    """The measure behind the 2026 public claim: plain cosine of norm weights. Shown, never used to decide."""
    vals = []
    for i, j in pairs:
        for name in ("attn_norm", "mlp_norm"):
            a, b = fa[i][name].double(), fb[j][name].double()
            if a.shape == b.shape:
                vals.append(float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300)))
    return sum(vals) / len(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------------- embeddings


def shared_token_rows(a: Weights, b: Weights) -> tuple[list[int], list[int]]:
    """Row ids of the tokens both vocabularies contain (matched by token string; by id when neither has a
    tokenizer and the vocabularies are the same size)."""
    ea, eb = a.state.get("model.embed_tokens.weight"), b.state.get("model.embed_tokens.weight")
    if ea is None or eb is None:
        return [], []
    if a.vocab is not None and b.vocab is not None:
        common = sorted(set(a.vocab) & set(b.vocab))
        pairs = [(a.vocab[t], b.vocab[t]) for t in common if a.vocab[t] < ea.shape[0] and b.vocab[t] < eb.shape[0]]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if a.vocab is None and b.vocab is None and ea.shape[0] == eb.shape[0]:
        return list(range(ea.shape[0])), list(range(eb.shape[0]))
    return [], []


def _row_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine of matching rows, after removing each matrix's mean row (a direction every token shares)."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    cos = (x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-300)
    return float(cos.mean())


def embedding_matrices(w: Weights) -> list[torch.Tensor]:
    mats = [w.state["model.embed_tokens.weight"]]
    if "lm_head.weight" in w.state:  # untied: the output rows are a second, independent fingerprint
        mats.append(w.state["lm_head.weight"])
    return mats


def embedding_score(ma: list[torch.Tensor], mb: list[torch.Tensor], ia: list[int], ib: list[int]) -> float:
    vals = [_row_cosine(x[ia], y[ib]) for x, y in zip(ma, mb) if x.shape[1] == y.shape[1]]
    return sum(vals) / len(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------------- comparison


@dataclass
class Evidence:
    name: str
    observed: float
    chance_mean: float
    chance_std: float
    threshold: float
    z: float
    passed: bool
    used: bool  # counts towards the verdict
    note: str = ""


@dataclass
class Comparison:
    model: str
    against: str
    verdict: str
    summary: str
    evidence: list[Evidence]
    pairs: list[dict[str, Any]]  # one per layer of the deeper model: a_layer, b_layer, similarity, per fingerprint
    matrix: list[list[float]]  # layer similarity, A's layers x B's layers
    chance_layer: list[float] = field(default_factory=list)  # the baseline samples themselves
    shared_tokens: int = 0
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _evidence(name: str, observed: float, samples: list[float], used: bool = True, note: str = "") -> Evidence:
    n = len(samples)
    mean = sum(samples) / n if n else 0.0
    std = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1)) if n > 1 else 0.0
    threshold = mean + max(Z * std, MIN_MARGIN)
    z = (observed - mean) / std if std > 0 else (math.inf if observed > mean else 0.0)
    return Evidence(name, observed, mean, std, threshold, z, bool(observed > threshold), used, note)


def compare(a: Weights, b: Weights, *, seeds: int = 4, seed: int = 0) -> Comparison:
    """Audit A against B: per-layer similarity, layer pairing, embeddings, chance baseline and the verdict."""
    if seeds < 2:
        raise ValueError("--seeds must be at least 2 (the chance spread needs two samples)")
    fa, fb = layer_fingerprints(a), layer_fingerprints(b)
    gen = torch.Generator().manual_seed(seed)
    evidence: list[Evidence] = []
    pairs: list[dict[str, Any]] = []
    matrix: list[list[float]] = []
    chance_layer: list[float] = []
    sim, per = (similarity_matrix(fa, fb) if fa and fb else (torch.zeros(0, 0), {}))
    if per:
        matrix = sim.tolist()
        for i, j in match_layers(sim):
            pairs.append({"a_layer": i, "b_layer": j, "similarity": float(sim[i, j]),
                          **{name: float(m[i, j]) for name, m in per.items()}})
        # chance: independently initialised models of B's shape (vs A) and of A's shape (vs B), and B re-ordered
        shapes_a, shapes_b = layer_shapes(a), layer_shapes(b)
        for _ in range(seeds):
            chance_layer.append(matched_score(similarity_matrix(fa, random_init_fingerprints(shapes_b, gen))[0]))
            chance_layer.append(matched_score(similarity_matrix(random_init_fingerprints(shapes_a, gen), fb)[0]))
            chance_layer.append(matched_score(similarity_matrix(fa, permuted_fingerprints(fb, gen))[0]))
        score = sum(p["similarity"] for p in pairs) / len(pairs)
        evidence.append(_evidence("layers", score, chance_layer,
                                  note=f"mean Pearson correlation of {len(per)} per-channel fingerprints over "
                                       f"{len(pairs)} paired layers"))
        match = [(p["a_layer"], p["b_layer"]) for p in pairs]
        ones = [{n: torch.ones_like(v) if n.endswith("_norm") else v for n, v in layer.items()} for layer in fb]
        evidence.append(_evidence("norm weights, raw cosine", raw_norm_cosine(fa, fb, match),
                                  [raw_norm_cosine(fa, ones, match)], used=False,
                                  note="plain cosine of RMSNorm weights, as in the 2026 public claim; its chance "
                                       "level (against norms at their initial 1.0) is shown to say why it proves "
                                       "nothing on its own"))
    ia, ib = shared_token_rows(a, b)
    ma, mb = embedding_matrices(a), embedding_matrices(b)
    emb = embedding_score(ma, mb, ia, ib) if ia else float("nan")
    if ia and not math.isnan(emb):
        samples = []
        for _ in range(seeds):
            rand_b = [torch.randn(len(ib), m.shape[1], generator=gen) for m in mb]
            rand_a = [torch.randn(len(ia), m.shape[1], generator=gen) for m in ma]
            perm_b = [m[:, torch.randperm(m.shape[1], generator=gen)] for m in mb]
            idx = list(range(len(ib)))
            samples += [embedding_score(ma, rand_b, ia, idx), embedding_score(rand_a, mb, list(range(len(ia))), ib),
                        embedding_score(ma, perm_b, ia, ib)]
        evidence.append(_evidence("embeddings", emb, samples,
                                  note=f"mean cosine of the rows of {len(ia)} tokens both tokenizers contain"))
    used = [e for e in evidence if e.used]
    if not used:
        verdict = NOT_COMPARABLE
        summary = ("nothing to compare: the hidden sizes differ and no embedding rows line up, so the weights "
                   "share no coordinates (distillation or training on outputs leaves no weight fingerprint)")
    elif any(e.passed for e in used):
        verdict = LIKELY_DERIVED
        summary = "; ".join(f"{e.name} {e.observed:.3f} vs chance {e.chance_mean:.3f} ± {e.chance_std:.3f} "
                            f"(threshold {e.threshold:.3f})" for e in used if e.passed)
    else:
        verdict = INDEPENDENT
        summary = "no fingerprint above chance: " + "; ".join(
            f"{e.name} {e.observed:.3f} <= threshold {e.threshold:.3f}" for e in used)
    return Comparison(model=a.path, against=b.path, verdict=verdict, summary=summary, evidence=evidence,
                      pairs=pairs, matrix=matrix, chance_layer=chance_layer, shared_tokens=len(ia))


# ------------------------------------------------------------------------------------------------- reporting


def plot_comparison(c: Comparison, out_png: Path, label_a: str, label_b: str) -> Path | None:
    """Left: the layer similarity matrix with the chosen pairs; right: each pair's similarity against chance."""
    if not c.matrix:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(c.matrix)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    im = ax1.imshow(m.numpy(), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    ax1.scatter([p["b_layer"] for p in c.pairs], [p["a_layer"] for p in c.pairs], marker="o", facecolors="none",
                edgecolors="black", s=60, label="paired")
    ax1.set_xticks(range(m.shape[1]))
    ax1.set_yticks(range(m.shape[0]))
    ax1.set_xlabel(f"{label_b} layer")
    ax1.set_ylabel(f"{label_a} layer")
    ax1.set_title("per-layer fingerprint similarity")
    ax1.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    layers = next(e for e in c.evidence if e.name == "layers")
    xs = list(range(len(c.pairs)))
    ax2.bar(xs, [p["similarity"] for p in c.pairs], color="tab:blue", label="paired layers")
    ax2.axhspan(layers.chance_mean - layers.chance_std, layers.chance_mean + layers.chance_std, color="grey",
                alpha=0.3, label="chance (mean ± std)")
    ax2.axhline(layers.threshold, color="tab:red", linestyle="--", label="evidence threshold")
    ax2.set_xticks(xs, [f"{p['a_layer']}→{p['b_layer']}" for p in c.pairs], rotation=90, fontsize=7)
    ax2.set_ylim(min(-0.2, min(p["similarity"] for p in c.pairs) - 0.05), 1.05)
    ax2.set_ylabel("similarity (Pearson)")
    ax2.set_title(f"verdict: {c.verdict}")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def format_comparison(c: Comparison) -> str:
    lines = [f"{c.model}  vs  {c.against}", f"  verdict: {c.verdict.upper()} — {c.summary}"]
    for e in c.evidence:
        judged = (f"threshold {e.threshold:6.3f}   {'ABOVE' if e.passed else 'below'}" if e.used
                  else "not used for the verdict")
        lines.append(f"  {e.name:<26} {e.observed:7.3f}   chance {e.chance_mean:6.3f} ± {e.chance_std:.3f}   {judged}")
    if c.pairs:
        lines.append("  layer pairs (model→against: similarity): " + ", ".join(
            f"{p['a_layer']}→{p['b_layer']}: {p['similarity']:.2f}" for p in c.pairs))
    if c.plot:
        lines.append(f"  plot: {c.plot}")
    return "\n".join(lines)


def short_label(path: str | Path) -> str:
    """RUN/step-N for a checkpoint inside a run (every run's checkpoints are called step-N), else the folder."""
    p = Path(path)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "ckpt" else p.name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def audit(model: str | Path, against: list[str | Path], *, out_dir: str | Path | None = None, seeds: int = 4
          ) -> list[Comparison]:
    """Compare MODEL with each of AGAINST; with `out_dir`, write audit.json, audit.md and one plot per pair."""
    from kfoundry.fileio import atomic_write_json, atomic_write_text

    if not against:
        raise ValueError("give at least one model to audit against (--against B [C ...])")
    a = load_weights(model)
    results = []
    for k, other in enumerate(against):
        b = load_weights(other)
        c = compare(a, b, seeds=seeds)
        if out_dir is not None:
            png = plot_comparison(c, Path(out_dir) / f"audit-{k}-{_safe(short_label(other))}.png",
                                  short_label(model), short_label(other))
            c.plot = str(png) if png else None
        results.append(c)
        del b
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "audit.json", {"model": str(model), "seeds": seeds, "z": Z, "min_margin": MIN_MARGIN,
                                               "comparisons": [c.to_dict() for c in results]})
        md = ["# Originality audit", "", f"Model: `{model}`", "",
              f"Evidence threshold: chance mean + max({Z:g} x chance spread, {MIN_MARGIN}); chance from {seeds} "
              "independently initialised models per side and B re-ordered. See docs/provenance.md.", ""]
        for c in results:
            md += [f"## against `{c.against}`", "", f"**{c.verdict}** — {c.summary}", "",
                   "| fingerprint | observed | chance | threshold | counts |", "|---|---|---|---|---|"]
            md += [f"| {e.name} | {e.observed:.3f} | {e.chance_mean:.3f} ± {e.chance_std:.3f} | "
                   f"{f'{e.threshold:.3f}' if e.used else '—'} | {'yes' if e.used else 'no (shown only)'} |"
                   for e in c.evidence]
            if c.pairs:
                md += ["", "| model layer | against layer | similarity |", "|---|---|---|"]
                md += [f"| {p['a_layer']} | {p['b_layer']} | {p['similarity']:.3f} |" for p in c.pairs]
            if c.plot:
                md += ["", f"![layer similarity]({Path(c.plot).name})"]
            md.append("")
        atomic_write_text(out / "audit.md", "\n".join(md))
    return results
