"""The README's bad-input table, row by row: each bad call raises a Python exception that names the argument and
what was expected, and leaves the model's params and grads and the optimizer's state as they were."""

import copy

import pytest
import torch

import fused_train
from fused_train.nn.functional import cross_entropy

from conftest import DEVICES, HAS_CUDA


def _trained_setup(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4).to(device)
    opt = fused_train.optim.Adam(model.parameters(), lr=0.1, amsgrad=True)
    x = torch.randn(6, 5, device=device)
    y = torch.randint(0, 4, (6,), device=device)
    cross_entropy(model(x), y).backward()
    opt.step()
    cross_entropy(model(x), y).backward()  # grads present for the bad call to (not) touch
    return model, opt, x, y


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
    )


def _assert_untouched(model, opt, snapshot):
    params, grads, state = snapshot
    for before, p in zip(params, model.parameters()):
        assert torch.equal(before, p), "a param changed"
    for before, p in zip(grads, model.parameters()):
        assert (before is None and p.grad is None) or torch.equal(before, p.grad), "a grad changed"
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, st in state["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after["state"][k][key]), f"optimizer state {key} changed"


# (README row, bad call on (model, opt, x, y), exception, message)
LOSS_ROWS = [
    ("target out of range", lambda m, o, x, y: cross_entropy(m(x), torch.full_like(y, 4)), IndexError,
     r"target 4 at position 0 is out of bounds: expected 0 <= target < 4"),
    ("negative target (not ignore_index)", lambda m, o, x, y: cross_entropy(m(x), torch.full_like(y, -3)),
     IndexError, "out of bounds"),
    ("target batch shape differs", lambda m, o, x, y: cross_entropy(m(x), y[:5]), ValueError,
     "target has 5 rows but input has 6"),
    ("probability target shape differs", lambda m, o, x, y: cross_entropy(m(x), torch.rand(6, 3)), ValueError,
     "probability target has shape"),
    ("weight of the wrong size", lambda m, o, x, y: cross_entropy(m(x), y, weight=torch.ones(3)), ValueError,
     "weight must have one entry per class"),
    ("weight of the wrong dtype", lambda m, o, x, y: cross_entropy(m(x), y, weight=torch.ones(4, dtype=torch.long)),
     TypeError, "weight"),
    ("invalid reduction", lambda m, o, x, y: cross_entropy(m(x), y, reduction="avg"), ValueError,
     "reduction must be 'none', 'mean' or 'sum'"),
    ("label smoothing outside [0, 1]", lambda m, o, x, y: cross_entropy(m(x), y, label_smoothing=-0.1), ValueError,
     "label_smoothing must be in"),
    ("target not a tensor", lambda m, o, x, y: cross_entropy(m(x), y.tolist()), TypeError,
     "target must be a Tensor, got list"),
    ("weight not a tensor", lambda m, o, x, y: cross_entropy(m(x), y, weight=[1.0] * 4), TypeError,
     "weight must be a Tensor, got list"),
    ("ignore_index not an int", lambda m, o, x, y: cross_entropy(m(x), y, ignore_index=1.5), TypeError,
     "ignore_index must be an int, got float"),
    ("label smoothing not a number", lambda m, o, x, y: cross_entropy(m(x), y, label_smoothing="0.1"), TypeError,
     "label_smoothing must be a float, got str"),
    ("label smoothing a tensor that is not 0-dim", lambda m, o, x, y: cross_entropy(m(x), y,
     label_smoothing=torch.full((2,), 0.1)), TypeError, "label_smoothing must be a float or a 0-dim tensor"),
    ("class-index target of a float-free dtype", lambda m, o, x, y: cross_entropy(m(x), y.to(torch.uint8)),
     TypeError, "int64 or int32"),
]


@pytest.mark.parametrize("row,call,error,match", LOSS_ROWS, ids=[r[0] for r in LOSS_ROWS])
def test_bad_loss_input(row, call, error, match):
    model, opt, x, y = _trained_setup()
    snap = _snapshot(model, opt)
    with pytest.raises(error, match=match):
        call(model, opt, x, y)
    _assert_untouched(model, opt, snap)


def _set_sparse_grad(model):
    weight = model.weight
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), weight.shape)


