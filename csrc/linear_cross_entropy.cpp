// fused_train::linear_cross_entropy_forward / _backward: cross_entropy(input @ linear_weight.T + linear_bias,
// target), the language model's last layer and loss, without its (N, V) logits. One implementation for every
// device: GEMMs through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA), the loss through the cross-entropy ops
// (cpu/cross_entropy.cpp, cuda/cross_entropy.cu).
//
// The rows (tokens) are taken in chunks. A chunk's logits come from one GEMM into a buffer reused by every
// chunk; cross_entropy_forward_backward_ turns them into the chunk's loss and, over the same buffer, their
// gradient, in one pass; two more GEMMs carry that gradient to input's rows and add it into linear_weight's
// gradient. So the work is linear + cross_entropy's (three GEMMs, one pass over the logits) and the memory
// above the inputs and gradients is one chunk of logits (two with softcap).
//
// The forward computes the gradients when asked (a reduced loss in training), for a loss gradient of 1:
// backward then only scales them. reduction='none' (one loss gradient per row) and a second backward through
// the same graph recompute them from each row's saved log-sum-exp (linear_cross_entropy_backward), which
// costs the logits' GEMM once more.
//
// On CPU, bf16 takes that road in bf16 where the CPU has bf16 dot products (oneDNN's GEMMs run natively there);
// elsewhere bf16, and fp16 always, take the tiled road (TiledLoss below): fp32 GEMMs over tiles of rows x classes,
// with no fp32 copy of linear_weight or of its gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cross_entropy_args.h"
#include "optimizer_args.h"

namespace fused_train {
namespace {

using Outputs4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
constexpr int64_t kNone = 0, kMean = 1, kSum = 2;  // reduction codes, as the cross-entropy ops'

using ForwardSig = Outputs4(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            double, double, bool);

const auto& loss_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_train::cross_entropy_forward", "")
                             .typed<ForwardSig>();
  return op;
}

const auto& loss_forward_backward_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_train::cross_entropy_forward_backward_", "")
                             .typed<ForwardSig>();
  return op;
}

const auto& loss_backward_inplace_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_backward_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, double)>();
  return op;
}

// One checked call.
struct Call {
  at::Tensor input;          // (N, H)
  at::Tensor linear_weight;  // (V, H), in the compute dtype (tiled: input's dtype, converted a block at a time)
  at::Tensor linear_bias;    // (V,), in the compute dtype, or undefined
  at::Tensor target;         // (N,) class indices or (N, V) probabilities
  std::optional<at::Tensor> weight;
  at::ScalarType compute = at::kFloat;  // the GEMMs' and the logits' dtype
  at::ScalarType opmath = at::kFloat;
  int64_t rows = 0, hidden = 0, classes = 0, chunk_rows = 1;
  bool tiled = false;         // CPU bf16/fp16: the tiled road below (TiledLoss)
  // Half-precision GEMMs (not tiled) whose linear_weight gradient is summed across chunks in opmath, each chunk's
  // part rounded once to the GEMMs' dtype on its own, the sum once at the end (GradAccumulator::add_weight_grad).
  bool opmath_weight_grad = false;
  int64_t block_classes = 1;  // tiled: classes per block of linear_weight
  int64_t reduction = kMean, ignore_index = -100;
  double label_smoothing = 0.0, lse_square_scale = 0.0, softcap = 0.0;
};

// Rows per chunk when the caller leaves it to us: a tenth of the whole (N, V) logits, within 24 to 64 MiB, and at
// least 192 rows. Each chunk's GEMMs read all of linear_weight (and read and write its gradient) again, so fewer,
// larger chunks are faster: at H=1024, V=32000, fp32, 2 threads, 128-row chunks took 1.15x the time of 256-row
// ones and 192 to 320 rows the same within noise; at N=4096, H=2048, 410-row chunks took about 0.93x the time of
// 192-row ones. A tenth of the logits keeps the chunk near 4% of what linear + cross_entropy adds (the logits,
// their log-softmax and gradient: about 2.4 N·V elements, in the same dtype).
//
// bf16 on CPU (its GEMMs in bf16) sums linear_weight's gradient in bf16, rounded once per chunk: there the chunk
// is a twelfth of the logits however large (at least 12 MiB), so that the gradient is rounded about twelve times at
// any N (192-row chunks at N = 32768 would round it 171 times), and the chunk stays within 5% of what linear +
// cross_entropy adds in bf16 (about 2 N·V elements at V = 128256); 192 to 393 rows timed the same within 4%
// (Zen 4). CUDA keeps the byte bounds until measured on a GPU.
int64_t auto_chunk_rows(int64_t rows, int64_t classes, at::ScalarType compute, bool half_on_cpu) {
  const int64_t row_bytes = classes * static_cast<int64_t>(c10::elementSize(compute));
  const int64_t budget = half_on_cpu ? std::max<int64_t>(rows * row_bytes / 12, int64_t{12} << 20)
                                     : std::clamp<int64_t>(rows * row_bytes / 10, int64_t{24} << 20, int64_t{64} << 20);
  return std::max<int64_t>(192, budget / row_bytes);
}

// Rows per chunk and classes per block of the tiled road, T each: the largest multiple of 64 within 64 to 1024
// whose main fp32 tile buffers (a chunk of input's rows and its input-gradient sum, a block of linear_weight's
// rows or of their gradient, and the T x T logits: 4·(3·T·H + T²) bytes) fit in a twelfth of the (N, V) logits
// in input's dtype. With the temporaries around them: 9-27 MiB at the benchmark's shapes, about 3% of what
// linear + cross_entropy adds. Larger tiles run faster GEMMs: at (N, H, V) =
// (4096, 2048, 32000), bf16, 2 threads, T = 768 and 1024 took about 0.93x the time of T = 512 (median of 3).
int64_t auto_tile(int64_t rows, int64_t classes, int64_t hidden, at::ScalarType dtype) {
  const double budget = static_cast<double>(rows) * static_cast<double>(classes) *
                        static_cast<double>(c10::elementSize(dtype)) / 12.0;
  const double h = static_cast<double>(hidden);
  const double t = (std::sqrt(9.0 * h * h + budget) - 3.0 * h) / 2.0;  // T² + 3·H·T = budget / 4
  return std::clamp<int64_t>(static_cast<int64_t>(t) / 64 * 64, 64, 1024);
}

