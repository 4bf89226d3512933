"""fused_train.nn.functional.linear_cross_entropy and nn.LinearCrossEntropyLoss against linear + cross_entropy:
every option, chunk boundaries, gradients into existing .grad and tied weights, autocast, torch.compile, torch.func,
bad input."""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_train
import fused_train.nn.functional as F
from conftest import DEVICES, NATIVE_CPU_BF16_GEMMS, TOL, assert_close_scaled, cpu_half_gemms

ops = torch.ops.fused_train


def make_case(n, h, v, dtype=torch.float64, device="cpu", bias=True, prob=False, ignored=0.2):
    x = torch.randn(n, h, dtype=dtype, device=device).requires_grad_()
    w = (torch.randn(v, h, dtype=dtype, device=device) / h**0.5).requires_grad_()
    b = torch.randn(v, dtype=dtype, device=device).requires_grad_() if bias else None
    if prob:
        target = torch.randn(n, v, dtype=dtype, device=device).softmax(-1)
    else:
        target = torch.randint(0, v, (n,), device=device)
        target[torch.rand(n, device=device) < ignored] = -100
    return x, w, b, target


def reference(x, w, b, target, softcap=None, lse_square_scale=0.0, **kwargs):
    """linear + cross_entropy as a user writes it (fused_train's cross_entropy for the z-loss, torch's without)."""
    logits = TF.linear(x, w, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if lse_square_scale:
        return F.cross_entropy(logits, target, lse_square_scale=lse_square_scale, **kwargs)
    return TF.cross_entropy(logits, target, **kwargs)


def loss_and_grads(fn, params, grad_loss_seed=1, grad_loss_dtype=None):
    """The loss and the gradients of params for a random loss gradient drawn with grad_loss_seed, or for
    loss.backward()'s gradient of 1 with grad_loss_seed=None."""
    loss = fn()
    if grad_loss_seed is None:
        grad_loss = torch.ones(loss.shape, dtype=torch.float64)
    else:
        torch.manual_seed(grad_loss_seed)
        grad_loss = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    # The same loss gradient whatever the loss's dtype (rounded to grad_loss_dtype first, when given).
    grad_loss = grad_loss.to(grad_loss_dtype or loss.dtype)
    loss.backward(grad_loss.to(loss.dtype))
    grads = [p.grad.clone() for p in params if p is not None]
    for p in params:
        if p is not None:
            p.grad = None
    return loss.detach(), grads


def assert_matches_reference(x, w, b, target, tol_dtype=None, chunk_size=None, **kwargs):
    params = [x, w, b]
    loss, grads = loss_and_grads(
        lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk_size, **kwargs), params)
    ref_loss, ref_grads = loss_and_grads(lambda: reference(x, w, b, target, **kwargs), params)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert_close_scaled(loss, ref_loss, tol_dtype)
    for g, r in zip(grads, ref_grads):
        assert_close_scaled(g, r, tol_dtype)


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(weight="rand"),
    dict(weight="rand", label_smoothing=0.2),
    dict(weight="rand", reduction="sum", ignore_index=3),
    dict(lse_square_scale=1e-2),
    dict(softcap=2.5),
    dict(softcap=2.5, reduction="none", label_smoothing=0.1),
]


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_every_option_matches_linear_plus_cross_entropy_fp64(device, options, bias):
    options = dict(options)
    x, w, b, target = make_case(37, 16, 50, device=device, bias=bias)
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(50, dtype=torch.float64, device=device)
    if "ignore_index" in options:
        target[target == -100] = options["ignore_index"]
    # 37 rows in chunks of 8: four full chunks and a short one.
    assert_matches_reference(x, w, b, target, chunk_size=8, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match(device, reduction):
    x, w, b, target = make_case(19, 8, 30, device=device, prob=True)
    assert_matches_reference(x, w, b, target, chunk_size=7, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_is_one_rounding_from_the_exact_result(device, dtype, reduction):
    """Against linear + cross_entropy in fp64 on the same (rounded) values: each result rounded once to dtype
    (fp32 accumulation inside), within the dtype's tolerance."""
    x, w, b, target = make_case(70, 32, 300, dtype=dtype, device=device)
    params = [x, w, b]
    loss, grads = loss_and_grads(
        lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=16), params)
    exact = [p.detach().double().requires_grad_() for p in params]
    ref_loss, ref_grads = loss_and_grads(lambda: reference(*exact, target, reduction=reduction), exact)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_scaled(loss, ref_loss.to(dtype), dtype)
    for g, r in zip(grads, ref_grads):
        assert_close_scaled(g, r.to(dtype), dtype)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40), h=st.integers(1, 12), v=st.integers(1, 70), chunk=st.integers(1, 50),
    ignored=st.sampled_from([0.0, 0.3, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(),
)
def test_any_shape_and_chunk_boundary_matches(n, h, v, chunk, ignored, reduction, bias):
    """N and V not multiples of the chunk, V < chunk, N = 1, N = 0, every row ignored."""
    x, w, b, target = make_case(n, h, v, bias=bias, ignored=ignored)
    if n == 0 and reduction == "mean":  # torch: NaN loss; grads of zeros
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk)
        loss.backward()
        assert loss.isnan() and w.grad.abs().sum() == 0
        return
    assert_matches_reference(x, w, b, target, chunk_size=chunk, reduction=reduction)


def test_all_rows_ignored_gives_nan_mean_and_zero_gradients_like_torch():
    x, w, b, target = make_case(10, 4, 9, ignored=1.0)
    params = [x, w, b]
    loss, grads = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=3), params)
    ref_loss, ref_grads = loss_and_grads(lambda: reference(x, w, b, target), params)
    assert loss.isnan() and ref_loss.isnan()
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
        assert g.abs().sum() == 0


def _zero_total_weight_case(dtype, device="cpu"):
    """Every kept target's class weight is 0: the weighted mean is 0/0. torch gives a NaN loss, NaN gradients
    for the rows that are not ignored (its NLL backward divides 0 by 0) and so for the weight and bias, and 0
    for the ignored rows."""
    x, w, b, target = make_case(10, 4, 9, dtype=dtype, device=device, ignored=0.0)
    target[::2] = 3
    target[1::4] = 5
    target[3::4] = -100
    class_weight = torch.ones(9, dtype=dtype, device=device)
    class_weight[[3, 5]] = 0
    return x, w, b, target, class_weight


