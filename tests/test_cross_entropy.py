"""fused_train.nn cross-entropy against torch.nn.functional.cross_entropy: values and input gradients over
devices × dtypes × target kinds × options, plus gradcheck, opcheck, torch.compile, extremes and errors."""

import gc
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fused_train
from conftest import DEVICES, FLOAT_DTYPES, assert_same_bits_for_any_thread_count
from fused_train._ops import _opmath
from fused_train.nn.functional import cross_entropy, cross_entropy_with_lse
from fused_train.reference import cross_entropy_reference

# Tolerances of a loss or gradient against the reference in opmath, unrounded (see _check). fp64/fp32:
# reassociation of the row sums (lane-wise and in row order here, pairwise in torch) and exp_u20's 20 ulps in
# fp32. bf16/fp16: the kernel computes in fp32 like the reference, so what differs is where it rounds to the
# stored dtype, each rounding at most u = 2^-8 (bf16) resp. 2^-11 (fp16) relative: once for the loss and the
# gradient; twice for a bf16 gradient written over the logits (inplace_backward), which the forward writes for
# a loss gradient of 1 and the backward then scales by the real one (_CrossEntropyFunction). rtol = 2u bounds
# both; the fp32 error of either side is ~1e-6 relative, and the absolute part covers gradient entries near 0.
XENT_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2 ** -7, atol=2e-4),
    torch.float16: dict(rtol=2 ** -10, atol=2e-5),
}


def _check(device, dtype, input_shape, target_kind="index", weighted=False, reduction="mean", label_smoothing=0.0,
           ignore_some=False, lse_square_scale=0.0, target_dtype=torch.int64, transpose=False, inplace=False,
           scale=1.0):
    """Compares loss and input gradient with the opmath reference (torch ops on upcast logits)."""
    classes = input_shape[1] if len(input_shape) > 1 else input_shape[0]
    if transpose:  # non-contiguous: build (C, N) and view it as (N, C)
        x = (torch.randn(input_shape[::-1], device=device, dtype=torch.float64) * scale).to(dtype).t()
    else:
        x = (torch.randn(input_shape, device=device, dtype=torch.float64) * scale).to(dtype)
    batch_shape = (input_shape[0],) + tuple(input_shape[2:]) if len(input_shape) > 1 else ()
    if target_kind == "index":
        target = torch.randint(0, classes, batch_shape, device=device).to(target_dtype)
        if ignore_some and target.numel() > 1:
            target.view(-1)[::3] = -100
    else:
        target = torch.softmax(torch.randn(input_shape, device=device, dtype=torch.float64), dim=1 if
                               len(input_shape) > 1 else 0).to(dtype)
    weight = torch.rand(classes, device=device, dtype=dtype) + 0.5 if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)

    # The reference differentiates with respect to the logits already in opmath, so its gradient is not
    # rounded to a bf16/fp16 leaf's dtype, and it is given the same upstream gradient ours gets (rounded to
    # the loss dtype): what remains is the kernel's own rounding, which XENT_TOL bounds.
    x_ref = x.detach().to(_opmath(dtype)).requires_grad_()
    ref_loss, ref_z = cross_entropy_reference(x_ref, target, lse_square_scale=lse_square_scale, **kw)
    grad_out = torch.randn_like(ref_loss) if reduction == "none" else torch.tensor(0.7, dtype=ref_loss.dtype,
                                                                                    device=device)
    grad_out = grad_out.to(dtype)
    (ref_grad,) = torch.autograd.grad(ref_loss, x_ref, grad_out.to(ref_loss.dtype))

    x_ours = x.detach().clone().requires_grad_()
    x_in = x_ours * 1 if inplace else x_ours  # the in-place backward writes over its input: keep the leaf
    loss, z_loss, lse = cross_entropy_with_lse(x_in, target, lse_square_scale=lse_square_scale,
                                               inplace_backward=inplace, **kw)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    (grad,) = torch.autograd.grad(loss, x_ours, grad_out)
    tol = XENT_TOL[dtype]
    torch.testing.assert_close(loss.to(ref_loss.dtype), ref_loss, **tol)
    torch.testing.assert_close(z_loss.to(ref_z.dtype), ref_z, **tol)
    torch.testing.assert_close(grad.to(ref_grad.dtype), ref_grad, **tol)
    return loss, grad


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weighted=True),
        dict(ignore_some=True),
        dict(label_smoothing=0.1),
        dict(weighted=True, ignore_some=True, label_smoothing=0.25),
        dict(target_kind="prob"),
        dict(target_kind="prob", weighted=True, label_smoothing=0.2),
        dict(lse_square_scale=1e-2, ignore_some=True),
        dict(target_dtype=torch.int32, ignore_some=True),
    ],
    ids=["plain", "weight", "ignore", "smooth", "weight_ignore_smooth", "prob", "prob_weight_smooth", "zloss",
         "int32"],
)
def test_matches_torch(device, dtype, reduction, options):
    _check(device, dtype, (37, 101), reduction=reduction, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("classes", [1, 2, 10, 16, 17])
def test_few_classes_match_torch(device, dtype, classes):
    # Up to 16 classes with class-index targets and no smoothing take a kernel of their own on CPU, rows
    # across vector lanes a block at a time: row counts around the blocks (4, 8 and 16 lanes), its options.
    for rows in (1, 7, 8, 9, 17, 64):
        _check(device, dtype, (rows, classes))
        _check(device, dtype, (rows, classes), weighted=True, ignore_some=True, reduction="none")
        _check(device, dtype, (rows, classes), lse_square_scale=1e-2, target_dtype=torch.int32, reduction="sum",
               scale=30.0)
        _check(device, dtype, (rows, classes), transpose=True, ignore_some=True)
        _check(device, dtype, (rows, classes), inplace=True, ignore_some=True, reduction="none")
        # The eager C++ node, logits with a row stride wider than their classes (a padded vocabulary's slice)
        wide = torch.randn(rows, classes + 5, device=device, dtype=dtype)
        logits = wide[:, :classes].requires_grad_()
        target = torch.randint(0, classes, (rows,), device=device)
        target[::4] = -100
        ref = logits.detach().to(_opmath(dtype)).requires_grad_()
        loss, ref_loss = cross_entropy(logits, target, reduction="sum"), F.cross_entropy(ref, target, reduction="sum")
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss.to(ref_loss.dtype), ref_loss, **XENT_TOL[dtype])
        torch.testing.assert_close(logits.grad.to(ref.dtype), ref.grad, **XENT_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [10, 40, 100])  # the CPU kernel's three row paths