// Whether CPU GEMMs in dtype (bf16/fp16) run natively, in that dtype with fp32 accumulation (oneDNN), rather than
// emulated: bf16 with bf16 dot-product instructions (AVX512_BF16, AMX) and oneDNN enabled. At (2048, 2048, 8000),
// 2 threads, Zen 4, bf16 GEMMs ran 2.2-2.7x as fast as fp32 ones; without those instructions, 6-300x slower
// (2-core AVX2). FUSED_TRAIN_CPU_HALF_GEMMS=fp32 (read per call) keeps the fp32 tiles anyway.
bool cpu_half_gemms_native(const char* op, at::ScalarType dtype) {
  const char* road = std::getenv("FUSED_TRAIN_CPU_HALF_GEMMS");
  const bool automatic = road == nullptr || *road == '\0' || std::strcmp(road, "auto") == 0;
  TORCH_CHECK_VALUE(automatic || std::strcmp(road, "fp32") == 0, op,
                    ": FUSED_TRAIN_CPU_HALF_GEMMS must be 'auto' or 'fp32', got '", road, "'");
  return automatic && dtype == at::kBFloat16 && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn() &&
         cpu::has_bf16_dot_product();
}

Call check_call(const char* op, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                int64_t reduction, int64_t ignore_index, double label_smoothing, double lse_square_scale,
                double softcap, int64_t chunk_rows, bool opmath_weight_grad) {
  Call c;
  const auto dtype = input.scalar_type();
  check_cross_entropy_dtype(op, dtype);
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": input must be 2-D (N, in_features), got shape ", input.sizes());
  c.rows = input.size(0);
  c.hidden = input.size(1);
  const auto& dev = input.device();
  TORCH_CHECK_VALUE(linear_weight.dim() == 2 && linear_weight.size(1) == c.hidden, op,
                    ": linear_weight must have shape (num_classes, in_features=", c.hidden, "), got ",
                    linear_weight.sizes());
  c.classes = linear_weight.size(0);
  TORCH_CHECK_VALUE(c.classes > 0, op, ": linear_weight must have at least one class (row), got shape ",
                    linear_weight.sizes());
  TORCH_CHECK_TYPE(linear_weight.scalar_type() == dtype, op, ": linear_weight must have input's dtype ", dtype,
                   ", got ", linear_weight.scalar_type());
  TORCH_CHECK_VALUE(linear_weight.device() == dev, op, ": linear_weight must be on ", dev, " like input, got ",
                    linear_weight.device());
  if (linear_bias.has_value() && linear_bias->defined()) {
    const at::Tensor& b = *linear_bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == c.classes, op, ": linear_bias must have shape (", c.classes,
                      ",), one entry per row of linear_weight, got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == dtype, op, ": linear_bias must have input's dtype ", dtype, ", got ",
                     b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == dev, op, ": linear_bias must be on ", dev, " like input, got ", b.device());
  }
  if (at::isFloatingType(target.scalar_type())) {
    // Any floating dtype: each chunk's rows are converted to the logits' (autocast leaves an fp32 target fp32).
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == c.rows && target.size(1) == c.classes, op,
                      ": probability target must have shape (N=", c.rows, ", num_classes=", c.classes, "), got ",
                      target.sizes());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                     ": target must hold class indices (int64 or int32) or probabilities (floating point), got ",
                     target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == c.rows, op, ": target must have shape (N=", c.rows,
                      ",), got ", target.sizes());
  }
  TORCH_CHECK_VALUE(target.device() == dev, op, ": target must be on ", dev, " like input, got ", target.device());
  if (weight.has_value() && weight->defined()) {
    check_class_weight(op, *weight, c.classes, dev);
    c.weight = *weight;
  }
  check_cross_entropy_options(op, reduction, label_smoothing, lse_square_scale);
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), op,
                    ": softcap must be a positive finite number (0 for none), got ", softcap);
  TORCH_CHECK_VALUE(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0 to size chunks automatically), got ",
                    chunk_rows);
  c.opmath = opmath_type(dtype);
  // Half precision on a CPU without native half GEMMs: fp32 GEMMs are the faster road.
  c.compute = dev.is_cpu() && dtype != c.opmath && !cpu_half_gemms_native(op, dtype) ? c.opmath : dtype;
  // Converting all of linear_weight (and summing its gradient) in fp32 would add 8 bytes per weight, as much as
  // the logits this op exists to avoid: half precision on CPU goes the tiled road instead.
  c.tiled = c.compute != dtype;
  c.opmath_weight_grad = opmath_weight_grad && !c.tiled && c.compute != c.opmath;
  c.input = input;
  c.linear_weight = c.tiled ? linear_weight : linear_weight.to(c.compute);
  if (linear_bias.has_value() && linear_bias->defined()) c.linear_bias = linear_bias->to(c.compute);
  c.target = target;
  c.reduction = reduction;
  c.ignore_index = ignore_index;
  c.label_smoothing = label_smoothing;
  c.lse_square_scale = lse_square_scale;
  c.softcap = softcap;
  const int64_t tile = c.tiled ? auto_tile(c.rows, c.classes, c.hidden, dtype) : 0;
  const bool half_on_cpu = dev.is_cpu() && c.compute != c.opmath;
  const int64_t auto_rows = c.tiled ? tile : auto_chunk_rows(c.rows, c.classes, c.compute, half_on_cpu);
  c.chunk_rows = std::max<int64_t>(1, std::min(c.rows, chunk_rows > 0 ? chunk_rows : auto_rows));
  if (c.tiled) c.block_classes = std::min(c.classes, chunk_rows > 0 ? chunk_rows : tile);
  return c;
}

// The rows that count: all of them for probabilities, else those whose target is not ignore_index (compared in
// int64: an int32 target compared with an ignore_index beyond int32 would wrap it).
at::Tensor kept_rows(const Call& c) {
  if (at::isFloatingType(c.target.scalar_type())) return at::ones({c.rows}, c.target.options().dtype(at::kBool));
  return c.target.to(at::kLong) != c.ignore_index;
}

