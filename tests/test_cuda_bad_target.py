"""Out-of-range class targets on CUDA, against the contract in csrc/cuda/bad_target.cuh: the row's loss and gradient
are NaN; the next fused_train optimizer step skips (params, state and step counters untouched), also after gradient
accumulation and inside a replayed CUDA graph; the first fused_train call that starts after the bad kernel has
finished raises IndexError naming one bad row, its position and its value from the same row; and training then
goes on as if the bad batch had never come. GPU only: skipped with the reason elsewhere (the CPU raises at once,
see test_bad_input.py)."""

import copy
import re

import pytest
import torch

import fused_train
from fused_train import _ops
from fused_train.nn.functional import cross_entropy

from conftest import cuda_only, warm_up_and_capture

pytestmark = cuda_only

REPORT = re.compile(r"got target (-?\d+) at position (\d+), out of bounds")


def _reported(message):
    match = REPORT.search(message)
    assert match, f"the IndexError does not name a target and a position: {message}"
    return int(match.group(2)), int(match.group(1))  # (position, value)


def _good_call():
    return cross_entropy(torch.zeros(2, 3, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))


def _reset_bad_target_state():
    """Takes a pending report and consumes the step guard (a throwaway fused step skips on it, then a loss
    clears it). Returns the pending report's message, if any."""
    torch.cuda.synchronize()
    pending = None
    try:
        _good_call()
    except IndexError as e:
        pending = str(e)
    p = torch.zeros(1, device="cuda")
    fused_train._ops.sgd_step_([p], [torch.ones_like(p)], [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                               nesterov=False, maximize=False, is_first_step=False, zero_grad=False)
    _good_call()
    torch.cuda.synchronize()
    return pending


@pytest.fixture(autouse=True)
def _no_report_left_over():
    """Each test starts and ends with no pending report and a clear step guard, so that one test's bad batch
    cannot fail or skip another's step."""
    _reset_bad_target_state()
    yield
    pending = _reset_bad_target_state()
    if pending is not None:  # pragma: no cover - the failure message is the point
        pytest.fail(f"a bad-target report was left pending: {pending}")


def _bad_targets(n, classes, device="cuda"):
    """Targets with many bad rows racing for the report; each bad value encodes its own row, so a report
    that paired one row's position with another's value is caught."""
    target = torch.randint(0, classes, (n,), device=device)
    rows = torch.arange(n, device=device)
    high = rows % 7 == 3
    low = rows % 11 == 5
    target[high] = classes + 1000 + rows[high]
    target[low] = -2 - rows[low]
    expected = {int(r): classes + 1000 + int(r) for r in rows[high].tolist()}
    expected.update({int(r): -2 - int(r) for r in rows[low].tolist()})
    return target, high | low, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_cuda_bad_rows_are_nan_and_one_row_is_reported_consistently(dtype, index_dtype, requires_grad):
    n, classes = 4096, 37
    x = torch.randn(n, classes, device="cuda", dtype=dtype, requires_grad=requires_grad)
    target, bad, expected = _bad_targets(n, classes)
    loss = cross_entropy(x, target.to(index_dtype), reduction="none")
    torch.cuda.synchronize()
    assert loss[bad].isnan().all() and not loss[~bad].isnan().any()
    good = loss[~bad].float()
    reference = torch.nn.functional.cross_entropy(x.detach().float()[~bad], target[~bad], reduction="none")
    torch.testing.assert_close(good, reference, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)

    with pytest.raises(IndexError) as raised:
        _good_call()
    position, value = _reported(str(raised.value))
    assert position in expected and value == expected[position], str(raised.value)
    # Taken: the next call runs, and a later bad batch is reported afresh.
    _good_call()
    torch.cuda.synchronize()
    _good_call()


def test_cuda_backward_after_a_bad_forward_raises_before_writing_a_gradient():
    x = torch.randn(64, 10, device="cuda", requires_grad=True)
    target = torch.randint(0, 10, (64,), device="cuda")
    target[17] = 10
    loss = cross_entropy(x, target)  # the gradient is written here, for grad_loss = 1
    torch.cuda.synchronize()
    with pytest.raises(IndexError) as raised:
        loss.backward()  # cross_entropy_apply_grad_loss_ checks the report before any kernel
    assert _reported(str(raised.value)) == (17, 10)
    assert x.grad is None


def test_cuda_scale_grad_checks_the_report():
    grad = torch.ones(4, 5, device="cuda")
    target = torch.tensor([0, 1, 9, 2], device="cuda")
    cross_entropy(torch.randn(4, 5, device="cuda"), target)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="target 9 at position 2"):
        _ops.cross_entropy_scale_grad_(grad, torch.tensor(2.0, device="cuda"))
    assert torch.equal(grad, torch.ones_like(grad)), "the gradient was scaled although the call raised"


