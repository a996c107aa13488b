"""One training loop for three jobs on a Unit mBART:

- "prompt": SpeechGen prompt tuning. The backbone is frozen; only a DeepPrompt trains.
- "full":   full fine-tuning on the same pairs (the baseline the paper compares against).
- "denoise": mBART-style pretraining: each target is span-masked into its own source.

AdamW (betas 0.9/0.98), linear warm-up then linear decay, gradient clipping, bf16 autocast on CUDA,
dev loss every epoch with early stopping, a resumable state written at every epoch's end and also
every `save_every_s` seconds inside an epoch (long epochs on a CPU must survive being killed), each
file written whole or not at all. Under torchrun (WORLD_SIZE > 1) it runs
DistributedDataParallel (gloo on CPU, nccl on CUDA); every global batch is split across ranks and
the loss is normalised by the global token count, so the update equals the single-process one.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic_file import write_atomic
from ..bundle import shape_difference
from ..models.prompt import DeepPrompt, PromptConfig, count_parameters
from ..models.unit_mbart import PAD, UnitMBart
from ..progress import Progress
from ..resume import differences
from .data import Batch, Pair, collate, span_mask


@dataclass
class TrainConfig:
    mode: str = "prompt"  # prompt | full | denoise
    prompt_length: int = 16
    prompt_stacks: tuple[str, ...] = ("encoder", "decoder")
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 16
    clip: float = 1.0
    patience: int = 3
    seed: int = 0
    prefix_tokens: tuple[int, ...] = ()
    mask_ratio: float = 0.3  # denoise
    save_every_s: float = 600.0  # resumable state also this often inside an epoch (0: at epoch ends only)

    def __post_init__(self):
        if self.mode not in ("prompt", "full", "denoise"):
            raise ValueError(f"mode must be prompt, full or denoise, got {self.mode!r}")


@dataclass
class TrainResult:
    steps: int
    epochs: int
    best_dev_loss: float
    history: list[dict] = field(default_factory=list)
    trainable: int = 0
    total: int = 0


class Objective(nn.Module):
    """Summed token cross-entropy of a batch, with the prompt (if any) as the only thing that learns."""

    def __init__(self, model: UnitMBart, prompt: DeepPrompt | None):
        super().__init__()
        self.model, self.prompt = model, prompt

    def forward(self, src, prev, target):
        kv = self.prompt.kv(self.model) if self.prompt is not None else None
        logits = self.model(src, prev, kv)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD, reduction="sum")


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def setup_distributed(device: torch.device) -> None:
    """Join the torchrun process group if launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class Trainer:
    def __init__(self, model: UnitMBart, cfg: TrainConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                 prompt: DeepPrompt | None = None, progress: bool = True):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = torch.device(device)
        self.rank, self.world = world()
        self.model = model.to(self.device)
        self.progress = progress and self.rank == 0
        if cfg.mode == "prompt":
            self.model.requires_grad_(False)
            self.prompt = (prompt or DeepPrompt(model.cfg, PromptConfig(cfg.prompt_length, tuple(cfg.prompt_stacks)))).to(self.device)
            self.prompt.requires_grad_(True)
        else:
            self.model.requires_grad_(True)
            self.prompt = None
        self.objective = Objective(self.model, self.prompt)
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.total = count_parameters(self.model) + (count_parameters(self.prompt) if self.prompt is not None else 0)
        if cfg.mode == "prompt":  # the SpeechGen contract: nothing but the prompt learns
            assert self.trainable == count_parameters(self.prompt), "backbone parameters would train"
        self.ddp = nn.parallel.DistributedDataParallel(self.objective) if self.world > 1 else None
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        self.step = 0
        self.epoch = 0
        self.best = math.inf
        self.bad_epochs = 0
        self.history: list[dict] = []
        self.saved_at = time.monotonic()

    # --- data ---------------------------------------------------------------------------------

    def pairs_for(self, pairs: list[Pair], epoch: int) -> list[Pair]:
        if self.cfg.mode != "denoise":
            return pairs
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return [Pair(p.id, span_mask(p.tgt, g, self.cfg.mask_ratio), p.tgt) for p in pairs]

    def batches(self, pairs: list[Pair], epoch: int, shuffle: bool) -> list[list[Pair]]:
        order = list(range(len(pairs)))
        if shuffle:
            random.Random(self.cfg.seed * 7919 + epoch).shuffle(order)
        B = self.cfg.batch_size
        out = [[pairs[i] for i in order[k : k + B]] for k in range(0, len(order), B)]
        return [b for b in out if len(b) >= self.world]  # every process needs a share of each batch

    def shard(self, batch: list[Pair]) -> Batch:
        mine = batch[self.rank :: self.world]
        b = collate(mine, self.model.cfg.mask_token, self.cfg.prefix_tokens)
        return Batch(b.src.to(self.device), b.prev.to(self.device), b.target.to(self.device))

    def global_tokens(self, batch: list[Pair]) -> int:
        return sum(len(p.tgt) + 1 for p in batch)

    # --- loop ---------------------------------------------------------------------------------

    def lr_at(self, step: int, total: int) -> float:
        w = self.cfg.warmup_steps
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    def train_step(self, batch: list[Pair], total_steps: int) -> float:
        self.objective.train()
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * self.lr_at(self.step, total_steps)
        mine = self.shard(batch)
        n = self.global_tokens(batch)
        fwd = self.ddp or self.objective
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss_sum = fwd(mine.src, mine.prev, mine.target)
        # DDP averages gradients over ranks: scale so the result is sum over the global batch / n
        loss = loss_sum * (self.world / n)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.opt.step()
        self.step += 1
        value = loss_sum.detach().clone()
        if self.world > 1:
            dist.all_reduce(value)
        return float(value) / n

    @torch.no_grad()
    def evaluate(self, pairs: list[Pair]) -> float:
        self.objective.eval()
        total, n = 0.0, 0
        for batch in self.batches(self.pairs_for(pairs, 0), 0, shuffle=False):
            mine = self.shard(batch)
            total += float(self.objective(mine.src, mine.prev, mine.target))
            n += self.global_tokens(batch)
        if self.world > 1:
            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = float(t)
        return total / max(n, 1)

    # what a resumed run must share with the run it continues: the steps it takes are the same batches in the
    # same order, of the same trainable tensors (epochs, max_steps, lr, patience may change)
    RESUME_KEYS = ("mode", "prompt_length", "prompt_stacks", "batch_size", "seed", "prefix_tokens", "mask_ratio")

    def run_identity(self, train: list[Pair]) -> dict:
        cfg = asdict(self.cfg)
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in self.RESUME_KEYS},
                "training_pairs": len(train), "world": self.world}

    def fit(self, train: list[Pair], dev: list[Pair] | None = None, resume: bool = False) -> TrainResult:
        if len(train) < self.world:
            raise ValueError(f"{len(train)} training pairs cannot feed {self.world} processes")
        self.identity = self.run_identity(train)
        if resume:
            self.load_state()
        per_epoch = len(self.batches(train, 0, shuffle=False))
        total_steps = self.cfg.max_steps or per_epoch * self.cfg.epochs
        if self.bad_epochs >= self.cfg.patience:  # resuming a run that stopped early: it is finished
            return TrainResult(self.step, self.epoch, self.best, self.history, self.trainable, self.total)
        with Progress("training", total_steps, self.step, enabled=self.progress, loss=float("nan"), epoch=self.epoch) as bar:
            while self.epoch < self.cfg.epochs and self.step < total_steps:
                batches = self.batches(self.pairs_for(train, self.epoch), self.epoch, shuffle=True)
                if self.step - self.epoch * per_epoch >= len(batches):  # (state and data agree, or load_state said why not)
                    raise ValueError(f"{self.out}: step {self.step} lies past epoch {self.epoch}'s {len(batches)} batches: "
                                     "the state is not this run's; give another --out")
                losses = []
                for batch in batches[self.step - self.epoch * per_epoch :]:  # mid-epoch when resuming
                    if self.step >= total_steps:
                        break
                    losses.append(self.train_step(batch, total_steps))
                    bar.update(self.step, loss=losses[-1], epoch=self.epoch)
                    mid_epoch = self.step < (self.epoch + 1) * per_epoch  # an epoch's end saves below anyway
                    if mid_epoch and self.cfg.save_every_s and time.monotonic() - self.saved_at >= self.cfg.save_every_s:
                        self.save_state()  # a resume continues from this step
                if self.step == (self.epoch + 1) * per_epoch:
                    self.epoch += 1
                if self.end_of_epoch(losses, dev):
                    break
        return TrainResult(self.step, self.epoch, self.best, self.history, self.trainable, self.total)

    def end_of_epoch(self, losses: list[float], dev: list[Pair] | None) -> bool:
        """Dev loss, best checkpoint, resumable state; True to stop early."""
        train_loss = sum(losses) / max(len(losses), 1)
        dev_loss = self.evaluate(dev) if dev else train_loss
        self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": train_loss, "dev_loss": dev_loss})
        improved = dev_loss < self.best - 1e-6
        if improved:
            self.best, self.bad_epochs = dev_loss, 0
            self.save_weights("best")
        else:
            self.bad_epochs += 1
        self.save_state()
        if self.progress:
            print(f"epoch {self.epoch} step {self.step}: train loss {train_loss:.4f}, dev loss {dev_loss:.4f}{' (best)' if improved else ''}", flush=True)
        if self.bad_epochs >= self.cfg.patience:
            if self.progress:
                print(f"early stop: no dev improvement in {self.cfg.patience} epochs", flush=True)
            return True
        return False

    # --- files --------------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        m = self.prompt if self.prompt is not None else self.model
        return {k: v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()}

    def save_weights(self, name: str) -> None:
        if self.rank:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        kind = "prompt" if self.prompt is not None else "mbart"
        write_atomic(self.out / f"{name}_{kind}.safetensors", lambda f: save_file(self.weights(), f))
        meta = {"mode": self.cfg.mode, "step": self.step, "epoch": self.epoch, "dev_loss": self.best,
                "trainable_parameters": self.trainable, "total_parameters": self.total, "config": asdict(self.cfg)}
        write_atomic(self.out / "task.json", lambda f: Path(f).write_text(json.dumps(meta, indent=2)))

    def save_state(self) -> None:
        self.saved_at = time.monotonic()
        self.save_weights("last")
        if self.rank == 0:
            state = {"step": self.step, "epoch": self.epoch, "best": self.best, "bad_epochs": self.bad_epochs,
                     "history": self.history, "optimizer": self.opt.state_dict(), "run": getattr(self, "identity", {})}
            write_atomic(self.out / "state.pt", lambda f: torch.save(state, f))

    def load_state(self) -> None:
        state_file = self.out / "state.pt"
        if not state_file.is_file():
            raise ValueError(f"{self.out}: nothing to resume (no state.pt)")
        st = torch.load(state_file, map_location=self.device, weights_only=True)
        theirs, ours = st.get("run"), getattr(self, "identity", {})
        if theirs is None:  # an older streamgen's state: resumed on trust (the tensors' shapes and the step's place
            # in its epoch are still checked); the next save records the run
            print(f"warning: {self.out}/state.pt does not say which run it belongs to (an older streamgen wrote it); resuming it "
                  "with this command's options: they must be that run's (batch size, seed, data)", file=sys.stderr, flush=True)
            theirs = ours
        differ = differences({k: theirs[k] for k in ours if k in theirs}, ours)  # (what an older streamgen recorded besides: not asked for now)
        if differ:
            raise ValueError(f"{self.out} holds a run that differs from this command in {differ}: "
                             "resume it with the same options and data, or start anew in another --out")
        kind = "prompt" if self.prompt is not None else "mbart"
        target = self.prompt if self.prompt is not None else self.model
        try:
            weights = load_file(str(self.out / f"last_{kind}.safetensors"), device=str(self.device))
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"{self.out}: cannot read last_{kind}.safetensors ({e}); the state cannot be resumed") from None
        diff = shape_difference({k: tuple(v.shape) for k, v in target.state_dict().items()},
                                {k: tuple(v.shape) for k, v in weights.items()}, "file")
        if diff is not None:
            raise ValueError(f"{self.out}: last_{kind}.safetensors holds tensors of other names or shapes than this command trains "
                             f"({diff}); resume with the same model and options, or start anew in another --out")
        with torch.no_grad():
            for k, v in target.state_dict().items():
                v.copy_(weights[k].to(v.dtype))
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.epoch, self.best = st["step"], st["epoch"], st["best"]
        self.bad_epochs, self.history = st["bad_epochs"], st["history"]


