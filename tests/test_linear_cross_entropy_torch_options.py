"""linear_cross_entropy and LinearCrossEntropyLoss with torch's ``options=torch.nn.LinearCrossEntropyOptions(...)``
(torch >= 2.14): the chunks torch would take, torch's results, the fp32 sum of linear_weight's gradient where
torch's acc_policy and acc_dtype ask for one, conflicts and wrong types refused before anything is computed."""

import pytest
import torch
import torch.nn.functional as TF

import fused_train
import fused_train.nn.functional as F
from conftest import DEVICES, NATIVE_CPU_BF16_GEMMS, TOL, cpu_half_gemms
from test_linear_cross_entropy import _relative_error, exact_reference, loss_and_grads, make_case, reference

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


native_cpu_bf16 = pytest.mark.skipif(not NATIVE_CPU_BF16_GEMMS,
                                     reason="this CPU has no bf16 dot products (or oneDNN is off): bf16 is tiled")


@pytest.fixture
def bf16_gemms():
    with cpu_half_gemms("auto"):  # whatever FUSED_TRAIN_CPU_HALF_GEMMS says outside
        yield


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


def test_module_refuses_k_dimensional_out_features():
    with pytest.raises(ValueError, match=r"out_features must be \(\)"):
        fused_train.nn.LinearCrossEntropyLoss(16, 50, out_features=(4,))
    assert fused_train.nn.LinearCrossEntropyLoss(16, 50, out_features=()).linear.weight.shape == (50, 16)


@needs_options
@pytest.mark.smoke
def test_torch_compile_with_options_without_graph_breaks():
    x, w, b, target = make_case(17, 8, 30, dtype=torch.bfloat16)
    options = Options(batch_chunk_size=4, acc_policy="accurate", acc_dtype=torch.float32)

    def step(x, w, b, target):
        return F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1, options=options)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    params = [x, w, b]
    loss, grads = loss_and_grads(lambda: compiled(x, w, b, target), params)
    ref_loss, ref_grads = loss_and_grads(lambda: step(x, w, b, target), params)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


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