OPTIMIZERS = {
    "SGD": lambda p: fused_train.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "Adam": lambda p: fused_train.optim.Adam(p, lr=0.01, amsgrad=True),
    "AdamW": lambda p: fused_train.optim.AdamW(p, lr=0.01),
    "RMSprop": lambda p: fused_train.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}


def _train_step(model, opt, x, y):
    opt.zero_grad()
    cross_entropy(model(x), y).backward()
    opt.step()


def _assert_same_training_state(model, opt, twin, twin_opt):
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state, twin_state = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    assert state.keys() == twin_state.keys()
    for k in state:
        for key, value in state[k].items():
            torch.testing.assert_close(value, twin_state[k][key], rtol=0, atol=0, msg=f"state {key} differs")


def _model_and_twin(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).cuda()
    twin = copy.deepcopy(model)
    opt, twin_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](twin.parameters())
    x = torch.randn(32, 8, device="cuda")
    y = torch.randint(0, 5, (32,), device="cuda")
    for m, o in ((model, opt), (twin, twin_opt)):  # state exists before the bad batch
        _train_step(m, o, x, y)
    bad_y = y.clone()
    bad_y[[4, 21]] = torch.tensor([5, -9], device="cuda")
    torch.cuda.synchronize()
    return model, opt, twin, twin_opt, x, y, bad_y


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_fused_step_after_a_bad_target_is_skipped_and_training_goes_on(name):
    """The GPU is behind the host, so no host check can know yet: the optimizer kernel itself skips. The
    next fused call raises; the steps after it run as if the bad batch had never come."""
    model, opt, twin, twin_opt, x, y, bad_y = _model_and_twin(name)
    torch.cuda._sleep(500_000_000)  # ~0.3 s of GPU time: the host queues the whole step before the loss runs
    _train_step(model, opt, x, bad_y)
    torch.cuda.synchronize()
    with pytest.raises(IndexError) as raised:
        opt.step()  # the next fused call takes the report before doing anything
    assert _reported(str(raised.value)) in {(4, 5), (21, -9)}, str(raised.value)
    _assert_same_training_state(model, opt, twin, twin_opt)
    for _ in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            _train_step(m, o, x, y)
    torch.cuda.synchronize()
    _assert_same_training_state(model, opt, twin, twin_opt)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
@pytest.mark.parametrize("raised_at", ["backward", "step"])
def test_cuda_error_caught_before_the_step_skips_the_next_step_instead(name, raised_at):
    """The host raises before the bad batch's step ran (at the backward, or at the step's own check, with the
    NaN gradients in .grad). The GPU cannot know what the script did with those gradients, so the next fused
    step is skipped whatever it steps; the one after runs."""
    model, opt, twin, twin_opt, x, y, bad_y = _model_and_twin(name)
    opt.zero_grad()
    if raised_at == "step":
        torch.cuda._sleep(200_000_000)
    loss = cross_entropy(model(x), bad_y)
    if raised_at == "backward":
        torch.cuda.synchronize()
        with pytest.raises(IndexError, match="target (5|-9) at position"):
            loss.backward()
    else:
        loss.backward()
        torch.cuda.synchronize()
        with pytest.raises(IndexError, match="target (5|-9) at position"):
            opt.step()
    _assert_same_training_state(model, opt, twin, twin_opt)
    _train_step(model, opt, x, y)  # skipped
    torch.cuda.synchronize()
    _assert_same_training_state(model, opt, twin, twin_opt)
    _train_step(model, opt, x, y)
    _train_step(twin, twin_opt, x, y)
    torch.cuda.synchronize()
    _assert_same_training_state(model, opt, twin, twin_opt)


