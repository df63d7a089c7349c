"""fastem.adapt with the real Whisper base weights on real speech (English, L2 English, Dutch)."""
import csv

import pytest
import torch

import fastem

CLIPS = [  # (corpus, utterance id, language passed to adapt: None = detected)
    ("kathleen", "arctic_a0011_1592748364", "en"),
    ("speechocean762", "000010140", "en"),
    ("fillets_nl", "crabshow_sec-v-pockej", None),  # 5.6 s: long enough to detect Dutch (a 2.6 s line reads as German)
]


def _manifest_row(data, corpus, utt):
    with open(data / "speech" / corpus / "manifest.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["id"] == utt:
                return data / "speech" / corpus / row["path"], row["text"], row["lang"]
    raise LookupError(f"{utt} not in {corpus}")


@pytest.mark.parametrize("corpus, utt, language", CLIPS)
def test_adapt_real_base_on_real_speech_restores_the_model(bundled_base, shared_data_dir, corpus, utt, language):
    model, processor = bundled_base
    path, reference, lang = _manifest_row(shared_data_dir, corpus, utt)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    result = fastem.adapt(model, path, processor=processor, language=language, steps=2, num_samples=4,
                          min_entropy=0.0)  # adapt even where the model is sure (the clean Kathleen line)
    assert result.text.strip() and result.text_before.strip()
    assert len(result.history) == 2 and all(h["length"] > 0 for h in result.history)
    assert result.language == lang[:2]  # the Dutch clip's language is detected
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} was not restored"
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_continual_adapter_cuts_a_long_recording_into_windows_like_adapt(bundled_base, shared_data_dir):
    """The same front door: a 47 s recording of real speech (Kathleen's lines joined with short pauses) is cut
    into the same windows by a continual Adapter as by adapt(), each window adapted in turn, and transcribed
    as well (the source transcripts are the same; WER of the returned one near the reference)."""
    from fastem.audio import load_audio, split_windows
    from fastem.text import wer

    model, processor = bundled_base
    rows = []
    with open(shared_data_dir / "speech" / "kathleen" / "manifest.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    parts, texts, total = [], [], 0.0
    for row in rows:
        if total >= 47.0:
            break
        wave = load_audio(shared_data_dir / "speech" / "kathleen" / row["path"])
        parts += [wave, torch.zeros(4800)]  # 0.3 s pauses
        texts.append(row["text"])
        total += (wave.numel() + 4800) / 16000
    wave = torch.cat(parts)
    assert 47.0 <= wave.numel() / 16000 < 60.0
    kw = dict(language="en", steps=1, num_samples=2, min_entropy=0.0)
    episodic = fastem.adapt(model, wave, processor=processor, **kw)
    with fastem.Adapter(model, processor, steps=1, num_samples=2, min_entropy=0.0) as adapter:
        continual = adapter.adapt(wave, language="en")
        assert adapter.calls == len(split_windows(wave)) == len(continual.windows) == len(episodic.windows) == 2
    assert continual.text_before == episodic.text_before  # the source model's windows, the same
    assert wer(" ".join(texts), continual.text) < 0.15 and wer(" ".join(texts), continual.text_before) < 0.15
