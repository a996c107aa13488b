"""Loaders: public layouts -> `streamgen convert` -> bundle, checked against direct computation."""

import dataclasses
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from conftest import TINY, random_units
from fairseq_layout import save_codehifigan, save_hubert, save_mbart
from sklearn.cluster import MiniBatchKMeans
from typer.testing import CliRunner

import streamgen
from streamgen.testing import TINY_HUBERT, TINY_VOCODER
from streamgen.cli import app
from streamgen.models.checkpoints import CheckpointError, parse_conv_layers, read_kmeans, torch_load
from streamgen.models.hubert import HubertConfig, HubertEncoder
from streamgen.models.unit_mbart import UnitMBart, UnitMBartConfig, units_to_source
from streamgen.models.vocoder import CodeHiFiGAN

runner = CliRunner()


def convert(*args):
    result = runner.invoke(app, ["convert", *map(str, args)])
    return result


def converted(tmp_path, *args):
    out = tmp_path / "bundle"
    n = 1
    while out.exists():  # convert writes a new bundle each time, never over one
        n += 1
        out = tmp_path / f"bundle{n}"
    r = convert(*args, "--out", out)
    assert r.exit_code == 0, r.output
    return streamgen.load_bundle(out)


@pytest.mark.parametrize("style", ["dict", "omegaconf", "namespace", "args"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_unit_mbart_checkpoint(tmp_path, style, pre_norm):
    cfg = UnitMBartConfig(**{**vars(TINY), "normalize_before": pre_norm})
    model = UnitMBart(cfg).eval()
    save_mbart(tmp_path / "checkpoint.pt", model, style)
    b = converted(tmp_path, "--mbart", tmp_path / "checkpoint.pt", "--num-units", TINY.num_units)
    assert b.mbart.cfg == dataclasses.replace(cfg, dropout=0.1)  # the file's training dropout
    src = units_to_source(random_units(20))[None]
    prev = torch.randint(4, 60, (1, 12))
    with torch.no_grad():
        assert torch.equal(b.mbart(src, prev), model(src, prev))


def test_mask_token_option_enables_inpainting(tmp_path):
    model = UnitMBart(TINY).eval()
    save_mbart(tmp_path / "checkpoint.pt", model, "dict")
    b = converted(tmp_path, "--mbart", tmp_path / "checkpoint.pt", "--num-units", TINY.num_units, "--mask-token", TINY.num_units + 6)
    assert b.mbart.cfg.mask_token == TINY.num_units + 6
    r = convert("--mbart", tmp_path / "checkpoint.pt", "--num-units", TINY.num_units, "--mask-token", 5, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "must index a token after the units" in r.output


def test_hubert_checkpoint_keeps_layers_up_to_the_output_layer(tmp_path):
    torch.manual_seed(0)
    model = HubertEncoder(TINY_HUBERT).eval()
    for param in (False, True):
        save_hubert(tmp_path / "hubert.pt", model, parametrizations=param, extra_layers=2)
        b = converted(tmp_path, "--hubert", tmp_path / "hubert.pt", "--hubert-layer", TINY_HUBERT.output_layer)
        assert len(b.hubert.layers) == TINY_HUBERT.output_layer
        wave = torch.randn(1, 8000) * 0.1
        with torch.no_grad():
            torch.testing.assert_close(b.hubert(wave), model(wave), atol=1e-5, rtol=1e-5)


def test_vocoder_checkpoint_folds_weight_norm(tmp_path):
    torch.manual_seed(0)
    model = CodeHiFiGAN(TINY_VOCODER).eval()
    save_codehifigan(tmp_path / "g_00500000", tmp_path / "config.json", model)
    b = converted(tmp_path, "--vocoder", tmp_path / "g_00500000", "--vocoder-config", tmp_path / "config.json")
    u = torch.randint(0, TINY_VOCODER.num_embeddings, (30,))
    with torch.no_grad():
        torch.testing.assert_close(b.vocode(u), model(u), atol=1e-5, rtol=1e-5)


def test_kmeans_joblib_file_matches_sklearn_predict(tmp_path):
    feats = np.random.default_rng(0).normal(size=(500, TINY_HUBERT.dim)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=20, n_init=1, batch_size=100, random_state=0).fit(feats)
    joblib.dump(km, tmp_path / "km.bin")
    b = converted(tmp_path, "--kmeans", tmp_path / "km.bin")
    test = np.random.default_rng(1).normal(size=(300, TINY_HUBERT.dim)).astype(np.float32)
    assert np.array_equal(b.quantizer(torch.from_numpy(test)).numpy(), km.predict(test))
    np.save(tmp_path / "centers.npy", km.cluster_centers_)
    assert torch.equal(read_kmeans(tmp_path / "centers.npy"), read_kmeans(tmp_path / "km.bin"))


def test_full_chain_bundle_encode_generate_vocode(tmp_path):
    torch.manual_seed(0)
    hub = HubertEncoder(TINY_HUBERT).eval()
    save_hubert(tmp_path / "hubert.pt", hub)
    km = MiniBatchKMeans(n_clusters=TINY.num_units, n_init=1, random_state=0).fit(np.random.default_rng(0).normal(size=(400, TINY_HUBERT.dim)))
    joblib.dump(km, tmp_path / "km.bin")
    save_mbart(tmp_path / "checkpoint.pt", UnitMBart(TINY).eval(), "dict")
    voc = CodeHiFiGAN(TINY_VOCODER.__class__(**{**TINY_VOCODER.__dict__, "num_embeddings": TINY.num_units})).eval()
    save_codehifigan(tmp_path / "g", tmp_path / "config.json", voc)
    b = converted(tmp_path, "--hubert", tmp_path / "hubert.pt", "--hubert-layer", 2, "--kmeans", tmp_path / "km.bin",
                  "--mbart", tmp_path / "checkpoint.pt", "--num-units", TINY.num_units,
                  "--vocoder", tmp_path / "g", "--vocoder-config", tmp_path / "config.json")
    wave = torch.randn(16000) * 0.1
    units, dur = b.encode(wave)
    feats = hub(wave[None])[0].detach().numpy()
    expected = torch.from_numpy(km.predict(feats.astype(np.float64)))
    expected_units, expected_dur = torch.unique_consecutive(expected, return_counts=True)
    assert torch.equal(units, expected_units) and torch.equal(dur, expected_dur)
    out = b.generate(units, max_units=30, min_units=30)
    assert out.shape == (30,) and int(out.max()) < TINY.num_units
    audio = b.vocode(out)
    assert audio.shape == (int(b.vocoder.durations(out).sum()) * 320,) and torch.isfinite(audio).all()
    r = runner.invoke(app, ["info", str(tmp_path / "bundle")])
    assert r.exit_code == 0 and all(p in r.output for p in ("hubert", "kmeans", "mbart", "vocoder"))


# --- refusing what must not load --------------------------------------------------------------------


class Payload:
    """Unpickling this runs a command that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "cfg": {"model": Payload(marker)}}, tmp_path / "evil.pt")
    r = convert("--mbart", tmp_path / "evil.pt", "--out", tmp_path / "b")
    assert r.exit_code != 0 and "refused" in r.output and "system" in r.output
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="allow-list"):
        torch_load(tmp_path / "evil.pt")


def test_kmeans_file_with_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "km.bin", "wb") as f:
        pickle.dump({"cluster_centers_": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refused.*system"):
        read_kmeans(tmp_path / "km.bin")
    assert not marker.exists()


def test_truncated_files_give_clear_errors(tmp_path):
    save_mbart(tmp_path / "full.pt", UnitMBart(TINY), "dict")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    r = convert("--mbart", tmp_path / "cut.pt", "--out", tmp_path / "b")
    assert r.exit_code != 0 and "truncated or corrupt" in r.output
    km = MiniBatchKMeans(n_clusters=5, n_init=1).fit(np.random.default_rng(0).normal(size=(50, 4)))
    joblib.dump(km, tmp_path / "km.bin")
    data = (tmp_path / "km.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match="truncated"):
        read_kmeans(tmp_path / "cut.bin")


def test_missing_and_mismatched_inputs(tmp_path):
    r = convert("--mbart", tmp_path / "nope.pt", "--out", tmp_path / "b")
    assert r.exit_code != 0 and "no such file" in r.output
    r = convert("--out", tmp_path / "b")
    assert r.exit_code != 0 and "nothing to convert" in r.output
    torch.save({"weights": {}}, tmp_path / "other.pt")
    r = convert("--mbart", tmp_path / "other.pt", "--out", tmp_path / "b")
    assert r.exit_code != 0 and "no `model` state dict" in r.output


def test_conv_layers_spec_is_parsed_without_eval():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == HubertConfig().conv_layers
    with pytest.raises(CheckpointError):
        parse_conv_layers("__import__('os').system('true')")


def test_a_kmeans_pickle_that_grows_itself_through_codecs_is_refused(tmp_path):
    """Pickled bytes call _codecs.encode(text, "latin1"); any other codec is refused: "hex" doubles
    its input, and 40 steps of it in a 723-byte file asked for tens of gigabytes."""
    import pickle

    from streamgen.models.checkpoints import CheckpointError, read_kmeans

    p = b"\x80\x02c_codecs\nencode\nq\x00h\x00X\x02\x00\x00\x00ABX\x06\x00\x00\x00latin1\x86R"
    bomb = p + b"q\x010h\x00h\x01X\x03\x00\x00\x00hex\x86R" * 40
    (tmp_path / "km.bin").write_bytes(bomb + b".")
    with pytest.raises(CheckpointError, match="refused: _codecs.encode with 'hex' \\(only latin1 text"):
        read_kmeans(tmp_path / "km.bin")
    assert pickle.loads(p + b".") == b"AB"  # the first call alone is how protocol 2 pickles bytes


@pytest.mark.parametrize("content, message", [
    (b"hello world, this is text\n", "not a readable PyTorch checkpoint (truncated or corrupt, or another kind of file?)"),
    (b'{"a": 1}\n', "not a PyTorch checkpoint (no pickled tensors in it; is it the right file?)"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not a readable PyTorch checkpoint (truncated or corrupt, or another kind of file?)"),
], ids=["text", "json", "truncated-wav"])
def test_a_file_that_is_no_checkpoint_is_named_in_one_line(tmp_path, content, message):
    """A text file gave `KeyError: 101`, a JSON file a false alarm about unpickling code, a cut WAV an IndexError."""
    (tmp_path / "x.pt").write_bytes(content)
    r = convert("--mbart", tmp_path / "x.pt", "--out", tmp_path / "b")
    assert r.exit_code != 0 and f"x.pt: {message}" in r.output and r.output.count("\n") <= 2, r.output


@pytest.mark.parametrize("key, value, message", [
    ("conv_feature_layers", "[(8, 2, 1)] * 1000000", "conv_feature_layers '[(8, 2, 1)] * 1000000': more than 64 layers"),
    ("conv_pos", 20000, "hubert: the checkpoint's parameters do not fit its config (1 tensors differ; pos_conv.conv.weight"),
], ids=["conv-layers", "conv-pos"])
def test_a_hubert_config_is_not_built_before_its_weights_are_seen_to_fit(tmp_path, key, value, message):
    """A 2 KB file whose config asked for a million conv layers, or a 20000-tap positional convolution,
    had convert allocate gigabytes before comparing anything."""
    import resource

    from omegaconf import OmegaConf

    save_hubert(tmp_path / "h.pt", HubertEncoder(TINY_HUBERT).eval())
    ckpt = torch.load(tmp_path / "h.pt", weights_only=False)
    cfg = OmegaConf.to_container(ckpt["cfg"])
    cfg["model"][key] = value
    ckpt["cfg"] = OmegaConf.create(cfg)
    torch.save(ckpt, tmp_path / "h.pt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = convert("--hubert", tmp_path / "h.pt", "--hubert-layer", TINY_HUBERT.output_layer, "--out", tmp_path / "b")
    assert r.exit_code != 0 and message in r.output and r.output.count("\n") <= 3, r.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB
