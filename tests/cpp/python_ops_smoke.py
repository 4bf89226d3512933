"""Loads a fused_train library built by CMake into Python and steps every optimizer op beside torch.optim.

    python tests/cpp/python_ops_smoke.py build/cmake-sanitize/libfused_train.so

`make sanitize` runs it (as the ctest test python_ops_under_asan) on the ASan/UBSan build, with libasan preloaded:
the sanitized kernels then run inside a real Python + torch process, called through torch.ops as the package calls
them. It loads the library by path, not through `import fused_train`, whose _C is the uninstrumented setup.py build.
"""

import sys

import torch

STEPS = 3
SIZES = (278011, 17, 1)


def run_pair(make_torch_optimizer, fused_step, dtype):
    """Steps torch's optimizer and the fused op from the same params and grads; returns (torch params, ours)."""
    torch.manual_seed(0)
    ours = [torch.randn(n, dtype=dtype) for n in SIZES]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimizer = make_torch_optimizer(theirs)
    state = None
    for step in range(1, STEPS + 1):
        grads = [torch.randn(n, dtype=dtype) for n in SIZES]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        state = fused_step(ours, grads, state, step)
        assert all(bool((g == 0).all()) for g in grads), "zero_grad=True left a gradient non-zero"
    return [p.detach() for p in theirs], ours


def sgd(params, grads, state, step):
    bufs = state or [torch.zeros_like(p) for p in params]
    torch.ops.fused_train.sgd_step_(params, grads, bufs, [], lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01,
                                    nesterov=True, maximize=False, is_first_step=step == 1, zero_grad=True)
    return bufs


def adamw(params, grads, state, step):
    if state is None:
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params])
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = state
    torch.ops.fused_train.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=1e-3,
                                     beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=True,
                                     maximize=False, decoupled_weight_decay=True, zero_grad=True)
    return state


def rmsprop(params, grads, state, step):
    if state is None:
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params])
    square_avgs, grad_avgs, momentum_buffers, steps = state
    torch.ops.fused_train.rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr=0.01,
                                        alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.9, centered=True,
                                        maximize=False, zero_grad=True)
    return state


CASES = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True), sgd),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, amsgrad=True), adamw),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True), rmsprop),
}


def main():
    torch.ops.load_library(sys.argv[1])
    for name, (make_torch_optimizer, fused_step) in CASES.items():
        for dtype in (torch.float32, torch.float64):
            theirs, ours = run_pair(make_torch_optimizer, fused_step, dtype)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, msg=lambda m: f"{name} {dtype}: {m}")
            print(f"{name} {dtype}: matches torch.optim over {STEPS} steps")


if __name__ == "__main__":
    main()
