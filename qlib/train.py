"""Training and evaluation loops, repeatable seeding, checkpoints and a cache of trained networks.

The book trains each running-example float network once per build: :func:`pretrained`
looks the configuration and seed up in a cache directory (``$QLIB_CACHE_DIR``, or
``~/.cache/qlib``) and trains only on a miss. Later chapters fine-tune from these
checkpoints, as the papers start from pretrained float weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._cache import cache_dir, code_fingerprint
from ._checks import check_choice, check_float, check_int
from .data import Dataset, load, random_crop_flip
from .models import build_model

__all__ = ["seed_everything", "TrainConfig", "predict", "accuracy", "evaluate", "correct", "mean_std",
           "parameter_groups", "code_fingerprint", "make_optimizer", "single_threaded", "pretrained_path",
           "train", "save_checkpoint", "load_checkpoint", "cache_dir", "Recipe", "pretrained", "RECIPES",
           "OPTIMIZERS"]

CHECKPOINT_FORMAT = 1
OPTIMIZERS = ("adam", "sgd")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator seeded the same way (for shuffling).

    On a CPU with a fixed number of threads, two runs with the same seed give identical
    weights.
    """
    seed = check_int(seed, "seed", 0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (cosine learning-rate schedule, no warm-up).

    ``quantizer_lr``: the learning rate of the quantizers' own parameters (LSQ's steps, PACT's and
    APoT's clips, DSQ's alpha; see :func:`make_optimizer`), ``None`` for the same as ``lr``.
    """

    epochs: int = 15
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    augment: bool = False  # random crop + flip (CIFAR)
    label_smoothing: float = 0.0
    quantizer_lr: float | None = None

    def __post_init__(self):
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_float(self.lr, "lr", 0.0, low_open=True)
        check_float(self.weight_decay, "weight_decay", 0.0)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_float(self.label_smoothing, "label_smoothing", 0.0, 1.0, high_open=True)
        if self.quantizer_lr is not None:
            check_float(self.quantizer_lr, "quantizer_lr", 0.0, low_open=True)


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for all of ``x``, batch by batch."""
    _check_model(model)
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        raise TypeError(f"x must be a torch tensor with a batch dimension, got {type(x).__name__}")
    check_int(batch_size, "batch_size", 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(logits) != len(y) or len(y) == 0:
        raise ValueError(f"logits and y must be non-empty and of equal length, got {len(logits)} and {len(y)}")
    return 100.0 * (logits.argmax(dim=1) == y).double().mean().item()


def evaluate(model: nn.Module, data: Dataset, split: str = "test", batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` on a split (``"train"``, ``"val"``, ``"test"``) of ``data``."""
    x, y = data.split(split)
    return accuracy(predict(model, x, batch_size), y)


def correct(model: nn.Module, data: Dataset, split: str = "test", batch_size: int = 1000) -> torch.Tensor:
    """Whether ``model`` classifies each example of a split right (a boolean tensor): what paired
    comparisons over test examples need (:func:`qlib.experiments.paired_difference`)."""
    x, y = data.split(split)
    return predict(model, x, batch_size).argmax(dim=1) == y


def mean_std(values, digits: int = 1) -> str:
    """Format repeated measurements as ``"mean ± std"`` (sample standard deviation, ddof=1)."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("values is empty")
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {std:.{digits}f}"


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The network's parameters, and the quantizers' own parameters in a group of their own.

    Quantizer parameters (everything inside a :class:`qlib.quantizers.Quantizer`: steps, clips,
    offsets, DSQ's alpha) train at ``config.quantizer_lr`` (or ``lr``) and without weight decay:
    decay would pull a step or a clip towards zero regardless of the task, which is not what
    PACT's L2 penalty does either (that one is part of the loss, not of the optimizer).
    """
    from .quantizers import Quantizer  # the quantizers build on training utilities, not the reverse

    quantizer_ids = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    network = [p for p in model.parameters() if id(p) not in quantizer_ids]
    quantizers = [p for p in model.parameters() if id(p) in quantizer_ids]
    groups = [{"params": network, "lr": config.lr, "weight_decay": config.weight_decay, "name": "network"}]
    if quantizers:
        groups.append({"params": quantizers, "lr": config.quantizer_lr or config.lr, "weight_decay": 0.0,
                       "name": "quantizers"})
    return groups


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a :class:`TrainConfig` asks for, AdamW or SGD with Nesterov momentum 0.9, over
    :func:`parameter_groups` (the quantizers' parameters on their own learning rate, not decayed)."""
    _check_model(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    groups = parameter_groups(model, config)
    if config.optimizer == "adam":
        # foreach: one fused update per group instead of a Python loop over tensors (CPU default)
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay,
                           foreach=True)


def train(model: nn.Module, data: Dataset, config: TrainConfig = TrainConfig(), seed: int = 0,
          progress: bool | None = None, desc: str | None = None, device: str = "cpu",
          on_epoch_start=None, on_step_start=None, evaluate_epoch=None) -> list[dict]:
    """Train ``model`` on ``data`` with cross-entropy; return one record per epoch.

    Each record holds ``epoch``, ``loss`` (mean training loss), ``step_losses`` (the loss of each
    batch), ``train_acc`` (running accuracy over the epoch's batches) and what ``evaluate_epoch``
    returns after the epoch: by default ``val_acc``, the accuracy on the validation split (or
    ``test_acc`` for a data set without one). ``progress=None`` shows a tqdm bar unless
    ``$QLIB_PROGRESS`` is ``0``. ``device`` (e.g. ``"cuda"``) is where the model trains; the data
    stay in memory on the CPU and move batch by batch. Callbacks: ``on_epoch_start(epoch, model)``
    before each epoch (1-based), ``on_step_start(step, model)`` before each optimizer step (0-based,
    counting across epochs), e.g. to switch on activation quantization after a fraction of the steps.
    """
    _check_model(model)
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a qlib.data.Dataset, got {type(data).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    generator = torch.Generator().manual_seed(check_int(seed, "seed", 0))
    model.to(device)
    optimizer = make_optimizer(model, config)
    steps = config.epochs * math.ceil(len(data.x_train) / config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if progress is None:
        progress = os.environ.get("QLIB_PROGRESS", "1") != "0"
    if evaluate_epoch is None:
        split = "val" if len(data.x_val) else "test"

        def evaluate_epoch(m):
            return {f"{split}_acc": evaluate(m, data, split)}

    history, step = [], 0
    bar = tqdm(range(1, config.epochs + 1), desc=desc or type(model).__name__, disable=not progress, unit="epoch")
    for epoch in bar:
        if on_epoch_start is not None:
            on_epoch_start(epoch, model)
        model.train()
        total_loss, correct_count, seen, step_losses = 0.0, 0, 0, []
        for x, y in data.train_batches(config.batch_size, generator):
            if on_step_start is not None:
                on_step_start(step, model)
            if config.augment:
                x = random_crop_flip(x, generator=generator)
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            step_losses.append(loss.item())
            total_loss += step_losses[-1] * len(y)
            correct_count += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training diverged in epoch {epoch} (loss {total_loss}); lower lr")
        record = {"epoch": epoch, "loss": total_loss / seen, "step_losses": step_losses,
                  "train_acc": 100.0 * correct_count / seen, **evaluate_epoch(model)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", **{k: f"{v:.2f}" for k, v in record.items()
                                                         if k.endswith("_acc") and k != "train_acc"})
    model.eval()
    return history


def save_checkpoint(path, model: nn.Module, **meta) -> Path:
    """Save ``model``'s state dict and JSON-like ``meta`` atomically (write, then rename)."""
    _check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "meta": meta}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(payload, tmp)
    os.replace(tmp.name, path)
    return path


def load_checkpoint(path, model: nn.Module) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model``; return its ``meta``.

    Uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code on load.
    """
    _check_model(model)
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a qlib checkpoint (format {CHECKPOINT_FORMAT})")
    model.load_state_dict(payload["state_dict"])
    return payload["meta"]


def _cache_key(spec: dict) -> str:
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


#: The modules a float network's training depends on (their source is part of its cache key).
_FLOAT_TRAINING_CODE = ("_checks.py", "data.py", "models.py", "train.py")


@dataclass(frozen=True)
class Recipe:
    """How a running-example network is trained in float: its data set and training configuration."""

    data: str
    config: TrainConfig


#: The float training recipe of each running-example network (model name -> :class:`Recipe`).
#: On 2 CPU cores MnistCNN reaches about 96.5 % in 15 epochs and Mnist1DCNN about 97 %.
RECIPES = {
    "mnist_cnn": Recipe("mnist5k", TrainConfig(epochs=15, batch_size=64, lr=5e-3)),
    "mnist1d_cnn": Recipe("mnist1d", TrainConfig(epochs=15, batch_size=64, lr=5e-3)),
    "mnist1d_resnet": Recipe("mnist1d", TrainConfig(epochs=15, batch_size=64, lr=5e-3)),
    # The usual CIFAR ResNet recipe (He et al. 2016): SGD, lr 0.1, weight decay 5e-4, crop + flip.
    "resnet20": Recipe("cifar10", TrainConfig(epochs=160, batch_size=128, lr=0.1, weight_decay=5e-4,
                                              optimizer="sgd", augment=True)),
}


@contextmanager
def single_threaded():
    """Run the block on one CPU thread (restored afterwards).

    Every cached network trains this way, so that its weights do not depend on how many threads
    the machine offered (reductions split across threads round differently), and so that two
    trainings can share a 2-core machine side by side without their thread pools fighting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrained_path(model: str, seed: int = 0, config: TrainConfig | None = None, model_kwargs: dict | None = None,
                    data_name: str | None = None, data_kwargs: dict | None = None) -> tuple[Path, dict]:
    """Where :func:`pretrained` caches a network, and the spec its key hashes."""
    if model not in RECIPES:
        raise ValueError(f"model must be one of {sorted(RECIPES)}, got {model!r}")
    recipe = RECIPES[model]
    config = recipe.config if config is None else config
    data_name = recipe.data if data_name is None else data_name
    spec = {"model": model, "model_kwargs": dict(model_kwargs or {}), "data": data_name,
            "data_kwargs": {k: str(v) for k, v in dict(data_kwargs or {}).items()},
            "config": dataclasses.asdict(config), "seed": check_int(seed, "seed", 0),
            "torch": torch.__version__.split("+")[0], "format": CHECKPOINT_FORMAT,
            "code": code_fingerprint(_FLOAT_TRAINING_CODE)}
    key = _cache_key(spec)
    return cache_dir() / f"{model}-{data_name}-seed{seed}-{key}.pt", spec


def pretrained(model: str, seed: int = 0, data: str | Dataset | None = None, config: TrainConfig | None = None,
               model_kwargs: dict | None = None, data_kwargs: dict | None = None,
               progress: bool | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A float network trained on its running-example data set, from the cache or trained now.

    ``data`` and ``config`` default to the model's entry in :data:`RECIPES`. The cache key
    covers the model name and arguments, the data set name and arguments, the training
    configuration, the seed, the torch version and the source of the modules training uses
    (:func:`code_fingerprint`). Training runs on one CPU thread (:func:`single_threaded`).
    Returns the model (in eval mode) and its record: ``val_acc``, ``test_acc``, ``history``,
    ``key`` and ``spec``.
    """
    if model not in RECIPES:
        raise ValueError(f"model must be one of {sorted(RECIPES)}, got {model!r}")
    recipe = RECIPES[model]
    config = recipe.config if config is None else config
    model_kwargs, data_kwargs = dict(model_kwargs or {}), dict(data_kwargs or {})
    data = recipe.data if data is None else data
    dataset = data if isinstance(data, Dataset) else load(data, **data_kwargs)
    path, spec = pretrained_path(model, seed, config, model_kwargs, dataset.name, data_kwargs)
    key = _cache_key(spec)
    seed_everything(seed)  # the initial weights depend on the seed
    net = build_model(model, **model_kwargs)
    if path.exists():
        meta = load_checkpoint(path, net)
        net.eval()
        return net, meta
    with single_threaded():
        history = train(net, dataset, config, seed=seed, progress=progress, desc=f"{model} seed {seed}",
                        device=device)
    net.cpu()
    meta = {"val_acc": evaluate(net, dataset, "val") if len(dataset.x_val) else None,
            "test_acc": evaluate(net, dataset), "history": history, "key": key, "spec": spec}
    save_checkpoint(path, net, **meta)
    return net, meta
