"""Prompt tuning, full fine-tuning and denoising on CPU: the loss goes down, only the prompt changes,
resume and 2-process DDP (torchrun, gloo) reproduce the single run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

import streamgen
from streamgen.testing import random_bundle
from streamgen.models.unit_mbart import UnitMBart
from streamgen.train.data import MASK, Pair, collate, read_pairs, span_mask, write_pairs
from streamgen.train.loop import TrainConfig, Trainer


def toy_pairs(n: int, seed: int = 0) -> list[Pair]:
    """Targets from a small, skewed vocabulary: learnable by a prompt alone."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src = torch.randint(0, TINY.num_units, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
        tgt = (src[: len(src) // 2] % 3) * 7 + 1  # units 1, 8, 15
        out.append(Pair(f"u{i}", src.tolist(), tgt.tolist()))
    return out


def test_prompt_tuning_lowers_the_loss_and_changes_only_the_prompt(tmp_path):
    from streamgen.models.prompt import DeepPrompt, PromptConfig

    torch.manual_seed(0)
    model = UnitMBart(TINY)
    with torch.no_grad():  # output scale of a trained model: N(0, 0.02) embeddings cap logits near +-0.6
        model.embed_tokens.weight.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = toy_pairs(32)
    prompt = DeepPrompt(TINY, PromptConfig(8)).init_from_model(model, torch.tensor([(p.tgt * 8)[:8] for p in data[:4]]))
    cfg = TrainConfig(prompt_length=8, lr=0.1, warmup_steps=2, epochs=6, batch_size=8, patience=10)
    trainer = Trainer(model, cfg, tmp_path, prompt=prompt, progress=False)
    assert trainer.trainable == 2 * 8 * TINY.dim * (TINY.encoder_layers + TINY.decoder_layers)
    prompt_before = {k: v.clone() for k, v in trainer.prompt.state_dict().items()}
    start = trainer.evaluate(data)
    result = trainer.fit(data, data)
    assert result.best_dev_loss < 0.75 * start, (start, result.history)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # backbone bit-identical
    assert any(not torch.equal(v, prompt_before[k]) for k, v in trainer.prompt.state_dict().items())
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["trainable_parameters"] == trainer.trainable and (tmp_path / "best_prompt.safetensors").is_file()


def test_resume_continues_exactly(tmp_path):
    data = toy_pairs(24)

    def trainer(out):
        torch.manual_seed(0)
        return Trainer(UnitMBart(TINY), TrainConfig(prompt_length=4, lr=1e-2, warmup_steps=2, epochs=4, batch_size=8, patience=10), out, progress=False)

    straight = trainer(tmp_path / "a")
    straight.fit(data, data)
    first = trainer(tmp_path / "b")
    original = first.end_of_epoch

    def crash_after_epoch_2(*args):
        stop = original(*args)
        if first.epoch == 2:
            raise KeyboardInterrupt  # the process dies right after its epoch-2 checkpoint
        return stop

    first.end_of_epoch = crash_after_epoch_2
    with pytest.raises(KeyboardInterrupt):
        first.fit(data, data)
    second = trainer(tmp_path / "b")
    second.fit(data, data, resume=True)
    assert second.step == straight.step == 12
    for k, v in straight.prompt.state_dict().items():
        torch.testing.assert_close(second.prompt.state_dict()[k], v, atol=1e-6, rtol=1e-5)


def test_state_is_saved_inside_an_epoch_and_resumes_there_exactly(tmp_path):
    """save_every_s: a run killed mid-epoch loses at most that much work, and its resume equals the straight run."""
    data = toy_pairs(24)  # 3 batches per epoch

    def trainer(out, every):
        torch.manual_seed(0)
        cfg = TrainConfig(prompt_length=4, lr=1e-2, warmup_steps=2, epochs=4, batch_size=8, patience=10, save_every_s=every)
        return Trainer(UnitMBart(TINY), cfg, out, progress=False)

    straight = trainer(tmp_path / "a", 0)
    straight.fit(data, data)
    first = trainer(tmp_path / "b", 1e-9)  # due after every step
    original = first.train_step

    def killed_in_step_5(*args):
        if first.step == 4:  # steps 1-4 done: epoch 1, one batch in
            raise KeyboardInterrupt
        return original(*args)

    first.train_step = killed_in_step_5
    with pytest.raises(KeyboardInterrupt):
        first.fit(data, data)
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"]) == (4, 1)  # saved mid-epoch, not only at epoch 1's end (step 3)
    assert not list((tmp_path / "b").glob(".*.partial*"))  # (the state is written whole, then renamed)
    second = trainer(tmp_path / "b", 0)
    second.fit(data, data, resume=True)
    assert second.step == straight.step == 12 and second.epoch == straight.epoch
    for k, v in straight.prompt.state_dict().items():
        torch.testing.assert_close(second.prompt.state_dict()[k], v, atol=1e-6, rtol=1e-5)


def test_resuming_a_run_that_stopped_early_trains_no_further(tmp_path):
    data = toy_pairs(16)
    cfg = TrainConfig(prompt_length=4, lr=0.0, warmup_steps=1, epochs=20, batch_size=8, patience=2)  # lr 0: no improvement
    first = Trainer(UnitMBart(TINY), cfg, tmp_path, progress=False)
    first.fit(data, data)
    assert first.epoch == 3 and first.bad_epochs == 2  # epoch 1 sets the best, two more without improvement
    again = Trainer(UnitMBart(TINY), cfg, tmp_path, progress=False)
    result = again.fit(data, data, resume=True)
    assert (result.steps, result.epochs) == (first.step, 3)


def test_a_resume_with_other_batches_or_shapes_is_refused_not_trained_as_nothing(tmp_path, capsys):
    """A resumed run with another batch size took its step past the epoch's batches: it trained nothing and
    reported a best loss of 0.0 over the real checkpoints; another prompt length died in a tensor size error."""
    data = toy_pairs(24)

    def trainer(**kw):
        torch.manual_seed(0)
        cfg = TrainConfig(**{"prompt_length": 4, "lr": 1e-2, "warmup_steps": 2, "epochs": 2, "batch_size": 4, "patience": 10, **kw})
        return Trainer(UnitMBart(TINY), cfg, tmp_path, progress=False)

    first = trainer()
    first.fit(data, data)
    best = (tmp_path / "task.json").read_text()
    for kw, named in [({"batch_size": 12, "epochs": 10}, "batch_size 4 (now 12)"),
                      ({"prompt_length": 8}, "prompt_length 4 (now 8)"),
                      ({"seed": 1}, "seed 0 (now 1)")]:
        with pytest.raises(ValueError, match=r"holds a run that differs from this command in .*" + named.replace("(", r"\(").replace(")", r"\)")):
            trainer(**kw).fit(data, data, resume=True)
    with pytest.raises(ValueError, match=r"training_pairs 24 \(now 20\)"):
        trainer().fit(data[:20], data, resume=True)
    assert (tmp_path / "task.json").read_text() == best  # nothing written over the run
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "run"}, tmp_path / "state.pt")  # as an older streamgen saved it
    again = trainer(epochs=3)  # more epochs: the same batches, continued (an older state on trust, with a warning)
    result = again.fit(data, data, resume=True)
    assert result.steps == 18 and result.epochs == 3
    assert capsys.readouterr().err.startswith(f"warning: {tmp_path}/state.pt does not say which run it belongs to")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["run"]["batch_size"] == 4  # recorded from now on


