"""Weight fingerprints that no function-preserving reparametrization can change.

A Llama block computes the same function after any of these, so a disguise can use all of them at no cost:

    residual stream   any orthogonal map Q (a permutation is one), once every RMSNorm weight is folded into
                      the matrices that read its output (RMSNorm divides by rms(x), and only an orthogonal Q
                      keeps rms(Qx) = rms(x))
    norm weights      any per-channel rescaling s, undone in the columns of the matrices that read the norm
    SwiGLU units      any permutation, and up_i * c with down[:, i] / c (up is linear; silu(gate) is not)
    heads             any permutation of key/value groups with their query heads, and of query heads in a group
    value/output      per key/value head, v -> A v and o -> o A^-1 for any invertible A
    query/key         per key/value group, each rotary pair (i, i + head_dim/2) of q times c*R(phi) and of k times
                      R(phi)/c: a 2-D rotation commutes with RoPE's, and c cancels in q.k

So we fingerprint only quantities these cannot move (`Folded` holds them):

**Token geometry** (models that share tokens). E Q^T has the same Gram matrix as E, so the cosine similarity of
every pair of token embeddings (rows centred first) is invariant; so is the output head's, with the final norm
folded in. Tokens are matched by the text they stand for (`token_keys`), so tokenizers that differ compare on
their shared part, and the widths may even differ.

**Aligned circuits** (same width). Per layer, four d x d matrices in which every block-internal freedom cancels:

    qk     = sum_h Wq_h^T Wk_g(h)        the attention score form (query/key transforms cancel)
    ov     = sum_h Wo_h Wv_g(h)          what each layer writes for what it reads (value/output transforms cancel)
    gate   = Wg^T Wg                     the SwiGLU gates' read directions (unit order cancels)
    updown = Wd Wu                       the linear path of the MLP (unit order and up/down scales cancel)

(inputs with their RMSNorm weight folded in). Each transforms as M -> Q M Q^T under a residual rotation, so once Q
is known they compare entry by entry. Q is recovered by orthogonal Procrustes between the two models' embeddings
of the shared tokens (Schönemann 1966). We drop each matrix's identity part (tr(M)/d I, identical in every basis,
and large in a Gram matrix) and compare unit-norm matrices by their Frobenius inner product.

**The data-driven directions are set aside.** The top few principal directions of a trained embedding are set by
the corpus (token frequency first), and models trained independently on one corpus agree on them: with them in,
independent seeds of test-micro score higher on token geometry than a copy retrained for 3x its training
(bench/audit_separation.py; the figures are in docs/benchmarks.md). Both fingerprints therefore project out the
top shared_rank(d) = max(2, d/16) principal directions first (each side's own for token geometry, both sides'
together for the circuits); what remains is the structure the random initialisation left, which only a copy
shares (independent seeds then score near zero, the copy clearly above them).

Per-channel statistics (audit.py) are kept alongside: they need no alignment and catch a plain copy, but a
permutation erases them. Singular-value spectra are invariant too, but every trained model's spectra look alike,
so they identify little; we do not use them (see docs/provenance.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from kfoundry.tokenizer.pipeline import byte_decoder

CIRCUITS = ("qk", "ov", "gate", "updown")
MAX_TOKENS = 2048  # token geometry compares K(K-1)/2 pairs: 2048 tokens give 2M pairs, plenty, in 32 MiB


# ------------------------------------------------------------------------------------------------ token keys


def token_keys(vocab: dict[str, int], tokenizer_json: Path | None = None) -> dict[str, int]:
    """Map each token to the text it stands for, so tokenizers of different families match.

    Byte-level BPE writes bytes as stand-in characters ("Ġ" is a space); SentencePiece writes "▁" for a space and
    "<0xAB>" for raw bytes. Both become the bytes they encode, then NFC text when those bytes are whole UTF-8 (an NFD
    token and its NFC twin are the same text). A byte fragment that is not valid UTF-8 keeps a hex key. Two
    tokens with one key (possible only across normalisation forms) are both dropped: we cannot tell which matches.
    """
    byte_level = True
    if tokenizer_json is not None and tokenizer_json.is_file():
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(
            spec.get("pre_tokenizer"))
    table = byte_decoder()
    out: dict[str, int] = {}
    clash: set[str] = set()
    for tok, idx in vocab.items():
        if byte_level and all(ch in table for ch in tok):
            raw = bytes(table[ch] for ch in tok)
        elif tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
            raw = bytes([int(tok[3:5], 16)])
        elif byte_level:  # a special token such as <|begin_of_text|>: its name is its identity
            raw = tok.encode("utf-8")
        else:
            raw = tok.replace("\u2581", " ").encode("utf-8")
        try:
            key = "t:" + unicodedata.normalize("NFC", raw.decode("utf-8"))
        except UnicodeDecodeError:
            key = "b:" + raw.hex()
        if key in out:
            clash.add(key)
        out[key] = idx
    for key in clash:
        del out[key]
    return out


def shared_tokens(keys_a: dict[str, int], keys_b: dict[str, int], rows_a: int, rows_b: int,
                  limit: int = MAX_TOKENS) -> tuple[list[int], list[int]]:
    """Row ids of tokens both sides have, at most `limit`, chosen by a hash of the key (the same choice for any
    pair of tokenizers sharing those tokens, and independent of id order)."""
    common = [k for k in keys_a if k in keys_b and keys_a[k] < rows_a and keys_b[k] < rows_b]
    common.sort(key=lambda k: hashlib.sha1(k.encode("utf-8", "surrogatepass")).hexdigest())
    common = common[:limit]
    return [keys_a[k] for k in common], [keys_b[k] for k in common]


# ------------------------------------------------------------------------------------------------ folding


@dataclass
class Folded:
    """The invariant view of a model: token matrices and per-layer circuit matrices, norms folded in.

    embed: [V, d] input embeddings; head: [V, d] output rows times the final norm weight (tied models too);
    circuits: {name: [L, d, d]} with each matrix's identity part removed and scaled to unit Frobenius norm.
    """

    embed: torch.Tensor
    head: torch.Tensor
    circuits: dict[str, torch.Tensor]

    @property
    def dim(self) -> int:
        return self.embed.shape[1]


def _unit_traceless(m: torch.Tensor) -> torch.Tensor:
    """Remove tr(M)/d * I (the same in every basis) and scale to unit Frobenius norm; zero stays zero."""
    m = m.double()
    d = m.shape[-1]
    eye = torch.eye(d, dtype=m.dtype)
    m = m - (m.diagonal(dim1=-2, dim2=-1).sum(-1) / d)[..., None, None] * eye
    n = m.flatten(-2).norm(dim=-1)[..., None, None]
    return torch.where(n > 0, m / n.clamp_min(1e-300), m)


def layer_circuits(get, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """The four invariant d x d matrices of one block; `get(name)` returns its parameter `name` (fp32)."""
    w_attn, w_mlp = get("input_layernorm.weight").double(), get("post_attention_layernorm.weight").double()
    q = get("self_attn.q_proj.weight").double() * w_attn
    k = get("self_attn.k_proj.weight").double() * w_attn
    v = get("self_attn.v_proj.weight").double() * w_attn
    o = get("self_attn.o_proj.weight").double()
    hd = q.shape[0] // n_heads
    group = n_heads // n_kv_heads
    # each query head h reads key/value head h // group (SDPA's enable_gqa and HF's repeat_kv agree)
    k_rep = k.view(n_kv_heads, hd, -1).repeat_interleave(group, dim=0).reshape(n_heads * hd, -1)
    v_rep = v.view(n_kv_heads, hd, -1).repeat_interleave(group, dim=0).reshape(n_heads * hd, -1)
    gate = get("mlp.gate_proj.weight").double() * w_mlp
    up = get("mlp.up_proj.weight").double() * w_mlp
    down = get("mlp.down_proj.weight").double()
    return {"qk": _unit_traceless(q.T @ k_rep), "ov": _unit_traceless(o @ v_rep),
            "gate": _unit_traceless(gate.T @ gate), "updown": _unit_traceless(down @ up)}


def fold(state: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int) -> Folded:
    """The invariant view of a Llama state dict (Hugging Face names; a missing lm_head means tied)."""
    embed = state["model.embed_tokens.weight"].double()
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"]).double()
    if "model.norm.weight" in state:
        head = head * state["model.norm.weight"].double()
    per = [layer_circuits(lambda n, i=i: state[f"model.layers.{i}.{n}"], n_heads, n_kv_heads)
           for i in range(n_layers)]
    circuits = {c: torch.stack([p[c] for p in per]) if per else torch.zeros(0, embed.shape[1], embed.shape[1],
                                                                          dtype=torch.float64)
                for c in CIRCUITS}
    return Folded(embed, head, circuits)


def random_folded(vocab: int, dim: int, shapes: list[dict[str, tuple[int, ...]]], n_heads: int, n_kv_heads: int,
                  gen: torch.Generator) -> Folded:
    """The invariant view of an independently initialised model of these shapes (Gaussian matrices, norms at 1;
    every quantity is scale-free, so the init std does not matter)."""
    per = []
    for layer in shapes:
        params = {p: (torch.ones(s) if p.endswith("layernorm.weight") else torch.randn(s, generator=gen))
                  for p, s in layer.items()}
        per.append(layer_circuits(params.__getitem__, n_heads, n_kv_heads))
    embed = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    empty = torch.zeros(0, dim, dim, dtype=torch.float64)
    return Folded(embed, embed.clone(), {c: torch.stack([p[c] for p in per]) if per else empty for c in CIRCUITS})


# ------------------------------------------------------------------------------------------------ comparisons


def shared_rank(dim: int) -> int:
    """How many leading principal directions of the token embeddings we set aside as data-driven (see below)."""
    return max(2, dim // 16)


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x.double() - x.double().mean(dim=0)


def _top_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """[d, k]: the top-k principal directions of the rows of x (already centred), from the d x d scatter matrix
    (an eigendecomposition of d x d is much cheaper than an SVD of the K x d rows)."""
    _, vecs = torch.linalg.eigh(x.T @ x)
    return vecs[:, -k:] if k > 0 else vecs[:, :0]


def _without_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows centred, their top-k principal components projected out, scaled to unit length."""
    x = _centred(x)
    top = _top_directions(x, min(k, x.shape[1]))
    r = x - (x @ top) @ top.T
    return r / r.norm(dim=1, keepdim=True).clamp_min(1e-300)


