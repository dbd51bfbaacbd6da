"""Training a GPT on bytes: AdamW, linear warm-up then cosine decay, gradient clipping, loss scaling for float16,
evaluation on the held-out split, a progress bar, checkpoints that survive interruption, resume, a loss-curve PNG.

    >>> from selfattn.model.train import TrainConfig, train
    >>> result = train(TrainConfig(steps=300, out_dir="run"))          # doctest: +SKIP
    >>> model, config = load_checkpoint("run")                        # doctest: +SKIP

Checkpoint directory (``out_dir``): ``model.safetensors`` (weights), ``config.json`` (model and training settings,
step, loss history), ``state.pt`` (optimizer, scaler and data-sampler state, for resuming). Each file is written to a
temporary name and renamed, so an interrupted run leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from selfattn.model import data
from selfattn.model.gpt import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: str | None = None  # a UTF-8 text file; None: the embedded Python documentation
    out_dir: str = "selfattn-gpt"
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0
    dtype: str = "float32"  # float32, bfloat16 or float16 (float16 uses loss scaling)
    device: str = "cpu"
    threads: int | None = None  # CPU threads for torch; None: torch's default
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}"
                                 + ("; train for at least one step" if name == "steps" else ""))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 steps, got {self.warmup!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (the largest gradient norm), got {self.grad_clip}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.model, GPTConfig):
            raise TypeError(f"TrainConfig.model must be a GPTConfig, got {type(self.model).__name__}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = GPTConfig.from_dict(d["model"])
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from lr to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: GPT, tokens: torch.Tensor, *, batch_size: int = 64, device="cpu") -> float:
    """Mean next-byte cross-entropy (nats/byte) over ``tokens`` cut into non-overlapping windows of the model's
    context (every byte after the first of each window is predicted once)."""
    T = model.config.context
    n = (len(tokens) - 1) // T
    x = tokens[: n * T].view(n, T)
    y = tokens[1: n * T + 1].view(n, T)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
        total += loss.item() * len(x[i:i + batch_size])
    model.train(was_training)
    return total / n


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir: str, model: GPT, cfg: TrainConfig, *, step: int, history: dict, optimizer=None,
                    scaler=None, sampler: torch.Generator | None = None) -> None:
    from safetensors.torch import save_model

    os.makedirs(out_dir, exist_ok=True)
    meta = {"model": cfg.model.to_dict(), "train": cfg.to_dict(), "step": step, "history": history}
    _atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_model(model, p))
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 "sampler": sampler.get_state() if sampler is not None else None, "step": step}
        _atomic_write(os.path.join(out_dir, "state.pt"), lambda p: torch.save(state, p))

    def write_json(p):
        with open(p, "w") as f:
            json.dump(meta, f, indent=1)

    _atomic_write(os.path.join(out_dir, "config.json"), write_json)  # written last: it names the finished step


def load_checkpoint(path: str, *, device: str = "cpu") -> tuple[GPT, GPTConfig]:
    """A trained model from a checkpoint directory (or its ``model.safetensors``), in eval mode, and its config."""
    from safetensors.torch import load_model

    out_dir = os.path.dirname(path) if os.path.isfile(path) else path
    meta_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: expected {meta_path}; train one with "
                                f"`selfattn train --out {out_dir}`")
    with open(meta_path) as f:
        meta = json.load(f)
    config = GPTConfig.from_dict(meta["model"])
    model = GPT(config)
    load_model(model, os.path.join(out_dir, "model.safetensors"), device=device)
    return model.to(device).eval(), config


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Train (or with ``resume`` continue) the model of ``cfg``; returns a summary (losses, tokens/s, paths).

    Ctrl-C stops the run after saving a checkpoint (the summary then has ``interrupted=True``)."""
    splits = data.load_splits(cfg.data, context=cfg.model.context)
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    dtype = DTYPES[cfg.dtype]
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    sampler = torch.Generator().manual_seed(cfg.seed)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "tokens_per_s": []}
    step = 0
    if resume:
        step, history = _resume(cfg, model, optimizer, scaler, sampler, device)
        log(f"resumed from {cfg.out_dir} at step {step}")
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg.model}")
    log(f"data: {splits.source}: {len(splits.train):,} training bytes, {len(splits.val):,} held out")

    def save(at_step):
        save_checkpoint(cfg.out_dir, model, cfg, step=at_step, history=history, optimizer=optimizer, scaler=scaler,
                        sampler=sampler)

    bar = _progress(cfg, step)
    tokens_per_step = cfg.batch_size * cfg.model.context
    t_start, tokens_done, interrupted = time.perf_counter(), 0, False
    model.train()
    try:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            x, y = splits.batch("train", cfg.batch_size, cfg.model.context, sampler)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr}) "
                                         "or use --dtype float32")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            tokens_done += tokens_per_step
            rate = tokens_done / (time.perf_counter() - t_start)
            history["step"].append(step)
            history["train_loss"].append(round(loss.item(), 4))
            history["tokens_per_s"].append(round(rate))
            if bar is not None:  # the postfix waits for the next timed refresh (refresh=True would draw every step)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr_at(step - 1, cfg):.1e}",
                                refresh=False)
                bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate(model, splits.val, device=device)
                history["val_step"].append(step)
                history["val_loss"].append(round(val, 4))
                (bar.write if bar is not None else log)(f"step {step}: held-out loss {val:.4f} nats/byte")
                save(step)
    except KeyboardInterrupt:
        interrupted = True
        save(step)
        log(f"\ninterrupted at step {step}: checkpoint saved to {cfg.out_dir}; continue with --resume")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    result = {"step": step, "interrupted": interrupted, "seconds": seconds,
              "tokens_per_s": tokens_done / seconds if seconds > 0 else 0.0,
              "val_loss": history["val_loss"][-1] if history["val_loss"] else None,
              "params": model.num_params(), "out_dir": cfg.out_dir, "history": history}
    if cfg.plot and history["step"]:
        result["plot"] = plot_losses(history, os.path.join(cfg.out_dir, "loss.png"), log=log)
    return result


