"""`KFoundryLM`: a kfoundry checkpoint as an lm-evaluation-harness model, registered under the name `kfoundry`.

    lm_eval --model kfoundry --model_args model=runs/x/ckpt/step-000400 --tasks kobest   (see plugin.py)
    kfoundry eval --model runs/x/ckpt/step-000400 --tasks kobest --out runs/x/eval/eval.json

It subclasses lm-eval's `TemplateLM`, so text is turned into tokens exactly as lm-eval's own Hugging Face model
does (that is what makes the parity test meaningful):

- every context starts with BOS, as every training document did; an empty context is BOS alone;
- trailing spaces of a context move to the continuation, and the continuation's tokens are those of
  `encode(context + continuation)` after the context's tokens;
- text is NFC-normalised by the tokenizer.

What differs is how the tokens are run. `loglikelihood` packs the choices of a question behind one copy of their
shared context and only applies the output head where a token is scored (see scoring.py); `loglikelihood_rolling`
scores disjoint windows that fill the model's context; `generate_until` uses the KV-cache generator with a batch
of prompts and stops at EOS/EOT or at any of the task's stop strings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.errors import ConfigError
from kfoundry.eval import scoring
from kfoundry.model.device import pick_device
from kfoundry.model.generate import SamplingParams, generate

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _AllStopped(Exception):
    """Raised from the generator's token callback once every row has produced a stop string."""


@register_model("kfoundry")
class KFoundryLM(TemplateLM):
    """lm-eval model over a kfoundry checkpoint directory.

    model_args: model=CKPT (or pretrained=CKPT), device=auto|cpu|cuda[:N], dtype=float32|bfloat16|float16,
    batch_size=N (rows per forward pass; "auto" = 64), token_budget=N (padded tokens per forward pass),
    max_length=N (default: the model's context), max_gen_toks=N.
    """

    backend = "causal"

    def __init__(self, model: Any = None, pretrained: str | None = None, tokenizer: Any = None,
                 device: str | None = "auto", dtype: str = "float32", batch_size: int | str | None = 64,
                 max_batch_size: int | None = None, token_budget: int | str = 8192, max_length: int | str | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("kfoundry model: ignoring unknown model_args %s", sorted(unused))
        source = model if model is not None else pretrained
        if source is None:
            raise ConfigError("kfoundry model needs model=CHECKPOINT_DIR (--model_args model=...)")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(source, (str, Path)):
            # lm-eval's CLI asks for cuda:0 by default: without a GPU this runs on the CPU (as its own `hf` model does)
            self._device = pick_device(device)
            self.model = load_model(source, self._device)
            self.tok = load_tokenizer(source)
            self.source = str(source)
        else:  # an already loaded Transformer (the speedrun hands over the model it just trained)
            if tokenizer is None:
                raise ConfigError("pass tokenizer= together with a model object")
            self.model, self.tok, self.source = source, tokenizer, "<in-memory model>"
            self._device = self.model.lm_head.weight.device
        self.model.to(DTYPES[dtype]).eval()
        self.dtype = dtype
        rows = batch_size if batch_size not in (None, "auto") and not str(batch_size).startswith("auto") else 64
        self.max_rows = int(rows)
        if max_batch_size:
            self.max_rows = min(self.max_rows, int(max_batch_size))
        self.token_budget = int(token_budget)
        self._max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = None  # lm-eval reads .tokenizer for HF chat templates; ours are served below

    # ------------------------------------------------------------------------------------- identity

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, the token every training document starts with."""
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"kfoundry-{self.tok.hash[:16]}"

    def get_model_info(self) -> dict[str, Any]:
        return {"model_source": self.source, "model_num_parameters": self.model.num_params(),
                "model_dtype": self.dtype, "tokenizer_hash": self.tok.hash}

    # ----------------------------------------------------------------------------------- tokenizing

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids with a leading BOS, unless add_special_tokens=False or the text already starts with BOS
        written out (a rendered chat template does)."""
        ids = self.tok.encode(string)
        if add_special_tokens is False or (ids and ids[0] == self.tok.bos_id):
            return ids
        return [self.tok.bos_id, *ids]

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="kfoundry loglikelihood") as bar:
            results = scoring.score(self.model, pairs, max_len=self.max_length, token_budget=self.token_budget,
                                    max_rows=self.max_rows, on_batch=bar.update)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: every token predicted once, BOS first, windows of the full context."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in scoring.rolling_windows(self.tok_encode(text, add_special_tokens=False),
                                                     self.prefix_token_id, self.max_length):
                windows.append((ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens([(None, c, k) for c, k in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample=True) continuations, cut at the first stop string."""
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kfoundry generate_until")
        for key, members in by_kwargs.items():
            gen_kwargs = json.loads(key)
            prompts = {i: self.tok_encode(requests[i].args[0]) for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.max_rows):
                chunk = order[start:start + self.max_rows]
                for i, text in zip(chunk, self._generate([prompts[i] for i in chunk], gen_kwargs)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def _generate(self, prompts: list[list[int]], gen_kwargs: dict[str, Any]) -> list[str]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        max_new = max(1, min(max_new, self.max_length - 1))
        prompts = [p[-(self.max_length - max_new):] for p in prompts]  # keep the end of a long prompt
        sample = bool(gen_kwargs.get("do_sample", False))
        params = SamplingParams(max_new_tokens=max_new,
                                temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
                                top_k=int(gen_kwargs.get("top_k") or 0), top_p=float(gen_kwargs.get("top_p") or 1.0),
                                seed=int(gen_kwargs.get("seed", 1234)))
        tokens: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)

        def on_token(row: int, tok: int) -> None:
            tokens[row].append(tok)
            if until and not stopped[row] and any(s in self.tok.decode(tokens[row]) for s in until):
                stopped[row] = True
                if all(stopped):
                    raise _AllStopped

        try:
            # the generator's own return value equals `tokens` when it runs to the end
            generate(self.model, prompts, params, stop_ids={self.tok.eos_id, self.tok.eot_id},
                     pad_id=self.tok.pad_id, on_token=on_token)
        except _AllStopped:
            pass
        texts = []
        for row in tokens:
            text = self.tok.decode(row, skip_special=True)
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            texts.append(text[:cut])
        return texts
