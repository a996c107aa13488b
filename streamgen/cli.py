"""The `streamgen` command line."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
import typer

from .bundle import Bundle, BundleError, load_bundle
from .models.checkpoints import CheckpointError
from .models.prompt import count_parameters
from .options import LM_DTYPE_HELP, THREADS_HELP, fail, open_bundle
from .pipeline.stats import figures_help

DEBUG = os.environ.get("STREAMGEN_DEBUG", "") not in ("", "0")


class App(typer.Typer):
    """The command line: a mistake in the command line itself (an unknown option, a value that is
    not a number) is one line and exit code 2; a failure nobody foresaw is one line and exit code 1,
    with its traceback only under `--debug`."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, **kwargs, standalone_mode=False)
        except typer.Abort:
            typer.secho("aborted", err=True)
            sys.exit(1)
        except Exception as e:
            if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's usage errors (typer vendors click)
                if type(e).__name__ == "NoArgsIsHelpError":  # `streamgen` alone: the help
                    e.show()
                    sys.exit(0)
                where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "streamgen"
                message = " ".join(e.format_message().split())
                typer.secho(f"error: {message} (see {where} --help)", fg=typer.colors.RED, err=True)
                sys.exit(e.exit_code)
            if DEBUG:
                raise
            if type(e).__name__ == "WriteFailed":  # its message names the file, the reason and what is left: all there is to say
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                sys.exit(1)
            typer.secho(f"error: {type(e).__name__}: {e} (streamgen --debug ... shows where)", fg=typer.colors.RED, err=True)
            sys.exit(1)
        if code == 130:  # typer's answer to a Ctrl-C before the command handles signals itself (loading the model, say)
            typer.secho("interrupted", err=True)
        sys.exit(code if isinstance(code, int) else 0)


app = App(help="Streaming speech generation with prompt-tuned speech language models.", no_args_is_help=True,
          pretty_exceptions_enable=False)


@app.callback()
def main(debug: bool = typer.Option(DEBUG, "--debug", help="Show tracebacks and debug logs (also STREAMGEN_DEBUG=1).")):
    """Streaming speech generation with prompt-tuned speech language models. Mistakes in a command
    exit with code 2, failures while it runs with 1."""
    global DEBUG
    DEBUG = debug


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _setup_logging() -> None:
    """Warnings and errors as one line each; debug logs and tracebacks only under --debug."""
    import logging

    class OneLine(logging.Formatter):
        def formatException(self, ei) -> str:
            return f"{ei[0].__name__}: {ei[1]}"

        def format(self, record: logging.LogRecord) -> str:
            record.exc_text = None
            text = super().format(record)
            return text.replace("\n", " | ") if not DEBUG else text

    class Stderr(logging.StreamHandler):  # whatever sys.stderr is when a record comes (test runners swap it)
        stream = property(lambda self: sys.stderr, lambda self, value: None)

    handler = Stderr()
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt) if DEBUG else OneLine(fmt))
    logging.basicConfig(level=logging.DEBUG if DEBUG else logging.WARNING, handlers=[handler], force=True)


@app.command()
def convert(
    out: Path = typer.Option(..., help="Bundle directory to write."),
    hubert: Optional[Path] = typer.Option(None, help="fairseq HuBERT / mHuBERT checkpoint (.pt)."),
    hubert_layer: int = typer.Option(11, help="Layer whose features the k-means was fitted on."),
    kmeans: Optional[Path] = typer.Option(None, help="k-means model: joblib MiniBatchKMeans .bin, or centroids .npy."),
    mbart: Optional[Path] = typer.Option(None, help="fairseq Unit mBART checkpoint.pt."),
    num_units: int = typer.Option(1000, help="Units in the Unit mBART dictionary (tokens 4..4+N-1)."),
    mask_token: Optional[int] = typer.Option(None, help="Index of <mask> in the Unit mBART dictionary (enables inpainting)."),
    vocoder: Optional[Path] = typer.Option(None, help="CodeHiFiGAN generator checkpoint (g_*)."),
    vocoder_config: Optional[Path] = typer.Option(None, help="The vocoder's config.json."),
    dtype: str = typer.Option("float32", help="Weight dtype in the bundle: float32, float16 or bfloat16."),
):
    """Turn public fairseq checkpoints into a streamgen bundle (safetensors + bundle.json)."""
    from .models.checkpoints import read_codehifigan, read_hubert, read_kmeans, read_unit_mbart
    from .models.hubert import HubertEncoder
    from .models.kmeans import KMeansQuantizer
    from .models.unit_mbart import UnitMBart
    from .models.vocoder import CodeHiFiGAN

    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not any((hubert, kmeans, mbart, vocoder)):
        fail("nothing to convert: give at least one of --hubert, --kmeans, --mbart, --vocoder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out}: {'not a directory' if not out.is_dir() else 'not empty'}; convert writes a new bundle "
             "into a new or empty directory, never over one")
    if (vocoder is None) != (vocoder_config is None):
        fail("--vocoder and --vocoder-config go together")
    b = Bundle()

    def build(name, module_cls, cfg, sd):
        """The module, after its shapes (built on the meta device: no memory) are checked against the
        checkpoint's: a config read from the file is not allocated before its weights are seen to fit it."""
        from .bundle import _Skeleton, shape_difference

        typer.echo(f"  {name}: {len(sd)} tensors")
        try:
            with _Skeleton():
                want = {k: tuple(v.shape) for k, v in module_cls(cfg).state_dict().items()}
        except (RuntimeError, NotImplementedError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"{name}: the checkpoint's config cannot be built: {type(e).__name__}: {e}") from None
        diff = shape_difference(want, {k: tuple(v.shape) for k, v in sd.items()}, "checkpoint")
        if diff is not None:
            raise CheckpointError(f"{name}: the checkpoint's parameters do not fit its config ({diff})")
        m = module_cls(cfg)
        m.load_state_dict(sd, strict=True)
        return m.eval()

    try:
        if hubert:
            typer.echo(f"reading HuBERT {hubert}")
            cfg, sd = read_hubert(hubert, output_layer=hubert_layer)
            b.hubert = build("hubert", HubertEncoder, cfg, sd)
            b.sample_rate = cfg.sample_rate
        if kmeans:
            typer.echo(f"reading k-means {kmeans}")
            b.quantizer = KMeansQuantizer(read_kmeans(kmeans))
            typer.echo(f"  kmeans: {b.quantizer.num_units} centroids of size {b.quantizer.dim}")
        if mbart:
            typer.echo(f"reading Unit mBART {mbart}")
            cfg, sd = read_unit_mbart(mbart, num_units=num_units)
            if mask_token is not None:
                if not 4 + num_units <= mask_token < cfg.vocab_size:
                    fail(f"--mask-token {mask_token} must index a token after the units (4+{num_units} .. {cfg.vocab_size - 1})")
                cfg = dataclasses.replace(cfg, mask_token=mask_token)
            b.mbart = build("mbart", UnitMBart, cfg, sd)
        if vocoder:
            typer.echo(f"reading CodeHiFiGAN {vocoder} + {vocoder_config}")
            cfg, sd = read_codehifigan(vocoder, vocoder_config)
            b.vocoder = build("vocoder", CodeHiFiGAN, cfg, sd)
    except CheckpointError as e:
        fail(str(e))
    if b.hubert and b.quantizer and b.hubert.cfg.dim != b.quantizer.dim:
        fail(f"HuBERT features have size {b.hubert.cfg.dim} but the k-means centroids {b.quantizer.dim}")
    b.save(out, dtype=DTYPES[dtype])
    typer.echo(f"wrote {out}")


