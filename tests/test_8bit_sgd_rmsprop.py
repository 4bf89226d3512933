"""fused_train.optim.SGD8bit / RMSprop8bit: steps against torch.optim.SGD / RMSprop on the dequantized state, state
created as options switch on, small params on full-precision state, bytes per param, checkpoints both ways,
GradScaler, gradient zeroing, threads, bad arguments and ops, torch.compile and convergence."""

import io

import pytest
import torch

import fused_train
from fused_train import _ops
from fused_train.optim import RMSprop8bit, SGD8bit, _quantization as Q
from fused_train.reference import blockwise8bit_reference_step, torch_optimizer

from conftest import cuda_only, run_on_cpu_capability, skip_unless_ran_on

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]

SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(lr=0.05, momentum=0.5, nesterov=True, maximize=True),
]
RMSPROP_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=0.1, maximize=True),
    dict(lr=0.001, alpha=0.0, eps=1e-6),  # square_avg = g² each step (bitsandbytes refuses alpha=0)
]
CASES = ([(SGD8bit, "SGD", kw) for kw in SGD_CONFIGS] + [(RMSprop8bit, "RMSprop", kw) for kw in RMSPROP_CONFIGS])
CASE_IDS = [f"{name}-{i}" for i, (_, name, _) in enumerate(CASES)]


def _assert_param_close(p, ref, dtype, before):
    if dtype == torch.float32:
        # fp32 math in another operation order (torch's add with alpha is a fused multiply-add on CPU, its addcdiv
        # divides before it multiplies by lr): a few ulps of the param, and of the tensor's largest update, which may
        # be much larger than a param it leaves near 0
        update = (ref - before).abs().max().item()
        torch.testing.assert_close(p.detach(), ref, rtol=2e-6, atol=8 * 2 ** -23 * update)
    else:  # one rounding of the param's dtype apart at most
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        assert (p.detach().float() - ref.float()).abs().le(p.detach().float().abs() * ulp).all()


def _assert_state_close(state, ref_state):
    """Absmax within fp32 rounding; codes equal but where a moment an ulp from a midpoint takes the neighbour."""
    assert {k for k in state if k != "step"} == {k for k in ref_state if k != "step"}
    for key, value in ref_state.items():
        if key == "step":
            assert state[key].item() == value.item()
        elif key.endswith("_absmax"):
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=0)
        else:
            diff = (state[key].long() - value.long()).abs()
            assert diff.max() <= 1 and diff.float().mean() < 0.01, (key, diff.max(), diff.float().mean())


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("cls,torch_name,kwargs", CASES, ids=CASE_IDS)
def test_steps_match_torch_on_dequantized_state(cls, torch_name, kwargs, dtype):
    """Each step from the optimizer's own state: torch.optim's step on the dequantized state, then quantized. The
    first SGD step copies the gradient into the buffer, as torch's clone."""
    torch.manual_seed(0)
    shapes = [(300, 7), (1000,), (5,)]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    opt = cls(params, min_8bit_size=0, **kwargs)
    for step in range(5):
        grads = [torch.randn(s).to(dtype) * (10.0 ** (step - 2)) for s in shapes]
        expected = [blockwise8bit_reference_step(torch_name, p, g, opt.state[p], **kwargs)
                    for p, g in zip(params, grads)]
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, b, (ref_p, ref_state) in zip(params, before, expected):
            _assert_param_close(p, ref_p, dtype, b)
            _assert_state_close(opt.state[p], ref_state)


@pytest.mark.smoke
@pytest.mark.parametrize("n", [1, 255, 257, 32769, 70_001])
def test_first_moments_are_the_quantizers_codes(n):
    """SGD's first step sets buf = g; RMSprop with alpha 0 sets square_avg = g²: the kernel's codes are then exactly the
    Python quantizer's, across blocks and chunks."""
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-8, 2, n)
    p, q = torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True)
    p.grad, q.grad = g.clone(), g.clone()
    sgd = SGD8bit([p], lr=0.1, momentum=0.9, dampening=0.5, min_8bit_size=0)
    rms = RMSprop8bit([q], lr=0.1, alpha=0.0, min_8bit_size=0)
    sgd.step()
    rms.step()
    for opt, param, name, value, signed in ((sgd, p, "momentum_buffer", g, True), (rms, q, "square_avg", g * g, False)):
        codes, absmax = Q.quantize_blockwise(value, signed=signed)
        assert torch.equal(opt.state[param][f"{name}_codes"], codes), name
        assert torch.equal(opt.state[param][f"{name}_absmax"], absmax), name