def test_units_a_bundle_does_not_have_are_named_before_training(tmp_path):
    from streamgen.train.data import units_outside

    pairs = [Pair("a", [1, 2, MASK], [3]), Pair("b", [4], [TINY.num_units])]
    assert units_outside(pairs[:1], TINY.num_units) is None
    assert units_outside(pairs, TINY.num_units).startswith(f"pair b: tgt_units has unit {TINY.num_units}, outside this model's 0..{TINY.num_units - 1}")
    assert "src_units has unit -1" in units_outside([Pair("c", [-1], [1])], TINY.num_units)


def test_full_finetuning_and_denoising_train_the_backbone(tmp_path):
    torch.manual_seed(0)
    model = UnitMBart(TINY)
    before = model.encoder.layers[0].fc1.weight.clone()
    data = toy_pairs(16)
    full = Trainer(model, TrainConfig(mode="full", lr=1e-3, warmup_steps=1, epochs=3, batch_size=8), tmp_path / "f", progress=False)
    assert full.prompt is None and full.trainable == full.total
    start = full.evaluate(data)
    full.fit(data, data)
    assert full.best < start and not torch.equal(model.encoder.layers[0].fc1.weight, before)
    with_mask = dataclasses.replace(TINY, mask_token=TINY.num_units + 4)
    den = Trainer(UnitMBart(with_mask), TrainConfig(mode="denoise", lr=1e-3, warmup_steps=1, epochs=3, batch_size=8), tmp_path / "d", progress=False)
    start = den.evaluate(data)
    den.fit(data, data)
    assert den.best < start and (tmp_path / "d" / "best_mbart.safetensors").is_file()