def test_masked_and_nan_logits_match_torch(device, dtype, classes):
    # -inf logits (masked classes) leave the other classes' loss and gradient finite; a row with a NaN or
    # +inf logit, or with every logit -inf, gives NaN, as torch's.
    x = torch.randn(12, classes, dtype=torch.float64)
    target = torch.randint(3, classes, (12,))
    x[0, :3] = -math.inf
    x[1, :] = -math.inf
    x[1, target[1]] = 0.5
    x[2, 4] = math.nan
    x[3, 5] = math.inf
    x[4, :] = -math.inf
    x = x.to(device=device, dtype=dtype)
    target = target.to(device)
    results = []
    for loss_fn, logits in ((cross_entropy, x), (F.cross_entropy, x.to(_opmath(dtype)))):
        logits = logits.detach().requires_grad_()
        loss = loss_fn(logits, target, reduction="none")
        loss.sum().backward()
        results.append((loss.detach(), logits.grad))
    (loss, grad), (ref_loss, ref_grad) = results
    tol = dict(XENT_TOL[dtype], equal_nan=True)
    torch.testing.assert_close(loss.to(ref_loss.dtype), ref_loss, **tol)
    torch.testing.assert_close(grad.to(ref_grad.dtype), ref_grad, **tol)
    assert torch.isfinite(loss[:2]).all() and loss[2:5].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(10,), (1, 1), (3, 7), (5, 1000), (4, 6, 3, 2), (2, 50257), (70, 33), (64, 2049), (300, 8193)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_shapes(device, dtype, shape, target_kind):
    # On CUDA (cross_entropy.cu's row_groups; test_cuda_row_paths checks which kernel runs): rows this few
    # take a block each, 70x33's each at another 16-byte offset; 300x8193 rows enough not to split the
    # vocabulary; 2x50257 the split path.
    _check(device, dtype, shape, target_kind=target_kind, weighted=True, label_smoothing=0.1)
    _check(device, dtype, shape, target_kind=target_kind, reduction="none")


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_and_inplace(device, dtype):
    _check(device, dtype, (33, 45), transpose=True, weighted=True, label_smoothing=0.1)
    _check(device, dtype, (33, 45), inplace=True, ignore_some=True, reduction="none")
    # a row stride larger than C: every other column of a wider tensor
    x = torch.randn(9, 160, device=device, dtype=dtype)[:, 3:80]
    target = torch.randint(0, 77, (9,), device=device)
    torch.testing.assert_close(cross_entropy(x, target).double(), F.cross_entropy(x.double(), target),
                               **XENT_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_writes_over_logits(device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    logits = x * 2
    target = torch.randint(0, 20, (6,), device=device)
    expected = torch.softmax(logits.detach(), 1) - F.one_hot(target, 20)
    loss = cross_entropy(logits, target, inplace_backward=True)
    (g_logits,) = torch.autograd.grad(loss, logits, retain_graph=True)
    torch.testing.assert_close(g_logits, expected / 6)
    assert torch.equal(logits.detach(), g_logits)  # the same storage now holds the gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_vocab(device, dtype):
    _check(device, dtype, (3, 128256), ignore_some=True, scale=3.0)
    _check(device, dtype, (2, 151936), label_smoothing=0.1, weighted=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits(device, dtype):
    big = 1e4 if dtype != torch.float16 else 6e4
    x = torch.randn(8, 300, device=device).to(dtype)
    x[0] = big
    x[1] = -big
    x[2, ::2] = big
    x[3] = float("-inf")
    x[3, 7] = 0.0  # -inf on every non-target class: loss 0, gradient 0
    x[4] = float("-inf")
    x[4, 299] = -big
    target = torch.randint(0, 300, (8,), device=device)
    target[3] = 7
    target[4] = 299
    xr = x.double().requires_grad_()
    xo = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, target, reduction="none")
    ours = cross_entropy(xo, target, reduction="none")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, **XENT_TOL[dtype])
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    (g,) = torch.autograd.grad(ours.sum(), xo)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), g_ref, **XENT_TOL[dtype])
    assert ours[3] == 0 and (g[3] == 0).all()
    # label smoothing with -inf logits: infinite loss, as torch
    assert torch.isinf(cross_entropy(xo.detach()[3:4], target[3:4], label_smoothing=0.1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty(device, reduction):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    for weight in (None, torch.rand(5, device=device)):
        ours = cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        ref = F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        if reduction != "mean":
            (g,) = torch.autograd.grad(ours.sum(), x)
            assert (g == 0).all()
    empty = torch.randn(0, 5, device=device, requires_grad=True)
    ours = cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), reduction=reduction)
    ref = F.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device), reduction=reduction)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    ours.sum().backward()
    assert empty.grad.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(lse_square_scale=1e-3)],
                         ids=["plain", "smoothing", "z_loss"])
