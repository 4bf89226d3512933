"""fused_train.optim against torch.optim: parity over many steps, state, checkpoints, schedulers, AMP,
gradient zeroing, layouts and ops."""

import copy
import io
import pickle

import pytest
import torch

import fused_train
from fused_train.reference import LowPrecisionOptimizerReference, torch_optimizer

from conftest import DEVICES, TOL, assert_close_scaled

# Odd sizes: not a multiple of any vector width, one element, empty, and one spanning many CPU chunks.
SHAPES = [(17,), (3, 5), (1,), (0,), (278011,)]

CONFIGS = {
    "SGD": [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
        dict(lr=0.05, momentum=0.5, maximize=True),
    ],
    "Adam": [
        dict(),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.01, amsgrad=True),
        dict(lr=0.01, maximize=True, weight_decay=0.05),
        dict(lr=0.01, betas=(0.3, 0.4), eps=1e-6),  # lerp's large-weight branch
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True),
    ],
    "AdamW": [dict(), dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True)],
    "RMSprop": [
        dict(),
        dict(lr=0.001, centered=True),
        dict(lr=0.001, momentum=0.9),
        dict(lr=0.001, centered=True, momentum=0.9, weight_decay=0.1),
        dict(lr=0.001, alpha=0.3, centered=True),  # lerp's large-weight branch
        dict(lr=0.001, maximize=True),
    ],
}
CASES = [(name, cfg) for name, cfgs in CONFIGS.items() for cfg in cfgs]
CASE_IDS = [f"{name}-{i}" for name, cfgs in CONFIGS.items() for i in range(len(cfgs))]


def make_params(device, dtype, shapes=SHAPES):
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def set_grads(params, step, dtype=None):
    # Deterministic, step-dependent, sign-changing gradients with a wide dynamic range. They depend on the
    # position, not on the param's value: value-dependent gradients would feed each step's last-ulp rounding
    # differences (torch's CPU ops fuse a*b+c, ours don't) back into the next gradient and amplify them.
    for i, p in enumerate(params):
        position = torch.arange(p.numel(), device=p.device, dtype=torch.float32).reshape(p.shape)
        g = torch.sin(position * (1.7 + 0.3 * i) + step) * (1.0 + i) + 0.01 * step
        p.grad = g.to(dtype or p.dtype)


def fused_and_torch(name, params, cfg):
    fused_params = [p.clone().requires_grad_(True) for p in params]
    torch_params = [p.clone().requires_grad_(True) for p in params]
    return (
        fused_params,
        getattr(fused_train.optim, name)(fused_params, **cfg),
        torch_params,
        torch_optimizer(name)(torch_params, **cfg),
    )


def assert_state_close(fused_opt, torch_opt, fused_params, torch_params, dtype):
    for fp, tp in zip(fused_params, torch_params):
        fs, ts = fused_opt.state[fp], torch_opt.state[tp]
        assert set(fs) == set(ts), (set(fs), set(ts))
        for key in ts:
            if key == "step":
                assert float(fs[key]) == float(ts[key])
            else:
                assert_close_scaled(fs[key], ts[key].to(fs[key].dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.smoke), torch.float64])
@pytest.mark.parametrize("name,cfg", CASES, ids=CASE_IDS)
def test_parity_with_torch_optim(name, cfg, dtype, device):
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch(name, make_params(device, dtype), cfg)
    for step in range(12):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        fused_opt.step()
        torch_opt.step()
    for fp, tp in zip(fused_params, torch_params):
        torch.testing.assert_close(fp, tp, **TOL[dtype])
    assert_state_close(fused_opt, torch_opt, fused_params, torch_params, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.smoke), torch.float16])