def _float_sweep(stride: int) -> torch.Tensor:
    """Every stride-th fp32 bit pattern from 0 to 1, each value and threshold of both codes below 1 with its 3 fp32
    neighbours on either side, and 0."""
    sweep = torch.arange(0, 0x3F800001, stride, dtype=torch.int64).to(torch.int32).view(torch.float32)
    codes = (Q.SIGNED, Q.UNSIGNED)
    marks = torch.cat([code.values for code in codes] + [code.threshold for code in codes])
    marks = marks[(marks > 0) & (marks < 1)].view(torch.int32)
    near = (marks[:, None] + torch.arange(-3, 4, dtype=torch.int32)).view(torch.float32).reshape(-1)
    return torch.cat([sweep, near, torch.zeros(1)])


@pytest.mark.smoke
def test_codes_equal_the_quantizers_over_a_sweep_of_floats():
    """The vectorized quantizer (on AVX-512 a binade lookup, not the comparisons) against the Python quantizer's
    codes for ~270k magnitudes of every binade below 1, both signs, each block holding a 1 so that the kernel
    quantizes the magnitude itself (the unsigned code sees their squares); a whole block holding a NaN, through the
    vector body; and a 4-element tail with a NaN."""
    x = _float_sweep(3989)
    x = torch.cat([x, torch.full((-x.numel() % 255,), 0.5)])
    blocks = x.view(-1, 255)[:, torch.randperm(255, generator=torch.Generator().manual_seed(0))]
    g = torch.cat([blocks, torch.ones(blocks.shape[0], 1)], dim=1).reshape(-1)
    g = torch.where(torch.arange(g.numel()) % 3 == 0, -g, g)
    nan_block = torch.linspace(-1, 1, 256)
    nan_block[77] = float("nan")
    g = torch.cat([g, nan_block, torch.tensor([0.5, float("nan"), -0.25, 1e-30])])
    p, q = torch.zeros(g.numel(), requires_grad=True), torch.zeros(g.numel(), requires_grad=True)
    p.grad, q.grad = g.clone(), g.clone()
    sgd = SGD8bit([p], lr=0.1, momentum=0.9, min_8bit_size=0)
    rms = RMSprop8bit([q], lr=0.1, alpha=0.0, min_8bit_size=0)
    sgd.step()
    rms.step()
    for opt, param, name, value, signed in ((sgd, p, "momentum_buffer", g, True), (rms, q, "square_avg", g * g, False)):
        codes, absmax = Q.quantize_blockwise(value, signed=signed)
        got = opt.state[param][f"{name}_codes"]
        mismatch = (got != codes).nonzero().flatten()
        assert mismatch.numel() == 0, (name, value[mismatch[:5]].tolist(), got[mismatch[:5]], codes[mismatch[:5]])
        assert torch.equal(opt.state[param][f"{name}_absmax"].nan_to_num(-1), absmax.nan_to_num(-1)), name
    assert g.numel() > 250_000


def test_negative_square_average_counts_in_the_absmax_as_the_quantizer_counts_it():
    """RMSprop's alpha > 1 (torch allows it) makes the square average negative: its block's absmax is the largest
    magnitude in the vector body and the scalar tail alike, as the Python quantizer takes it; the codes are 0."""
    n = 300
    g = torch.randn(n, generator=torch.Generator().manual_seed(3))
    q = torch.zeros(n, requires_grad=True)
    q.grad = g.clone()
    opt = RMSprop8bit([q], lr=0.1, alpha=2.0, min_8bit_size=0)
    opt.step()
    codes, absmax = Q.quantize_blockwise((1 - 2.0) * g * g, signed=False)
    assert torch.equal(opt.state[q]["square_avg_absmax"], absmax)
    assert torch.equal(opt.state[q]["square_avg_codes"], codes)
    assert absmax[1] == (g[256:] * g[256:]).max()  # the 44-element tail block