def _assert_same_nan_pattern(ours, ref):
    assert torch.equal(ours.isnan(), ref.isnan()), (ours, ref)
    torch.testing.assert_close(ours.nan_to_num(), ref.nan_to_num().to(ours.dtype))


# Every road: the forward's own gradients (fp32/fp64, and CPU bf16 where the CPU has bf16 dot products), the tiled
# road (CPU bf16 with FUSED_TRAIN_CPU_HALF_GEMMS=fp32 or without bf16 dot products, CPU fp16) and a second backward
# through the same graph (recomputed).
@pytest.mark.parametrize("dtype,road", [(torch.float64, "auto"), (torch.float32, "auto"), (torch.bfloat16, "auto"),
                                        (torch.bfloat16, "fp32"), (torch.float16, "auto")])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1), dict(lse_square_scale=1e-3)],
                         ids=["plain", "smoothing", "z_loss"])
def test_zero_total_class_weight_gives_nan_like_torch_on_every_road(dtype, road, options):
    with cpu_half_gemms(road):
        _zero_total_class_weight_gives_nan_like_torch(dtype, options)


def _zero_total_class_weight_gives_nan_like_torch(dtype, options):
    x, w, b, target, class_weight = _zero_total_weight_case(dtype)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, weight=class_weight, chunk_size=3, **options)
    exact = [p.detach().double().requires_grad_() for p in (x, w, b)]
    ref = reference(*exact, target, weight=class_weight.double(), **options)
    ref.backward()
    assert loss.isnan() and ref.isnan()
    for backward in range(2):  # the second one recomputes the gradients
        grads = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
        for g, e in zip(grads, exact):
            _assert_same_nan_pattern(g, e.grad)
        assert grads[0][3::4].eq(0).all() and grads[0][0].isnan().all()  # ignored rows 0, kept ones NaN


@pytest.mark.parametrize("dtype,road", [(torch.float64, "auto"), (torch.float32, "auto"), (torch.bfloat16, "auto"),
                                        (torch.bfloat16, "fp32"), (torch.float16, "auto")])
def test_an_infinite_class_weight_gives_nan_like_torch_on_every_road(dtype, road):
    """One class weight inf: the mean's denominator is inf (inf/inf: a NaN loss), and torch's gradients are NaN
    only in the rows whose target has that weight, and in the weight's and bias's. The CPU GEMMs' alpha
    (1/denominator = 0) must not zero them, and the tiled road must not spread NaN to every row."""
    x, w, b, target = make_case(10, 4, 9, dtype=dtype, ignored=0.0)
    target[3::4] = -100
    class_weight = torch.ones(9, dtype=dtype)
    class_weight[target[0]] = float("inf")
    with cpu_half_gemms(road):
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b, weight=class_weight, chunk_size=3)
        grads = torch.autograd.grad(loss, (x, w, b))
    exact = [p.detach().double().requires_grad_() for p in (x, w, b)]
    ref = reference(*exact, target, weight=class_weight.double())
    ref.backward()
    assert loss.isnan() and ref.isnan()
    for g, e in zip(grads, exact):
        assert torch.equal(g.isnan(), e.grad.isnan()), (g, e.grad)
    assert not grads[0].isnan().all()  # the rows of other classes keep finite gradients


def test_zero_total_class_weight_under_vmap_gives_nan_per_sample_like_torch():
    # One sample of three with a zero total class weight: its loss and gradients NaN, the others' finite.
    x, w, b, target, class_weight = _zero_total_weight_case(torch.float64)
    xs = torch.stack([x, x.flip(0), x])
    targets = torch.stack([target, torch.arange(10) % 9, (torch.arange(10) + 4) % 9])
    targets[2, :3] = -100  # and its row 4 has class 5, of weight 0

    def ours(x, w, b, t):
        return F.linear_cross_entropy(x, w, t, linear_bias=b, weight=class_weight, label_smoothing=0.1, chunk_size=4)

    def torchs(x, w, b, t):
        return TF.cross_entropy(TF.linear(x, w, b), t, weight=class_weight, label_smoothing=0.1)

    for argnums in (0, (0, 1, 2)):  # folded rows (input only), one call per sample (the parameters)
        per_sample = torch.func.vmap(torch.func.grad_and_value(ours, argnums=argnums), in_dims=(0, None, None, 0))
        expected = torch.func.vmap(torch.func.grad_and_value(torchs, argnums=argnums), in_dims=(0, None, None, 0))
        (grads, losses), (ref_grads, ref_losses) = per_sample(xs, w.detach(), b.detach(), targets), expected(
            xs, w.detach(), b.detach(), targets)
        _assert_same_nan_pattern(losses, ref_losses)
        assert losses[0].isnan() and losses[1:].isfinite().all()
        for g, r in zip(torch.utils._pytree.tree_leaves(grads), torch.utils._pytree.tree_leaves(ref_grads)):
            _assert_same_nan_pattern(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_input_with_shifted_labels_like_a_causal_lm(device):
    """A Hugging Face causal LM's loss: hidden (B, T, H), labels shifted by one with -100 padding."""
    batch, time, hidden, vocab = 3, 11, 16, 64
    h = torch.randn(batch, time, hidden, dtype=torch.float64, device=device, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64, device=device)
    labels = torch.randint(0, vocab, (batch, time), device=device)
    labels[0, 7:] = -100  # padding
    shift_hidden, shift_labels = h[:, :-1, :], labels[:, 1:]
    loss = F.linear_cross_entropy(shift_hidden, head.weight, shift_labels, chunk_size=6)
    loss.backward()
    grads = [h.grad.clone(), head.weight.grad.clone()]
    h.grad = head.weight.grad = None
    ref = TF.cross_entropy(head(h)[:, :-1, :].reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])
    torch.testing.assert_close(grads[0], h.grad, **TOL[torch.float64])
    torch.testing.assert_close(grads[1], head.weight.grad, **TOL[torch.float64])
    none = F.linear_cross_entropy(shift_hidden, head.weight, shift_labels, reduction="none")
    assert none.shape == shift_labels.shape


