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
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

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
  at::Tensor linear_weight;  // (V, H), in the compute dtype
  at::Tensor linear_bias;    // (V,), in the compute dtype, or undefined
  at::Tensor target;         // (N,) class indices or (N, V) probabilities
  std::optional<at::Tensor> weight;
  at::ScalarType compute = at::kFloat;  // the GEMMs' and the logits' dtype
  at::ScalarType opmath = at::kFloat;
  int64_t rows = 0, hidden = 0, classes = 0, chunk_rows = 1;
  int64_t reduction = kMean, ignore_index = -100;
  double label_smoothing = 0.0, lse_square_scale = 0.0, softcap = 0.0;
};

// Rows per chunk when the caller leaves it to us: a tenth of the whole (N, V) logits, within 24 to 64 MiB, and at
// least 192 rows. Each chunk's GEMMs read all of linear_weight (and read and write its gradient) again, so
// fewer, larger chunks are faster: at H=1024, V=32000, fp32, 2 threads, 128-row chunks took 1.15x the time of
// 256-row ones and 192 to 320 rows the same within noise; at N=4096, H=2048, 410-row chunks took about 0.93x
// the time of 192-row ones. A tenth of the logits keeps the chunk near 4% of what linear + cross_entropy adds
// (the logits, their log-softmax and gradient: about 2.4 N·V elements).
int64_t auto_chunk_rows(int64_t rows, int64_t classes, at::ScalarType compute) {
  const int64_t row_bytes = classes * static_cast<int64_t>(c10::elementSize(compute));
  const int64_t budget = std::clamp<int64_t>(rows * row_bytes / 10, int64_t{24} << 20, int64_t{64} << 20);
  return std::max<int64_t>(192, budget / row_bytes);
}

Call check_call(const char* op, const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& target,
                const std::optional<at::Tensor>& linear_bias, const std::optional<at::Tensor>& weight,
                int64_t reduction, int64_t ignore_index, double label_smoothing, double lse_square_scale,
                double softcap, int64_t chunk_rows) {
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
  // CPUs without bf16/fp16 matrix units run half-precision GEMMs emulated, 6-300x slower than fp32 (2-core
  // AVX2, H=1024, V=32000); fp32 GEMMs over fp32 copies are the faster road there.
  c.compute = dev.is_cpu() ? c.opmath : dtype;
  c.input = input;
  c.linear_weight = linear_weight.to(c.compute);
  if (linear_bias.has_value() && linear_bias->defined()) c.linear_bias = linear_bias->to(c.compute);
  c.target = target;
  c.reduction = reduction;
  c.ignore_index = ignore_index;
  c.label_smoothing = label_smoothing;
  c.lse_square_scale = lse_square_scale;
  c.softcap = softcap;
  c.chunk_rows = std::max<int64_t>(1, std::min(c.rows, chunk_rows > 0 ? chunk_rows
                                                                      : auto_chunk_rows(c.rows, c.classes, c.compute)));
  return c;
}