@pytest.mark.smoke
def test_every_code_dequantizes_to_its_value():
    """All 256 codes of both codes in blocks of three scales: a step with a zero gradient halves each moment exactly
    (SGD: buf = 0.5 buf; RMSprop: square_avg = 0.5 square_avg + 0.5 * 0), so SGD's param shows the dequantized
    values themselves, and both moments come back with their codes unchanged and their absmax halved."""
    n = 3 * 256 + 37
    codes = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)
    codes = codes[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    codes[:3] = 255  # each of the first blocks holds the value 1, so the halved absmax is the block's largest value
    codes[256:259] = 255
    codes[512:515] = 255
    codes[768:771] = 255
    absmax = torch.tensor([1.0, 0.375, 3e-5, 7.0])
    p, q = torch.zeros(n, requires_grad=True), torch.zeros(n, requires_grad=True)
    sgd = SGD8bit([p], lr=1.0, momentum=0.5, min_8bit_size=0)
    rms = RMSprop8bit([q], lr=1.0, alpha=0.5, min_8bit_size=0)
    for opt, param in ((sgd, p), (rms, q)):
        param.grad = torch.ones(n)
        opt.step()  # creates the state (SGD's fresh buffer is spent)
        with torch.no_grad():
            param.zero_()
    for opt, param, name, signed in ((sgd, p, "momentum_buffer", True), (rms, q, "square_avg", False)):
        opt.state[param][f"{name}_codes"].copy_(codes)
        opt.state[param][f"{name}_absmax"].copy_(absmax)
        param.grad = torch.zeros(n)
        opt.step()
        assert torch.equal(opt.state[param][f"{name}_codes"], codes), name
        assert torch.equal(opt.state[param][f"{name}_absmax"], absmax * 0.5), name
    assert torch.equal(p.detach(), -0.5 * Q.dequantize_blockwise(codes, absmax, signed=True))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_lower_instruction_sets_quantize_and_dequantize_alike(capability):
    """The two tests above with the kernels lowered to AVX2 (a gather and comparisons) or to the scalar code
    (FUSED_TRAIN_CPU_CAPABILITY is read at load time, so in a process of its own)."""
    ran_on = run_on_cpu_capability("import test_8bit_sgd_rmsprop as T\n"
                                   "T.test_codes_equal_the_quantizers_over_a_sweep_of_floats()\n"
                                   "T.test_every_code_dequantizes_to_its_value()", capability)
    skip_unless_ran_on(capability, ran_on)


def test_state_appears_as_options_switch_on():
    """As torch: momentum switched on later creates the buffer (SGD's first use copies the gradient in), in the 8-bit
    form for quantized params. RMSprop8bit refuses centered, also switched on later, before anything is written."""
    torch.manual_seed(0)
    p, q = torch.randn(5000, requires_grad=True), torch.randn(5000, requires_grad=True)
    sgd, rms = SGD8bit([p], lr=0.1), RMSprop8bit([q], lr=0.01)
    for step in range(3):
        if step == 1:
            sgd.param_groups[0]["momentum"] = 0.9
            rms.param_groups[0]["momentum"] = 0.9
        g = torch.randn(5000)
        expected = blockwise8bit_reference_step("SGD", p, g, sgd.state[p], **_torch_group(sgd))
        before = p.detach().clone()
        p.grad, q.grad = g.clone(), g.clone()
        sgd.step()
        rms.step()
        _assert_param_close(p, expected[0], torch.float32, before)
    assert set(sgd.state[p]) == {"momentum_buffer_codes", "momentum_buffer_absmax"}
    assert set(rms.state[q]) == {"step", "square_avg_codes", "square_avg_absmax", "momentum_buffer_codes",
                                 "momentum_buffer_absmax"}
    rms.param_groups[0]["centered"] = True
    before = (q.detach().clone(), {k: v.clone() for k, v in rms.state[q].items()})
    q.grad = torch.randn(5000)
    with pytest.raises(ValueError, match="centered"):
        rms.step()
    assert torch.equal(q, before[0]) and all(torch.equal(rms.state[q][k], v) for k, v in before[1].items())


def _torch_group(opt):
    keys = {"SGD8bit": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
            "RMSprop8bit": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")}
    return {k: opt.param_groups[0][k] for k in keys[type(opt).__name__]}


@pytest.mark.parametrize("cls,fp32_cls,kwargs", [
    (SGD8bit, fused_train.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (RMSprop8bit, fused_train.optim.RMSprop, dict(lr=0.01, momentum=0.9)),
])
def test_small_params_keep_fp32_state_and_match_the_fp32_optimizer(cls, fp32_cls, kwargs):
    torch.manual_seed(0)
    sizes = [(10,), (4095,), (4096,)]
    a = [torch.randn(s, requires_grad=True) for s in sizes]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt8, opt32 = cls(a, **kwargs), fp32_cls(b, **kwargs)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt8.step()
        opt32.step()
    for p, q in zip(a[:2], b[:2]):
        assert torch.equal(p, q)  # the same kernel, the same state
        assert set(opt8.state[p]) == set(opt32.state[q])
    assert all(k.endswith(("_codes", "_absmax")) or k == "step" for k in opt8.state[a[2]])


@pytest.mark.parametrize("make,moments", [
    (lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9), 1),
    (lambda ps: RMSprop8bit(ps), 1),
    (lambda ps: RMSprop8bit(ps, momentum=0.9), 2),
])
def test_state_bytes_per_param(make, moments):
    p = torch.zeros(1 << 20, requires_grad=True)
    p.grad = torch.randn(p.shape)
    opt = make([p])
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert state_bytes == moments * (p.numel() + 4 * (p.numel() // 256))
    assert state_bytes / p.numel() <= 1.02 * moments


@pytest.mark.parametrize("make", [lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9, zero_grad_in_step=True),
                                  lambda ps: RMSprop8bit(ps, momentum=0.5, zero_grad_in_step=True)])
def test_gradient_zeroed_in_step_and_threads_do_not_change_results(make):
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(1)
            p = torch.randn(300_000, requires_grad=True)
            opt = make([p])
            for _ in range(3):
                p.grad = torch.randn(p.shape) if p.grad is None else p.grad.copy_(torch.randn(p.shape))
                opt.step()
                assert torch.count_nonzero(p.grad) == 0
            runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
        finally:
            torch.set_num_threads(old)
    assert torch.equal(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k]), k


# -- checkpoints ---------------------------------------------------------------------------------------------------


def _train(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("make", [lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda ps: RMSprop8bit(ps, lr=0.01, momentum=0.9)])
def test_state_dict_round_trip_resumes_bit_for_bit(make):
    torch.manual_seed(0)
    params = [torch.randn(5000, requires_grad=True), torch.randn(30, requires_grad=True)]
    opt = make(params)
    _train(opt, params, 3, 0)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    _train(opt, params, 3, 1)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, 3, 1)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(opt2.state[q])
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@pytest.mark.parametrize("cls,name,kwargs,moments", [
    (SGD8bit, "SGD", dict(lr=0.1, momentum=0.9), ("momentum_buffer",)),
    (RMSprop8bit, "RMSprop", dict(lr=0.01, momentum=0.9), ("square_avg", "momentum_buffer")),
])
def test_fp32_checkpoint_loads_quantized_and_8bit_checkpoint_loads_dequantized(cls, name, kwargs, moments):
    torch.manual_seed(0)
    p = torch.randn(5000, requires_grad=True)
    torch_opt = torch_optimizer(name)([p], **kwargs)
    _train(torch_opt, [p], 2, 0)

    q = p.detach().clone().requires_grad_(True)
    opt8 = cls([q], **kwargs)
    opt8.load_state_dict(torch_opt.state_dict())
    for moment in moments:
        assert moment not in opt8.state[q]
        codes, absmax = Q.quantize_blockwise(torch_opt.state[p][moment], signed=Q.MOMENT_IS_SIGNED[moment])
        assert torch.equal(opt8.state[q][f"{moment}_codes"], codes) and torch.equal(
            opt8.state[q][f"{moment}_absmax"], absmax), moment

    # 8-bit -> fused_train's fp32 optimizer: dequantized in load_state_dict
    r = p.detach().clone().requires_grad_(True)
    opt32 = getattr(fused_train.optim, name)([r], **kwargs)
    opt32.load_state_dict(opt8.state_dict())
    assert all(m in opt32.state[r] and f"{m}_codes" not in opt32.state[r] for m in moments)
    _train(opt32, [r], 1, 1)

    # 8-bit -> torch.optim through dequantize_state_dict; it steps as from the dequantized state
    s = p.detach().clone().requires_grad_(True)
    torch_opt2 = torch_optimizer(name)([s], **kwargs)
    torch_opt2.load_state_dict(fused_train.optim.dequantize_state_dict(opt8.state_dict()))
    _train(torch_opt2, [s], 1, 1)
    torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-7)


def test_centered_checkpoint_raises_until_its_group_is_set_uncentered():
    torch.manual_seed(0)
    p = torch.randn(5000, requires_grad=True)
    torch_opt = torch.optim.RMSprop([p], lr=0.01, centered=True)
    _train(torch_opt, [p], 2, 0)
    q = p.detach().clone().requires_grad_(True)
    opt = RMSprop8bit([q], lr=0.01)
    opt.load_state_dict(torch_opt.state_dict())
    q.grad = torch.randn(5000)
    with pytest.raises(ValueError, match="set the group's 'centered' to False"):
        opt.step()
    assert torch.equal(q, p)
    opt.param_groups[0]["centered"] = False
    opt.step()
    assert set(opt.state[q]) == {"step", "square_avg_codes", "square_avg_absmax"}


# -- GradScaler --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9),
                                  lambda ps: RMSprop8bit(ps, lr=0.01, momentum=0.9)])