def test_gradients_accumulate_into_existing_grads_and_tied_weights():
    """Two micro-batches accumulate into .grad; the head tied to the input embedding gets both gradients."""
    vocab, hidden = 40, 8
    emb = torch.nn.Embedding(vocab, hidden, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (2, 9, 6))
    grads = []
    for fused in (True, False):
        emb.weight.grad = None
        for micro in tokens:  # gradient accumulation: .grad already holds the first micro-batch's
            hid = torch.tanh(emb(micro))
            if fused:
                loss = F.linear_cross_entropy(hid[:, :-1], emb.weight, micro[:, 1:], chunk_size=7)
            else:
                loss = TF.cross_entropy(TF.linear(hid[:, :-1], emb.weight).reshape(-1, vocab), micro[:, 1:].reshape(-1))
            (loss / 2).backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float64])


@pytest.mark.parametrize("grad_loss", [1.0, 0.25, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_retain_graph_second_backward_and_any_loss_gradient(grad_loss, dtype):
    x, w, b, target = make_case(21, 8, 30, dtype=dtype)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=5)
    (loss * grad_loss).backward(retain_graph=True)
    first = [p.grad.clone() for p in (x, w, b)]
    for p in (x, w, b):
        p.grad = None
    (loss * grad_loss).backward()
    # bf16's weight gradient is summed in bf16 chunk by chunk: the first backward scales the forward's sums by
    # grad_loss (a second rounding), the second recomputes them scaled, so near-cancelled entries differ by
    # roundings of the running sums (seen: 6 ulps of a 0.065 entry on torch 2.11's oneDNN).
    for g, p in zip(first, (x, w, b)):
        assert_close_scaled(g, p.grad, dtype)
    exact = [p.detach().double().requires_grad_() for p in (x, w, b)]
    (reference(*exact, target) * grad_loss).backward()
    for g, r in zip(first, exact):
        assert_close_scaled(g, r.grad.to(dtype), dtype)


def test_frozen_head_or_input_computes_only_the_gradients_needed():
    x, w, b, target = make_case(13, 6, 20)
    w.requires_grad_(False)
    F.linear_cross_entropy(x, w, target, linear_bias=b).backward()
    assert w.grad is None and x.grad is not None and b.grad is not None
    with torch.no_grad():
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b)
    torch.testing.assert_close(loss, reference(x, w, b, target).detach(), **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_is_fp32_under_autocast_like_linear_plus_cross_entropy(device, reduction):
    dtype = torch.bfloat16
    x, w, b, target = make_case(24, 16, 40, dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=dtype):
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction)
        ref = TF.cross_entropy(TF.linear(x, w, b), target, reduction=reduction)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    grads = torch.autograd.grad(loss.sum(), (x, w, b))
    ref_grads = torch.autograd.grad(ref.sum(), (x, w, b))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close_scaled(g, r, dtype)


@pytest.mark.smoke
def test_torch_compile_traces_it_without_graph_breaks():
    x, w, b, target = make_case(17, 8, 30, dtype=torch.float32)

    def step(x, w, b, target):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, softcap=5.0, chunk_size=4)

    assert_compiles_whole_and_matches_eager(step, x, w, b, target)


def assert_compiles_whole_and_matches_eager(step, x, w, b, target):
    """step(x, w, b, target) compiled with fullgraph=True (no graph break) gives eager's loss and gradients."""
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    params = [x, w, b]
    loss, grads = loss_and_grads(lambda: compiled(x, w, b, target), params)
    ref_loss, ref_grads = loss_and_grads(lambda: step(x, w, b, target), params)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.smoke
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, b, target = make_case(9, 4, 11, dtype=torch.float32, device=device)
    x, w, b = (t.detach() for t in (x, w, b))
    weight = torch.rand(11, device=device)
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=0.1, lse_square_scale=0.01, softcap=3.0, chunk_rows=4)
    grads = dict(input_grad=True, linear_weight_grad=True, linear_bias_grad=True)
    torch.library.opcheck(ops.linear_cross_entropy_forward.default, (x, w, target, b, weight), {**kw, **grads})
    _, lse, den, *_ = ops.linear_cross_entropy_forward(x, w, target, b, weight, **kw, **grads)
    g = torch.tensor(1.5, device=device)
    torch.library.opcheck(ops.linear_cross_entropy_backward.default, (g, x, w, target, b, weight, lse, den),
                          {**kw, **grads})


def test_torch_func_grad_matches_autograd():
    x, w, b, target = make_case(15, 6, 25)

    def loss_of(w, x):
        return F.linear_cross_entropy(x, w, target, linear_bias=b.detach(), label_smoothing=0.1, chunk_size=4)

    gw, gx = torch.func.grad(loss_of, argnums=(0, 1))(w.detach(), x.detach())
    ref = torch.autograd.grad(reference(x, w, b.detach(), target, label_smoothing=0.1), (w, x))
    torch.testing.assert_close(gw, ref[0], **TOL[torch.float64])
    torch.testing.assert_close(gx, ref[1], **TOL[torch.float64])