def test_span_masking_is_mbart_text_infilling():
    g = torch.Generator().manual_seed(0)
    units = list(range(100))
    noised = span_mask(units, g, ratio=0.3)
    kept = [u for u in noised if u != MASK]
    assert 0.6 <= len(kept) / 100 <= 0.72 and kept == sorted(kept)  # ~30 % removed, order kept
    assert noised.count(MASK) >= 3 and all(not (a == MASK and b == MASK) for a, b in zip(noised, noised[1:]))
    b = collate([Pair("x", noised, units)], mask_token=TINY.num_units + 4)
    assert int((b.src == TINY.num_units + 4).sum()) == noised.count(MASK)


def test_pairs_tsv_roundtrip_and_errors(tmp_path):
    pairs = [Pair("a", [1, MASK, 3], [1, 2, 3]), Pair("b", [5], [6, 7])]
    write_pairs(tmp_path / "p.tsv", pairs, texts=[("x", "y"), ("z", "w")])
    assert [(p.id, p.src, p.tgt) for p in read_pairs(tmp_path / "p.tsv")] == [(p.id, p.src, p.tgt) for p in pairs]
    (tmp_path / "bad.tsv").write_text("id\tsrc_units\ttgt_units\na\t1 x\t2\n")
    with pytest.raises(ValueError, match="bad.tsv:2: units must be integers"):
        read_pairs(tmp_path / "bad.tsv")


@pytest.fixture
def cli_setup(tmp_path):
    b = random_bundle()  # dropout 0: runs are deterministic
    b.save(tmp_path / "bundle")
    write_pairs(tmp_path / "train.tsv", [Pair(p.id, [u % 100 for u in p.src], p.tgt) for p in toy_pairs(16)])
    return tmp_path


