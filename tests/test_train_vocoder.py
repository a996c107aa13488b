"""Vocoder training on real (piper) speech, tiny and short: the losses fall, and the result is a bundle part."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import streamgen
from streamgen.testing import random_bundle
from streamgen.cli import app
from streamgen.train.synth import extract_units, synth
from streamgen.train.vocoder import Discriminators, LogMel, VocoderData, VocoderTrainConfig, VocoderTrainer, mel_filterbank, new_vocoder


@pytest.fixture(scope="module")
def unit_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("voc")
    synth(out, 3, 0, 0, seed=2, translation=False, progress=False)
    b = random_bundle()
    b.save(out / "bundle")
    extract_units(b, out / "en_train.tsv", out / "en_train.units.tsv", progress=False)
    return out


def test_mel_filterbank_and_discriminator_shapes():
    fb = mel_filterbank(1024, 80, 16000)
    assert fb.shape == (80, 513) and torch.all(fb >= 0) and torch.all(fb.sum(1) > 0)
    assert LogMel()(torch.randn(2, 16000)).shape == (2, 80, 101)
    outs = Discriminators(4)(torch.randn(2, 4000))
    assert len(outs) == 8 and all(score.shape[0] == 2 for score, _ in outs)


def test_training_lowers_mel_and_duration_losses(unit_corpus, tmp_path):
    torch.manual_seed(0)
    model = new_vocoder(100, width=16)
    data = VocoderData(unit_corpus / "en_train.units.tsv", model.hop, 16000, segment_frames=8)
    cfg = VocoderTrainConfig(steps=40, batch_size=4, segment_frames=8, lr=2e-3, disc_width=4, log_every=1, save_every=20)
    trainer = VocoderTrainer(model, cfg, tmp_path, progress=False)
    hist = trainer.fit(data)
    first, last = hist[:5], hist[-5:]
    mean = lambda h, k: sum(x[k] for x in h) / len(h)
    assert mean(last, "mel") < 0.9 * mean(first, "mel")
    assert mean(last, "dur") < mean(first, "dur")
    resumed = VocoderTrainer(new_vocoder(100, width=16), cfg, tmp_path, progress=False)
    resumed.resume()
    assert resumed.step == 40 and torch.equal(resumed.model.dict.weight, model.dict.weight)
    with pytest.raises(ValueError, match="its state is of a vocoder of other sizes than this command's"):
        VocoderTrainer(new_vocoder(100, width=32), cfg, tmp_path, progress=False).resume()  # was a 204-line load_state_dict dump
    with pytest.raises(ValueError, match="no vocoder training state to resume"):
        VocoderTrainer(new_vocoder(100, width=16), cfg, tmp_path / "none", progress=False).resume()
    # a save killed while writing the state leaves the last state whole (it was written in place, half-written)
    import streamgen.train.vocoder as vocoder_module

    def killed(obj, f):
        Path(f).write_bytes(b"half a state")
        raise KeyboardInterrupt

    resumed.step = 41
    torch_save, vocoder_module.torch.save = vocoder_module.torch.save, killed
    try:
        with pytest.raises(KeyboardInterrupt):
            resumed.save()
    finally:
        vocoder_module.torch.save = torch_save
    again = VocoderTrainer(new_vocoder(100, width=16), cfg, tmp_path, progress=False)
    again.resume()
    assert again.step == 40


def test_train_vocoder_cli_into_bundle(unit_corpus):
    r = CliRunner().invoke(app, ["train-vocoder", "--manifest", str(unit_corpus / "en_train.units.tsv"), "--out", str(unit_corpus / "run"),
                                 "--bundle", str(unit_corpus / "bundle"), "--width", "16", "--steps", "3", "--batch-size", "2",
                                 "--segment-frames", "8", "--disc-width", "4", "--into-bundle"])
    assert r.exit_code == 0, r.output
    b = streamgen.load_bundle(unit_corpus / "bundle")
    assert b.vocoder.cfg.embedding_dim == 16
    units = torch.randint(0, 100, (12,))
    assert b.vocode(units).shape == (int(b.vocoder.durations(units).sum()) * 320,)


def test_train_vocoder_speaks_a_log_mel_bundles_units_and_refuses_what_it_could_not_ship(unit_corpus, tmp_path):
    """The shipped kind of bundle (log-mel units, a source-filter vocoder) stopped train-vocoder with a traceback
    ("this bundle has no kmeans"), and --into-bundle's problems were found only after the training."""
    import shutil

    shipped = tmp_path / "shipped"
    shutil.copytree(Path(streamgen.__file__).parent / "assets" / "default", shipped)
    before = (shipped / "bundle.json").read_text()
    args = ["train-vocoder", "--manifest", str(unit_corpus / "en_train.units.tsv"), "--width", "16", "--steps", "2",
            "--batch-size", "2", "--segment-frames", "8", "--disc-width", "4"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--into-bundle"])
    assert r.exit_code == 2 and "--into-bundle needs --bundle" in r.output and not (tmp_path / "a").exists(), r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--bundle", str(shipped), "--into-bundle"])
    assert r.exit_code == 2 and "speaks through its source-filter vocoder" in r.output and not (tmp_path / "b").exists(), r.output
    assert (shipped / "bundle.json").read_text() == before
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--bundle", str(shipped)])
    assert r.exit_code == 0, r.output
    voc = streamgen.bundle.load_file(str(tmp_path / "c" / "vocoder.safetensors"))
    assert voc["dict.weight"].shape[0] == 500  # the log-mel units of the bundle


def test_train_vocoder_knows_every_unit_the_bundle_says_and_names_units_it_could_not_take(unit_corpus, tmp_path):
    """A bundle whose encoder gives 50 units and whose LM says 100 got a 50-unit vocoder and no longer loaded; units
    from another unit encoder failed mid-training with an index error."""
    from streamgen.models.kmeans import KMeansQuantizer
    from streamgen.testing import TINY_HUBERT
    from streamgen.train.synth import read_manifest

    b = random_bundle()
    b.quantizer = KMeansQuantizer(torch.randn(50, TINY_HUBERT.dim))  # the LM still knows 100
    b.save(tmp_path / "bundle")
    args = ["train-vocoder", "--width", "16", "--steps", "2", "--batch-size", "2", "--segment-frames", "8", "--disc-width", "4",
            "--bundle", str(tmp_path / "bundle")]
    r = CliRunner().invoke(app, [*args, "--manifest", str(unit_corpus / "en_train.units.tsv"), "--out", str(tmp_path / "a"), "--into-bundle"])
    assert r.exit_code == 0, r.output
    assert streamgen.load_bundle(tmp_path / "bundle").vocoder.cfg.num_embeddings == 100
    rows = read_manifest(unit_corpus / "en_train.units.tsv")
    header = list(rows[0])
    other = tmp_path / "other.units.tsv"  # units of a 500-unit encoder
    other.write_text("\t".join(header) + "\n" + "".join(
        "\t".join(str(unit_corpus / r["audio"]) if k == "audio" else (" ".join(str(400 + int(u)) for u in r["units"].split()) if k == "units" else str(r[k]))
                  for k in header) + "\n" for r in rows))
    r = CliRunner().invoke(app, [*args, "--manifest", str(other), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "has units outside 0..99" in r.output and not (tmp_path / "b").exists(), r.output


@pytest.mark.parametrize("units, durations, named", [("1 2 3", "2 2", "3 units but 2 durations"),
                                                     ("1 2 3", "2 0 2", "a duration below 1 frame"),
                                                     ("1 x", "1 1", "must be whole numbers"),
                                                     ("1 120", "2 2", "units outside 0..99")])
def test_vocoder_data_names_a_row_it_could_not_take(tmp_path, units, durations, named):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(32000, np.float32), 16000)
    (tmp_path / "m.tsv").write_text(f"id\taudio\tunits\tdurations\nutt7\ta.wav\t{units}\t{durations}\n")
    with pytest.raises(ValueError, match=f"row 'utt7'.*{named}"):
        VocoderData(tmp_path / "m.tsv", 320, 16000, 8, 100)