def test_double_backward_raises():
    x, w, b, target = make_case(5, 3, 7)
    (gx,) = torch.autograd.grad(F.linear_cross_entropy(x, w, target), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_module_matches_linear_and_cross_entropy_loss():
    torch.manual_seed(1)
    fused = fused_train.nn.LinearCrossEntropyLoss(8, 30, bias=True, label_smoothing=0.1, dtype=torch.float64,
                                                  chunk_size=5)
    torch.manual_seed(1)
    linear = torch.nn.Linear(8, 30, dtype=torch.float64)
    assert list(fused.state_dict()) == ["linear.weight", "linear.bias"]
    torch.testing.assert_close(fused.linear.weight, linear.weight)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    target = torch.randint(0, 30, (4, 6))
    fused(x, target).backward()
    TF.cross_entropy(linear(x).reshape(-1, 30), target.reshape(-1), label_smoothing=0.1).backward()
    torch.testing.assert_close(fused.linear.weight.grad, linear.weight.grad, **TOL[torch.float64])
    torch.testing.assert_close(fused.linear.bias.grad, linear.bias.grad, **TOL[torch.float64])
    assert "label_smoothing=0.1" in repr(fused)


BAD_INPUTS = [
    # (what to change, error type, message fragment)
    (lambda c: {**c, "w": c["w"][:, :-1]}, ValueError, "input must have shape"),
    (lambda c: {**c, "w": c["w"].float()}, TypeError, "linear_weight must have input's dtype"),
    (lambda c: {**c, "b": c["b"][:-1]}, ValueError, "linear_bias must have shape"),
    (lambda c: {**c, "b": c["b"].float()}, TypeError, "linear_bias must have input's dtype"),
    (lambda c: {**c, "target": c["target"][:-1]}, ValueError, "target must have shape"),
    (lambda c: {**c, "target": c["target"].to(torch.int16)}, TypeError, "target must hold class indices"),
    (lambda c: {**c, "target": torch.randn(5, 10, dtype=torch.float64)}, ValueError, "probability target"),
    (lambda c: {**c, "weight": torch.rand(10, dtype=torch.float64)}, ValueError, "weight must have one entry"),
    (lambda c: {**c, "w": c["w"][0]}, ValueError, r"linear_weight must have shape \(num_classes, \*out_features"),
    (lambda c: {**c, "w": c["w"].unsqueeze(1)}, ValueError, r"linear_bias must have shape \(11, 1\)"),
    (lambda c: {**c, "w": c["w"].unsqueeze(1), "b": None}, ValueError, r"target must have shape \(5, 1\)"),
    (lambda c: {**c, "softcap": -1.0}, ValueError, "softcap must be a positive"),
    (lambda c: {**c, "chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    (lambda c: {**c, "reduction": "avg"}, ValueError, "reduction must be"),
    (lambda c: {**c, "label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    (lambda c: {**c, "target": c["target"].clone().fill_(4).index_fill_(0, torch.tensor([3]), 11)}, IndexError,
     "target 11 at position 3 is out of bounds"),
    (lambda c: {**c, "b": [0.0] * 11}, TypeError, "linear_bias must be a Tensor"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument_and_leaves_grads_untouched(change, error, message):
    x, w, b, target = make_case(5, 4, 11)
    call = change(dict(x=x, w=w, b=b, target=target, weight=None, softcap=None, chunk_size=2, reduction="mean",
                       label_smoothing=0.0))
    for p in (x, w, b):
        p.grad = torch.full_like(p, 7.0)
    with pytest.raises(error, match=message):
        F.linear_cross_entropy(call["x"], call["w"], call["target"], linear_bias=call["b"], weight=call["weight"],
                               softcap=call["softcap"], chunk_size=call["chunk_size"], reduction=call["reduction"],
                               label_smoothing=call["label_smoothing"]).backward()
    for p in (x, w, b):
        assert (p.grad == 7.0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_memory_stays_at_one_chunk_of_logits(device):
    """The (N, V) logits never exist: the largest allocation of a forward + backward is one chunk of logits
    (the profiler's record of every allocation), for every reduction."""
    n, h, v, chunk = 512, 16, 2000, 64
    x, w, b, target = make_case(n, h, v, dtype=torch.float32, device=device, bias=False)
    for reduction in ("mean", "none"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            F.linear_cross_entropy(x, w, target, chunk_size=chunk, reduction=reduction).sum().backward()
        key = "cpu_memory_usage" if device == "cpu" else "device_memory_usage"
        largest = max(getattr(e, key, 0) for e in prof.events())
        assert 0 < largest <= chunk * v * 4, (reduction, largest)
        # ...against the N×V logits and their gradient that linear + cross_entropy allocates.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            reference(x, w, None, target, reduction=reduction).sum().backward()
        assert max(getattr(e, key, 0) for e in prof.events()) >= n * v * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_probability_targets_with_every_option(device, dtype):
    x, w, b, target = make_case(23, 8, 40, dtype=dtype, device=device, prob=True)
    weight = torch.rand(40, device=device, dtype=torch.float64)
    options = dict(weight=weight.to(dtype), label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0, chunk_size=6)
    params = [x, w, b]
    loss, grads = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, **options), params)
    exact = [p.detach().double().requires_grad_() for p in params]
    options.update(weight=weight.to(dtype).double())
    options.pop("chunk_size")
    ref_loss, ref_grads = loss_and_grads(lambda: reference(*exact, target.double(), **options), exact)
    assert_close_scaled(loss, ref_loss.to(dtype), dtype)
    for g, r in zip(grads, ref_grads):
        assert_close_scaled(g, r.to(dtype), dtype)


def test_probability_target_under_autocast_stays_fp32_like_torch():
    x, w, b, target = make_case(12, 8, 20, dtype=torch.float32, prob=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b)
        ref = TF.cross_entropy(TF.linear(x, w, b), target)
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **TOL[torch.bfloat16])


def test_fp64_under_autocast_is_left_in_fp64_like_torch():
    x, w, b, target = make_case(12, 8, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.linear_cross_entropy(x, w, target, linear_bias=b)
        ref = TF.cross_entropy(TF.linear(x, w, b), target)
    assert loss.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])


@pytest.mark.parametrize("ignore_index", [-100, 3, 2**32 + 3])
def test_int32_targets_and_any_ignore_index(ignore_index):
    """An ignore_index beyond int32 ignores nothing (it would wrap to 3 if compared in int32)."""
    x, w, b, target = make_case(30, 6, 12, ignored=0.0)
    target[::4] = 3
    loss = F.linear_cross_entropy(x, w, target.int(), linear_bias=b, ignore_index=ignore_index, chunk_size=7)
    ref = reference(x, w, b, target, ignore_index=ignore_index)
    torch.testing.assert_close(loss, ref, **TOL[torch.float64])


def test_transposed_weight_and_input_aliasing_the_weight():
    """A weight stored transposed (a (H, V) parameter's .t()) and input rows that are rows of the weight."""
    base = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 40, (10,))

    def run(fn):
        loss = fn(base.t()[:10], base.t(), target)  # input: the first 10 rows of the (40, 6) weight
        (grad,) = torch.autograd.grad(loss, base)
        return loss, grad

    loss, grad = run(lambda x, w, t: F.linear_cross_entropy(x, w, t, chunk_size=3))
    ref_loss, ref_grad = run(lambda x, w, t: TF.cross_entropy(TF.linear(x, w), t))
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float64])


@pytest.mark.parametrize("second", ["jacrev(grad)", "hessian", "jacrev(jacfwd)", "jacfwd(jacfwd)"])
def test_second_derivatives_under_torch_func_raise(second):
    """Any transform of a first derivative, reverse or forward mode: a clear error, not a gradient of 0 (the
    ops have no derivatives of their own, so a transform would otherwise take the first one as constant)."""
    x, w, b, target = make_case(7, 3, 9)
    func = torch.func

    def loss_of(w):
        return F.linear_cross_entropy(x.detach(), w, target)

    second_derivative = {
        "jacrev(grad)": func.jacrev(func.grad(loss_of)), "hessian": func.hessian(loss_of),
        "jacrev(jacfwd)": func.jacrev(func.jacfwd(loss_of)), "jacfwd(jacfwd)": func.jacfwd(func.jacfwd(loss_of)),
    }[second]
    if second == "jacrev(grad)":
        with pytest.raises(RuntimeError, match="double backward"):
            second_derivative(w.detach())
        return
    # The others go through forward mode (hessian is jacfwd(jacrev)), which is not implemented: torch's error
    # for that, or for jacfwd of jacfwd an assertion of torch's vmap before our Function is asked for its jvp
    # (the messages differ between torch versions).
    with pytest.raises((RuntimeError, NotImplementedError, AssertionError)):
        second_derivative(w.detach())


def test_forward_mode_raises():
    x, w, b, target = make_case(5, 3, 7)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda w: F.linear_cross_entropy(x.detach(), w, target), (w.detach(),),
                       (torch.randn_like(w),))