// The mean's divisor: Σ weight[target] over the rows that are not ignored (the number of rows for probability
// targets), 0-dim opmath, computed on the device without a host sync.
at::Tensor mean_denominator(const Call& c) {
  const at::TensorOptions opmath = c.input.options().dtype(c.opmath);
  if (at::isFloatingType(c.target.scalar_type())) return at::scalar_tensor(static_cast<double>(c.rows), opmath);
  // In int64: an int32 target compared with an ignore_index beyond int32 would wrap it.
  const at::Tensor kept = c.target.to(at::kLong) != c.ignore_index;
  if (!c.weight.has_value()) return kept.sum().to(c.opmath);
  // A target out of [0, V) has raised already on CPU (check_cpu_targets); on CUDA the loss op of its chunk
  // reports it. Clamped here so the gather itself stays in bounds.
  const at::Tensor index = c.target.masked_fill(kept.logical_not(), 0).clamp(0, c.classes - 1).to(at::kLong);
  return (c.weight->to(c.opmath).index_select(0, index) * kept).sum();
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

// Fills logits (rows, V) with the chunk's logits: x @ W.T + b, and with softcap c: c·tanh((x @ W.T + b) / c),
// keeping tanh in tanh_rows for the gradient.
void chunk_logits(const Call& c, const at::Tensor& x, at::Tensor& logits, at::Tensor& tanh_rows) {
  const double scale = c.softcap > 0.0 ? 1.0 / c.softcap : 1.0;
  if (c.linear_bias.defined()) {
    at::addmm_out(logits, c.linear_bias, x, c.linear_weight.t(), scale, scale);
  } else if (scale == 1.0) {
    at::mm_out(logits, x, c.linear_weight.t());
  } else {
    at::addmm_out(logits, logits, x, c.linear_weight.t(), 0.0, scale);  // beta 0: logits' old values unread
  }
  if (c.softcap > 0.0) {
    at::tanh_out(tanh_rows, logits);
    at::mul_out(logits, tanh_rows, c.softcap);
  }
}

// Carries each chunk's logit gradient to input, linear_weight and linear_bias, accumulating in the compute dtype
// (fp32 for half-precision input on CPU) or opmath (bias).
struct GradAccumulator {
  const Call& c;
  bool input_grad, weight_grad, bias_grad;
  at::Tensor grad_input, grad_weight, grad_bias;

  GradAccumulator(const Call& call, bool input_grad_, bool weight_grad_, bool bias_grad_)
      : c(call), input_grad(input_grad_), weight_grad(weight_grad_), bias_grad(bias_grad_) {
    const at::TensorOptions options = c.input.options().dtype(c.compute);
    if (input_grad) grad_input = at::empty({c.rows, c.hidden}, c.input.options());
    // Zeros for N = 0; otherwise written over by the first chunk.
    if (weight_grad) grad_weight = c.rows == 0 ? at::zeros({c.classes, c.hidden}, options)
                                               : at::empty({c.classes, c.hidden}, options);
    if (bias_grad) grad_bias = at::zeros({c.classes}, options.dtype(c.opmath));
  }

  // logit_grad: the chunk's gradient (rows, V) for rows [begin, begin + rows) of x, whose rows are x.
  void add(int64_t begin, const at::Tensor& x, at::Tensor& logit_grad, at::Tensor& tanh_rows) {
    if (c.softcap > 0.0) {  // d(c·tanh(z/c))/dz = 1 - tanh²
      tanh_rows.mul_(tanh_rows);
      logit_grad.addcmul_(logit_grad, tanh_rows, -1.0);
    }
    if (input_grad) {
      at::Tensor rows = grad_input.narrow(0, begin, x.size(0));
      if (rows.scalar_type() == c.compute) {
        at::mm_out(rows, logit_grad, c.linear_weight);
      } else {
        rows.copy_(at::mm(logit_grad, c.linear_weight));
      }
    }
    if (weight_grad) {  // the first chunk writes, the others add
      if (begin == 0) {
        at::mm_out(grad_weight, logit_grad.t(), x);
      } else {
        grad_weight.addmm_(logit_grad.t(), x);
      }
    }
    if (bias_grad) grad_bias.add_(at::sum(logit_grad, {0}, false, c.opmath));
  }

  // The gradients in the parameters' dtypes, times scale (a 0-dim opmath tensor) when given; absent ones as
  // empty tensors.
  Grads finish(const std::optional<at::Tensor>& scale) {
    const auto out = [&](at::Tensor& g, at::ScalarType dtype) {
      if (!g.defined()) return at::empty({0}, c.input.options());
      if (scale.has_value()) g.mul_(*scale);
      return g.scalar_type() == dtype ? g : g.to(dtype);
    };
    const at::ScalarType dtype = c.input.scalar_type();
    return {out(grad_input, dtype), out(grad_weight, dtype), out(grad_bias, dtype)};
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
    chunk_logits(c, x, logits, tanh_rows);
    fn(begin, x, logits, tanh_rows);
  }
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
                                            bool linear_weight_grad, bool linear_bias_grad, bool opmath_loss) {
  // The GEMMs run in the dtype chosen here, not autocast's (fused_train.nn casts the arguments as autocast would).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call c = check_call("linear_cross_entropy_forward", input, linear_weight, target, linear_bias, weight,
                            reduction, ignore_index, label_smoothing, lse_square_scale, softcap, chunk_rows);
  check_cpu_targets("linear_cross_entropy", c);
  const bool per_row = reduction == kNone;
  const at::TensorOptions opmath = input.options().dtype(c.opmath);
  const at::ScalarType loss_dtype = opmath_loss ? c.opmath : input.scalar_type();
  at::Tensor row_lse = at::empty({c.rows, 2}, opmath);
  const at::Tensor denominator = reduction == kMean ? mean_denominator(c) : at::ones({}, opmath);
  at::Tensor row_loss = per_row ? at::empty({c.rows}, input.options().dtype(loss_dtype)) : at::Tensor();
  std::vector<at::Tensor> chunk_sums;
  GradAccumulator grads(c, input_grad && !per_row, linear_weight_grad && !per_row,
                        linear_bias_grad && !per_row && c.linear_bias.defined());
  const bool with_grads = grads.input_grad || grads.weight_grad || grads.bias_grad;
  // Each chunk's loss is its sum (or its rows); the mean divides once, by the denominator of all rows.
  const int64_t chunk_reduction = per_row ? kNone : kSum;
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
    if (reduction == kMean) total = total / denominator;  // all rows ignored: 0/0 = NaN, as torch
    loss = total.to(loss_dtype);
  }
  // The mean's gradients were summed; divided here, once. All rows ignored: no gradient (0, not 0·inf).
  std::optional<at::Tensor> scale;
  if (reduction == kMean && with_grads) {
    scale = at::where(denominator != 0, denominator.reciprocal(), at::zeros({}, opmath));
  }
  auto [grad_input, grad_weight, grad_bias] = grads.finish(scale);
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
                                    bool linear_bias_grad) {
  const char* op = "linear_cross_entropy_backward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Call c = check_call(op, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                            label_smoothing, lse_square_scale, softcap, chunk_rows);
  TORCH_CHECK_VALUE(row_lse.dim() == 2 && row_lse.size(0) == c.rows && row_lse.size(1) == 2, op,
                    ": row_lse must be the forward's (", c.rows, ", 2) tensor, got shape ", row_lse.sizes());
  TORCH_CHECK_VALUE(reduction == kNone ? grad_loss.dim() == 1 && grad_loss.size(0) == c.rows : grad_loss.numel() == 1,
                    op, ": grad_loss must have shape (", c.rows, ",) for reduction='none' and one element otherwise, ",
                    "got ", grad_loss.sizes());
  GradAccumulator grads(c, input_grad, linear_weight_grad, linear_bias_grad && c.linear_bias.defined());
  for_each_chunk(c, [&](int64_t begin, const at::Tensor& x, at::Tensor& logits, at::Tensor& tanh_rows) {
    const int64_t n = x.size(0);
    const at::Tensor g = reduction == kNone ? grad_loss.narrow(0, begin, n) : grad_loss.reshape({});
    loss_backward_inplace_op().call(g, logits, chunk_target(c, begin, n), c.weight, row_lse.narrow(0, begin, n),
                                    denominator, reduction, c.ignore_index, c.label_smoothing, c.lse_square_scale);
    grads.add(begin, x, logits, tanh_rows);
  });
  return grads.finish(std::nullopt);
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