// The mean's divisor: Σ weight[target] over the rows that are not ignored (the number of rows for probability
// targets), 0-dim opmath, computed on the device without a host sync.
at::Tensor mean_denominator(const Call& c) {
  const at::TensorOptions opmath = c.input.options().dtype(c.opmath);
  if (at::isFloatingType(c.target.scalar_type())) return at::scalar_tensor(static_cast<double>(c.rows), opmath);
  const at::Tensor kept = kept_rows(c);
  if (!c.weight.has_value()) return kept.sum().to(c.opmath);
  // A target out of [0, V) has raised already on CPU (check_cpu_targets); on CUDA the loss op of its chunk
  // reports it. Clamped here so the gather itself stays in bounds.
  const at::Tensor index = c.target.masked_fill(kept.logical_not(), 0).clamp(0, c.classes - 1).to(at::kLong);
  return (c.weight->to(c.opmath).index_select(0, index) * kept).sum();
}

// The mean's gradient scale: 1/denominator, NaN for a denominator of 0. The rows not ignored then get NaN
// gradients, as torch's (its NLL backward divides 0 by 0 there); ignored rows keep 0, and a batch whose rows
// are all ignored has no gradient (0), as torch's.
at::Tensor gradient_inverse(const at::Tensor& denominator) {
  return at::where(denominator != 0, denominator.reciprocal(), std::numeric_limits<double>::quiet_NaN());
}

// The chunk's rows of target; probabilities in the logits' dtype.
at::Tensor chunk_target(const Call& c, int64_t begin, int64_t rows) {
  const at::Tensor t = c.target.narrow(0, begin, rows);
  return at::isFloatingType(t.scalar_type()) ? t.to(c.compute) : t;
}

// On CPU, every class index in [0, V) or ignore_index, checked before anything is computed, so that the
// error names the row of the whole batch (the loss op would name the row of its chunk). On CUDA the loss op
// of the chunk reports it, as fused_train's cross_entropy does.
void check_cpu_targets(const char* op, const Call& c) {
  if (!c.input.device().is_cpu() || at::isFloatingType(c.target.scalar_type()) || c.rows == 0) return;
  const at::Tensor t = c.target.to(at::kLong);
  const at::Tensor bad = (t != c.ignore_index).logical_and_((t < 0).logical_or_(t >= c.classes));
  if (!bad.any().item<bool>()) return;
  const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_INDEX(false, op, ": target ", t[row].item<int64_t>(), " at position ", row,
                    " is out of bounds: expected 0 <= target < ", c.classes, " or target == ignore_index (",
                    c.ignore_index, ")");
}

// Fills logits (rows, classes) with x @ w.T + b (w, b: rows of linear_weight and linear_bias; b may be
// undefined), and with softcap c: c·tanh((x @ w.T + b) / c), keeping tanh in tanh_rows for the gradient.
void chunk_logits(const Call& c, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& logits,
                  at::Tensor& tanh_rows) {
  const double scale = c.softcap > 0.0 ? 1.0 / c.softcap : 1.0;
  if (b.defined()) {
    at::addmm_out(logits, b, x, w.t(), scale, scale);
  } else if (scale == 1.0) {
    at::mm_out(logits, x, w.t());
  } else {
    at::addmm_out(logits, logits, x, w.t(), 0.0, scale);  // beta 0: logits' old values unread
  }
  if (c.softcap > 0.0) {
    at::tanh_out(tanh_rows, logits);
    at::mul_out(logits, tanh_rows, c.softcap);
  }
}

// Carries each chunk's logit gradient to input, linear_weight and linear_bias, accumulating in the GEMMs' dtype
// (the input's on this road) or opmath (bias).
struct GradAccumulator {
  const Call& c;
  bool input_grad, weight_grad, bias_grad;
  at::Tensor grad_input, grad_weight, grad_bias;
  at::Tensor part_buffer;  // opmath_weight_grad: a block of a chunk's linear_weight gradient in the GEMMs' dtype
  // The GEMMs' alpha for input's and linear_weight's gradients: a mean's 1/denominator where it is known on the
  // host, so that half-precision gradients are rounded once, not again by a scale afterwards.
  double alpha = 1.0;

  GradAccumulator(const Call& call, bool input_grad_, bool weight_grad_, bool bias_grad_)
      : c(call), input_grad(input_grad_), weight_grad(weight_grad_), bias_grad(bias_grad_) {
    const at::TensorOptions options = c.input.options().dtype(c.compute);
    if (input_grad) grad_input = at::empty({c.rows, c.hidden}, options);
    // Zeros for N = 0; otherwise written over by the first chunk.
    const at::TensorOptions weight_options = options.dtype(c.opmath_weight_grad ? c.opmath : c.compute);
    if (weight_grad) grad_weight = c.rows == 0 ? at::zeros({c.classes, c.hidden}, weight_options)
                                               : at::empty({c.classes, c.hidden}, weight_options);
    if (bias_grad) grad_bias = at::zeros({c.classes}, options.dtype(c.opmath));
  }

  // logit_grad: the chunk's gradient (rows, V) for rows [begin, begin + rows) of x, whose rows are x.
  void add(int64_t begin, const at::Tensor& x, at::Tensor& logit_grad, at::Tensor& tanh_rows) {
    if (c.softcap > 0.0) {  // d(c·tanh(z/c))/dz = 1 - tanh²
      tanh_rows.mul_(tanh_rows);
      logit_grad.addcmul_(logit_grad, tanh_rows, -1.0);
    }
    if (input_grad) {  // beta 0: the rows' old values unread
      at::Tensor rows = grad_input.narrow(0, begin, x.size(0));
      at::addmm_out(rows, rows, logit_grad, c.linear_weight, 0.0, alpha);
    }
    if (weight_grad) add_weight_grad(begin == 0, x, logit_grad);
    if (bias_grad) grad_bias.add_(at::sum(logit_grad, {0}, false, c.opmath), alpha);
  }