def test_batched_loss_gradients_match_torch():
    """autograd.grad(..., is_grads_batched=True): one gradient per entry of a batch of loss gradients."""
    x, w, b, target = make_case(9, 4, 11)
    scales = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b)
    grads = torch.autograd.grad(loss, (x, w), scales, is_grads_batched=True)
    ref = torch.autograd.grad(reference(x, w, b, target), (x, w), scales, is_grads_batched=True)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


# -- torch.vmap: per-sample losses and gradients, ensembles of heads, Jacobians --


def per_sample(fn, *batched):
    """fn on each sample of the batched arguments, results stacked: what vmap must give."""
    results = [fn(*(a[i] for a in batched)) for i in range(len(batched[0]))]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results)
    return tuple(torch.stack(r) for r in zip(*results))


VMAP_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(weight="rand", label_smoothing=0.1),
    dict(lse_square_scale=1e-2, softcap=2.5),
    dict(prob=True, label_smoothing=0.2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", VMAP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_vmap_per_sample_losses_and_gradients_match_torch(device, options):
    """torch.func's per-sample-gradient recipe, vmap(grad(loss of one sample)), over a batch of samples of 7 rows
    each (one sample with every row ignored: a NaN mean and zero gradients, as torch), against torch's linear
    + cross_entropy run sample by sample. The losses and input's gradient fold the samples into one call; the
    parameters' per-sample gradients take one call per sample."""
    options = dict(options)
    prob = options.pop("prob", False)
    batch, rows, h, v = 5, 7, 6, 23
    x, w, b, _ = make_case(batch * rows, h, v, device=device)
    x, w, b = x.detach().reshape(batch, rows, h), w.detach(), b.detach()
    if prob:
        target = torch.randn(batch, rows, v, dtype=x.dtype, device=device).softmax(-1)
    else:
        target = torch.randint(0, v, (batch, rows), device=device)
        target[torch.rand(batch, rows, device=device) < 0.2] = -100
        target[3] = -100
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(v, dtype=torch.float64, device=device)

    def ours(w, b, x, t):
        return F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=3, **options)

    def ref(w, b, x, t):
        return reference(x, w, b, t, **options)

    torch.testing.assert_close(torch.vmap(ours, in_dims=(None, None, 0, 0))(w, b, x, target),
                               per_sample(lambda x, t: ref(w, b, x, t), x, target), equal_nan=True,
                               **TOL[torch.float64])
    grads = torch.vmap(torch.func.grad(ours, argnums=(0, 1, 2)), in_dims=(None, None, 0, 0))(w, b, x, target)
    expected = per_sample(lambda x, t: torch.func.grad(ref, argnums=(0, 1, 2))(w, b, x, t), x, target)
    for g, r in zip(grads, expected):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, **TOL[torch.float64])
    grad_input = torch.vmap(torch.func.grad(ours, argnums=2), in_dims=(None, None, 0, 0))(w, b, x, target)
    torch.testing.assert_close(grad_input, expected[2], **TOL[torch.float64])
    options["reduction"] = "none"
    torch.testing.assert_close(torch.vmap(ours, in_dims=(None, None, 0, 0))(w, b, x, target),
                               per_sample(lambda x, t: ref(w, b, x, t), x, target), **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,road", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "fp32")])
def test_vmap_in_low_precision_is_one_rounding_from_the_exact_result(device, dtype, road):
    """The folded call and the per-sample calls in fp32 and bf16 (CPU: bf16 GEMMs where the CPU has bf16 dot
    products, and the tiled road), against the exact per-sample results of the same rounded values."""
    if device != "cpu" and road != "auto":
        pytest.skip("the road setting is the CPU's")
    with cpu_half_gemms(road):
        _vmap_in_low_precision(device, dtype)


def _vmap_in_low_precision(device, dtype):
    batch, rows, h, v = 3, 40, 32, 300
    x = torch.randn(batch, rows, h, device=device).to(dtype)
    w = (torch.randn(v, h, device=device) / h**0.5).to(dtype)
    target = torch.randint(0, v, (batch, rows), device=device)

    def ours(w, x, t):
        return F.linear_cross_entropy(x, w, t, chunk_size=16)

    def exact(w, x, t):
        return reference(x.double(), w.double(), None, t)

    loss = torch.vmap(ours, in_dims=(None, 0, 0))(w, x, target)
    assert loss.dtype == dtype
    assert_close_scaled(loss, per_sample(lambda x, t: exact(w, x, t), x, target).to(dtype), dtype)
    grads = torch.vmap(torch.func.grad(ours, argnums=(0, 1)), in_dims=(None, 0, 0))(w, x, target)
    expected = per_sample(lambda x, t: torch.func.grad(exact, argnums=(0, 1))(w, x, t), x, target)
    for g, r in zip(grads, expected):
        assert g.dtype == dtype
        assert_close_scaled(g, r.to(dtype), dtype)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 4), rows=st.integers(1, 9), h=st.integers(1, 6), v=st.integers(1, 20),
    chunk=st.integers(1, 10), ignored=st.sampled_from([0.0, 0.4, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]), bias=st.booleans(),
)
def test_vmap_any_batch_shape_and_chunk_boundary_matches(batch, rows, h, v, chunk, ignored, reduction, bias):
    """vmap over samples of any size, chunks that split them anywhere (the folded rows cross samples' edges),
    an empty batch, samples with every row ignored; per-sample gradients of every argument."""
    x = torch.randn(batch, rows, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64)
    b = torch.randn(v, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (batch, rows))
    target[torch.rand(batch, rows) < ignored] = -100

    def ours(w, b, x, t):
        return F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, chunk_size=chunk)

    def ref(w, b, x, t):
        return reference(x, w, b, t, reduction=reduction)

    losses = torch.vmap(ours, in_dims=(None, None, 0, 0))(w, b, x, target)
    assert losses.shape == ((batch, rows) if reduction == "none" else (batch,))
    if batch:
        torch.testing.assert_close(losses, per_sample(lambda x, t: ref(w, b, x, t), x, target), equal_nan=True,
                                   **TOL[torch.float64])
    if reduction == "none":
        return
    argnums = (0, 1, 2) if bias else (0, 2)
    grads = torch.vmap(torch.func.grad(ours, argnums=argnums), in_dims=(None, None, 0, 0))(w, b, x, target)
    shapes = [(batch, *shape) for shape in (w.shape, None if b is None else b.shape, x.shape[1:]) if shape]
    assert [tuple(g.shape) for g in grads] == shapes
    if batch:
        expected = per_sample(lambda x, t: torch.func.grad(ref, argnums=argnums)(w, b, x, t), x, target)
        for g, r in zip(grads, expected):
            torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_heads_biases_and_class_weights(device):
    """An ensemble: a batch of linear_weight (and of linear_bias, of class weights) over one input, and
    gradients of each head, one call per head."""
    x, w, b, target = make_case(9, 5, 13, device=device)
    heads = torch.randn(4, 13, 5, dtype=torch.float64, device=device)
    biases = torch.randn(4, 13, dtype=torch.float64, device=device)
    class_weights = torch.rand(4, 13, dtype=torch.float64, device=device)
    x = x.detach()

    def ours(w, b, cw):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, weight=cw, label_smoothing=0.1, chunk_size=4)

    def ref(w, b, cw):
        return reference(x, w, b, target, weight=cw, label_smoothing=0.1)

    torch.testing.assert_close(torch.vmap(ours)(heads, biases, class_weights),
                               per_sample(ref, heads, biases, class_weights), **TOL[torch.float64])
    torch.testing.assert_close(torch.vmap(ours, in_dims=(0, None, None))(heads, b.detach(), None),
                               per_sample(lambda w: ref(w, b.detach(), None), heads), **TOL[torch.float64])
    grads = torch.vmap(torch.func.grad(ours, argnums=(0, 1)))(heads, biases, class_weights)
    expected = per_sample(torch.func.grad(ref, argnums=(0, 1)), heads, biases, class_weights)
    for g, r in zip(grads, expected):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_jacobians_match_torch(device):
    """jacrev, which vmaps the backward over the rows of an identity: of the per-row losses with respect to
    input, and of the mean loss with respect to linear_weight."""
    x, w, b, target = make_case(6, 4, 9, device=device)
    x, w, b = x.detach(), w.detach(), b.detach()
    jacobian = torch.func.jacrev(lambda x: F.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none",
                                                                  chunk_size=4))(x)
    expected = torch.func.jacrev(lambda x: reference(x, w, b, target, reduction="none"))(x)
    torch.testing.assert_close(jacobian, expected, **TOL[torch.float64])
    jacobian = torch.func.jacrev(lambda w: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4))(w)
    expected = torch.func.jacrev(lambda w: reference(x, w, b, target))(w)
    torch.testing.assert_close(jacobian, expected, **TOL[torch.float64])


