"""linear_cross_entropy and LinearCrossEntropyLoss where torch's API goes beyond one (V, H) head:
``options=torch.nn.LinearCrossEntropyOptions(...)`` (torch >= 2.14: the chunks torch would take, torch's results,
the fp32 sum of linear_weight's gradient where torch's acc_policy and acc_dtype ask for one, conflicts and wrong
types refused before anything is computed), and K-dimensional losses, linear_weight (C, *out_features, H)."""

import pytest
import torch
import torch.nn.functional as TF

import fused_train
import fused_train.nn.functional as F
from conftest import DEVICES, NATIVE_CPU_BF16_GEMMS, TOL, assert_close_scaled, cpu_half_gemms
from test_linear_cross_entropy import (  # noqa: F401 (bf16_gemms: a fixture)
    _relative_error,
    assert_compiles_whole_and_matches_eager,
    bf16_gemms,
    exact_reference,
    loss_and_grads,
    make_case,
    native_cpu_bf16,
    reference,
)

Options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
needs_options = pytest.mark.skipif(Options is None,
                                   reason=f"torch {torch.__version__} has no LinearCrossEntropyOptions")


def chunks_taken(fn) -> int:
    """How many chunks of logits a forward + backward of fn() computes (one fused loss call per chunk)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn().backward()
    return sum(e.name == "fused_train::cross_entropy_forward_backward_" for e in prof.events())


@needs_options
@pytest.mark.parametrize("n,h,v", [(300, 16, 100), (37, 64, 40), (1000, 8, 1000)])
@pytest.mark.parametrize("kwargs", [dict(batch_chunk_size=7), dict(chunking_method=None),
                                    dict(chunking_method=None, batch_chunk_size=64),
                                    dict(chunking_method="aspect_ratio"), dict(chunking_method="aspect_ratio:2"),
                                    dict(batch_chunk_size=5000)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_chunks_are_the_ones_torch_resolves(n, h, v, kwargs):
    """The rows per chunk torch's own resolution (LinearCrossEntropyOptions._adjust) gives for these options."""
    x, w, _, target = make_case(n, h, v, dtype=torch.float32, bias=False)
    options = Options(**kwargs)
    rows = options._adjust(n, h, v, torch.float32, torch.device("cpu")).batch_chunk_size
    taken = chunks_taken(lambda: F.linear_cross_entropy(x, w, target, options=options))
    assert taken == -(-n // rows), (rows, taken)


@needs_options
def test_resolution_agrees_with_torchs_adjust_everywhere():
    """The rows per chunk (or torch's ValueError) for every chunking option over shapes including N = 0, a raw
    aspect-ratio size of 0 and batch_chunk_size > N; and whether linear_weight's gradient gets an fp32 sum:
    exactly where torch resolves an fp32 acc_dtype for bf16/fp16 with a policy that keeps an fp32 scratch."""
    from fused_train.nn.functional import _read_torch_options

    cpu = torch.device("cpu")
    for rows, classes, hidden in [(0, 1000, 16), (1, 40, 64), (7, 10, 1000), (100, 1000, 16), (4096, 128256, 2048)]:
        for method in ("auto", None, "aspect_ratio", "aspect_ratio:3"):
            for size in (None, 1, 7, 5000):
                options = Options(chunking_method=method, batch_chunk_size=size)
                try:
                    expected = options._adjust(rows, hidden, classes, torch.float32, cpu).batch_chunk_size
                except ValueError:
                    expected = "raises"
                try:
                    got = _read_torch_options(options, 0, rows, classes, hidden, torch.float32, cpu)[0]
                except ValueError:
                    got = "raises"
                if method == "auto" and size is None:
                    expected = 0  # ours
                assert got == expected, (rows, classes, hidden, method, size)
    for device in ("cpu", "cuda", "meta"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for policy in ("auto", "accurate", "compact"):
                for acc_dtype in (None, torch.float32, dtype):
                    options = Options(acc_policy=policy, acc_dtype=acc_dtype)
                    torchs = options._adjust(64, 16, 100, dtype, torch.device(device))
                    fp32_scratch = (torchs.acc_dtype == torch.float32 and dtype != torch.float32
                                    and (torchs.acc_policy == "accurate" or device != "cuda"))
                    ours = _read_torch_options(options, 0, 64, 100, 16, dtype, torch.device(device))[1]
                    assert ours == fp32_scratch, (device, dtype, policy, acc_dtype)


@needs_options
def test_automatic_chunking_is_ours():
    """chunking_method='auto' (torch's default) sizes the chunks as chunk_size=None does, and an explicit
    batch_chunk_size or chunk_size still wins over it."""
    x, w, _, target = make_case(2000, 8, 3000, dtype=torch.float32, bias=False)
    ours = chunks_taken(lambda: F.linear_cross_entropy(x, w, target))
    assert ours == chunks_taken(lambda: F.linear_cross_entropy(x, w, target, options=Options()))
    assert ours != 2000 // 100
    assert chunks_taken(lambda: F.linear_cross_entropy(x, w, target, options=Options(batch_chunk_size=100))) == 20
    assert chunks_taken(lambda: F.linear_cross_entropy(x, w, target, chunk_size=100, options=Options())) == 20


@needs_options
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored")  # torch's, for label smoothing
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="sum", label_smoothing=0.1), dict(reduction="none"),
                                    dict(weight="rand", ignore_index=3), dict(prob=True)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("options", [dict(), dict(batch_chunk_size=9), dict(acc_policy="accurate"),
                                     dict(acc_policy="compact", chunking_method="aspect_ratio:2")],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_same_results_as_torchs_linear_cross_entropy_with_the_same_options_fp64(device, kwargs, options):
    kwargs = dict(kwargs)
    x, w, b, target = make_case(50, 16, 70, device=device, prob=kwargs.pop("prob", False))
    if kwargs.get("weight") == "rand":
        kwargs["weight"] = torch.rand(70, dtype=torch.float64, device=device)
    if "ignore_index" in kwargs:
        target[target == -100] = kwargs["ignore_index"]
    opts = Options(**options)
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, options=opts, **kwargs), params)
    torchs = loss_and_grads(lambda: TF.linear_cross_entropy(x, w, target, linear_bias=b, options=opts, **kwargs),
                            params)
    torch.testing.assert_close(ours[0], torchs[0], **TOL[torch.float64])
    for g, r in zip(ours[1], torchs[1]):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def _weight_grad_errors(options, seed, device="cpu", **kwargs):
    """linear_weight's gradient's error against fp64 on the same bf16 values: ours with options in 12 chunks,
    ours with the sum in bf16 (no options) in the same chunks, and torch's bf16 linear + cross_entropy."""
    torch.manual_seed(seed)
    x, w, b, target = make_case(300, 64, 1000, dtype=torch.bfloat16, device=device)
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, options=options, **kwargs),
                          params, grad_loss_seed=None)
    in_bf16 = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=25, **kwargs),
                             params, grad_loss_seed=None)
    torchs = loss_and_grads(lambda: reference(x, w, b, target, **kwargs), params, grad_loss_seed=None)
    exact = exact_reference(params, target, grad_loss_seed=None, **kwargs)
    assert ours[1][1].dtype == torch.bfloat16
    return [_relative_error(result[1][1], exact[1][1]) for result in (ours, in_bf16, torchs)], ours, in_bf16


