"""Domain benchmark: WER of each adaptation method across 20+ shifted domains.

* :mod:`harness.data`    manifests, utterance records, audio reading, deterministic selection
* :mod:`harness.domains` the corruptions and the named domain registries: :data:`DOMAINS` (DEV) and
  :data:`CONFIRM_DOMAINS` (the held-out CONFIRM protocol, on its own data set)
* :mod:`harness.runner`  work items, sharding over ranks, resumable JSONL rows, the methods
* :mod:`harness.report`  aggregation, markdown tables, the figure

The command line is ``benchmarks/wer_domains.py`` (``--profile smoke|quick|screen|dev|full|confirm``).
"""
from .data import Utterance, default_data_dir, load_manifest, select_utterances
from .domains import CONFIRM_DOMAINS, DOMAINS, Domain, get_domain, resolve_domains

__all__ = ["CONFIRM_DOMAINS", "DOMAINS", "Domain", "Utterance", "default_data_dir", "get_domain", "load_manifest",
           "resolve_domains", "select_utterances"]
