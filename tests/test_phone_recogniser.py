"""hama's phone recogniser in torch: its weight package format (a file the test writes in it), and the
port against hama's own engine on real speech (the oracle, when the hama package is installed)."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from speech import espeak
from streamgen.models.phone_recogniser import PhoneRecogniser, posterior_features, read_hamapk


def write_hamapk(path: Path, tensors: dict[str, np.ndarray], version: bytes = b"\x01\x02") -> None:
    """The package layout as hama writes it: header, entries, the blob 16-byte aligned, each tensor 16-byte aligned."""
    head, blob = [b"HAMAPK", version, struct.pack("<I", len(tensors))], b""
    for name, a in tensors.items():
        code = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}.get(a.dtype, 7)
        blob += b"\0" * (-len(blob) % 16)
        head += [struct.pack("<H", len(name.encode())), name.encode(), bytes([code, a.ndim]), struct.pack(f"<{a.ndim}I", *a.shape),
                 struct.pack("<QQ", len(blob), a.nbytes)]
        blob += a.tobytes()
    header = b"".join(head)
    path.write_bytes(header + b"\0" * (-len(header) % 16) + blob)


def test_package_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"mel_fb": rng.random((5, 3), dtype=np.float32), "layer.weight": rng.standard_normal((4, 2, 3)).astype(np.float16),
               "onnx::MatMul_7": rng.standard_normal((3,)).astype(np.float16)}
    write_hamapk(tmp_path / "w.hama", tensors)
    got = read_hamapk(tmp_path / "w.hama")
    assert list(got) == list(tensors)
    for name, a in tensors.items():
        assert got[name].dtype == {np.float32: torch.float32, np.float16: torch.float16}[a.dtype.type]
        assert np.array_equal(got[name].numpy(), a)


def test_package_errors_name_the_problem(tmp_path):
    (tmp_path / "x.hama").write_bytes(b"PK\x03\x04 not a package")
    with pytest.raises(ValueError, match="not a hama weight package"):
        read_hamapk(tmp_path / "x.hama")
    write_hamapk(tmp_path / "i.hama", {"ids": np.arange(3, dtype=np.int64)})
    with pytest.raises(ValueError, match="dtype code 7"):
        read_hamapk(tmp_path / "i.hama")
    write_hamapk(tmp_path / "t.hama", {"w": np.ones((64,), np.float32)})
    (tmp_path / "t.hama").write_bytes((tmp_path / "t.hama").read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not fit"):
        read_hamapk(tmp_path / "t.hama")
    write_hamapk(tmp_path / "o.hama", {"w": np.ones((4,), np.float32)})
    with pytest.raises(ValueError, match="Conformer phone recogniser"):
        PhoneRecogniser.from_hamapk(tmp_path / "o.hama")


def test_posterior_features_drop_the_blank_and_have_unit_norm():
    log_probs = torch.log_softmax(torch.randn(7, 6), dim=-1)
    x = posterior_features(log_probs, blank=5)
    assert x.shape == (7, 5)
    assert torch.allclose((x * x).sum(1), torch.ones(7), atol=1e-6)
    # a frame whose mass is almost all blank still says which phone leads among the rest
    peaky = torch.log(torch.tensor([[0.001, 0.004, 0.0, 0.0, 0.0, 0.995]]).clamp_min(1e-12))
    assert int(posterior_features(peaky, blank=5).argmax()) == 1


@pytest.mark.oracle
def test_port_equals_hamas_engine_on_speech():
    hama = pytest.importorskip("hama.asr", reason="the hama package is the oracle (pip install hama)")
    weights = Path(hama.__file__).parent / "assets" / "asr_waveform.hama"
    net = PhoneRecogniser.from_hamapk(weights)
    engine = hama.ASRModel(model_path=weights)
    for text in ("The train to the airport leaves at half past nine.", "Where is the museum?"):
        wave = espeak(text)
        feeds = {engine._waveform_input_name: wave.numpy()[None], engine._waveform_lengths_input_name: np.array([len(wave)], dtype=np.int64)}
        ref, _ = engine.session.run([engine._log_probs_output_name, engine._out_lengths_output_name], feeds)
        with torch.no_grad():
            got = net(wave).numpy()
        assert got.shape == ref[0].shape == ((len(wave) // 160 + 2) // 2, 191)
        assert (got.argmax(1) == ref[0].argmax(1)).all()
        assert np.abs(np.exp(got) - np.exp(ref[0])).max() < 1e-3


def test_stored_stft_kernels_are_checked_and_dropped():
    """The STFT kernels are computed, not stored; state dicts that hold them (older files, or float16
    copies) load when they are that DFT and are refused when they are not."""
    from streamgen.models.phone_recogniser import PhoneRecogniserConfig

    cfg = PhoneRecogniserConfig(dim=16, layers=1, heads=2, kernel=3, vocab=5)
    m = PhoneRecogniser(cfg)
    assert "stft_real" not in m.state_dict()
    sd = m.state_dict() | {"stft_real": m.stft_real.half(), "stft_imag": m.stft_imag}
    PhoneRecogniser(cfg).load_state_dict(sd)
    sd["stft_real"] = sd["stft_real"] + 0.01
    with pytest.raises(RuntimeError, match="not the hann-windowed DFT"):
        PhoneRecogniser(cfg).load_state_dict(sd)
