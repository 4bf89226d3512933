"""8-bit optimizer state under FSDP2: a GPT-2-shaped language model (transformers' GPT2LMHeadModel, random weights)
sharded with ``fully_shard`` over 2 gloo processes on the CPU, stepped by fused_train's AdamW8bit beside
fused_train's fp32 AdamW, torch.optim.AdamW (foreach) and torchao's AdamW8bit (where installed), in one run.

Per optimizer and rank: the optimizer state's bytes per param of that rank's shards (the local tensors: codes,
absmax, fp32 moments, steps), the share of the params whose state is 8-bit, and the time of ``step()`` then
``zero_grad(set_to_none=False)`` (fused_train zeroes the gradients in its kernels), timed in turns with a barrier
before each, the slower rank's time counting; the median over the rounds.

The vocabulary is 50304 rows by default (GPT-2's 50257 padded to a multiple of 64, as nanoGPT does).

With ``--tp N``: FSDP2 over tensor parallelism, as torchtitan lays out a Llama, on 2 x N ranks (a ("dp", "tp") mesh):
transformers' LlamaForCausalLM with TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary
32000; ``--layers`` of its 22, 4 by default, random weights), each decoder layer's projections cut by "tp"
(q/k/v/gate/up column-wise: weight Shard(0); o/down row-wise: weight Shard(1)), then ``fully_shard`` over "dp" per
layer and for the whole; each "dp" rank its own batch.

``--model smollm``: a Llama with SmolLM-135M's shapes instead (hidden 576, MLP 1536, 9 heads, 3 KV heads, vocabulary
49152, tied embeddings; ``--layers`` of its 30, 8 by default), whose rows of 576 elements are not whole blocks of 256:
under FSDP2 alone (or over ``--tp N``, laid out as above).

    python benchmarks/bench_fsdp2_8bit.py [--model gpt2|tinyllama|smollm] [--layers 12] [--vocab 50304] [--tp N]
                                          [--rounds 7] [--without-torchao] [--json FILE]
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

DP = 2  # FSDP2's ranks


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


# The Llamas' shapes (transformers' LlamaConfig arguments) and the defaults of each model
_LLAMA_SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "smollm": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   tie_word_embeddings=True),
}
_DEFAULTS = {"gpt2": dict(layers=12, vocab=50304), "tinyllama": dict(layers=4, vocab=32000),
             "smollm": dict(layers=8, vocab=49152)}
_NAMES = {"gpt2": "GPT-2", "tinyllama": "Llama (TinyLlama-1.1B's shapes)", "smollm": "Llama (SmolLM-135M's shapes)"}


def _sharded_model(model_name: str, layers: int, vocab: int, tp: int) -> tuple[torch.nn.Module, int]:
    """The model, sharded (see the module's docstring), and this rank's "dp" index (its batch)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    if model_name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, vocab_size=vocab))
        mesh = init_device_mesh("cpu", (DP,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, mesh.get_coordinate()[0]
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, **_LLAMA_SHAPES[model_name]))
    if tp == 1:
        mesh = init_device_mesh("cpu", (DP,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, mesh.get_coordinate()[0]
    mesh = init_device_mesh("cpu", (DP, tp), mesh_dim_names=("dp", "tp"))
    plan = {f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in model.model.layers:
        parallelize_module(layer, mesh["tp"], plan)
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh.get_coordinate()[0]


def _worker(rank, port, model_name, layers, vocab, tp, rounds, torchao, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = DP * tp
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, dp_rank = _sharded_model(model_name, layers, vocab, tp)
        params = list(model.parameters())
        tokens = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(dp_rank))
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
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            summary = dict(model=model_name, world=world, tp=tp, layers=layers, vocab=vocab,
                           params=sum(p.numel() for p in params),
                           local_params=local_numel, torch=torch.__version__, per_rank=gathered,
                           placements=sorted({repr(tuple(p.placements)) for p in params}))
            with open(out, "w") as f:
                json.dump(summary, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(layers: int = 12, vocab: int = 50304, rounds: int = 7, torchao: bool = True, tp: int = 1,
        model_name: str = "gpt2") -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(port, model_name, layers, vocab, tp, rounds, torchao, out),
                           nprocs=DP * tp, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(_DEFAULTS), help="gpt2 by default; tinyllama with --tp")
    parser.add_argument("--layers", type=int, help="12 (gpt2), 4 (tinyllama), 8 (smollm) by default")
    parser.add_argument("--vocab", type=int, help="50304 (gpt2), 32000 (tinyllama), 49152 (smollm) by default")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (a Llama, on 2 x TP ranks)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--without-torchao", action="store_true", help="leave torchao out even where installed")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    model_name = args.model or ("gpt2" if args.tp == 1 else "tinyllama")
    if model_name == "gpt2" and args.tp > 1:
        parser.error("--tp lays out a Llama: --model tinyllama or smollm")
    layers = args.layers or _DEFAULTS[model_name]["layers"]
    vocab = args.vocab or _DEFAULTS[model_name]["vocab"]
    result = run(layers, vocab, args.rounds, not args.without_torchao, args.tp, model_name)
    model = _NAMES[model_name]
    layout = "FSDP2" if args.tp == 1 else f"FSDP2 ({DP} ranks) over tensor parallelism ({args.tp} ranks)"
    print(f"# {model} ({layers} layers, vocabulary {vocab}, {result['params'] / 1e6:.1f}M params) under {layout}, "
          f"{result['world']} gloo ranks on the CPU, 1 thread each; torch {result['torch']}")
    print(f"# placements: {', '.join(result['placements'])}")
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