def test_vmap_over_an_empty_batch_gives_empty_results():
    x, w, b, target = make_case(4, 3, 5)
    x, w = x.detach(), w.detach()
    xs, targets = x.expand(0, 4, 3), target.expand(0, 4)

    def loss_of(w, x, t):
        return F.linear_cross_entropy(x, w, t)

    assert torch.vmap(loss_of, in_dims=(None, 0, 0))(w, xs, targets).shape == (0,)
    grads = torch.vmap(torch.func.grad(loss_of, argnums=(0, 1)), in_dims=(None, 0, 0))(w, xs, targets)
    assert grads[0].shape == (0, 5, 3) and grads[1].shape == (0, 4, 3)


def test_probability_target_that_requires_grad_raises_naming_it():
    x, w, b, target = make_case(5, 3, 7, prob=True)
    target.requires_grad_()
    with pytest.raises(RuntimeError, match="derivative for 'target'"):
        F.linear_cross_entropy(x, w, target).backward()


def test_zero_width_input():
    x = torch.randn(4, 0, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 5, (4,))
    assert_matches_reference(x, w, None, target, chunk_size=3)


# -- CPU bf16/fp16: the tiled road (fp32 GEMMs over blocks of linear_weight, no fp32 copy of it or its gradient) --
# bf16 takes it where the CPU has no bf16 dot products, or with FUSED_TRAIN_CPU_HALF_GEMMS=fp32 as here.


@pytest.fixture
def fp32_tiles():
    with cpu_half_gemms("fp32"):
        yield


