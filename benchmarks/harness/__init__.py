"""Domain benchmark: WER of each adaptation method across 20+ shifted domains.

* :mod:`harness.data`    manifests, utterance records, audio reading, deterministic selection
* :mod:`harness.domains` the corruptions and the named domain registry :data:`DOMAINS`
* :mod:`harness.runner`  work items, sharding over ranks, resumable JSONL rows, the methods
* :mod:`harness.report`  aggregation, markdown tables, the figure

The command line is ``benchmarks/wer_domains.py`` (``--profile smoke|quick|screen|dev|full``).
"""
from .data import Utterance, default_data_dir, load_manifest, select_utterances
from .domains import DOMAINS, Domain, resolve_domains

__all__ = ["DOMAINS", "Domain", "Utterance", "default_data_dir", "load_manifest", "resolve_domains",
           "select_utterances"]
