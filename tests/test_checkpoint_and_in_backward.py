"""Checkpoints resumed in a fresh process, and optimizer-in-backward."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_train
from fused_train.optim import OptimizerInBackward

from conftest import DEVICES, TOL

# The same training script runs uninterrupted, and interrupted by a checkpoint that a new process resumes.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, torch, fused_train
    mode, path, total, split = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    opt = fused_train.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    start = 0
    if mode == "resume":
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = split
    for step in range(start, total):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 5, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if mode == "save" and step + 1 == split:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict()}, path)
            break
    torch.save([p.detach() for p in model.parameters()], path + "." + mode)
    """
)


def _train(mode, path, total=10, split=4):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, mode, path, str(total), str(split)], check=True,
                   env=env, timeout=120)


def test_checkpoint_resumed_in_a_fresh_process_is_bit_identical(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _train("full", path)
    _train("save", path)
    _train("resume", path)
    full = torch.load(path + ".full", weights_only=True)
    resumed = torch.load(path + ".resume", weights_only=True)
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_moves_to_torch_optim_with_map_location(device, tmp_path):
    model = torch.nn.Linear(6, 3).to(device)
    opt = fused_train.optim.Adam(model.parameters(), lr=1e-2)
    torch.nn.functional.mse_loss(model(torch.randn(4, 6, device=device)), torch.zeros(4, 3, device=device)).backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    cpu_model = copy.deepcopy(model).cpu()
    torch_opt = torch.optim.Adam(cpu_model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(torch.load(tmp_path / "opt.pt", map_location="cpu", weights_only=True))
    for p, q in zip(model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(torch_opt.state[q]["exp_avg"], opt.state[p]["exp_avg"].cpu())
        assert float(torch_opt.state[q]["step"]) == 1.0


def _mlp(width=64, depth=3):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(20, width), torch.nn.ReLU()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 4))


def _grad_bytes_alive(params):
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_in_backward_equals_standard_loop_and_holds_fewer_grads(device):
    model = _mlp().to(device)
    twin = copy.deepcopy(model)
    params = list(model.parameters())
    peak = {"in_backward": 0}

    def record_peak(_):
        peak["in_backward"] = max(peak["in_backward"], _grad_bytes_alive(params))

    # Registered first, so it runs before the stepping hook of the same param (hooks fire in registration
    # order) and sees the just-completed gradient still alive.
    handles = [p.register_post_accumulate_grad_hook(record_peak) for p in params]
    stepper = OptimizerInBackward(params, fused_train.optim.AdamW, lr=1e-2)
    opt = fused_train.optim.AdamW(twin.parameters(), lr=1e-2)
    standard_peak = 0
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 20, generator=g).to(device)
        y = torch.randint(0, 4, (8,), generator=g).to(device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        standard_peak = max(standard_peak, _grad_bytes_alive(list(twin.parameters())))
        opt.step()
        opt.zero_grad()
    for handle in handles:
        handle.remove()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert all(p.grad is None for p in params), "gradients are freed as soon as they are used"
    total = sum(p.numel() * p.element_size() for p in params)
    assert standard_peak == total
    largest = max(p.numel() * p.element_size() for p in params)
    assert 0 < peak["in_backward"] <= 2 * largest < total, (peak["in_backward"], largest, total)
    assert len(stepper.state_dict()) == len(params)
    stepper.remove()


def test_optimizer_in_backward_rejects_frozen_models():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no params that require grad"):
        OptimizerInBackward(frozen.parameters(), fused_train.optim.SGD, lr=0.1)


def test_optimizer_in_backward_drops_every_grad_when_a_step_raises():
    """A step that raises mid-backward (on CUDA: the IndexError of an earlier bad target) leaves no gradient of
    the abandoned batch behind for the next backward to add to: this loop has no zero_grad."""
    model = _mlp()
    params = list(model.parameters())
    stepper = OptimizerInBackward(params, fused_train.optim.SGD, lr=0.1)
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))

    def fail():
        raise IndexError("an earlier bad target")

    stepper.optimizers[params[0]].step = fail  # the first layer's weight: its hook runs after the later layers'
    with pytest.raises(IndexError, match="an earlier bad target"):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in params)

    # The next backward's hooks see this batch's gradients alone.
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
    seen = {}
    for p in params:
        stepper.optimizers[p].step = lambda p=p: seen.__setitem__(p, p.grad.clone())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for p, g in zip(params, expected):
        torch.testing.assert_close(seen[p], g, rtol=0, atol=0)
    stepper.remove()
