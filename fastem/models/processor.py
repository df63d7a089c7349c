"""Build a ``transformers.WhisperProcessor`` from the files of a CTranslate2 Whisper export.

A CTranslate2 export carries ``tokenizer.json`` (the hub tokenizer, which stops at
``<|notimestamps|>``) and ``vocabulary.txt`` (one token per line, id = line number, including the
1,501 timestamp tokens ``<|0.00|>`` ... ``<|30.00|>`` that the decoder's output layer also covers).
The tokenizer is ``tokenizer.json`` plus those trailing tokens, checked id by id against
``vocabulary.txt`` so that model logits and token ids can never drift apart.

Some exports also lose a BPE merge: the multilingual base package's ``tokenizer.json`` lacks the first
one, ``Ġ t`` (as if read as a header line), so encoding split every word that starts with " t"
(" the" became "Ġ" + "the", and a leading "Ġ" is a token Whisper never emits first).  Decoding never
needs merges; encoding does (the verifier, prompts).  :func:`repair_merges` puts such a merge back.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from transformers import AddedToken, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

__all__ = ["read_vocabulary", "build_tokenizer", "build_processor", "check_vocabulary", "repair_merges"]

_EOT = "<|endoftext|>"


def read_vocabulary(path: str | Path) -> list[str]:
    """Tokens of a CTranslate2 ``vocabulary.txt``, index = token id."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    # Tokens never contain a newline (byte-level BPE maps it to "Ċ"); strip a Windows "\r" only.
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_vocabulary(tokenizer: WhisperTokenizer, vocabulary: list[str]) -> None:
    """Raise ``ValueError`` unless ``tokenizer`` maps every id to the token in ``vocabulary``."""
    if len(tokenizer) != len(vocabulary):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocabulary.txt lists {len(vocabulary)}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    mismatches = [(i, t, v) for i, (t, v) in enumerate(zip(tokens, vocabulary)) if t != v]
    if mismatches:
        i, t, v = mismatches[0]
        raise ValueError(
            f"{len(mismatches)} token ids differ from vocabulary.txt; first: id {i} is {t!r} in the "
            f"tokenizer but {v!r} in vocabulary.txt"
        )


def repair_merges(model: dict) -> list[str]:
    """Put back the merges a byte-level BPE ``model`` (the ``"model"`` of a ``tokenizer.json``) lost.

    In such a vocabulary every token above the 256 byte symbols is the result of one merge, and merges
    are listed in id order.  A multi-character token no merge produces, with exactly one way to split it
    into two tokens of lower id, gets that merge back at its rank.  Returns the merges added."""
    vocab, merges = model.get("vocab") or {}, model.get("merges") or []
    as_lists = bool(merges) and isinstance(merges[0], list)
    pairs = [tuple(m) if as_lists else tuple(m.split(" ", 1)) for m in merges]
    produced = {a + b for a, b in pairs}
    added = []
    for token, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tid < 256 or len(token) < 2 or token in produced or token.startswith("<|"):
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if vocab.get(token[:i], tid) < tid and vocab.get(token[i:], tid) < tid]
        if len(splits) != 1:
            continue
        rank = sum(vocab.get(a + b, -1) < tid for a, b in pairs)
        pairs.insert(rank, splits[0])
        produced.add(token)
        added.append(" ".join(splits[0]))
    if added:
        model["merges"] = [list(p) for p in pairs] if as_lists else [" ".join(p) for p in pairs]
    return added


def build_tokenizer(model_dir: str | Path) -> WhisperTokenizer:
    """The Whisper tokenizer of a CTranslate2 export directory (``tokenizer.json`` + ``vocabulary.txt``)."""
    model_dir = Path(model_dir)
    vocabulary = read_vocabulary(model_dir / "vocabulary.txt")
    with open(model_dir / "tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    repaired = repair_merges(data.get("model") or {})
    fd, path = tempfile.mkstemp(suffix=".json") if repaired else (None, str(model_dir / "tokenizer.json"))
    try:
        if repaired:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False)
        tokenizer = WhisperTokenizer(tokenizer_file=path, unk_token=_EOT, bos_token=_EOT, eos_token=_EOT, pad_token=_EOT)
    finally:
        if repaired:
            os.unlink(path)
    # Register the <|...|> control tokens as the extra special tokens, in id order, as the hub
    # tokenizers do: transformers takes ``all_special_ids[-1] + 1`` as the first timestamp id.
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    tokenizer.add_special_tokens({"extra_special_tokens": specials})
    base_size = len(tokenizer)
    if base_size > len(vocabulary):
        raise ValueError(
            f"{model_dir}: tokenizer.json has {base_size} tokens, more than the {len(vocabulary)} in vocabulary.txt"
        )
    extra = vocabulary[base_size:]
    if extra:
        # Timestamp tokens are not special (the hub tokenizers mark them the same way): decode()
        # filters them itself, and skip_special_tokens must not be what hides them.
        tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in extra])
    check_vocabulary(tokenizer, vocabulary)
    if extra and tokenizer.all_special_ids[-1] + 1 != base_size:
        raise ValueError(
            f"{model_dir}: the last special token (id {tokenizer.all_special_ids[-1]}) does not precede the "
            f"first timestamp token (id {base_size}); timestamps would decode wrongly"
        )
    return tokenizer


def build_processor(model_dir: str | Path, num_mel_bins: int) -> WhisperProcessor:
    """Feature extractor (log-mel, 16 kHz, 30 s windows) + tokenizer for a CTranslate2 export."""
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=build_tokenizer(model_dir))