def test_skipped_step_leaves_state_untouched_and_scaled_step_matches_unscaled(make):
    torch.manual_seed(0)
    p = torch.randn(5000, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt, ref = make([p]), make([q])
    _train(opt, [p], 1, 0)
    _train(ref, [q], 1, 0)
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    scale = torch.tensor(1024.0)
    opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0)
    p.grad = torch.randn(p.shape) * scale
    opt.step()  # skipped
    assert torch.equal(p, before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v), k
    g = torch.randn(p.shape)
    opt.found_inf = torch.tensor(0.0)
    p.grad = g * scale
    q.grad = g.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert any(k.endswith("_codes") for k in opt.state[p])


def test_first_step_skipped_by_grad_scaler_still_copies_the_next_gradient():
    """SGD's new buffer stays 'fresh' through a skipped step: the next real step copies its gradient in."""
    p = torch.randn(5000, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt, ref = SGD8bit([p], lr=0.1, momentum=0.9, dampening=0.5), SGD8bit([q], lr=0.1, momentum=0.9, dampening=0.5)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    p.grad = torch.randn(5000)
    opt.step()
    opt.found_inf = torch.tensor(0.0)
    g = torch.randn(5000)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    assert torch.equal(p, q)
    codes, _ = Q.quantize_blockwise(g, signed=True)
    assert torch.equal(opt.state[p]["momentum_buffer_codes"], codes)


# -- arguments and ops -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,match", [
    (SGD8bit, dict(args=object()), "args"),
    (SGD8bit, dict(min_8bit_size=-1), "min_8bit_size"),
    (SGD8bit, dict(momentum=-0.1), "momentum"),
    (SGD8bit, dict(nesterov=True), "Nesterov"),
    (SGD8bit, dict(bf16_stochastic_round=1), "bf16_stochastic_round"),
    (RMSprop8bit, dict(args=object()), "args"),
    (RMSprop8bit, dict(min_8bit_size=1.5), "min_8bit_size"),
    (RMSprop8bit, dict(alpha=-0.5), "alpha"),
    (RMSprop8bit, dict(eps=-1.0), "epsilon"),
    (RMSprop8bit, dict(centered=True), "centered"),
])
def test_bad_arguments_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("spoil,match", [
    (lambda state: state.update(momentum_buffer_codes=torch.zeros(5000, dtype=torch.int32)), "momentum_buffer_codes"),
    (lambda state: state.pop("momentum_buffer_absmax"), "momentum_buffer_absmax"),
])
def test_bad_state_raises_before_anything_is_written(spoil, match):
    """A wrong dtype or a missing absmax (a hand-edited state): raised while the tables are built, before the first
    group steps. (A buffer missing altogether is created anew, as fused_train.optim.RMSprop does.)"""
    a, b = torch.randn(5000, requires_grad=True), torch.randn(5000, requires_grad=True)
    opt = RMSprop8bit([{"params": [a]}, {"params": [b]}], momentum=0.9)
    _train(opt, [a, b], 1, 0)
    spoil(opt.state[b])
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["square_avg_codes"].clone()]
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[a]["square_avg_codes"], before[2])