def gram_correlation(xa: torch.Tensor, xb: torch.Tensor, k: int | None = None) -> float:
    """Pearson correlation of the pairwise token cosines of two [K, d] matrices (rows = the same K tokens), after
    each side's own top-k principal components are removed (k = shared_rank(d) by default).

    Why remove them: the leading directions of a trained embedding are set by the data (token frequency first),
    so models trained independently on one corpus agree on them; with them in, two such models correlate at
    0.86-0.90 (measured, docs/provenance.md). What remains is the structure the random initialisation left,
    which only a copy shares. Invariant to any orthogonal map and scale of either side, so widths may differ."""
    xa = _without_top(xa, shared_rank(xa.shape[1]) if k is None else k)
    xb = _without_top(xb, shared_rank(xb.shape[1]) if k is None else k)
    # The K x K Gram matrices are never formed: with unit rows, <Ga, Gb> = |Xa^T Xb|^2, sum(G) = |sum of rows|^2,
    # and the diagonal is all ones, which gives the off-diagonal sums in O(K d^2) time and O(d^2) memory.
    n_tok = xa.shape[0]
    n = n_tok * (n_tok - 1)
    if n == 0:
        return 0.0
    sa, sb = (float(x.sum(dim=0).pow(2).sum()) - n_tok for x in (xa, xb))
    saa, sbb, sab = (float((x.T @ y).pow(2).sum()) - n_tok for x, y in ((xa, xa), (xb, xb), (xa, xb)))
    cov = sab / n - (sa / n) * (sb / n)
    var = (saa / n - (sa / n) ** 2) * (sbb / n - (sb / n) ** 2)
    return cov / math.sqrt(var) if var > 0 else 0.0