@app.command()
def info(path: Optional[Path] = typer.Argument(None, help="A bundle directory (default: the one shipped with streamgen).")):
    """Show what a bundle holds: parts, parameter counts, dtype, file sizes."""
    from .bundle import default_bundle_path

    shipped = path is None
    b = open_bundle(path, "cpu")
    path = path or default_bundle_path()
    raw = {}
    from safetensors import safe_open

    for name in b.modules():
        with safe_open(str(path / f"{name}.safetensors"), "pt") as f:
            raw[name] = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    typer.echo(f"bundle {path}{'  (the default bundle shipped with streamgen)' if shipped else ''}  (sample rate {b.sample_rate} Hz)")
    typer.echo(f"{'part':<13} {'parameters':>12} {'dtype':>10} {'size':>10}  details")
    for name, m in b.modules().items():
        size = (path / f"{name}.safetensors").stat().st_size
        n = count_parameters(m) + sum(x.numel() for x in m.buffers())
        typer.echo(f"{name:<13} {n:>12,} {','.join(sorted(raw[name])):>10} {size / 1e6:>8.2f}MB  {_describe(name, m)}")
    for name, p in b.prompts.items():
        size = (path / "prompts" / f"{name}.safetensors").stat().st_size
        typer.echo(f"prompt {name}: length {p.cfg.length} on {'+'.join(p.cfg.stacks)}, {count_parameters(p):,} parameters, {size / 1e6:.2f}MB")
    for name, m in b.backbones.items():
        size = (path / "backbones" / f"{name}.safetensors").stat().st_size
        typer.echo(f"backbone of task {name} (fine-tuned for it, in place of the shared mbart): {count_parameters(m):,} parameters, "
                   f"{size / 1e6:.2f}MB, {_describe('mbart', m)}")


def _describe(name: str, m) -> str:
    c = getattr(m, "cfg", None)
    if name == "hubert":
        return f"{c.layers} layers, d={c.dim}, output layer {c.output_layer}, hop {c.hop}"
    if name == "kmeans":
        return f"K={m.num_units}, D={m.dim}"
    if name == "mbart":
        return f"{c.encoder_layers}+{c.decoder_layers} layers, d={c.dim}, heads {c.heads}, vocab {c.vocab_size} ({c.num_units} units)"
    if name == "logmel_units":
        return f"K={c.num_units} on {c.n_mels} log-mel bands, hop {c.hop}, window {c.win}"
    if name == "phone_units":
        r, k = c.recogniser, c.classifier
        kept = f"; k-means reading kept for {', '.join(c.kmeans_tasks)}" if c.kmeans_tasks else ""
        return (f"phone recogniser ({r.layers} Conformer layers, d={r.dim}) + unit classifier (d={k.dim}) -> K={k.num_phones}, "
                f"windows of {c.stride} frames with {c.left} before and {c.lookahead} after{kept}")
    if name == "source_filter":
        return f"hop {c.hop}, {c.layers} conv layers d={c.dim}, {c.harmonics} harmonics + noise, {c.bands} envelope bands"
    return f"hop {c.hop}, upsample {list(c.upsample_rates)}, duration predictor {'yes' if c.dur_predictor_params else 'no'}"