def _op_lists(n=300):
    p = torch.randn(n)
    codes = torch.full((n,), Q.SIGNED_ZERO_CODE, dtype=torch.uint8)
    return p, p.clone(), codes, torch.zeros(Q.num_blocks(n))


def test_ops_name_what_is_wrong():
    p, g, codes, absmax = _op_lists()
    sgd = dict(lr=0.1, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, is_first_step=False,
               zero_grad=False)
    with pytest.raises(RuntimeError, match="momentum must be nonzero"):
        _ops.sgd8bit_step_([p], [g], [codes], [absmax], momentum=0.0, **sgd)
    with pytest.raises(RuntimeError, match=r"momentum_buffer_absmax\[0\] must be a contiguous Float"):
        _ops.sgd8bit_step_([p], [g], [codes], [torch.zeros(2, dtype=torch.float64)], momentum=0.9, **sgd)
    # the absmax's shape says the blocks: 1-D for the flat param, 2-D (dim 0, blocks per row) for a param of 2+ dims
    for bad in (torch.zeros(5), torch.zeros(1, 2, 1), torch.zeros(3, 1), torch.zeros(1, 2)):  # (2-D: 1-D param)
        with pytest.raises(RuntimeError, match=r"momentum_buffer_absmax\[0\] must have one fp32 value per block of "
                                               r"256 of its param's 300 elements: 1-D of 2 .* got shape"):
            _ops.sgd8bit_step_([p], [g], [codes], [bad], momentum=0.9, **sgd)
    p2, g2, codes2 = p.view(3, 100), g.view(3, 100), codes.view(3, 100)
    for bad in (torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(6, 1)):  # (rows: dim 0's 3, one block each)
        with pytest.raises(RuntimeError, match=r"for a param of 2 or more dims, 2-D \(its dim 0, ceil\(row"):
            _ops.sgd8bit_step_([p2], [g2], [codes2], [bad], momentum=0.9, **sgd)
    empty = torch.zeros(3, 0)
    with pytest.raises(RuntimeError, match=r"got shape \[3, 1\]"):  # (an empty param's absmax is empty too)
        _ops.sgd8bit_step_([empty], [empty.clone()], [empty.to(torch.uint8)], [torch.zeros(3, 1)], momentum=0.9, **sgd)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        _ops.sgd8bit_step_([p.double()], [g.double()], [codes], [absmax], momentum=0.9, **sgd)
    rms = dict(lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.0, maximize=False, zero_grad=False)
    step = [torch.zeros(())]
    with pytest.raises(RuntimeError, match="momentum_buffer_codes must be empty"):
        _ops.rmsprop8bit_step_([p], [g], [codes], [absmax], [codes], [absmax], step, momentum=0.0, **rms)
    with pytest.raises(RuntimeError, match="got 1 params but 0 momentum_buffer_codes"):
        _ops.rmsprop8bit_step_([p], [g], [codes], [absmax], [], [], step, momentum=0.9, **rms)
    # (3, 1): the 300 elements as 3 rows of 100, one block each; the square average's are the flat param's 2
    with pytest.raises(RuntimeError, match=r"momentum_buffer_absmax\[0\] \[3, 1\] cuts the param into rows of 100 "
                                           r"elements but square_avg_absmax\[0\] \[2\] into rows of 300"):
        _ops.rmsprop8bit_step_([p2], [g2], [codes2], [absmax], [codes2], [torch.zeros(3, 1)], step, momentum=0.9,
                               **rms)
    assert torch.equal(p, g) and step[0].item() == 0  # nothing written