@needs_options
@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="sum"), dict(label_smoothing=0.1), dict(softcap=2.5)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_accurate_policy_sums_the_weight_gradient_in_fp32(seed, kwargs):
    """acc_policy='accurate' with acc_dtype fp32 (and 'auto', which is 'accurate' with fp32 on CPU for bf16): each
    chunk's part of linear_weight's gradient rounded to bf16 once, summed in fp32, rounded once more. Against fp64
    on the same bf16 values, over 12 chunks: within 1.45x torch's bf16 error, and below the bf16 sum's (at most
    1.33x and 2.24x torch's over these and every option of test_cpu_bf16_gemms_are_as_accurate_as_torchs_bf16,
    3 seeds). The other gradients and the loss are those of the bf16 sum, bit for bit."""
    for options in (Options(acc_policy="accurate", acc_dtype=torch.float32, batch_chunk_size=25),
                    Options(batch_chunk_size=25)):
        (ours, in_bf16, torchs), fp32_sum, bf16_sum = _weight_grad_errors(options, seed, **kwargs)
        assert ours <= 1.45 * torchs, (ours, torchs)
        assert ours < in_bf16, (ours, in_bf16)
        assert torch.equal(fp32_sum[0], bf16_sum[0])
        for i in (0, 2):
            assert torch.equal(fp32_sum[1][i], bf16_sum[1][i])


