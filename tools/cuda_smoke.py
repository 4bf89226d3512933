"""Every fused_train CUDA op once, on small shapes that still reach each kernel path, checked against torch.

    python tools/cuda_smoke.py [--small]   # exits 1 on a mismatch, 0 when every case matches

Written to run under compute-sanitizer (memcheck, racecheck, synccheck, initcheck; see tools/gpu_check.py), so
it stays small: a few hundred kernel launches, tensors of at most a few million elements. Paths it
reaches: the optimizer launcher with many tensors (several launches), multi-chunk tensors, empty tensors,
GradScaler unscale and skip; the cross-entropy row kernels (a block per row, groups of lanes), the fused forward
and backward of the training step, the split-vocabulary forward (few rows, many classes),
every dtype, index and probability targets, weights, ignore_index, label smoothing, z-loss, in-place backward,
reduction none, (N, C, d) inputs and strided rows. --small keeps every path but runs fp32 and bf16 only, for
initcheck, which has to instrument torch's kernels too (see tools/gpu_check.py) and is the slowest tool.
"""

import argparse
import sys

import torch

import fused_train
import fused_train.nn.functional as FF
from fused_train._ops import _opmath

FAILURES = []
CASES = 0
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Loose on purpose: this is a smoke run for the sanitizers; tests/ holds the tight parity tests.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def check(name, actual, expected, dtype):
    global CASES
    CASES += 1
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    tol = TOL[dtype]
    try:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
    except AssertionError as error:
        FAILURES.append(f"{name}: {str(error).splitlines()[0]} ... {str(error).splitlines()[-1]}")