@pytest.mark.parametrize("make", [lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9),
                                  lambda ps: RMSprop8bit(ps, lr=0.01, momentum=0.9)])
def test_compiled_step_matches_eager(make):
    torch.manual_seed(0)
    a = [torch.randn(5000, requires_grad=True), torch.randn(10, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    eager, compiled = make(a), make(b)
    torch._dynamo.reset()
    try:
        step = torch.compile(compiled.step, fullgraph=True)
        for _ in range(3):
            for p, q in zip(a, b):
                p.grad = torch.randn(p.shape)
                q.grad = p.grad.clone()
            eager.step()
            step()
    finally:
        torch._dynamo.reset()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_opcheck():
    p, g, codes, absmax = _op_lists(600)
    u_codes = torch.zeros(600, dtype=torch.uint8)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
              is_first_step=True, zero_grad=True)
    torch.library.opcheck(torch.ops.fused_train.sgd8bit_step_.default,
                          ([p.clone()], [g.clone()], [codes.clone()], [absmax.clone()], []), kw)
    kw = dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, maximize=False, zero_grad=True)
    torch.library.opcheck(torch.ops.fused_train.rmsprop8bit_step_.default,
                          ([p.clone()], [g.clone()], [u_codes.clone()], [absmax.clone()], [codes.clone()],
                           [absmax.clone()], [torch.zeros(())]), kw)


