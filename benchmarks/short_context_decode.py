#!/usr/bin/env python
"""Whisper decoded from the clip's own length instead of its 30-s padded input (no adaptation), on DEV.

    OMP_NUM_THREADS=2 python benchmarks/short_context_decode.py --model tiny.en \\
        --rows benchmarks/results/short_context_decode_tinyen_rows.jsonl
    python benchmarks/short_context_decode.py --model tiny.en --rows benchmarks/results/short_context_decode_tinyen_rows.jsonl \\
        --report

The question behind ``AdaptConfig.encoder_context="clip"``: the steps can run the encoder on the clip's frames
(:func:`fastem.whisper.clip_frames`: the clip rounded up to whole seconds, 1 s of margin), but is a transcript
decoded from that shorter input usable, so that the adapted transcript could be decoded from it too?  Per DEV
utterance (the dev profile's selection and transforms), the source model's transcript by Whisper's rules
(:func:`fastem.decoding.transcripts`, greedy with the fallback) from the full input and from the clip's
frames; one JSON line each, resumable.  ``--report`` prints the macro WER of each and how many transcripts get
worse, better, and much longer (a loop: more than 1.5 times the words of the full-input transcript).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fastem  # noqa: E402
from fastem.adapt import WHISPER  # noqa: E402
from fastem.decoding import transcripts  # noqa: E402
from fastem.sampling import Head, build_prompts  # noqa: E402
from fastem.text import word_errors  # noqa: E402
from fastem.whisper import clip_frames, cross_kv, encoder_embed, encoder_layers, features  # noqa: E402
from harness.data import default_data_dir  # noqa: E402
from harness.domains import domain_audio  # noqa: E402
from harness.runner import RunConfig, work_items  # noqa: E402


def run(model_name: str, rows_path: Path) -> None:
    cfg = RunConfig.from_profile("dev", model=model_name)
    data = default_data_dir("dev")
    model, processor = fastem.load_whisper(model_name)
    english_only = model_name.endswith(".en")
    cfg = fastem.AdaptConfig()
    head, rules = Head(model), cfg.decode_rules
    done = {json.loads(line)["index"] for line in rows_path.open()} if rows_path.exists() else set()
    with torch.no_grad(), rows_path.open("a") as f:
        for it in work_items(cfg.domains, data, cfg.utts_per_domain):
            if it.index in done or (english_only and it.utt.language != "en"):
                continue
            wave = domain_audio(it.domain, it.utt, data_dir=data)
            seconds = wave.numel() / 16000
            feats = features(model, processor, [wave])
            row = {"index": it.index, "domain": it.domain, "utt_id": it.utt_id, "language": it.utt.language,
                   "ref": it.utt.text, "audio_seconds": seconds}
            for name, frames in (("full", None), ("clip", clip_frames([seconds], feats.shape[-1]))):
                x = feats if frames is None else feats[..., :frames]
                cross = cross_kv(model, encoder_layers(model, encoder_embed(model, x, shorter=frames is not None)))
                prompts = build_prompts(model, cross, [None if english_only else it.utt.language], head=head)
                row[name] = transcripts(model, processor, cross, prompts, WHISPER.budgets(cfg, [seconds]), rules,
                                        head=head)[0].text
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()


def report(rows_path: Path) -> str:
    rows = [json.loads(line) for line in rows_path.open() if line.strip()]
    per = collections.defaultdict(lambda: [0, 0, 0])
    worse = better = longer = 0
    for r in rows:
        full, words = word_errors(r["ref"], r["full"], r["language"])
        clip = word_errors(r["ref"], r["clip"], r["language"])[0]
        d = per[r["domain"]]
        d[0], d[1], d[2] = d[0] + full, d[1] + clip, d[2] + words
        worse, better = worse + (clip > full), better + (clip < full)
        longer += len(r["clip"].split()) > 1.5 * max(1, len(r["full"].split()))
    macro = [100 * sum(d[i] / d[2] for d in per.values()) / len(per) for i in (0, 1)]
    return (f"{len(rows)} utterances, {len(per)} domains: macro WER full input {macro[0]:.2f}, clip's length "
            f"{macro[1]:.2f}; clip worse / better {worse} / {better}; clip transcript over 1.5x the words {longer}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--rows", required=True, help="JSON lines, resumable")
    ap.add_argument("--report", action="store_true", help="only summarize the rows")
    args = ap.parse_args(argv)
    if not args.report:
        run(args.model, Path(args.rows))
    print(report(Path(args.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
