"""Bundles on disk, their errors, and the CLI's demo and info."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import streamgen
from streamgen.bundle import BundleError
from streamgen.testing import random_bundle
from streamgen.cli import app
from streamgen.models.prompt import DeepPrompt, PromptConfig

runner = CliRunner()


@pytest.fixture
def saved(tmp_path):
    b = random_bundle()
    b.prompts["continuation"] = DeepPrompt(b.mbart.cfg, PromptConfig(length=4)).init_from_model(b.mbart, torch.randint(0, 100, (2, 10)))
    return b, b.save(tmp_path / "b")


def test_roundtrip_keeps_outputs_and_prompts(saved):
    b, path = saved
    c = streamgen.load_bundle(path)
    units = torch.randint(0, 100, (20,))
    assert torch.equal(b.generate(units, "continuation", max_units=20), c.generate(units, "continuation", max_units=20))
    assert torch.equal(b.vocode(units), c.vocode(units))
    assert c.prompts["continuation"].cfg == PromptConfig(length=4)


def test_half_precision_bundle_loads_in_fp32_and_bf16(saved, tmp_path):
    b, _ = saved
    path = b.save(tmp_path / "half", dtype=torch.float16)
    assert (path / "mbart.safetensors").stat().st_size < 0.6 * (tmp_path / "b" / "mbart.safetensors").stat().st_size
    c = streamgen.load_bundle(path, dtype=torch.bfloat16)
    assert c.mbart.embed_tokens.weight.dtype == torch.bfloat16 and c.quantizer.centroids.dtype == torch.float32
    units, _ = c.encode(torch.randn(8000) * 0.1)
    assert c.vocode(c.generate(units, max_units=10, min_units=10)).shape[0] >= 10 * 320


def test_pack_casts_to_half_and_keeps_outputs_close(saved, tmp_path):
    b, path = saved
    r = runner.invoke(app, ["pack", str(path), str(tmp_path / "half")])
    assert r.exit_code == 0, r.output
    assert "MiB (float16)" in r.output
    c = streamgen.load_bundle(tmp_path / "half")
    assert c.prompts["continuation"].cfg == PromptConfig(length=4)
    units = torch.randint(0, 100, (20,))
    a, h = b.vocode(units), c.vocode(units)
    assert a.shape == h.shape and (a - h).abs().max() < 0.05 * a.abs().max()
    r = runner.invoke(app, ["pack", str(path), str(path)])
    assert r.exit_code == 2 and "must differ" in r.output


def test_concurrent_part_writers_keep_each_others_entries(saved):
    """The recipe trains the vocoder beside the prompts: both write into one bundle.json."""
    from concurrent.futures import ThreadPoolExecutor

    from streamgen.bundle import save_prompt

    b, path = saved
    prompts = {f"task{i}": DeepPrompt(b.mbart.cfg, PromptConfig(length=2 + i % 3)) for i in range(16)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: save_prompt(path, *kv), prompts.items()))
    c = streamgen.load_bundle(path)
    assert set(c.prompts) == {"continuation", *prompts}
    assert all(c.prompts[n].cfg.length == p.cfg.length for n, p in prompts.items())


def test_a_part_replaced_by_a_killed_job_is_the_part_it_was(saved, monkeypatch):
    """Training writes into the bundle it serves (--into-bundle): a job killed, or a disk filled, while a part's
    file is written leaves the part as it was, and nothing half-written under any name."""
    import streamgen.bundle
    from streamgen.bundle import save_prompt

    b, path = saved
    before = (path / "prompts" / "continuation.safetensors").read_bytes()

    def killed_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # the first bytes, then the job is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(streamgen.bundle, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_prompt(path, "continuation", DeepPrompt(b.mbart.cfg, PromptConfig(length=4)))
    monkeypatch.undo()
    assert (path / "prompts" / "continuation.safetensors").read_bytes() == before
    assert not [f.name for f in path.rglob("*") if "partial" in f.name]
    c = streamgen.load_bundle(path)
    units = torch.randint(0, 100, (20,))
    assert torch.equal(b.generate(units, "continuation", max_units=20), c.generate(units, "continuation", max_units=20))


def test_bundle_errors_are_clear(saved, tmp_path):
    _, path = saved
    with pytest.raises(BundleError, match="not a streamgen bundle"):
        streamgen.load_bundle(tmp_path / "missing")
    (path / "vocoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="vocoder.safetensors: not a readable safetensors"):
        streamgen.load_bundle(path)
    (path / "vocoder.safetensors").unlink()
    with pytest.raises(BundleError, match="vocoder.safetensors is missing"):
        streamgen.load_bundle(path)
    meta = json.loads((path / "bundle.json").read_text())
    del meta["parts"]["vocoder"]
    meta["parts"]["mbart"]["dim"] = 96
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match the config"):
        streamgen.load_bundle(path)


def test_missing_parts_and_prompts_are_named(saved, tmp_path):
    b, _ = saved
    only = streamgen.Bundle(mbart=b.mbart)
    with pytest.raises(BundleError, match="no vocoder"):
        only.vocode(torch.tensor([1, 2]))
    with pytest.raises(BundleError, match="no prompt 'translation'.*continuation"):
        b.generate(torch.tensor([1, 2]), prompt="translation")
    with pytest.raises(ValueError, match="0..99"):
        b.generate(torch.tensor([1, 200]))


def test_without_the_default_bundle_the_cli_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(streamgen.bundle, "default_bundle_path", lambda: None)
    with pytest.raises(BundleError, match="no default bundle"):
        streamgen.load_bundle()
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d.wav")])
    assert r.exit_code == 2 and "no default bundle" in r.output


def test_info_lists_parts_and_prompts(saved):
    _, path = saved
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 0, r.output
    for word in ("hubert", "kmeans", "mbart", "vocoder", "prompt continuation: length 4"):
        assert word in r.output
    r = runner.invoke(app, ["info", str(path / "nope")])
    assert r.exit_code == 2 and "not a streamgen bundle" in r.output


def test_a_tasks_own_backbone_round_trips_packs_and_generates(saved, tmp_path):
    """A task fine-tuned in full ships as its own backbone: named by the task, used for it alone."""
    from streamgen.bundle import save_backbone
    from streamgen.models.unit_mbart import UnitMBart

    b, path = saved
    torch.manual_seed(5)
    own = UnitMBart(b.mbart.cfg).eval()
    save_backbone(path, "translation", own)
    c = streamgen.load_bundle(path)
    assert set(c.backbones) == {"translation"} and c.backbone("translation") is c.backbones["translation"]
    assert c.backbone("continuation") is c.mbart and c.backbone() is c.mbart
    units = torch.randint(0, 100, (20,))
    alone = streamgen.Bundle(mbart=own)
    assert torch.equal(c.generate(units, "translation", max_units=20, min_units=20), alone.generate(units, max_units=20, min_units=20))
    assert torch.equal(c.generate(units, "continuation", max_units=20), b.generate(units, "continuation", max_units=20))
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 0 and "backbone of task translation" in r.output, r.output
    r = runner.invoke(app, ["pack", str(path), str(tmp_path / "half")])
    assert r.exit_code == 0, r.output
    h = streamgen.load_bundle(tmp_path / "half")
    assert (tmp_path / "half" / "backbones" / "translation.safetensors").stat().st_size < 0.6 * (path / "backbones" / "translation.safetensors").stat().st_size
    assert set(h.backbones) == {"translation"}
    meta = json.loads((path / "bundle.json").read_text())
    meta["backbones"] = {"../evil": meta["backbones"]["translation"]}
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="backbone name '../evil' must be a plain name"):
        streamgen.load_bundle(path)
    meta["backbones"] = {"translation": {**meta["backbones"]["../evil"], "dim": 96}}
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="translation.safetensors: weights do not match the config"):
        streamgen.load_bundle(path)
