"""The error family (kfoundry/errors.py) and the rule that keeps the CLI honest.

The CLI prints an exception in one line only when it is a `KFoundryError`; it no longer guesses from where a
`ValueError` was raised. So every check a user can trip must raise a `KFoundryError`, and a bare
`raise ValueError(...)` (or FileNotFoundError / FileExistsError / NotADirectoryError) is allowed only where it
guards an internal invariant: if it fires, kfoundry has a bug, and the traceback is what a bug report needs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kfoundry import errors
from kfoundry.cli import is_user_error
from kfoundry.corpus import CorpusError
from kfoundry.convert.import_hf import UnsupportedConfigError
from kfoundry.errors import (CheckpointError, ConfigError, DataError, DependencyError, KFoundryError,
                             MissingPathError, PathExistsError)
from kfoundry.fileio import atomic_dir
from kfoundry.model.generate import SamplingParams
from kfoundry.model.sampling import filter_logits
from kfoundry.provenance.ledger import LedgerError
from kfoundry.serve.schemas import CompletionRequest

PACKAGE = Path(__file__).resolve().parents[1] / "kfoundry"
BUILTINS = {"ValueError", "FileNotFoundError", "FileExistsError", "NotADirectoryError"}

# (module under kfoundry/, enclosing function) -> (bare raises there, why each is an internal invariant).
INTERNAL_INVARIANTS = {
    ("data/curate/io.py", "CorpusReader.__init__"): (1, "n_shards comes from prepare(), which refuses --tasks < 1"),
    ("eval/frontier.py", "weighted_mean"): (2, "eval/report.py passes one task size per value, each positive"),
    ("eval/frontier.py", "macro_mean"): (1, "eval/report.py calls it only with at least one anchored task"),
    ("eval/kobest.py", "macro_f1"): (1, "lm-eval aggregates the items it scored, never none"),
    ("eval/scoring.py", "split_request"): (1, "KFoundryLM conditions an empty context on BOS before scoring"),
    ("model/decode.py", "prefill_keys"): (1, "callers fit the prompt to the decoder's positions first"),
    ("model/decode.py", "SequenceDecoder.__init__"): (1, "callers check SequenceDecoder.supports() first"),
    ("model/decode.py", "SequenceDecoder.step"): (1, "callers stop generating at the context length"),
    ("model/llama.py", "KVCache.update"): (1, "generate() and the server keep prompt + new tokens in the cache"),
    ("model/llama.py", "Transformer.hidden"): (1, "only training passes a DocumentMask, and never with a cache"),
    ("model/llama.py", "Transformer.forward"): (1, "config.validate() already refuses train.z_loss < 0"),
    ("model/masks.py", "DocumentMask.from_lengths"): (1, "the packing loader builds lengths that fit its rows"),
    ("model/sampling.py", "_per_row"): (1, "callers pass one setting, or one per row"),
    ("model/sampling.py", "filter_logits"): (1, "callers send temperature 0 to greedy; validate() refuses < 0"),
    ("serve/batch.py", "SlotCache.bind"): (2, "the scheduler binds only slots it has, for requests that fit"),
    ("serve/batch.py", "SlotCache.positions"): (1, "our forward pass always bind()s the slots first"),
    ("serve/batch.py", "SlotCache.update"): (1, "our forward pass always bind()s the slots first"),
    ("serve/batch.py", "PreparedSlots.__init__"): (1, "make_slots() checks PreparedSlots.supports() first"),
    ("serve/batch.py", "PreparedSlots.step"): (1, "the scheduler admits a request only if it fits max_len"),
    ("serve/textstream.py", "TextStream.extend"): (1, "our callers use extend() only on streams without stops"),
    ("train/distributed.py", "all_reduce_sum"): (1, "the trainer puts tensors on the process group's device"),
    ("train/optim.py", "split_parameters"): (1, "every parameter of our Transformer has an optimizer role"),
}


def bare_raises(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each `raise B(...)` / `raise B` with B a builtin of BUILTINS, and
    (`class X`, line) of each exception class that derives from one without deriving from KFoundryError."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            bases = {b.id for b in getattr(child, "bases", ()) if isinstance(b, ast.Name)}
            if isinstance(child, ast.ClassDef) and bases & BUILTINS and "KFoundryError" not in bases:
                found.append((f"class {child.name}", child.lineno))
            if isinstance(child, ast.Raise) and child.exc is not None:
                target = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(target, ast.Name) and target.id in BUILTINS:
                    found.append((".".join(scope), child.lineno))
            inner = scope + [child.name] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.ClassDef)) else scope
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), [])
    return found


def test_every_user_facing_raise_is_a_kfoundry_error():
    """A new `raise ValueError(...)` in kfoundry fails here: raise ConfigError / CheckpointError / DataError /
    MissingPathError / PathExistsError instead, or, for a true internal invariant, add it to
    INTERNAL_INVARIANTS with the reason it cannot fire without a bug."""
    seen: Counter = Counter()
    where: dict = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for scope, line in bare_raises(path):
            seen[(rel, scope)] += 1
            where.setdefault((rel, scope), []).append(f"kfoundry/{rel}:{line}")
    expected = Counter({key: n for key, (n, _) in INTERNAL_INVARIANTS.items()})
    unexpected = {key: where[key] for key in seen if seen[key] > expected[key]}
    assert not unexpected, f"bare builtin exceptions where a user can cause them: {unexpected}"
    stale = {key: (expected[key], seen[key]) for key in expected if seen[key] != expected[key]}
    assert not stale, f"INTERNAL_INVARIANTS lists raises that are gone (want, found): {stale}"


def test_the_scan_sees_what_it_must(tmp_path):
    """The guard would pass vacuously if the scanner missed a form; show it catches each one."""
    src = ("class Bad(ValueError):\n    pass\n\n"
           "def f(x):\n    if x:\n        raise ValueError('call')\n    raise FileExistsError\n\n"
           "class C:\n    def m(self):\n        raise NotADirectoryError('method')\n\n"
           "def ok():\n    raise ConfigError('fine')\n")
    path = tmp_path / "probe.py"
    path.write_text(src, encoding="utf-8")
    assert bare_raises(path) == [("class Bad", 1), ("f", 6), ("f", 7), ("C.m", 11)]


@pytest.mark.parametrize("cls, builtin", [
    (ConfigError, ValueError), (CheckpointError, ValueError), (DataError, ValueError),
    (MissingPathError, FileNotFoundError), (PathExistsError, FileExistsError),
    (DependencyError, ImportError), (CorpusError, ValueError), (LedgerError, ValueError),
    (UnsupportedConfigError, ValueError)])
def test_each_error_is_both_a_kfoundry_error_and_the_builtin_it_replaced(cls, builtin):
    assert issubclass(cls, KFoundryError) and issubclass(cls, builtin)
    assert cls.__doc__ and cls.__doc__.strip()


def test_every_class_in_errors_py_is_in_the_family():
    classes = [v for v in vars(errors).values() if isinstance(v, type) and v.__module__ == errors.__name__]
    assert len(classes) >= 7 and all(issubclass(c, KFoundryError) for c in classes)


def test_a_user_mistake_is_one_line_and_an_internal_invariant_keeps_its_traceback(tmp_path):
    # A setting a user chose: ConfigError, still caught by `except ValueError`.
    with pytest.raises(ValueError, match="temperature must be >= 0") as user:
        SamplingParams(temperature=-1.0).validate()
    assert type(user.value) is ConfigError and is_user_error(user.value)
    # An invariant our own callers keep (temperature 0 goes to greedy): a plain ValueError, a bug if it fires.
    with pytest.raises(ValueError, match="temperature must be > 0 to sample") as bug:
        filter_logits(torch.zeros(1, 3), temperature=0.0)
    assert type(bug.value) is ValueError and not is_user_error(bug.value)
    # A folder in the way: PathExistsError, still caught by `except FileExistsError`.
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists") as exists:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x", encoding="utf-8")
    assert type(exists.value) is PathExistsError and is_user_error(exists.value)


def test_pydantic_validators_still_see_a_value_error():
    """The server's request checks raise ConfigError / DataError inside pydantic validators; pydantic must still
    report them as `value_error` with our message, which the server turns into its 400 answer."""
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]})
    [err] = e.value.errors()
    assert err["type"] == "value_error" and err["msg"] == "Value error, at most 4 stop sequences, got 5"
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": "안녕\ud800"})
    assert e.value.errors()[0]["msg"] == "Value error, not valid Unicode: a lone surrogate '\\ud800' at character 2"


def test_the_real_cli_prints_a_converted_check_in_one_line(tmp_path):
    """A tokenizer folder that does not exist: KTokenizer.load raises MissingPathError (once a bare
    FileNotFoundError), and the real CLI prints it as one line with exit code 2."""
    missing = tmp_path / "없는-토크나이저"
    text = tmp_path / "t.txt"
    text.write_text("안녕하세요 hello 123 🙂\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "kfoundry", "tokenizer", "stats", "--tokenizer", str(missing),
                        "--text", str(text)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"kfoundry: error: tokenizer directory not found: {missing}\n"