@app.command()
def demo(
    bundle: Optional[Path] = typer.Option(None, help="Bundle directory (default: the one shipped with streamgen)."),
    input: Optional[Path] = typer.Option(None, "--input", help="Speech to continue (default: the bundled sample)."),
    out: Path = typer.Option(Path("demo_out.wav"), help="Where to write the input followed by its continuation."),
    max_units: int = typer.Option(150, help="Units to generate (50 per second)."),
    seed: int = typer.Option(0),
):
    """Continue a sample utterance offline and write the result with timing figures."""
    from .io.files import read_audio, write_audio
    from .pipeline.streams import vocoder_streams

    from .options import UsageError, check_audio_file, check_output_file, in_range

    src = input or Path(str(resources.files("streamgen") / "assets" / "sample.wav"))
    try:
        check_audio_file(src)
        check_output_file(out)
        in_range("--max-units", max_units, 1, None)
    except UsageError as e:
        fail(str(e))
    b = open_bundle(bundle, "cpu")
    try:
        wave = read_audio(src, b.sample_rate)
        t0 = time.perf_counter()
        units, durations = b.encode(wave)
        t1 = time.perf_counter()
        prompt = "continuation" if "continuation" in b.prompts else None
        gen = b.generate(units, prompt=prompt, max_units=max_units, min_units=max_units // 2, greedy=False, top_k=20, seed=seed)
        t2 = time.perf_counter()
        stream = vocoder_streams(b.unit_vocoder)()
        chunks = [stream.push(gen[i : i + 16]) for i in range(0, len(gen), 16)] + [stream.flush()]
        audio = torch.cat(chunks).float().cpu()
        t3 = time.perf_counter()
    except (ValueError, BundleError) as e:
        fail(str(e))
    write_audio(out, torch.cat([wave, audio]), b.sample_rate)
    sec_in, sec_out = len(wave) / b.sample_rate, len(audio) / b.sample_rate
    typer.echo(f"input      {src.name}: {sec_in:.2f} s -> {len(units)} units (de-duplicated from {int(durations.sum())} frames)")
    typer.echo(f"generated  {len(gen)} units{' with prompt ' + prompt if prompt else ' (no task prompt)'} -> {sec_out:.2f} s of audio")
    typer.echo(f"compute    encode {1e3 * (t1 - t0):.0f} ms, generate {1e3 * (t2 - t1):.0f} ms, vocode {1e3 * (t3 - t2):.0f} ms "
               f"({len(chunks)} chunks); real-time factor {(t3 - t0) / max(sec_in + sec_out, 1e-9):.3f}")
    typer.echo(f"wrote      {out}")


def _train(bundle: Path, train: Path, dev: Optional[Path], out: Path, cfg, device: str, resume: bool, new_model=None,
           task: str | None = None, dropout: float | None = None, wait_k: int | None = None, wait_ratio: float = 1.0):
    """Shared by train-prompt and train-backbone: load, train (torchrun-aware), report. A task's
    training starts from the backbone the task runs on (its own, where the bundle has one); `dropout`
    replaces the backbone's residual dropout for this run; `wait_k` trains it to stream (a causal
    encoder, decoder positions limited to the wait-k schedule; see UnitMBartConfig)."""
    from .train.data import read_pairs, units_outside
    from .train.loop import Trainer, setup_distributed, world

    _check_run_dir(out, resume, "state.pt", "a training run")
    if resume and not (out / "state.pt").is_file():
        fail(f"--resume: {out} holds no training state (state.pt) to resume; drop --resume to start a run there")
    dev_ = torch.device(device)
    setup_distributed(dev_)
    rank, size = world()
    try:
        b = load_bundle(bundle)
        train_pairs = read_pairs(train)
        dev_pairs = read_pairs(dev) if dev else None
    except (BundleError, ValueError) as e:
        fail(str(e))
    if b.mbart is None and new_model is not None:
        b.mbart = new_model(b.logmel_units.num_units if b.logmel_units is not None else b.need("kmeans").num_units)
        typer.echo(f"new Unit mBART: {count_parameters(b.mbart):,} parameters (vocabulary {b.mbart.cfg.vocab_size})")
    model = b.backbone(task)
    for path, pairs in ((train, train_pairs), (dev, dev_pairs or [])):
        why = units_outside(pairs, model.cfg.num_units)
        if why:
            fail(f"{path}: {why}")
    if dropout is not None:
        try:
            model.set_dropout(dropout)
        except ValueError as e:
            fail(f"--dropout: {e}")
    if wait_k is not None:
        from dataclasses import replace

        try:
            model.cfg = replace(model.cfg, wait_k=wait_k, wait_ratio=wait_ratio)
        except ValueError as e:
            fail(f"--wait-k/--wait-ratio: {e}")
    prompt = None
    if cfg.mode == "prompt":
        from .models.prompt import DeepPrompt, PromptConfig

        prompt = DeepPrompt(model.cfg, PromptConfig(cfg.prompt_length, tuple(cfg.prompt_stacks)))
        prompt.init_from_model(model, _init_units(train_pairs, cfg.prompt_length))
    trainer = Trainer(model, cfg, out, dev_, prompt=prompt)
    if rank == 0:
        typer.echo(f"{cfg.mode}: {trainer.trainable:,} trainable of {trainer.total:,} parameters "
                   f"({100 * trainer.trainable / trainer.total:.2f} %), {len(train_pairs)} training pairs, {size} process(es)")
    try:
        result = trainer.fit(train_pairs, dev_pairs, resume=resume)
    except ValueError as e:  # a state that is not this run's, or data that cannot feed the processes
        fail(str(e))
    if rank == 0:
        typer.echo(f"done: {result.steps} steps, {result.epochs} epochs, best dev loss {result.best_dev_loss:.4f} -> {out}")
    if size > 1:
        torch.distributed.barrier()  # rank 0's files are written before anyone leaves
        torch.distributed.destroy_process_group()
    return b, trainer, rank


def _model_identity(bundle: Path | None, prompt: Path | None, no_prompt: bool, mbart: Path | None, lm_dtype: str | None) -> dict:
    """What an evaluation's figures depend on besides its test set: the bundle's files, and what replaced parts of it."""
    from .bundle import default_bundle_path, fingerprint

    where = bundle or default_bundle_path()
    extra = {"prompt": "none" if no_prompt else f"{prompt} {_file_stamp(prompt)}" if prompt else "the bundle's",
             "mbart": f"{mbart} {_file_stamp(mbart)}" if mbart else "the bundle's", "lm_dtype": lm_dtype or "float32"}
    return {"bundle": f"{Path(where).resolve()} {fingerprint(where)}" if where else "none", **extra}


def _file_stamp(path: Path) -> str:
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _check_run_dir(out: Path, resume: bool, state: str, what: str) -> None:
    """A training command's --out: a directory, and one whose run (its `state` file) is continued only with --resume."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory for the checkpoints")
    if not resume and (out / state).is_file():
        fail(f"--out {out} holds {what}: add --resume to continue it, or give another --out (nothing is overwritten)")


def _check_schedule(lr: float, epochs: int, max_steps: int | None, batch_size: int, warmup: int, patience: int,
                    save_minutes: float) -> None:
    """The options train-prompt and train-backbone share, in range (UsageError names the first that is not)."""
    from .options import in_range

    in_range("--lr", lr, 1e-8, 10.0)
    in_range("--epochs", epochs, 1, None)
    if max_steps is not None:
        in_range("--max-steps", max_steps, 1, None)
    in_range("--batch-size", batch_size, 1, None)
    in_range("--warmup", warmup, 0, None)
    in_range("--patience", patience, 1, None)
    in_range("--save-minutes", save_minutes, 0.0, None)


def _init_units(pairs, length: int) -> torch.Tensor:
    """Real unit sequences to initialise a prompt from (up to 8 rows of equal length)."""
    seqs = [p.tgt for p in pairs if len(p.tgt) >= 4][:8]
    if not seqs:
        fail("training targets are too short to initialise a prompt from")
    n = max(min(min(len(q) for q in seqs), 64), -(-length // len(seqs)))
    return torch.tensor([(q * (n // len(q) + 1))[:n] for q in seqs])


@app.command("train-prompt")
def train_prompt(
    bundle: Path = typer.Option(..., help="Bundle with the frozen Unit mBART."),
    task: str = typer.Option(..., help="Task name the prompt is for (its name in the bundle)."),
    train: Path = typer.Option(..., help="Training pairs TSV (id, src_units, tgt_units)."),
    dev: Optional[Path] = typer.Option(None, help="Dev pairs TSV (early stopping)."),
    out: Path = typer.Option(..., help="Output directory (checkpoints, task.json, resumable state)."),
    prompt_length: int = typer.Option(16), stacks: str = typer.Option("encoder,decoder"),
    lr: float = typer.Option(5e-3), epochs: int = typer.Option(10), max_steps: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(16), warmup: int = typer.Option(50), clip: float = typer.Option(1.0),
    patience: int = typer.Option(3), seed: int = typer.Option(0),
    full: bool = typer.Option(False, help="Fine-tune the whole backbone instead (the baseline)."),
    resume: bool = typer.Option(False, help="Continue from OUT's last state."),
    save_minutes: float = typer.Option(10.0, help="Also save the resumable state this often inside an epoch (0: epoch ends only)."),
    device: str = typer.Option("cpu"),
    into_bundle: bool = typer.Option(False, help="Add the best prompt to the bundle as the task's; with --full, the "
                                     "fine-tuned Unit mBART as the task's own backbone (its sessions run on it)."),
    dropout: Optional[float] = typer.Option(None, help="Residual dropout while training (default: the backbone's own); "
                                            "with --full, a regulariser when the pairs are few."),
    wait_k: Optional[int] = typer.Option(None, help="With --full: train the backbone to stream under wait-k with this k "
                                         "(source units before the first output unit): a causal encoder, and each output "
                                         "unit sees only the source the schedule has read, so live decisions never re-encode "
                                         "the source or re-run the decoder over committed units."),
    wait_ratio: float = typer.Option(1.0, help="With --wait-k: output units per source unit of the schedule."),
):
    """Prompt tuning: the backbone stays frozen; only the deep prompt learns. Run under torchrun for DDP.
    With --full, the whole backbone is fine-tuned for the task instead (the baseline)."""
    from .bundle import NAME
    from .options import UsageError, in_range, one_of
    from .train.loop import TrainConfig

    try:  # before any data is read or any step taken
        if not NAME.fullmatch(task):
            raise UsageError(f"--task {task!r}: a task name is letters, digits, _ . - (it names the prompt's file)")
        for stack in stacks.split(","):
            one_of("--stacks", stack, ("encoder", "decoder"))
        in_range("--prompt-length", prompt_length, 1, 4096)
        _check_schedule(lr, epochs, max_steps, batch_size, warmup, patience, save_minutes)
        in_range("--clip", clip, 0.0, None)
        if wait_k is not None:
            in_range("--wait-k", wait_k, 0, None)
        in_range("--wait-ratio", wait_ratio, 0.1, 10.0)
    except UsageError as e:
        fail(str(e))
    cfg = TrainConfig(mode="full" if full else "prompt", prompt_length=prompt_length, prompt_stacks=tuple(stacks.split(",")),
                      lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, warmup_steps=warmup, clip=clip,
                      patience=patience, seed=seed, save_every_s=60 * save_minutes)
    if wait_k is not None and not full:
        fail("--wait-k trains the backbone to stream: it needs --full (a prompt cannot change the attention masks)")
    b, trainer, rank = _train(bundle, train, dev, out, cfg, device, resume, task=task, dropout=dropout,
                              wait_k=wait_k, wait_ratio=wait_ratio)
    if into_bundle and rank == 0 and full:
        from safetensors.torch import load_file

        from .bundle import save_backbone

        model = b.backbone(task)
        model.load_state_dict(load_file(str(out / "best_mbart.safetensors")))
        dropped = save_backbone(bundle, task, model.cpu())
        typer.echo(f"added the {task!r} task's own backbone to {bundle}"
                   + (" (and removed its prompt, which conditioned the shared backbone)" if dropped else ""))
    elif into_bundle and rank == 0:
        from .bundle import save_prompt
        from .models.prompt import load_prompt

        save_prompt(bundle, task, load_prompt(out / "best_prompt.safetensors", b.backbone(task).cfg))
        typer.echo(f"added prompt {task!r} to {bundle}")


@app.command("train-backbone")
def train_backbone(
    bundle: Path = typer.Option(..., help="Bundle whose Unit mBART is pretrained (its weights are the start)."),
    train: Path = typer.Option(..., help="Unit manifest (`streamgen units`: its units) or task pairs (their tgt_units): the unit sequences to denoise."),
    dev: Optional[Path] = typer.Option(None), out: Path = typer.Option(...),
    lr: float = typer.Option(5e-4), epochs: int = typer.Option(10), max_steps: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(16), warmup: int = typer.Option(100), mask_ratio: float = typer.Option(0.3),
    patience: int = typer.Option(3), seed: int = typer.Option(0), resume: bool = typer.Option(False),
    save_minutes: float = typer.Option(10.0, help="Also save the resumable state this often inside an epoch (0: epoch ends only)."),
    device: str = typer.Option("cpu"),
    into_bundle: bool = typer.Option(False, help="Write the best weights into the bundle as its mbart part."),
    dim: int = typer.Option(256, help="New model only (the bundle has no mbart): width."),
    layers: int = typer.Option(3, help="New model only: encoder and decoder layers each."),
    heads: int = typer.Option(4, help="New model only."), ffn: int = typer.Option(1024, help="New model only."),
    dropout: Optional[float] = typer.Option(None, help="Residual dropout while training (default: the model's own, 0.1 new)."),
):
    """mBART-style denoising pretraining of the Unit mBART on units (span infilling). Starts from the
    bundle's Unit mBART, or from a new one of the given size if it has none."""
    from .models.unit_mbart import UnitMBart, UnitMBartConfig
    from .train.loop import TrainConfig

    def new_model(k: int) -> UnitMBart:
        vocab = -(-(4 + k + 3) // 8) * 8  # specials, units, [en], [es], <mask>; padded like mBART's table
        return UnitMBart(UnitMBartConfig(vocab_size=vocab, num_units=k, dim=dim, ffn_dim=ffn, heads=heads, encoder_layers=layers,
                                         decoder_layers=layers, max_positions=1024, mask_token=4 + k + 2))

    from .options import UsageError, in_range

    try:  # before any data is read or any step taken
        _check_schedule(lr, epochs, max_steps, batch_size, warmup, patience, save_minutes)
        in_range("--mask-ratio", mask_ratio, 0.01, 0.9)
    except UsageError as e:
        fail(str(e))
    cfg = TrainConfig(mode="denoise", lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, warmup_steps=warmup,
                      mask_ratio=mask_ratio, patience=patience, seed=seed, save_every_s=60 * save_minutes)
    b, trainer, rank = _train(bundle, train, dev, out, cfg, device, resume, new_model, dropout=dropout)
    if into_bundle and rank == 0:
        from safetensors.torch import load_file

        from .bundle import save_part

        b.mbart.load_state_dict(load_file(str(out / "best_mbart.safetensors")))
        save_part(bundle, "mbart", b.mbart.cpu())
        typer.echo(f"wrote the mbart part of {bundle}")


@app.command("train-units")
def train_units(
    manifest: Path = typer.Option(..., help="Speech manifest (id, audio, ...)."),
    bundle: Path = typer.Option(..., help="Bundle directory to write the hubert and kmeans parts into (created if new)."),
    dim: int = typer.Option(256), layers: int = typer.Option(4), heads: int = typer.Option(4), ffn: int = typer.Option(1024),
    conv_dim: int = typer.Option(256, help="Channels of the conv feature extractor."),
    target_clusters: int = typer.Option(100, "--target-clusters", "--mfcc-clusters", help="k-means clusters of the targets."),
    teacher: Optional[Path] = typer.Option(None, help="HuBERT's next iteration: targets from this bundle's unit encoder "
                                           "(its output layer) instead of MFCC; the same conv layers as --conv-dim's."),
    units: int = typer.Option(100), output_layer: int = typer.Option(4),
    steps: int = typer.Option(5000), batch_size: int = typer.Option(8), lr: float = typer.Option(5e-4),
    state: Optional[Path] = typer.Option(None, help="Resumable: the training state is saved here every 10 minutes and "
                                         "picked up from here when rerun."),
    seed: int = typer.Option(0), device: str = typer.Option("cpu"),
):
    """Train a small unit encoder (HuBERT masked prediction: iteration 1 on MFCC k-means targets, later
    iterations on a teacher's) and its k-means units."""
    from .models.hubert import HubertConfig
    from .options import UsageError, in_range
    from .train.units import UnitTrainConfig, UnitTrainer

    try:  # before any audio is read or any step taken
        in_range("--steps", steps, 1, None)
        in_range("--batch-size", batch_size, 1, None)
        in_range("--lr", lr, 1e-8, 10.0)
        in_range("--units", units, 2, 65536)
        in_range("--target-clusters", target_clusters, 2, 65536)
        in_range("--output-layer", output_layer, 1, layers)
        if (bundle / "bundle.json").is_file():  # new units for a bundle whose parts speak units: they must stay the same many
            from .bundle import vocoder_units

            have = load_bundle(bundle)
            parts = [("Unit mBART" if task is None else f"{task} backbone", lm.cfg.num_units) for task, lm in have.speech_lms().items()]
            speaks = {name: n for name, n in (*parts, ("vocoder", vocoder_units(have))) if n is not None and n != units}
            if speaks:
                raise UsageError(f"--units {units}: {bundle}'s " + " and ".join(f"{k} speak {v}" for k, v in speaks.items())
                                 + " units; new units of another inventory would leave them speaking the old ones: give a new "
                                 f"--bundle directory, or --units {next(iter(speaks.values()))}")
    except (UsageError, BundleError) as e:
        fail(str(e))
    cfg = HubertConfig(conv_layers=[(conv_dim, 10, 5)] + [(conv_dim, 3, 2)] * 4 + [(conv_dim, 2, 2)] * 2, dim=dim, ffn_dim=ffn,
                       heads=heads, layers=layers, conv_pos=32, conv_pos_groups=8 if dim % 8 == 0 else 1, output_layer=output_layer)
    trainer = UnitTrainer(cfg, UnitTrainConfig(target_clusters, units, steps, batch_size, lr=lr, output_layer=output_layer, seed=seed), device)
    try:
        trainer.load(manifest, open_bundle(teacher, device).need("hubert") if teacher is not None else None)
    except ValueError as e:
        fail(str(e))
    source = f"the features of {teacher}'s unit encoder" if teacher is not None else "MFCC"
    typer.echo(f"unit encoder: {count_parameters(trainer.model):,} parameters, {len(trainer.waves)} utterances, "
               f"{source} k-means {target_clusters} -> masked prediction -> k-means {units} on layer {output_layer}")
    history = trainer.fit(state)
    hubert, quantizer = trainer.units()
    if (bundle / "bundle.json").is_file():
        from .bundle import save_part

        save_part(bundle, "hubert", hubert)
        save_part(bundle, "kmeans", quantizer)
    else:
        Bundle(sample_rate=cfg.sample_rate, hubert=hubert, quantizer=quantizer).save(bundle)
    typer.echo(f"done: masked-prediction loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}; wrote {bundle}")


@app.command("train-vocoder")
def train_vocoder(
    manifest: Path = typer.Option(..., help="Unit manifest with units and durations (`streamgen units`)."),
    out: Path = typer.Option(..., help="Output directory (vocoder.safetensors, discriminators, state)."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle whose unit inventory the vocoder speaks (and, with --into-bundle, gets it)."),
    width: int = typer.Option(128, help="Unit embedding width; generator channels start at twice this."),
    steps: int = typer.Option(20000), batch_size: int = typer.Option(16), segment_frames: int = typer.Option(32),
    lr: float = typer.Option(2e-4), disc_width: int = typer.Option(8, help="Discriminator channel width (light by default)."),
    mel_warmup: int = typer.Option(0, help="First steps on the mel and duration losses alone (no discriminators)."),
    seed: int = typer.Option(0), resume: bool = typer.Option(False), device: str = typer.Option("cpu"),
    into_bundle: bool = typer.Option(False),
):
    """Train a CodeHiFiGAN (HiFi-GAN losses + duration predictor) on speech and its units."""
    from .options import UsageError, in_range
    from .train.vocoder import VocoderData, VocoderTrainConfig, VocoderTrainer, new_vocoder

    try:  # before any audio is read or any step taken
        in_range("--steps", steps, 1, None)
        in_range("--batch-size", batch_size, 1, None)
        in_range("--segment-frames", segment_frames, 1, None)
        in_range("--lr", lr, 1e-8, 10.0)
        in_range("--width", width, 1, 4096)
        in_range("--disc-width", disc_width, 1, 4096)
        in_range("--mel-warmup", mel_warmup, 0, None)
    except UsageError as e:
        fail(str(e))
    from .bundle import encoder_units

    if into_bundle and bundle is None:
        fail("--into-bundle needs --bundle")
    b = open_bundle(bundle, device)
    # every unit the bundle's encoder gives or its speech LMs say (a smaller inventory made the bundle unloadable)
    num_units = max([encoder_units(b) or 0] + [m.cfg.num_units for m in b.speech_lms().values()])
    if not num_units:
        fail(f"{bundle or 'the default bundle'} has no unit encoder or speech LM whose units the vocoder would speak; "
             "give a bundle with one (streamgen train-units)")
    if into_bundle and b.source_filter is not None:
        fail(f"--into-bundle: {bundle or 'the default bundle'} speaks through its source-filter vocoder, which a CodeHiFiGAN "
             "would not replace; leave out --into-bundle (the vocoder is written to --out) or give a bundle without one")
    cfg = VocoderTrainConfig(steps=steps, batch_size=batch_size, segment_frames=segment_frames, lr=lr, disc_width=disc_width,
                             mel_warmup=mel_warmup, seed=seed)
    model = new_vocoder(num_units, width, b.sample_rate)
    try:
        data = VocoderData(manifest, model.hop, b.sample_rate, segment_frames, num_units)
    except ValueError as e:
        fail(str(e))
    _check_run_dir(out, resume, "vocoder_state.pt", "a vocoder training run")
    trainer = VocoderTrainer(model, cfg, out, device)
    if resume:
        try:
            trainer.resume()
        except ValueError as e:
            fail(str(e))
    n = sum(p.numel() for p in model.parameters())
    typer.echo(f"vocoder: {n:,} parameters, {len(data.items)} utterances, {steps} steps of {batch_size} x {segment_frames * 20} ms")
    history = trainer.fit(data)
    typer.echo(f"done: mel L1 {history[0]['mel']:.3f} -> {history[-1]['mel']:.3f} -> {out}")
    if into_bundle:
        from .bundle import save_part

        save_part(bundle, "vocoder", model.cpu())
        typer.echo(f"replaced the vocoder of {bundle}")


data_app = typer.Typer(help="Synthetic speech corpora and task pairs.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Corpus directory."),
    train: int = typer.Option(1000), dev: int = typer.Option(50), test: int = typer.Option(50),
    seed: int = typer.Option(0),
    translation: bool = typer.Option(True, help="Also the Spanish->English parallel corpus."),
):
    """Speak generated sentences with piper (English) and espeak-ng (Spanish): manifests + FLAC."""
    from .train.synth import synth

    try:
        written = synth(out, train, dev, test, seed, translation)
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    for name, path in sorted(written.items()):
        typer.echo(f"{name}: {path}")


@data_app.command("pairs")
def data_pairs(
    task: str = typer.Option(..., help="translation, continuation or inpainting."),
    manifest: Path = typer.Option(..., help="Unit manifest (source side for translation)."),
    out: Path = typer.Option(...),
    target: Optional[Path] = typer.Option(None, help="Target unit manifest (translation)."),
    seed: int = typer.Option(0),
):
    """Training pairs (id, src_units, tgt_units, texts) for a task from unit manifests."""
    from .train.synth import make_pairs

    try:
        typer.echo(f"wrote {make_pairs(task, manifest, out, target, seed)}")
    except ValueError as e:
        fail(str(e))


@app.command()
def units(
    manifest: Path = typer.Option(..., help="Manifest TSV (id, audio, ...)."),
    out: Path = typer.Option(..., help="Manifest with a units column (appended to: resumable)."),
    bundle: Optional[Path] = typer.Option(None), device: str = typer.Option("cpu"),
    batch_seconds: float = typer.Option(60.0, help="Audio per padded batch (utterances of similar length go together)."),
    task: Optional[str] = typer.Option(None, help="Read the audio as this task's sessions do (a bundle with a phone-unit "
                                       "reader keeps the k-means reading for its k-means tasks, e.g. translation's Spanish)."),
):
    """Extract de-duplicated units for every utterance of a manifest in padded batches, with progress; resumable."""
    from .train.synth import extract_units

    b = open_bundle(bundle, device)
    try:
        typer.echo(f"wrote {extract_units(b, manifest, out, batch_seconds=batch_seconds, task=task)}")
    except ValueError as e:
        fail(str(e))


@app.command("eval")
def evaluate_cmd(
    task: str = typer.Option(..., help="Task to evaluate (resynthesis, continuation, translation, inpainting, ...)."),
    manifest: Path = typer.Option(..., help="Test manifest (id, audio, n_frames, text)."),
    out: Path = typer.Option(..., help="Directory for results.json, results.md, quality_vs_latency.png."),
    references: Optional[Path] = typer.Option(None, help="Manifest whose texts are the references (translation: the target side)."),
    bundle: Optional[Path] = typer.Option(None), prompt: Optional[Path] = typer.Option(None, help="Prompt file for the task (default: the bundle's)."),
    chunk_ms: str = typer.Option("320", help="Comma-separated chunk sizes to compare."),
    opt: list[str] = typer.Option([], "--opt", help="Task option KEY=VALUE."),
    realtime: bool = typer.Option(True, help="Pace input in real time (compute-aware latencies are then wall-clock)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N utterances."),
    no_prompt: bool = typer.Option(False, "--no-prompt", help="The unprompted backbone (the no-prompt baseline)."),
    mbart: Optional[Path] = typer.Option(None, help="Unit mBART weights (safetensors) replacing those the task runs on (the shared backbone, or the task's own), e.g. a `train-prompt --full` run."),
    device: str = typer.Option("cpu"), seed: int = typer.Option(0),
    lm_dtype: Optional[str] = typer.Option(None, help=LM_DTYPE_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    resume: bool = typer.Option(False, help="Keep the utterances an interrupted run of the same evaluation scored into OUT "
                                "(utterances.jsonl) and run the rest."),
):
    """Run a task through the streaming pipeline on a test set; score quality and latency."""
    from .eval.run import evaluate
    from .options import MAX_CHUNK_MS, UsageError, check_device, check_lm_dtype, in_range, parse_kv, set_engine_threads
    from .pipeline.tasks import UnknownTask, load_task

    if no_prompt and prompt is not None:
        fail("--prompt and --no-prompt exclude each other")
    try:
        options = parse_kv(opt)
        try:
            chunks = [int(x) for x in chunk_ms.split(",")]
        except ValueError:
            raise UsageError(f"--chunk-ms {chunk_ms!r}: expected sizes in ms separated by commas, e.g. 160,320,640") from None
        for c in chunks:
            in_range("--chunk-ms", c, 10, MAX_CHUNK_MS, "ms")
        if limit is not None:
            in_range("--limit", limit, 1)
        check_device(device)
        lm = check_lm_dtype(lm_dtype)
        set_engine_threads(threads, device)  # as `run` and `serve`: the latencies it reports are a live session's
        try:
            load_task(task)  # its name; the options are checked with the bundle, against each row
        except UnknownTask as e:
            raise UsageError(str(e)) from None
        for what, path in (("--manifest", manifest), ("--references", references)):
            if path is not None and not Path(path).is_file():
                raise UsageError(f"{what} {path}: no such manifest")
    except UsageError as e:
        fail(str(e))
    b = open_bundle(bundle, device, lm)
    if mbart is not None:  # loading casts the weights to the backbone's dtypes, as open_bundle left them
        from safetensors.torch import load_file

        try:
            b.backbone(task).load_state_dict(load_file(str(mbart), device=str(b.device)))
        except Exception as e:  # a missing/corrupt file or weights of another shape
            fail(f"{mbart}: cannot replace the bundle's Unit mBART: {e}")
    if no_prompt:
        b.prompts.pop(task, None)
    if prompt is not None:
        from .models.prompt import load_prompt

        try:
            b.prompts[task] = load_prompt(prompt, b.backbone(task).cfg).to(b.device)
        except ValueError as e:
            fail(str(e))
    try:
        results = evaluate(b, task, manifest, out, references=references, chunk_ms=chunks,
                           options=options, realtime=realtime, limit=limit, seed=seed, resume=resume,
                           identity=_model_identity(bundle, prompt, no_prompt, mbart, lm_dtype))
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    from .eval.run import markdown

    typer.echo(markdown(results))
    typer.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'quality_vs_latency.png'}")


@app.command()
def pack(
    src: Path = typer.Argument(..., help="Bundle directory to copy."),
    out: Path = typer.Argument(..., help="Bundle directory to write."),
    dtype: str = typer.Option("float16", help="Weight dtype: float16 (half the size; how the default bundle ships), bfloat16, float32."),
):
    """Copy a bundle with its weights cast (k-means and prompts stay fp32) and report its size."""
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if out.resolve() == src.resolve():
        fail("OUT must differ from SRC")
    b = open_bundle(src, "cpu")
    b.save(out, dtype=DTYPES[dtype])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"wrote {out}: {size / 2**20:.2f} MiB ({dtype})")


@app.command()
def tasks():
    """List the installed task plugins."""
    from .pipeline.tasks import available_tasks, load_task

    eps = available_tasks()
    if not eps:
        typer.echo("no task plugins installed (pip install ./plugins/*)")
    for name in sorted(eps):
        try:
            p = load_task(name)
            opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
            typer.echo(f"{name:<14} {p.description}\n{'':<14} defaults: {opts or '-'}")
        except Exception as e:  # a broken plugin should not hide the others
            typer.echo(f"{name:<14} (fails to load: {type(e).__name__}: {e})")


@app.command(epilog=figures_help())
def run(
    input: str = typer.Option(..., "--in", help="PATH, mic, - (stdin: raw PCM16 at --rate, or a WAV stream) or mqtt://host:port/topic."),
    output: str = typer.Option(..., "--out", help="PATH, speaker, - (raw PCM16 stdout) or mqtt://host:port/topic."),
    task: str = typer.Option("continuation", help="Task plugin (see `streamgen tasks`)."),
    opt: list[str] = typer.Option([], "--opt", help="Task option KEY=VALUE (repeatable)."),
    bundle: Optional[Path] = typer.Option(None, help="Bundle directory (default: the shipped one)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    lm_dtype: Optional[str] = typer.Option(None, help=LM_DTYPE_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    chunk_ms: int = typer.Option(100, help="Pipeline chunk size in ms (each chunk runs the encoder once)."),
    left_context_ms: int = typer.Option(2000, help="Encoder left context in ms (-1: everything)."),
    lookahead_ms: int = typer.Option(100, help="Encoder look-ahead in ms (-1: until the end of input)."),
    vocoder_lookahead: int = typer.Option(-1, help="Vocoder look-ahead in frames (-1: exact, its receptive field)."),
    realtime: bool = typer.Option(False, help="Pace file input in real time, like a live talker."),
    duration: Optional[float] = typer.Option(None, help="Stop listening to the mic after this many seconds."),
    vad: bool = typer.Option(False, help="End the input after trailing silence (silero-vad)."),
    overflow: str = typer.Option("block", help="When the pipeline falls behind: block, or drop-oldest input."),
    queue_size: int = typer.Option(16, help="Input chunks each session may have waiting in the engine."),
    rate: int = typer.Option(16000, help="Sample rate of raw PCM on stdin (resampled to the bundle's; a WAV stream's header gives its own)."),
    input_device: Optional[str] = typer.Option(None, help="PortAudio input device (index or name)."),
    output_device: Optional[str] = typer.Option(None, help="PortAudio output device (index or name)."),
    mqtt_username: Optional[str] = typer.Option(None),
    mqtt_password: Optional[str] = typer.Option(None, help="Visible to other users in ps: prefer --mqtt-password-file or STREAMGEN_MQTT_PASSWORD."),
    mqtt_password_file: Optional[Path] = typer.Option(None, help="File whose first line is the MQTT password."),
    mqtt_ca: Optional[str] = typer.Option(None, help="CA file for TLS."), mqtt_cert: Optional[str] = typer.Option(None),
    mqtt_key: Optional[str] = typer.Option(None), mqtt_insecure: bool = typer.Option(False, help="Skip TLS verification."),
    qos: int = typer.Option(1, help="MQTT QoS for input and output."),
    client_id: Optional[str] = typer.Option(None, help="MQTT client id (stable ids keep the broker session)."),
    sessions: Optional[int] = typer.Option(None, help="MQTT: exit after this many sessions completed (with audio, a stop and nothing missing)."),
    stats: bool = typer.Option(False, "--stats", help="Print each session's figures as it ends (defined below)."),
    stats_json: Optional[Path] = typer.Option(None, help="Write JSON lines (per stage item and per session)."),
    seed: int = typer.Option(0),
    allow_silence: bool = typer.Option(False, help="Run the task on an input file with no speech in it (by default: say so, write nothing)."),
):
    """Run a task on live or recorded speech, chunk by chunk."""
    import asyncio
    import signal

    from .io import MqttOptions, open_endpoints
    from .options import RATES, StreamSettings, UsageError, check_device, check_input_spec, check_lm_dtype, check_output_spec, \
        check_task, check_writable, in_range, parse_kv, set_engine_threads
    from .pipeline.runner import Pipeline, build_engine
    from .pipeline.stats import Stats
    from .pipeline.tasks import UnknownTask

    _setup_logging()
    settings = StreamSettings(chunk_ms, left_context_ms, lookahead_ms, vocoder_lookahead, queue_size, overflow)
    try:  # everything the user typed, before any audio is read
        options = parse_kv(opt)
        settings.check()
        in_range("--rate", rate, *RATES, "Hz")
        in_range("--qos", qos, 0, 2)
        if duration is not None:
            in_range("--duration", duration, 0.1, None, "s")
        if sessions is not None:
            in_range("--sessions", sessions, 1, None)
        check_device(device)
        set_engine_threads(threads, device)
        lm = check_lm_dtype(lm_dtype)
        input_file = check_input_spec(input, vad=vad)
        check_output_spec(output, reads=input_file.path if input_file else None)
        if stats_json is not None:
            check_writable(stats_json, "--stats-json")
    except UsageError as e:
        fail(str(e))
    b = open_bundle(bundle, device, lm)
    sr = b.sample_rate
    try:
        check_task(task, options, input_file.seconds if input_file else None, b)
    except UsageError as e:
        fail(str(e))
    if input_file and not allow_silence:
        from .io.files import file_has_speech

        if not file_has_speech(input_file.path):
            fail(f"{input}: no speech in its {input_file.seconds:.1f} s of audio, so task {task!r} has nothing to work on; "
                 "nothing written (--allow-silence runs it anyway)", code=1)
    try:
        engine = build_engine(b, task, options, **settings.engine_args(), vad=vad, seed=seed, queue_size=queue_size, overflow=overflow,
                              speech_gate=not allow_silence)
        dev = lambda d: int(d) if d is not None and d.isdigit() else d
        source, sink = open_endpoints(
            input, output, sr, realtime=realtime, input_device=dev(input_device), output_device=dev(output_device),
            duration_s=duration, stdin_rate=rate,
            mqtt=MqttOptions(mqtt_username, _mqtt_password(mqtt_password, mqtt_password_file), mqtt_ca, mqtt_cert, mqtt_key,
                             mqtt_insecure, qos, client_id, sessions),
        )
    except (UnknownTask, ValueError, RuntimeError) as e:
        fail(str(e))
    log_file = open(stats_json, "w") if stats_json else None
    st = Stats(sr, log_file, chunk_records=0)  # the tables need running figures only; a service runs for hours
    if stats:  # each session's table as it ends
        st.on_session = lambda s: typer.echo(st.report(s.key), err=output == "-")
    pipeline = Pipeline(source, engine, sink, st)

    async def until_signalled():
        """SIGTERM / SIGINT / SIGHUP: stop accepting, tell live sessions, drain, print stats, exit 0. A second
        signal stops at once (when draining waits on something that will not come: a broker that is gone, a
        reader that stopped reading); a third ends the process."""
        loop, task, signals = asyncio.get_running_loop(), asyncio.current_task(), [0]

        def on_signal():
            signals[0] += 1
            if signals[0] == 1:
                pipeline.request_stop("the server is shutting down")
            elif signals[0] == 2:
                typer.echo("stopping now (a third signal ends the process)", err=True)
                task.cancel()
            else:
                os._exit(130)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal)
        try:
            return await pipeline.run()
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    try:
        asyncio.run(until_signalled())
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # whoever read our output has gone (`| head -c 100`, a pipeline stopped): done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more goes to the closed pipe
    except Exception as e:  # device errors and the like, named
        if DEBUG:
            raise
        fail(str(e) if type(e).__name__ == "WriteFailed" else f"{type(e).__name__}: {e}", code=1)
    finally:
        if log_file:
            log_file.close()
    if stats:
        for n, s in st.sessions.items():
            if not s.closed:  # not reported as it ended (interrupted, or failed before its end)
                typer.echo(st.report(n), err=output == "-")
    errors = {n: s.error for n, s in st.sessions.items() if s.error and s.error != pipeline.stop_reason}
    for n, msg in errors.items():
        typer.secho(f"session {n}: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1 if errors else 0)


def _mqtt_password(given: str | None, file: Path | None) -> str | None:
    """The MQTT password: the first line of --mqtt-password-file, else --mqtt-password, else
    $STREAMGEN_MQTT_PASSWORD (the file and the variable keep it out of `ps`)."""
    if file is None:
        return given or os.environ.get("STREAMGEN_MQTT_PASSWORD")
    try:
        if file.stat().st_size > 4096:
            fail(f"--mqtt-password-file {file}: larger than 4 KiB; it should hold one line, the password")
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--mqtt-password-file {file}: cannot read it ({e})")
    if not lines or not lines[0]:
        fail(f"--mqtt-password-file {file}: its first line is empty; write the password there")
    return lines[0]


from .serve.command import serve as _serve  # noqa: E402  (its heavy imports happen when it runs)

app.command(name="serve")(_serve)


if __name__ == "__main__":
    app()
