"""The training loop fused_train exists for, as the PyTorch tutorial writes it: hyperparameters, then
each epoch a train loop (forward, loss, backward, step, zero_grad) and a validation loop (no_grad, mean
loss and accuracy), with fused_train's loss and optimizer, optionally beside stock PyTorch.

``fused-train demo`` (fused_train/cli.py) parses the flags and prints; everything it runs is here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from . import nn as fused_nn
from . import optim as fused_optim
from .data import BatchLoader, ClassificationData, TensorSplit

#: --optimizer choices: (fused_train class, torch.optim class, default learning rate)
OPTIMIZERS: dict[str, tuple[type, type, float]] = {
    "sgd": (fused_optim.SGD, torch.optim.SGD, 0.1),
    "adam": (fused_optim.Adam, torch.optim.Adam, 1e-3),
    "adamw": (fused_optim.AdamW, torch.optim.AdamW, 1e-3),
    "rmsprop": (fused_optim.RMSprop, torch.optim.RMSprop, 1e-3),
    # 8-bit state; --compare sets them beside torch's fp32 optimizer of the same update (SGD8bit is left out: the
    # demo's SGD has no momentum, so it would keep no state to quantize)
    "adam8bit": (fused_optim.Adam8bit, torch.optim.Adam, 1e-3),
    "adamw8bit": (fused_optim.AdamW8bit, torch.optim.AdamW, 1e-3),
    "rmsprop8bit": (fused_optim.RMSprop8bit, torch.optim.RMSprop, 1e-3),
}

#: the two implementations a demo run can train with, in the order they are reported
IMPLEMENTATIONS = ("fused_train", "torch")

# Batches trained (on throwaway copies) before the first timed epoch, so that neither implementation's
# first epoch pays for one-time costs (kernel selection, allocator growth, thread-pool start) the other
# has already paid.
_WARMUP_BATCHES = 3


class NeuralNetwork(nn.Module):
    """The tutorial's fully-connected classifier: Flatten → Linear(in, 512) → ReLU → Linear(512, 512) →
    ReLU → Linear(512, classes).

    Args:
        num_features (int): inputs of the first layer, the flattened image size (C·H·W).
        num_classes (int): outputs of the last layer, one logit per class.
        hidden (int, optional): width of the two hidden layers (default: 512).

    Shape:
        - Input: :math:`(N, C, H, W)` (or any :math:`(N, *)` with ``num_features`` elements per sample).
        - Output: :math:`(N, \\text{num\\_classes})` logits.
    """

    def __init__(self, num_features: int, num_classes: int, hidden: int = 512) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        return self.linear_relu_stack(x)


def train_loop(dataloader, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
               optimizer: torch.optim.Optimizer, progress: Callable | None = None) -> float:
    """One epoch of training, the tutorial's train loop.

    ``optimizer.zero_grad(set_to_none=False)`` keeps the gradients allocated: a fused_train optimizer
    then zeroes each gradient inside its step kernel, in the same pass that reads it, and this call
    has nothing left to do; a torch.optim optimizer zeroes them here in a separate pass.

    Args:
        dataloader: yields ``(X, y)`` batches and has ``len(dataloader.dataset)``.
        model (nn.Module): the model to train.
        loss_fn (callable): ``loss_fn(pred, y)`` returns the mean loss of the batch.
        optimizer (Optimizer): steps ``model``'s parameters.
        progress (callable, optional): wraps the batch iterator (e.g. a tqdm progress bar).

    Returns:
        float: the mean training loss over the epoch's samples.
    """
    model.train()
    batch_losses, batch_sizes = [], []
    batches = progress(dataloader) if progress is not None else dataloader
    for X, y in batches:
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        # Kept as tensors and summed once per epoch: a .item() per batch would wait for the device.
        batch_losses.append(loss.detach())
        batch_sizes.append(y.shape[0])
    sizes = torch.tensor(batch_sizes, dtype=torch.float32, device=batch_losses[0].device)
    return float(torch.dot(torch.stack(batch_losses).float(), sizes) / len(dataloader.dataset))


def test_loop(dataloader, model: nn.Module,
              loss_fn: Callable[[Tensor, Tensor], Tensor]) -> tuple[float, float]:
    """One pass over the validation data without gradients, the tutorial's test loop.

    Args:
        dataloader: yields ``(X, y)`` batches and has ``len(dataloader.dataset)``.
        model (nn.Module): the model to evaluate.
        loss_fn (callable): ``loss_fn(pred, y)`` returns the mean loss of the batch.

    Returns:
        tuple[float, float]: the mean loss over the samples and the accuracy, a fraction in [0, 1].
    """
    model.eval()
    size = len(dataloader.dataset)
    batch_losses, batch_sizes, batch_correct = [], [], []
    with torch.no_grad():
        for X, y in dataloader:
            pred = model(X)
            batch_losses.append(loss_fn(pred, y))
            batch_sizes.append(y.shape[0])
            batch_correct.append((pred.argmax(1) == y).sum())
    sizes = torch.tensor(batch_sizes, dtype=torch.float32, device=batch_losses[0].device)
    test_loss = float(torch.dot(torch.stack(batch_losses).float(), sizes)) / size
    correct = int(torch.stack(batch_correct).sum())
    return test_loss, correct / size


@dataclass
class EpochRecord:
    """What one epoch of one implementation measured."""

    epoch: int
    train_loss: float
    val_loss: float
    accuracy: float  # fraction of the validation samples classified correctly
    train_seconds: float
    val_seconds: float

    @property
    def seconds(self) -> float:
        """Wall time of the epoch: train loop plus validation loop."""
        return self.train_seconds + self.val_seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds}


@dataclass
class TrainingRun:
    """One implementation's model, loss, optimizer and loaders, and the epochs it has run."""

    implementation: str  # one of IMPLEMENTATIONS
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: BatchLoader
    val_loader: BatchLoader
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def optimizer_name(self) -> str:
        return f"{type(self.optimizer).__module__.rsplit('.', 1)[0]}.{type(self.optimizer).__name__}"

    @property
    def loss_name(self) -> str:
        return f"{type(self.loss_fn).__module__.split('.')[0]}.nn.{type(self.loss_fn).__name__}"