  // The first chunk writes linear_weight's gradient, the others add to it. Summed in opmath, each chunk's part
  // comes from the GEMM (which sums the chunk's rows in fp32) in blocks of classes, each rounded to the GEMMs'
  // dtype once and added in fp32 while still in cache: no partial sum is rounded again, and the extra memory is
  // one block of 4 MiB besides the fp32 sum. (ATen's CPU fp32 += bf16 ran at 8 GB/s from memory: at (2048, 2048,
  // 128256), 2 threads, blocks of a chunk of logits (47 MiB) took 2.2x the GEMM's time, of 4 MiB 1.2x.) Other
  // devices take blocks of 64 MiB, fewer GEMMs (not yet measured on a GPU).
  void add_weight_grad(bool first, const at::Tensor& x, const at::Tensor& logit_grad) {
    if (!c.opmath_weight_grad) {
      at::addmm_out(grad_weight, grad_weight, logit_grad.t(), x, first ? 0.0 : 1.0, alpha);
      return;
    }
    const int64_t block_bytes = x.device().is_cpu() ? int64_t{4} << 20 : int64_t{64} << 20;
    const int64_t row_bytes = std::max<int64_t>(1, c.hidden * static_cast<int64_t>(x.element_size()));
    const int64_t block = std::min(c.classes, std::max<int64_t>(64, block_bytes / row_bytes));
    if (!part_buffer.defined()) part_buffer = at::empty({block, c.hidden}, x.options());
    for (int64_t v0 = 0; v0 < c.classes; v0 += block) {
      const int64_t n = std::min(block, c.classes - v0);
      at::Tensor part = part_buffer.narrow(0, 0, n);
      at::addmm_out(part, part, logit_grad.narrow(1, v0, n).t(), x, 0.0, alpha);
      at::Tensor sum = grad_weight.narrow(0, v0, n);
      if (first) {
        sum.copy_(part);
      } else {
        sum.add_(part);
      }
    }
  }

  // The gradients in the parameters' dtypes, each times its scale when given (input_scale (N, 1) per row of
  // input's, param_scale 0-dim for linear_weight's and linear_bias's, both opmath); absent ones as empty tensors.
  Grads finish(const std::optional<at::Tensor>& input_scale = std::nullopt,
               const std::optional<at::Tensor>& param_scale = std::nullopt) {
    const auto out = [&](at::Tensor& g, const std::optional<at::Tensor>& scale, at::ScalarType dtype) {
      if (!g.defined()) return at::empty({0}, c.input.options());
      if (scale.has_value()) g.mul_(*scale);
      return g.scalar_type() == dtype ? g : g.to(dtype);
    };
    const at::ScalarType dtype = c.input.scalar_type();
    return {out(grad_input, input_scale, dtype), out(grad_weight, param_scale, dtype),
            out(grad_bias, param_scale, dtype)};
  }
};

// Runs fn(begin, x, logits, tanh_rows) over the chunks, x the chunk's input rows in the compute dtype and logits
// its (rows, V) logits.
template <class Fn>
void for_each_chunk(const Call& c, Fn&& fn) {
  if (c.rows == 0) return;
  const at::TensorOptions options = c.input.options().dtype(c.compute);
  at::Tensor logits_buffer = at::empty({c.chunk_rows, c.classes}, options);
  at::Tensor tanh_buffer = c.softcap > 0.0 ? at::empty({c.chunk_rows, c.classes}, options) : at::Tensor();
  for (int64_t begin = 0; begin < c.rows; begin += c.chunk_rows) {
    const int64_t n = std::min(c.chunk_rows, c.rows - begin);
    const at::Tensor x = c.input.narrow(0, begin, n).to(c.compute);
    at::Tensor logits = logits_buffer.narrow(0, 0, n);
    at::Tensor tanh_rows = c.softcap > 0.0 ? tanh_buffer.narrow(0, 0, n) : at::Tensor();
    chunk_logits(c, x, c.linear_weight, c.linear_bias, logits, tanh_rows);
    fn(begin, x, logits, tanh_rows);
  }
}

// ---- The tiled road: CPU bf16/fp16 ----
//
// The GEMMs run in fp32 (emulated half-precision GEMMs are 6-300x slower here), but fp32 copies of all of
// linear_weight and of its gradient would add 8 bytes per weight: at H=1024, V=32000, N=2048 that is 80% of
// what linear + cross_entropy adds in bf16. So the work goes in tiles of (rows x classes), each tile's GEMM
// reading fp32 copies of a chunk of input's rows and a block of linear_weight's rows, and each gradient is summed
// in fp32 over the loop that feeds it and rounded once:
//  - rows pass (chunks outer, blocks inner): each row's log-sum-exp, online over the blocks, its loss, and
//    input's gradient Σ_j g_j·W_j, summed flash-attention style as Σ_j exp(z_j - shift)·W_j and scaled by the row's
//    gradient coefficients (xent_math.h's RowGrad) once its log-sum-exp is known;
//  - classes pass (blocks outer, chunks inner): each tile's logit gradient again from those coefficients, summed
//    into the block's rows of linear_weight's and linear_bias's gradients.
// Four GEMMs instead of three (five with probability targets, or softcap with label smoothing: their linear
// term's Σ_j a_j·W_j differs from row to row); the memory is a few tiles and the (N,) row coefficients. A row's
// shift (row_lse's first column) is its lazy shift here, not its max: exp((z - shift) - log_sum) is the same.
class TiledLoss {
 public:
  // The running shift of a row moves only when a block's max passes it by this much: exp(z - shift) stays below
  // e^8 (far from fp32's overflow), and the row's sums and input-gradient rows are rarely rescaled.
  static constexpr double kShiftSlack = 8.0;

  explicit TiledLoss(const Call& call)
      : c(call),
        opmath(c.input.options().dtype(c.opmath)),
        prob(at::isFloatingType(c.target.scalar_type())),
        linear(prob || c.label_smoothing > 0.0),
        one_minus_smoothing(1.0 - c.label_smoothing),
        smoothing_over_classes(c.label_smoothing / static_cast<double>(c.classes)) {
    if (c.weight.has_value()) class_weight = c.weight->to(c.opmath);
    if (!prob) {
      const at::Tensor t = c.target.to(at::kLong);
      kept = t != c.ignore_index;
      index = t.masked_fill(kept.logical_not(), 0);  // checked by check_cpu_targets (else index_select raises)
      target_weight = class_weight.defined() ? class_weight.index_select(0, index) * kept : kept.to(c.opmath);
      class_weight_sum = class_weight.defined() ? class_weight.sum() : at::scalar_tensor(c.classes, opmath);
    }
    for (at::Tensor* t : {&softmax_coef, &linear_coef, &target_coef}) {
      *t = at::empty({c.rows}, opmath);
    }
  }

