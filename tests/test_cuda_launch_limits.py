"""The CUDA loss kernels where their grids run out: more rows than one grid holds (the blocks stride over rows, as
they do past 2^31 - 1 rows), and a loss of more than 2^31 rows with a bad target beyond position 2^31 (64-bit
positions in the report). GPU only: skipped with the reason elsewhere."""

import pytest
import torch

from fused_train.nn.functional import cross_entropy

from conftest import cuda_only

pytestmark = cuda_only

# csrc/cuda/cross_entropy.cu: kBlocksPerSm. Rows beyond it make every block take several rows.
BLOCKS_PER_SM = 24


def _rows_beyond_the_grid():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return 2 * BLOCKS_PER_SM * sms + 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [3, 257, 9000])
def test_cuda_loss_over_more_rows_than_blocks_matches_torch(dtype, classes):
    n = _rows_beyond_the_grid()
    x = torch.randn(n, classes, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, classes, (n,), device="cuda")
    target[::13] = -100
    weight = torch.rand(classes, device="cuda", dtype=dtype)
    kwargs = {"weight": weight, "label_smoothing": 0.1}
    loss = cross_entropy(x, target, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.float().sum(), x)
    ref_x = x.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_x, target, reduction="none", weight=weight.float(), label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(grad.float(), ref_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_probability_targets_over_more_rows_than_blocks_match_torch(dtype):
    n, classes = _rows_beyond_the_grid(), 100
    x = torch.randn(n, classes, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.softmax(torch.randn(n, classes, device="cuda"), dim=1).to(dtype)
    # 'sum': each gradient entry is softmax - target, about 1e-2, which a tolerance can check.
    loss = cross_entropy(x, target, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    ref_x = x.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_x, target.float(), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_x)
    tol = {"rtol": 2e-2, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(loss.float(), ref, **tol)
    torch.testing.assert_close(grad.float(), ref_grad, **tol)


def test_cuda_loss_over_more_than_2_31_rows():
    """2^31 + 3 rows of one class (bf16 logits, int32 targets: 52 GiB with the per-row outputs), the last row's
    target out of range: the grid-strided forward reaches it (the loss is NaN) and the report names its 64-bit
    position."""
    rows = (1 << 31) + 3
    need = rows * (2 + 4 + 4 * 5) + (1 << 30)  # logits, targets, row_lse (2 floats), loss, z-loss, weight; slack
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.randn(rows, 1, device="cuda", dtype=torch.bfloat16)
    target = torch.zeros(rows, device="cuda", dtype=torch.int32)
    target[-1] = 5
    loss = cross_entropy(x, target, reduction="sum")
    nan = loss.isnan().item()
    del x, target, loss
    torch.cuda.empty_cache()
    with pytest.raises(IndexError) as raised:  # takes the report whatever the asserts below find
        cross_entropy(torch.zeros(1, 2, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))
    assert f"got target 5 at position {rows - 1}," in str(raised.value)
    assert nan
