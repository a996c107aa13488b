"""A streamgen bundle: the models of one speech chain, as safetensors plus a JSON config.

    DIR/bundle.json           {"format": "streamgen-bundle", "version": 1, "sample_rate": 16000,
                               "parts": {"hubert": {...}, "kmeans": {...}, "mbart": {...}, "vocoder": {...}},
                               "prompts": {"<task>": {"length": L, "stacks": [...]}},
                               "backbones": {"<task>": {<Unit mBART config>}}}
    DIR/<part>.safetensors    weights of each part present (any subset of the four)
    DIR/prompts/<task>.safetensors
    DIR/backbones/<task>.safetensors

A task's prompt conditions the shared backbone (`mbart`), frozen; a task may instead have a backbone of
its own (the whole Unit mBART fine-tuned for it: `train-prompt --full --into-bundle`), which its
sessions use in place of the shared one (and its prompt, if it has one, conditions that).

Loading reads no pickle. `Bundle.encode` / `generate` / `vocode` are the whole-utterance API; the
streaming pipeline uses the same models.
"""

from __future__ import annotations

import fcntl
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .atomic_file import write_atomic
from .audio import check_wave
from .models.generation import Sampling, generate
from .models.hubert import HubertConfig, HubertEncoder
from .models.kmeans import KMeansQuantizer, dedup
from .models.logmel_units import LogMelUnits, LogMelUnitsConfig
from .models.phone_units import PhoneUnits, PhoneUnitsConfig
from .models.prompt import DeepPrompt, PromptConfig
from .models.unit_mbart import UnitMBart, UnitMBartConfig
from .models.source_filter_vocoder import SourceFilterConfig, SourceFilterVocoder
from .models.vocoder import CodeHiFiGAN, VocoderConfig

FORMAT, VERSION = "streamgen-bundle", 1
PARTS = ("hubert", "kmeans", "mbart", "vocoder", "logmel_units", "source_filter", "phone_units")
# logmel_units (log-mel k-means) takes the place of hubert + kmeans, source_filter that of vocoder;
# phone_units reads logmel_units' units through a phone recogniser (for every task but its kmeans_tasks)
CODEBOOKS = ("kmeans", "logmel_units")  # stored and run in fp32 whatever the bundle's dtype
FP32_PARTS = CODEBOOKS + ("phone_units",)  # run in fp32 whatever the bundle's dtype (phone_units is stored in it)
MAX_ENCODE_SECONDS = 60.0  # one attention pass over the whole input; longer audio goes through the pipeline


class BundleError(ValueError):
    """A bundle that is missing, malformed, or lacks a part the call needs."""


