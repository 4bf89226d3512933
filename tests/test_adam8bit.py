"""fused_train.optim.Adam8bit / AdamW8bit: the 8-bit code against a nearest-value reference, the kernel's codes
against the Python quantizer, steps against torch.optim.Adam on the dequantized state, checkpoints both ways,
GradScaler, gradient zeroing, bad arguments, torch.compile and convergence."""

import io
import math

import pytest
import torch

import fused_train
from fused_train.optim import Adam8bit, AdamW8bit, _quantization as Q
from fused_train.reference import (adam8bit_reference_step, dequantize_blockwise_reference,
                                   quantize_blockwise_reference, torch_optimizer)

from conftest import cuda_only

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
# Sizes around the 256-element block and the CPU's 32768-element chunk; one element; empty.
SIZES = [0, 1, 255, 256, 257, 1000, 32769, 100_003]


def _spread(n, generator=None, signed=True):
    """Values over 12 decades, both signs: every decade of the code is used."""
    scale = torch.logspace(-10, 2, max(n, 1))[:n][torch.randperm(n, generator=generator)]
    x = torch.randn(n, generator=generator) * scale
    return x if signed else x.abs()


def _assert_codes_match_reference(codes, absmax, t, signed):
    """Codes equal to the nearest-value reference, except where x lies at an fp32 midpoint between two values."""
    ref_codes, ref_absmax = quantize_blockwise_reference(t, signed=signed)
    assert torch.equal(absmax, ref_absmax)
    differ = (codes.reshape(-1).long() != ref_codes.reshape(-1).long()).nonzero().reshape(-1)
    if differ.numel() == 0:
        return
    values = (Q.SIGNED if signed else Q.UNSIGNED).values.double()
    scale = absmax.repeat_interleave(Q.BLOCK_SIZE)[: t.numel()]
    x = (t.reshape(-1).float() * torch.where(scale > 0, 1.0 / scale, 0.0)).double()
    for i in differ.tolist():
        a, b = int(codes.reshape(-1)[i]), int(ref_codes.reshape(-1)[i])
        assert abs(a - b) == 1, (i, a, b)
        midpoint = (values[a] + values[b]) / 2
        assert abs(x[i] - midpoint) <= 1e-6 * abs(midpoint), (i, float(x[i]), float(midpoint))


# -- the code ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_code_is_bitsandbytes_dynamic_map(signed):
    code = (Q.SIGNED if signed else Q.UNSIGNED).values
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    assert code[0] == (-0.99296875 if signed else 0.0)
    # relative spacing in the top decade: 0.9/64 (signed) or 0.9/128 (unsigned)
    top = code[code >= 0.1]
    assert torch.allclose(top[1:-1] - top[:-2], torch.full_like(top[1:-1], 0.9 / (64 if signed else 128)), atol=1e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 4000])
