"""An end-to-end training job: a small ViT on scikit-learn's 8x8 handwritten digits.

    python -m vit.train --data digits [--epochs 30] [--out runs/digits] [--overwrite] [--backend auto] [--seed 0]

The 1797 digits are split 80/20 (stratified, seeded), upscaled bilinearly to 16x16 and cut into 4x4
patches (16 tokens + CLS). Training: AdamW, linear warmup then cosine decay, label smoothing (random shifts
of the source pixels: `TrainConfig.max_shift`, off by default). The reported accuracy is on the held-out 20% after
the last epoch (no model selection on it). Writes `metrics.json`, `loss_curve.png` and `model.pt` (state dict) to --out,
which is created (or checked) before training starts; a non-empty --out is refused unless --overwrite is given,
so that an earlier run is never replaced by accident.
On a CUDA machine it trains on the GPU; backend="auto" runs torch wherever the measured table names no kernel
backend (this fp32 job at batch 32: everywhere), so --backend triton / cuda picks the fused kernels; on CPU, auto is
torch.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import vit_kernels as vk
from vit.model import VisionTransformer
from vit_kernels.dispatch import BACKENDS, device_unavailable_reason


@dataclass
class TrainConfig:
    data: str = "digits"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    img_size: int = 16
    patch_size: int = 4
    embed_dim: int = 64  # 2 heads of 64 / 2 = 32: a head dim the fused kernels support
    depth: int = 4
    num_heads: int = 2
    mlp_ratio: float = 2.0
    drop_path_rate: float = 0.05
    max_shift: int = 0  # augmentation: random translation by up to this many source (8x8) pixels
    seed: int = 0
    backend: str = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    # CPU intra-op threads for the run (restored after). A model this small gains nothing from more, and on
    # a shared machine extra OpenMP threads spin-wait and make each step slower (benchmarks/NOTES.md).
    threads: int | None = 1
    out: str | None = "runs/digits"  # None: write nothing
    overwrite: bool = False  # allow a non-empty `out` (its metrics.json, loss_curve.png, model.pt are replaced)
    progress: bool = True


def load_digits(img_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images (n, 1, img_size, img_size) standardised, labels (n,) int64."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, stratify=y.numpy(), random_state=seed)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in each direction, filling with the background."""
    B, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=x.amin().item())
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)).tolist()
    return torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(y), batch_size)
    )
    return correct / len(y)


class ConfigError(ValueError):
    """A TrainConfig field that cannot give a real run; `field` names it (the command line reports `--field`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_config(cfg: TrainConfig) -> None:
    """ConfigError (a ValueError) naming the first field that cannot give a real run (checked before any work)."""
    if cfg.data != "digits":
        raise ConfigError("data", f"unknown data set {cfg.data!r}; available: digits")
    # epochs 0 left no accuracy to report and a negative batch size trained nothing yet wrote a model: both refused.
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"{name} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.warmup_epochs < 0:
        raise ConfigError("warmup_epochs", f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError("lr", f"lr must be a positive number, got {cfg.lr}")
    if cfg.threads is not None and cfg.threads < 0:
        raise ConfigError("threads", f"threads must be >= 0, got {cfg.threads}")
    # The seed also seeds scikit-learn's split, whose random_state must fit in 32 bits.
    if not (isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32):
        raise ConfigError("seed", f"seed must be an integer in [0, 2**32 - 1], got {cfg.seed!r}")
    device = train_device(cfg)
    if cfg.backend != "auto":  # auto always runs (torch where nothing faster can)
        if cfg.backend not in BACKENDS:
            raise ConfigError("backend", f"backend must be one of {('auto', *BACKENDS)}, got {cfg.backend!r}")
        why = device_unavailable_reason(cfg.backend, device)
        if why is not None:
            available = ", ".join(["auto", *vk.available_backends(device)])
            raise ConfigError(
                "backend", f"backend {cfg.backend!r} cannot run on {device}: {why} (available: {available})"
            )


def train_device(cfg: TrainConfig) -> torch.device:
    """The device a run trains on: cfg.device, or cuda if available else cpu. ConfigError if it is not one here."""
    if cfg.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError("device", f"device {cfg.device!r} is not a device name such as cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device", f"device {cfg.device!r}: no CUDA device here (torch.cuda.is_available() is False)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                "device", f"device {cfg.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "meta":
        raise ConfigError("device", "device 'meta' holds no data to train on")
    elif device.type != "cpu":
        try:  # another accelerator (mps, xpu, ...): present if a tensor can live there
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError("device", f"device {cfg.device!r} is not available here: {e}") from None
    return device


def prepare_out(out: str, overwrite: bool = False) -> Path:
    """Create `out` (parents included) and make sure a run can be written there, before any training.

    FileExistsError if it holds anything and `overwrite` is False (an earlier run is never silently replaced);
    OSError if it cannot be created or written.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not overwrite and any(path.iterdir()):
            raise FileExistsError(
                f"output directory {str(path)!r} is not empty (an earlier run?); "
                "pass --overwrite (TrainConfig.overwrite=True) to replace its files, or choose another --out"
            )
        # mkdir succeeds on an existing read-only directory: probe that files can really be written.
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError as e:
        if e.errno is None:  # ours, above
            raise
        raise NotADirectoryError(f"output directory {str(path)!r} exists and is not a directory") from e
    except OSError as e:
        raise OSError(f"cannot create or write the output directory {str(path)!r}: {e.strerror or e}") from e
    return path


