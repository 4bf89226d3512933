"""The (N, C, d1, …, dK) logits of a segmentation loss, which the cross-entropy ops take as (N, C, positions)
where they lie, each position's classes at their stride (csrc/cpu/xent_kernels.h, forward_positions), instead of
a copy into rows: against torch and the reference, against the rows kernels on the same logits, every op of the
layout (in place, the loss gradient applied, opcheck), compile, and the routing (_rows_view)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (DEVICES, FLOAT_DTYPES, assert_same_bits_for_any_thread_count, cuda_only,
                      run_on_cpu_capability, skip_unless_ran_on)
from fused_train import _ops
from fused_train.nn.functional import _MIN_POSITIONS, _rows_view, cross_entropy
from test_cross_entropy import XENT_TOL, _check

ops = torch.ops.fused_train

# (N, C, d…): whole steps of positions (8x8 = 64), one and a bit (37), several batch entries with a partial step
# each (5, 2, 33 = 66), one class, many classes, three spatial dims, and positions enough for CUDA's layout
# kernels (66560; fewer go into rows there).
SHAPES = [(2, 21, 8, 8), (3, 5, 37), (5, 4, 2, 33), (2, 1, 64), (2, 150, 40), (2, 3, 4, 4, 3), (2, 5, 256, 130)]


def _ids(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_contiguous_logits_keep_their_layout(shape):
    x = torch.randn(shape)
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    layout, layout_target, batch_shape = _rows_view(x, target)
    assert layout.shape == (shape[0], shape[1], x[0, 0].numel()) and layout.data_ptr() == x.data_ptr()
    assert layout_target.shape == (shape[0], x[0, 0].numel()) and batch_shape == target.shape
    # Too few positions per batch entry, channels-last logits and torch.func transforms go into rows.
    few = _MIN_POSITIONS - 1
    assert _rows_view(torch.randn(4, 3, few), torch.zeros(4, few, dtype=torch.long))[0].shape == (4 * few, 3)
    channels_last = torch.randn(2, 5, 8, 8).to(memory_format=torch.channels_last)
    rows = _rows_view(channels_last, torch.zeros(2, 8, 8, dtype=torch.long))[0]
    assert rows.shape == (128, 5) and rows.data_ptr() == channels_last.data_ptr()  # a view, no copy
    assert _rows_view(x, target, rows_only=True)[0].dim() == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weighted=True, ignore_some=True, label_smoothing=0.25),
        dict(target_kind="prob", weighted=True, label_smoothing=0.2),
        dict(lse_square_scale=1e-2, ignore_some=True, reduction="none"),
        dict(target_dtype=torch.int32, reduction="sum", inplace=True),
    ],
    ids=["plain", "weight_ignore_smooth", "prob_weight_smooth", "zloss_none", "int32_sum_inplace"],
)
def test_matches_reference(device, dtype, shape, options):
    if dtype == torch.float16 and options.get("reduction") == "sum" and math.prod(shape) // shape[1] > 4096:
        pytest.skip("the fp16 sum of this many rows' losses is past fp16's range (inf, as torch's)")
    _check(device, dtype, shape, scale=3.0, **options)


def _layout_args(device, dtype, shape, prob, ignore=True):
    x = (torch.randn(shape, device=device, dtype=torch.float64) * 3).to(dtype)
    n, classes, positions = shape
    if prob:
        target = torch.softmax(torch.randn(shape, device=device, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (n, positions), device=device)
        if ignore:
            target[:, ::5] = -100
    weight = torch.rand(classes, device=device) + 0.5
    return x, target, weight


def _as_rows(x, target):
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    return rows, target.movedim(1, -1).reshape(rows.shape) if target.is_floating_point() else target.reshape(-1)


def _rows_to_layout(rows, shape):
    return rows.reshape(shape[0], shape[2], shape[1]).movedim(-1, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_every_op_matches_the_rows_kernels(device, dtype, prob, reduction):
    # Same logits through the rows ops (moved into rows) and the layout's ops: the same values within the
    # kernels' rounding (their sums run in another order), every output in row order.
    shape = (3, 7, 45)
    x, target, weight = _layout_args(device, dtype, shape, prob)
    rows, row_target = _as_rows(x, target)
    kw = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-3)
    tol = XENT_TOL[dtype]
    loss, z_loss, lse, denominator, grad = ops.cross_entropy_forward_backward(x, target, weight, **kw)
    r_loss, r_z_loss, r_lse, r_denominator, r_grad = ops.cross_entropy_forward_backward(rows, row_target, weight, **kw)
    assert grad.shape == x.shape and grad.is_contiguous()
    for ours, theirs in ((loss, r_loss), (z_loss, r_z_loss), (lse, r_lse), (denominator, r_denominator),
                         (grad, _rows_to_layout(r_grad, shape))):
        torch.testing.assert_close(ours, theirs, **tol)
    forward = ops.cross_entropy_forward(x, target, weight, **kw)
    for ours, fused in zip(forward, (loss, z_loss, lse, denominator)):
        assert torch.equal(ours, fused)  # the same kernel, with or without the gradient

    grad_loss = (torch.rand(x.shape[0] * x.shape[2], device=device) + 0.5) if reduction == 0 else \
        torch.tensor(0.7, device=device)
    saved = (x, target, weight, lse, denominator)
    backward = ops.cross_entropy_backward(grad_loss, *saved, **kw)
    r_backward = ops.cross_entropy_backward(grad_loss, rows, row_target, weight, r_lse, r_denominator, **kw)
    torch.testing.assert_close(backward, _rows_to_layout(r_backward, shape), **tol)
    in_place = x.clone()
    ops.cross_entropy_backward_(grad_loss, in_place, target, weight, lse, denominator, **kw)
    assert torch.equal(in_place, backward)
    in_place = x.clone()
    ops.cross_entropy_forward_backward_(in_place, target, weight, **kw)
    assert torch.equal(in_place, grad)

    # The loss gradient applied to the forward's gradient: recomputed where it is not 1 (here one row in
    # three is 1 and keeps what it holds), or a second rounding in place.
    applied = grad.clone()
    if reduction == 0:
        grad_loss[::3] = 1.0
        applied[:, :, ::3] = 7.0
    ops.cross_entropy_apply_grad_loss_(applied, grad_loss, *saved, **kw)
    expected = ops.cross_entropy_backward(grad_loss, *saved, **kw)
    if reduction == 0:
        assert (applied[:, :, ::3] == 7.0).all()
        applied[:, :, ::3] = expected[:, :, ::3]
    assert torch.equal(applied, expected)
    scaled = grad.clone()
    ops.cross_entropy_scale_grad_(scaled, grad_loss)
    factor = grad_loss.reshape(x.shape[0], 1, x.shape[2]) if reduction == 0 else grad_loss
    torch.testing.assert_close(scaled, (grad.to(torch.float64) * factor).to(dtype), rtol=2 * tol["rtol"],
                               atol=tol["atol"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob", [False, True])
def test_opcheck(device, prob):
    x, target, weight = _layout_args(device, torch.float32, (2, 5, 40), prob)
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-3)
    kw_none = dict(kw, reduction=0)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, target, weight), kw)
    torch.library.opcheck(ops.cross_entropy_forward.default, (x, target, None), kw_none)
    torch.library.opcheck(ops.cross_entropy_forward_backward.default, (x, target, weight), kw_none)
    torch.library.opcheck(ops.cross_entropy_forward_backward_.default, (x.clone(), target, weight), kw)
    _, _, lse, denominator, grad = ops.cross_entropy_forward_backward(x, target, weight, **kw_none)
    saved = (x, target, weight, lse, denominator)
    grad_loss = torch.rand(80, device=device)
    torch.library.opcheck(ops.cross_entropy_backward.default, (grad_loss, *saved), kw_none)
    torch.library.opcheck(ops.cross_entropy_backward_.default, (grad_loss, x.clone(), *saved[1:]), kw_none)
    torch.library.opcheck(ops.cross_entropy_apply_grad_loss_.default, (grad.clone(), grad_loss, *saved), kw_none)
    torch.library.opcheck(ops.cross_entropy_scale_grad_.default, (grad.clone(), grad_loss))
    torch.library.opcheck(ops.cross_entropy_scale_grad_.default, (grad.clone(), torch.tensor(0.5, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_and_nan_logits(device):
    # A position whose classes are all -inf, one with a NaN, one with a +inf: NaN in their own lanes only, as
    # torch. An ignored position's gradient is 0 whatever its logits, as the rows kernels' (torch's is NaN for
    # NaN logits: 0 times their NaN softmax). Positions enough for CUDA's layout kernels.
    x = torch.randn(2, 6, 33000, device=device, dtype=torch.float64)
    x[0, :, 3] = float("-inf")
    x[0, 2, 5] = float("nan")
    x[1, 4, 7] = float("inf")
    x[1, 1, 9] = float("nan")
    target = torch.randint(0, 6, (2, 33000), device=device)
    target[1, 9] = -100
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        xd = x.to(dtype).requires_grad_()
        ours = cross_entropy(xd, target, reduction="none")
        (grad,) = torch.autograd.grad(ours.sum(), xd)
        xr = x.to(dtype).double().requires_grad_()  # torch in fp64 on the same values: ours is rounded once
        theirs = F.cross_entropy(xr, target, reduction="none")
        (ref_grad,) = torch.autograd.grad(theirs.sum(), xr)
        tol = dict(XENT_TOL[dtype], equal_nan=True)
        torch.testing.assert_close(ours.double(), theirs, **tol)
        assert (grad[1, :, 9] == 0).all() and ref_grad[1, :, 9].isnan().all()
        ref_grad[1, :, 9] = 0
        torch.testing.assert_close(grad.double(), ref_grad, **tol)
        assert ours[0, 3].isnan() and ours[0, 5].isnan() and ours[1, 7].isnan() and torch.isfinite(ours[0, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_thread_counts(dtype):
    # Enough logits for the parallel path, its blocks of rows ending inside batch entries and steps.
    x = torch.randn(9, 13, 1000, dtype=dtype)
    target = torch.randint(0, 13, (9, 1000))
    target[:, ::7] = -100

    def loss_and_grad():
        xg = x.clone().requires_grad_()
        loss = cross_entropy(xg, target, label_smoothing=0.05)
        loss.backward()
        return loss.detach(), xg.grad

    assert_same_bits_for_any_thread_count(loss_and_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for shape in ((0, 3, 64), (2, 3, 0)):
        x = torch.randn(shape, device=device, requires_grad=True)
        target = torch.zeros(shape[0], shape[2], dtype=torch.long, device=device)
        for reduction in (0, 2):
            loss, _, lse, _, grad = ops.cross_entropy_forward_backward(
                x.detach(), target, None, reduction=reduction, ignore_index=-100, label_smoothing=0.0,
                lse_square_scale=0.0)
            assert lse.shape == (0, 2) and grad.shape == shape
            assert loss.shape == ((0,) if reduction == 0 else ()) and (reduction == 0 or loss.item() == 0)
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    loss = cross_entropy(x, torch.zeros(0, 8, 8, dtype=torch.long, device=device), reduction="sum")
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    # A convolution's (N, C, H, W) logits through the layout's ops (positions enough for CUDA's), traced whole
    # (their fake kernels) and run by inductor, forward and backward.
    conv = torch.nn.Conv2d(3, 5, 3, padding=1).to(device)
    image = torch.randn(2, 3, 256, 130, device=device)
    target = torch.randint(0, 5, (2, 256, 130), device=device)
    target[0, 0] = -100

    def loss_of(inp):
        return cross_entropy(conv(inp), target, label_smoothing=0.1)

    def step(loss_fn):
        conv.zero_grad()
        loss = loss_fn(image)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in conv.parameters()]

    loss, grads = step(loss_of)
    compiled_loss, compiled_grads = step(torch.compile(loss_of, fullgraph=True))
    torch.testing.assert_close(compiled_loss, loss)
    for compiled_grad, grad in zip(compiled_grads, grads):
        torch.testing.assert_close(compiled_grad, grad)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.cross_entropy_forward(torch.randn(2, 3, 40), torch.zeros(2, 39, dtype=torch.long), None,
                                           reduction=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0),
         ValueError, r"class-index target must have shape \(batch, positions\) = \(2, 40\)"),
        (lambda: ops.cross_entropy_forward(torch.randn(2, 3, 40), torch.rand(2, 40, 3), None, reduction=1,
                                           ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0),
         ValueError, "probability target must have input's shape"),
        (lambda: ops.cross_entropy_forward_backward_(torch.randn(2, 40, 3).transpose(1, 2),
                                                     torch.zeros(2, 40, dtype=torch.long), None, reduction=1,
                                                     ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0),
         RuntimeError, "in-place backward needs input with a contiguous layout"),
        (lambda: ops.cross_entropy_forward(torch.randn(2, 3, 4, 5), torch.zeros(2, 20, dtype=torch.long), None,
                                           reduction=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0),
         ValueError, r"input must be 2-D \(rows, classes\) or 3-D \(batch, classes, positions\)"),
        (lambda: ops.cross_entropy_scale_grad_(torch.randn(2, 3, 40), torch.rand(79)), ValueError,
         r"one per row \(80\)"),
        (lambda: cross_entropy(torch.randn(2, 3, 40), torch.tensor([[0] * 39 + [3]] * 2)), IndexError,
         "target 3 at position 39"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_lower_instruction_sets(capability):
    """The layout's kernels lowered to AVX2 (8 fp32 lanes a vector) or to the scalar code (at::vec's portable
    vectors), in a process of their own (FUSED_TRAIN_CPU_CAPABILITY is read at load time): every op against the
    rows kernels, every dtype, partial steps, NaN lanes."""
    ran_on = run_on_cpu_capability(
        "import torch\n"
        "import test_cross_entropy_positions as T\n"
        "for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):\n"
        "    for prob in (False, True):\n"
        "        for reduction in (0, 1):\n"
        "            T.test_every_op_matches_the_rows_kernels('cpu', dtype, prob, reduction)\n"
        "    T.test_matches_reference('cpu', dtype, (5, 4, 2, 33), dict(weighted=True, ignore_some=True,"
        " label_smoothing=0.25))\n"
        "T.test_masked_and_nan_logits('cpu')\n", capability)
    skip_unless_ran_on(capability, ran_on)


def test_apply_grad_loss_checks_the_gradient_layout():
    x, target, weight = _layout_args("cpu", torch.float32, (2, 5, 40), False)
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0)
    _, _, lse, denominator, grad = ops.cross_entropy_forward_backward(x, target, weight, **kw)
    strided = torch.full((2, 40, 5), 7.0).transpose(1, 2)
    with pytest.raises(ValueError, match=r"grad_input must be a \(2, 5, 40\) Float tensor on cpu, contiguous"):
        ops.cross_entropy_apply_grad_loss_(strided, torch.tensor(2.0), x, target, weight, lse, denominator, **kw)
    assert (strided == 7.0).all()  # nothing written


def _launches(prof, kernel):
    return [e.name for e in prof.events() if kernel in e.name and "Kernel" not in e.name[:6]]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(prob=True), dict(inplace_backward=True)],
                         ids=["plain", "smooth", "prob_weight", "inplace"])
def test_cuda_runs_the_layout_kernels(dtype, options):
    """cross_entropy.cu's thread-per-row kernels take (N, C, H, W) logits where they lie (no rows kernel runs), and
    the training step's gradient (kept from the fused forward), the forward alone and a recomputed gradient (a loss
    gradient other than 1) match torch."""
    prob = options.get("prob", False)
    inplace = options.get("inplace_backward", False)
    shape = (4, 21, 128, 130)  # 66560 positions: at least _MIN_CUDA_POSITION_ROWS
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(shape, device="cuda", generator=gen) * 3).to(dtype)
    weight = None
    if prob:
        target = torch.softmax(torch.randn(shape, device="cuda", generator=gen), 1).to(dtype)
        weight = (torch.rand(21, device="cuda", generator=gen) + 0.5).to(dtype)
    else:
        target = torch.randint(0, 21, (4, 128, 130), device="cuda", generator=gen)
        target[:, ::3] = -100
    kw = dict(weight=weight, label_smoothing=options.get("label_smoothing", 0.0))
    leaf = logits.clone().requires_grad_()
    again = logits.clone().requires_grad_()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        loss = cross_entropy(leaf * 1 if inplace else leaf, target, inplace_backward=inplace, **kw)
        loss.backward()
        with torch.no_grad():
            alone = cross_entropy(logits, target, **kw)
        (cross_entropy(again, target, **kw) * 3).backward()
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "cross_entropy" in e.name})
    assert _launches(prof, "cross_entropy_positions_forward_kernel"), names
    for rows_kernel in ("cross_entropy_forward_kernel", "cross_entropy_forward_backward_kernel",
                        "cross_entropy_backward_kernel"):
        assert not _launches(prof, rows_kernel), names
    # The loss gradient 3 (of the second loss, never in place) is applied by recomputing the gradient.
    assert _launches(prof, "cross_entropy_positions_backward_kernel"), names
    ref_logits = logits.to(torch.float64).requires_grad_()
    ref_weight = None if weight is None else weight.to(torch.float64)
    ref = F.cross_entropy(ref_logits, target.to(torch.float64) if prob else target, weight=ref_weight,
                          label_smoothing=kw["label_smoothing"])
    ref.backward()
    tol = XENT_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(alone.double(), ref.detach(), **tol)
    torch.testing.assert_close(leaf.grad.double(), ref_logits.grad, **tol)
    torch.testing.assert_close(again.grad.double(), 3 * ref_logits.grad, **tol)


@cuda_only
def test_cuda_layout_past_2_31_elements():
    # Batch entry 2 starts 2·3·(2^29 + 33) > 2^31 elements in, and entry 1's last class 5·(2^29 + 33) in: 64-bit
    # offsets. The last positions of each entry against torch on just those positions. About 40 bytes per row at
    # the peak (logits, int32 target, gradient, the kernels' per-row buffers): 64 GB.
    if torch.cuda.get_device_properties(0).total_memory < 75 * 2**30:
        pytest.skip("needs a GPU of 80 GB")
    positions = 2**29 + 33
    x = torch.randn(3, 3, positions, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, 3, (3, positions), device="cuda", dtype=torch.int32)
    tail = slice(positions - 100, positions)
    x_tail = x[:, :, tail].double().requires_grad_()
    ref = F.cross_entropy(x_tail, target[:, tail], reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), x_tail)
    leaf = x.requires_grad_()
    loss = cross_entropy(leaf, target, reduction="none")
    loss.backward(torch.ones_like(loss))
    tol = XENT_TOL[torch.bfloat16]
    torch.testing.assert_close(loss[:, tail].double(), ref.detach(), **tol)
    torch.testing.assert_close(leaf.grad[:, :, tail].double(), ref_grad, **tol)


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_vmap_rules_fold_samples_into_the_layout(prob, reduction):
    # torch.vmap over the layout's ops (per-sample losses and their gradients): the samples folded into the batch
    # entries of one call, each sample's loss reduced on its own, against one call per sample.
    samples = [_layout_args("cpu", torch.float32, (2, 5, 40), prob) for _ in range(3)]
    x = torch.stack([s[0] for s in samples])
    target = torch.stack([s[1] for s in samples])
    weight = samples[0][2]
    kw = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-3)
    batched = torch.vmap(lambda xs, ts: ops.cross_entropy_forward(xs, ts, weight, **kw))(x, target)
    each = [ops.cross_entropy_forward(xs, ts, weight, **kw) for xs, ts in zip(x, target)]
    for i, out in enumerate(batched):
        torch.testing.assert_close(out, torch.stack([e[i] for e in each]), rtol=1e-6, atol=1e-7)
    grad_loss = torch.rand(3, 80) + 0.5 if reduction == 0 else torch.rand(3) + 0.5
    _, _, lse, denominator = batched
    grads = torch.vmap(lambda g, xs, ts, ls, d: ops.cross_entropy_backward(g, xs, ts, weight, ls, d, **kw))(
        grad_loss, x, target, lse, denominator)
    for g, xs, ts, (_, _, ls, d), grad in zip(grad_loss, x, target, each, grads):
        torch.testing.assert_close(grad, ops.cross_entropy_backward(g, xs, ts, weight, ls, d, **kw), rtol=1e-6,
                                   atol=1e-7)


def test_target_check_names_the_first_bad_row_and_weighs_in_fixed_blocks():
    # Enough rows for several blocks of the CPU target check, which run in parallel: the error names the first
    # bad row whichever block finds one first, the weighted mean is the same bits for any thread count, and
    # nothing is written.
    x = torch.randn(3, 4, 70000)
    target = torch.randint(0, 4, (3, 70000))
    target[:, ::9] = -100
    weight = torch.rand(4) + 0.5

    def forward():
        return ops.cross_entropy_forward(x, target, weight, reduction=1, ignore_index=-100, label_smoothing=0.0,
                                         lse_square_scale=0.0)

    assert_same_bits_for_any_thread_count(forward)
    bad = target.clone()
    bad[1, 30000] = 4  # row 100000, in the second block
    bad[2, 0] = -3  # row 140000, in the third
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # the in-place backward would write the gradient over these: nothing is written
    with pytest.raises(IndexError, match="target 4 at position 100000 is out of bounds"):
        cross_entropy(logits, bad, inplace_backward=True)
    assert torch.equal(logits, x)
    _, _, lse, denominator = forward()
    grad_loss = torch.tensor(2.0)
    for inplace in (False, True):  # the backward ops check the targets too (they index the gradient by them)
        logits = x.clone()
        with pytest.raises(IndexError, match="target 4 at position 100000 is out of bounds"):
            _ops.cross_entropy_backward(grad_loss, logits, bad, weight, lse, denominator, reduction=1,
                                        ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
                                        inplace=inplace)
        assert torch.equal(logits, x)