@needs_options
@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
def test_fp32_sum_is_more_accurate_than_torchs_chunked_path_with_the_same_options():
    """torch's "accurate" path keeps each chunk's part in fp32 but adds it into the bf16 gradient (rounding the
    running sum once per chunk); here the fp32 buffer holds the sum. 24 chunks of 25 rows: linear_weight's
    gradient's error against fp64 below half of torch's with the same options (about a sixth when measured)."""
    x, w, b, target = make_case(600, 64, 1000, dtype=torch.bfloat16)
    options = Options(acc_policy="accurate", acc_dtype=torch.float32, batch_chunk_size=25)
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, options=options), params,
                          grad_loss_seed=None)
    torchs = loss_and_grads(lambda: TF.linear_cross_entropy(x, w, target, linear_bias=b, options=options), params,
                            grad_loss_seed=None)
    exact = exact_reference(params, target, grad_loss_seed=None)
    assert _relative_error(ours[1][1], exact[1][1]) < 0.5 * _relative_error(torchs[1][1], exact[1][1])


@needs_options
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [dict(acc_policy="compact"), dict(acc_policy="accurate"),
                                    dict(acc_policy="accurate", acc_dtype=torch.bfloat16)],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_policies_that_keep_the_input_dtype_sum_it_in_the_input_dtype(device, kwargs):
    """'compact' on CPU with acc_dtype None (the input's dtype, as torch resolves it), 'accurate' without an fp32
    acc_dtype: the weight's gradient bit for bit that of options=None, on every road."""
    if device == "cpu" and not NATIVE_CPU_BF16_GEMMS:
        pytest.skip("bf16 is tiled on this CPU: every sum is fp32 there")
    x, w, b, target = make_case(300, 64, 1000, dtype=torch.bfloat16, device=device)
    params = [x, w, b]
    with cpu_half_gemms("auto"):
        ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b,
                                                             options=Options(batch_chunk_size=25, **kwargs)), params)
        plain = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=25), params)
    for g, r in zip(ours[1], plain[1]):
        assert torch.equal(g, r)


@needs_options
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_sum_on_every_device_and_road(device):
    """acc_policy='accurate', acc_dtype fp32, bf16: an fp32 sum on CUDA too ('compact' is torch's bf16 sum there),
    and on CPU's tiled road (fp32 GEMMs) the same gradients as without options, already summed in fp32."""
    x, w, b, target = make_case(200, 32, 300, dtype=torch.bfloat16, device=device)
    params = [x, w, b]
    accurate = Options(acc_policy="accurate", acc_dtype=torch.float32, batch_chunk_size=20)
    roads = ["auto", "fp32"] if device == "cpu" else ["auto"]
    for road in roads:
        with cpu_half_gemms(road):
            ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, options=accurate),
                                  params, grad_loss_seed=None)
            plain = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=20),
                                   params, grad_loss_seed=None)
        exact = exact_reference(params, target, grad_loss_seed=None)
        tiled = device == "cpu" and (road == "fp32" or not NATIVE_CPU_BF16_GEMMS)
        if tiled:
            assert torch.equal(ours[1][1], plain[1][1])
        else:
            assert _relative_error(ours[1][1], exact[1][1]) < _relative_error(plain[1][1], exact[1][1])
        torch.testing.assert_close(ours[1][1].double(), exact[1][1], **TOL[torch.bfloat16])


@needs_options
@native_cpu_bf16
@pytest.mark.usefixtures("bf16_gemms")
def test_fp32_sum_costs_one_fp32_weight_and_no_n_by_v():
    """The largest single allocation with the fp32 sum is that sum (4 bytes per weight element); without it the
    bf16 gradient (2 bytes); nothing of N x V either way."""
    n, h, v = 1024, 256, 2000
    x, w, b, target = make_case(n, h, v, dtype=torch.bfloat16)
    largest = {}
    for name, options in (("fp32", Options(batch_chunk_size=64)), ("bf16", Options(batch_chunk_size=64,
                                                                                   acc_policy="compact"))):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            F.linear_cross_entropy(x, w, target, linear_bias=b, options=options).backward()
        largest[name] = max(getattr(e, "cpu_memory_usage", 0) for e in prof.events() if e.name.startswith("aten::"))
    assert largest == {"fp32": v * h * 4, "bf16": v * h * 2}
    assert n * v * 2 > v * h * 4


