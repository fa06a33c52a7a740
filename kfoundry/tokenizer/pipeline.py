"""The tokenizer's pipeline: which Hugging Face `tokenizers` components we use, and why.

A byte-level BPE tokenizer is four stages. Every choice below is made so that the same `tokenizer.json`
behaves identically in `tokenizers`, in `transformers`, and in llama.cpp (whose `llama-bpe` pre-tokenizer
is the Llama-3 one, so a GGUF export can name it instead of shipping a new regex):

1. Normalizer: NFC. Korean typed on macOS or copied from some web pages arrives as decomposed jamo (NFD);
   NFC composes it into the syllables a reader sees, so "한" is one character either way. Never NFKC: it
   folds full-width forms and circled numbers (①) into other characters and changes the text.
2. Pre-tokenizer: split with the Llama-3 regex (words with at most one leading non-letter, numbers in
   groups of at most three digits, punctuation runs, whitespace runs), then map every UTF-8 byte to a
   printable character (`ByteLevel`, with `use_regex=False` because the split is already done and
   `add_prefix_space=False` so "the" at the start of a text is not silently turned into " the").
   Merges never cross a split boundary, so a token never glues a word to the punctuation after it.
3. Model: BPE over bytes, with all 256 bytes in the initial alphabet, so any input encodes (an unseen
   emoji or Hanja falls back to its bytes; there is no `<unk>`). `ignore_merges=True` (as in Llama-3)
   looks a whole pre-token up in the vocabulary first and only runs the merges when it is absent.
4. Decoder: `ByteLevel`, which maps the printable characters back to bytes and decodes UTF-8.

Special tokens use the Llama-3 names, so chat templates and tools written for Llama-3 read ours.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# The Llama-3 pre-tokenizer regex (also llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3, "llama-bpe").
# \p{L} is any letter, so a Korean word (Hangul syllables) is one pre-token, and so is an English word
# with its leading space (" fox"). Digits are split into runs of 1-3 so numbers tokenize consistently.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"  # end of one chat turn; generation of an assistant reply stops here
N_RESERVED = 4  # spare ids for later use (tool calls, FIM) without changing the vocabulary size

# Order fixes the ids: special tokens take ids 0..len-1, ahead of the 256 byte tokens and the merges.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, START_HEADER, END_HEADER, EOT) + tuple(
    f"<|reserved_special_token_{i}|>" for i in range(N_RESERVED)
)

# Bytes every vocabulary starts with: the 256 printable stand-ins ByteLevel maps bytes onto.
BYTE_ALPHABET: tuple[str, ...] = tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))

# What llama.cpp calls this pre-tokenizer; recorded in the metadata for the GGUF exporter.
LLAMA_CPP_PRE = "llama-bpe"


def byte_decoder() -> dict[str, int]:
    """Map each ByteLevel stand-in character back to the byte it represents (GPT-2's bytes_to_unicode).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD)
    are shifted to U+0100 onwards in byte order. We rebuild the table instead of trusting a private API.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the full pipeline in place; training fills the BPE vocabulary."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def add_bos_post_processor(tok: Tokenizer, bos_id: int) -> None:
    """Make `add_special_tokens=True` prepend BOS, as Llama-3 does.

    Our own `KTokenizer.encode` always calls with `add_special_tokens=False` and adds BOS/EOS itself;
    this only sets what `transformers` users get from `tokenizer(text)`, so it matches Llama-3 habits.
    """
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
