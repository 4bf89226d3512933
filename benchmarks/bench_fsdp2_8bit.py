"""8-bit optimizer state under FSDP2: a GPT-2-shaped language model (transformers' GPT2LMHeadModel, random weights)
sharded with ``fully_shard`` over 2 gloo processes on the CPU, stepped by fused_train's AdamW8bit beside
fused_train's fp32 AdamW, torch.optim.AdamW (foreach) and torchao's AdamW8bit (where installed), in one run.

Per optimizer and rank: the optimizer state's bytes per param of that rank's shards (the local tensors: codes,
absmax, fp32 moments, steps), the share of the params whose state is 8-bit, and the time of ``step()`` then
``zero_grad(set_to_none=False)`` (fused_train zeroes the gradients in its kernels), timed in turns with a barrier
before each, the slower rank's time counting; the median over the rounds.

The vocabulary is 50304 rows by default (GPT-2's 50257 padded to a multiple of 64, as nanoGPT does).

    python benchmarks/bench_fsdp2_8bit.py [--layers 12] [--vocab 50304] [--rounds 7] [--without-torchao] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _optimizers(torchao: bool = True):
    import fused_train

    impls = {
        "fused_train AdamW8bit": lambda ps: fused_train.optim.AdamW8bit(ps, lr=1e-4, zero_grad_in_step=True),
        "fused_train AdamW": lambda ps: fused_train.optim.AdamW(ps, lr=1e-4, zero_grad_in_step=True),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    }
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
    except Exception:  # not installed
        TorchaoAdamW8bit = None
    if not torchao:
        TorchaoAdamW8bit = None
    if TorchaoAdamW8bit is not None:
        impls["torchao AdamW8bit"] = lambda ps: TorchaoAdamW8bit(ps, lr=1e-4)
    return impls


def _local_state_bytes(value) -> tuple[int, bool]:
    """Bytes of this rank's part of a state value, and whether it is 8-bit (codes, or torchao's subclass)."""
    if not isinstance(value, torch.Tensor):
        return 0, False
    local = value.to_local() if hasattr(value, "to_local") else value
    if hasattr(local, "__tensor_flatten__"):  # torchao's OptimState8bit: codes and scales
        names, _ = local.__tensor_flatten__()
        return sum(getattr(local, n).numel() * getattr(local, n).element_size() for n in names), True
    return local.numel() * local.element_size(), local.dtype == torch.uint8


def _worker(rank, port, layers, vocab, rounds, torchao, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, vocab_size=vocab))
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        tokens = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
        model(tokens, labels=tokens).loss.backward()
        grads = [p.grad.to_local().clone() for p in params]
        local_numel = sum(p.to_local().numel() for p in params)

        steps, rows = {}, {}
        for name, make in _optimizers(torchao).items():
            opt = make(params)

            def step(opt=opt):
                opt.step()
                opt.zero_grad(set_to_none=False)
                for p, g in zip(params, grads):  # the same gradients every step (untimed)
                    p.grad.to_local().copy_(g)
            for _ in range(2):  # state created, torchao's step compiled
                step()
            total, quantized = 0, 0
            for p in params:
                state_bytes = [_local_state_bytes(v) for v in opt.state[p].values()]
                total += sum(b for b, _ in state_bytes)
                quantized += p.to_local().numel() if any(q for _, q in state_bytes) else 0
            steps[name] = step
            rows[name] = dict(state_bytes_per_param=total / local_numel, quantized_share=quantized / local_numel)
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                dist.barrier()
                t0 = time.perf_counter()
                step()
                elapsed = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank's
                times[name].append(elapsed.item() * 1e3)
        for name in rows:
            rows[name]["ms"] = statistics.median(times[name])
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            summary = dict(world=WORLD, layers=layers, vocab=vocab, params=sum(p.numel() for p in params),
                           local_params=local_numel, torch=torch.__version__, per_rank=gathered)
            with open(out, "w") as f:
                json.dump(summary, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(layers: int = 12, vocab: int = 50304, rounds: int = 7, torchao: bool = True) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(port, layers, vocab, rounds, torchao, out), nprocs=WORLD,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--without-torchao", action="store_true", help="leave torchao out even where installed")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    result = run(args.layers, args.vocab, args.rounds, not args.without_torchao)
    print(f"# GPT-2 ({args.layers} layers, vocabulary {args.vocab}, {result['params'] / 1e6:.1f}M params) under FSDP2, "
          f"{WORLD} gloo ranks on the CPU, 1 thread each; torch {result['torch']}")
    print(f"{'optimizer':<24}{'rank':>5}{'state B/param':>15}{'8-bit share':>13}{'step ms':>10}{'/ AdamW8bit':>13}")
    for rank, rows in enumerate(result["per_rank"]):
        ours = rows["fused_train AdamW8bit"]["ms"]
        for name, row in rows.items():
            print(f"{name:<24}{rank:>5}{row['state_bytes_per_param']:>15.3f}{row['quantized_share']:>13.4f}"
                  f"{row['ms']:>10.1f}{ours / row['ms']:>13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