@dataclass
class Bundle:
    sample_rate: int = 16000
    hubert: HubertEncoder | None = None
    quantizer: KMeansQuantizer | None = None
    mbart: UnitMBart | None = None
    vocoder: CodeHiFiGAN | None = None
    logmel_units: LogMelUnits | None = None
    source_filter: SourceFilterVocoder | None = None
    phone_units: PhoneUnits | None = None
    prompts: dict[str, DeepPrompt] = field(default_factory=dict)
    backbones: dict[str, UnitMBart] = field(default_factory=dict)  # a task's own fine-tuned Unit mBART

    def backbone(self, task: str | None = None) -> UnitMBart:
        """The Unit mBART a task runs on: its own, or the shared one."""
        if task in self.backbones:
            return self.backbones[task]
        return self.need("mbart")

    def has_backbone(self, task: str | None = None) -> bool:
        return task in self.backbones or self.mbart is not None

    def modules(self) -> dict[str, nn.Module]:
        parts = {"hubert": self.hubert, "kmeans": self.quantizer, "mbart": self.mbart, "vocoder": self.vocoder,
                 "logmel_units": self.logmel_units, "source_filter": self.source_filter, "phone_units": self.phone_units}
        return {k: m for k, m in parts.items() if m is not None}

    def need(self, part: str) -> nn.Module:
        m = self.modules().get(part)
        if m is None:
            raise BundleError(f"this bundle has no {part} (it holds: {', '.join(self.modules()) or 'nothing'})")
        return m

    @property
    def device(self) -> torch.device:
        """Where the parts live (they move together, see `to`)."""
        for m in self.modules().values():
            return next(iter(list(m.parameters()) + list(m.buffers()))).device
        raise BundleError("the bundle holds no parts")

    def to(self, device=None, dtype: torch.dtype | None = None) -> Bundle:
        """Move every part (k-means centroids and the phone-unit reader stay fp32 whatever the dtype)."""
        for name, m in self.modules().items():
            m.to(device=device, dtype=None if name in FP32_PARTS else dtype)
        for p in self.prompts.values():
            p.to(device=device)
        for m in self.backbones.values():
            m.to(device=device, dtype=dtype)
        return self

    def speech_lms(self) -> dict[str | None, UnitMBart]:
        """The Unit mBARTs the bundle has: the shared one (key None) and each task's own backbone (key: the task)."""
        return {k: m for k, m in {None: self.mbart, **self.backbones}.items() if m is not None}

    def lm_to(self, dtype: torch.dtype) -> Bundle:
        """The Unit mBART backbones (the shared one and the tasks' own) in `dtype` where it pays: on
        a GPU the whole backbone; on a CPU its encoder stack only, whose batched matmuls (translation
        re-encodes the grown source at every decision) run ~3.4x faster in bfloat16 on a CPU with
        AMX, while the decoder's one-token steps, small matmuls, run slower there and stay float32
        (bench/RESULTS.md). The unit encoder, the vocoder and the prompts stay as they are. float32,
        the default, keeps batched sessions exactly equal to lone ones; bfloat16 does not."""
        for m in self.speech_lms().values():
            (m if m.embed_tokens.weight.is_cuda else m.encoder).to(dtype=dtype)
        return self

    # --- the whole-utterance API --------------------------------------------------------------

    def encode(self, wave: Tensor | np.ndarray, task: str | None = None) -> tuple[Tensor, Tensor]:
        """wave [T] float at `sample_rate` -> (de-duplicated units [N] in 0..K-1, durations [N] in frames),
        as `task`'s sessions read their input (`reads_phone_units`)."""
        return self.encode_batch([wave], task)[0]

    def reads_phone_units(self, task: str | None = None) -> bool:
        """Whether `task`'s input is read through the phone recogniser (the bundle has one and the task
        is not among its `kmeans_tasks`, whose models learnt the k-means units of another language)."""
        return self.phone_units is not None and task not in self.phone_units.cfg.kmeans_tasks

    @torch.no_grad()
    def encode_batch(self, waves: list[Tensor | np.ndarray], task: str | None = None) -> list[tuple[Tensor, Tensor]]:
        """Several utterances in one padded pass; each gives exactly what `encode` gives it alone."""
        if self.logmel_units is not None:
            lm = self.logmel_units
            waves = [check_wave(w, self.sample_rate, min_samples=lm.cfg.hop) for w in waves]
            if self.reads_phone_units(task):
                return [dedup(self.phone_units.read(w.to(self.device), lm)) for w in waves]
            return [lm.encode(w) for w in waves]
        hubert, quantizer = self.need("hubert"), self.need("kmeans")
        waves = [check_wave(w, self.sample_rate, min_samples=hubert.cfg.receptive_field) for w in waves]
        for w in waves:
            if w.numel() > MAX_ENCODE_SECONDS * self.sample_rate:
                raise ValueError(
                    f"audio of {w.numel() / self.sample_rate:.1f} s exceeds the {MAX_ENCODE_SECONDS:.0f} s one-pass "
                    "limit of Bundle.encode; stream it through the pipeline instead"
                )
        p = next(hubert.parameters())
        if len(waves) == 1:  # no padding: the plain path
            return [dedup(quantizer(hubert(waves[0].to(p.device, p.dtype)[None])[0]))]
        lengths = torch.tensor([len(w) for w in waves], device=p.device)
        batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(p.device, p.dtype)
        units = quantizer(hubert(batch, lengths=lengths))  # [B, F]
        return [dedup(u[:n]) for u, n in zip(units, hubert.cfg.num_frames(lengths).tolist())]

    def prompt(self, prompt: str | DeepPrompt | None) -> DeepPrompt | None:
        if prompt is None or isinstance(prompt, DeepPrompt):
            return prompt
        if prompt not in self.prompts:
            raise BundleError(f"no prompt {prompt!r} in this bundle (it has: {', '.join(sorted(self.prompts)) or 'none'})")
        return self.prompts[prompt]

    @torch.no_grad()
    def generate(
        self,
        units: Tensor,
        prompt: str | DeepPrompt | None = None,
        max_units: int = 200,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        min_units: int = 0,
        seed: int = 0,
    ) -> Tensor:
        """Units [N] -> generated units [M] (M <= max_units), conditioned on a task's prompt (by name:
        on the task's own backbone where it has one) or none; sampled units are a pure function of `seed`."""
        if isinstance(prompt, str) and prompt in self.backbones:
            mbart, prompt = self.backbones[prompt], self.prompts.get(prompt)
        else:
            mbart = self.need("mbart")
        units = torch.as_tensor(units)
        if units.dim() != 1 or units.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"units must be a 1-D integer tensor, got {units.dtype} {tuple(units.shape)}")
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= mbart.cfg.num_units):
            raise ValueError(f"units must lie in 0..{mbart.cfg.num_units - 1}")
        if units.numel() + 1 > mbart.cfg.max_positions or max_units + 1 > mbart.cfg.max_positions:
            raise ValueError(f"source or output longer than the model's {mbart.cfg.max_positions} positions")
        p = self.prompt(prompt)
        return generate(
            mbart, [units], p.shared_kv(mbart) if p else None, max_units=max_units, min_units=min_units,
            sampling=Sampling(greedy, temperature, top_k), seed=seed,
        )[0]

    @property
    def unit_hop(self) -> int:
        """Input samples per unit-encoder frame (320: 50 Hz at 16 kHz)."""
        return self.logmel_units.cfg.hop if self.logmel_units is not None else self.need("hubert").cfg.hop

    @property
    def unit_vocoder(self) -> nn.Module:
        """The part that turns units into audio: the source-filter vocoder, or the CodeHiFiGAN."""
        return self.source_filter if self.source_filter is not None else self.need("vocoder")

    @torch.no_grad()
    def vocode(self, units: Tensor, durations: Tensor | None = None) -> Tensor:
        """De-duplicated units [N] -> waveform [S] float32 at `sample_rate`, timed by the vocoder's
        duration predictor, or held for `durations` [N] frames each (e.g. `encode`'s own)."""
        vocoder = self.unit_vocoder
        units = torch.as_tensor(units)
        if units.numel() == 0:
            return torch.zeros(0)
        units = units.to(vocoder.dict.weight.device)
        if durations is None:
            return vocoder(units).float()
        frames = torch.repeat_interleave(units, torch.as_tensor(durations, device=units.device))
        return vocoder.generate(frames).float().reshape(-1)

    # --- files --------------------------------------------------------------------------------

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the bundle directory (weights cast to `dtype` if given; k-means stays fp32)."""
        path = Path(path)
        (path / "prompts").mkdir(parents=True, exist_ok=True)
        for name, m in self.modules().items():
            cast = None if name in CODEBOOKS else dtype
            _write_tensors(path / f"{name}.safetensors", {k: _cast(v, cast) for k, v in m.state_dict().items()})
        for name, p in self.prompts.items():
            _write_tensors(path / "prompts" / f"{name}.safetensors", {k: v.detach().float().contiguous().cpu() for k, v in p.state_dict().items()})
        if self.backbones:
            (path / "backbones").mkdir(exist_ok=True)
        for name, m in self.backbones.items():
            _write_tensors(path / "backbones" / f"{name}.safetensors", {k: _cast(v, dtype) for k, v in m.state_dict().items()})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "sample_rate": self.sample_rate,
            "parts": {name: part_config(name, m) for name, m in self.modules().items()},
            "prompts": {n: {"length": p.cfg.length, "stacks": list(p.cfg.stacks)} for n, p in self.prompts.items()},
            "backbones": {n: part_config("mbart", m) for n, m in self.backbones.items()},
        }
        write_atomic(path / "bundle.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        return path


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """A safetensors file written whole or not at all: a job killed while replacing a part of a bundle leaves the
    part it had."""
    write_atomic(path, lambda tmp: save_file(tensors, tmp))


def part_config(name: str, module: nn.Module) -> dict:
    """What bundle.json records to rebuild a part."""
    if name == "kmeans":
        return {"num_units": module.num_units, "dim": module.dim}
    return vars(module.cfg).copy() if name == "mbart" else module.cfg.to_dict()


def _set_meta(path: Path, section: str, name: str, entry: dict | None) -> None:
    """bundle.json[section][name] = entry (None: removed), read-modify-written under an exclusive lock
    and replaced atomically: jobs that add parts to one bundle at the same time (the recipe trains the
    vocoder beside the prompts) keep each other's entries, and a reader never sees a half-written file."""
    with open(path / ".bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = json.loads((path / "bundle.json").read_text())
        if entry is None:
            meta.get(section, {}).pop(name, None)
        else:
            meta.setdefault(section, {})[name] = entry
        write_atomic(path / "bundle.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


def save_part(path: str | Path, name: str, module: nn.Module) -> None:
    """Write (or replace) one part of a bundle directory, leaving its other files as they are."""
    path = Path(path)
    _write_tensors(path / f"{name}.safetensors", {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()})
    _set_meta(path, "parts", name, part_config(name, module))


def save_prompt(path: str | Path, name: str, prompt: DeepPrompt) -> None:
    """Add (or replace) a task prompt in a bundle directory, leaving its other files as they are."""
    if not NAME.fullmatch(name):
        raise BundleError(f"prompt name {name!r} must be a plain name (letters, digits, _ . -; no path)")
    path = Path(path)
    (path / "prompts").mkdir(exist_ok=True)
    _write_tensors(path / "prompts" / f"{name}.safetensors", {k: v.detach().float().contiguous().cpu() for k, v in prompt.state_dict().items()})
    _set_meta(path, "prompts", name, {"length": prompt.cfg.length, "stacks": list(prompt.cfg.stacks)})


def save_backbone(path: str | Path, name: str, mbart: UnitMBart) -> bool:
    """Add (or replace) a task's own backbone in a bundle directory, leaving its other files as they
    are, except the task's prompt, which conditioned another backbone: it is removed (True if it was)."""
    if not NAME.fullmatch(name):
        raise BundleError(f"task name {name!r} must be a plain name (letters, digits, _ . -; no path)")
    path = Path(path)
    (path / "backbones").mkdir(exist_ok=True)
    _write_tensors(path / "backbones" / f"{name}.safetensors", {k: v.detach().float().contiguous().cpu() for k, v in mbart.state_dict().items()})
    had_prompt = name in json.loads((path / "bundle.json").read_text()).get("prompts", {})
    if had_prompt:
        _set_meta(path, "prompts", name, None)
        (path / "prompts" / f"{name}.safetensors").unlink(missing_ok=True)
    _set_meta(path, "backbones", name, part_config("mbart", mbart))
    return had_prompt


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    t = t.detach().cpu()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


MAX_META_BYTES = 1 << 20  # bundle.json
MAX_PART_BYTES = 8 << 30  # one .safetensors file
MAX_HEADER_BYTES = 16 << 20  # its JSON header
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # task prompts are files named after them
# Sane ceilings for part configs, checked before anything is built (the largest public models are far below).
LIMITS = {"layers": 64, "encoder_layers": 64, "decoder_layers": 64, "dim": 8192, "embedding_dim": 8192, "model_in_dim": 8192,
          "ffn_dim": 65536, "heads": 128, "vocab_size": 1 << 17, "num_units": 1 << 17, "num_embeddings": 1 << 17,
          "max_positions": 1 << 16, "length": 4096}
MAX_NUMBER, MAX_LIST = 1 << 20, 64
AT_LEAST_ONE = set(LIMITS) - {"layers", "encoder_layers", "decoder_layers"}  # sizes and counts: a zero divides or breaks a shape


def _check_numbers(where: str, value, key: str = "") -> None:
    """Every number in a part config finite and within its ceiling, every list short."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        limit = LIMITS.get(key, MAX_NUMBER)
        if not math.isfinite(value) or not -MAX_NUMBER <= value <= limit:
            raise BundleError(f"{where}: {key or 'a value'} = {value!r} is outside the sane range (at most {limit})")
        if key in LIMITS and (value < (1 if key in AT_LEAST_ONE else 0) or value != int(value)):
            raise BundleError(f"{where}: {key} = {value!r} must be a whole number of at least {1 if key in AT_LEAST_ONE else 0}")
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            raise BundleError(f"{where}: {key or 'a list'} has {len(value)} entries (at most {MAX_LIST})")
        for v in value:
            _check_numbers(where, v, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(where, v, str(k))
    else:
        raise BundleError(f"{where}: {key or 'a value'} has an unexpected type {type(value).__name__}")


def _check_meta(meta_file: Path, meta: dict) -> None:
    """bundle.json's parts, prompts and task backbones, before anything is built from them."""
    parts, prompts, backbones = meta.get("parts", {}), meta.get("prompts", {}), meta.get("backbones", {})
    if not isinstance(parts, dict) or not isinstance(prompts, dict) or not isinstance(backbones, dict):
        raise BundleError(f"{meta_file}: \"parts\", \"prompts\" and \"backbones\" must be objects")
    for kind, named in (("backbone", backbones), ("part", parts), ("prompt", prompts)):
        for name, cfg in named.items():
            if not isinstance(cfg, dict):
                raise BundleError(f"{meta_file}: {kind} {str(name)[:80]!r} must be a config object, got {type(cfg).__name__}")
    for name, cfg in backbones.items():
        if not NAME.fullmatch(name):
            raise BundleError(f"{meta_file}: backbone name {name[:80]!r} must be a plain name (letters, digits, _ . -; no path)")
        _check_numbers(f"{meta_file}: backbone {name}", cfg)
    for name, cfg in parts.items():
        if name not in PARTS:
            raise BundleError(f"{meta_file}: unknown part {name!r} (parts are {', '.join(PARTS)})")
        _check_numbers(f"{meta_file}: part {name}", cfg)
    for name, cfg in prompts.items():
        if not NAME.fullmatch(name):
            raise BundleError(f"{meta_file}: prompt name {name[:80]!r} must be a plain name (letters, digits, _ . -; no path)")
        _check_numbers(f"{meta_file}: prompt {name}", cfg)
    rate = meta.get("sample_rate", 16000)
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1000 <= rate <= 384000:
        raise BundleError(f"{meta_file}: sample_rate = {repr(rate)[:40]} must be a whole number of Hz from 1000 to 384000")


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors' element types


def vocoder_units(b: Bundle) -> int | None:
    """The units the bundle's vocoder speaks (its source-filter one's, else its CodeHiFiGAN's), None without one."""
    voc = b.source_filter if b.source_filter is not None else b.vocoder
    return None if voc is None else getattr(voc.cfg, "num_units", getattr(voc.cfg, "num_embeddings", None))


def encoder_units(b: Bundle) -> int | None:
    """How many units the bundle's unit encoder gives (phone-read, log-mel or HuBERT k-means), None without one."""
    return next((m.num_units for m in (b.phone_units, b.logmel_units, b.quantizer) if m is not None), None)


def _check_units(meta_file: Path, b: Bundle) -> None:
    """The parts agree on the units: the speech LM knows every unit the encoder gives, the vocoder every
    unit either gives (a unit past a vocabulary failed only mid-session, as an index error)."""
    reader = encoder_units(b)
    voc_units = vocoder_units(b)
    for task, lm in b.speech_lms().items():
        name = "mbart" if task is None else f"backbone {task}"
        if reader is not None and reader > lm.cfg.num_units:
            raise BundleError(f"{meta_file}: the unit encoder gives {reader} units, {name} knows {lm.cfg.num_units}")
        if voc_units is not None and lm.cfg.num_units > voc_units:
            raise BundleError(f"{meta_file}: {name} speaks {lm.cfg.num_units} units, the vocoder knows {voc_units}")
    if reader is not None and voc_units is not None and reader > voc_units:
        raise BundleError(f"{meta_file}: the unit encoder gives {reader} units, the vocoder knows {voc_units}")


def _weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a .safetensors file declares, from its header alone, with its sizes checked."""
    if file.exists() and not file.is_file():
        raise BundleError(f"{file}: not a regular file")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
                raise BundleError(f"{file}: not a readable safetensors file (its header claims {n} bytes of a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise BundleError(f"{file.parent}: bundle.json lists {file.stem} but {file.name} is missing") from None
    except (OSError, ValueError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{file}: not a readable safetensors file: {e}") from None
    if size > MAX_PART_BYTES:
        raise BundleError(f"{file}: {size / 2**30:.1f} GiB is over the {MAX_PART_BYTES >> 30} GiB limit for one part")
    try:
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
        spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k) for k, v in tensors.items())
        item = {k: DTYPE_BYTES[v["dtype"]] for k, v in tensors.items()}
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise BundleError(f"{file}: not a readable safetensors file (malformed header)") from None
    if spans and spans[-1][1] > size - 8 - n:
        raise BundleError(f"{file}: truncated: its header places data beyond the end of the file")
    at = 0
    for begin, end, k in spans:  # every tensor's bytes, one after another, as many as its shape holds
        if begin != at or end - begin != math.prod(shapes[k]) * item[k] or min(shapes[k], default=1) < 0:
            raise BundleError(f"{file}: not a readable safetensors file (tensor {k[:80]!r}: its shape {shapes[k]} does not "
                              f"match its {end - begin} bytes at offset {begin})")
        at = end
    if at != size - 8 - n:
        raise BundleError(f"{file}: not a readable safetensors file ({size - 8 - n - at} bytes after its last tensor)")
    return shapes


class _Skeleton(TorchFunctionMode):
    """Modules built for their shapes alone: parameters on the meta device (no memory) and not
    initialised. (A random fill of a meta tensor runs a Python kernel whose first use imports
    torch._dynamo, 1.5 s of every command's start; the weights replace the values anyway.)"""

    FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_,
             torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_}

    def __enter__(self):
        self.device = torch.device("meta")
        self.device.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.device.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FILLS or getattr(func, "__module__", None) == "torch.nn.init":  # any initialiser
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def shape_difference(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]], theirs: str) -> str | None:
    """How the tensor shapes a config asks for (`want`) differ from those of a weights file (`have`,
    called `theirs` in the message), in one line; None when they agree."""
    if want == have:
        return None
    diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
    k = diff[0]
    return f"{len(diff)} tensors differ; {k}: config {want.get(k, 'none')}, {theirs} {have.get(k, 'none')}"


