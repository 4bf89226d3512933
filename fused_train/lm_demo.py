"""``fused-train demo --task lm``: a small causal language model trained on real text that every machine
already has (the Python standard library's own sources), its last layer and loss through
:func:`fused_train.nn.functional.linear_cross_entropy` and a fused_train optimizer; with ``--compare`` beside the
same model, seed and batches through ``linear`` + :class:`torch.nn.CrossEntropyLoss` and torch.optim.

The loop is the standard one: zero_grad, forward, loss, backward, step, with a validation loss on held-out text
every ``eval_every`` steps. Everything it runs is here; fused_train/cli.py parses the flags and prints.
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import sysconfig
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import nn as fused_nn
from .benchmarking import peak_memory, reset_peak_memory
from .demo import OPTIMIZERS

# Identifiers and words, numbers, single punctuation marks, line breaks: a vocabulary of source-code tokens.
_TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]|\n")
UNKNOWN = 0


@dataclass
class TextData:
    """Token ids of the training and validation text and the vocabulary (id 0: any token outside it)."""

    train: Tensor
    validation: Tensor
    vocabulary: list[str]
    description: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)


def load_stdlib_text(vocab_size: int = 8192, max_bytes: int = 3 << 20) -> TextData:
    """The first ``max_bytes`` of the standard library's top-level ``.py`` files (sorted by name, so every
    machine with the same Python reads the same text), tokenized; the last tenth is the validation text."""
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))
    parts, size = [], 0
    for name in names:
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    tokens = _TOKEN.findall("".join(parts)[:max_bytes])
    counts = collections.Counter(tokens)
    vocabulary = ["<unk>"] + [t for t, _ in counts.most_common(vocab_size - 1)]
    index = {t: i for i, t in enumerate(vocabulary)}
    ids = torch.tensor([index.get(t, UNKNOWN) for t in tokens], dtype=torch.long)
    split = len(ids) * 9 // 10
    description = (f"Python {sysconfig.get_python_version()} standard library sources ({len(parts)} files, "
                   f"{len(ids):,} tokens, vocabulary {len(vocabulary):,})")
    return TextData(ids[:split], ids[split:], vocabulary, description)


class TinyCausalLM(nn.Module):
    """Token and position embeddings, pre-norm transformer layers with a causal mask, a final LayerNorm; the
    output head is the token embedding (tied weights), applied by the loss. ``forward`` returns the hidden
    states (B, T, d_model)."""

    def __init__(self, vocab_size: int, context: int, d_model: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        return self.norm(self.layers(h, mask=mask, is_causal=True))


def lm_loss(implementation: str):
    """The head + loss of one implementation: ``loss(hidden, head_weight, targets)``."""
    if implementation == "fused_train":
        def fused(hidden, weight, targets):
            return fused_nn.functional.linear_cross_entropy(hidden, weight, targets)
        return fused
    cross_entropy = nn.CrossEntropyLoss()

    def stock(hidden, weight, targets):
        logits = nn.functional.linear(hidden, weight)
        return cross_entropy(logits.flatten(0, 1), targets.flatten())
    return stock


def batches(ids: Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Random windows of context + 1 tokens: inputs are the first context, targets the last (shifted by one)."""
    while True:
        starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
        window = torch.stack([ids[s:s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@dataclass
class LMRun:
    implementation: str
    model: TinyCausalLM
    optimizer: torch.optim.Optimizer
    loss: object
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def optimizer_name(self) -> str:
        return f"{type(self.optimizer).__module__.split('.')[0]}.optim.{type(self.optimizer).__name__}"


def prepare_lm_runs(data: TextData, *, implementations, optimizer: str, lr: float, context: int, seed: int,
                    device: torch.device) -> list[LMRun]:
    runs = []
    for implementation in implementations:
        torch.manual_seed(seed)  # the same initial weights for every implementation
        model = TinyCausalLM(data.vocab_size, context).to(device)
        fused_class, torch_class, _ = OPTIMIZERS[optimizer]
        opt_class = fused_class if implementation == "fused_train" else torch_class
        runs.append(LMRun(implementation, model, opt_class(model.parameters(), lr=lr), lm_loss(implementation)))
    return runs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(measure, device: torch.device) -> int:
    """measure(device) (fused_train.benchmarking's reset_peak_memory or peak_memory), or -1 where it cannot
    be measured (no /proc: not Linux)."""
    try:
        return measure(device)
    except OSError:
        return -1


@torch.no_grad()
def validation_loss(run: LMRun, data: TextData, batch_size: int, context: int, device: torch.device) -> float:
    """Mean loss over fixed non-overlapping windows of the validation text (the same for every run)."""
    run.model.eval()
    windows = data.validation[: (len(data.validation) - 1) // context * context + 1]
    inputs = windows[:-1].view(-1, context)[: 4 * batch_size].to(device)
    targets = windows[1:].view(-1, context)[: 4 * batch_size].to(device)
    losses = [run.loss(run.model(x), run.model.embed.weight, y).item()
              for x, y in zip(inputs.split(batch_size), targets.split(batch_size))]
    run.model.train()
    return statistics.fmean(losses)


def train_lm(run: LMRun, data: TextData, *, steps: int, batch_size: int, context: int, seed: int,
             device: torch.device, eval_every: int, on_eval=None) -> None:
    """The standard loop for ``steps`` steps on batches drawn from ``seed``; peak memory measured over them
    (on CPU the process's peak resident memory above what it held before, from /proc)."""
    generator = torch.Generator().manual_seed(seed)
    stream = batches(data.train, batch_size, context, generator)
    model, optimizer = run.model, run.optimizer
    before = _memory(reset_peak_memory, device)
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in next(stream))
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = run.loss(model(x), model.embed.weight, y)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        run.step_seconds.append(time.perf_counter() - start)
        run.train_losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            peak = _memory(peak_memory, device)
            run.val_losses.append((step, validation_loss(run, data, batch_size, context, device)))
            if on_eval is not None:
                on_eval(run, step)
            if before >= 0 and peak >= 0:
                run.peak_mib = max(run.peak_mib, (peak - before) / 2**20)
            before = _memory(reset_peak_memory, device)  # the validation's own memory is not the step's


def warm_up_lm(run: LMRun, data: TextData, batch_size: int, context: int, device: torch.device) -> None:
    """Three steps on a throwaway copy, so that one-time costs (thread pools, allocator growth, GEMM buffers)
    are paid before anything is timed or measured."""
    import copy

    model = copy.deepcopy(run.model)
    optimizer = type(run.optimizer)(model.parameters(), lr=run.optimizer.defaults["lr"])
    stream = batches(data.train, batch_size, context, torch.Generator().manual_seed(12345))
    for _ in range(3):
        x, y = (t.to(device) for t in next(stream))
        optimizer.zero_grad(set_to_none=False)
        run.loss(model(x), model.embed.weight, y).backward()
        optimizer.step()
