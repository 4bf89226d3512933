"""Peak gradient memory of the standard loop vs fused_train.optim.OptimizerInBackward, on the demo's model and
a larger MLP, with the trained result checked equal.

On CPU the peak is counted exactly: the bytes of every gradient alive, sampled after each gradient is
accumulated (a hook per param) and after backward. On CUDA, torch.cuda.max_memory_allocated over one step
is reported too.

    python benchmarks/bench_in_backward.py [--device cuda]
"""

from __future__ import annotations

import argparse
import copy

import torch

import fused_train
from fused_train.optim import OptimizerInBackward

MODELS = {
    "demo MLP (64-512-512-10)": (64, 512, 2, 10),
    "larger MLP (1024-4096x4-1000)": (1024, 4096, 4, 1000),
}


def _mlp(inputs, width, hidden_layers, classes):
    layers = [torch.nn.Linear(inputs, width), torch.nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def _grad_bytes(params):
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    rows = []
    for label, (inputs, width, hidden, classes) in MODELS.items():
        if quick and width > 1024:
            continue
        torch.manual_seed(0)
        model = _mlp(inputs, width, hidden, classes).to(device)
        twin = copy.deepcopy(model)
        x = torch.randn(32, inputs, device=device)
        y = torch.randint(0, classes, (32,), device=device)
        loss_fn = fused_train.nn.CrossEntropyLoss()
        params, twin_params = list(model.parameters()), list(twin.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in params)

        peaks = {"standard": 0, "in_backward": 0}
        # Registered before the stepper's hooks, so each sample sees the just-completed gradient still alive.
        hooks = [p.register_post_accumulate_grad_hook(
            lambda _: peaks.__setitem__("in_backward", max(peaks["in_backward"], _grad_bytes(params))))
            for p in params]
        stepper = OptimizerInBackward(params, fused_train.optim.AdamW, lr=1e-3)
        opt = fused_train.optim.AdamW(twin_params, lr=1e-3)
        cuda_peak = {}
        for step in range(3):
            for name, m in (("in_backward", model), ("standard", twin)):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                loss_fn(m(x), y).backward()
                if name == "standard":
                    peaks["standard"] = max(peaks["standard"], _grad_bytes(twin_params))
                    opt.step()
                    opt.zero_grad()
                if device.startswith("cuda"):
                    cuda_peak[name] = torch.cuda.max_memory_allocated() - base
        for h in hooks:
            h.remove()
        stepper.remove()
        max_diff = max((a - b).abs().max().item() for a, b in zip(params, twin_params))
        rows.append(dict(
            model=label, params_mb=param_bytes / 2**20, device=device,
            standard_grad_peak_mb=peaks["standard"] / 2**20, in_backward_grad_peak_mb=peaks["in_backward"] / 2**20,
            grad_peak_reduction=1 - peaks["in_backward"] / peaks["standard"],
            cuda_step_peak_mb_standard=cuda_peak.get("standard", 0) / 2**20 or None,
            cuda_step_peak_mb_in_backward=cuda_peak.get("in_backward", 0) / 2**20 or None,
            max_param_difference=max_diff,
        ))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for row in run(args.device):
        print(row)