def train(cfg: TrainConfig) -> dict:
    """Train and evaluate; returns the metrics (also written to cfg.out/metrics.json when cfg.out is set).

    The config and `cfg.out` are checked first (see `check_config`, `prepare_out`), so a bad setting fails at once.
    """
    check_config(cfg)
    if cfg.out is not None:
        prepare_out(cfg.out, cfg.overwrite)
    device = train_device(cfg)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()

    x_train, y_train, x_test, y_test = load_digits(cfg.img_size, cfg.seed)
    x_test, y_test = x_test.to(device), y_test.to(device)
    model = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=1,
        num_classes=10,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        backend=cfg.backend,
        drop_path_rate=cfg.drop_path_rate,
    ).to(device)
    # No weight decay on biases, norms, the class token and the position embedding (the usual ViT recipe).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("cls_token", "pos_embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n in ("cls_token", "pos_embed")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    bar = _progress(range(cfg.epochs), cfg.progress)
    losses, test_accs, step = [], [], 0
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        epoch_loss = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = x_train[idx]
            if cfg.max_shift:
                xb = random_shift(xb, cfg.max_shift * cfg.img_size // 8, gen)
            xb = xb.to(device)
            yb = y_train[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            epoch_loss += loss.item() * len(idx)
            step += 1
        test_accs.append(accuracy(model, x_test, y_test))
        msg = {"epoch": epoch + 1, "loss": round(epoch_loss / len(perm), 4), "test_acc": round(test_accs[-1], 4)}
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=msg["loss"], test_acc=msg["test_acc"])
        elif cfg.progress:
            print(f"epoch {msg['epoch']:3d}/{cfg.epochs}  loss {msg['loss']:.4f}  test acc {msg['test_acc']:.4f}")

    metrics = {
        "test_accuracy": test_accs[-1],
        "train_accuracy": accuracy(model, x_train.to(device), y_train.to(device)),
        "seconds": time.perf_counter() - start,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_accuracy_per_epoch": test_accs,
        "config": asdict(cfg),
    }
    if cfg.out is not None:
        out = Path(cfg.out)  # created and checked by prepare_out before training
        (out / "metrics.json").write_text(json.dumps({**metrics, "train_loss_per_step": losses}, indent=2))
        torch.save(model.state_dict(), out / "model.pt")
        plot_curves(losses, test_accs, steps_per_epoch, out / "loss_curve.png")
    metrics["model"] = model
    return metrics


def _progress(it, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc="epochs", unit="epoch")


def plot_curves(losses: list[float], test_accs: list[float], steps_per_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.5, label="train loss (step)")
    k = max(steps_per_epoch, 1)
    smooth = [
        sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
    ]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label="train loss (1-epoch mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (label smoothing)")
    ax2 = ax.twinx()
    ax2.plot(
        [steps_per_epoch * (e + 1) for e in range(len(test_accs))], test_accs, "o-", color="C3", ms=3, label="test acc"
    )
    ax2.set_ylabel("held-out accuracy")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right")
    ax.set_title(f"ViT on digits: final held-out accuracy {test_accs[-1]:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _number(kind, text: str, ok, expected: str):
    """argparse `type`: `kind(text)` if `ok` holds for it, else an error saying what was `expected`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a positive number")


def main(argv: list[str] | None = None) -> dict:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m vit.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=defaults.data, choices=["digits"])
    p.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    p.add_argument("--lr", type=_positive_float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--backend", default=defaults.backend, choices=["auto", "triton", "cuda", "torch", "reference"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=defaults.out, help="directory for metrics.json, loss_curve.png, model.pt")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out (replaces an earlier run)")
    p.add_argument(
        "--threads", type=_non_negative_int, default=defaults.threads, help="CPU threads (0: torch's default)"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        data=a.data,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        backend=a.backend,
        device=a.device,
        out=a.out,
        overwrite=a.overwrite,
        threads=a.threads,
        progress=not a.no_progress,
    )
    # The same checks train() makes first, here to give argparse's message and exit status 2, before --out is made.
    try:
        check_config(cfg)
    except ConfigError as e:
        p.error(f"--{e.field.replace('_', '-')}: {e}")
    try:
        prepare_out(cfg.out, cfg.overwrite)
    except OSError as e:  # not creatable, not writable, or an earlier run without --overwrite
        p.error(f"--out: {e}")
    metrics = train(cfg)
    print(
        f"held-out accuracy {metrics['test_accuracy']:.4f} on {metrics['n_test']} digits "
        f"(train {metrics['train_accuracy']:.4f}) after {cfg.epochs} epochs in {metrics['seconds']:.1f} s "
        f"on {metrics['device']}; wrote {cfg.out}/loss_curve.png"
    )
    return metrics


if __name__ == "__main__":
    main()