def _set_double_grad_past_torchs_check(model):
    model.weight.grad_dtype = None  # torch ≥ 2.10 lets a param opt out of its grad dtype check
    model.weight.grad = model.weight.grad.double()


OPTIMIZER_ROWS = [
    ("sparse grads", _set_sparse_grad, RuntimeError, "does not support sparse gradients"),
    # torch's own message; "... with grad_dtype 'Float'" from torch 2.10 on, "... with dtype 'float'" before
    ("grad dtype differs from its param", lambda m: setattr(m.weight, "grad", m.weight.grad.double()),
     RuntimeError, "assign a gradient with dtype 'double' to a tensor with"),
    ("grad dtype differs, torch's check lifted (grad_dtype=None)", _set_double_grad_past_torchs_check,
     TypeError, r"adam_step_: grads\[0\] is Double but its param is Float"),
    ("grad shape differs from its param", lambda m: setattr(m.weight, "grad", m.weight.grad[:2]),
     RuntimeError, r"assign a gradient of size '\[2, 5\]' to a tensor of size '\[4, 5\]'"),
]


@pytest.mark.parametrize("row,corrupt,error,match", OPTIMIZER_ROWS, ids=[r[0] for r in OPTIMIZER_ROWS])
def test_bad_optimizer_input(row, corrupt, error, match):
    if "grad_dtype" in row and not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("Tensor.grad_dtype is new in torch 2.10: before it no grad of another dtype gets past torch")
    model, opt, x, y = _trained_setup()
    snap = _snapshot(model, opt)
    with pytest.raises(error, match=match):
        corrupt(model)
        opt.step()
    if row.startswith("sparse") or "grad_dtype" in row:
        # the replaced grad was the caller's doing; compare everything else
        model.weight.grad = None
        model.weight.grad_dtype = torch.float32
        model.weight.grad = snap[1][0].clone()
    _assert_untouched(model, opt, snap)


def test_op_refuses_grads_that_bypass_autograd_checks():
    # torch refuses a mismatched .grad on assignment; a direct op call gets the same check from the op.
    p = torch.randn(3)
    state = [torch.zeros(3), torch.zeros(3)]
    step = torch.zeros(())
    with pytest.raises(TypeError, match=r"adam_step_: grads\[0\] is Double but its param is Float"):
        torch.ops.fused_train.adam_step_([p], [torch.randn(3, dtype=torch.double)], [state[0]], [state[1]], [],
                                         [step], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8,
                                         amsgrad=False, maximize=False, decoupled_weight_decay=False, zero_grad=True)
    assert float(step) == 0.0 and torch.count_nonzero(state[0]) == 0


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device for a second device")
def test_params_on_two_devices_in_one_op_call():
    p_cpu, p_cuda = torch.randn(3), torch.randn(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"params\[1\] is on cuda:0 but params\[0\] is on cpu"):
        torch.ops.fused_train.sgd_step_([p_cpu, p_cuda], [torch.randn(3), torch.randn(3, device="cuda")], [], [],
                                        lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                        maximize=False, is_first_step=False, zero_grad=False)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("Adam", dict(lr=-0.1), "Invalid learning rate: -0.1"),
        ("SGD", dict(momentum=-1.0), "Invalid momentum value: -1.0"),
        ("RMSprop", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        ("AdamW", dict(betas=(0.9, 1.5)), "Invalid beta parameter at index 1: 1.5"),
    ],
)
def test_invalid_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fused_train.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)


def test_empty_param_list():
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        fused_train.optim.SGD([], lr=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_grads_without_grad_scaler_propagate_like_torch(device):
    # Without GradScaler nothing checks for inf/NaN (torch.optim doesn't either): the NaN reaches the param.
    p = torch.zeros(3, device=device, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    p.grad = torch.tensor([1.0, float("nan"), 1.0], device=device)
    q.grad = p.grad.clone()
    fused_train.optim.Adam([p], lr=0.1).step()
    torch.optim.Adam([q], lr=0.1).step()
    torch.testing.assert_close(p, q, equal_nan=True)
    assert torch.isnan(p[1])


@pytest.mark.parametrize("device", DEVICES)
def test_zero_row_inputs_give_torchs_answers(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        ours = cross_entropy(x, y, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(x, y, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