def cli(*args, torchrun=False):
    from services import free_port

    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "streamgen.cli"] if torchrun \
        else [sys.executable, "-m", "streamgen.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(base + list(map(str, args)), capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_torchrun_ddp_with_two_gloo_processes_equals_one_process(cli_setup):
    d = cli_setup
    args = ["train-prompt", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--prompt-length", "4",
            "--lr", "1e-2", "--epochs", "2", "--batch-size", "8", "--warmup", "2"]
    one = cli(*args, "--out", d / "one")
    assert "trainable of" in one and "1 process(es)" in one
    two = cli(*args, "--out", d / "two", torchrun=True)
    assert "2 process(es)" in two
    a, b = load_file(d / "one" / "last_prompt.safetensors"), load_file(d / "two" / "last_prompt.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_train_prompt_into_bundle_is_used_by_generate(cli_setup):
    d = cli_setup
    cli("train-prompt", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--prompt-length", "4",
        "--epochs", "1", "--batch-size", "8", "--out", d / "p", "--into-bundle")
    b = streamgen.load_bundle(d / "bundle")
    assert "toy" in b.prompts and b.prompts["toy"].cfg.length == 4
    units = torch.randint(0, 100, (10,))
    assert b.generate(units, "toy", max_units=5, min_units=5).shape == (5,)


def test_full_finetuning_into_bundle_becomes_the_tasks_own_backbone(cli_setup):
    d = cli_setup
    before = streamgen.load_bundle(d / "bundle")
    cli("train-prompt", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--prompt-length", "4",
        "--epochs", "1", "--batch-size", "8", "--out", d / "p0", "--into-bundle")  # a prompt on the shared backbone first
    out = cli("train-prompt", "--full", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--lr", "1e-3",
              "--epochs", "1", "--batch-size", "8", "--out", d / "f", "--into-bundle")
    assert "removed its prompt" in out and not (d / "bundle" / "prompts" / "toy.safetensors").exists()
    b = streamgen.load_bundle(d / "bundle")
    best = load_file(d / "f" / "best_mbart.safetensors")
    assert set(b.backbones) == {"toy"} and not b.prompts
    assert all(torch.equal(v, best[k]) for k, v in b.backbones["toy"].state_dict().items())
    assert all(torch.equal(v, before.mbart.state_dict()[k]) for k, v in b.mbart.state_dict().items())  # the shared one is untouched
    units = torch.randint(0, 100, (10,))
    assert torch.equal(b.generate(units, "toy", max_units=5, min_units=5),
                       streamgen.Bundle(mbart=b.backbones["toy"]).generate(units, max_units=5, min_units=5))
    # a prompt for the task is then trained on (and conditions) the task's own backbone
    before.save(d / "shared_only")
    for bundle, out in ((d / "bundle", d / "p"), (d / "shared_only", d / "p_shared")):
        cli("train-prompt", "--bundle", bundle, "--task", "toy", "--train", d / "train.tsv", "--prompt-length", "4",
            "--epochs", "1", "--batch-size", "8", "--out", out, "--into-bundle")
    b = streamgen.load_bundle(d / "bundle")
    assert b.prompts["toy"].cfg.length == 4 and b.generate(units, "toy", max_units=5, min_units=5).shape == (5,)
    own, shared = load_file(d / "p" / "best_prompt.safetensors"), load_file(d / "p_shared" / "best_prompt.safetensors")
    assert any(not torch.equal(own[k], shared[k]) for k in own)


def test_dropout_option_regularises_the_run_and_the_backbone_records_it(cli_setup):
    d = cli_setup
    model = streamgen.load_bundle(d / "bundle").mbart.train()  # random_bundle: dropout 0
    src, prev = torch.randint(4, 100, (2, 9)), torch.randint(4, 100, (2, 6))
    assert torch.equal(model(src, prev), model(src, prev))  # no dropout: training mode is deterministic
    model.set_dropout(0.5)
    assert model.cfg.dropout == 0.5 and not torch.equal(model(src, prev), model(src, prev))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        model.set_dropout(1.5)
    args = ["train-prompt", "--full", "--bundle", d / "bundle", "--task", "toy", "--train", d / "train.tsv", "--lr", "1e-3",
            "--epochs", "1", "--batch-size", "8"]
    cli(*args, "--out", d / "plain")
    cli(*args, "--out", d / "d", "--dropout", "0.3", "--into-bundle")
    a, b = load_file(d / "plain" / "last_mbart.safetensors"), load_file(d / "d" / "last_mbart.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same run without dropout ends elsewhere
    assert streamgen.load_bundle(d / "bundle").backbones["toy"].cfg.dropout == 0.3
    r = subprocess.run([sys.executable, "-m", "streamgen.cli", *map(str, args), "--out", d / "bad", "--dropout", "1.5"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and "--dropout: dropout must be in [0, 1), got 1.5" in r.stdout + r.stderr


def test_a_resumed_runs_differences_name_settings_either_side_lacks():
    from streamgen.resume import differences

    assert differences({"seed": 0, "pairs": 20}, {"seed": 1, "pairs": 20}) == "seed 0 (now 1)"
    assert differences({"seed": 0}, {"seed": 0, "bundle": None}) == "bundle (absent) (now None)"  # (was: nothing named)
    assert differences({"seed": 0, "old": 3}, {"seed": 0}) == "old 3 (now (absent))"
    assert differences({"a": 1}, {"a": 1}) == ""
