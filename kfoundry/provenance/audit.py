"""`kfoundry provenance audit --model A --against B [C ...]`: does A share weights with B, beyond chance?

The ledger proves what *our* runs did. The audit answers a different question, about any two models, even
ones without a ledger: do their weights carry the same fingerprints?

**Two kinds of fingerprint.** A transformer has many parametrizations of one function: permute or rotate the
residual stream (with the RMSNorm weights folded into the next matrices), permute SwiGLU units or heads, rescale
channels where a later matrix undoes it. A disguise that uses them costs nothing and leaves the logits unchanged.

- *Invariant* fingerprints (fingerprint.py) cannot be moved by any of those: the geometry of the shared tokens'
  embeddings (pairwise cosines, unchanged by any rotation) and per-layer "circuit" matrices (Wq^T Wk, Wo Wv,
  Wg^T Wg, Wd Wu, summed over heads and units, norms folded) compared after recovering the residual rotation by
  orthogonal Procrustes on the shared tokens. They are what the verdict rests on.
- *Basis-dependent* per-channel statistics (norm weights, column and row norms, embedding rows position by
  position): a permutation erases them, but on an undisguised copy they say which channel came from where.

Vectors and matrices are compared by centred cosines (the identity part of a circuit matrix is removed: it is the
same in every basis, and RMSNorm weights all start at 1.0, which is why their raw cosine proves nothing; the
report shows that number next to its chance level to make the point).

**Chance, measured rather than assumed.** Every fingerprint is also computed against models that share nothing
with A or B but their shape, in three families:

    init       independently initialised models of each side's shape (Gaussian weights, norms at 1)
    shuffled   B with its link to A broken but its own statistics kept: channels re-ordered for the
               basis-dependent fingerprints, token identities shuffled for the invariant ones
    reference  independently *trained* models given with --reference (same data is the hard case: models trained
               on one corpus share structure that no weight was copied for)

A fingerprint is evidence when it exceeds, for every family with two or more samples, that family's mean +
max(6 x its spread, 0.2). The verdict is "likely derived" when any fingerprint is evidence.

**Different depths.** Each layer of the deeper model is paired with the most similar layer of the other (several
may pair with one: a depth-up-scaled child copies some layers twice). The chance baseline pairs layers the same
way, so taking the best match does not inflate the verdict.

**What it cannot prove.** See docs/provenance.md: the audit finds shared *weights*, not shared *knowledge*
(distillation or training on another model's outputs leaves no weight fingerprint); "independent" means "no
fingerprint above chance", not a proof of independence.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from kfoundry import checkpoint as ckpt_io
from kfoundry.errors import CheckpointError, ConfigError, MissingPathError
from kfoundry.fileio import atomic_write_json, atomic_write_text, read_json, sha256_file
from kfoundry.provenance import fingerprint as fp
from kfoundry.provenance.record import code_version

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
MIN_SHARED = 64  # fewer shared tokens than this: too few pairs for token geometry to mean anything
LIKELY_DERIVED, INDEPENDENT, NOT_COMPARABLE = "likely derived", "independent", "not comparable"

TOKEN_GEOMETRY, CIRCUITS, CHANNELS, EMBED_ROWS, RAW_NORMS = (
    "token geometry", "aligned circuits", "channel statistics", "embedding rows", "norm weights, raw cosine")
# What each fingerprint cannot be moved by (by construction; tests/test_provenance_audit.py disguises a model each
# way and checks). What it survives *measurably* (training, merging, noise) is in docs/provenance.md.
_FUNCTION_PRESERVING = ["residual-channel permutation", "orthogonal rotation of the residual stream (norms folded)",
                        "per-channel rescaling of norm weights", "SwiGLU unit permutation and up/down scaling",
                        "head and key/value-group permutation", "query/key rotary-pair transforms",
                        "value/output head transforms", "a global scale of the residual stream"]
INVARIANT_TO: dict[str, list[str]] = {
    TOKEN_GEOMETRY: _FUNCTION_PRESERVING + ["different hidden sizes", "token ids re-ordered or vocabulary "
                                            "extended (tokens are matched by the text they stand for)"],
    CIRCUITS: _FUNCTION_PRESERVING + ["token ids re-ordered or vocabulary extended (the rotation is fitted on "
                                      "the shared tokens)", "layers duplicated, dropped or re-ordered (layers are "
                                      "paired by best match)"],
    CHANNELS: ["SwiGLU up/down scaling", "layers duplicated, dropped or re-ordered"
               " — but NOT a residual permutation or rotation, which erases it"],
    EMBED_ROWS: ["token ids re-ordered — but NOT a residual permutation or rotation, which erases it"],
    RAW_NORMS: [],
}


# ------------------------------------------------------------------------------------------------- loading


@dataclass
class Weights:
    """A model as the audit sees it: fp32 tensors by Hugging Face Llama name, its vocabulary (if known), its head
    counts (query, key/value) and where its tokenizer.json is (to read token strings the right way)."""

    label: str
    path: str
    state: dict[str, torch.Tensor]
    vocab: dict[str, int] | None
    heads: tuple[int, int] | None = None
    tokenizer_json: str | None = None
    _keys: dict[str, int] | None = field(default=None, repr=False)
    _folded: fp.Folded | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        ids = {int(m.group(1)) for k in self.state if (m := LAYER_RE.match(k))}
        return max(ids) + 1 if ids else 0

    @property
    def keys(self) -> dict[str, int] | None:
        """Token text -> row (see fingerprint.token_keys); None without a vocabulary."""
        if self.vocab is not None and self._keys is None:
            self._keys = fp.token_keys(self.vocab, Path(self.tokenizer_json) if self.tokenizer_json else None)
        return self._keys

    def folded(self) -> fp.Folded:
        if self._folded is None:
            if self.heads is None:
                raise CheckpointError(f"{self.path}: the head counts are unknown (no n_heads / num_attention_heads in "
                                      "config.json); the circuit fingerprints need them")
            self._folded = fp.fold(self.state, self.n_layers, *self.heads)
        return self._folded


def _vocab(tokenizer_json: Path) -> dict[str, int] | None:
    if not tokenizer_json.is_file():
        return None

    return Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)


def _heads(config: dict[str, Any]) -> tuple[int, int] | None:
    n = config.get("n_heads", config.get("num_attention_heads"))
    kv = config.get("n_kv_heads", config.get("num_key_value_heads", n))
    return (int(n), int(kv)) if n else None


def load_weights(path: str | Path, label: str | None = None) -> Weights:
    """A kfoundry checkpoint (hash-checked, sharded ones included) or a Hugging Face Llama directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingPathError(f"not a model directory (no config.json): {path}")
    label = label or path.name
    config = read_json(path / "config.json")
    if "format_version" in config:  # ours
        state = ckpt_io.model_state(ckpt_io.load_model(path))
        tj = path / "tokenizer" / "tokenizer.json"
        return Weights(label, str(path), {k: v.float() for k, v in state.items()}, _vocab(tj), _heads(config),
                       str(tj))
    index = path / "model.safetensors.index.json"
    files = sorted({path / f for f in read_json(index)["weight_map"].values()}) if index.is_file() \
        else [path / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise MissingPathError(f"{path}: no safetensors weights (the audit never unpickles .bin files)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    return Weights(label, str(path), state, _vocab(path / "tokenizer.json"), _heads(config),
                   str(path / "tokenizer.json"))


def weight_files_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every weight file of a model directory, so a third party can check they audit the same bytes."""
    path = Path(path)
    return {f.name: sha256_file(f) for f in sorted(path.glob("*.safetensors"))}


# ------------------------------------------------------------------------------------------------- channel statistics


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
            raise CheckpointError(f"{w.path}: layer {i} lacks {missing}; the audit reads Llama-style blocks")
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


# ------------------------------------------------------------------------------------------------- tokens


@dataclass
class SharedTokens:
    """Rows of the tokens both models have, matched by the text they stand for."""

    rows_a: list[int]
    rows_b: list[int]
    vocab_a: int
    vocab_b: int
    how: str  # "text", "id" (no tokenizer on either side, same vocabulary size) or "none"

    @property
    def count(self) -> int:
        return len(self.rows_a)

    def fraction(self) -> dict[str, float]:
        return {"of_model": self.count / self.vocab_a if self.vocab_a else 0.0,
                "of_against": self.count / self.vocab_b if self.vocab_b else 0.0}


def shared_tokens(a: Weights, b: Weights, limit: int | None = None) -> SharedTokens:
    """The tokens both vocabularies contain (all of them, or a hashed subset of at most `limit`)."""
    ea, eb = a.state.get("model.embed_tokens.weight"), b.state.get("model.embed_tokens.weight")
    if ea is None or eb is None:
        return SharedTokens([], [], 0, 0, "none")
    if a.keys is not None and b.keys is not None:
        ia, ib = fp.shared_tokens(a.keys, b.keys, ea.shape[0], eb.shape[0], limit or 1 << 62)
        return SharedTokens(ia, ib, len(a.vocab or {}), len(b.vocab or {}), "text")
    if a.vocab is None and b.vocab is None and ea.shape[0] == eb.shape[0]:
        n = min(ea.shape[0], limit or ea.shape[0])
        return SharedTokens(list(range(n)), list(range(n)), ea.shape[0], eb.shape[0], "id")
    return SharedTokens([], [], ea.shape[0], eb.shape[0], "none")


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


# ------------------------------------------------------------------------------------------------- evidence


@dataclass
class Evidence:
    name: str
    observed: float
    chance_mean: float  # over every chance sample
    chance_std: float
    threshold: float  # the strictest family's mean + max(Z x spread, MIN_MARGIN)
    z: float  # against the family that sets the threshold
    passed: bool
    used: bool  # counts towards the verdict
    note: str = ""
    chance: dict[str, list[float]] = field(default_factory=dict)  # family -> samples
    invariant_to: list[str] = field(default_factory=list)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n if n else 0.0
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def _evidence(name: str, observed: float, chance: dict[str, list[float]], used: bool = True, note: str = ""
              ) -> Evidence:
    chance = {k: [float(x) for x in v] for k, v in chance.items() if v}
    pooled = [x for v in chance.values() for x in v]
    mean, std = _mean_std(pooled)
    families = [_mean_std(v) for v in chance.values() if len(v) > 1] or [(mean, std)]
    # the strictest family decides: its mean + max(Z x its spread, MIN_MARGIN)
    m, s = max(families, key=lambda ms: ms[0] + max(Z * ms[1], MIN_MARGIN))
    threshold = m + max(Z * s, MIN_MARGIN)
    z = (observed - m) / s if s > 0 else (math.inf if observed > m else 0.0)
    return Evidence(name, observed, mean, std, threshold, z, bool(observed > threshold), used, note, chance,
                    INVARIANT_TO.get(name, []))


# ------------------------------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    model: str
    against: str
    verdict: str
    summary: str
    evidence: list[Evidence]
    pairs: list[dict[str, Any]]  # one per layer of the deeper model: a_layer, b_layer, similarity, per fingerprint
    matrix: list[list[float]]  # layer similarity, A's layers x B's layers (of `layer_fingerprint`)
    layer_fingerprint: str = ""  # which fingerprint paired the layers (aligned circuits when it could run)
    chance_layer: list[float] = field(default_factory=list)  # that fingerprint's chance samples, all families
    shared_tokens: int = 0
    shared_fraction: dict[str, float] = field(default_factory=dict)
    token_match: str = "none"
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def get(self, name: str) -> Evidence | None:
        return next((e for e in self.evidence if e.name == name), None)


def _shuffled(rows: list[int], gen: torch.Generator) -> list[int]:
    return [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]


def _circuit_score(fa: fp.Folded, fb: fp.Folded, ia: list[int], ib: list[int]
                   ) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    sim, per = fp.circuit_similarity(fa, fb, *fp.alignment(fa, fb, ia, ib))
    return matched_score(sim), sim, per


def _reference_scores(a: Weights, b: Weights, refs: Sequence[Weights]) -> dict[str, list[float]]:
    """Each fingerprint of A and of B against every reference model (independently trained, so: chance)."""
    out: dict[str, list[float]] = {}
    for ref in refs:
        for x in (a, b):
            scores = _invariant_scores(x, ref)
            scores.update(_basis_scores(x, ref))
            for k, v in scores.items():
                out.setdefault(k, []).append(v)
    return out


def _invariant_scores(a: Weights, b: Weights) -> dict[str, float]:
    """The invariant fingerprints' observed values (those that can be computed for this pair)."""
    out: dict[str, float] = {}
    tokens = shared_tokens(a, b)
    if tokens.count < MIN_SHARED:
        return out
    fa, fb = a.folded(), b.folded()
    geo = shared_tokens(a, b, fp.MAX_TOKENS)
    out[TOKEN_GEOMETRY] = fp.token_geometry(fa, fb, geo.rows_a, geo.rows_b)
    if fa.dim == fb.dim and a.n_layers and b.n_layers and tokens.count >= 2 * fa.dim:
        out[CIRCUITS] = _circuit_score(fa, fb, tokens.rows_a, tokens.rows_b)[0]
    return out


def _basis_scores(a: Weights, b: Weights) -> dict[str, float]:
    out: dict[str, float] = {}
    if a.n_layers and b.n_layers:
        sim, per = similarity_matrix(layer_fingerprints(a), layer_fingerprints(b))
        if per:
            out[CHANNELS] = matched_score(sim)
    t = shared_tokens(a, b)
    if t.count:
        e = embedding_score(embedding_matrices(a), embedding_matrices(b), t.rows_a, t.rows_b)
        if not math.isnan(e):
            out[EMBED_ROWS] = e
    return out


def compare(a: Weights, b: Weights, *, seeds: int = 4, seed: int = 0, references: Sequence[Weights] = ()
            ) -> Comparison:
    """Audit A against B: invariant and per-channel fingerprints, layer pairing, chance baseline, verdict."""
    if seeds < 2:
        raise ConfigError("--seeds must be at least 2 (the chance spread needs two samples)")
    gen = torch.Generator().manual_seed(seed)
    evidence: list[Evidence] = []
    ref = _reference_scores(a, b, references)
    tokens = shared_tokens(a, b)
    layer_sets: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    # invariant: token geometry, then aligned circuits (same width, enough shared tokens to fit the rotation)
    if tokens.count >= MIN_SHARED:
        fa, fb = a.folded(), b.folded()
        geo = shared_tokens(a, b, fp.MAX_TOKENS)
        ga, gb, k = geo.rows_a, geo.rows_b, geo.count
        samples: dict[str, list[float]] = {"init": [], "shuffled": []}
        for _ in range(seeds):
            ra = fp.random_folded(k, fa.dim, [], 1, 1, gen)
            rb = fp.random_folded(k, fb.dim, [], 1, 1, gen)
            samples["init"] += [fp.token_geometry(fa, rb, ga, list(range(k))),
                                fp.token_geometry(ra, fb, list(range(k)), gb)]
            samples["shuffled"].append(fp.token_geometry(fa, fb, ga, _shuffled(gb, gen)))
        evidence.append(_evidence(
            TOKEN_GEOMETRY, fp.token_geometry(fa, fb, ga, gb), {**samples, "reference": ref.get(TOKEN_GEOMETRY, [])},
            note=f"Pearson correlation of the pairwise cosines of {k} shared tokens' embedding and output rows"))
        same_width = fa.dim == fb.dim and a.n_layers and b.n_layers
        if same_width and tokens.count >= 2 * fa.dim:
            ia, ib = tokens.rows_a, tokens.rows_b
            score, sim, per = _circuit_score(fa, fb, ia, ib)
            layer_sets[CIRCUITS] = (sim, per)
            samples = {"init": [], "shuffled": []}
            for _ in range(seeds):
                rb = fp.random_folded(len(ib), fb.dim, layer_shapes(b), *b.heads, gen)
                ra = fp.random_folded(len(ia), fa.dim, layer_shapes(a), *a.heads, gen)
                samples["init"] += [_circuit_score(fa, rb, ia, list(range(len(ib))))[0],
                                    _circuit_score(ra, fb, list(range(len(ia))), ib)[0]]
                samples["shuffled"].append(_circuit_score(fa, fb, ia, _shuffled(ib, gen))[0])
            evidence.append(_evidence(
                CIRCUITS, score, {**samples, "reference": ref.get(CIRCUITS, [])},
                note=f"mean cosine of {len(per)} circuit matrices over paired layers, B rotated onto A by "
                     f"Procrustes on {len(ia)} shared tokens"))

    # basis-dependent: per-channel statistics of the layers, embedding rows position by position
    fa_ch, fb_ch = (layer_fingerprints(a), layer_fingerprints(b)) if a.n_layers and b.n_layers else ([], [])
    sim, per = similarity_matrix(fa_ch, fb_ch) if fa_ch and fb_ch else (torch.zeros(0, 0), {})
    if per:
        layer_sets[CHANNELS] = (sim, per)
        shapes_a, shapes_b = layer_shapes(a), layer_shapes(b)
        samples = {"init": [], "shuffled": []}
        for _ in range(seeds):
            samples["init"] += [
                matched_score(similarity_matrix(fa_ch, random_init_fingerprints(shapes_b, gen))[0]),
                matched_score(similarity_matrix(random_init_fingerprints(shapes_a, gen), fb_ch)[0])]
            samples["shuffled"].append(matched_score(similarity_matrix(fa_ch, permuted_fingerprints(fb_ch, gen))[0]))
        evidence.append(_evidence(CHANNELS, matched_score(sim), {**samples, "reference": ref.get(CHANNELS, [])},
                                  note=f"mean Pearson correlation of {len(per)} per-channel statistics over paired "
                                       "layers, position by position"))
        match = match_layers(sim)
        ones = [{n: torch.ones_like(v) if n.endswith("_norm") else v for n, v in layer.items()} for layer in fb_ch]
        evidence.append(_evidence(RAW_NORMS, raw_norm_cosine(fa_ch, fb_ch, match),
                                  {"norms at 1.0": [raw_norm_cosine(fa_ch, ones, match)]}, used=False,
                                  note="plain cosine of RMSNorm weights, as in the 2026 public claim; its chance "
                                       "level (against norms at their initial 1.0) is shown to say why it proves "
                                       "nothing on its own"))
    if tokens.count:
        ma, mb = embedding_matrices(a), embedding_matrices(b)
        ia, ib = tokens.rows_a, tokens.rows_b
        emb = embedding_score(ma, mb, ia, ib)
        if not math.isnan(emb):
            samples = {"init": [], "shuffled": []}
            for _ in range(seeds):
                rand_b = [torch.randn(len(ib), m.shape[1], generator=gen) for m in mb]
                rand_a = [torch.randn(len(ia), m.shape[1], generator=gen) for m in ma]
                perm_b = [m[:, torch.randperm(m.shape[1], generator=gen)] for m in mb]
                idx = list(range(len(ib)))
                samples["init"] += [embedding_score(ma, rand_b, ia, idx),
                                    embedding_score(rand_a, mb, list(range(len(ia))), ib)]
                samples["shuffled"].append(embedding_score(ma, perm_b, ia, ib))
            evidence.append(_evidence(EMBED_ROWS, emb, {**samples, "reference": ref.get(EMBED_ROWS, [])},
                                      note=f"mean cosine of the rows of {len(ia)} shared tokens, position by "
                                           "position"))

    # layer pairing: from the invariant circuits when they ran, else from the channel statistics
    primary = CIRCUITS if CIRCUITS in layer_sets else CHANNELS
    pairs: list[dict[str, Any]] = []
    matrix: list[list[float]] = []
    if primary in layer_sets:
        sim, per = layer_sets[primary]
        matrix = sim.tolist()
        pairs = [{"a_layer": i, "b_layer": j, "similarity": float(sim[i, j]),
                  **{name: float(m[i, j]) for name, m in per.items()}} for i, j in match_layers(sim)]

    used = [e for e in evidence if e.used]
    if not used:
        verdict = NOT_COMPARABLE
        summary = ("nothing to compare: the hidden sizes differ and too few tokens are shared, so the weights "
                   "share no coordinates (distillation or training on outputs leaves no weight fingerprint)")
    elif any(e.passed for e in used):
        verdict = LIKELY_DERIVED
        summary = "; ".join(f"{e.name} {e.observed:.3f} vs chance {e.chance_mean:.3f} ± {e.chance_std:.3f} "
                            f"(threshold {e.threshold:.3f})" for e in used if e.passed)
    else:
        verdict = INDEPENDENT
        summary = "no fingerprint above chance: " + "; ".join(
            f"{e.name} {e.observed:.3f} <= threshold {e.threshold:.3f}" for e in used)
    primary_ev = next((e for e in evidence if e.name == primary), None)
    return Comparison(model=a.path, against=b.path, verdict=verdict, summary=summary, evidence=evidence,
                      pairs=pairs, matrix=matrix, layer_fingerprint=primary if pairs else "",
                      chance_layer=[x for v in (primary_ev.chance.values() if primary_ev else []) for x in v],
                      shared_tokens=tokens.count, shared_fraction=tokens.fraction(), token_match=tokens.how)


# ------------------------------------------------------------------------------------------------- reporting


def plot_comparison(c: Comparison, out_png: Path, label_a: str, label_b: str) -> Path | None:
    """Left: the layer similarity matrix with the chosen pairs; right: each pair's similarity against chance."""
    layers = c.get(c.layer_fingerprint)
    if not c.matrix or layers is None:
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
    ax1.set_title(f"per-layer similarity ({c.layer_fingerprint})")
    ax1.legend(loc="upper right", fontsize=8)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    xs = list(range(len(c.pairs)))
    ax2.bar(xs, [p["similarity"] for p in c.pairs], color="tab:blue", label="paired layers")
    ax2.axhspan(layers.chance_mean - layers.chance_std, layers.chance_mean + layers.chance_std, color="grey",
                alpha=0.3, label="chance (mean ± std)")
    ax2.axhline(layers.threshold, color="tab:red", linestyle="--", label="evidence threshold")
    ax2.set_xticks(xs, [f"{p['a_layer']}→{p['b_layer']}" for p in c.pairs], rotation=90, fontsize=7)
    ax2.set_ylim(min(-0.2, min(p["similarity"] for p in c.pairs) - 0.05), 1.05)
    ax2.set_ylabel("similarity")
    ax2.set_title(f"verdict: {c.verdict}")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def format_comparison(c: Comparison) -> str:
    lines = [f"{c.model}  vs  {c.against}", f"  verdict: {c.verdict.upper()} — {c.summary}"]
    if c.token_match == "text":
        f = c.shared_fraction
        lines.append(f"  shared tokens: {c.shared_tokens} (matched by text; {f['of_model']:.0%} of the model's "
                     f"vocabulary, {f['of_against']:.0%} of the other's)")
    for e in c.evidence:
        judged = (f"threshold {e.threshold:6.3f}   {'ABOVE' if e.passed else 'below'}" if e.used
                  else "not used for the verdict")
        lines.append(f"  {e.name:<26} {e.observed:7.3f}   chance {e.chance_mean:6.3f} ± {e.chance_std:.3f}   {judged}")
    if c.pairs:
        lines.append(f"  layer pairs by {c.layer_fingerprint} (model→against: similarity): " + ", ".join(
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


def reproduce_command(model: str | Path, against: Sequence[str | Path], *, out_dir: str | Path, seeds: int, seed: int,
                      references: Sequence[str | Path] = ()) -> str:
    """The exact command line that recomputes this audit (every number in it is deterministic given the seed)."""
    args = ["kfoundry", "provenance", "audit", "--model", str(model), "--against", *map(str, against),
            "--seeds", str(seeds), "--seed", str(seed)]
    if references:
        args += ["--reference", *map(str, references)]
    return shlex.join(args + ["--out", str(out_dir)])


METHOD = [
    "Invariant fingerprints (what the verdict rests on): (1) token geometry — the Pearson correlation of the "
    "pairwise cosines of shared tokens' input embeddings and output rows (final norm folded in); (2) aligned "
    "circuits — per layer, qk = Σ_h Wq_hᵀ Wk_g(h), ov = Σ_h Wo_h Wv_g(h), gate = Wgᵀ Wg and updown = Wd Wu with "
    "RMSNorm weights folded in, identity part removed, unit Frobenius norm, compared as cosines after rotating B "
    "onto A by orthogonal Procrustes on the shared tokens; layers paired by best match.",
    "Basis-dependent fingerprints (catch undisguised copies, erased by a permutation): per-channel statistics "
    "(norm weights, column norms of [q;k;v] and [gate;up], row norms of o and down, per-unit norms of gate) and "
    "embedding rows position by position, as Pearson correlations.",
    f"Tokens are matched by the text they stand for (byte-level and SentencePiece spellings decoded, NFC); at most "
    f"{fp.MAX_TOKENS} shared tokens (chosen by a hash of their text) enter token geometry.",
    f"Chance: per fingerprint, families 'init' (independently initialised models of each side's shape), "
    f"'shuffled' (B with channels or token identities shuffled: its statistics kept, its link to A broken) and "
    f"'reference' (independently trained models given with --reference). Evidence: above every family's mean + "
    f"max({Z:g} x spread, {MIN_MARGIN}). Verdict 'likely derived' when any used fingerprint is evidence.",
]


def audit(model: str | Path, against: list[str | Path], *, out_dir: str | Path | None = None, seeds: int = 4,
          seed: int = 0, references: Sequence[str | Path] = ()) -> list[Comparison]:
    """Compare MODEL with each of AGAINST; with `out_dir`, write audit.json, audit.md and one plot per pair.

    `references` are models trained independently of MODEL and of every AGAINST (ideally on similar data): their
    similarity to each side becomes the 'reference' chance family, the honest null for models that share a corpus.
    """
    if not against:
        raise ConfigError("give at least one model to audit against (--against B [C ...])")
    a = load_weights(model)
    refs = [load_weights(r) for r in references]
    results = []
    for k, other in enumerate(against):
        b = load_weights(other)
        c = compare(a, b, seeds=seeds, seed=seed, references=refs)
        if out_dir is not None:
            png = plot_comparison(c, Path(out_dir) / f"audit-{k}-{_safe(short_label(other))}.png",
                                  short_label(model), short_label(other))
            c.plot = str(png) if png else None
        results.append(c)
        del b
    if out_dir is not None:
        out = Path(out_dir)
        command = reproduce_command(model, against, out_dir=out, seeds=seeds, seed=seed, references=references)
        hashes = {str(p): weight_files_sha256(p) for p in [model, *against, *references]}
        atomic_write_json(out / "audit.json", {
            "model": str(model), "seeds": seeds, "seed": seed, "z": Z, "min_margin": MIN_MARGIN,
            "references": [str(r) for r in references], "method": METHOD, "invariant_to": INVARIANT_TO,
            "reproduce": {"command": command, "code": code_version(), "weights_sha256": hashes},
            "comparisons": [c.to_dict() for c in results]})
        md = ["# Originality audit", "", f"Model: `{model}`", "", "## Method", ""]
        md += [f"- {m}" for m in METHOD]
        md += ["", "Invariances claimed (by construction; each is disguised and re-audited in "
               "tests/test_provenance_audit.py; measured robustness to training, merging and noise is in "
               "docs/provenance.md):", ""]
        md += [f"- **{name}**: {', '.join(inv) if inv else 'nothing (shown only)'}"
               for name, inv in INVARIANT_TO.items()]
        code = code_version()
        state = {True: "with uncommitted changes", False: "clean", None: "state unknown"}[code["git_dirty"]]
        md += ["", "## Reproduce", "", "```bash", command, "```", "",
               f"kfoundry {code['kfoundry']}, git commit {code['git_commit'] or 'unknown'} ({state}); "
               "weight files (sha256):", ""]
        md += [f"- `{p}`: " + ", ".join(f"{f} `{h}`" for f, h in hs.items()) for p, hs in hashes.items()]
        md.append("")
        for c in results:
            md += [f"## against `{c.against}`", "", f"**{c.verdict}** — {c.summary}", ""]
            if c.token_match != "none":
                f = c.shared_fraction
                md += [f"Shared tokens: {c.shared_tokens} (matched by {c.token_match}; {f['of_model']:.1%} of the "
                       f"model's vocabulary, {f['of_against']:.1%} of the other's).", ""]
            md += ["| fingerprint | observed | chance (all samples) | chance by family | threshold | z | counts |",
                   "|---|---|---|---|---|---|---|"]
            for e in c.evidence:
                fams = "; ".join(f"{k}: " + ", ".join(f"{x:.3f}" for x in v) for k, v in e.chance.items())
                md.append(f"| {e.name} | {e.observed:.3f} | {e.chance_mean:.3f} ± {e.chance_std:.3f} | {fams} | "
                          f"{f'{e.threshold:.3f}' if e.used else '—'} | {e.z:.1f} | "
                          f"{('**yes, above**' if e.passed else 'yes, below') if e.used else 'no (shown only)'} |")
            if c.pairs:
                md += ["", f"Layer pairs ({c.layer_fingerprint}):", "",
                       "| model layer | against layer | similarity |", "|---|---|---|"]
                md += [f"| {p['a_layer']} | {p['b_layer']} | {p['similarity']:.3f} |" for p in c.pairs]
            if c.plot:
                md += ["", f"![layer similarity]({Path(c.plot).name})"]
            md.append("")
        atomic_write_text(out / "audit.md", "\n".join(md))
    return results
