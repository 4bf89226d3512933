// The interface between the op implementations (optimizers.cpp, cross_entropy.cpp: checks, threading)
// and the per-instruction-set kernel builds (isa/kernels_<isa>.cpp, compiled once per ISA with its own
// flags). Only plain data crosses it, so the ISA files need no ATen headers beyond at::vec.
#pragma once

#include <cstdint>

namespace fused_train {
namespace cpu {

enum class ScalarKind : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// One parameter, its gradient and up to three state buffers (in opmath: float, or double for fp64),
// all with the same dense layout, plus the per-tensor scalars the update needs.
struct ParamSlot {
  void* param;
  void* grad;
  void* state[3];
  int64_t numel;
  double neg_step_size;  // Adam: -lr / (1 - β1^t)
  double bc2_sqrt;       // Adam: sqrt(1 - β2^t)
};

// A contiguous element range of one slot: the unit of work handed to a thread.
struct ChunkRange {
  int64_t slot;
  int64_t begin;
  int64_t end;
};

enum class OptimizerKind : int32_t { Sgd = 0, Adam = 1, Rmsprop = 2 };

// Everything a kernel needs for one multi-tensor step. Hyperparameters are in double; the kernels
// convert them to opmath once.
struct OptimizerLaunch {
  OptimizerKind kind;
  ScalarKind dtype;
  const ParamSlot* slots;
  const ChunkRange* chunks;
  double lr, momentum, one_minus_dampening, weight_decay;  // SGD, RMSprop (lr, momentum, wd)
  double beta1, beta2, eps;                                // Adam (RMSprop: beta2 holds alpha, eps)
  bool nesterov, maximize, first_step;                     // SGD (maximize: all)
  bool decoupled_weight_decay, amsgrad, centered;          // Adam, RMSprop
  bool zero_grad;        // write zeros into each consumed gradient
  bool has_grad_scale;   // divide gradients by grad_scale (written back unscaled unless zero_grad)
  double grad_scale;
};

// Runs chunks [chunk_begin, chunk_end) of a launch.
using OptimizerChunksFn = void (*)(const OptimizerLaunch&, int64_t chunk_begin, int64_t chunk_end);

struct KernelTable {
  const char* isa;
  OptimizerChunksFn optimizer_chunks;
};

// The table for the best instruction set this CPU supports (FUSED_TRAIN_CPU_CAPABILITY=default|avx2|avx512
// lowers the choice, like ATEN_CPU_CAPABILITY does for ATen).
const KernelTable& kernel_table();

// Per-ISA tables, defined in isa/kernels_<isa>.cpp.
namespace DEFAULT { const KernelTable& kernel_table(); }
namespace AVX2 { const KernelTable& kernel_table(); }
namespace AVX512 { const KernelTable& kernel_table(); }

}  // namespace cpu
}  // namespace fused_train