def _resume(cfg, model, optimizer, scaler, sampler, device):
    from safetensors.torch import load_model

    meta_path = os.path.join(cfg.out_dir, "config.json")
    state_path = os.path.join(cfg.out_dir, "state.pt")
    if not (os.path.isfile(meta_path) and os.path.isfile(state_path)):
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out_dir!r} (need config.json and state.pt); "
                                "start without --resume, or point --out at an earlier run")
    with open(meta_path) as f:
        meta = json.load(f)
    if GPTConfig.from_dict(meta["model"]) != cfg.model:
        raise ValueError(f"--resume: the checkpoint in {cfg.out_dir!r} is a different model "
                         f"({meta['model']}) from the one asked for ({cfg.model.to_dict()}); use the same model "
                         "settings, or another --out")
    load_model(model, os.path.join(cfg.out_dir, "model.safetensors"), device=str(device))
    state = torch.load(state_path, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if state["sampler"] is not None:
        sampler.set_state(state["sampler"])
    if state["step"] >= cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {state['step']}, already >= steps={cfg.steps}; "
                         "raise --steps to train further")
    return state["step"], meta["history"]


PROGRESS_INTERVAL_S = 5.0  # off a terminal: the shortest time between two progress lines


def _progress(cfg: TrainConfig, initial: int):
    if not cfg.progress:
        return None
    import sys

    from tqdm.auto import tqdm

    # in a log file (CI, a pipe) every refresh is a new line's worth of bytes: there, refresh at most every
    # PROGRESS_INTERVAL_S seconds and every tenth of the run, so a long run writes about ten lines
    if sys.stderr.isatty():
        return tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True, mininterval=0.1)
    return tqdm(total=cfg.steps, initial=initial, unit="step", dynamic_ncols=True, mininterval=PROGRESS_INTERVAL_S,
                maxinterval=float("inf"), miniters=max(1, (cfg.steps - initial) // 10))


def plot_losses(history: dict, path: str, *, log=print) -> str | None:
    """Training loss (smoothed) and held-out loss against the step, as a PNG; needs matplotlib (``.[viz]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no loss curve (pip install 'selfattn[viz]')")
        return None
    losses = torch.tensor(history["train_loss"])
    k = max(1, len(losses) // 50)
    smooth = torch.nn.functional.avg_pool1d(losses[None, None], k, 1).flatten() if len(losses) >= k else losses
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"][k - 1:], smooth.tolist(), label=f"training (mean of {k} steps)", lw=1)
    ax.plot(history["val_step"], history["val_loss"], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return path