def within_one_rounding(actual, exact):
    """Each element of actual (bf16/fp16) is exact rounded once: within one unit in the last place of exact's
    magnitude, plus 1/16 of the unit at the tensor's largest magnitude for the fp32 sums (in another order than
    fp64's, and cancelling: a gradient element is a difference of terms larger than itself). Summing in the
    low precision, chunk by chunk, would be several units off."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[actual.dtype]
    _, exponent = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), exponent - 1 - mantissa_bits)
    slack = ulp.max().item() / 16 if exact.numel() else 0.0
    err = (actual.double() - exact).abs()
    assert (err <= ulp + slack).all(), f"{(err - ulp).max().item()} beyond one rounding"


def exact_reference(params, target, grad_loss_seed=1, **options):
    """linear + cross_entropy in fp64 on the same (rounded) values, and its gradients for the same (rounded) loss
    gradient (loss_and_grads')."""
    exact = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    if options.get("weight") is not None:
        options["weight"] = options["weight"].double()
    target = target.double() if target.is_floating_point() else target
    return loss_and_grads(lambda: reference(*exact, target, **options), exact, grad_loss_seed,
                          grad_loss_dtype=params[0].dtype)


@pytest.mark.usefixtures("fp32_tiles")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_half_precision_every_option_across_tiles_is_one_rounding(dtype, options, bias):
    """37 rows × 50 classes in 8 × 8 tiles (both not multiples of 8): the loss and every gradient within one
    rounding of the fp64 result, so each gradient was summed in fp32 over every tile and rounded once."""
    options = dict(options)
    x, w, b, target = make_case(37, 16, 50, dtype=dtype, bias=bias)
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(50, dtype=torch.float64).to(dtype)
    if "ignore_index" in options:
        target[target == -100] = options["ignore_index"]
    params = [x, w, b]
    loss, grads = loss_and_grads(
        lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=8, **options), params)
    ref_loss, ref_grads = exact_reference(params, target, **options)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    within_one_rounding(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        within_one_rounding(g, r)


@pytest.mark.usefixtures("fp32_tiles")
def test_cpu_bf16_weight_gradient_over_many_row_chunks_is_rounded_once():
    """600 rows in 75 chunks: a weight gradient added up in bf16 chunk by chunk would be several roundings off."""
    x, w, b, target = make_case(600, 8, 30, dtype=torch.bfloat16)
    params = [x, w, b]
    _, grads = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=8), params)
    _, ref_grads = exact_reference(params, target)
    for g, r in zip(grads, ref_grads):
        within_one_rounding(g, r)


@pytest.mark.usefixtures("fp32_tiles")
@pytest.mark.parametrize("offset", ["large", "growing"])
def test_cpu_bf16_logits_far_from_zero_or_growing_across_class_blocks(offset):
    """The online log-sum-exp: a common offset of 3000 (exp would overflow unshifted), and logits that grow by
    40 per block of classes, so each row's running shift moves and its sums are rescaled block after block."""
    x, w, _, target = make_case(20, 8, 64, dtype=torch.bfloat16, bias=False)
    b = (torch.full((64,), 3000.0) if offset == "large" else torch.arange(64.0) * 5.0).bfloat16().requires_grad_()
    params = [x, w, b]
    for options in (dict(), dict(label_smoothing=0.1, lse_square_scale=1e-4, reduction="sum")):
        loss, grads = loss_and_grads(
            lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=8, **options), params)
        ref_loss, ref_grads = exact_reference(params, target, **options)
        assert loss.isfinite().all()
        within_one_rounding(loss, ref_loss)
        for g, r in zip(grads, ref_grads):
            within_one_rounding(g, r)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 30), h=st.integers(1, 9), v=st.integers(1, 60), chunk=st.integers(1, 40),
    ignored=st.sampled_from([0.0, 0.3, 1.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(), prob=st.booleans(),
)
def test_cpu_bf16_any_shape_and_tile_boundary_matches(n, h, v, chunk, ignored, reduction, bias, prob):
    """Tiles of chunk × chunk over any N and V: N, V below, at and past the tile, N = 0, every row ignored; and
    the same chunks of rows on the native bf16 road where the CPU has it."""
    x, w, b, target = make_case(n, h, v, dtype=torch.bfloat16, bias=bias, prob=prob, ignored=ignored)
    params = [x, w, b]
    ref_loss, ref_grads = exact_reference(params, target, reduction=reduction)
    for road in ("fp32", "auto") if NATIVE_CPU_BF16_GEMMS else ("fp32",):
        with cpu_half_gemms(road):
            loss, grads = loss_and_grads(
                lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk, reduction=reduction),
                params)
        assert_close_scaled(loss, ref_loss.to(loss.dtype), torch.bfloat16)
        for g, r in zip(grads, ref_grads):
            assert_close_scaled(g, r.to(g.dtype), torch.bfloat16)


@pytest.mark.usefixtures("fp32_tiles")
def test_cpu_bf16_memory_holds_no_fp32_copy_of_the_weight_or_its_gradient():
    """The largest allocation of a forward + backward is no larger than the bf16 weight gradient it returns:
    no fp32 copy of linear_weight (4·V·H bytes) or of its gradient, and nothing of N × V."""
    v, h = 2000, 16
    for reduction, largest in _largest_bf16_allocations(512, h, v, chunk=64).items():
        assert 0 < largest <= v * h * 2, (reduction, largest)


def _largest_bf16_allocations(n, h, v, chunk):
    """The largest single allocation of a bf16 forward + backward in chunks of chunk rows, per reduction."""
    x, w, b, target = make_case(n, h, v, dtype=torch.bfloat16)
    largest = {}
    for reduction in ("mean", "none"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk, reduction=reduction).sum().backward()
        # ATen's allocations one by one (the op's own event sums those it keeps: its outputs).
        largest[reduction] = max(getattr(e, "cpu_memory_usage", 0) for e in prof.events()
                                 if e.name.startswith("aten::"))
    return largest


# -- CPU bf16 on a CPU with bf16 dot products: three GEMMs in bf16 through oneDNN, the logits rounded to bf16 --


_FORWARD_ONLY = dict(reduction=1, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0,
                     chunk_rows=0, input_grad=False, linear_weight_grad=False, linear_bias_grad=False)


