"""Optional oracles: fairseq's and torchaudio's own models on the same weights.

fairseq cannot be a dependency (and fairseq 0.12.2 does not import on Python 3.11), so
`scripts/test.sh` builds it (fairseq-fixed) in a separate virtual environment and points
STREAMGEN_FAIRSEQ_PYTHON at it; there, tests/oracle/fairseq_oracle.py builds fairseq's models,
saves real fairseq checkpoints and their outputs. Here those files go through `streamgen convert`.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import streamgen
from streamgen.cli import app

pytestmark = pytest.mark.oracle
FAIRSEQ_PY = os.environ.get("STREAMGEN_FAIRSEQ_PYTHON")


@pytest.fixture(scope="module")
def fairseq_files(tmp_path_factory):
    if not FAIRSEQ_PY or not Path(FAIRSEQ_PY).exists():
        pytest.skip("fairseq oracle not built: set STREAMGEN_FAIRSEQ_PYTHON (scripts/test.sh builds it in .venv-oracle)")
    out = tmp_path_factory.mktemp("fairseq")
    script = Path(__file__).parent / "oracle" / "fairseq_oracle.py"
    r = subprocess.run([FAIRSEQ_PY, str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, torch.load(out / "outputs.pt", weights_only=True)


def convert(tmp_path, *args):
    r = CliRunner().invoke(app, ["convert", *map(str, args), "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    return streamgen.load_bundle(tmp_path / "b")


def test_unit_mbart_matches_fairseq_bart(fairseq_files, tmp_path):
    files, ref = fairseq_files
    b = convert(tmp_path, "--mbart", files / "mbart.pt", "--num-units", 60)
    assert b.mbart.cfg.vocab_size == int(ref["mbart_vocab"]) and b.mbart.cfg.normalize_before
    with torch.no_grad():
        logits = b.mbart(ref["mbart_src"], ref["mbart_prev"])
    assert (logits - ref["mbart_logits"]).abs().max() <= 1e-5
    # and our incremental decoder reproduces fairseq's full forward step by step
    state = b.mbart.start(ref["mbart_src"])
    with torch.no_grad():
        inc = torch.stack([b.mbart.step(state, ref["mbart_prev"][:, t]) for t in range(ref["mbart_prev"].shape[1])], 1)
    assert (inc - ref["mbart_logits"]).abs().max() <= 1e-5


def test_hubert_matches_fairseq_hubert(fairseq_files, tmp_path):
    files, ref = fairseq_files
    b = convert(tmp_path, "--hubert", files / "hubert.pt", "--hubert-layer", 2)
    assert len(b.hubert.layers) == 2 and b.hubert.post_extract_proj is not None
    with torch.no_grad():
        feats = b.hubert(ref["hubert_wave"])
    assert feats.shape == ref["hubert_layer2"].shape
    assert (feats - ref["hubert_layer2"]).abs().max() <= 1e-5


def test_codehifigan_matches_fairseq_code_generator(fairseq_files, tmp_path):
    files, ref = fairseq_files
    b = convert(tmp_path, "--vocoder", files / "g_00000100", "--vocoder-config", files / "config.json")
    audio = b.vocode(ref["vocoder_units"])
    assert audio.shape == ref["vocoder_audio"].shape and audio.numel() > 25 * 320  # durations > 1 frame were used
    assert (audio - ref["vocoder_audio"]).abs().max() <= 1e-5


TORCHAUDIO_NAMES = [  # torchaudio's wav2vec2/HuBERT names -> streamgen's (fairseq-derived) names
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"feature_extractor\.conv_layers\.0\.layer_norm\.", "feature_extractor.conv_layers.0.2."),
    (r"encoder\.feature_projection\.layer_norm\.", "layer_norm."),
    (r"encoder\.feature_projection\.projection\.", "post_extract_proj."),
    (r"encoder\.transformer\.pos_conv_embed\.conv\.", "pos_conv.conv."),
    (r"encoder\.transformer\.layer_norm\.", "encoder_layer_norm."),
    (r"encoder\.transformer\.layers\.(\d+)\.attention\.", r"layers.\1.self_attn."),
    (r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.", r"layers.\1.self_attn_layer_norm."),
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"layers.\1.fc1."),
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.", r"layers.\1.fc2."),
    (r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.final_layer_norm."),
]


def test_hubert_matches_torchaudio():
    try:
        from torchaudio.models import hubert_base
    except Exception as e:  # torchaudio 2.11's compiled parts fail to load beside torch 2.13
        pytest.skip(f"torchaudio does not import beside torch {torch.__version__}: {type(e).__name__}: {str(e)[:120]}")
    from streamgen.models.checkpoints import fold_weight_norm
    from streamgen.models.hubert import HubertConfig, HubertEncoder

    torch.manual_seed(0)
    ta = hubert_base().eval()
    with torch.no_grad():
        for p in ta.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = {}
    for k, v in ta.state_dict().items():
        for pattern, repl in TORCHAUDIO_NAMES:
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k, count=1)
                break
        else:
            raise AssertionError(f"unmapped torchaudio parameter {k}")
        sd[k] = v
    ours = HubertEncoder(HubertConfig(layers=12, output_layer=12)).eval()
    ours.load_state_dict(fold_weight_norm(sd), strict=True)
    wave = torch.randn(1, 16000) * 0.1
    with torch.no_grad():
        feats, _ = ta.extract_features(wave, num_layers=11)
        assert (ours(wave, layer=11) - feats[-1]).abs().max() <= 1e-5
