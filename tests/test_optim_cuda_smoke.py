"""CUDA-only behaviour of the optimizer kernels that the device-parametrized suite does not pin down: the
CUDA kernels are registered in a CUDA build (checked on any machine), step counters advance inside the kernel
across several launches and for empty params, a skipped step still zeroes the grads it consumed, and step
tensors on the CPU are refused."""

import pytest
import torch

import fused_train

from conftest import TOL, cuda_only

ops = torch.ops.fused_train


@pytest.mark.skipif(
    not fused_train.build_info()["cuda_compiled"], reason="fused_train was built without CUDA kernels"
)
@pytest.mark.parametrize("op", ["sgd_step_", "adam_step_", "rmsprop_step_", "adam8bit_step_", "sgd8bit_step_",
                                "rmsprop8bit_step_"])
def test_cuda_kernels_are_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_train::{op}", "CUDA")


def _adam_lists(device, sizes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g, dtype=dtype).to(device) for n in sizes]
    grads = [torch.randn(n, generator=g, dtype=dtype).to(device) for n in sizes]
    states = [[torch.zeros(n, device=device) for n in sizes] for _ in range(3)]
    steps = [torch.zeros((), device=device) for _ in sizes]
    return params, grads, states, steps


@cuda_only
def test_steps_advance_once_across_launches_and_empty_params():
    # 200 tensors (more than one launch holds at depth 5), empty ones, and one spanning several chunks.
    sizes = [0, 3, 65536 * 2 + 5] + [1 + i % 37 for i in range(197)]
    results = {}
    for device in ("cpu", "cuda"):
        params, grads, (m, v, vmax), steps = _adam_lists(device, sizes)
        for _ in range(3):
            ops.adam_step_(params, grads, m, v, vmax, steps, lr=0.01, beta1=0.9, beta2=0.999,
                           weight_decay=0.01, eps=1e-8, amsgrad=True, maximize=False,
                           decoupled_weight_decay=True, zero_grad=False)
        results[device] = (params, m, v, vmax, steps)
    for cpu_list, cuda_list in zip(results["cpu"], results["cuda"]):
        for a, b in zip(cpu_list, cuda_list):
            torch.testing.assert_close(b.cpu(), a, **TOL[torch.float32])
    assert all(float(s) == 3.0 for s in results["cuda"][4])


@cuda_only
def test_skipped_step_zeroes_grads_and_leaves_everything_else():
    params, grads, (m, v, _), steps = _adam_lists("cuda", [5, 70000])
    before = [p.clone() for p in params]
    ops.adam_step_(params, grads, m, v, [], steps, lr=0.01, beta1=0.9, beta2=0.999, weight_decay=0.0,
                   eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False, zero_grad=True,
                   grad_scale=torch.tensor(2.0, device="cuda"), found_inf=torch.tensor(1.0, device="cuda"))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.count_nonzero(t) == 0 for t in m + v + grads)
    assert all(float(s) == 0.0 for s in steps)


@cuda_only
def test_cpu_step_tensors_are_refused():
    params, grads, (m, v, _), _ = _adam_lists("cuda", [4])
    with pytest.raises(RuntimeError, match="state_steps"):
        ops.adam_step_(params, grads, m, v, [], [torch.zeros(())], lr=0.01, beta1=0.9, beta2=0.999,
                       weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                       decoupled_weight_decay=False, zero_grad=False)