def test_zero_total_class_weight_gives_nan_like_torch(device, options):
    # Every kept target's class weight is 0: the weighted mean is 0/0, NaN in torch even where label smoothing
    # alone would make it inf; the gradient is NaN on the rows that are not ignored, 0 on the ignored ones.
    x = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([1, 3, -100, 1, 3, -100], device=device)
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64, device=device)
    z_loss = options.pop("lse_square_scale", 0.0)
    ours = cross_entropy(x, target, weight=weight, lse_square_scale=z_loss, **options)
    (grad,) = torch.autograd.grad(ours, x)
    assert ours.isnan()
    if not z_loss:  # torch has no z-loss
        ref = F.cross_entropy(x, target, weight=weight, **options)
        (ref_grad,) = torch.autograd.grad(ref, x)
        assert ref.isnan() and torch.equal(grad.isnan(), ref_grad.isnan())
    assert grad[[0, 1, 3, 4]].isnan().all() and grad[[2, 5]].eq(0).all()
    # The same per sample under vmap (the rows folded into one call), beside a sample with a finite mean.
    xs = torch.stack([x.detach(), x.detach().flip(0)])
    targets = torch.stack([target, torch.tensor([0, 2, 4, 0, 2, 4], device=device)])
    losses, grads = torch.func.vmap(torch.func.grad_and_value(
        lambda z, t: cross_entropy(z, t, weight=weight, lse_square_scale=z_loss, **options)), in_dims=(0, 0))(
        xs, targets)[::-1]
    assert losses[0].isnan() and losses[1].isfinite()
    assert torch.equal(grads[0].isnan(), grad.isnan()) and grads[1].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x = torch.randn(5, 7, 2, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5, 2), device=device)
    target[0, 0] = -100
    weight = torch.rand(7, device=device, dtype=torch.float64) + 0.1
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda inp: cross_entropy(inp, target, weight, reduction=reduction, label_smoothing=0.15,
                                      lse_square_scale=0.01), (x,))
    probs = torch.softmax(torch.randn(5, 7, 2, device=device, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda inp: cross_entropy(inp, probs, weight, label_smoothing=0.1), (x,))


def _op_args(device, prob=False, smoothing=0.1):
    x = torch.randn(6, 11, device=device)
    target = torch.softmax(torch.randn(6, 11, device=device), 1) if prob else torch.randint(0, 11, (6,),
                                                                                             device=device)
    weight = torch.rand(11, device=device)
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=smoothing, lse_square_scale=1e-3)
    return x, target, weight, kw


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob", [False, True])
def test_opcheck(device, prob):
    ops = torch.ops.fused_train
    x, target, weight, kw = _op_args(device, prob)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, target, weight), kw)
    _, _, lse, denominator = ops.cross_entropy_forward(x, target, weight, **kw)
    g = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops.cross_entropy_backward.default, (g, x, target, weight, lse, denominator), kw)
    torch.library.opcheck(ops.cross_entropy_backward_.default, (g, x.clone(), target, weight, lse, denominator), kw)
    kw_none = dict(kw, reduction=0)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, target, None), kw_none)
    half = x.to(torch.bfloat16)
    half_target = target.to(torch.bfloat16) if prob else target
    torch.library.opcheck(ops.cross_entropy_forward.default, (half, half_target, weight), dict(kw, opmath_loss=True))
    torch.library.opcheck(ops.cross_entropy_forward.default, (half, half_target, None),
                          dict(kw_none, opmath_loss=True))


