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