@pytest.mark.parametrize("name,cfg", CASES, ids=CASE_IDS)
def test_low_precision_matches_fp32_math_rounded_once(name, cfg, dtype, device):
    params = make_params(device, dtype, shapes=[(17,), (3, 5), (4099,)])
    fused_params = [p.clone().requires_grad_(True) for p in params]
    ref_params = [p.clone() for p in params]
    fused_opt = getattr(fused_train.optim, name)(fused_params, **cfg)
    ref = LowPrecisionOptimizerReference(ref_params, torch_optimizer(name), **cfg)
    for step in range(6):
        set_grads(fused_params, step)
        set_grads(ref_params, step)
        fused_opt.step()
        ref.step()
    for fp, rp in zip(fused_params, ref_params):
        # Same fp32 math and one rounding per step on both sides; the tolerance covers a one-ulp difference
        # in the rounded param when the fp32 results straddle a rounding boundary.
        torch.testing.assert_close(fp, rp, **TOL[dtype])
    for fp, wp in zip(fused_params, ref.widened):
        for key, value in ref.optimizer.state[wp].items():
            state = fused_opt.state[fp][key]
            if key == "step":
                assert float(state) == float(value)
            else:
                assert state.dtype == torch.float32, "state of low-precision params is kept in fp32"
                torch.testing.assert_close(state, value, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_tracks_torch_optim_loosely(device):
    # Against torch.optim on bf16 params directly (bf16 state, rounding after every op) the two differ by
    # accumulated bf16 roundings; both must stay within a few bf16 ulps of each other over a short run.
    params = make_params(device, torch.bfloat16, shapes=[(1000,)])
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch("Adam", params, dict(lr=1e-3))
    for step in range(5):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        fused_opt.step()
        torch_opt.step()
    torch.testing.assert_close(fused_params[0].float(), torch_params[0].float(), rtol=3e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop"])
def test_param_groups_and_params_without_grad(name, device):
    a, b, c = (torch.randn(7, 3, device=device) for _ in range(3))
    cfg = dict(lr=0.01, momentum=0.9) if name != "Adam" else dict(lr=0.01)
    groups = lambda ps: [{"params": [ps[0], ps[1]]}, {"params": [ps[2]], "lr": 0.1}]  # noqa: E731
    fused_params = [t.clone().requires_grad_(True) for t in (a, b, c)]
    torch_params = [t.clone().requires_grad_(True) for t in (a, b, c)]
    fused_opt = getattr(fused_train.optim, name)(groups(fused_params), **cfg)
    torch_opt = torch_optimizer(name)(groups(torch_params), **cfg)
    for step in range(4):
        # params[1] gets no gradient in the first two steps: skipped, and no state is created for it.
        with_grad = [0, 2] if step < 2 else [0, 1, 2]
        for ps in (fused_params, torch_params):
            for i, p in enumerate(ps):
                p.grad = None
            set_grads([ps[i] for i in with_grad], step)
        if step == 1:
            assert len(fused_opt.state[fused_params[1]]) == len(torch_opt.state[torch_params[1]]) == 0
        fused_opt.step()
        torch_opt.step()
    for fp, tp in zip(fused_params, torch_params):
        torch.testing.assert_close(fp, tp, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_non_contiguous_and_mixed_dtype_params(name, device):
    base = torch.randn(40, 30, device=device)
    transposed = base.clone().t()  # dense but not contiguous
    sliced = torch.randn(40, 30, device=device)[:, ::3]  # not dense: runs on a working copy
    half = torch.randn(33, device=device, dtype=torch.float16)
    cfg = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    fused_params = [t.clone().requires_grad_(True) for t in (transposed, sliced)]
    torch_params = [t.clone().requires_grad_(True) for t in (transposed, sliced)]
    # clone() of a strided view keeps its strides only for dense layouts; rebuild the sliced view.
    fused_params[1] = torch.randn(40, 30, device=device)[:, ::3].copy_(sliced).requires_grad_(True)
    torch_params[1] = torch.randn(40, 30, device=device)[:, ::3].copy_(sliced).requires_grad_(True)
    assert not fused_params[0].is_contiguous() and not fused_params[1].is_contiguous()
    fused_half = half.clone().requires_grad_(True)
    fused_opt = getattr(fused_train.optim, name)(fused_params + [fused_half], **cfg)
    torch_opt = torch_optimizer(name)(torch_params, **cfg)
    ref_half = half.clone()
    ref = LowPrecisionOptimizerReference([ref_half], torch_optimizer(name), **cfg)
    for step in range(5):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        set_grads([fused_half], step)
        set_grads([ref_half], step)
        fused_opt.step()
        torch_opt.step()
        ref.step()
    for fp, tp in zip(fused_params, torch_params):
        torch.testing.assert_close(fp, tp, **TOL[torch.float32])
    torch.testing.assert_close(fused_half, ref_half, **TOL[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_tensors(device):
    # More tensors than one CUDA launch's metadata holds, so the launcher must split calls.
    params = [torch.randn(i % 7 + 1, device=device) for i in range(700)]
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch("Adam", params, dict(lr=0.01))
    for step in range(3):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        fused_opt.step()
        torch_opt.step()
    for fp, tp in zip(fused_params, torch_params):
        torch.testing.assert_close(fp, tp, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_complex_params_step_like_torch(device):
    p = torch.randn(11, dtype=torch.complex64, device=device)
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch("Adam", [p], dict(lr=0.01))
    for step in range(4):
        g = torch.randn(11, dtype=torch.complex64, device=device)
        fused_params[0].grad = g.clone()
        torch_params[0].grad = g.clone()
        fused_opt.step()
        torch_opt.step()
    torch.testing.assert_close(fused_params[0], torch_params[0], **TOL[torch.float32])
    assert fused_opt.state[fused_params[0]]["exp_avg"].dtype == torch.complex64


# ------------------------------------------------------------------------------------------------------
# Checkpoints, schedulers, closures


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,cfg", [("Adam", dict(lr=0.01, amsgrad=True)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                      ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5))])
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_moves_between_torch_and_fused(name, cfg, direction, device):
    params = make_params(device, torch.float32, shapes=[(31,), (4, 4)])
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch(name, params, cfg)
    src_opt, src_params = (torch_opt, torch_params) if direction == "torch_to_fused" else (fused_opt, fused_params)
    for step in range(3):
        set_grads(src_params, step)
        src_opt.step()
    # Serialize through bytes, as a checkpoint would.
    buffer = io.BytesIO()
    torch.save(src_opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    dst_params = [p.detach().clone().requires_grad_(True) for p in src_params]
    dst_cls = getattr(fused_train.optim if direction == "torch_to_fused" else torch.optim, name)
    dst_opt = dst_cls(dst_params, **cfg)
    dst_opt.load_state_dict(saved)
    for step in range(3, 6):
        set_grads(src_params, step)
        set_grads(dst_params, step)
        src_opt.step()
        dst_opt.step()
    for sp, dp in zip(src_params, dst_params):
        torch.testing.assert_close(sp, dp, **TOL[torch.float32])
    assert set(dst_opt.state_dict()["state"][0]) == set(src_opt.state_dict()["state"][0])


def test_state_dict_keeps_fp32_state_for_bf16_params():
    p = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = fused_train.optim.Adam([p], lr=0.01)
    set_grads([p], 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    exp_avg = saved["state"][0]["exp_avg"]
    assert exp_avg.dtype == torch.float32
    q = p.detach().clone().requires_grad_(True)
    opt2 = fused_train.optim.Adam([q], lr=0.01)
    opt2.load_state_dict(saved)
    # torch.optim would cast this to bf16 on load; fused_train keeps the fp32 values bit for bit.
    assert torch.equal(opt2.state[q]["exp_avg"], exp_avg)
    assert opt2.state[q]["step"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,cfg,make_scheduler",
    [
        ("SGD", dict(lr=0.1, momentum=0.9), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)),
        ("Adam", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10)),
        ("RMSprop", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)),
    ],
)
def test_lr_schedulers(name, cfg, make_scheduler, device):
    params = make_params(device, torch.float32, shapes=[(19,)])
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch(name, params, cfg)
    fused_sched, torch_sched = make_scheduler(fused_opt), make_scheduler(torch_opt)
    for step in range(8):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        fused_opt.step()
        torch_opt.step()
        fused_sched.step()
        torch_sched.step()
    assert fused_opt.param_groups[0]["lr"] == pytest.approx(torch_opt.param_groups[0]["lr"])
    torch.testing.assert_close(fused_params[0], torch_params[0], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr(device):
    params = make_params(device, torch.float32, shapes=[(23,)])
    fused_params, fused_opt, torch_params, torch_opt = fused_and_torch("Adam", params, dict(lr=torch.tensor(0.01)))
    for step in range(4):
        set_grads(fused_params, step)
        set_grads(torch_params, step)
        fused_opt.step()
        torch_opt.step()
        for opt in (fused_opt, torch_opt):
            opt.param_groups[0]["lr"].mul_(0.5)  # an in-place schedule on the tensor
    torch.testing.assert_close(fused_params[0], torch_params[0], **TOL[torch.float32])


def test_closure_is_called_and_loss_returned():
    w = torch.randn(5, requires_grad=True)
    opt = fused_train.optim.SGD([w], lr=0.1)
    x = torch.randn(5)

    def closure():
        opt.zero_grad()
        loss = (w * x).sum() ** 2
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert not torch.equal(before, w.detach())


# ------------------------------------------------------------------------------------------------------
# Gradient zeroing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_zero_grad_in_step_zeroes_consumed_grads(name, device):
    p = torch.randn(100, device=device, requires_grad=True)
    opt = getattr(fused_train.optim, name)([p], lr=0.01, zero_grad_in_step=True)
    set_grads([p], 0)
    opt.step()
    assert p.grad is not None and torch.count_nonzero(p.grad) == 0


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_auto_zeroing_follows_set_to_none(device):
    p = torch.randn(100, device=device, requires_grad=True)
    opt = fused_train.optim.Adam([p], lr=0.01)
    set_grads([p], 0)
    opt.step()
    assert torch.count_nonzero(p.grad) > 0, "before any zero_grad(set_to_none=False), grads are left as they are"
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(p.grad) == 0
    p.grad.add_(1.0)
    opt.step()
    assert torch.count_nonzero(p.grad) == 0, "after zero_grad(set_to_none=False) the step zeroes in its kernel"
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.count_nonzero(p.grad) == 0
    opt.zero_grad()  # set_to_none=True: dropped, and later steps stop zeroing
    assert p.grad is None
    set_grads([p], 1)
    opt.step()
    assert torch.count_nonzero(p.grad) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_rezeroes_grads_written_after_the_step(device):
    p = torch.randn(10, device=device, requires_grad=True)
    opt = fused_train.optim.SGD([p], lr=0.1, zero_grad_in_step=True)
    set_grads([p], 0)
    opt.step()
    (p * 2).sum().backward()  # accumulates into the zeroed grad after the step
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_standard_loop_with_gradient_accumulation_matches_torch(set_to_none, device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(device)
    twin = copy.deepcopy(model)
    fused_opt = fused_train.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x, y = torch.randn(12, 8, device=device), torch.randint(0, 3, (12,), device=device)
    for _ in range(5):
        for m, opt in ((model, fused_opt), (twin, torch_opt)):
            for half in (slice(0, 6), slice(6, 12)):  # two micro-batches per step
                torch.nn.functional.cross_entropy(m(x[half]), y[half]).backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------
# AMP: GradScaler hands grad_scale/found_inf to the kernel


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_grad_scaler_unscales_in_kernel_and_skips_on_inf(name, device):
    torch.manual_seed(2)
    model = torch.nn.Linear(6, 4).to(device)
    twin = copy.deepcopy(model)
    cfg = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    fused_opt = getattr(fused_train.optim, name)(model.parameters(), **cfg)
    torch_opt = torch_optimizer(name)(twin.parameters(), **cfg)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10) for _ in range(2)]
    x = torch.randn(5, 6, device=device)
    for step in range(4):
        for m, opt, scaler in ((model, fused_opt, scalers[0]), (twin, torch_opt, scalers[1])):
            opt.zero_grad()
            loss = m(x).square().mean()
            scaler.scale(loss).backward()
            if step == 2:
                next(m.parameters()).grad[0, 0] = float("inf")
            if step == 2 and opt is fused_opt:
                before = [p.detach().clone() for p in m.parameters()]
                state_before = copy.deepcopy(opt.state_dict())
            scaler.step(opt)
            scaler.update()
            if step == 2 and opt is fused_opt:
                for b, p in zip(before, m.parameters()):
                    assert torch.equal(b, p), "a step with inf grads must leave params untouched"
                after = opt.state_dict()
                for k, st in state_before["state"].items():
                    for key, value in st.items():
                        assert torch.equal(value, after["state"][k][key]), f"state {key} changed on skip"
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------
# Argument policy and bad input


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("SGD", dict(lr=-1.0), "Invalid learning rate: -1.0"),
        ("SGD", dict(momentum=-1.0), "Invalid momentum value: -1.0"),
        ("SGD", dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
        ("Adam", dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
        ("Adam", dict(eps=-1e-3), "Invalid epsilon value: -0.001"),
        ("AdamW", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        ("RMSprop", dict(alpha=-0.5), "Invalid alpha value: -0.5"),
        ("Adam", dict(foreach=True), "foreach=True"),
        ("Adam", dict(fused=False), "fused=False"),
        ("SGD", dict(differentiable=True), "differentiable=True"),
        ("Adam", dict(zero_grad_in_step="yes"), "zero_grad_in_step"),
    ],
)
def test_invalid_arguments_raise_like_torch(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        getattr(fused_train.optim, name)([torch.zeros(1, requires_grad=True)], **kwargs)


def test_empty_param_list_raises_like_torch():
    with pytest.raises(ValueError, match="empty parameter list"):
        fused_train.optim.Adam([])


def test_rmsprop_alias():
    assert fused_train.optim.RMSProp is fused_train.optim.RMSprop


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(params, opt, snapshot):
    before_params, before_state = snapshot
    for b, p in zip(before_params, params):
        assert torch.equal(b, p)
    after = opt.state_dict()
    for k, st in before_state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after["state"][k][key])


def test_sparse_grad_raises_and_leaves_state_untouched():
    dense = torch.randn(4, requires_grad=True)
    other = torch.randn(4, requires_grad=True)
    opt = fused_train.optim.Adam([{"params": [other]}, {"params": [dense]}], lr=0.1)
    set_grads([dense, other], 0)
    opt.step()
    snap = _snapshot([dense, other], opt)
    dense.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (4,))
    other.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    _assert_unchanged([dense, other], opt, snap)


def test_unsupported_dtype_raises_before_any_group_steps():
    good = torch.randn(4, requires_grad=True)
    bad = torch.randn(4, dtype=torch.complex32, requires_grad=True) if hasattr(torch, "complex32") else None
    opt = fused_train.optim.SGD([{"params": [good]}, {"params": [bad]}], lr=0.1)
    set_grads([good], 0)
    bad.grad = torch.ones(4, dtype=torch.complex32)
    snap = _snapshot([good], opt)
    with pytest.raises(TypeError, match="complex64 and complex128"):
        opt.step()
    _assert_unchanged([good], opt, snap)


def test_op_checks_name_the_argument():
    p, g = torch.randn(3), torch.randn(4)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4\] but its param has shape \[3\]"):
        torch.ops.fused_train.sgd_step_([p], [g], [], [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                        nesterov=False, maximize=False, is_first_step=False, zero_grad=False)
    with pytest.raises(RuntimeError, match="got 1 params but 0 exp_avg_sqs"):
        torch.ops.fused_train.adam_step_([p], [p.clone()], [p.clone()], [], [], [torch.zeros(())], lr=0.1,
                                         beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                         maximize=False, decoupled_weight_decay=False, zero_grad=False)
    half = torch.randn(3, dtype=torch.half)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must be a Float tensor"):
        torch.ops.fused_train.adam_step_([half], [half.clone()], [half.clone()], [half.clone()], [],
                                         [torch.zeros(())], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
                                         eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                                         zero_grad=False)
    assert torch.equal(half, half)  # reached: nothing crashed


# ------------------------------------------------------------------------------------------------------
# Ops: schema, fake kernels and torch.compile


def _op_samples(device):
    def lists(n=3, dtype=torch.float32, state_dtype=torch.float32):
        return [torch.randn(5 + i, device=device, dtype=dtype) for i in range(n)]

    p, g = lists(), lists()
    sizes = [t.shape for t in p]
    zeros = lambda: [torch.zeros(s, device=device) for s in sizes]  # noqa: E731
    steps = lambda: [torch.zeros((), device=device) for _ in sizes]  # noqa: E731
    bf16 = lambda: [t.to(torch.bfloat16) for t in lists()]  # noqa: E731
    seeds = lambda: [torch.tensor(i, dtype=torch.int64, device=device) for i in range(3)]  # noqa: E731
    return [
        (torch.ops.fused_train.sgd_step_.default, (p, g, zeros(), []),
         dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
              is_first_step=True, zero_grad=True)),
        # bf16 stochastic rounding: SGD's steps are its counters
        (torch.ops.fused_train.sgd_step_.default, (bf16(), bf16(), zeros(), steps()),
         dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
              is_first_step=False, zero_grad=True, rounding_seeds=seeds())),
        (torch.ops.fused_train.adam_step_.default, (bf16(), bf16(), zeros(), zeros(), [], steps()),
         dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
              decoupled_weight_decay=True, zero_grad=True, rounding_seeds=seeds())),
        (torch.ops.fused_train.adam_step_.default, (lists(), lists(), zeros(), zeros(), zeros(), steps()),
         dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.01, eps=1e-8, amsgrad=True, maximize=False,
              decoupled_weight_decay=True, zero_grad=False,
              grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(0.0, device=device))),
        (torch.ops.fused_train.rmsprop_step_.default, (lists(), lists(), zeros(), zeros(), zeros(), steps()),
         dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.5, centered=True, maximize=False,
              zero_grad=True, lr_tensor=torch.tensor(0.01, device=device))),
        (torch.ops.fused_train.rmsprop_step_.default, (bf16(), bf16(), zeros(), [], zeros(), steps()),
         dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.5, centered=False, maximize=False,
              zero_grad=True, rounding_seeds=seeds())),
    ]


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_optimizer_op(device):
    for op, args, kwargs in _op_samples(device):
        torch.library.opcheck(op, args, kwargs)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(3)
    model = torch.nn.Linear(8, 4)
    twin = copy.deepcopy(model)
    opt = fused_train.optim.Adam(model.parameters(), lr=0.01)
    twin_opt = fused_train.optim.Adam(twin.parameters(), lr=0.01)
    x = torch.randn(16, 8)

    def train_step(m, o):
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(train_step)
    for _ in range(3):
        compiled(model, opt)
        train_step(twin, twin_opt)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_fp16_params_with_grad_scaler(name, device):
    # torch's unfused optimizers cannot take fp16 grads through GradScaler (unscale_ refuses them); the
    # fused kernels unscale in fp32 inside the step. Reference: fp32 math on the unscaled grads.
    torch.manual_seed(4)
    params = [torch.randn(37, device=device, dtype=torch.float16) for _ in range(2)]
    fused_params = [p.clone().requires_grad_(True) for p in params]
    ref_params = [p.clone() for p in params]
    cfg = dict(lr=0.01, momentum=0.9) if name in ("SGD", "RMSprop") else dict(lr=0.01)
    opt = getattr(fused_train.optim, name)(fused_params, **cfg)
    ref = LowPrecisionOptimizerReference(ref_params, torch_optimizer(name), **cfg)
    scaler = torch.amp.GradScaler(device, init_scale=256.0, growth_interval=1000)
    for step in range(4):
        loss = sum((p.float() * torch.cos(p.float() + step)).sum() for p in fused_params)
        scaler.scale(loss).backward()
        if step == 2:
            fused_params[0].grad[3] = float("inf")
        for fp, rp in zip(fused_params, ref_params):
            rp.grad = (fp.grad.float() / scaler.get_scale()).half()
        before = [p.detach().clone() for p in fused_params]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            for b, p in zip(before, fused_params):
                assert torch.equal(b, p)
        else:
            ref.step()
        opt.zero_grad()
    assert scaler.get_scale() == 128.0  # halved once, by the inf step
    for fp, rp in zip(fused_params, ref_params):
        torch.testing.assert_close(fp, rp, **TOL[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_still_zeroes_grads_it_was_to_zero(device):
    # A found_inf skip leaves params and state alone, but when the step owns grad zeroing the grads are
    # zeroed anyway, so zero_grad(set_to_none=False) may trust its record of zeroed grads.
    p = torch.randn(9, device=device, requires_grad=True)
    opt = fused_train.optim.Adam([p], lr=0.1, zero_grad_in_step=True)
    opt.grad_scale = torch.tensor(2.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    p.grad = torch.full_like(p, float("inf"))
    before = p.detach().clone()
    opt.step()
    assert torch.equal(before, p) and float(opt.state[p]["step"]) == 0.0
    assert torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop"])
def test_fused_optimizers_are_instances_of_the_torch_classes_they_replace(name):
    # Libraries branch on torch's classes (accelerate maps an AdamW to DeepSpeed's CPUAdam with decoupled
    # decay only when isinstance(opt, torch.optim.AdamW)); only the class identity may come from torch.
    opt = getattr(fused_train.optim, name)([torch.zeros(3, requires_grad=True)], lr=0.1)
    assert isinstance(opt, getattr(torch.optim, name))
    for method in ("__init__", "__setstate__", "step", "_init_group", "zero_grad", "load_state_dict"):
        owner = next(c for c in type(opt).__mro__ if method in vars(c))
        assert owner.__module__.startswith("fused_train."), (method, owner)
    with pytest.raises(NotImplementedError, match="_init_group"):
        opt._init_group()
    restored = pickle.loads(pickle.dumps(opt))
    assert type(restored) is type(opt) and restored.param_groups[0]["lr"] == 0.1
