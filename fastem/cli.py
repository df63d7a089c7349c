"""Command line: ``fastem transcribe`` and ``fastem demo`` (also ``python -m fastem``)."""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from .config import AdaptConfig
from .judge import BEAM_GUARDS, DEFAULT_GUARDS, GUARDS, TEXTUAL_GUARDS, VOTED
from .objective import OBJECTIVES
from .params import PARAM_SETS, check_param_spec

__all__ = ["main", "build_parser"]


def _count(word: str, what: str, value):
    """A parser of a count of ``what`` (>= 1), or the word ``word`` standing for ``value``."""
    def parse(text: str):
        if text == word:
            return value
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word} or a number of {what}, got {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected a number of {what} >= 1, got {n}")
        return n
    return parse


_settle = _count("off", "updates", False)
_draws = _count("auto", "draws", "auto")
_beams = _count("auto", "beams", "auto")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    d = AdaptConfig()
    p.add_argument("--model", default="base", help="tiny.en, base (bundled), a hub id or a local checkpoint dir")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--language", default=None, help="language code (default: detected; English for .en models)")
    p.add_argument("--steps", type=_steps, default=d.steps,
                   help=f"adaptation steps (default {d.steps}: {d.step_count})")
    p.add_argument("--stop-when-settled", type=_settle, default=False, metavar="N",
                   help="stop a clip's steps once N updates in a row left its greedy transcript unchanged "
                        "(default off: always --steps)")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--num-samples", type=int, default=d.num_samples, metavar="K",
                   help=f"hypotheses per step (default {d.num_samples})")
    p.add_argument("--draws", type=_draws, default=d.draws, metavar="N",
                   help=f"independent adaptations of each clip, their medoid returned (default auto: {d.draw_count})")
    p.add_argument("--beams", type=_beams, default=d.num_beams, metavar="K",
                   help=f"decode every transcript by beam search with K beams, 1: greedy (default auto: "
                        f"{d.beam_count} when adapting with several draws, the greedy transcript voting in their "
                        "medoid; else 1)")
    p.add_argument("--params", type=_params, default=d.params, metavar="SET",
                   help=f"the parameters that adapt (default {d.params}; one of {', '.join(PARAM_SETS)}, "
                        "N a number of top encoder layers)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--min-entropy", type=float, default=None, metavar="NATS",
                   help="do not adapt on a clip whose unadapted transcript has a mean token entropy below this "
                        f"(default {d.gate_entropy:g}; 0 adapts every clip)")
    p.add_argument("--max-logp-drop", type=float, default=d.max_logp_drop, metavar="NATS",
                   help="the confidence guard: keep the unadapted transcript when the unadapted model finds the "
                        f"adapted one more than NATS per token less likely than its own (default {d.max_logp_drop:g}; "
                        "0: accept only transcripts the unadapted model also prefers, the safe setting)")
    p.add_argument("--max-seq-logp-drop", type=_seq_drop, default=d.max_seq_logp_drop, metavar="NATS",
                   help="the likelihood guard (not run by default; a value here runs it): keep the unadapted "
                        "transcript when the unadapted model finds the "
                        "adapted one, as a whole, more than NATS less likely than its own (default "
                        f"{d.max_seq_logp_drop}: {AdaptConfig(num_beams=1).seq_logp_limit:g} greedy, off with beams; "
                        "'none': the guard off; 0: the strictest)")
    p.add_argument("--verifier", type=_optional_name, default=d.verifier, metavar="MODEL",
                   help="a second checkpoint (tiny.en, base, a hub id or a directory) that votes on each changed "
                        "transcript: the unadapted one is kept when it finds the adapted one less likely "
                        f"(default {d.verifier}: a bundled checkpoint other than the model; 'none': no verifier)")
    p.add_argument("--max-verifier-drop", type=float, default=d.max_verifier_drop, metavar="NATS",
                   help=f"how much less likely, per token (default {d.max_verifier_drop:g})")
    p.add_argument("--guards", type=_guard_names, default=d.guards, metavar="NAMES",
                   help=f"comma-separated guards that may reject the adapted transcript, 'none' for none "
                        f"(default auto: {','.join(TEXTUAL_GUARDS)} with several draws; with one, "
                        f"{','.join(DEFAULT_GUARDS)} greedy and {','.join(BEAM_GUARDS)} with beams; "
                        f"known: {','.join(GUARDS)})")
    for name, what in (("compression-ratio-threshold", "a transcript compressing more than this is a loop"),
                       ("logprob-threshold", "a transcript with a lower average log-prob per token is unlikely"),
                       ("no-speech-threshold", "above this no-speech probability, an unlikely transcript is silence")):
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=_optional_float, default=default, metavar="X",
                       help=f"Whisper's decoding rule: {what} (default {default:g}; 'none': off)")


def _snrs(text: str) -> tuple:
    return tuple(None if t.strip().lower() == "clean" else float(t) for t in text.split(",") if t.strip())