  // The row scale g_r of the gradient for a loss gradient grad_loss (one element, or (N,)): grad_loss_r /
  // denominator (NaN for a denominator of 0: gradient_inverse), 0 for ignored rows.
  at::Tensor row_scale(const at::Tensor& grad_loss, const at::Tensor& denominator) const {
    const at::Tensor inverse = gradient_inverse(denominator);
    at::Tensor s = grad_loss.to(c.opmath).reshape({-1}) * inverse;
    s = s.expand({c.rows}).contiguous();
    // where, not a product: an ignored row's gradient is 0 whatever its grad_loss (inf·0 would be NaN, and the
    // classes pass's GEMM would carry it into every weight).
    return prob ? s : at::where(kept, s, at::zeros({}, opmath));
  }

  // Rows pass. Writes row_lse (N, 2) and row_loss (N,) (opmath, 0 for ignored rows); with scale (N,) defined,
  // the gradient coefficients that the classes pass needs and, when grad_input is defined, input's gradient.
  void rows_pass(const at::Tensor& scale, at::Tensor& row_lse, at::Tensor& row_loss, at::Tensor grad_input) {
    const bool input_grad = grad_input.defined();
    const bool softcap = c.softcap > 0.0;
    // The linear term's Σ_j a_j·W_j is the same for every row for class indices without softcap (a_j = w_j), else
    // it is summed per row like the softmax's.
    const bool row_linear = input_grad && linear && (prob || softcap);
    at::Tensor shared_linear = input_grad && linear && !row_linear ? at::zeros({c.hidden}, opmath) : at::Tensor();
    at::Tensor block_weight = at::empty({c.block_classes, c.hidden}, opmath);
    at::Tensor tile = at::empty({c.chunk_rows, c.block_classes}, opmath);
    at::Tensor tanh_tile = softcap ? at::empty({c.chunk_rows, c.block_classes}, opmath) : at::Tensor();
    for (int64_t r0 = 0; r0 < c.rows; r0 += c.chunk_rows) {
      const int64_t n = std::min(c.chunk_rows, c.rows - r0);
      const at::Tensor x = c.input.narrow(0, r0, n).to(c.opmath);
      // The row state of xent_math.h (max → shift, sum, dot, asum), in (n,) tensors.
      at::Tensor row_shift = at::full({n}, -INFINITY, opmath), sum = at::zeros({n}, opmath);
      at::Tensor dot = at::zeros({n}, opmath), asum = at::zeros({n}, opmath);
      at::Tensor target_logit = at::zeros({n}, opmath), target_tanh = at::zeros({n}, opmath);
      at::Tensor softmax_rows = input_grad ? at::zeros({n, c.hidden}, opmath) : at::Tensor();
      at::Tensor linear_rows = row_linear ? at::zeros({n, c.hidden}, opmath) : at::Tensor();
      at::Tensor safe_shift = at::zeros({n}, opmath);
      for (int64_t v0 = 0; v0 < c.classes; v0 += c.block_classes) {
        const int64_t vb = std::min(c.block_classes, c.classes - v0);
        at::Tensor w = block_weight.narrow(0, 0, vb);
        w.copy_(c.linear_weight.narrow(0, v0, vb));
        auto [z, th] = tile_logits(x, w, v0, tile, tanh_tile);
        const at::Tensor block_max = z.amax(1);
        const at::Tensor moved = block_max > row_shift + kShiftSlack;  // a shift of -inf moves on any finite max
        if (moved.any().item<bool>()) {
          const at::Tensor new_shift = at::where(moved, block_max, row_shift);
          const at::Tensor new_safe = at::where(new_shift == -INFINITY, at::zeros({}, opmath), new_shift);
          const at::Tensor rescale = at::where(moved, at::exp(row_shift - new_shift), at::ones({}, opmath));
          sum.mul_(rescale);
          if (input_grad) softmax_rows.mul_(rescale.unsqueeze(1));
          if (linear) dot.add_(asum * (safe_shift - new_safe));  // Σ a·(z - new) = dot + A·(old - new)
          row_shift = new_shift;
          safe_shift = new_safe;
        }
        const at::Tensor a = linear ? linear_coefficients(r0, n, v0, vb) : at::Tensor();
        if (linear) {
          dot.add_((a * (z - safe_shift.unsqueeze(1))).sum(1));
          asum.add_(a.sum(1).expand({n}));
        }
        if (!prob) {  // the true class's logit (and tanh), from the block that holds it
          const auto [here, column] = target_in_block(r0, n, v0, vb);
          target_logit = at::where(here, z.gather(1, column).squeeze(1), target_logit);
          if (softcap) target_tanh = at::where(here, th.gather(1, column).squeeze(1), target_tanh);
        }
        at::Tensor u = z.sub_(safe_shift.unsqueeze(1)).exp_();  // exp(z - shift), over z
        sum.add_(u.sum(1));
        if (!input_grad) continue;
        if (softcap) {  // d(c·tanh(y/c))/dy = 1 - tanh²
          th.mul_(th).neg_().add_(1.0);
          u.mul_(th);
        }
        softmax_rows.addmm_(u, w);
        if (row_linear) linear_rows.addmm_(softcap ? a * th : a.expand({n, vb}), w);
        if (shared_linear.defined() && r0 == 0) shared_linear.addmv_(w.t(), a.squeeze(0));
      }
      finish_rows(r0, n, safe_shift, sum, dot, asum, target_logit, scale, row_lse, row_loss);
      if (!input_grad) continue;
      // g·W summed: softmax_coef·Σ p_j W_j − linear_coef·Σ a_j W_j − target_coef·(1 - tanh_t²)·W_t.
      const at::Tensor softmax_c = softmax_coef.narrow(0, r0, n), linear_c = linear_coef.narrow(0, r0, n);
      softmax_rows.mul_((softmax_c / sum).unsqueeze(1));
      if (row_linear) softmax_rows.addcmul_(linear_rows, linear_c.unsqueeze(1), -1.0);
      if (shared_linear.defined()) softmax_rows.addr_(linear_c, shared_linear, 1.0, -1.0);
      if (!prob) {
        at::Tensor coef = target_coef.narrow(0, r0, n);
        if (softcap) coef = coef * (1.0 - target_tanh * target_tanh);
        const at::Tensor target_rows = c.linear_weight.index_select(0, index.narrow(0, r0, n)).to(c.opmath);
        softmax_rows.addcmul_(target_rows, coef.unsqueeze(1), -1.0);
      }
      grad_input.narrow(0, r0, n).copy_(softmax_rows);
    }
  }