@needs_options
@pytest.mark.parametrize("call, error, message", [
    (dict(options=dict(batch_chunk_size=8, chunking_method="aspect_ratio")), ValueError,
     r"options.batch_chunk_size \(=8\) and options.chunking_method"),
    (dict(chunk_size=8, options=dict(batch_chunk_size=9)), ValueError, r"chunk_size \(=8\) and options give"),
    (dict(options=dict(acc_dtype=torch.float64)), ValueError, "options.acc_dtype must be None"),
    (dict(options=dict(acc_dtype=torch.float16)), ValueError, "options.acc_dtype must be None"),
])
def test_conflicting_options_raise_naming_them_and_leave_grads_untouched(call, error, message):
    x, w, b, target = make_case(40, 8, 11, dtype=torch.bfloat16)
    for p in (x, w, b):
        p.grad = torch.full_like(p, 7.0)
    kwargs = dict(call, options=Options(**call["options"]))
    with pytest.raises(error, match=message):
        F.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs).backward()
    for p in (x, w, b):
        assert (p.grad == 7.0).all()


@needs_options
def test_aspect_ratio_over_zero_width_input_raises_naming_it():
    x, w, _, target = make_case(4, 0, 11, bias=False)
    with pytest.raises(ValueError, match="options.chunking_method 'aspect_ratio' needs in_features > 0"):
        F.linear_cross_entropy(x, w, target, options=Options(chunking_method="aspect_ratio"))


def test_options_of_another_type_raise_naming_options():
    x, w, _, target = make_case(4, 8, 11, bias=False)
    wanted = "a torch.nn.LinearCrossEntropyOptions or None" if Options is not None else "it came in 2.14"
    with pytest.raises(TypeError, match=f"options must be .*{wanted}.*got dict"):
        F.linear_cross_entropy(x, w, target, options={"batch_chunk_size": 2})
    assert x.grad is None and w.grad is None


@needs_options
def test_module_takes_torchs_options_and_state_dict_both_ways():
    options = Options(batch_chunk_size=7, acc_policy="accurate")
    torch.manual_seed(0)
    torchs = torch.nn.LinearCrossEntropyLoss(16, 50, bias=True, reduction="sum", dtype=torch.float64,
                                             options=options)
    ours = fused_train.nn.LinearCrossEntropyLoss(16, 50, bias=True, reduction="sum", dtype=torch.float64,
                                                 options=options)
    ours.load_state_dict(torchs.state_dict())
    torchs.load_state_dict(ours.state_dict())
    assert ours.options is options and "options=" in repr(ours)
    x = torch.randn(30, 16, dtype=torch.float64)
    target = torch.randint(0, 50, (30,))
    ours(x, target).backward()
    torchs(x, target).backward()
    for a, b in zip(ours.parameters(), torchs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    assert chunks_taken(lambda: ours(x, target)) == 5


@needs_options
@pytest.mark.smoke
def test_torch_compile_with_options_without_graph_breaks():
    x, w, b, target = make_case(17, 8, 30, dtype=torch.bfloat16)
    options = Options(batch_chunk_size=4, acc_policy="accurate", acc_dtype=torch.float32)

    def step(x, w, b, target):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, options=options)

    assert_compiles_whole_and_matches_eager(step, x, w, b, target)


def test_opcheck_with_the_fp32_weight_gradient_sum():
    x, w, b, target = make_case(9, 4, 11, dtype=torch.bfloat16)
    x, w, b = (t.detach() for t in (x, w, b))
    kw = dict(reduction=1, ignore_index=-100, label_smoothing=0.1, lse_square_scale=0.01, softcap=3.0, chunk_rows=4,
              opmath_weight_grad=True)
    grads = dict(input_grad=True, linear_weight_grad=True, linear_bias_grad=True)
    ops = torch.ops.fused_train
    torch.library.opcheck(ops.linear_cross_entropy_forward.default, (x, w, target, b, None), {**kw, **grads})
    _, lse, den, *_ = ops.linear_cross_entropy_forward(x, w, target, b, None, **kw, **grads)
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (torch.tensor(1.5), x, w, target, b, None, lse, den), {**kw, **grads})


