"""torch.compile (inductor, fullgraph) over fused_train's loss and optimizer step, and bf16 autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_train

from conftest import DEVICES, TOL


@pytest.mark.smoke
def test_inductor_compiles_model_and_fused_loss_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 40))
    twin = copy.deepcopy(model)
    loss_fn = fused_train.nn.CrossEntropyLoss(label_smoothing=0.1)
    compiled = torch.compile(lambda x, y: loss_fn(model(x), y), fullgraph=True)
    x, y = torch.randn(8, 16), torch.randint(0, 40, (8,))
    loss = compiled(x, y)
    loss.backward()
    ref = F.cross_entropy(twin(x), y, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_compiled_optimizer_step_is_one_graph_and_matches_eager(name):
    # Inside a compiled training step torch itself breaks the graph at loss.backward() and at
    # Optimizer.zero_grad (which torch marks as not traceable); the fused step itself traces whole.
    params = [torch.randn(33, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    cfg = dict(lr=0.01, momentum=0.9) if name != "Adam" else dict(lr=0.01)
    opt = getattr(fused_train.optim, name)(params, **cfg)
    twin_opt = getattr(fused_train.optim, name)(twins, **cfg)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for step in range(3):
        for p, q in zip(params, twins):
            g = torch.cos(torch.arange(p.numel(), dtype=torch.float32) + step).reshape(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        compiled_step()
        twin_opt.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, **TOL[torch.float32])


@pytest.mark.smoke
def test_compiled_step_records_the_grads_it_zeroed():
    # With zero_grad_in_step the kernel zeroes the grads it consumed and the step records them
    # (FusedOptimizer._zeroed_grads): that record must come out of the compiled step too, or
    # zero_grad(set_to_none=False) would write the zeros again.
    params = [torch.randn(33, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    opt = fused_train.optim.Adam(params, lr=0.01, zero_grad_in_step=True)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for step in range(2):
        for p in params:
            p.grad = torch.cos(torch.arange(p.numel(), dtype=torch.float32) + step).reshape(p.shape)
        compiled_step()
        assert all(torch.count_nonzero(p.grad) == 0 for p in params)
        versions = [p.grad._version for p in params]
        opt.zero_grad(set_to_none=False)
        assert [p.grad._version for p in params] == versions, "zero_grad wrote grads the step had zeroed"


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_fused_loss(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(device)
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 24, device=device), torch.randint(0, 10, (32,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = fused_train.nn.functional.cross_entropy(logits, y)
    loss.backward()
    with torch.autocast(device, dtype=torch.bfloat16):
        ref = F.cross_entropy(twin(x), y)  # torch's autocast upcasts the logits to fp32 for this op
    ref.backward()
    # Both compute in fp32 from the same bf16 logits and return the loss in fp32. Gradients flow back
    # through bf16 matmuls on both sides.
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_is_fp32_under_autocast_like_torch(device, dtype, reduction):
    """Under autocast torch computes cross_entropy in fp32 and returns an fp32 loss; so do we, from the same
    half-precision logits, whose gradient comes back in their own dtype."""
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device=device).to(dtype)
    y = torch.randint(0, 1000, (64,), device=device)
    y[::9] = -100
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        ours = fused_train.nn.functional.cross_entropy(ours_x, y, reduction=reduction, label_smoothing=0.1)
        ref = F.cross_entropy(ref_x, y, reduction=reduction, label_smoothing=0.1)
        with_lse = fused_train.nn.functional.cross_entropy_with_lse(ours_x, y, reduction=reduction,
                                                                    lse_square_scale=1e-3)
    assert ours.dtype == ref.dtype == torch.float32
    assert with_lse.loss.dtype == with_lse.z_loss.dtype == torch.float32
    # fp32 against fp32 (sums in another order): not one half-precision rounding apart, as before.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.rand_like(ref)
    (ours_grad,) = torch.autograd.grad(ours, ours_x, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_out)
    assert ours_grad.dtype == ref_grad.dtype == dtype
    # each side rounds its fp32 gradient once to the logits' dtype
    torch.testing.assert_close(ours_grad, ref_grad, **TOL[dtype])
    # outside autocast the loss keeps the logits' dtype, as torch's
    assert fused_train.nn.functional.cross_entropy(x, y, reduction=reduction).dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_autocast_with_grad_scaler_steps(device):
    """fp16 autocast + GradScaler at its default scale 2^16: the scaled loss's gradient reaches the logits
    finite (2^16 is inf in fp16), so the step is taken and the scale kept, as with torch's loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 100)).to(device)
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 24, device=device), torch.randint(0, 100, (32,), device=device)
    results = []
    for net, loss_fn in ((model, fused_train.nn.functional.cross_entropy), (twin, F.cross_entropy)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(device)
        with torch.autocast(device, dtype=torch.float16):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        scaler.step(opt)
        scaler.update()
        results.append((scaler.get_scale(), grads))
    (scale, grads), (ref_scale, ref_grads) = results
    assert scale == ref_scale == 2.0**16, "an inf gradient made the scaler skip the step"
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3 * 2**16)


def _compiled_autograd(compiler):
    from torch._dynamo import compiled_autograd

    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable
    return enable(compiler)


@pytest.mark.parametrize("node", ["C++ node", "Python node"])
@pytest.mark.parametrize("grad_loss", [1.0, 3.0, 4.0])
def test_retain_graph_backwards_under_compiled_autograd_match_torch(node, grad_loss):
    """Compiled autograd runs a node's backward from what the node held when it was traced: the gradient the
    forward kept must not be handed over (and scaled in place) a second time by a retain_graph backward."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 10, (64,))
    if node == "C++ node":
        fused = fused_train.nn.functional.cross_entropy
    else:  # cross_entropy_with_lse takes the Python autograd.Function
        def fused(logits, target):
            return fused_train.nn.functional.cross_entropy_with_lse(logits, target).loss

    grads = []
    for loss_fn in (fused, F.cross_entropy):
        logits = x.clone().requires_grad_()
        loss = loss_fn(logits, y) * grad_loss
        with _compiled_autograd(torch.compile(backend="eager")):
            try:
                loss.backward(retain_graph=True)
            except RuntimeError as error:  # torch 2.5: no C++ autograd functions under compiled autograd
                if "unsafe C++ autograd function" not in str(error):
                    raise
                pytest.skip(f"torch {torch.__version__} refuses C++ autograd functions under compiled autograd")
            first = logits.grad.clone()
            logits.grad.mul_(0.5)  # gradient clipping between the two backwards
            loss.backward()
        grads.append((first, logits.grad))
    (first, second), (ref_first, ref_second) = grads
    torch.testing.assert_close(first, ref_first, **TOL[torch.float32])
    torch.testing.assert_close(second, ref_second, **TOL[torch.float32])