def make_loss_and_optimizer(implementation: str, model: nn.Module, optimizer: str, lr: float):
    """The loss and optimizer of ``implementation`` (``"fused_train"`` or ``"torch"``) for ``model``;
    the two share every hyperparameter, so the loop is the only thing they have in common that matters."""
    fused_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    if implementation == "fused_train":
        return fused_nn.CrossEntropyLoss(), fused_cls(model.parameters(), lr=lr)
    if implementation == "torch":
        return nn.CrossEntropyLoss(), torch_cls(model.parameters(), lr=lr)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def prepare_runs(data: ClassificationData, *, implementations: tuple[str, ...], optimizer: str, lr: float,
                 batch_size: int, seed: int) -> list[TrainingRun]:
    """Builds one :class:`TrainingRun` per implementation from one seed: the same initial weights (one
    model, copied) and the same batch order (loaders with equally seeded private generators).

    ``data`` must already be on the device to train on.
    """
    torch.manual_seed(seed)
    template = NeuralNetwork(data.num_features, data.num_classes).to(data.train.images.device)
    runs = []
    for implementation in implementations:
        model = copy.deepcopy(template)
        loss_fn, opt = make_loss_and_optimizer(implementation, model, optimizer, lr)
        runs.append(TrainingRun(
            implementation, model, loss_fn, opt,
            BatchLoader(data.train, batch_size, shuffle=True, seed=seed),
            BatchLoader(data.validation, batch_size),
        ))
    return runs


def warm_up(run: TrainingRun, data: ClassificationData, optimizer: str, lr: float, batch_size: int) -> None:
    """Trains a throwaway copy of ``run``'s model for a few batches and validates it once, so one-time
    costs are paid before anything is timed; ``run`` itself is left untouched."""
    model = copy.deepcopy(run.model)
    loss_fn, opt = make_loss_and_optimizer(run.implementation, model, optimizer, lr)
    n = min(len(data.train), _WARMUP_BATCHES * batch_size)
    head = TensorSplit(data.train.images[:n], data.train.labels[:n])
    train_loop(BatchLoader(head, batch_size), model, loss_fn, opt)
    test_loop(BatchLoader(head, batch_size), model, loss_fn)
    _synchronize(data.train.images.device)


def run_epoch(run: TrainingRun, epoch: int, progress: Callable | None = None) -> EpochRecord:
    """Runs ``run``'s train loop and validation loop once, times each, and records the epoch."""
    device = next(run.model.parameters()).device
    _synchronize(device)
    start = time.perf_counter()
    train_loss = train_loop(run.train_loader, run.model, run.loss_fn, run.optimizer, progress)
    _synchronize(device)
    trained = time.perf_counter()
    val_loss, accuracy = test_loop(run.val_loader, run.model, run.loss_fn)
    _synchronize(device)
    done = time.perf_counter()
    record = EpochRecord(epoch, train_loss, val_loss, accuracy, trained - start, done - trained)
    run.epochs.append(record)
    return record


def train(runs: list[TrainingRun], epochs: int,
          progress_for: Callable[[TrainingRun, int], Callable | None] | None = None,
          on_epoch: Callable[[int, list[EpochRecord]], None] | None = None) -> None:
    """Trains every run for ``epochs`` epochs, interleaved epoch by epoch.

    Interleaving (and alternating which run goes first each epoch) gives every implementation the
    same machine conditions: on a shared machine, load that comes and goes would otherwise land on
    whichever run happened to be going at the time.

    Args:
        runs (list[TrainingRun]): from :func:`prepare_runs` (and warmed up with :func:`warm_up`).
        epochs (int): epochs to run.
        progress_for (callable, optional): ``progress_for(run, epoch)`` returns the batch-iterator
            wrapper for :func:`train_loop` (a progress bar), or None.
        on_epoch (callable, optional): called after each epoch with its number and the runs' records,
            in the order of ``runs``.
    """
    for epoch in range(1, epochs + 1):
        order = runs if epoch % 2 == 1 else runs[::-1]
        for run in order:
            run_epoch(run, epoch, progress_for(run, epoch) if progress_for is not None else None)
        if on_epoch is not None:
            on_epoch(epoch, [run.epochs[-1] for run in runs])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