# -- K-dimensional losses: linear_weight (C, *out_features, H), logits (N, C, *out_features) --


def k_dimensional_case(batch, h, c, out_features, dtype=torch.float64, prob=False, bias=True):
    x = torch.randn(*batch, h, dtype=dtype).requires_grad_()
    w = (torch.randn(c, *out_features, h, dtype=dtype) / h**0.5).requires_grad_()
    b = torch.randn(c, *out_features, dtype=dtype).requires_grad_() if bias else None
    if prob:
        target = torch.randn(*batch, c, *out_features, dtype=dtype).softmax(len(batch))
    else:
        target = torch.randint(0, c, (*batch, *out_features))
        target[torch.rand(target.shape) < 0.2] = -100
    return x, w, b, target


def k_dimensional_reference(x, w, b, target, softcap=None, lse_square_scale=0.0, **kwargs):
    """torch's definition: one linear over the flattened heads, the logits (N, C, *out_features), cross_entropy
    over dim 1 (fused_train's for the z-loss)."""
    c, out_features, h = w.shape[0], w.shape[1:-1], w.shape[-1]
    rows = x.reshape(-1, h)
    logits = TF.linear(rows, w.reshape(-1, h), None if b is None else b.reshape(-1))
    logits = logits.reshape(rows.shape[0], c, *out_features)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    prob = target.is_floating_point()
    target = target.reshape(rows.shape[0], *target.shape[x.dim() - 1:])
    loss_fn = (lambda *a, **k: F.cross_entropy(*a, lse_square_scale=lse_square_scale, **k)) if lse_square_scale \
        else TF.cross_entropy
    loss = loss_fn(logits, target, **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.reshape(*x.shape[:-1], *(target.shape[2:] if prob else target.shape[1:]))
    return loss


K_OPTIONS = [dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1),
             dict(weight="rand"), dict(weight="rand", reduction="none", ignore_index=2), dict(lse_square_scale=1e-2),
             dict(softcap=2.0, label_smoothing=0.2), dict(chunk_size=4)]


@pytest.mark.parametrize("kwargs", K_OPTIONS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("batch,out_features", [((13,), (3,)), ((13,), (3, 2)), ((2, 5), (4,)), ((7,), (1,))])
@pytest.mark.parametrize("prob", [False, True])
def test_k_dimensional_loss_matches_torchs_definition_fp64(kwargs, batch, out_features, prob):
    kwargs = dict(kwargs)
    if prob and "ignore_index" in kwargs:
        pytest.skip("ignore_index is for class indices")
    x, w, b, target = k_dimensional_case(batch, 8, 11, out_features, prob=prob)
    if kwargs.get("weight") == "rand":
        kwargs["weight"] = torch.rand(11, dtype=torch.float64)
    if "ignore_index" in kwargs:
        target[target == -100] = kwargs["ignore_index"]
    chunk_size = kwargs.pop("chunk_size", None)
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=chunk_size,
                                                         **kwargs), params)
    ref = loss_and_grads(lambda: k_dimensional_reference(x, w, b, target, **kwargs), params)
    assert ours[0].shape == ref[0].shape
    torch.testing.assert_close(ours[0], ref[0], **TOL[torch.float64])
    for g, r in zip(ours[1], ref[1]):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.skipif(not hasattr(TF, "linear_cross_entropy"), reason="torch < 2.14 has no F.linear_cross_entropy")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_dimensional_loss_matches_torchs_linear_cross_entropy(reduction):
    x, w, b, target = k_dimensional_case((20,), 16, 30, (2, 3))
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction), params)
    torchs = loss_and_grads(lambda: TF.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction),
                            params)
    torch.testing.assert_close(ours[0], torchs[0], **TOL[torch.float64])
    for g, r in zip(ours[1], torchs[1]):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_k_dimensional_loss_in_low_precision_is_one_rounding_from_the_exact_result(dtype):
    """Each position is summed in fp32 and the total divided once, so the loss is one rounding from fp64's; the
    gradients are those of the 2-D loss times the mean's 1/denominator (a second rounding in bf16/fp16)."""
    x, w, b, target = k_dimensional_case((40,), 16, 50, (3,), dtype=dtype)
    params = [x, w, b]
    ours = loss_and_grads(lambda: F.linear_cross_entropy(x, w, target, linear_bias=b), params)
    exact = [p.detach().double().requires_grad_() for p in params]
    ref = loss_and_grads(lambda: k_dimensional_reference(*exact, target), exact, grad_loss_dtype=dtype)
    assert ours[0].dtype == dtype
    assert_close_scaled(ours[0], ref[0].to(dtype), dtype)
    for g, r in zip(ours[1], ref[1]):
        assert_close_scaled(g, r.to(dtype), dtype)