# -- convergence -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,fp32_cls,kwargs", [
    (SGD8bit, fused_train.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (RMSprop8bit, fused_train.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),
])
def test_converges_like_the_fp32_optimizer_on_digits(cls, fp32_cls, kwargs):
    """A small MLP on the embedded digits data: the final training loss within 2% of the fp32 optimizer's."""
    from fused_train.data import load_digits

    data = load_digits()
    x, y = data.train.images.flatten(1), data.train.labels
    finals = {}
    for name, make in (("fp32", fp32_cls), ("8bit", cls)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = make(model.parameters(), **kwargs, **({"min_8bit_size": 1024} if make is cls else {}))
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            idx = torch.randint(0, x.shape[0], (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        assert "momentum_buffer_codes" in opt.state[model[0].weight] or make is fp32_cls
        with torch.no_grad():
            finals[name] = torch.nn.functional.cross_entropy(model(x), y).item()
    assert finals["8bit"] <= finals["fp32"] * 1.02 + 0.005, finals


# -- CUDA ----------------------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("make", [lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9, dampening=0.2, min_8bit_size=0,
                                                     zero_grad_in_step=True),
                                  lambda ps: RMSprop8bit(ps, lr=0.01, momentum=0.9, min_8bit_size=0,
                                                         zero_grad_in_step=True),
                                  lambda ps: RMSprop8bit(ps, lr=0.01, min_8bit_size=0, zero_grad_in_step=True)])
def test_cuda_step_equals_cpu_step(make, dtype):
    """As Adam8bit's: the same math and quantizer on both devices, with GradScaler's scale, a device found_inf (step
    2 skipped) and gradient zeroing, over block and chunk edges."""
    torch.manual_seed(0)
    sizes = [(1,), (255,), (257,), (2 * 65536 + 300,), (3, 1000), (230, 300)]  # (rows: see test_adam8bit.py)
    cpu = [torch.randn(s).to(dtype).requires_grad_(True) for s in sizes]
    gpu = [p.detach().cuda().requires_grad_(True) for p in cpu]
    opt_cpu, opt_gpu = make(cpu), make(gpu)
    for step in range(4):
        scale = torch.tensor(256.0)
        for p, q in zip(cpu, gpu):
            p.grad = (torch.randn(p.shape) * 3 * scale).to(dtype)
            q.grad = p.grad.cuda()
        found = torch.tensor(1.0 if step == 2 else 0.0)
        opt_cpu.grad_scale, opt_cpu.found_inf = scale, found
        opt_gpu.grad_scale, opt_gpu.found_inf = scale.cuda(), found.cuda()
        opt_cpu.step()
        opt_gpu.step()
        for p, q in zip(cpu, gpu):
            assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(p.grad) == 0
            torch.testing.assert_close(q.cpu(), p, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)
            assert set(opt_cpu.state[p]) == set(opt_gpu.state[q])
            for k, v in opt_cpu.state[p].items():
                w = opt_gpu.state[q][k].cpu()
                if k.endswith("_codes"):
                    assert (w.long() - v.long()).abs().max() <= 1 and (w != v).float().mean() < 1e-3, k
                else:
                    torch.testing.assert_close(w, v, rtol=1e-5, atol=0)
