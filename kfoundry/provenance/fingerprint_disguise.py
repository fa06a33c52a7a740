"""Disguises: the function-preserving reparametrizations a skeptic would use to hide a model's parent.

The audit claims its fingerprints cannot be moved by these (kfoundry/provenance/fingerprint.py says why). This
module makes each one on a Llama state dict (Hugging Face names), so anyone can check that claim on their own
model: disguise it, confirm the logits did not change, and audit the copy against the original. The tests do
exactly that (tests/test_provenance_audit.py), and so does `bench/audit_separation.py`.

Every function returns a new state dict that always holds `lm_head.weight` (the tied head is copied out, because
folding the final norm into the head unties it). Randomness comes from the `torch.Generator` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

NORM_READERS = {  # each RMSNorm weight and the matrices that read its output
    "input_layernorm.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "post_attention_layernorm.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
READS_RESIDUAL = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight")  # [out, dim]: columns are residual channels
WRITES_RESIDUAL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # [dim, in]: rows are residual channels


def n_layers(state: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[2] for k in state if k.startswith("model.layers.")})


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A float copy with an explicit `lm_head.weight` (a tied model's head is its embedding)."""
    out = {k: v.detach().clone().float() for k, v in state.items()}
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"].clone())
    return out


def random_orthogonal(dim: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _each_layer(state: dict[str, torch.Tensor], fn: Callable[[str], None]) -> None:
    for i in range(n_layers(state)):
        fn(f"model.layers.{i}.")


# ------------------------------------------------------------------------------------------------ residual stream


def permute_residual(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Re-order the residual channels everywhere: embeddings, head, every norm, every reader and writer."""
    s = untied(state)
    perm = torch.randperm(s["model.embed_tokens.weight"].shape[1], generator=gen)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        s[k] = s[k][:, perm]
    s["model.norm.weight"] = s["model.norm.weight"][perm]

    def layer(p: str) -> None:
        for n in NORM_READERS:
            s[p + n] = s[p + n][perm]
        for n in READS_RESIDUAL:
            s[p + n] = s[p + n][:, perm]
        for n in WRITES_RESIDUAL:
            s[p + n] = s[p + n][perm]

    _each_layer(s, layer)
    return s


def fold_norms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move every RMSNorm weight into the matrices that read its output; the norms become all ones."""
    s = untied(state)
    s["lm_head.weight"] = s["lm_head.weight"] * s["model.norm.weight"]
    s["model.norm.weight"] = torch.ones_like(s["model.norm.weight"])

    def layer(p: str) -> None:
        for norm, readers in NORM_READERS.items():
            for r in readers:
                s[p + r] = s[p + r] * s[p + norm]
            s[p + norm] = torch.ones_like(s[p + norm])

    _each_layer(s, layer)
    return s


def rotate_residual(state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Fold the norms, then rotate the residual stream by a random orthogonal Q (x -> Q x everywhere)."""
    s = fold_norms(state)
    q = random_orthogonal(s["model.embed_tokens.weight"].shape[1], gen)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        s[k] = (s[k].double() @ q.T).float()

    def layer(p: str) -> None:
        for n in READS_RESIDUAL:
            s[p + n] = (s[p + n].double() @ q.T).float()
        for n in WRITES_RESIDUAL:
            s[p + n] = (q @ s[p + n].double()).float()

    _each_layer(s, layer)
    return s


def rescale_norms(state: dict[str, torch.Tensor], gen: torch.Generator, spread: float = 0.5
                  ) -> dict[str, torch.Tensor]:
    """Multiply each block's norm weights per channel by s (log-normal) and divide the readers' columns by s, so
    that the norms look trained again after a fold (the final norm and the head likewise)."""
    s = untied(state)

    def scales(n: int) -> torch.Tensor:
        return torch.exp(spread * torch.randn(n, generator=gen))

    def layer(p: str) -> None:
        for norm, readers in NORM_READERS.items():
            c = scales(s[p + norm].shape[0])
            s[p + norm] = s[p + norm] * c
            for r in readers:
                s[p + r] = s[p + r] / c

    _each_layer(s, layer)
    c = scales(s["model.norm.weight"].shape[0])
    s["model.norm.weight"] = s["model.norm.weight"] * c
    s["lm_head.weight"] = s["lm_head.weight"] / c
    return s


def scale_residual(state: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Scale the whole residual stream: embeddings and every writer times `factor`. RMSNorm divides it out again
    (exactly, up to its eps: with eps > 0 the logits move slightly, so this one is function-preserving only in
    the limit of a small eps)."""
    s = untied(state)
    s["model.embed_tokens.weight"] = s["model.embed_tokens.weight"] * factor

    def layer(p: str) -> None:
        for n in WRITES_RESIDUAL:
            s[p + n] = s[p + n] * factor

    _each_layer(s, layer)
    return s


# ------------------------------------------------------------------------------------------------ inside blocks


def permute_mlp(state: dict[str, torch.Tensor], gen: torch.Generator, spread: float = 0.5
                ) -> dict[str, torch.Tensor]:
    """Per block: re-order the SwiGLU units, and scale each unit's up row by c (either sign) and its down column
    by 1/c."""
    s = untied(state)

    def layer(p: str) -> None:
        ffn = s[p + "mlp.gate_proj.weight"].shape[0]
        perm = torch.randperm(ffn, generator=gen)
        c = torch.exp(spread * torch.randn(ffn, generator=gen)) * (torch.randint(0, 2, (ffn,), generator=gen) * 2 - 1)
        s[p + "mlp.gate_proj.weight"] = s[p + "mlp.gate_proj.weight"][perm]
        s[p + "mlp.up_proj.weight"] = s[p + "mlp.up_proj.weight"][perm] * c[:, None]
        s[p + "mlp.down_proj.weight"] = s[p + "mlp.down_proj.weight"][:, perm] / c

    _each_layer(s, layer)
    return s


def permute_heads(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int, gen: torch.Generator,
                  spread: float = 0.5) -> dict[str, torch.Tensor]:
    """Per block: re-order key/value groups (with their query heads) and the query heads inside each group; give
    each group's rotary pairs a rotation and a query/key scale that cancel in q.k; and give each value head an
    invertible map A undone by A^-1 in the output columns of the heads that read it."""
    s = untied(state)
    group = n_heads // n_kv_heads

    def layer(p: str) -> None:
        q = s[p + "self_attn.q_proj.weight"].double()
        dim = q.shape[1]
        hd = q.shape[0] // n_heads
        q = q.view(n_heads, hd, dim)
        k = s[p + "self_attn.k_proj.weight"].double().view(n_kv_heads, hd, dim)
        v = s[p + "self_attn.v_proj.weight"].double().view(n_kv_heads, hd, dim)
        o = s[p + "self_attn.o_proj.weight"].double().view(dim, n_heads, hd)
        kv_perm = torch.randperm(n_kv_heads, generator=gen)
        q_perm = torch.cat([g * group + torch.randperm(group, generator=gen) for g in kv_perm.tolist()])
        q, o, k, v = q[q_perm].clone(), o[:, q_perm].clone(), k[kv_perm].clone(), v[kv_perm].clone()
        half = hd // 2
        for g in range(n_kv_heads):
            # rotary pairs (i, i + half): q -> c R(phi), k -> R(phi) / c, the same for every query head of the group
            phi = 2 * math.pi * torch.rand(half, generator=gen, dtype=torch.float64)
            c = torch.exp(spread * torch.randn(half, generator=gen, dtype=torch.float64))
            cos, sin = phi.cos()[:, None], phi.sin()[:, None]

            def turn(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
                a, b = x[:half], x[half:]
                return torch.cat([scale[:, None] * (cos * a - sin * b), scale[:, None] * (sin * a + cos * b)])

            k[g] = turn(k[g], 1 / c)
            heads = range(g * group, (g + 1) * group)
            for h in heads:
                q[h] = turn(q[h], c)
            # value head g: v -> A v, and each reading head's output columns o_h -> o_h A^-1
            a = random_orthogonal(hd, gen) * torch.exp(spread * torch.randn(hd, generator=gen, dtype=torch.float64))
            a_inv = torch.linalg.inv(a)
            v[g] = a @ v[g]
            for h in heads:
                o[:, h] = o[:, h] @ a_inv
        s[p + "self_attn.q_proj.weight"] = q.reshape(n_heads * hd, dim).float()
        s[p + "self_attn.k_proj.weight"] = k.reshape(n_kv_heads * hd, dim).float()
        s[p + "self_attn.v_proj.weight"] = v.reshape(n_kv_heads * hd, dim).float()
        s[p + "self_attn.o_proj.weight"] = o.reshape(dim, n_heads * hd).float()

    _each_layer(s, layer)
    return s


# ------------------------------------------------------------------------------------------ not function-preserving


def add_noise(state: dict[str, torch.Tensor], gen: torch.Generator, relative: float = 0.05
              ) -> dict[str, torch.Tensor]:
    """Gaussian noise on every matrix, `relative` times that matrix's own std (norm weights are left alone)."""
    s = untied(state)
    for k, t in s.items():
        if t.dim() == 2:
            s[k] = t + relative * t.std() * torch.randn(t.shape, generator=gen)
    return s


def remap_vocab(state: dict[str, torch.Tensor], keys_from: dict[str, int], keys_to: dict[str, int],
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Move the embedding and head rows onto another tokenizer: a token both have keeps its row (matched by the
    text it stands for, `fingerprint.token_keys`); a new token starts at the mean row plus noise of the rows' std,
    as vocabulary extension usually does."""
    s = untied(state)
    rows = max(keys_to.values()) + 1
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = s[name]
        new = old.mean(dim=0) + old.std() * torch.randn(rows, old.shape[1], generator=gen)
        for key, idx in keys_to.items():
            if key in keys_from and keys_from[key] < old.shape[0]:
                new[idx] = old[keys_from[key]]
        s[name] = new
    return s


def full_disguise(state: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int, gen: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """Every function-preserving disguise at once: heads, SwiGLU units, a residual rotation, then trained-looking
    norm weights."""
    s = permute_heads(state, n_heads, n_kv_heads, gen)
    s = permute_mlp(s, gen)
    s = rotate_residual(s, gen)
    return rescale_norms(s, gen)