def test_k_dimensional_loss_with_every_target_ignored_is_nan_with_zero_gradients_like_torch():
    x, w, b, target = k_dimensional_case((6,), 8, 10, (2,))
    target.fill_(-100)
    F.linear_cross_entropy(x, w, target, linear_bias=b).backward()
    ref = [p.detach().clone().requires_grad_() for p in (x, w, b)]
    k_dimensional_reference(*ref, target).backward()
    assert F.linear_cross_entropy(x, w, target, linear_bias=b).isnan()
    for p, r in zip((x, w, b), ref):
        torch.testing.assert_close(p.grad, r.grad, equal_nan=True)


@pytest.mark.parametrize("call, message", [
    (lambda x, w, b, t: (x[0], w, b, t[0]), r"needs batched input \(N, 8\)"),
    (lambda x, w, b, t: (x, w, b[:, :1], t), r"linear_bias must have shape \(10, 2\)"),
    (lambda x, w, b, t: (x, w, b, t[:, :1]), r"target must have shape \(6, 2\)"),
])
def test_k_dimensional_bad_shapes_raise_naming_the_argument(call, message):
    x, w, b, target = k_dimensional_case((6,), 8, 10, (2,))
    x_, w_, b_, t_ = call(x, w, b, target)
    with pytest.raises(ValueError, match=message):
        F.linear_cross_entropy(x_, w_, t_, linear_bias=b_)


def test_k_dimensional_weight_without_positions_raises_naming_it():
    x, w, b, target = k_dimensional_case((6,), 8, 10, (2, 0))
    with pytest.raises(ValueError, match=r"out_features \(2, 0\) hold no position"):
        F.linear_cross_entropy(x, w, target, linear_bias=b)


def test_k_dimensional_module_state_dict_like_torchs():
    """out_features as torch's module: self.linear holds C·prod(out_features) rows; the state_dict loads into
    torch's module and back (torch >= 2.14), with the same loss and gradients."""
    torch.manual_seed(0)
    ours = fused_train.nn.LinearCrossEntropyLoss(8, 10, out_features=(3, 2), bias=True, dtype=torch.float64)
    assert ours.linear.weight.shape == (60, 8) and "out_features=(3, 2)" in repr(ours)
    x = torch.randn(5, 8, dtype=torch.float64)
    target = torch.randint(0, 10, (5, 3, 2))
    ours(x, target).backward()
    w, b = ours.linear.weight.detach().reshape(10, 3, 2, 8), ours.linear.bias.detach().reshape(10, 3, 2)
    expected = [p.clone().requires_grad_() for p in (w, b)]
    k_dimensional_reference(x, *expected, target).backward()
    torch.testing.assert_close(ours.linear.weight.grad, expected[0].grad.reshape(60, 8), **TOL[torch.float64])
    torch.testing.assert_close(ours.linear.bias.grad, expected[1].grad.reshape(60), **TOL[torch.float64])
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        torchs = torch.nn.LinearCrossEntropyLoss(8, 10, out_features=(3, 2), bias=True, dtype=torch.float64)
        torchs.load_state_dict(ours.state_dict())
        ours.load_state_dict(torchs.state_dict())
        torch.testing.assert_close(ours(x, target), torchs(x, target), **TOL[torch.float64])


def test_k_dimensional_loss_under_torch_compile_and_torch_func_grad():
    x, w, b, target = k_dimensional_case((9,), 8, 12, (3,), dtype=torch.float32)

    def step(x, w, b, target):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, chunk_size=4)

    assert_compiles_whole_and_matches_eager(step, x, w, b, target)
    grads = torch.func.grad(step, argnums=(0, 1, 2))(x.detach(), w.detach(), b.detach(), target)
    step(x, w, b, target).backward()
    for g, p in zip(grads, (x, w, b)):
        torch.testing.assert_close(g, p.grad)