@pytest.mark.smoke
def test_torch_compile_fullgraph():
    model = torch.nn.Linear(16, 40)
    loss_fn = fused_train.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(inp, target):
        return loss_fn(model(inp), target)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inp = torch.randn(8, 16)
    target = torch.randint(0, 40, (8,))
    loss = compiled(inp, target)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = F.cross_entropy(model(inp), target, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch_module(device):
    weight = torch.rand(9, device=device)
    ours = fused_train.nn.CrossEntropyLoss(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.05)
    ref = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=2, reduction="sum", label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert "weight" in dict(ours.named_buffers())
    x = torch.randn(12, 9, device=device, requires_grad=True)
    target = torch.randint(0, 9, (12,), device=device)
    torch.testing.assert_close(ours(x, target), ref(x, target))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = fused_train.nn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    torch.testing.assert_close(legacy(x, target), F.cross_entropy(x, target, reduction="sum"))
    assert torch.isnan(ours(x, torch.full((12,), 2, device=device))) == torch.isnan(ref(x, torch.full(
        (12,), 2, device=device)))


def test_lse_output():
    x = torch.randn(3, 4, 17)
    target = torch.randint(0, 4, (3, 17))
    out = cross_entropy_with_lse(x, target, lse_square_scale=0.5, reduction="none")
    torch.testing.assert_close(out.lse, torch.logsumexp(x, dim=1))
    torch.testing.assert_close(out.z_loss, 0.5 * out.lse ** 2)
    assert out.lse.dtype == torch.float32 and not out.lse.requires_grad


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long)), ValueError,
         "target has 3 rows but input has 4"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4)), ValueError, "probability target has shape"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.uint8)), TypeError, "int64 or int32"),
        (lambda: cross_entropy(torch.randn(4, 5, 2), torch.zeros(4, 3, dtype=torch.long)), ValueError,
         r"needs \(4, 2\)"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), reduction="avg"), ValueError,
         "reduction must be"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 5, 2])), IndexError, "target 5 at position 2"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.tensor([0, -1, 0, 2])), IndexError, "out of bounds"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), weight=torch.ones(4)),
         ValueError, "weight must have one entry per class"),
        (lambda: cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=1.5),
         ValueError, "label_smoothing must be in"),
        (lambda: cross_entropy(torch.randn(4, 5).half(), torch.rand(4, 5)), TypeError, "must have input's dtype"),
        (lambda: cross_entropy(torch.randn(4, 5).int(), torch.zeros(4, dtype=torch.long)), TypeError,
         "input must be float32"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_target_writes_nothing():
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(IndexError):
        cross_entropy(x, torch.tensor([0, 1, 9, 2]))
    assert x.grad is None


# -- the gradient written by the forward -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_from_forward_scaled_by_grad_output(device, reduction, inplace):
    """The forward writes the gradient for grad_loss = 1; the backward scales it (also per row for 'none')."""
    x = torch.randn(40, 33, device=device, dtype=torch.float64)
    target = torch.randint(0, 33, (40,), device=device)
    target[::5] = -100
    ref_x = x.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, target, reduction=reduction, label_smoothing=0.1)
    for grad_out in (torch.ones_like(ref), torch.full_like(ref, 0.25), torch.randn_like(ref)):
        (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_out, retain_graph=True)
        leaf = x.clone().requires_grad_()
        logits = leaf * 1 if inplace else leaf
        loss = cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1,
                             inplace_backward=inplace)
        (grad,) = torch.autograd.grad(loss, leaf, grad_out)
        torch.testing.assert_close(grad, ref_grad, **XENT_TOL[torch.float64])


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_second_backward_recomputes_the_gradient(device):
    x = torch.randn(12, 50, device=device, requires_grad=True)
    target = torch.randint(0, 50, (12,), device=device)
    loss = cross_entropy(x, target, reduction="none")
    grad_out = torch.rand(12, device=device)
    (first,) = torch.autograd.grad(loss, x, grad_out, retain_graph=True)  # the forward's, scaled in place
    (second,) = torch.autograd.grad(loss, x, grad_out, retain_graph=True)  # recomputed from the logits
    (third,) = torch.autograd.grad(loss, x, torch.ones(12, device=device))
    torch.testing.assert_close(second, first)
    expected = torch.softmax(x.detach(), 1) - F.one_hot(target, 50)
    torch.testing.assert_close(third, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_second_backward_and_double_backward_raise(device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    target = torch.randint(0, 20, (6,), device=device)
    loss = cross_entropy(x * 2, target, inplace_backward=True)
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through a loss computed with inplace_backward"):
        torch.autograd.grad(loss, x)
    (g,) = torch.autograd.grad(cross_entropy(x, target), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        g.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_inplace_backward_writes_over_logits_in_the_backward(device):
    """fp16 with inplace_backward: the gradient is written over the logits by the backward, with the real
    loss gradient (one rounding under loss scaling); users that saved the logits are still flagged from
    the forward on, and one backward is all there is."""
    x = torch.randn(6, 20, device=device, requires_grad=True)
    target = torch.randint(0, 20, (6,), device=device)
    logits = (x * 2).half()
    before = logits.detach().clone()
    loss = cross_entropy(logits, target, inplace_backward=True)
    assert torch.equal(logits.detach(), before)  # not yet
    loss.backward(torch.tensor(2.0**15, device=device), retain_graph=True)
    expected = (torch.softmax(before.float(), 1) - F.one_hot(target, 20)) / 6 * 2.0**15
    torch.testing.assert_close(logits.detach(), expected.half(), **XENT_TOL[torch.float16])
    with pytest.raises(RuntimeError, match="second backward through a loss computed with inplace_backward"):
        loss.backward()
    loss = cross_entropy(x.exp().half(), target, inplace_backward=True)  # exp's output is not saved: fine
    loss.backward()
    loss = cross_entropy(x.half().exp(), target, inplace_backward=True)  # exp saves its fp16 output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_forward_overwrites_logits_and_flags_their_other_users(device):
    x = torch.randn(6, 20, device=device, requires_grad=True)
    target = torch.randint(0, 20, (6,), device=device)
    logits = x * 2
    expected = (torch.softmax(logits.detach(), 1) - F.one_hot(target, 20)) / 6
    cross_entropy(logits, target, inplace_backward=True)
    torch.testing.assert_close(logits.detach(), expected)  # written by the forward itself
    # without a gradient to compute, the logits are left alone
    with torch.no_grad():
        logits = x * 2
        cross_entropy(logits, target, inplace_backward=True)
    torch.testing.assert_close(logits, x.detach() * 2)
    # exp saves its output for its backward: overwriting it must not go unnoticed
    loss = cross_entropy(x.exp(), target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gradient_is_handed_over_without_a_copy():
    # The Python node (_CrossEntropyFunction, here via cross_entropy_with_lse) shows the forward's gradient.
    x = torch.randn(16, 30, requires_grad=True)
    loss = cross_entropy_with_lse(x, torch.randint(0, 30, (16,))).loss
    written = loss.grad_fn.grad.data_ptr()
    loss.backward()
    assert x.grad.data_ptr() == written
    # The C++ node (plain (N, C) losses): what its backward returns becomes .grad as it is.
    x = torch.randn(16, 30, requires_grad=True)
    loss = cross_entropy(x, torch.randint(0, 30, (16,)))
    returned = []
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: returned.append(grad_inputs[0].data_ptr()))
    loss.backward()
    assert x.grad.data_ptr() == returned[0]


@pytest.mark.parametrize("module", [False, True])
def test_tutorial_loss_backward_runs_no_python(module):
    # The tutorial's loop, (N, C) logits with class indices, gets an autograd node in C++ (as torch's
    # log_softmax + nll_loss do): a Python autograd.Function node costs more than the whole loss at 64×10.
    x = torch.randn(64, 10, requires_grad=True)
    target = torch.randint(0, 10, (64,))
    loss = fused_train.nn.CrossEntropyLoss()(x, target) if module else cross_entropy(x, target)
    assert not isinstance(loss.grad_fn, torch.autograd.function.BackwardCFunction), type(loss.grad_fn)
    loss.backward()
    ref = x.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(ref, target)
    expected.backward()
    torch.testing.assert_close(loss, expected, **XENT_TOL[torch.float32])
    torch.testing.assert_close(x.grad, ref.grad, **XENT_TOL[torch.float32])


def test_loss_options_as_python_numbers_numpy_scalars_or_0_dim_tensors_like_torch():
    np = pytest.importorskip("numpy")
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    target[0] = 3
    expected = F.cross_entropy(x, target, ignore_index=3, label_smoothing=0.1)
    for ignore_index, label_smoothing in ((3, 0.1), (np.int64(3), np.float32(0.1)), (3, torch.tensor(0.1))):
        loss = cross_entropy(x, target, ignore_index=ignore_index, label_smoothing=label_smoothing)
        torch.testing.assert_close(loss, expected, **XENT_TOL[torch.float32])


def test_torch_function_modes_and_subclasses_see_the_loss_op():
    # The eager loss skips the boxed op call only when nothing overrides torch functions; a mode or a tensor
    # subclass with __torch_function__ sees torch.ops.fused_train.cross_entropy_loss as before.
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    expected = F.cross_entropy(x, target)
    with Record():
        loss = cross_entropy(x, target)
    assert torch.ops.fused_train.cross_entropy_loss.default in seen
    torch.testing.assert_close(loss, expected, **XENT_TOL[torch.float32])
    seen.clear()
    loss = cross_entropy(x.detach().as_subclass(Logged).requires_grad_(), target)
    assert torch.ops.fused_train.cross_entropy_loss.default in seen
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), expected.detach(), **XENT_TOL[torch.float32])
    seen.clear()
    cross_entropy(x, target)  # nothing to tell
    assert seen == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_loss_with_cpp_autograd(device, reduction):
    x, target, weight, kw = _op_args(device, False)
    kw = dict(kw, reduction=reduction)
    loss = torch.ops.fused_train.cross_entropy_loss.default
    torch.library.opcheck(loss, (x.requires_grad_(), target, weight), kw)
    torch.library.opcheck(loss, (x.detach(), target, None), kw)
    expected = torch.ops.fused_train.cross_entropy_forward(x.detach(), target, weight, **kw)[0]
    with torch.inference_mode():  # below autograd: the forward alone
        torch.testing.assert_close(loss(x.detach(), target, weight, **kw), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_forward_bitwise_deterministic_across_thread_counts(dtype, reduction):
    x = torch.randn(300, 1000, dtype=dtype)  # many blocks of rows: the parallel path
    target = torch.randint(0, 1000, (300,))
    target[::7] = -100

    def loss_and_grad():
        xg = x.clone().requires_grad_()
        loss = cross_entropy(xg, target, reduction=reduction, label_smoothing=0.05)
        loss.backward()
        return loss.detach(), xg.grad

    assert_same_bits_for_any_thread_count(loss_and_grad)


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob", [False, True])
def test_opcheck_forward_backward(device, prob):
    ops = torch.ops.fused_train
    x, target, weight, kw = _op_args(device, prob)
    torch.library.opcheck(ops.cross_entropy_forward_backward.default, (x, target, weight), kw)
    torch.library.opcheck(ops.cross_entropy_forward_backward_.default, (x.clone(), target, weight), kw)
    kw_none = dict(kw, reduction=0)
    torch.library.opcheck(ops.cross_entropy_forward_backward.default, (x, target, None), kw_none)
    _, _, lse, denominator, grad = ops.cross_entropy_forward_backward(x, target, weight, **kw)
    saved = (x, target, weight, lse, denominator)
    for grad_loss in (torch.tensor(1.0, device=device), torch.tensor(2.0**15, device=device)):
        torch.library.opcheck(ops.cross_entropy_apply_grad_loss_.default, (grad.clone(), grad_loss, *saved), kw)
    _, _, lse_none, den_none, grad_none = ops.cross_entropy_forward_backward(x, target, None, **kw_none)
    torch.library.opcheck(ops.cross_entropy_apply_grad_loss_.default,
                          (grad_none.clone(), torch.rand(6, device=device), x, target, None, lse_none, den_none),
                          kw_none)
    for grad_loss, expected in ((torch.tensor(1.0), True), (torch.ones(6), True), (torch.tensor(2.0**15), False),
                                (torch.tensor([1.0, 1.0, 0.5]), False)):
        # Its answer depends on grad_loss's values, which tracing cannot know (the fake says False), so the
        # check of eager against traced outputs does not apply; compiled backwards never call it.
        torch.library.opcheck(ops.cross_entropy_grad_loss_is_one.default, (grad_loss.to(device),),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        # CUDA never reads grad_loss on the host: "not known to be one" there, and the kernel checks
        assert ops.cross_entropy_grad_loss_is_one(grad_loss.to(device)) == (expected and device == "cpu")
    with pytest.raises(RuntimeError, match="grad_input must not overlap"):
        ops.cross_entropy_apply_grad_loss_(x, torch.tensor(2.0, device=device), *saved, **kw)
    with pytest.raises(ValueError, match=r"grad_input must be a \(6, 11\)"):
        ops.cross_entropy_apply_grad_loss_(grad[:5], torch.tensor(2.0, device=device), *saved, **kw)
    grad = torch.randn(6, 11, device=device)
    torch.library.opcheck(ops.cross_entropy_scale_grad_.default, (grad, torch.tensor(0.5, device=device)))
    torch.library.opcheck(ops.cross_entropy_scale_grad_.default, (grad, torch.rand(6, device=device)))
    with pytest.raises(ValueError, match="grad_loss must hold one element or one per row"):
        ops.cross_entropy_scale_grad_(grad, torch.rand(5, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_grad_loss_recomputes_only_rows_whose_grad_loss_is_not_one(device):
    ops = torch.ops.fused_train
    x, target, weight, kw = _op_args(device)
    kw_none = dict(kw, reduction=0)
    _, _, lse, denominator, grad = ops.cross_entropy_forward_backward(x, target, weight, **kw_none)
    marked = grad.clone()
    marked[::2] = 7.0  # rows whose grad_loss is 1 must be left exactly as they are
    grad_loss = torch.ones(6, device=device)
    grad_loss[1::2] = torch.tensor([2.0**15, 0.5, -3.0], device=device)
    ops.cross_entropy_apply_grad_loss_(marked, grad_loss, x, target, weight, lse, denominator, **kw_none)
    assert (marked[::2] == 7.0).all()
    expected = ops.cross_entropy_backward(grad_loss, x, target, weight, lse, denominator, **kw_none)
    assert torch.equal(marked[1::2], expected[1::2])
    # A power of two (GradScaler's scale) may be applied by multiplying the forward's gradient on CPU, for
    # dtypes whose exponent range makes that exact: the result is the one rounding's, bit for bit.
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dtype)
        _, _, lse, denominator, grad = ops.cross_entropy_forward_backward(xd, target, weight, **kw)
        for scale in (2.0**16, 2.0**-3, -0.5):
            g = grad.clone()
            grad_loss = torch.tensor(scale, device=device)
            ops.cross_entropy_apply_grad_loss_(g, grad_loss, xd, target, weight, lse, denominator, **kw)
            assert torch.equal(g, ops.cross_entropy_backward(grad_loss, xd, target, weight, lse, denominator, **kw))


def test_large_gradient_buffer_is_reused_only_when_released():
    # CPU keeps the last large N×C gradient for the next call of that shape (no page faults on a fresh
    # buffer), but only once nothing refers to it any more: a gradient the caller still holds is never reused.
    x1 = torch.randn(64, 8192, requires_grad=True)  # 2 MiB of fp32 gradient
    y = torch.randint(0, 8192, (64,))
    cross_entropy(x1, y).backward()
    held = x1.grad  # the caller keeps the first gradient
    snapshot = held.clone()
    x2 = torch.randn(64, 8192, requires_grad=True)
    cross_entropy(x2, y).backward()
    assert x2.grad.data_ptr() != held.data_ptr()
    assert torch.equal(held, snapshot), "a gradient still held by the caller was overwritten"
    ptr = x2.grad.data_ptr()
    x1.grad = held = None
    x2.grad = None  # released: the next call may take the buffer back
    x3 = torch.randn(64, 8192, requires_grad=True)
    cross_entropy(x3, y).backward()
    ref = x3.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(x3.grad, ref.grad, rtol=2e-5, atol=2e-6)
    assert x3.grad.data_ptr() == ptr, "a released gradient buffer is reused"


def _mapped_bytes(start: int, length: int) -> int:
    # How much of [start, start + length) is in this process's address space (/proc/self/maps). Mappings,
    # unlike resident-set figures, do not move under the OS's page reclaim: CI twice saw RssAnon/VmRSS not grow
    # when a 128 MiB buffer was written (swapped or reclaimed pages), while the buffer was still mapped.
    end, covered = start + length, 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(address, 16) for address in line.split()[0].split("-"))
            covered += max(0, min(high, end) - max(low, start))
    return covered


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the address space from /proc")
def test_empty_cache_returns_the_kept_gradient_memory():
    # After training, torch's loss gradient memory is back with the OS; fused_train keeps one gradient (the
    # documented bound: one buffer, of the most recent large gradient's size) until empty_cache(). Sizes far
    # above glibc's largest mmap threshold (32 MiB): each buffer is a mapping of its own, unmapped when freed.
    classes = 32768

    def train_step(loss_fn, rows):  # the logits and their gradient die with this frame; where the gradient was
        x = torch.randn(rows, classes, requires_grad=True)
        loss_fn(x, torch.randint(0, classes, (rows,))).backward()
        return x.grad.data_ptr(), x.grad.untyped_storage().nbytes()

    fused_train.empty_cache()
    gc.collect()
    torch_grad = train_step(F.cross_entropy, 1024)
    small_grad = train_step(cross_entropy, 512)  # 64 MiB of fp32 gradient
    large_grad = train_step(cross_entropy, 1024)  # 128 MiB, another size: replaces the kept buffer
    torch_mapped, small_mapped, large_mapped = (_mapped_bytes(*grad) for grad in (torch_grad, small_grad, large_grad))
    fused_train.empty_cache()
    released_mapped = _mapped_bytes(*large_grad)
    # The large buffer may lie where the freed small one was (the OS reuses the hole): only the small
    # buffer's part outside the large one tells whether it is still kept (give or take the large mapping's
    # first page, which holds glibc's chunk header in front of the data).
    overlap = max(0, min(sum(small_grad), sum(large_grad)) - max(small_grad[0], large_grad[0]))
    mib = 2**20
    assert large_grad[1] == 1024 * classes * 4
    assert torch_mapped < torch_grad[1] // 2, f"torch's gradient is still mapped ({torch_mapped / mib:.0f} MiB)"
    assert large_mapped == large_grad[1], (
        f"{large_mapped / mib:.0f} MiB of the last 128 MiB gradient mapped after training: the cache must keep it"
    )
    assert small_mapped - overlap < mib, (
        f"the replaced 64 MiB gradient is still mapped ({small_mapped / mib:.0f} MiB): the cache added to itself"
    )
    assert released_mapped < large_grad[1] // 2, (
        f"{released_mapped / mib:.0f} MiB of the kept gradient still mapped after empty_cache()"
    )


def test_empty_cache_leaves_gradients_in_use_intact():
    # Releasing drops only the cache's reference: a gradient the caller holds keeps its memory and values,
    # and the loss keeps working (and caching) afterwards.
    y = torch.randint(0, 8192, (64,))
    x = torch.randn(64, 8192, requires_grad=True)  # 2 MiB of fp32 gradient: a cached size
    cross_entropy(x, y).backward()
    fused_train.empty_cache()
    fused_train.empty_cache()  # twice: nothing left to release is fine
    ref = x.detach().clone().requires_grad_(True)
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(x.grad, ref.grad, **XENT_TOL[torch.float32])
    x.grad = None
    cross_entropy(x, y).backward()
    torch.testing.assert_close(x.grad, ref.grad, **XENT_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 1024.0, 0.3])
def test_sliced_logits_of_a_padded_vocabulary_backward_under_any_loss_gradient(scale, device):
    # logits[:, :V] of a padded vocabulary: rows with gaps, so the gradient buffer's overlap with them cannot
    # be decided from strides alone; it is a buffer of its own and must be accepted.
    torch.manual_seed(0)
    padded = torch.randn(16, 40, device=device)
    target = torch.randint(0, 37, (16,), device=device)
    grads = []
    for loss_fn in (cross_entropy, F.cross_entropy):
        full = padded.clone().requires_grad_()
        (loss_fn(full[:, :37], target) * scale).backward()
        grads.append(full.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert torch.all(grads[0][:, 37:] == 0)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_batched_loss_gradients_give_one_gradient_per_entry_like_torch(reduction):
    # autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True) vmap the backward.
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    target = torch.randint(0, 7, (5,))
    outs = []
    for loss_fn in (cross_entropy, F.cross_entropy):
        logits = x.clone().requires_grad_()
        loss = loss_fn(logits, target, reduction=reduction)
        batch = torch.eye(5) if reduction == "none" else torch.arange(1.0, 4.0)
        (grad,) = torch.autograd.grad(loss, logits, batch, is_grads_batched=True)
        jac = torch.autograd.functional.jacobian(lambda z: loss_fn(z, target, reduction=reduction), x.clone(),
                                                 vectorize=True)
        outs.append((grad, jac))
    for mine, theirs in zip(outs[0], outs[1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3)], ids=["2d", "nd"])
def test_class_weight_that_requires_grad_raises_at_backward_like_torch(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, 5, (shape[0],) + shape[2:])
    weight = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.cross_entropy(logits, target, weight=weight).backward()
    with pytest.raises(RuntimeError, match="derivative for 'weight'"):
        cross_entropy(logits, target, weight=weight).backward()
    loss = cross_entropy(logits, target, weight=weight.detach())
    loss.backward()  # a weight that does not require grad is fine
    assert weight.grad is None and logits.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not fused_train.build_info()["cuda_compiled"],
                    reason="no CUDA device here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_probability_targets_under_cuda_autocast_match_torch(dtype):
    # autocast's CUDA list casts mv to half; the kernels' own target-mass product must stay in fp32.
    torch.manual_seed(0)
    logits = torch.randn(64, 300, device="cuda")
    soft = torch.softmax(torch.randn(64, 300, device="cuda"), dim=1)
    results = []
    for loss_fn in (cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            loss = loss_fn(x, soft, label_smoothing=0.1)
        loss.backward()
        results.append((loss, x.grad))
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    for mine, theirs in zip(results[0], results[1]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def _kernel_kinds(prof, kernel):
    """(Linear, kBlock) of each launch of cross_entropy.cu's `kernel` the profiler saw, from its demangled name
    (`kernel<float, float, false, true>`) or its mangled one (`...kernelIffLb0ELb1E...`)."""
    kinds = []
    for event in prof.events():
        demangled = re.search(kernel + r"<[^<>]*?, (true|false), (true|false)>", event.name)
        mangled = re.search(kernel + r"I\w*?Lb([01])ELb([01])E", event.name)
        if demangled:
            kinds.append((demangled.group(1) == "true", demangled.group(2) == "true"))
        elif mangled:
            kinds.append((mangled.group(1) == "1", mangled.group(2) == "1"))
    return kinds


@pytest.mark.skipif(not torch.cuda.is_available() or not fused_train.build_info()["cuda_compiled"],
                    reason="no CUDA device here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(prob=True), dict(inplace_backward=True)],
                         ids=["plain", "smooth", "prob_weight", "inplace"])
@pytest.mark.parametrize("shape", [(160000, 7), (40000, 33), (5000, 1000), (5000, 3000), (64, 1000), (8, 50257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_row_paths(shape, dtype, options):
    """Each of cross_entropy.cu's row paths runs where row_groups sends it, and its loss and gradient match torch:
    groups of 1, 4 and 32 lanes (rows enough for two blocks per SM on up to 156 SMs), a block per row (few rows;
    and in the training step's fused kernel rows over 8 KiB), the split vocabulary (few long rows: forward and
    backward kernels instead of the fused one); with and without the linear term (smoothing; probabilities with
    class weights, whose gradient the fused kernel builds from the row's folded Σ w·t'), in place, a third of the
    class targets ignored. The gradient checked is the training step's: .backward() of a loss whose gradient is
    1 keeps what the fused kernel wrote."""
    rows, classes = shape
    prob = options.get("prob", False)
    inplace = options.get("inplace_backward", False)
    label_smoothing = options.get("label_smoothing", 0.0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    itemsize = torch.empty((), dtype=dtype).element_size()

    def block(warp_classes):  # row_groups
        if classes > warp_classes:
            return True
        lanes = 1
        while lanes < 32 and 16 * lanes < classes:
            lanes *= 2
        return -(-rows // (512 // lanes)) < 2 * sms

    split = block(8192) and rows < 2 * sms and classes > 512 * 4 * (16 // itemsize)  # forward_splits > 1
    linear = label_smoothing > 0 or prob
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    weight = None
    if prob:
        target = torch.softmax(torch.randn(shape, device="cuda", generator=gen), 1).to(dtype)
        weight = torch.rand(classes, device="cuda", generator=gen).to(dtype) + 0.5
    else:
        target = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
        target[::3] = -100
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    leaf = logits.clone().requires_grad_()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        loss = cross_entropy(leaf * 1 if inplace else leaf, target, inplace_backward=inplace, **kw)
        loss.backward()
        with torch.no_grad():
            alone = cross_entropy(logits, target, **kw)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "cross_entropy" in e.name})
    forward = _kernel_kinds(prof, "cross_entropy_forward_kernel")
    fused = _kernel_kinds(prof, "cross_entropy_forward_backward_kernel")
    if split:
        assert fused == [] and forward == [(linear, True)] * 2, names
        assert _kernel_kinds(prof, "cross_entropy_backward_kernel")[:1] == [(linear, True)], names
    else:
        assert forward == [(linear, block(8192))], names
        assert fused == [(linear, block(8192 // itemsize))], names
    ref_logits = logits.to(_opmath(dtype)).requires_grad_()
    ref_weight = None if weight is None else weight.to(ref_logits.dtype)
    ref = F.cross_entropy(ref_logits, target.to(ref_logits.dtype) if prob else target, weight=ref_weight,
                          label_smoothing=label_smoothing)
    ref.backward()
    tol = XENT_TOL[dtype]
    torch.testing.assert_close(loss.to(ref.dtype), ref, **tol)
    torch.testing.assert_close(alone.to(ref.dtype), ref, **tol)
    torch.testing.assert_close(leaf.grad.to(ref.dtype), ref_logits.grad, **tol)
