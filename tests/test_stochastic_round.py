"""bf16_stochastic_round=True (Adam, AdamW, SGD, RMSprop and their 8-bit forms): the kernels' bf16 params against an
fp32 twin rounded with the reference bits (bit for bit), unbiasedness where round-to-nearest stalls, determinism across
threads, runs and torch.compile, checkpoints, GradScaler, other dtypes untouched, bad input."""

import io

import pytest
import torch

import fused_train
from fused_train.optim import SGD, Adam, Adam8bit, AdamW, AdamW8bit, RMSprop, RMSprop8bit, SGD8bit
from fused_train.reference import round_to_bf16_stochastic_reference, stochastic_rounding_bits_reference

from conftest import cuda_only, run_on_cpu_capability

# Sizes around the vector width, the CPU tile (512) and chunk (32768), and the 8-bit block (256).
SIZES = [1, 7, 513, 4099, 70_001]

# (optimizer, its arguments) that take bf16_stochastic_round; weight decay and momentum exercise the param's role
# in the update.
OPTIMIZERS = {
    "Adam": (Adam, dict(lr=1e-3, weight_decay=0.01)),
    "AdamW": (AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "SGD": (SGD, dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "SGD-plain": (SGD, dict(lr=0.01)),
    "Adam8bit": (Adam8bit, dict(lr=1e-3, min_8bit_size=1)),
    "AdamW8bit": (AdamW8bit, dict(lr=1e-3, min_8bit_size=4096)),  # small params keep fp32 state
    "RMSprop": (RMSprop, dict(lr=1e-3, weight_decay=0.01)),
    "RMSprop-centered-momentum": (RMSprop, dict(lr=1e-3, centered=True, momentum=0.9)),
    "SGD8bit": (SGD8bit, dict(lr=0.01, momentum=0.9, dampening=0.1, min_8bit_size=1)),
    "RMSprop8bit": (RMSprop8bit, dict(lr=1e-3, momentum=0.9, min_8bit_size=1)),
}


def _bits(x):
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x.view(torch.int32)


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype
    assert torch.equal(_bits(a), _bits(b)), int((_bits(a) != _bits(b)).sum())


def _run_against_twin(name, sizes, steps=3, device="cpu"):
    """Steps bf16 params with stochastic rounding beside fp32 twins of the same values (same state: the bf16
    params' state is fp32), and checks each step's bf16 result against the twin's fp32 result rounded with the
    reference bits. The twin restarts from the bf16 values after each step."""
    cls, kwargs = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(len(sizes))
    bf16 = [torch.randn(n, generator=g).to(torch.bfloat16).to(device).requires_grad_(True) for n in sizes]
    twin = [p.detach().float().requires_grad_(True) for p in bf16]
    opt, opt_twin = cls(bf16, **kwargs, bf16_stochastic_round=True), cls(twin, **kwargs)
    for step in range(1, steps + 1):
        for p, q in zip(bf16, twin):
            grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            p.grad = grad.to(device)
            q.grad = grad.float().to(device)
        opt.step()
        opt_twin.step()
        for i, (p, q) in enumerate(zip(bf16, twin)):
            seed = int(opt.state[p]["rounding_seed"])
            assert float(opt.state[p]["step"]) == step
            bits = stochastic_rounding_bits_reference(seed, step, p.numel())
            want = round_to_bf16_stochastic_reference(q.detach().cpu(), bits).reshape(p.shape)
            _assert_same_bits(p.detach().cpu(), want)
            with torch.no_grad():
                q.copy_(p.float())
    return opt, bf16


@pytest.mark.smoke
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kernel_rounds_with_the_reference_bits(name):
    _run_against_twin(name, SIZES)


def test_scalar_kernels_round_with_the_same_bits():
    """The instruction set lowered to the scalar kernels (FUSED_TRAIN_CPU_CAPABILITY=default, read at load time, so in
    a process of its own): the same bits as the vector kernels."""
    code = ("import test_stochastic_round as T\n"
            "for name in ('AdamW', 'SGD', 'AdamW8bit', 'RMSprop', 'RMSprop8bit'): T._run_against_twin(name, T.SIZES)")
    assert run_on_cpu_capability(code, "default") == "default"


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_whatever_the_thread_count(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_against_twin("AdamW", [200_003], steps=2)
    finally:
        torch.set_num_threads(old)


def test_seeds_come_from_positions_and_differ():
    params = [torch.zeros(10, dtype=torch.bfloat16, requires_grad=True) for _ in range(4)]
    opt = AdamW([{"params": params[:2]}, {"params": params[2:]}], bf16_stochastic_round=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    seeds = [int(opt.state[p]["rounding_seed"]) for p in params]
    assert len(set(seeds)) == 4
    assert all(opt.state[p]["rounding_seed"].dtype == torch.int64 for p in params)
    # the same model built again (another run, another rank) draws the same seeds
    again = [torch.zeros(10, dtype=torch.bfloat16, requires_grad=True) for _ in range(4)]
    opt2 = AdamW([{"params": again[:2]}, {"params": again[2:]}], bf16_stochastic_round=True)
    for p in again:
        p.grad = torch.ones_like(p)
    opt2.step()
    assert [int(opt2.state[p]["rounding_seed"]) for p in again] == seeds
    for p, q in zip(params, again):
        _assert_same_bits(p.detach(), q.detach())


def test_optimizer_in_backward_gives_each_param_its_seed():
    """One optimizer per param there: the seeds still follow the params' positions, as in one optimizer."""
    params = [torch.zeros(8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    in_backward = fused_train.optim.OptimizerInBackward(params, AdamW, lr=1e-3, bf16_stochastic_round=True)
    sum((p.float() * torch.arange(8)).sum() for p in params).backward()
    seeds = [int(in_backward.optimizers[p].state[p]["rounding_seed"]) for p in params]
    together = [torch.zeros(8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    opt = AdamW(together, lr=1e-3, bf16_stochastic_round=True)
    sum((p.float() * torch.arange(8)).sum() for p in together).backward()
    opt.step()
    assert seeds == [int(opt.state[p]["rounding_seed"]) for p in together]
    for p, q in zip(params, together):
        _assert_same_bits(p.detach(), q.detach())


# -- what it is for ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_small_updates_accumulate_where_nearest_rounding_stalls(cls):
    """Weights at 1.0 and updates of about 1e-4 (a 40th of bf16's spacing below 1.0): to nearest, the weights never
    move; stochastically, their mean follows the exact trajectory."""
    n, steps, lr = 1 << 20, 20, 1e-4
    kwargs = dict(lr=lr) if cls is SGD else dict(lr=lr, weight_decay=0.0, betas=(0.0, 0.0), eps=0.0)
    nearest = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    stochastic = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    opt_nearest, opt_stochastic = cls([nearest], **kwargs), cls([stochastic], **kwargs, bf16_stochastic_round=True)
    for _ in range(steps):
        # SGD: update lr·1; Adam with β = 0 and ε = 0: lr·g/|g| = lr
        nearest.grad = torch.ones(n, dtype=torch.bfloat16)
        stochastic.grad = torch.ones(n, dtype=torch.bfloat16)
        opt_nearest.step()
        opt_stochastic.step()
    assert torch.all(nearest == 1.0)
    exact = 1.0 - steps * lr
    mean = stochastic.double().mean().item()
    # each element's error is bounded by one spacing (2^-8) per step and zero-mean: 6 standard errors of the mean
    bound = 6 * (2.0 ** -8) * (steps ** 0.5) / n ** 0.5
    assert abs(mean - exact) < bound, (mean, exact, bound)
    assert stochastic.float().min() >= 1.0 - 2 * 2.0 ** -8 * steps


def test_other_dtypes_round_as_before():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        a = torch.randn(1000, dtype=dtype, requires_grad=True)
        b = a.detach().clone().requires_grad_(True)
        opt_a, opt_b = AdamW([a], lr=0.01), AdamW([b], lr=0.01, bf16_stochastic_round=True)
        for _ in range(2):
            a.grad = torch.randn(1000, dtype=dtype)
            b.grad = a.grad.clone()
            opt_a.step()
            opt_b.step()
        assert torch.equal(a, b)
        assert "rounding_seed" not in opt_b.state[b]


def test_group_option_is_per_group_and_can_be_switched_on():
    torch.manual_seed(0)
    on, off = (torch.randn(600).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
    opt = SGD([{"params": [on], "bf16_stochastic_round": True}, {"params": [off]}], lr=0.01)
    assert opt.param_groups[1]["bf16_stochastic_round"] is False
    on.grad, off.grad = torch.randn(600).to(torch.bfloat16), torch.randn(600).to(torch.bfloat16)
    opt.step()
    assert set(opt.state[on]) == {"step", "rounding_seed"} and len(opt.state[off]) == 0
    # switched on later: the seed and the counter are created at that step
    opt.param_groups[1]["bf16_stochastic_round"] = True
    before = off.detach().clone()
    off.grad = torch.randn(600).to(torch.bfloat16)
    opt.step()
    assert float(opt.state[off]["step"]) == 1
    bits = stochastic_rounding_bits_reference(int(opt.state[off]["rounding_seed"]), 1, 600)
    _assert_same_bits(off.detach(), round_to_bf16_stochastic_reference(before.float() - 0.01 * off.grad.float(), bits))


# -- determinism, checkpoints, GradScaler, torch.compile ---------------------------------------------------------


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(torch.bfloat16)


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g).to(torch.bfloat16)
        y = torch.randint(0, 4, (16,), generator=g)
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cls", [AdamW, SGD, AdamW8bit, RMSprop8bit, SGD8bit])
def test_checkpoint_resumes_bit_for_bit(cls):
    kwargs = dict(lr=1e-2, bf16_stochastic_round=True)
    if cls in (AdamW8bit, RMSprop8bit, SGD8bit):
        kwargs["min_8bit_size"] = 1
    if cls in (RMSprop8bit, SGD8bit):
        kwargs["momentum"] = 0.9
    straight = _model(0)
    opt = cls(straight.parameters(), **kwargs)
    _train(straight, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(straight, opt, 3, seed=2)

    resumed = _model(5)
    opt2 = cls(resumed.parameters(), **kwargs)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    first = next(iter(opt2.state.values()))
    assert first["rounding_seed"].dtype == torch.int64  # torch's load casts state to the param's dtype: undone
    _train(resumed, opt2, 3, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        _assert_same_bits(p.detach(), q.detach())


def test_torch_checkpoint_keeps_the_constructors_choice():
    model = _model(0)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, torch_opt, 1)
    opt = AdamW(model.parameters(), lr=1e-3, bf16_stochastic_round=True)
    opt.load_state_dict(torch_opt.state_dict())
    assert all(group["bf16_stochastic_round"] for group in opt.param_groups)
    _train(model, opt, 1)
    assert all("rounding_seed" in s for s in opt.state.values())
    # and ours loads into torch's (the extra keys are ignored there)
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(opt.state_dict())


def test_grad_scaler_skip_and_scale():
    torch.manual_seed(0)
    a = torch.randn(3000).to(torch.bfloat16).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    opt_a, opt_b = AdamW([a], lr=1e-3, bf16_stochastic_round=True), AdamW([b], lr=1e-3, bf16_stochastic_round=True)
    grad = torch.randn(3000).to(torch.bfloat16)
    a.grad = grad.clone()
    b.grad = grad * 1024
    opt_b.grad_scale, opt_b.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt_a.step()
    opt_b.step()
    _assert_same_bits(a.detach(), b.detach())
    # a skipped step: params, step counters (the rounding's counter) and seeds untouched
    before = b.detach().clone()
    state = {k: v.clone() for k, v in opt_b.state[b].items()}
    b.grad = torch.full_like(b, float("inf"))
    opt_b.found_inf = torch.tensor(1.0)
    opt_b.step()
    _assert_same_bits(b.detach(), before)
    for k, v in opt_b.state[b].items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("cls,kwargs", [(AdamW, {}), (SGD, dict(momentum=0.9)), (AdamW8bit, dict(min_8bit_size=1)),
                                        (RMSprop, dict(momentum=0.5)), (SGD8bit, dict(momentum=0.9, min_8bit_size=1))])
def test_compiled_step_matches_eager(cls, kwargs):
    eager_model, compiled_model = _model(0), _model(0)
    eager = cls(eager_model.parameters(), lr=1e-2, bf16_stochastic_round=True, **kwargs)
    compiled = cls(compiled_model.parameters(), lr=1e-2, bf16_stochastic_round=True, **kwargs)
    torch._dynamo.reset()
    try:
        step = torch.compile(compiled.step, fullgraph=True)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
                q.grad = p.grad.clone()
            eager.step()
            step()
    finally:
        torch._dynamo.reset()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        _assert_same_bits(p.detach(), q.detach())


def test_gradient_zeroing_in_the_step():
    p = torch.randn(5000).to(torch.bfloat16).requires_grad_(True)
    opt = AdamW([p], lr=1e-3, bf16_stochastic_round=True, zero_grad_in_step=True)
    p.grad = torch.randn(5000).to(torch.bfloat16)
    grad = p.grad
    opt.step()
    assert torch.all(grad == 0)


# -- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Adam, AdamW, SGD, Adam8bit, AdamW8bit, RMSprop, RMSprop8bit, SGD8bit])
def test_option_must_be_a_bool(cls):
    with pytest.raises(ValueError, match="bf16_stochastic_round must be True or False"):
        cls([torch.zeros(2, requires_grad=True)], lr=0.1, bf16_stochastic_round="yes")


def test_op_refuses_bad_seeds_and_offsets_before_writing():
    p = torch.ones(8, dtype=torch.bfloat16)
    g = torch.ones(8, dtype=torch.bfloat16)
    m, v = torch.zeros(8), torch.zeros(8)
    step = torch.zeros(())
    good = torch.tensor(1, dtype=torch.int64)
    # (zero_grad: a call that wrote anything would have zeroed g)
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=True, zero_grad=True)
    cases = [
        (dict(rounding_seeds=[good, good]), RuntimeError, "got 1 params but 2 rounding_seeds"),
        (dict(rounding_seeds=[torch.tensor(1.0)]), RuntimeError, r"rounding_seeds\[0\] must be a one-element int64"),
        (dict(rounding_seeds=[torch.tensor([1, 2])]), RuntimeError, r"rounding_seeds\[0\] must be a one-element"),
        (dict(rounding_offsets=[0]), RuntimeError, "rounding_offsets apply with rounding_seeds"),
        (dict(rounding_seeds=[good], rounding_offsets=[0, 8]), RuntimeError, "got 1 params but 2 rounding_offsets"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            fused_train._ops.adam_step_([p], [g], [m], [v], [], [step], **hyper, **extra)
    assert torch.all(p == 1) and torch.all(g == 1) and float(step) == 0 and torch.all(m == 0)
    with pytest.raises(TypeError, match="apply to bfloat16 params only"):
        fused_train._ops.adam_step_([p.float()], [g.float()], [m], [v], [], [step], **hyper, rounding_seeds=[good])
    with pytest.raises(RuntimeError, match="rounding_seeds need state_steps"):
        fused_train._ops.sgd_step_([p], [g], [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                   nesterov=False, maximize=False, is_first_step=False, zero_grad=False,
                                   rounding_seeds=[good])
    assert torch.all(p == 1)


# -- rounding offsets: a shard rounds as its whole tensor ---------------------------------------------------------

_HYPER = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=True, zero_grad=True),
    "sgd": dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True, maximize=False,
                is_first_step=True, zero_grad=True),
    "rmsprop": dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True, maximize=False,
                    zero_grad=True),
}


_HYPER["adam8bit"] = {k: v for k, v in _HYPER["adam"].items() if k != "amsgrad"}
_HYPER["sgd8bit"] = _HYPER["sgd"]
_HYPER["rmsprop8bit"] = {k: v for k, v in _HYPER["rmsprop"].items() if k != "centered"}


def _zero_8bit_state(params, signed):
    """A moment's zero 8-bit state per param: the code of 0 and absmax 0 per block of 256."""
    codes = [torch.full(p.shape, 127 if signed else 0, dtype=torch.uint8, device=p.device) for p in params]
    return codes, [torch.zeros((p.numel() + 255) // 256, device=p.device) for p in params]


def _op_step(kind, params, grads, seeds=None, offsets=None):
    """One step of the op ``kind`` over params (bf16 with seeds, or fp32 twins without) from zero state."""
    extra = {} if seeds is None else dict(rounding_seeds=seeds, rounding_offsets=offsets)
    steps = [torch.zeros((), device=p.device) for p in params]
    states = [[torch.zeros(p.shape, device=p.device) for p in params] for _ in range(3)]
    if kind == "adam8bit":
        fused_train._ops.adam8bit_step_(params, grads, *_zero_8bit_state(params, True),
                                        *_zero_8bit_state(params, False), steps, **_HYPER[kind], **extra)
    elif kind == "sgd8bit":
        fused_train._ops.sgd8bit_step_(params, grads, *_zero_8bit_state(params, True), **_HYPER[kind],
                                       state_steps=steps, **extra)
    elif kind == "rmsprop8bit":
        fused_train._ops.rmsprop8bit_step_(params, grads, *_zero_8bit_state(params, False),
                                           *_zero_8bit_state(params, True), steps, **_HYPER[kind], **extra)
    elif kind == "adam":
        fused_train._ops.adam_step_(params, grads, states[0], states[1], [], steps, **_HYPER[kind], **extra)
    elif kind == "sgd":
        fused_train._ops.sgd_step_(params, grads, states[0], **_HYPER[kind], state_steps=steps, **extra)
    else:
        fused_train._ops.rmsprop_step_(params, grads, states[0], states[1], states[2], steps, **_HYPER[kind],
                                       **extra)


def _pieces_round_as_the_whole(kind, device):
    g = torch.Generator().manual_seed(5)
    n, cuts = 140_003, [0, 333, 65_541, 140_003]  # pieces that start mid-vector, mid-tile and mid-chunk
    if kind.endswith("8bit"):
        cuts = [0, 512, 65_792, 140_003]  # (an 8-bit shard holds whole blocks of 256; the last, mid-chunk)
    whole = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    grad = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
    seed = torch.tensor(-7_654_321, dtype=torch.int64, device=device)
    pieces = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    piece_grads = [grad[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    _op_step(kind, [whole], [grad.clone()], [seed])
    _op_step(kind, pieces, piece_grads, [seed.clone() for _ in pieces], cuts[:-1])
    _assert_same_bits(torch.cat(pieces), whole)


@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop", "adam8bit", "sgd8bit", "rmsprop8bit"])
def test_offsets_make_pieces_round_as_the_whole(kind):
    """A tensor cut into pieces (as FSDP2 cuts a param into shards), each piece stepped with its first element's
    index in the whole as its rounding offset and the whole's seed, gives the whole's result bit for bit."""
    _pieces_round_as_the_whole(kind, "cpu")


def test_offsets_matter():
    """The same pieces with offsets 0 draw each other's bits, and their results differ from the whole's."""
    g = torch.Generator().manual_seed(6)
    half = torch.randn(4096, generator=g).to(torch.bfloat16)
    grad = torch.randn(4096, generator=g).to(torch.bfloat16)
    seed = torch.tensor(99, dtype=torch.int64)
    for offsets, equal_halves in ((None, True), ([0, 4096], False)):
        pieces, grads = [half.clone(), half.clone()], [grad.clone(), grad.clone()]
        _op_step("adam", pieces, grads, [seed, seed.clone()], offsets)
        assert torch.equal(_bits(pieces[0]), _bits(pieces[1])) == equal_halves


def _offsets_past_2_to_the_32(device="cpu"):
    """Offsets whose pieces cross a multiple of 2^32 (mid-vector) and wrap past 2^64: every element draws the bits
    of its own index, as the reference computes them."""
    g = torch.Generator().manual_seed(7)
    n = 1000
    for offset in ((1 << 32) - 301, (5 << 32) - 7, -501, (1 << 63) - 10):
        bf16 = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
        grad = torch.randn(n, generator=g).to(torch.bfloat16).to(device)
        twin = bf16.float()
        _op_step("adam", [bf16], [grad.clone()], [torch.tensor(3, dtype=torch.int64, device=device)], [offset])
        _op_step("adam", [twin], [grad.float()])
        want = round_to_bf16_stochastic_reference(twin.cpu(), stochastic_rounding_bits_reference(3, 1, n, offset))
        _assert_same_bits(bf16.cpu(), want)


def test_offsets_past_2_to_the_32():
    _offsets_past_2_to_the_32()


def test_offsets_on_lower_instruction_sets():
    code = ("import test_stochastic_round as T\n"
            "T._offsets_past_2_to_the_32()\n"
            "for kind in ('adam', 'sgd', 'rmsprop', 'adam8bit', 'sgd8bit', 'rmsprop8bit'):\n"
            "    T._pieces_round_as_the_whole(kind, 'cpu')")
    for capability in ("avx2", "default"):
        assert run_on_cpu_capability(code, capability) == capability


def test_bad_seed_in_state_raises_before_any_group_steps():
    a, b = (torch.ones(4, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    opt = AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, bf16_stochastic_round=True)
    a.grad, b.grad = torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    opt.state[b]["rounding_seed"] = torch.tensor(0.5)
    before = a.detach().clone()
    with pytest.raises(TypeError, match="state 'rounding_seed' must be an int"):
        opt.step()
    _assert_same_bits(a.detach(), before)
    opt.state[b]["rounding_seed"] = 12345  # an int is taken
    opt.step()
    assert opt.state[b]["rounding_seed"].dtype == torch.int64 and int(opt.state[b]["rounding_seed"]) == 12345


# -- CUDA (skips without a GPU) ----------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("name", ["AdamW", "SGD", "AdamW8bit", "Adam8bit", "RMSprop", "RMSprop-centered-momentum",
                                  "SGD8bit", "RMSprop8bit"])
def test_cuda_rounds_with_the_reference_bits(name):
    # 70_001 elements: two CUDA chunks (65536), with an odd tail
    _run_against_twin(name, [1, 513, 70_001], device="cuda")


@cuda_only
@pytest.mark.parametrize("kind", ["adam", "sgd", "rmsprop", "adam8bit", "sgd8bit", "rmsprop8bit"])
def test_cuda_offsets_make_pieces_round_as_the_whole(kind):
    _pieces_round_as_the_whole(kind, "cuda")


@cuda_only
def test_cuda_offsets_past_2_to_the_32():
    _offsets_past_2_to_the_32("cuda")
