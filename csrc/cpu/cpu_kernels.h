// The interface between the op implementations (optimizers.cpp, cross_entropy.cpp: checks, threading)
// and the per-instruction-set kernel builds (isa/kernels_<isa>.cpp, compiled once per ISA with its own
// flags). Only plain data crosses it, so the ISA files need no ATen headers beyond at::vec.
#pragma once

#include <cstdint>

namespace fused_train {
namespace cpu {

enum class ScalarKind : int32_t { Float = 0, Double = 1, BFloat16 = 2, Half = 3 };

// One parameter, its gradient and up to six state buffers, plus the per-tensor scalars the update needs.
// Full-precision state is in opmath (float, or double for fp64) with the param's dense layout; 8-bit state
// keeps (codes, absmax) per moment, in the op's order (Adam: exp_avg, exp_avg_sq; SGD: momentum_buffer;
// RMSprop: square_avg[, grad_avg][, momentum_buffer]): uint8 codes as the contiguous param, one float per
// block of up to math::kQuantBlock elements of its rows of quant_row elements (math::QuantRows).
struct ParamSlot {
  void* param;
  void* grad;
  void* state[6];
  int64_t numel;
  int64_t quant_row;     // 8-bit state: elements per row of its blocks
  double neg_step_size;  // Adam: -lr / (1 - β1^t)
  double bc2_sqrt;       // Adam: sqrt(1 - β2^t)
  uint64_t rounding_stream;  // stochastic rounding: math::rounding_stream(seed, step)
  uint64_t rounding_offset;  // and the index its element 0 draws the bits of (the op's rounding_offsets)
};

// A contiguous element range of one slot: the unit of work handed to a thread.
struct ChunkRange {
  int64_t slot;
  int64_t begin;
  int64_t end;
};

enum class OptimizerKind : int32_t { Sgd = 0, Adam = 1, Rmsprop = 2, Adam8bit = 3, Sgd8bit = 4, Rmsprop8bit = 5 };
inline bool is_8bit(OptimizerKind k) {
  return k == OptimizerKind::Adam8bit || k == OptimizerKind::Sgd8bit || k == OptimizerKind::Rmsprop8bit;
}

// Everything a kernel needs for one multi-tensor step. Hyperparameters are in double; the kernels
// convert them to opmath once.
struct OptimizerLaunch {
  OptimizerKind kind;
  ScalarKind dtype;
  const ParamSlot* slots;
  const ChunkRange* chunks;
  double lr, momentum, dampening, weight_decay;  // SGD, RMSprop (lr, momentum, wd)
  double beta1, beta2, eps;                                // Adam (RMSprop: beta2 holds alpha, eps)
  bool nesterov, maximize, first_step;                     // SGD (maximize: all)
  bool decoupled_weight_decay, amsgrad, centered;          // Adam, RMSprop
  bool zero_grad;        // write zeros into each consumed gradient
  bool has_grad_scale;   // divide gradients by grad_scale (written back unscaled unless zero_grad)
  double grad_scale;
  bool stochastic_round;  // bf16 params: round each update with its slot's rounding_stream
};

// Runs chunks [chunk_begin, chunk_end) of a launch.
using OptimizerChunksFn = void (*)(const OptimizerLaunch&, int64_t chunk_begin, int64_t chunk_end);

// One cross-entropy call over `rows` rows of `classes` logits: a 2-D view with unit class stride and any row
// stride, or (positions > 0) the contiguous (rows / positions, classes, positions) layout, whose row r has its
// classes at stride positions from element (r / positions)·classes·positions + r % positions (logits, gradient
// and probability targets alike; the row strides are then unused). Per-row inputs and outputs in opmath
// (double for fp64 logits, float otherwise) unless said otherwise; weights too. See cross_entropy.cpp for who
// fills what.
struct CrossEntropyLaunch {
  ScalarKind dtype;           // logits, gradient and probability targets
  const void* logits;
  int64_t logits_row_stride;
  int64_t rows, classes;
  int64_t positions;          // > 0: the (batch, classes, positions) layout
  const void* target;         // int64/int32 class indices (rows), or probabilities like the logits
  int64_t target_row_stride;  // probabilities: elements between rows; class indices: between entries
  bool target_is_prob;
  bool target_is_int32;
  const void* weight;         // opmath (classes), or nullptr
  int64_t ignore_index;
  double label_smoothing, lse_square_scale, class_weight_sum;
  // Forward outputs: each row's log-sum-exp as (shift, log_sum) pairs (rows, 2; see math::RowLse), and,
  // for reduction='none' only, each row's loss and z-loss in the logits' dtype, or in opmath with
  // loss_opmath (autocast) (rows; nullptr otherwise: the forward then returns their sums instead).
  void* lse;
  void* row_loss;
  void* row_z_loss;
  bool loss_opmath;
  // The gradient, unit class stride and any row stride; it may be the logits themselves (in-place). The
  // forward writes it when grad != nullptr, for grad_loss = 1; the backward always, except, with
  // keep_unit_rows, the rows whose grad_loss is exactly 1 (they hold the forward's gradient already). Row r's
  // gradient is scaled by grad_loss[r * grad_loss_stride] / *denominator in opmath before its one rounding
  // (backward: grad_loss is opmath, stride 0 for a reduced loss; forward: grad_loss is nullptr and counts
  // as 1). denominator is opmath.
  const void* lse_in;         // backward: the forward's (shift, log_sum) pairs
  void* grad;
  int64_t grad_row_stride;
  const void* grad_loss;
  int64_t grad_loss_stride;
  const void* denominator;
  bool keep_unit_rows;
};

// Sums of the forward's row losses and z-losses over a range of rows, added in row order in double.
struct CrossEntropySums {
  double loss = 0.0;
  double z_loss = 0.0;
};

// Rows [row_begin, row_end) of a cross-entropy forward (returns the sums of their losses) or backward.
using CrossEntropyForwardFn = CrossEntropySums (*)(const CrossEntropyLaunch&, int64_t row_begin, int64_t row_end);
using CrossEntropyBackwardFn = void (*)(const CrossEntropyLaunch&, int64_t row_begin, int64_t row_end);

struct KernelTable {
  const char* isa;
  OptimizerChunksFn optimizer_chunks;
  CrossEntropyForwardFn cross_entropy_forward_rows;
  CrossEntropyBackwardFn cross_entropy_backward_rows;
};

// The table for the best instruction set this CPU supports (FUSED_TRAIN_CPU_CAPABILITY=default|avx2|avx512
// lowers the choice, like ATEN_CPU_CAPABILITY does for ATen).
const KernelTable& kernel_table();

// Whether this CPU has bf16 dot-product instructions (x86 AVX512_BF16), so that oneDNN runs bf16 GEMMs natively
// (fp32 accumulation) rather than emulated. Not lowered by FUSED_TRAIN_CPU_CAPABILITY: oneDNN ignores it.
bool has_bf16_dot_product();

// Per-ISA tables, defined in isa/kernels_<isa>.cpp.
namespace DEFAULT { const KernelTable& kernel_table(); }
namespace AVX2 { const KernelTable& kernel_table(); }
namespace AVX512 { const KernelTable& kernel_table(); }

}  // namespace cpu
}  // namespace fused_train
