"""Text tokenizers with ids identical to the ones the OpenCLIP checkpoints were trained with.

Two tokenizers cover the seed models:

* :class:`CLIPTokenizer` - OpenAI's CLIP BPE (ViT-B/32, ViT-B/16, ViT-bigG). The reference is
  ``open_clip.tokenizer.SimpleTokenizer(clean='lower')``; every id must match it, because a model fed
  different ids than it was trained on degrades silently.
* :class:`XLMRobertaTokenizer` - the sentencepiece-based XLM-R tokenizer, read from the checkpoint
  repository's ``tokenizer.json``. The reference is that file itself (its normalizer included), not
  open_clip's ``HFTokenizer``, which loses the normalizer under transformers 5.x.

How CLIPTokenizer stays exact and fast
--------------------------------------
open_clip spends most of its time in a pure-Python BPE loop. Here the steps are:

1. Cleaning in Python with the very same calls as open_clip (``ftfy.fix_text``, ``html.unescape`` twice,
   strip, whitespace collapse, lower).
2. Pre-tokenization with the very same ``regex`` pattern and flags as open_clip, in Python. The
   ``tokenizers`` library's own ``Split`` pre-tokenizer (Oniguruma) was measured *not* to be exact:
   its Unicode tables are older than the ``regex`` module's (about 17,000 code points assigned as
   letters in Unicode 16/17 split differently) and it treats U+0345 under IGNORECASE differently. It is
   also slower than ``regex`` on this pattern. The ``regex`` module is the one open_clip itself uses, so
   this step is identical by construction.
3. BPE of each piece with a ``tokenizers.models.BPE`` built from the bundled vocabulary
   (``end_of_word_suffix="</w>"``, a byte-level pre-tokenizer doing ``bytes_to_unicode``). The CLIP merge
   list is well formed (each merge's parts exist before it), for which the library's priority-queue
   merging gives the same result as open_clip's "lowest rank first, all occurrences" loop.
4. A bounded piece -> ids cache in front of step 3 (as open_clip caches its BPE). Like open_clip's
   cache, it is seeded with the literal pieces ``<start_of_text>`` / ``<end_of_text>``, which therefore
   map to the special ids 49406 / 49407 exactly where open_clip's regex isolates them.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import itertools
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable

import ftfy
import numpy as np
import regex
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

__all__ = [
    "CLIPTokenizer",
    "Tokenizer",
    "TokenizerError",
    "XLMRobertaTokenizer",
    "clean_lower",
    "clean_whitespace",
]

DEFAULT_CONTEXT_LENGTH = 77
_BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip: merges = lines[1 : 49152 - 256 - 2 + 1] (48,894 merges).
_N_MERGES = 49152 - 256 - 2
_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
# The same pattern and flags as open_clip's SimpleTokenizer (specials first, IGNORECASE).
_CLIP_PATTERN = regex.compile(
    "|".join(_CLIP_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(ValueError):
    """A tokenizer could not be built (file missing, corrupt or not in the expected format)."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the model front ends need from a tokenizer."""

    context_length: int
    pad_id: int

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids as a LongTensor [N, context_length] (a single string gives N = 1)."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text, specials included, after truncation (what the model really sees)."""
        ...


# --------------------------------------------------------------------------------------------------
# Cleaning: the exact open_clip functions (tokenizer.py basic_clean / whitespace_clean).


# ftfy dominates tokenization time (30-100 us a text). Printable ASCII without "&" (plus tab and newline)
# is returned unchanged by every step of ftfy.fix_text (its encoding fixer returns ASCII as is; the other
# fixers only act on "&" entities, "\r", ESC sequences, control or non-ASCII characters; NFC leaves ASCII
# alone) and by html.unescape (no "&"). So such texts skip both calls, which is exact, not approximate.
_FTFY_INERT = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")
# Probes for the claim above (all inert by the pattern), checked once against the installed ftfy before
# the shortcut is trusted, so a future ftfy that touches ASCII turns it off rather than changing ids.
_FTFY_PROBES = (
    "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"),
    "a\tb\nc\n\n\td\n",
    "<b>bold</b> don't \"quote\" ``tick'' -- ... ;-) [x] <!-- lt; gt; #39; nbsp; -->",
    "A+ [31m \\x1b \\u00e9 %C3%A9 =C3=A9 \\N{BULLET} ~^_|",
)


@lru_cache(maxsize=1)
def _ftfy_inert_ok() -> bool:
    """True when the installed ftfy and html.unescape leave every probe unchanged."""
    return all(ftfy.fix_text(p) == p and html.unescape(p) == p for p in _FTFY_PROBES)