def token_geometry(fa: Folded, fb: Folded, ia: list[int], ib: list[int]) -> float:
    """Mean Gram correlation of the input embeddings and of the output rows over the shared tokens."""
    return 0.5 * (gram_correlation(fa.embed[ia], fb.embed[ib]) + gram_correlation(fa.head[ia], fb.head[ib]))


def procrustes(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """The orthogonal R with x_a ≈ R x_b over the rows (tokens) of [K, d] matrices, rows centred, scale ignored."""
    u, _, vh = torch.linalg.svd(_centred(xa).T @ _centred(xb))
    return u @ vh


def _token_rows(f: Folded, idx: list[int]) -> torch.Tensor:
    """Input and output rows of the tokens `idx`, each block centred and scaled to unit norm, stacked."""
    parts = []
    for m in (f.embed[idx], f.head[idx]):
        m = _centred(m)
        parts.append(m / m.norm().clamp_min(1e-300))
    return torch.cat(parts)


def alignment(fa: Folded, fb: Folded, ia: list[int], ib: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P): R maps B's residual basis onto A's, fitted on the input and output rows of the shared tokens
    together; P (in A's basis) projects out the top shared_rank(d) directions of both models' token rows, the
    data-driven part every model trained on similar text has (see gram_correlation)."""
    xa, xb = _token_rows(fa, ia), _token_rows(fb, ib)
    r = procrustes(xa, xb)
    top = _top_directions(torch.cat([xa, xb @ r.T]), shared_rank(fa.dim))
    return r, torch.eye(fa.dim, dtype=torch.float64) - top @ top.T


def circuit_similarity(fa: Folded, fb: Folded, r: torch.Tensor, p: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """S[i, j] = mean over the four circuits of the cosine of P A_i P and P R B_j R^T P (identity parts removed)."""
    p = torch.eye(fa.dim, dtype=torch.float64) if p is None else p
    per = {}
    for c in CIRCUITS:
        a = _unit_traceless(p @ fa.circuits[c] @ p).flatten(1)
        b = _unit_traceless(p @ (r @ fb.circuits[c] @ r.T) @ p).flatten(1)
        per[c] = a @ b.T
    return torch.stack(list(per.values())).mean(dim=0), per


def spectrum_similarity(fa: Folded, fb: Folded) -> float:
    """Alignment-free and invariant, but weak (so the audit does not use it; bench/audit_separation.py shows it):
    per layer, the Pearson correlation of the log singular values of the four circuits, averaged over layers
    paired by position (the shallower depth). Every trained model's spectra decay alike, so unrelated models
    score nearly as high as copies."""
    n = min(len(fa.circuits["qk"]), len(fb.circuits["qk"]))
    if n == 0 or fa.dim != fb.dim:
        return float("nan")

    def logs(f: Folded) -> torch.Tensor:
        s = torch.stack([torch.linalg.svdvals(f.circuits[c][:n]) for c in CIRCUITS], 1).flatten(1)
        s = s.clamp_min(1e-12).log()
        return s - s.mean(dim=1, keepdim=True)

    x, y = logs(fa), logs(fb)
    return float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-300)).mean())