def test_cuda_every_launch_group_and_optimizer_of_the_step_skips():
    """300 params in two param groups of fp32 and bf16 under two fused optimizers: many launches, all behind
    one guard, none of them may step."""
    torch.manual_seed(0)
    fp32 = [torch.nn.Parameter(torch.randn(5, device="cuda")) for _ in range(150)]
    bf16 = [torch.nn.Parameter(torch.randn(5, device="cuda", dtype=torch.bfloat16)) for _ in range(150)]
    first = fused_train.optim.Adam([{"params": fp32[:100] + bf16[:100]}, {"params": fp32[100:120], "lr": 0.1}],
                                   lr=0.01)
    second = fused_train.optim.SGD(fp32[120:] + bf16[100:], lr=0.1, momentum=0.9)
    params = fp32 + bf16
    x = torch.randn(16, 5, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")

    def step(target):
        for o in (first, second):
            o.zero_grad()
        logits = x + sum(p.float() for p in params)
        cross_entropy(logits, target).backward()
        first.step()
        second.step()

    step(y)
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in params]
    states = [copy.deepcopy(o.state_dict()) for o in (first, second)]
    bad = y.clone()
    bad[9] = 77
    torch.cuda._sleep(500_000_000)
    step(bad)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="target 77 at position 9"):
        _good_call()
    assert all(torch.equal(a, b) for a, b in zip(params, before)), "a param moved"
    for o, saved in zip((first, second), states):
        for k, st in saved["state"].items():
            for key, value in st.items():
                assert torch.equal(o.state_dict()["state"][k][key], value), f"state {key} of param {k} moved"
    step(y)  # and every one of them steps again
    torch.cuda.synchronize()
    assert all(not torch.equal(a, b) for a, b in zip(params, before))


def test_cuda_bad_target_through_the_split_vocabulary_path():
    """Two rows of 40000 classes: each row is cut over several blocks and combined by a second kernel, which
    reports the bad row."""
    x = torch.randn(2, 40000, device="cuda", requires_grad=True)
    target = torch.tensor([3, 40001], device="cuda")
    loss = cross_entropy(x, target, reduction="none")
    torch.cuda.synchronize()
    assert not loss[0].isnan() and loss[1].isnan()
    torch.testing.assert_close(loss[0].detach(), torch.nn.functional.cross_entropy(x[:1].detach(), target[:1]))
    with pytest.raises(IndexError, match="got target 40001 at position 1,"):
        _good_call()


def test_cuda_bad_target_with_grad_scaler_and_torch_optimizer_skips_the_step():
    """torch.optim does not read the flag; GradScaler's inf check catches the NaN gradients instead."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 8, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")
    cross_entropy(model(x), y).backward()  # warm-up (cuBLAS), so that the GPU is surely behind below
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    y[3] = 99
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    scaler.scale(cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="target 99 at position 3"):
        _good_call()


def test_cuda_gradient_accumulation_over_a_bad_batch_skips_the_step():
    """The guard waits for the step, not for the next loss: a good micro-batch accumulated after a bad one
    does not re-enable stepping with the NaN gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5).cuda()
    twin = copy.deepcopy(model)
    opt = fused_train.optim.AdamW(model.parameters(), lr=0.01)
    twin_opt = fused_train.optim.AdamW(twin.parameters(), lr=0.01)
    x = torch.randn(16, 8, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")
    for m, o in ((model, opt), (twin, twin_opt)):
        _train_step(m, o, x, y)
    bad_y = y.clone()
    bad_y[0] = 5
    torch.cuda.synchronize()
    torch.cuda._sleep(500_000_000)  # the host queues both micro-batches and the step before the GPU runs them
    opt.zero_grad()
    cross_entropy(model(x), bad_y).backward()
    cross_entropy(model(x), y).backward()
    opt.step()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="target 5 at position 0"):
        _good_call()
    _assert_same_training_state(model, opt, twin, twin_opt)
    for m, o in ((model, opt), (twin, twin_opt)):
        _train_step(m, o, x, y)
    torch.cuda.synchronize()
    _assert_same_training_state(model, opt, twin, twin_opt)


def test_cuda_replayed_graph_skips_the_bad_batch_and_goes_on_training():
    """No host call runs between replays: the loss after the skipped step re-enables stepping on the device."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).cuda()
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.01, device="cuda")
    opt = fused_train.optim.Adam(model.parameters(), lr=lr, capturable=True)
    twin_opt = fused_train.optim.Adam(twin.parameters(), lr=0.01)
    loss_fn = fused_train.nn.CrossEntropyLoss()
    good = [(torch.randn(32, 8, device="cuda"), torch.randint(0, 5, (32,), device="cuda")) for _ in range(5)]
    static_x, static_y = good[0][0].clone(), good[0][1].clone()

    def step(m, o, xb, yb):
        loss_fn(m(xb), yb).backward()
        o.step()
        o.zero_grad(set_to_none=False)

    graph = warm_up_and_capture(lambda: step(model, opt, static_x, static_y), good[:2], static_x, static_y)
    bad_y = good[2][1].clone()
    bad_y[7] = -3
    for xb, yb in [good[2], (good[2][0], bad_y), good[3], good[4]]:
        static_x.copy_(xb)
        static_y.copy_(yb)
        graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="target -3 at position 7"):
        _good_call()
    for xb, yb in good:  # the twin never sees the bad batch
        step(twin, twin_opt, xb, yb)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(st["step"]) == 5.0 for st in opt.state.values()), "the bad batch's step did not advance"
