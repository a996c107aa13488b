"""Frame phone targets from TTS alignments, and the phone classifier's look-ahead."""

import torch

from streamgen.models.phone_net import PhoneNet, PhoneNetConfig
from streamgen.train.phones import INDEX, PHONES, flite_segments, frame_labels, piper_segments

# flite -voice slt -psdur -t "we are flying home on Monday" (flite 2.2)
FLITE = ("pau:0.222 w:0.263 iy:0.369 aa:0.459 r:0.550 f:0.663 l:0.713 ay:0.823 ih:0.868 ng:0.962 hh:1.033 ow:1.145 "
         "m:1.242 aa:1.387 n:1.428 m:1.468 ah:1.578 n:1.639 d:1.695 iy:1.863 pau:2.114")
# piper joe, "we are flying home": (symbol, samples at 22,050 Hz) as the patched voice reports them
PIPER = [("^", 1024), ("w", 768), ("i", 512), ("ː", 1024), ("ʲ", 512), (" ", 512), ("ɑ", 512), ("ː", 768), ("ɹ", 768),
         (" ", 768), ("f", 512), ("l", 768), ("ˈ", 1024), ("a", 1024), ("ɪ", 1024), ("ɪ", 512), ("ŋ", 1024), (" ", 1024),
         ("h", 768), ("ˈ", 512), ("o", 768), ("ʊ", 1024), ("m", 512), (".", 1536), ("$", 768)]


def names(segments):
    return [p for p, _ in segments]


def test_flite_segments_split_diphthongs_and_keep_the_end_times():
    segs = flite_segments(FLITE)
    assert names(segs)[:10] == ["sil", "w", "i", "ɑ", "ɹ", "f", "l", "a", "ɪ", "ɪ"]  # ay -> a ɪ, then ih
    ay = [s for p, s in segs[7:9]]
    assert abs(ay[0] - 0.055) < 1e-9 and abs(ay[1] - 0.055) < 1e-9  # 0.713 -> 0.823 split evenly
    assert abs(sum(s for _, s in segs) - 2.114) < 1e-9


def test_piper_marks_join_their_phones_and_the_durations_add_up():
    segs = piper_segments([(p, n / 22050) for p, n in PIPER])
    assert names(segs) == ["sil", "w", "i", "ɑ", "ɹ", "f", "l", "a", "ɪ", "ɪ", "ŋ", "h", "o", "ʊ", "m", "sil", "sil"]
    assert abs(segs[2][1] - (512 + 1024 + 512 + 512) / 22050) < 1e-9  # i + length mark + palatal mark + word gap
    assert abs(segs[7][1] - (1024 + 1024) / 22050) < 1e-9  # the stress mark's time goes to the vowel after it
    assert abs(sum(s for _, s in segs) - sum(n for _, n in PIPER) / 22050) < 1e-9


def test_the_two_engines_agree_on_the_same_words():
    flite = [p for p in names(flite_segments(FLITE)) if p != "sil"][:14]
    piper = [p for p in names(piper_segments([(p, n / 22050) for p, n in PIPER])) if p != "sil"]
    assert flite == piper[:14]


def test_frame_labels_take_the_phone_under_each_centre():
    labels = frame_labels([("sil", 0.03), ("a", 0.02), ("ɪ", 0.05)], 6)
    # centres 0.01 0.03 0.05 0.07 0.09 0.11: sil | a (0.03 is a's start) | ɪ ɪ | ɪ until 0.10 | past the end: silence
    assert [PHONES[i] for i in labels] == ["sil", "a", "ɪ", "ɪ", "ɪ", "sil"]
    assert INDEX["sil"] == 0


def test_phone_net_looks_ahead_exactly_as_configured():
    torch.manual_seed(0)
    cfg = PhoneNetConfig(n_mels=8, dim=16, kernel=3, dilations=[1, 2], num_phones=5)
    net = PhoneNet(cfg).eval()
    assert cfg.look_ahead == 3
    x = torch.randn(1, 40, 8)
    y = x.clone()
    y[:, 20:] += torch.randn(1, 20, 8)  # change the input from frame 20 on
    a, b = net(x)[0], net(y)[0]
    assert torch.equal(a[: 20 - cfg.look_ahead], b[: 20 - cfg.look_ahead])  # frames that cannot see frame 20
    assert not torch.allclose(a[20 - cfg.look_ahead], b[20 - cfg.look_ahead])  # the first frame that can


def test_piper_and_flite_speak_with_their_frame_phones(tmp_path):
    """The real engines: each utterance's frame phones cover its audio, and both voices say the
    words' phones in the same order."""
    import shutil

    import pytest
    pytest.importorskip("onnx")
    pytest.importorskip("piper")
    if not shutil.which("flite"):
        pytest.skip("flite is not installed (Debian: apt-get install flite)")
    from streamgen.train.phones import HOP_S, RATE, FliteAligned, PiperAligned

    spoken = {}
    for name, tts in (("joe", PiperAligned(tmp_path)), ("slt", FliteAligned("slt"))):
        audio, segs = tts("we are flying home", 1.0)
        total = sum(s for _, s in segs)
        assert abs(total - len(audio) / RATE) < 2 * HOP_S, (name, total, len(audio) / RATE)
        labels = frame_labels(segs, len(audio) // int(RATE * HOP_S))
        spoken[name] = [PHONES[i] for k, i in enumerate(labels.tolist()) if k == 0 or i != labels[k - 1]]
        spoken[name] = [p for p in spoken[name] if p != "sil"]
    assert spoken["joe"] == spoken["slt"] == ["w", "i", "ɑ", "ɹ", "f", "l", "a", "ɪ", "ŋ", "h", "o", "ʊ", "m"]  # ɪ ɪ: one run


def test_vocal_tract_warp_moves_formants_and_keeps_alpha_one_exact():
    from streamgen.train.phones import warp_mels

    m = torch.randn(5, 80)
    assert torch.allclose(warp_mels(m, 1.0), m, atol=1e-5)
    peak = torch.zeros(1, 80)
    peak[0, 40] = 1.0
    assert warp_mels(peak, 1.15).argmax() > 40 > warp_mels(peak, 0.85).argmax()  # alpha > 1 raises formants