def test_quantize_matches_nearest_value_reference(signed, n):
    g = torch.Generator().manual_seed(n)
    t = _spread(n, g, signed)
    codes, absmax = Q.quantize_blockwise(t, signed=signed)
    assert codes.dtype == torch.uint8 and codes.shape == t.shape and absmax.shape == (Q.num_blocks(n),)
    _assert_codes_match_reference(codes, absmax, t, signed)
    back = Q.dequantize_blockwise(codes, absmax, signed=signed)
    assert torch.equal(back, dequantize_blockwise_reference(codes, absmax, signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_edges_of_the_code(signed):
    code = (Q.SIGNED if signed else Q.UNSIGNED).values
    # every value of the code maps to itself (block absmax 1 through the 1.0 element)
    codes, absmax = Q.quantize_blockwise(code, signed=signed)
    assert absmax.tolist() == [1.0] and torch.equal(codes.long(), torch.arange(256))
    # midpoints and their neighbours, all-zero, tiny and huge blocks
    mids = (code[1:] + code[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    for t in (near, torch.zeros(300), torch.full((300,), 1e-30) * _spread(300, signed=signed).sign().abs(),
              _spread(600, signed=signed) * 1e30, torch.tensor([1.0, -0.0, 0.0]).abs() if not signed else
              torch.tensor([1.0, -1.0, -0.0, 0.0, 1e-38])):
        codes, absmax = Q.quantize_blockwise(t, signed=signed)
        _assert_codes_match_reference(codes, absmax, t, signed)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_bounded(signed):
    t = _spread(100_000, torch.Generator().manual_seed(1), signed)
    codes, absmax = Q.quantize_blockwise(t, signed=signed)
    back = Q.dequantize_blockwise(codes, absmax, signed=signed)
    scale = absmax.repeat_interleave(256)[: t.numel()]
    # in the top decade (|x| >= 0.1 absmax) the grid step is 0.9/64 or 0.9/128 of absmax; half of it bounds the error
    top = t.abs() >= 0.1 * scale
    step = 0.9 / (64 if signed else 128)
    assert ((back - t).abs()[top] <= step / 2 * scale[top] * (1 + 1e-5)).all()
    # the block's absmax element comes back exactly (a negative one as -0.993: the signed code has no -1)
    for b in range(0, absmax.numel(), 37):
        i = b * 256 + int(t[b * 256:(b + 1) * 256].abs().argmax())
        assert back[i] == (absmax[b] if t[i] > 0 else -0.99296875 * absmax[b])


# -- the kernel ------------------------------------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n", SIZES)
def test_kernel_codes_equal_python_quantizer(dtype, n):
    """With betas (0, 0) one step sets exp_avg = g and exp_avg_sq = g², so its codes are the quantizer's own."""
    g = _spread(n, torch.Generator().manual_seed(n), True).clamp(-60000, 60000).to(dtype)
    p = torch.randn(n, dtype=dtype, requires_grad=True)
    p.grad = g.clone()
    opt = Adam8bit([p], betas=(0.0, 0.0), min_8bit_size=0)
    opt.step()
    state = opt.state[p]
    g32 = g.float()
    for name, value, signed in (("exp_avg", g32, True), ("exp_avg_sq", g32 * g32, False)):
        codes, absmax = Q.quantize_blockwise(value, signed=signed)
        assert torch.equal(state[f"{name}_codes"], codes), name
        assert torch.equal(state[f"{name}_absmax"], absmax), name


# Params whose rows (dim 0's entries) hold 256 elements or more: the blocks of each row, its last one shorter. (130,
# 300) has the CPU's 32768-element chunk edge inside a block (row 109's first, [32700, 32956)); (250, 300) runs on
# both threads; (300, 7) has rows too short to have their own blocks: the flat param's.
ROW_SHAPES = [(3, 300), (2, 576), (4, 2, 150), (130, 300), (250, 300), (1, 1000), (5, 512), (300, 7)]


def _absmax_shape_of(shape):
    rows, row = shape[0], math.prod(shape[1:])
    return (rows, Q.num_blocks(row)) if len(shape) >= 2 and row >= 256 else (Q.num_blocks(math.prod(shape)),)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_kernel_blocks_are_the_rows_blocks(dtype, shape):
    """As above, for params of rows: each row's blocks, in the kernel as in the Python quantizer and its reference."""
    n = math.prod(shape)
    g = _spread(n, torch.Generator().manual_seed(n), True).clamp(-60000, 60000).to(dtype).reshape(shape)
    p = torch.randn(shape, dtype=dtype, requires_grad=True)
    p.grad = g.clone()
    opt = Adam8bit([p], betas=(0.0, 0.0), min_8bit_size=0)
    opt.step()
    by_rows = len(_absmax_shape_of(shape)) == 2
    g32 = g.float()
    for name, value, signed in (("exp_avg", g32, True), ("exp_avg_sq", g32 * g32, False)):
        codes, absmax = Q.quantize_blockwise(value, signed=signed, by_rows=by_rows)
        assert opt.state[p][f"{name}_absmax"].shape == _absmax_shape_of(shape)
        assert torch.equal(opt.state[p][f"{name}_codes"], codes), name
        assert torch.equal(opt.state[p][f"{name}_absmax"], absmax), name
    # a row's last block holds its tail only: its absmax is the tail's largest magnitude
    rows = g32.reshape(shape[0], -1)
    if by_rows and rows.shape[1] % 256:
        tail = rows[:, rows.shape[1] // 256 * 256:].abs().amax(dim=1)
        assert torch.equal(opt.state[p]["exp_avg_absmax"][:, -1], tail)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(3, 300), (2, 576), (4, 2, 150), (2, 511), (0, 300), (3, 0)])
def test_quantizer_by_rows_matches_reference(signed, shape):
    n = math.prod(shape)
    t = _spread(n, torch.Generator().manual_seed(7), signed).reshape(shape)
    codes, absmax = Q.quantize_blockwise(t, signed=signed, by_rows=True)
    ref_codes, ref_absmax = quantize_blockwise_reference(t, signed=signed, by_rows=True)
    rows, row = shape[0], math.prod(shape[1:])
    assert absmax.shape == ref_absmax.shape == (rows, Q.num_blocks(row))
    assert torch.equal(absmax, ref_absmax)
    # codes: the reference's, up to a value at an fp32 midpoint (checked row by row, each row a flat tensor)
    for r in range(rows):
        _assert_codes_match_reference(codes[r].reshape(-1), absmax[r], t[r].reshape(-1), signed)
    back = Q.dequantize_blockwise(codes, absmax, signed=signed)
    assert back.shape == t.shape
    assert torch.equal(back, dequantize_blockwise_reference(codes, absmax, signed=signed))
    if n:
        # the flat layout's blocks of the same tensor differ (they cross rows), and so do its values
        flat_codes, flat_absmax = Q.quantize_blockwise(t, signed=signed)
        assert not torch.equal(Q.dequantize_blockwise(flat_codes, flat_absmax, signed=signed), back)


def test_flat_checkpoint_of_rows_is_requantized_by_rows():
    """A checkpoint saved before rows of any length had their own blocks holds the flat layout's 1-D absmax, whose
    blocks cross rows: loading it requantizes each moment by rows, from its dequantized values, even where the
    block counts agree ((2, 511): 4 blocks either way)."""
    torch.manual_seed(0)
    shapes = [(20, 300), (2, 511), (4, 512), (5000,)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    torch_opt = torch_optimizer("AdamW")(params, lr=0.01)
    _train(torch_opt, params, 2, 0)
    old = torch_opt.state_dict()
    for key, p in enumerate(params):
        state = old["state"][key]
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            state[f"{name}_codes"], state[f"{name}_absmax"] = Q.quantize_blockwise(state.pop(name), signed=signed)
    resumed = [p.detach().clone().requires_grad_(True) for p in params]
    opt = AdamW8bit(resumed, lr=0.01, min_8bit_size=0)
    opt.load_state_dict(old)
    for key, (p, shape) in enumerate(zip(resumed, shapes)):
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            saved = old["state"][key]
            values = Q.dequantize_blockwise(saved[f"{name}_codes"], saved[f"{name}_absmax"], signed=signed)
            if len(shape) == 2 and shape[1] % 256:  # blocks across rows: requantized by rows
                codes, absmax = Q.quantize_blockwise(values, signed=signed, by_rows=True)
            else:  # the same blocks (rows of whole blocks, or 1-D): taken as saved, reshaped when the step reads them
                codes, absmax = saved[f"{name}_codes"], saved[f"{name}_absmax"]
            assert torch.equal(opt.state[p][f"{name}_codes"], codes), (shape, name)
            assert torch.equal(opt.state[p][f"{name}_absmax"].reshape(-1), absmax.reshape(-1)), (shape, name)
    _train(opt, resumed, 1, 1)
    for p, shape in zip(resumed, shapes):
        assert torch.isfinite(p).all()
        for name in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][f"{name}_absmax"].shape == _absmax_shape_of(shape)


def test_block_below_the_smallest_normal_float_quantizes_to_zero():
    """A block whose absmax is below FLT_MIN (a moment decaying without gradients) would have an infinite inverse:
    it is stored as zeros with its absmax, in the kernel as in Python, instead of every element as ±absmax."""
    g = torch.full((512,), 1e-21)
    g[256:] = torch.linspace(-3, 3, 256)  # a normal block beside it
    p = torch.zeros(512, requires_grad=True)
    p.grad = g.clone()
    opt = Adam8bit([p], betas=(0.0, 0.0), min_8bit_size=0)
    opt.step()
    state = opt.state[p]
    assert 0 < state["exp_avg_sq_absmax"][0] < torch.finfo(torch.float32).tiny  # g² = 1e-42, subnormal
    assert (state["exp_avg_sq_codes"][:256] == Q.UNSIGNED_ZERO_CODE).all()
    codes, absmax = Q.quantize_blockwise(g * g, signed=False)
    assert torch.equal(state["exp_avg_sq_codes"], codes) and torch.equal(state["exp_avg_sq_absmax"], absmax)
    _assert_codes_match_reference(codes[:256], absmax[:1], (g * g)[:256], False)


CONFIGS = [
    (Adam8bit, dict()),
    (Adam8bit, dict(lr=0.01, weight_decay=0.1)),
    (Adam8bit, dict(lr=0.01, betas=(0.3, 0.4), eps=1e-6, maximize=True)),
    (AdamW8bit, dict()),
    (AdamW8bit, dict(lr=0.01, weight_decay=0.5)),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("cls,kwargs", CONFIGS)
def test_steps_match_torch_adam_on_dequantized_state(cls, kwargs, dtype):
    """Each step from the optimizer's own state: torch.optim.Adam on the dequantized moments, then quantized."""
    torch.manual_seed(0)
    shapes = [(300, 7), (1000,), (5,), (3, 300)]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    opt = cls(params, min_8bit_size=0, **kwargs)
    reference_kwargs = {k: v for k, v in opt.defaults.items()
                        if k in ("lr", "betas", "eps", "weight_decay", "maximize")}
    for step in range(5):
        grads = [torch.randn(s).to(dtype) * (10.0 ** (step - 2)) for s in shapes]
        expected = []
        for p, g in zip(params, grads):
            state = opt.state[p] if opt.state[p] else {
                "step": torch.zeros(()), "exp_avg_codes": torch.full(p.shape, 127, dtype=torch.uint8),
                "exp_avg_absmax": torch.zeros(_absmax_shape_of(p.shape)),
                "exp_avg_sq_codes": torch.zeros(p.shape, dtype=torch.uint8),
                "exp_avg_sq_absmax": torch.zeros(_absmax_shape_of(p.shape))}
            expected.append(adam8bit_reference_step(p, g, state, decoupled_weight_decay=cls is AdamW8bit,
                                                    **reference_kwargs))
            p.grad = g.clone()
        opt.step()
        for p, (ref_p, ref_state) in zip(params, expected):
            state = opt.state[p]
            assert state["step"].item() == ref_state["step"].item()
            # fp32 math in another operation order: a few ulps of the param's dtype
            tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=0, atol=0)
            if dtype != torch.float32:
                assert (p.detach().float() - ref_p.float()).abs().le(
                    p.detach().float().abs() * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)).all()
            else:
                torch.testing.assert_close(p.detach(), ref_p, **tol)
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[f"{name}_absmax"], ref_state[f"{name}_absmax"], rtol=1e-5, atol=0)
                diff = (state[f"{name}_codes"].long() - ref_state[f"{name}_codes"].long()).abs()
                # a moment a rounding away from a midpoint may take the neighbouring code
                assert diff.max() <= 1 and diff.float().mean() < 0.01, (name, diff.max(), diff.float().mean())


def test_small_params_keep_fp32_state_and_match_fused_adam():
    torch.manual_seed(0)
    sizes = [(10,), (4095,), (4096,)]
    a = [torch.randn(s, requires_grad=True) for s in sizes]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    opt8 = AdamW8bit(a, lr=0.01)
    opt32 = fused_train.optim.AdamW(b, lr=0.01)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt8.step()
        opt32.step()
    assert set(opt8.state[a[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt8.state[a[2]]) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    for p, q in zip(a[:2], b[:2]):
        assert torch.equal(p, q)  # the same kernel, the same state


@pytest.mark.parametrize("shape,blocks", [((1 << 20,), 4096), ((1820, 576), 1820 * 3), ((4096, 257), 4096 * 2)])
def test_state_bytes_per_param(shape, blocks):
    """A code per element and a 4-byte absmax per block, for both moments: 2.03 bytes per param with blocks of 256,
    2.04 with rows of 576 (blocks of 256, 256, 64), 2.06 at worst (rows of 257: blocks of 256 and 1)."""
    p = torch.zeros(shape, requires_grad=True)
    p.grad = torch.randn(p.shape)
    opt = Adam8bit([p])
    opt.step()
    state = opt.state[p]
    moment_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    assert moment_bytes == 2 * p.numel() + 2 * 4 * blocks
    assert moment_bytes / p.numel() <= (2.05 if shape[-1] != 257 else 2.063)


def test_absmax_is_laid_out_by_rows_and_a_flat_one_loads():
    """A param of 2+ dims whose rows hold k·256 elements keeps its absmax as (rows, k), the layout an FSDP2 shard
    keeps its own rows of; params with rows under 256 elements, and 1-D ones, (blocks,). A checkpoint with the blocks
    flat (saved before this layout) loads into it and steps on exactly as the state it came from."""
    torch.manual_seed(0)
    shapes = {(12, 512): (12, 2), (3, 2, 128): (3, 1), (300, 7): (9,), (5000,): (20,)}
    a = [torch.randn(s, requires_grad=True) for s in shapes]
    first = AdamW8bit(a, min_8bit_size=0)
    for p in a:
        p.grad = torch.randn(p.shape)
    first.step()
    b = [p.detach().clone().requires_grad_(True) for p in a]
    for p, want in zip(a, shapes.values()):
        assert first.state[p]["exp_avg_absmax"].shape == want and first.state[p]["exp_avg_sq_absmax"].shape == want
    saved = first.state_dict()
    for state in saved["state"].values():
        for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
            state[key] = state[key].reshape(-1).clone()
    second = AdamW8bit(b, min_8bit_size=0)
    second.load_state_dict(saved)
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    first.step()
    second.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, value in first.state[p].items():
            assert value.shape == second.state[q][key].shape and torch.equal(value, second.state[q][key]), key
    # one of another count of blocks is refused, naming it, before anything steps
    second.state[b[0]]["exp_avg_absmax"] = torch.zeros(23)
    before = [q.detach().clone() for q in b]
    with pytest.raises(ValueError, match=r"state 'exp_avg_absmax' must be a torch.float32 tensor of shape \(12, 2\)"):
        second.step()
    assert all(torch.equal(q, w) for q, w in zip(b, before))


def test_gradient_zeroed_in_step_and_threads_do_not_change_results():
    torch.manual_seed(0)
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(1)
            p = torch.randn(300_000, requires_grad=True)
            opt = AdamW8bit([p], zero_grad_in_step=True)
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


@cuda_only
def test_cuda_nan_gradient_poisons_its_block_only():
    p = torch.zeros(1024, device="cuda", requires_grad=True)
    g = torch.randn(1024, device="cuda")
    g[300] = float("nan")
    p.grad = g
    opt = Adam8bit([p], min_8bit_size=0)
    opt.step()
    assert torch.isnan(p[300]) and torch.isfinite(p[torch.arange(1024, device="cuda") != 300]).all()
    absmax = opt.state[p]["exp_avg_absmax"].cpu()
    assert torch.isnan(absmax[1]) and torch.isfinite(absmax[[0, 2, 3]]).all()


@cuda_only
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_step_equals_cpu_step(dtype):
    """The CUDA kernel runs the same per-element math and quantizer: params within an ulp, absmax within rounding and
    codes equal but where an ulp of a moment crosses a midpoint (the compilers may order the fp32 update
    differently); with GradScaler's scale, a device found_inf, a skipped step and gradient zeroing."""
    torch.manual_seed(0)
    # (3, 1000): rows' blocks of 256, 256, 256, 232; (230, 300): the GPU's 65536-element chunk edge inside a block
    sizes = [(1,), (255,), (257,), (2 * 65536 + 300,), (3, 1000), (230, 300)]
    cpu = [torch.randn(s).to(dtype).requires_grad_(True) for s in sizes]
    gpu = [p.detach().cuda().requires_grad_(True) for p in cpu]
    opt_cpu = AdamW8bit(cpu, lr=0.01, min_8bit_size=0, zero_grad_in_step=True)
    opt_gpu = AdamW8bit(gpu, lr=0.01, min_8bit_size=0, zero_grad_in_step=True)
    for step in range(4):
        scale = torch.tensor(256.0)
        for p, q in zip(cpu, gpu):
            p.grad = (torch.randn(p.shape) * 3 * scale).to(dtype)
            q.grad = p.grad.cuda()
        # GradScaler's hand-off, found_inf on the device; step 2 is skipped (found_inf set)
        found = torch.tensor(1.0 if step == 2 else 0.0)
        opt_cpu.grad_scale, opt_cpu.found_inf = scale, found
        opt_gpu.grad_scale, opt_gpu.found_inf = scale.cuda(), found.cuda()
        opt_cpu.step()
        opt_gpu.step()
        for p, q in zip(cpu, gpu):
            assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(p.grad) == 0
            assert opt_gpu.state[q]["step"].item() == opt_cpu.state[p]["step"].item()
            torch.testing.assert_close(q.cpu(), p, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-7)
            for k, v in opt_cpu.state[p].items():
                w = opt_gpu.state[q][k].cpu()
                if k.endswith("_codes"):
                    assert (w.long() - v.long()).abs().max() <= 1 and (w != v).float().mean() < 1e-3, k
                else:
                    torch.testing.assert_close(w, v, rtol=1e-5, atol=0)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def _train(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


def test_state_dict_round_trip_resumes_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.randn(5000, requires_grad=True), torch.randn(30, requires_grad=True)]
    opt = AdamW8bit(params, lr=0.01)
    _train(opt, params, 3, 0)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    _train(opt, params, 3, 1)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    opt2 = AdamW8bit(resumed, lr=0.01)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0]]["exp_avg_codes"].dtype == torch.uint8
    _train(opt2, resumed, 3, 1)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@pytest.mark.parametrize("shape", [(5000,), (20, 300)])
def test_fp32_checkpoint_loads_quantized_and_8bit_checkpoint_loads_dequantized(shape):
    torch.manual_seed(0)
    p = torch.randn(shape, requires_grad=True)
    by_rows = len(shape) == 2  # (rows of 300: each row's 2 blocks, 256 and 44)
    torch_opt = torch_optimizer("AdamW")([p], lr=0.01)
    _train(torch_opt, [p], 2, 0)
    fp32_state = torch_opt.state_dict()

    q = p.detach().clone().requires_grad_(True)
    opt8 = AdamW8bit([q], lr=0.01)
    opt8.load_state_dict(fp32_state)
    state = opt8.state[q]
    assert "exp_avg" not in state
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = Q.quantize_blockwise(torch_opt.state[p][name], signed=signed, by_rows=by_rows)
        assert torch.equal(state[f"{name}_codes"], codes) and torch.equal(state[f"{name}_absmax"], absmax)
        assert absmax.shape == ((20, 2) if by_rows else (20,))
    assert state["step"].item() == 2

    # 8-bit -> fused_train fp32 AdamW: dequantized in load_state_dict
    r = p.detach().clone().requires_grad_(True)
    opt32 = fused_train.optim.AdamW([r], lr=0.01)
    opt32.load_state_dict(opt8.state_dict())
    assert set(opt32.state[r]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(opt32.state[r]["exp_avg"],
                       Q.dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True))
    _train(opt32, [r], 1, 1)

    # 8-bit -> torch.optim.AdamW through dequantize_state_dict; it steps as from the dequantized state
    s = p.detach().clone().requires_grad_(True)
    torch_opt2 = torch_optimizer("AdamW")([s], lr=0.01)
    torch_opt2.load_state_dict(fused_train.optim.dequantize_state_dict(opt8.state_dict()))
    _train(torch_opt2, [s], 1, 1)
    torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-7)


