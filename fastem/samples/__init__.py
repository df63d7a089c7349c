"""Sample audio shipped with fastem: a clean LibriSpeech utterance and a real background noise.

Small enough to live in the package (< 250 KB), so demos and smoke tests run offline. Licences
and attribution are in ``README.md`` next to this file.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SAMPLES_DIR", "Sample", "sample_paths"]

SAMPLES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    """The shipped sample: ``speech`` and ``noise`` FLAC paths, the speech's ``text`` and ``language``."""

    speech: Path
    noise: Path
    text: str
    language: str

    def __iter__(self):
        """Unpacks as ``speech, noise, text``."""
        return iter((self.speech, self.noise, self.text))


def _manifest() -> list[dict[str, str]]:
    with open(SAMPLES_DIR / "manifest.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def sample_paths() -> Sample:
    """Paths of the shipped speech and noise clips and the speech's reference transcript.

    ``speech, noise, text = sample_paths()`` works, as do ``.speech``, ``.noise``, ``.text`` and
    ``.language``.
    """
    rows = {row["kind"]: row for row in _manifest()}
    speech, noise = rows["speech"], rows["noise"]
    return Sample(
        speech=SAMPLES_DIR / speech["path"],
        noise=SAMPLES_DIR / noise["path"],
        text=speech["text"],
        language=speech["lang"],
    )