def _basic_clean(text: str) -> str:
    if _FTFY_INERT.fullmatch(text) is not None and _ftfy_inert_ok():
        return text.strip()
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def clean_lower(text: str) -> str:
    """open_clip's ``clean='lower'`` (CLIP BPE): ftfy, HTML unescape x2, whitespace collapse, lower."""
    return _whitespace_clean(_basic_clean(text)).lower()


def clean_whitespace(text: str) -> str:
    """open_clip's ``clean='whitespace'`` (HF tokenizers): as :func:`clean_lower` without lowercasing."""
    return _whitespace_clean(_basic_clean(text))


def _as_list(texts: str | Sequence[str]) -> list[str]:
    """Accept one string or a sequence of strings; reject anything else early with a clear message."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts must be str or a sequence of str, not bytes")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return out


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise TokenizerError(
            f"context_length must be an int >= 2 (room for the two specials), got {context_length!r}"
        )
    return context_length


def _pad_rows(rows: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    """Right-pad rows (each at most ``length`` long) into a LongTensor [N, length].

    Through numpy with one boolean-mask scatter: torch.tensor() on nested lists costs ~13 us a row.
    """
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), length), pad_id, dtype=np.int64)
    out[np.arange(length)[None, :] < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum())
    )
    return torch.from_numpy(out)


def _encode_batch(tok: tokenizers.Tokenizer, inputs: list, **kwargs: object) -> list[tokenizers.Encoding]:
    """``encode_batch_fast`` (no offsets, tokenizers >= 0.21) where available, else ``encode_batch``."""
    fast = getattr(tok, "encode_batch_fast", None)
    return (fast or tok.encode_batch)(inputs, **kwargs)


# --------------------------------------------------------------------------------------------------
# CLIP BPE


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character map (same order as open_clip's)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _read_bpe_vocab() -> str:
    try:
        ref = importlib.resources.files("clipserve.io").joinpath(_BPE_VOCAB_FILE)
        with ref.open("rb") as f:
            return gzip.decompress(f.read()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise TokenizerError(f"cannot read the CLIP BPE vocabulary {_BPE_VOCAB_FILE}: {e}") from e


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tokenizers.Tokenizer, dict[str, int]]:
    """The CLIP vocabulary and a BPE-only ``tokenizers.Tokenizer``, built once per process.

    The Tokenizer is never mutated after this point, so every CLIPTokenizer (and every thread) can share
    it: encode_batch only takes ``&self`` on the Rust side.
    """
    lines = _read_bpe_vocab().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{_BPE_VOCAB_FILE}: expected {_N_MERGES} merges of two symbols each")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = (
        byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(_CLIP_SPECIALS)
    )
    # dict(zip(...)) like open_clip: a later duplicate would win (the shipped file has none).
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>")
    tok = tokenizers.Tokenizer(bpe)
    # Pieces arrive pre-split by open_clip's regex; this only maps utf-8 bytes to bytes_to_unicode chars.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok, vocab


class CLIPTokenizer:
    """OpenAI CLIP BPE with ids identical to ``open_clip.tokenizer.SimpleTokenizer()`` (clean='lower').

    ``__call__`` returns [sot] + ids + [eot] zero-padded to ``context_length``; a longer sequence keeps
    its first ``context_length`` tokens with the last one replaced by eot (open_clip's truncation, which
    keeps the eot the text tower pools on). Safe to call from several threads.
    """

    sot_id = 49406
    eot_id = 49407
    pad_id = 0
    #: Bound on the piece cache (open_clip's is unbounded; a server sees unbounded distinct input).
    cache_size = 65536

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self.context_length = _check_context_length(context_length)
        self._bpe, self._vocab = _clip_bpe()
        self.vocab_size = len(self._vocab)
        assert self._vocab[_CLIP_SPECIALS[0]] == self.sot_id and self._vocab[_CLIP_SPECIALS[1]] == self.eot_id
        self._seed = {_CLIP_SPECIALS[0]: (self.sot_id,), _CLIP_SPECIALS[1]: (self.eot_id,)}
        # Swapped wholesale (never cleared in place) when full, so readers never see a half state; dict
        # get/set are atomic, so concurrent callers at worst compute a piece twice.
        self._cache: dict[str, tuple[int, ...]] = dict(self._seed)
        self._cache_lock = threading.Lock()

    def _pieces_to_ids(self, texts_pieces: list[list[str]]) -> list[list[int]]:
        cache = self._cache
        misses = list({p for pieces in texts_pieces for p in pieces if p not in cache})
        new: dict[str, tuple[int, ...]] = {}
        if misses:
            encs = _encode_batch(
                self._bpe, [[p] for p in misses], is_pretokenized=True, add_special_tokens=False
            )
            new = {p: tuple(e.ids) for p, e in zip(misses, encs, strict=True)}
            with self._cache_lock:
                if len(self._cache) + len(new) > self.cache_size:
                    self._cache = dict(self._seed)
                self._cache.update(new)
        out = []
        for pieces in texts_pieces:
            ids: list[int] = []
            for p in pieces:
                hit = cache.get(p)
                ids.extend(hit if hit is not None else new[p])
            out.append(ids)
        return out

    def encode(self, texts: str | Sequence[str]) -> list[list[int]]:
        """BPE ids per text without sot/eot and without truncation (open_clip's ``encode``)."""
        texts = _as_list(texts)
        return self._pieces_to_ids([_CLIP_PATTERN.findall(clean_lower(t)) for t in texts])

    def _with_specials(self, texts: str | Sequence[str]) -> list[list[int]]:
        n = self.context_length
        rows = []
        for ids in self.encode(texts):
            row = [self.sot_id, *ids[: n - 1]]
            if len(row) >= n:
                row[n - 1] = self.eot_id
            else:
                row.append(self.eot_id)
            rows.append(row)
        return rows

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor [N, context_length] of token ids (N = 1 for a single string)."""
        return _pad_rows(self._with_specials(texts), self.context_length, self.pad_id)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including sot/eot, after truncation to ``context_length``."""
        return [len(row) for row in self._with_specials(texts)]

    def __repr__(self) -> str:
        return f"CLIPTokenizer(context_length={self.context_length})"


# --------------------------------------------------------------------------------------------------
# XLM-R (tokenizer.json)


class XLMRobertaTokenizer:
    """XLM-RoBERTa ids from a repository's ``tokenizer.json``, its normalizer kept.

    Texts are pre-cleaned like open_clip's HFTokenizer (clean='whitespace': ftfy, HTML unescape x2,
    whitespace collapse, no lowercasing) and encoded as ``<s>`` (0) ... ``</s>`` (2), right-padded with
    ``<pad>`` (1); a long text keeps ``<s>`` + (context_length - 2) pieces + ``</s>``. That is what
    transformers' ``XLMRobertaTokenizerFast(tokenizer_file=...)(texts, max_length=context_length,
    padding="max_length", truncation=True)`` gives. Safe to call from several threads: truncation and
    padding are configured once on a private copy, and encoding does not mutate it.
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        source: str = "<memory>",
    ) -> None:
        self.context_length = _check_context_length(context_length)
        self.source = source
        # A private copy: enable_truncation/enable_padding mutate, and the caller's object may be shared.
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        for name, want in (("<s>", self.bos_id), ("<pad>", self.pad_id), ("</s>", self.eos_id)):
            got = tok.token_to_id(name)
            if got != want:
                raise TokenizerError(f"{source}: expected {name} = {want} as in XLM-R, the file has {got}")
        tok.no_truncation()
        tok.no_padding()
        probe = tok.encode("")
        if probe.ids != [self.bos_id, self.eos_id]:
            raise TokenizerError(
                f"{source}: its post-processor must wrap texts as <s> ... </s>, got {probe.ids}"
            )
        tok.enable_truncation(max_length=self.context_length)
        tok.enable_padding(
            direction="right", pad_id=self.pad_id, pad_token="<pad>", length=self.context_length
        )
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> XLMRobertaTokenizer:
        """Load ``tokenizer.json``; a missing or unreadable file raises TokenizerError naming it."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for JSON/format errors
            raise TokenizerError(f"cannot load tokenizer file {path}: {e}") from e
        return cls(tok, context_length=context_length, source=str(path))

    def _encode(self, texts: str | Sequence[str]) -> list[tokenizers.Encoding]:
        return _encode_batch(self._tok, [clean_whitespace(t) for t in _as_list(texts)])

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """LongTensor [N, context_length] of token ids (N = 1 for a single string)."""
        return _pad_rows([e.ids for e in self._encode(texts)], self.context_length, self.pad_id)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including <s>/</s>, after truncation (padding excluded)."""
        return [sum(e.attention_mask) for e in self._encode(texts)]

    def __repr__(self) -> str:
        return f"XLMRobertaTokenizer({self.source!r}, context_length={self.context_length})"
