"""fastem.text: Whisper normalisers and WER."""
from __future__ import annotations

import json
import math

import pytest

from fastem import text
from fastem.text import normalize, wer, word_errors


@pytest.mark.parametrize("raw, expected", [
    ("And so my fellow Americans, ask not what your country can do for you.",
     "and so my fellow americans ask not what your country can do for you"),
    ("Mr. Smith won't pay $20 for twenty-five apples!", "mister smith will not pay $20 for 25 apples"),
    ("Uh, I think [NOISE] it is (maybe) 3.5 percent, um", "i think it is 3.5%"),
    ("HE HOPED THERE WOULD BE STEW", "he hoped there would be stew"),
    ("  spaced\tout\n", "spaced out"),
    ("", ""),
])
def test_english_normalizer(raw, expected):
    assert normalize(raw) == expected
    assert normalize(raw, language="English") == expected


def test_basic_normalizer_for_other_languages():
    assert normalize('Vodník řekl: "Ahoj!"', language="cs") == "vodník řekl ahoj"
    assert normalize("Wat doe je (zachtjes) daar?", language="nl") == "wat doe je daar"
    assert normalize("Mr. Smith won't", language="nl") == "mr smith won t"  # no English rules


def test_spelling_table_is_used_when_available(tmp_path, monkeypatch):
    table = tmp_path / "english.json"
    table.write_text(json.dumps({"colour": "color"}), encoding="utf-8")
    monkeypatch.setenv("FASTEM_SPELLING_MAPPING", str(table))
    text.english_spelling_mapping.cache_clear()
    text._english.cache_clear()
    try:
        assert normalize("The colour red") == "the color red"
    finally:
        monkeypatch.delenv("FASTEM_SPELLING_MAPPING")
        text.english_spelling_mapping.cache_clear()
        text._english.cache_clear()


def test_word_errors_and_wer_on_known_pairs():
    assert word_errors("the cat sat on the mat", "the cat sat on mat") == (1, 6)
    assert word_errors("the cat sat", "a cat sat down") == (2, 3)  # one substitution, one insertion
    assert wer("the cat sat on the mat", "the cat sat on mat") == pytest.approx(1 / 6)
    assert wer("Hello, World!", "hello world") == 0.0
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sat on mat", "hello there world"]
    assert wer(refs, hyps) == pytest.approx(2 / 8)  # corpus WER: total errors / total reference words


def test_empty_references_and_hypotheses():
    assert word_errors("hello world", "") == (2, 2)
    assert word_errors("", "oh no") == (2, 0)
    assert word_errors("", "uh um") == (0, 0)  # fillers are dropped by the normaliser
    assert word_errors("[NOISE]", "") == (0, 0)
    assert wer(["", "good day"], ["extra", "good day"]) == pytest.approx(1 / 2)
    assert wer("", "") == 0.0
    assert math.isinf(wer([""], ["something"]))


def test_wer_argument_errors():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        wer("a", ["a"])