  // Classes pass, after a rows pass with scale that wrote row_lse: linear_weight's gradient (V, H) and
  // linear_bias's (V,), each written when defined.
  void classes_pass(const at::Tensor& row_lse, at::Tensor grad_weight, at::Tensor grad_bias) {
    const bool softcap = c.softcap > 0.0;
    if (c.rows == 0) {
      if (grad_weight.defined()) grad_weight.zero_();
      if (grad_bias.defined()) grad_bias.zero_();
      return;
    }
    at::Tensor block_weight = at::empty({c.block_classes, c.hidden}, opmath);
    at::Tensor block_grad = grad_weight.defined() ? at::empty({c.block_classes, c.hidden}, opmath) : at::Tensor();
    at::Tensor tile = at::empty({c.chunk_rows, c.block_classes}, opmath);
    at::Tensor tanh_tile = softcap ? at::empty({c.chunk_rows, c.block_classes}, opmath) : at::Tensor();
    for (int64_t v0 = 0; v0 < c.classes; v0 += c.block_classes) {
      const int64_t vb = std::min(c.block_classes, c.classes - v0);
      at::Tensor w = block_weight.narrow(0, 0, vb);
      w.copy_(c.linear_weight.narrow(0, v0, vb));
      at::Tensor gw = grad_weight.defined() ? block_grad.narrow(0, 0, vb) : at::Tensor();
      at::Tensor gb = grad_bias.defined() ? grad_bias.narrow(0, v0, vb) : at::Tensor();
      for (int64_t r0 = 0; r0 < c.rows; r0 += c.chunk_rows) {
        const int64_t n = std::min(c.chunk_rows, c.rows - r0);
        const at::Tensor x = c.input.narrow(0, r0, n).to(c.opmath);
        auto [z, th] = tile_logits(x, w, v0, tile, tanh_tile);
        // xent_math.h's grad_element: softmax_coef·exp((z - shift) - log_sum) − linear_coef·a, then the true class.
        const at::Tensor lse = row_lse.narrow(0, r0, n);
        z.sub_(lse.select(1, 0).unsqueeze(1)).sub_(lse.select(1, 1).unsqueeze(1)).exp_();
        z.mul_(softmax_coef.narrow(0, r0, n).unsqueeze(1));
        if (linear) z.addcmul_(linear_coefficients(r0, n, v0, vb), linear_coef.narrow(0, r0, n).unsqueeze(1), -1.0);
        if (!prob) {
          const auto [here, column] = target_in_block(r0, n, v0, vb);
          z.scatter_add_(1, column, at::where(here, -target_coef.narrow(0, r0, n), at::zeros({}, opmath)).unsqueeze(1));
        }
        if (softcap) z.mul_(th.mul_(th).neg_().add_(1.0));
        if (gw.defined()) at::addmm_out(gw, gw, z.t(), x, r0 == 0 ? 0.0 : 1.0, 1.0);  // beta 0: gw's old values unread
        if (gb.defined()) gb.add_(z.sum(0));
      }
      if (gw.defined()) grad_weight.narrow(0, v0, vb).copy_(gw);
    }
  }

 private:
  // The logits of x's rows and block w of linear_weight's rows from class v0 on, in the tile buffers (z, and
  // tanh for softcap: th, else undefined).
  std::pair<at::Tensor, at::Tensor> tile_logits(const at::Tensor& x, const at::Tensor& w, int64_t v0,
                                                const at::Tensor& tile, const at::Tensor& tanh_tile) const {
    const int64_t n = x.size(0), vb = w.size(0);
    at::Tensor z = tile.narrow(0, 0, n).narrow(1, 0, vb);
    at::Tensor th = tanh_tile.defined() ? tanh_tile.narrow(0, 0, n).narrow(1, 0, vb) : at::Tensor();
    const at::Tensor b = c.linear_bias.defined() ? c.linear_bias.narrow(0, v0, vb) : at::Tensor();
    chunk_logits(c, x, w, b, z, th);
    return {z, th};
  }

  // Rows [r0, r0 + n) whose true class is in classes [v0, v0 + vb) (ignored rows are not), and each row's
  // column there as an (n, 1) index, clamped into the block for the others.
  std::pair<at::Tensor, at::Tensor> target_in_block(int64_t r0, int64_t n, int64_t v0, int64_t vb) const {
    const at::Tensor local = index.narrow(0, r0, n) - v0;
    const at::Tensor here = kept.narrow(0, r0, n).logical_and(local >= 0).logical_and_(local < vb);
    return {here, local.clamp(0, vb - 1).unsqueeze(1)};
  }

  // The linear term's coefficients a_j over classes [v0, v0 + vb) of rows [r0, r0 + n): w_j (class indices with
  // label smoothing) as (1, vb), or w_j·t'_j, t' = (1-ε)·t + ε/C (probabilities) as (n, vb).
  at::Tensor linear_coefficients(int64_t r0, int64_t n, int64_t v0, int64_t vb) const {
    if (!prob) return class_weight.defined() ? class_weight.narrow(0, v0, vb).unsqueeze(0) : at::ones({1, vb}, opmath);
    at::Tensor t = c.target.narrow(0, r0, n).narrow(1, v0, vb).to(c.opmath);
    if (c.label_smoothing > 0.0) t = t * one_minus_smoothing + smoothing_over_classes;
    return class_weight.defined() ? t * class_weight.narrow(0, v0, vb) : t;
  }