# -- GradScaler, non-finite gradients ---------------------------------------------------------------------------


def test_skipped_step_leaves_state_untouched_and_scaled_step_matches_unscaled():
    torch.manual_seed(0)
    p = torch.randn(3000, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt, ref = Adam8bit([p], lr=0.01), Adam8bit([q], lr=0.01)
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


def test_grad_scaler_in_a_training_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)
    opt = AdamW8bit(model.parameters(), lr=0.01, min_8bit_size=1024)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(64, 128), torch.randn(64, 64)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert "exp_avg_codes" in opt.state[model.weight] and "exp_avg" in opt.state[model.bias]


def test_nan_gradient_without_scaler_poisons_its_block_only():
    p = torch.zeros(1024, requires_grad=True)
    g = torch.randn(1024)
    g[300] = float("nan")
    p.grad = g
    opt = Adam8bit([p], min_8bit_size=0)
    opt.step()
    assert torch.isnan(p[300]) and torch.isfinite(p[torch.arange(1024) != 300]).all()
    absmax = opt.state[p]["exp_avg_absmax"]
    assert torch.isnan(absmax[1]) and torch.isfinite(absmax[[0, 2, 3]]).all()


# -- arguments -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(amsgrad=True), "amsgrad"),
    (dict(optim_bits=8), "optim_bits"),
    (dict(args=object()), "args"),
    (dict(is_paged=True), "is_paged"),
    (dict(percentile_clipping=5), "percentile_clipping"),
    (dict(block_wise=False), "block_wise"),
    (dict(min_8bit_size=-1), "min_8bit_size"),
    (dict(lr=-1.0), "learning rate"),
    (dict(betas=(1.0, 0.9)), "beta"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adam8bit([torch.zeros(3, requires_grad=True)], **kwargs)


def test_bad_state_raises_before_anything_is_written():
    a, b = torch.randn(5000, requires_grad=True), torch.randn(5000, requires_grad=True)
    opt = Adam8bit([{"params": [a]}, {"params": [b]}])
    _train(opt, [a, b], 1, 0)
    opt.state[b]["exp_avg_absmax"] = torch.zeros(3)  # wrong number of blocks
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["exp_avg_codes"].clone()]
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[a]["exp_avg_codes"], before[2])