@pytest.mark.parametrize("setting", ["auto", "fp32", "onednn_off"])
def test_cpu_bf16_road_follows_the_cpu_and_the_switches(setting):
    """Which GEMMs ran, told apart by the rows' log-sum-exp: integer logits from 17 to 496, exact in fp32, most of
    those past 256 odd, so bf16 GEMMs (whose output is rounded to bf16, as torch's bf16 linear) move them by 1 and
    fp32 GEMMs keep them. bf16 GEMMs run only where the CPU has bf16 dot products, with oneDNN on and without
    FUSED_TRAIN_CPU_HALF_GEMMS=fp32."""
    x = torch.randint(1, 17, (12, 1)).bfloat16()
    w = torch.randint(17, 32, (40, 1)).bfloat16()
    target = torch.randint(0, 40, (12,))
    exact = x.double() @ w.double().T
    exact_lse, rounded_lse = exact.logsumexp(1), exact.bfloat16().double().logsumexp(1)
    assert (exact_lse - rounded_lse).abs().max() > 0.5  # the two roads differ by far more than fp32's error
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = setting != "onednn_off"
    try:
        with cpu_half_gemms("fp32" if setting == "fp32" else "auto"):
            row_lse = ops.linear_cross_entropy_forward(x, w, target, None, None, **_FORWARD_ONLY)[1]
    finally:
        torch.backends.mkldnn.enabled = onednn
    native = setting == "auto" and NATIVE_CPU_BF16_GEMMS
    torch.testing.assert_close(row_lse.sum(1).double(), rounded_lse if native else exact_lse, rtol=1e-6, atol=1e-4)


def test_cpu_half_gemms_setting_is_checked():
    x, w, _, target = make_case(4, 3, 5, dtype=torch.bfloat16, bias=False)
    with cpu_half_gemms("bf16"), pytest.raises(ValueError, match="FUSED_TRAIN_CPU_HALF_GEMMS must be 'auto' or "
                                                                   "'fp32', got 'bf16'"):
        F.linear_cross_entropy(x, w, target)


native_cpu_bf16 = pytest.mark.skipif(not NATIVE_CPU_BF16_GEMMS,
                                     reason="this CPU has no bf16 dot products (or oneDNN is off): bf16 is tiled")


@pytest.fixture
def bf16_gemms():
    with cpu_half_gemms("auto"):  # whatever FUSED_TRAIN_CPU_HALF_GEMMS says outside
        yield


def _relative_error(actual, exact):
    return ((actual.double() - exact).norm() / exact.norm()).item()


@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_bf16_gemms_are_as_accurate_as_torchs_bf16(options, bias):
    """Against fp64 on the same bf16 values, beside torch's own bf16 linear + cross_entropy (which rounds its
    logits and their gradient to bf16 as these GEMMs do), for loss.backward(): the input's gradient within
    1.15x torch's error, the bias's (a small, noisy sum) within 1.5x, the loss within 1.3x, the weight's within
    2.5x (rounded to bf16 once per chunk of rows, here 12, as many as by default). Over every option and 3 seeds:
    at most 1.03x, 1.20x, 1.00x and 2.16x."""
    options = dict(options)
    x, w, b, target = make_case(300, 64, 1000, dtype=torch.bfloat16, bias=bias)
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(1000, dtype=torch.float64).bfloat16()
    if "ignore_index" in options:
        target[target == -100] = options["ignore_index"]
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=25, **options),
                          params, grad_loss_seed=None)
    torchs = loss_and_grads(lambda: reference(x, w, b, target, **options), params, grad_loss_seed=None)
    exact = exact_reference(params, target, grad_loss_seed=None, **options)
    bounds = [1.3, 1.15, 2.5, 1.5]  # loss, input, weight, bias
    for ours_, torchs_, exact_, bound in zip([ours[0], *ours[1]], [torchs[0], *torchs[1]], [exact[0], *exact[1]],
                                             bounds):
        assert ours_.dtype == torchs_.dtype == torch.bfloat16
        assert _relative_error(ours_, exact_) <= bound * _relative_error(torchs_, exact_)


@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
def test_cpu_bf16_gemms_hold_no_fp32_copy_and_no_n_by_v():
    """The largest allocation of a forward + backward is no larger than the bf16 weight gradient it returns: one
    chunk of bf16 logits (64 x 2000), no fp32 copy of linear_weight or of its gradient, nothing of N x V."""
    n, h, v = 512, 256, 2000
    for reduction, largest in _largest_bf16_allocations(n, h, v, chunk=64).items():
        assert 0 < largest <= v * h * 2 < min(v * h * 4, n * v * 2), (reduction, largest)


@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
def test_cpu_bf16_gemms_round_the_weight_gradient_about_twelve_times_at_any_n():
    """The weight's gradient is rounded to bf16 once per chunk of rows, so bf16 chunks are a twelfth of the logits
    however large: 65536 x 4096 logits in 13 chunks (a twelfth is 5461 rows), where fp32's 64 MiB cap makes 16."""
    n, h, v = 65536, 4, 4096
    for dtype, chunks in ((torch.bfloat16, 13), (torch.float32, 16)):
        x, w, _, target = make_case(n, h, v, dtype=dtype, bias=False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            F.linear_cross_entropy(x, w, target).backward()
        calls = [e for e in prof.events() if e.name == "fused_train::cross_entropy_forward_backward_"]
        assert len(calls) == chunks, (dtype, len(calls))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_ignored_rows_infinite_loss_gradient_is_ignored_like_torch(dtype):
    """loss_per_token / tokens_in_its_sequence, a sequence of padding only: inf (or NaN) at ignored rows, whose
    gradient is 0 in torch; no NaN may reach any gradient (the weight's sums over every row)."""
    x, w, b, target = make_case(12, 8, 20, dtype=dtype, ignored=0.0)
    target[4:7] = -100
    grad_loss = torch.ones(12, dtype=dtype)
    grad_loss[4], grad_loss[5] = float("inf"), float("nan")
    loss = F.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none", chunk_size=5)
    loss.backward(grad_loss)
    exact = [p.detach().double().requires_grad_() for p in (x, w, b)]
    reference(*exact, target, reduction="none").backward(grad_loss.double())
    for p, e in zip((x, w, b), exact):
        assert p.grad.isfinite().all()
        assert_close_scaled(p.grad, e.grad.to(dtype), dtype)