def _load_part(path: Path, name: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a part and load its weights, after checking, on a module built on the meta device (no
    memory), that the config asks for exactly the shapes the weights file declares."""
    file = path / f"{name}.safetensors"
    have = _weight_shapes(file)
    try:
        with _Skeleton():
            skeleton = build()
    except (RuntimeError, NotImplementedError):  # a constructor that computes on tensors: its config limits were checked
        skeleton = None
    if skeleton is not None:
        diff = shape_difference({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, have, "file")
        if diff is not None:
            raise BundleError(f"{file}: weights do not match the config in bundle.json ({diff})")
    module = build()
    try:
        sd = load_file(file)
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise BundleError(f"{file}: not a readable safetensors file: {e}") from None
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{file}: weights do not match the config in bundle.json: {e}") from None
    return module.eval()


def fingerprint(path: str | Path) -> str:
    """A short digest of a bundle directory's files (names, sizes, modification times): what changes when any
    part is trained again or replaced."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_bundle_path() -> Path | None:
    """The trained bundle shipped with the package (streamgen/assets/default), if present."""
    p = Path(str(resources.files("streamgen") / "assets" / "default"))
    return p if (p / "bundle.json").is_file() else None


def load_bundle(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    """Load a bundle directory written by `streamgen convert`, `streamgen pack` or `Bundle.save`;
    without a path, the default bundle shipped with streamgen."""
    if path is None:
        path = default_bundle_path()
        if path is None:
            raise BundleError("this installation has no default bundle (streamgen/assets/default); give a bundle path")
    path = Path(path)
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a streamgen bundle (no bundle.json); make one with `streamgen convert`")
    if meta_file.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{meta_file}: {meta_file.stat().st_size} bytes; a bundle.json is at most {MAX_META_BYTES} (is this the right file?)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{meta_file}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: not a bundle description (a JSON object)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BundleError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}")
    _check_meta(meta_file, meta)
    parts = meta.get("parts", {})
    b = Bundle(sample_rate=int(meta.get("sample_rate", 16000)))
    try:
        if "hubert" in parts:
            b.hubert = _load_part(path, "hubert", lambda: HubertEncoder(HubertConfig.from_dict(parts["hubert"])))
        if "kmeans" in parts:
            k = parts["kmeans"]
            b.quantizer = _load_part(path, "kmeans", lambda: KMeansQuantizer(torch.zeros(k["num_units"], k["dim"])))
        if "mbart" in parts:
            b.mbart = _load_part(path, "mbart", lambda: UnitMBart(UnitMBartConfig.from_dict(parts["mbart"])))
            b.mbart.requires_grad_(False)
        if "vocoder" in parts:
            b.vocoder = _load_part(path, "vocoder", lambda: CodeHiFiGAN(VocoderConfig.from_dict(parts["vocoder"])))
        if "logmel_units" in parts:
            b.logmel_units = _load_part(path, "logmel_units", lambda: LogMelUnits(LogMelUnitsConfig.from_dict(parts["logmel_units"])))
        if "source_filter" in parts:
            b.source_filter = _load_part(path, "source_filter", lambda: SourceFilterVocoder(SourceFilterConfig.from_dict(parts["source_filter"])))
        if "phone_units" in parts:
            if b.logmel_units is None:
                raise BundleError(f"{meta_file}: phone_units reads the units of a logmel_units part, and there is none")
            b.phone_units = _load_part(path, "phone_units", lambda: PhoneUnits(PhoneUnitsConfig.from_dict(parts["phone_units"])))
            if b.phone_units.num_units != b.logmel_units.num_units:
                raise BundleError(f"{meta_file}: phone_units gives {b.phone_units.num_units} units, logmel_units has {b.logmel_units.num_units}")
        for name, bc in meta.get("backbones", {}).items():
            b.backbones[name] = _load_part(path / "backbones", name, lambda: UnitMBart(UnitMBartConfig.from_dict(bc)))
            b.backbones[name].requires_grad_(False)
        for name, pc in meta.get("prompts", {}).items():
            if not b.has_backbone(name):
                raise BundleError(f"{meta_file}: prompt {name!r} needs an mbart part")
            cfg = b.backbone(name).cfg
            b.prompts[name] = _load_part(path / "prompts", name, lambda: DeepPrompt(cfg, PromptConfig(pc["length"], tuple(pc["stacks"]))))
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{meta_file}: malformed part config: {type(e).__name__}: {e}") from None
    _check_units(meta_file, b)
    if b.hubert is not None and b.quantizer is not None and b.hubert.cfg.dim != b.quantizer.dim:
        raise BundleError(f"{path}: HuBERT features ({b.hubert.cfg.dim}) and k-means centroids ({b.quantizer.dim}) differ in size")
    if not b.modules():
        raise BundleError(f"{meta_file}: the bundle holds no parts")
    return b.to(device, dtype)