  // A chunk's log-sum-exps and losses (xent_math.h's index_row_loss / prob_row_loss), and with scale its
  // gradient coefficients (index_row_grad / prob_row_grad).
  void finish_rows(int64_t r0, int64_t n, const at::Tensor& safe_shift, const at::Tensor& sum, const at::Tensor& dot,
                   const at::Tensor& asum, const at::Tensor& target_logit, const at::Tensor& scale,
                   at::Tensor& row_lse, at::Tensor& row_loss) {
    const at::Tensor lsum = sum.log();  // a +inf logit: NaN (exp(inf - inf)), as torch
    const at::Tensor full = safe_shift + lsum;
    row_lse.narrow(0, r0, n).select(1, 0).copy_(safe_shift);
    row_lse.narrow(0, r0, n).select(1, 1).copy_(lsum);
    const double z = c.lse_square_scale;
    at::Tensor loss;
    if (prob) {
      loss = asum * lsum - dot;
    } else {
      const at::Tensor wt = target_weight.narrow(0, r0, n);
      loss = one_minus_smoothing * (wt * (lsum - (target_logit - safe_shift)));
      if (c.label_smoothing > 0.0) loss = loss + smoothing_over_classes * (asum * lsum - dot);
    }
    if (z != 0.0) loss = loss + z * full * full;
    if (!prob) loss = at::where(kept.narrow(0, r0, n), loss, at::zeros({}, opmath));
    row_loss.narrow(0, r0, n).copy_(loss);
    if (!scale.defined()) return;
    const at::Tensor g = scale.narrow(0, r0, n);
    at::Tensor a = prob ? asum : target_weight.narrow(0, r0, n);
    // Without smoothing its term is left out, not multiplied by 0: an inf class weight would make it NaN everywhere.
    if (!prob && c.label_smoothing > 0.0) a = one_minus_smoothing * a + smoothing_over_classes * class_weight_sum;
    softmax_coef.narrow(0, r0, n).copy_(g * (a + 2.0 * z * full));
    linear_coef.narrow(0, r0, n).copy_(prob ? g : g * smoothing_over_classes);
    if (prob) {
      target_coef.narrow(0, r0, n).zero_();
    } else {
      target_coef.narrow(0, r0, n).copy_(g * (one_minus_smoothing * target_weight.narrow(0, r0, n)));
    }
  }

  const Call& c;
  at::TensorOptions opmath;
  bool prob, linear;
  double one_minus_smoothing, smoothing_over_classes;
  at::Tensor class_weight, kept, index, target_weight, class_weight_sum;  // class index targets: (N,) each
  at::Tensor softmax_coef, linear_coef, target_coef;  // (N,): what the classes pass reads, with row_lse
};

// linear_weight's and linear_bias's gradients from a rows pass with a scale (which wrote row_lse), each as asked
// (else empty).
std::pair<at::Tensor, at::Tensor> tiled_param_grads(const Call& c, TiledLoss& tiles, const at::Tensor& row_lse,
                                                    bool weight_grad, bool bias_grad) {
  at::Tensor grad_weight = weight_grad ? at::empty({c.classes, c.hidden}, c.input.options()) : at::Tensor();
  at::Tensor grad_bias = bias_grad ? at::zeros({c.classes}, c.input.options().dtype(c.opmath)) : at::Tensor();
  if (weight_grad || bias_grad) tiles.classes_pass(row_lse, grad_weight, grad_bias);
  const at::Tensor none = at::empty({0}, c.input.options());
  return {weight_grad ? grad_weight : none, bias_grad ? grad_bias.to(c.input.scalar_type()) : none};
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (loss, row_lse, denominator, grad_input, grad_linear_weight, grad_linear_bias). The gradients, for a loss
// gradient of 1, only for a reduced loss and only those asked for (the others and all of them for
// reduction='none' come back empty). row_lse (N, 2) and denominator are what linear_cross_entropy_backward needs.
ForwardOutputs linear_cross_entropy_forward(const at::Tensor& input, const at::Tensor& linear_weight,
                                            const at::Tensor& target, const std::optional<at::Tensor>& linear_bias,
                                            const std::optional<at::Tensor>& weight, int64_t reduction,
                                            int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                            double softcap, int64_t chunk_rows, bool input_grad,
                                            bool linear_weight_grad, bool linear_bias_grad, bool opmath_loss,
                                            bool opmath_weight_grad) {
  // The GEMMs run in the dtype chosen here, not autocast's (fused_train.nn casts the arguments as autocast would).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call c = check_call("linear_cross_entropy_forward", input, linear_weight, target, linear_bias, weight,
                            reduction, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_rows,
                            opmath_weight_grad);
  check_cpu_targets("linear_cross_entropy", c);
  const bool per_row = reduction == kNone;
  const at::TensorOptions opmath = input.options().dtype(c.opmath);
  const at::ScalarType loss_dtype = opmath_loss ? c.opmath : input.scalar_type();
  at::Tensor row_lse = at::empty({c.rows, 2}, opmath);
  const at::Tensor denominator = reduction == kMean ? mean_denominator(c) : at::ones({}, opmath);
  if (c.tiled) {
    const bool bias_grad = linear_bias_grad && !per_row && c.linear_bias.defined();
    const bool weight_grad = linear_weight_grad && !per_row;
    TiledLoss tiles(c);
    at::Tensor row_loss = at::empty({c.rows}, opmath);
    at::Tensor grad_input = input_grad && !per_row ? at::empty({c.rows, c.hidden}, input.options()) : at::Tensor();
    const bool with_grads = grad_input.defined() || weight_grad || bias_grad;
    tiles.rows_pass(with_grads ? tiles.row_scale(at::ones({}, opmath), denominator) : at::Tensor(), row_lse, row_loss,
                    grad_input);
    auto [grad_weight, grad_bias] = tiled_param_grads(c, tiles, row_lse, weight_grad, bias_grad);
    at::Tensor loss = per_row ? row_loss : row_loss.sum();
    if (reduction == kMean) loss = mean_over(loss, denominator);
    if (!grad_input.defined()) grad_input = at::empty({0}, input.options());
    return {loss.to(loss_dtype), row_lse, denominator, grad_input, grad_weight, grad_bias};
  }
  at::Tensor row_loss = per_row ? at::empty({c.rows}, input.options().dtype(loss_dtype)) : at::Tensor();
  std::vector<at::Tensor> chunk_sums;
  GradAccumulator grads(c, input_grad && !per_row, linear_weight_grad && !per_row,
                        linear_bias_grad && !per_row && c.linear_bias.defined());
  const bool with_grads = grads.input_grad || grads.weight_grad || grads.bias_grad;
  // Each chunk's loss is its sum (or its rows); the mean divides once, by the denominator of all rows. On CPU the
  // GEMMs take 1/denominator as alpha (reading it costs no device sync) when that is a normal fp32 number; any
  // other denominator is left to finish: 0 or one whose inverse overflows (alpha = inf would turn the ignored rows'
  // zeros into NaN), and inf or NaN (alpha = 0 would hide torch's NaN: BLAS skips the product for alpha 0).
  const int64_t chunk_reduction = per_row ? kNone : kSum;
  bool scaled_by_alpha = false;
  if (reduction == kMean && with_grads && input.device().is_cpu()) {
    const double d = denominator.item<double>();
    scaled_by_alpha = std::isfinite(d) && std::isnormal(static_cast<float>(1.0 / d));
    if (scaled_by_alpha) grads.alpha = 1.0 / d;
  }
  for_each_chunk(c, [&](int64_t begin, const at::Tensor& x, at::Tensor& logits, at::Tensor& tanh_rows) {
    const at::Tensor target_rows = chunk_target(c, begin, x.size(0));
    const auto& op = with_grads ? loss_forward_backward_inplace_op() : loss_forward_op();
    auto [loss, z_loss, lse, unused] = op.call(logits, target_rows, c.weight, chunk_reduction, c.ignore_index,
                                               c.label_smoothing, c.lse_square_scale, true);
    row_lse.narrow(0, begin, x.size(0)).copy_(lse);
    if (per_row) {
      row_loss.narrow(0, begin, x.size(0)).copy_(loss);
    } else {
      chunk_sums.push_back(loss);
    }
    if (with_grads) grads.add(begin, x, logits, tanh_rows);
  });
  at::Tensor loss;
  if (per_row) {
    loss = row_loss;
  } else {
    at::Tensor total = chunk_sums.empty() ? at::zeros({}, opmath) : at::stack(chunk_sums).sum();
    if (reduction == kMean) total = mean_over(total, denominator);
    loss = total.to(loss_dtype);
  }
  // The mean's gradients were summed; divided here, once (gradient_inverse: NaN for a denominator of 0). Per
  // row for input's, whose ignored rows stay 0; linear_weight's and linear_bias's stay 0 when no row is kept.
  std::optional<at::Tensor> input_scale, param_scale;
  if (reduction == kMean && with_grads && !scaled_by_alpha) {
    const at::Tensor inverse = gradient_inverse(denominator);
    const at::Tensor kept = kept_rows(c);
    if (grads.input_grad) input_scale = at::where(kept, inverse, 0.0).to(c.opmath).unsqueeze(1);
    param_scale = at::where(kept.any(), inverse, 0.0).to(c.opmath);
  }
  auto [grad_input, grad_weight, grad_bias] = grads.finish(input_scale, param_scale);
  return {loss, row_lse, denominator, grad_input, grad_weight, grad_bias};
}