def test_missing_moment_raises_before_anything_is_written():
    """A quantized param whose state lacks a moment altogether (a hand-edited state): raised while the tables are
    built, before the first group steps, naming what is missing."""
    a, b = torch.randn(5000, requires_grad=True), torch.randn(5000, requires_grad=True)
    opt = Adam8bit([{"params": [a]}, {"params": [b]}])
    _train(opt, [a, b], 1, 0)
    del opt.state[b]["exp_avg_sq_codes"], opt.state[b]["exp_avg_sq_absmax"]
    before = a.detach().clone()
    a.grad, b.grad = torch.randn(5000), torch.randn(5000)
    with pytest.raises(ValueError, match="exp_avg_sq_codes"):
        opt.step()
    assert torch.equal(a, before)


def test_amsgrad_switched_on_in_a_loaded_group_raises():
    p = torch.randn(10, requires_grad=True)
    opt = Adam8bit([p])
    opt.param_groups[0]["amsgrad"] = True
    p.grad = torch.randn(10)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


# -- torch.compile, float64, convergence -----------------------------------------------------------------------


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    a = [torch.randn(3000, requires_grad=True), torch.randn(10, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    eager, compiled = AdamW8bit(a, lr=0.01), AdamW8bit(b, lr=0.01)
    torch._dynamo.reset()  # the step's code object is compiled by other tests too: a fresh recompile budget
    try:
        step = torch.compile(compiled.step, fullgraph=True)
        for i in range(3):
            for p, q in zip(a, b):
                p.grad = torch.randn(p.shape)
                q.grad = p.grad.clone()
            eager.step()
            step()
    finally:
        torch._dynamo.reset()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_float64_params_keep_float64_state():
    p = torch.randn(5000, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    opt, ref = Adam8bit([p], min_8bit_size=0), fused_train.optim.Adam([q])
    _train(opt, [p], 2, 0)
    _train(ref, [q], 2, 0)
    assert opt.state[p]["exp_avg"].dtype == torch.float64 and torch.equal(p, q)


def test_converges_like_fp32_adamw_on_digits():
    """A small MLP on the embedded digits data: the final training loss within 2% of fp32 AdamW's."""
    from fused_train.data import load_digits

    data = load_digits()
    x, y = data.train.images.flatten(1), data.train.labels
    finals = {}
    for name, cls in (("fp32", fused_train.optim.AdamW), ("8bit", AdamW8bit)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
        opt = cls(model.parameters(), lr=3e-3, **({"min_8bit_size": 1024} if cls is AdamW8bit else {}))
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            idx = torch.randint(0, x.shape[0], (64,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        with torch.no_grad():
            finals[name] = torch.nn.functional.cross_entropy(model(x), y).item()
    assert finals["8bit"] <= finals["fp32"] * 1.02 + 0.005, finals