def _steps(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else int(text)


def _params(text: str) -> str:
    try:
        check_param_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _seq_drop(text: str) -> float | str | None:
    return "auto" if text.strip().lower() == "auto" else _optional_float(text)


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() == "none" else float(text)


def _optional_name(text: str) -> str | None:
    return None if text.strip().lower() == "none" else text


def _guard_names(text: str) -> tuple[str, ...] | str:
    if text.strip() == "auto":
        return "auto"
    names = tuple(t.strip() for t in text.split(",") if t.strip() and t.strip() != "none")
    unknown = [n for n in names if n not in GUARDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown guard(s) {', '.join(unknown)}; known: {', '.join(GUARDS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastem", description="Test-time adaptation of Whisper by entropy "
                                     "minimization.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files, optionally adapting on each")
    t.add_argument("audio", nargs="+", help="audio files (wav/flac/ogg/mp3; longer than 30 s: cut into windows at "
                   "pauses); a file that cannot be used is reported on stderr and skipped (exit status 1), a silent "
                   "one gets an empty transcript")
    t.add_argument("--adapt", action="store_true", help="adapt on each file (episodic) before transcribing")
    t.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="adapt (or transcribe) N files at once in one batched loop (default 1)")
    _add_method_args(t)
    t.add_argument("--reference", action="append", default=None,
                   help="reference transcript (once per file, in order) to print WER")
    t.add_argument("--manifest", default=None,
                   help="TSV with columns id, path, text (shared/data layout): references by file name")
    t.add_argument("--json", action="store_true", help="one JSON object per file instead of text")

    d = sub.add_parser("demo", help="adapt on a bundled real clip with real noise added; print WER before/after")
    _add_method_args(d)
    d.add_argument("--snr", type=_snrs, default=(None, 5.0, -3.0, -6.0), metavar="LIST",
                   help="conditions: comma-separated SNRs in dB of the added real noise, 'clean' for none "
                        "(default clean,5,-3,-6)")
    return parser


def _references(args) -> dict[str, str]:
    refs: dict[str, str] = {}
    if args.manifest:
        with open(args.manifest, encoding="utf-8", newline="") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) >= 3 and row[0] != "id":
                    refs[Path(row[1]).name] = row[2]
    if args.reference:
        if len(args.reference) != len(args.audio):
            raise SystemExit(f"error: {len(args.reference)} --reference for {len(args.audio)} audio files")
        refs.update({Path(a).name: r for a, r in zip(args.audio, args.reference)})
    return refs


def _decode_rules(args, transcribing: bool = False) -> dict:
    """Whisper's decoding rules and the beams; a plain transcription (``transcribing``) is greedy unless --beams."""
    beams = 1 if transcribing and args.beams == "auto" else args.beams
    return {"compression_ratio_threshold": args.compression_ratio_threshold, "num_beams": beams,
            "logprob_threshold": args.logprob_threshold, "no_speech_threshold": args.no_speech_threshold}


def _config(args) -> AdaptConfig:
    """``--max-seq-logp-drop none`` and ``--verifier none`` leave their guard out of ``guards``; a threshold given
    to ``--max-seq-logp-drop`` runs the likelihood guard, which the default guards leave out."""
    off = {"likelihood"} if args.max_seq_logp_drop is None else set()
    off |= set(VOTED) if args.verifier is None else set()
    asked = args.guards
    threshold = isinstance(args.max_seq_logp_drop, float)
    if asked == "auto" and (args.verifier is None or threshold):
        asked = AdaptConfig(num_beams=args.beams, draws=args.draws).active_guards
    if asked != "auto":
        asked = tuple(asked) + (("likelihood",) if threshold and "likelihood" not in asked else ())
        asked = tuple(g for g in asked if g not in off)
    d = AdaptConfig()
    return AdaptConfig(steps=args.steps, stop_when_settled=args.stop_when_settled, objective=args.objective, lr=args.lr,
                       num_samples=args.num_samples, draws=args.draws,
                       params=args.params, seed=args.seed,
                       min_entropy=d.min_entropy if args.min_entropy is None else args.min_entropy,
                       guards=asked, max_logp_drop=args.max_logp_drop,
                       max_seq_logp_drop=d.max_seq_logp_drop if args.max_seq_logp_drop is None else args.max_seq_logp_drop,
                       verifier=args.verifier, max_verifier_drop=args.max_verifier_drop, **_decode_rules(args))


def _load(args):
    from .models import load_whisper

    return load_whisper(args.model, device=args.device)


def _fail(row: dict, err: BaseException, tqdm_cls) -> None:
    row["error"] = str(err)
    tqdm_cls.write(f"fastem: error: {row['file']}: {err}", file=sys.stderr)


def cmd_transcribe(args) -> int:
    """Transcribe (and optionally adapt on) each file; a file that fails is reported and skipped.

    A missing, unreadable or invalid file is reported on stderr (file name and error) and the run goes
    on with the next file; a silent file gets an empty transcript without running the model. The model
    is loaded at the first file that needs it. Ends with a summary line on stderr; returns 1 if any
    file failed, else 0.
    """
    from tqdm import tqdm

    from .adapt import adapt_batch, transcribe_batch
    from .audio import MAX_LONG_SECONDS, SAMPLE_RATE, is_silent, load_audio
    from .text import word_errors

    refs = _references(args)
    cfg = _config(args)
    loaded = None  # (model, processor)
    failed = 0
    size = max(1, args.batch_size)
    bar = tqdm(total=len(args.audio), desc="files", unit="file", disable=len(args.audio) < 2, file=sys.stderr)

    def run(model, processor, waves):
        if args.adapt:
            return adapt_batch(model, waves, processor=processor, language=args.language, config=cfg,
                               sampling_rate=SAMPLE_RATE, batch_size=size)
        return transcribe_batch(model, waves, processor=processor, language=args.language, sampling_rate=SAMPLE_RATE,
                                **_decode_rules(args, transcribing=True))

    for lo in range(0, len(args.audio), size):
        t0 = time.perf_counter()
        rows, pending = [], []
        for path in args.audio[lo:lo + size]:
            row: dict = {"file": path}
            rows.append(row)
            try:
                wave = load_audio(path, allow_silence=True, max_seconds=MAX_LONG_SECONDS)
            except (ValueError, OSError) as err:
                _fail(row, err, tqdm)
                continue
            if is_silent(wave):
                row.update(before="", silent=True)
                if args.adapt:
                    row.update(after="", language=args.language, steps=0)
            else:
                pending.append((row, wave))
        if pending:
            if loaded is None:  # not a per-file problem: a failure to load the model ends the run
                t_load = time.perf_counter()
                loaded = _load(args)
                t0 += time.perf_counter() - t_load
            try:
                outs = run(*loaded, [w for _, w in pending])
            except (ValueError, OSError) as batch_err:
                outs = []
                if len(pending) == 1:
                    _fail(pending[0][0], batch_err, tqdm)
                    pending = []
                for row, wave in pending:  # find the file at fault: one at a time
                    try:
                        outs.append(run(*loaded, [wave])[0])
                    except (ValueError, OSError) as err:
                        _fail(row, err, tqdm)
                        outs.append(None)
            for (row, _), out in zip(pending, outs):  # (pending is empty when its one file failed)
                if out is None:
                    continue
                if args.adapt:
                    row.update(before=out.text_before, after=out.text, language=out.language,
                               steps=0 if out.skipped else cfg.step_count)
                    if out.skipped == "confident":
                        row.update(confident=True)
                    elif out.skipped:
                        row.update(skipped=out.skipped)
                    if out.guard:
                        row.update(guard=out.guard, guard_reason=out.guard_reason)
                else:
                    row.update(before=out)
        for row in rows:
            failed += "error" in row
            row["seconds"] = round((time.perf_counter() - t0) / len(rows), 2)
            ref = refs.get(Path(row["file"]).name)
            if ref is not None and "error" not in row:
                lang = row.get("language") or args.language or "en"
                row["reference"] = ref
                for key in ("before", "after"):
                    if key in row:
                        err, n = word_errors(ref, row[key], lang)
                        row[f"wer_{key}"] = err / max(n, 1)
            _print_row(row, args.json)
        bar.update(len(rows))
    bar.close()
    ok = len(args.audio) - failed
    print(f"fastem: {ok} ok, {failed} failed ({len(args.audio)} files)", file=sys.stderr, flush=True)
    return 1 if failed else 0


def _print_row(row: dict, as_json: bool) -> None:
    """One file's result on stdout: a JSON object (errors included), or text (errors are on stderr only)."""
    if as_json:
        print(json.dumps(row, ensure_ascii=False), flush=True)
        return
    if "error" in row:
        return
    silent = "  (silent audio)" if row.get("silent") else ""
    print(f"== {row['file']}  ({row['seconds']:.1f} s){silent}")
    if "reference" in row:
        print(f"   reference: {row['reference']}")
    label = "before" if "after" in row else "text"
    wer = f"  [WER {row['wer_before']:.1%}]" if "wer_before" in row else ""
    print(f"   {label:>9}: {row['before']}{wer}")
    if "after" in row:
        wer = f"  [WER {row['wer_after']:.1%}]" if "wer_after" in row else ""
        guard = f"; guard {row['guard']}: {row['guard_reason']}, unadapted kept" if row.get("guard") else ""
        guard += "; confident: not adapted" if row.get("confident") else ""
        guard += "; greedy and beam agree: not adapted" if row.get("skipped") == "agreed" else ""
        print(f"   {'after':>9}: {row['after']}{wer}   ({row['steps']} steps{guard})")
    sys.stdout.flush()


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(model_name=args.model, device=args.device, snrs=args.snr, config=_config(args),
                    language=args.language)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "transcribe":
        return cmd_transcribe(args)
    return cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