// The gradients (grad_input, grad_linear_weight, grad_linear_bias) of the forward's loss for grad_loss (one
// element for a reduced loss, (N,) for reduction='none'), recomputed chunk by chunk from row_lse and
// denominator; those not asked for come back empty.
Grads linear_cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                    const at::Tensor& linear_weight, const at::Tensor& target,
                                    const std::optional<at::Tensor>& linear_bias,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& row_lse,
                                    const at::Tensor& denominator, int64_t reduction, int64_t ignore_index,
                                    double label_smoothing, double lse_square_scale, double softcap,
                                    int64_t chunk_rows, bool input_grad, bool linear_weight_grad,
                                    bool linear_bias_grad, bool opmath_weight_grad) {
  const char* op = "linear_cross_entropy_backward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call c = check_call(op, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                            label_smoothing, lse_square_scale, softcap, chunk_rows, opmath_weight_grad);
  TORCH_CHECK_VALUE(row_lse.dim() == 2 && row_lse.size(0) == c.rows && row_lse.size(1) == 2, op,
                    ": row_lse must be the forward's (", c.rows, ", 2) tensor, got shape ", row_lse.sizes());
  TORCH_CHECK_VALUE(reduction == kNone ? grad_loss.dim() == 1 && grad_loss.size(0) == c.rows : grad_loss.numel() == 1,
                    op, ": grad_loss must have shape (", c.rows, ",) for reduction='none' and one element otherwise, ",
                    "got ", grad_loss.sizes());
  if (c.tiled) {  // the forward's rows pass again, for this grad_loss
    TiledLoss tiles(c);
    const at::TensorOptions opmath = input.options().dtype(c.opmath);
    at::Tensor lse_again = at::empty({c.rows, 2}, opmath), row_loss = at::empty({c.rows}, opmath);
    at::Tensor grad_input = input_grad ? at::empty({c.rows, c.hidden}, input.options()) : at::Tensor();
    tiles.rows_pass(tiles.row_scale(grad_loss, denominator), lse_again, row_loss, grad_input);
    auto [grad_weight, grad_bias] =
        tiled_param_grads(c, tiles, lse_again, linear_weight_grad, linear_bias_grad && c.linear_bias.defined());
    if (!grad_input.defined()) grad_input = at::empty({0}, input.options());
    return {grad_input, grad_weight, grad_bias};
  }
  GradAccumulator grads(c, input_grad, linear_weight_grad, linear_bias_grad && c.linear_bias.defined());
  for_each_chunk(c, [&](int64_t begin, const at::Tensor& x, at::Tensor& logits, at::Tensor& tanh_rows) {
    const int64_t n = x.size(0);
    const at::Tensor g = reduction == kNone ? grad_loss.narrow(0, begin, n) : grad_loss.reshape({});
    loss_backward_inplace_op().call(g, logits, chunk_target(c, begin, n), c.weight, row_lse.narrow(0, begin, n),
                                    denominator, reduction, c.ignore_index, c.label_smoothing, c.lse_square_scale);
    grads.add(begin, x, logits, tanh_rows);
  });
  return grads.finish();
}

}  // namespace
}  // namespace fused_train

// Every device: the work is ATen's GEMMs and the loss ops, each dispatched on its own.
TORCH_LIBRARY_IMPL(fused_train, CPU, m) {
  m.impl("linear_cross_entropy_forward", &fused_train::linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &fused_train::linear_cross_entropy_backward);
}

TORCH_LIBRARY_IMPL(fused_train, CUDA, m) {
  m.impl("linear_cross_entropy_forward", &fused_train::linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &fused_train::linear_cross_entropy_backward);
}