def optimizer_cases():
    global CASES
    # 150 tensors: more than one launch holds at any depth; one of two chunks plus a tail; empty ones.
    sizes = [0, 65536 * 2 + 7, 1, 33] + [1 + (i * 7) % 300 for i in range(146)]
    configs = [
        ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("SGD", dict(lr=0.1)),
        ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
        ("AdamW", dict(lr=1e-2)),
        ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=0.01)),
    ]
    for dtype in DTYPES:
        for name, cfg in configs:
            if dtype == torch.float16 and name == "RMSprop":
                cfg = dict(cfg, centered=False)  # fp16 centered variance: cancellation, not a kernel check
            g = torch.Generator().manual_seed(0)
            master = [torch.randn(n, generator=g).to(dtype) for n in sizes]
            grads = [[torch.randn(n, generator=g).to(dtype) for n in sizes] for _ in range(2)]
            ours = [p.clone().cuda().requires_grad_() for p in master]
            # Reference in fp32 (fp64 for fp64): our state and math are fp32 for half params.
            ref_dtype = _opmath(dtype)
            theirs = [p.to(ref_dtype).clone().cuda().requires_grad_() for p in master]
            opt = getattr(fused_train.optim, name)(ours, **cfg)
            ref = getattr(torch.optim, name)(theirs, foreach=False, **cfg)
            for step_grads in grads:
                for p, q, gr in zip(ours, theirs, step_grads):
                    p.grad = gr.clone().cuda()
                    q.grad = gr.to(ref_dtype).clone().cuda()
                opt.step()
                ref.step()
                opt.zero_grad(set_to_none=False)
                ref.zero_grad(set_to_none=False)
            check(f"{name}{cfg} {dtype}", torch.cat([p.flatten().double() for p in ours]),
                  torch.cat([p.flatten().double() for p in theirs]), dtype)
    # 8-bit state (every moment combination) and bf16 stochastic rounding (RMSprop's too): the CUDA step against the
    # same optimizer's CPU step, whose kernels the CPU tests hold to torch.optim and to the reference bits.
    for name, cfg in [
        ("AdamW8bit", dict(lr=1e-2, min_8bit_size=0)),
        ("SGD8bit", dict(lr=0.1, momentum=0.9, dampening=0.1, min_8bit_size=0)),
        ("RMSprop8bit", dict(lr=1e-2, momentum=0.9, min_8bit_size=0)),
        ("RMSprop8bit", dict(lr=1e-2, min_8bit_size=0)),
        ("SGD8bit", dict(lr=0.1, momentum=0.9, min_8bit_size=0, bf16_stochastic_round=True)),
        ("RMSprop", dict(lr=1e-2, momentum=0.9, bf16_stochastic_round=True)),
    ]:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(1)
            master = [torch.randn(n, generator=g).to(dtype) for n in sizes]
            grads = [[torch.randn(n, generator=g).to(dtype) for n in sizes] for _ in range(2)]
            ours = [p.clone().cuda().requires_grad_() for p in master]
            on_cpu = [p.clone().requires_grad_() for p in master]
            opt = getattr(fused_train.optim, name)(ours, **cfg)
            ref = getattr(fused_train.optim, name)(on_cpu, **cfg)
            for step_grads in grads:
                for p, q, gr in zip(ours, on_cpu, step_grads):
                    p.grad = gr.clone().cuda()
                    q.grad = gr.clone()
                opt.step()
                ref.step()
            check(f"{name}{cfg} {dtype} (CUDA vs CPU)", torch.cat([p.flatten().double().cpu() for p in ours]),
                  torch.cat([p.flatten().double() for p in on_cpu]), dtype)
    # Rounding offsets (FSDP2 shards): launches with per-slot index bases, over more tensors than one such launch
    # holds, offsets that cross multiples of 2^32 mid-chunk; CUDA must give the CPU kernels' bits exactly.
    g = torch.Generator().manual_seed(2)
    master = [torch.randn(n, generator=g).to(torch.bfloat16) for n in sizes]
    grads = [torch.randn(n, generator=g).to(torch.bfloat16) for n in sizes]
    # (each tensor crosses a multiple of 2^32: in its middle, the 131079-element one 40000 elements into its first
    # chunk)
    offsets = [(i + 1) * (1 << 32) - min(n // 2, 40_000) for i, n in enumerate(sizes)]
    results = []
    for device in ("cuda", "cpu"):
        params = [p.clone().to(device) for p in master]
        state = [[torch.zeros(n, device=device) for n in sizes] for _ in range(2)]
        seeds = [torch.tensor(1000 + i, dtype=torch.int64, device=device) for i in range(len(sizes))]
        fused_train._ops.adam_step_(params, [gr.clone().to(device) for gr in grads], state[0], state[1], [],
                                    [torch.zeros((), device=device) for _ in sizes], lr=1e-2, beta1=0.9,
                                    beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=True, zero_grad=True, rounding_seeds=seeds,
                                    rounding_offsets=offsets)
        results.append(torch.cat([p.flatten().cpu() for p in params]))
    CASES += 1
    if not torch.equal(results[0].view(torch.int16), results[1].view(torch.int16)):
        FAILURES.append(f"AdamW bf16 rounding_offsets (CUDA vs CPU): "
                        f"{int((results[0].view(torch.int16) != results[1].view(torch.int16)).sum())} elements differ")
    # GradScaler path: unscale by grad_scale, skip everything when found_inf.
    for found in (0.0, 1.0):
        p = torch.randn(70000, device="cuda", requires_grad=True)
        q = p.detach().clone().requires_grad_()
        opt = fused_train.optim.AdamW([p], lr=1e-2)
        ref = torch.optim.AdamW([q], lr=1e-2, foreach=False)
        g = torch.randn(70000, device="cuda")
        p.grad = g * 4
        q.grad = g.clone()
        opt.grad_scale = torch.tensor(4.0, device="cuda")
        opt.found_inf = torch.tensor(found, device="cuda")
        opt.step()
        del opt.grad_scale, opt.found_inf
        if found == 0.0:
            ref.step()
        check(f"AdamW grad_scale found_inf={found}", p, q, torch.float32)


def loss_cases():
    shapes = [(300, 1000), (4, 50000), (7, 1), (1, 33), (0, 5)]
    for dtype in DTYPES:
        for rows, classes in shapes:
            for opts in (dict(), dict(label_smoothing=0.1, ignore_index=2, weight=True), dict(reduction="none"),
                         dict(reduction="sum", lse_square_scale=1e-3)):
                opts = dict(opts)
                x = (torch.randn(rows, classes) * 3).to(dtype).cuda()
                t = torch.randint(0, classes, (rows,)).cuda()
                if rows > 2 and "ignore_index" in opts:
                    t[1] = opts["ignore_index"]
                if opts.pop("weight", False):
                    opts["weight"] = torch.rand(classes, dtype=dtype).cuda()
                z = opts.pop("lse_square_scale", 0.0)
                a = x.clone().requires_grad_()
                b = x.float().clone().requires_grad_() if dtype != torch.float64 else x.clone().requires_grad_()
                ours = FF.cross_entropy(a, t, lse_square_scale=z, **opts)
                ref_opts = dict(opts)
                if "weight" in ref_opts:
                    ref_opts["weight"] = ref_opts["weight"].to(b.dtype)
                theirs = torch.nn.functional.cross_entropy(b, t, **ref_opts)
                if z:
                    theirs = theirs + z * torch.logsumexp(b, 1).square().sum()
                seed = torch.rand_like(theirs)
                (ours * seed.to(ours.dtype)).sum().backward()
                (theirs * seed).sum().backward()
                label = f"xent {rows}x{classes} {dtype} {opts} z={z}"
                check(label + " loss", ours, theirs, dtype)
                check(label + " grad", a.grad, b.grad, dtype)
    # Probability targets, int32 targets, in-place backward, (N, C, d) input, strided rows, no-grad forward.
    x = torch.randn(64, 1000, device="cuda")
    p = torch.softmax(torch.randn(64, 1000, device="cuda"), 1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    FF.cross_entropy(a, p, label_smoothing=0.05).backward()
    torch.nn.functional.cross_entropy(b, p, label_smoothing=0.05).backward()
    check("xent probability targets grad", a.grad, b.grad, torch.float32)
    t = torch.randint(0, 1000, (64,), device="cuda")
    leaf = x.clone().requires_grad_()
    ours = FF.cross_entropy(leaf * 1.0, t.int(), inplace_backward=True)
    ours.backward()
    b = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(b, t).backward()
    check("xent int32 target, inplace_backward grad", leaf.grad, b.grad, torch.float32)
    # fp16 under autocast with a GradScaler-sized loss gradient: fp32 loss, the scale applied before the
    # gradient's one rounding (the apply kernel recomputes every row); fp16 inplace_backward writes over the
    # logits in the backward; torch.func's vmap(grad) through the ops' vmap rules.
    h = x.half()
    leaf, b = h.clone().requires_grad_(), h.float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        ours = FF.cross_entropy(leaf, t)
    assert ours.dtype == torch.float32, ours.dtype
    ours.backward(torch.tensor(2.0**16, device="cuda"))
    torch.nn.functional.cross_entropy(b, t).backward(torch.tensor(2.0**16, device="cuda"))
    check("xent fp16 autocast, grad_loss 2^16", leaf.grad, b.grad, torch.float16)
    leaf = h.clone().requires_grad_()
    FF.cross_entropy(leaf * 1, t, inplace_backward=True).backward(torch.tensor(2.0**15, device="cuda"))
    check("xent fp16 inplace_backward, grad_loss 2^15", leaf.grad, b.grad / 2, torch.float16)
    xs, ts = x.reshape(8, 8, 1000), t.reshape(8, 8)
    ours = torch.func.vmap(torch.func.grad(lambda z, y: FF.cross_entropy(z, y)))(xs, ts)
    theirs = torch.func.vmap(torch.func.grad(lambda z, y: torch.nn.functional.cross_entropy(z, y)))(xs, ts)
    check("xent vmap(grad) per-sample gradients", ours, theirs, torch.float32)
    # Enough rows that the loss kernels take groups of lanes (cross_entropy.cu's row_groups: two blocks per SM
    # even on 148 SMs): 32 lanes per row of 300 classes, 4 per row of 40; the training step's fused kernel and the
    # forward alone; in place and not; ignored rows; with the linear term.
    for rows, classes in ((4800, 300), (38000, 40)):
        logits = torch.randn(rows, classes, device="cuda")
        labels = torch.randint(0, classes, (rows,), device="cuda")
        labels[::5] = -100
        for opts in (dict(), dict(label_smoothing=0.1), dict(inplace_backward=True)):
            leaf, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            ours = FF.cross_entropy(leaf * 1.0 if opts.get("inplace_backward") else leaf, labels, **opts)
            ours.backward()
            ref_opts = {k: v for k, v in opts.items() if k != "inplace_backward"}
            theirs = torch.nn.functional.cross_entropy(b, labels, **ref_opts)
            theirs.backward()
            check(f"xent groups of lanes {rows}x{classes} {opts} loss", ours, theirs, torch.float32)
            check(f"xent groups of lanes {rows}x{classes} {opts} grad", leaf.grad, b.grad, torch.float32)
            with torch.no_grad():
                alone = FF.cross_entropy(logits, labels, **ref_opts)
            check(f"xent groups of lanes {rows}x{classes} {opts} no grad", alone, theirs.detach(), torch.float32)
    x3 = torch.randn(4, 21, 9, 11, device="cuda", requires_grad=True)
    t3 = torch.randint(0, 21, (4, 9, 11), device="cuda")
    y3 = x3.detach().clone().requires_grad_()
    FF.cross_entropy(x3, t3).backward()
    torch.nn.functional.cross_entropy(y3, t3).backward()
    check("xent (N, C, d1, d2) grad", x3.grad, y3.grad, torch.float32)
    # Positions enough (80 000) for the (N, C, d...) layout's thread-per-position kernels: the fused forward, the
    # forward alone, the backward (a loss gradient of 3), in place, smoothing and probabilities.
    seg = torch.randn(2, 21, 200, 200, device="cuda")
    seg_labels = torch.randint(0, 21, (2, 200, 200), device="cuda")
    seg_labels[:, ::7] = -100
    seg_probs = torch.softmax(torch.randn(2, 21, 200, 200, device="cuda"), 1)
    for target, opts in ((seg_labels, dict()), (seg_labels, dict(label_smoothing=0.1)), (seg_probs, dict()),
                         (seg_labels, dict(inplace_backward=True))):
        leaf, b = seg.clone().requires_grad_(), seg.clone().requires_grad_()
        ours = FF.cross_entropy(leaf * 1.0 if opts.get("inplace_backward") else leaf, target, **opts)
        (ours * 3).backward()
        ref_opts = {k: v for k, v in opts.items() if k != "inplace_backward"}
        theirs = torch.nn.functional.cross_entropy(b, target, **ref_opts)
        (theirs * 3).backward()
        name = f"xent (N, C, H, W) layout {'probs' if target.is_floating_point() else 'labels'} {opts}"
        check(f"{name} loss", ours, theirs, torch.float32)
        check(f"{name} grad", leaf.grad, b.grad, torch.float32)
        with torch.no_grad():
            check(f"{name} no grad", FF.cross_entropy(seg, target, **ref_opts), theirs.detach(), torch.float32)
    wide = torch.randn(32, 2000, device="cuda")[:, :1000]  # row stride 2000
    check("xent strided rows, no grad", FF.cross_entropy(wide, t[:32]),
          torch.nn.functional.cross_entropy(wide, t[:32]), torch.float32)
    out = FF.cross_entropy_with_lse(x, t, lse_square_scale=1e-4)
    check("cross_entropy_with_lse lse", out[2], torch.logsumexp(x, 1), torch.float32)
    # A bad target: NaN loss now, IndexError at the next call on the device.
    bad = t.clone()
    bad[5] = 1000
    loss = FF.cross_entropy(x, bad, reduction="none")
    torch.cuda.synchronize()
    global CASES
    CASES += 1
    if not bool(torch.isnan(loss[5])):
        FAILURES.append("bad target: the row's loss is not NaN")
    try:
        FF.cross_entropy(x, t)
        FAILURES.append("bad target: the next call did not raise IndexError")
    except IndexError:
        pass
    # A bad target with a gradient: the next fused step is skipped on the device (the step guard), and the
    # call after it raises. (If the host got there first, the step itself raises; the params stay either way.)
    w = (torch.randn(1000, 1000, device="cuda") * 0.01).requires_grad_()
    opt = fused_train.optim.Adam([w], lr=0.1)
    before = w.detach().clone()
    torch.cuda._sleep(500_000_000)  # the step is queued before the loss runs: the kernel decides, not the host
    raised = False
    try:
        FF.cross_entropy(x @ w.T, bad).backward()
        opt.step()
    except IndexError:
        raised = True
    torch.cuda.synchronize()
    CASES += 1
    if not torch.equal(w, before):
        FAILURES.append("bad target: the fused step after it was not skipped")
    if not raised:
        try:
            FF.cross_entropy(x, t)
            FAILURES.append("bad target with gradient: the next call did not raise IndexError")
        except IndexError:
            pass


def main():
    parser = argparse.ArgumentParser(description="every fused_train CUDA op once, checked against torch")
    parser.add_argument("--small", action="store_true", help="fp32 and bf16 only")
    if parser.parse_args().small:
        DTYPES[:] = [torch.float32, torch.bfloat16]
    if not torch.cuda.is_available() or not fused_train.build_info()["cuda_compiled"]:
        print("cuda_smoke: needs a CUDA device and a CUDA build of fused_train", file=sys.stderr)
        return 2
    optimizer_cases()
    loss_cases()
    torch.cuda.synchronize()
    for failure in FAILURES:
        print("MISMATCH", failure)
    print(f"cuda_smoke: {CASES - len(FAILURES)}/{CASES} cases match torch")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
