// CPU implementations of the cross-entropy ops: check the call (cross_entropy_args.h), then run the rows in
// parallel with the kernels of the best instruction set (cpu/xent_kernels.h via kernel_table()).
//
// The forward adds the row losses in double, in row order within blocks of rows whose size depends on the
// shape alone (the (batch, classes, positions) layout: lane by lane, then the lanes in order), then the blocks'
// sums in block order: the result is the same, bit for bit, for any thread count. The mean's denominator
// comes from the targets before the logits are read, so the forward can also write the gradient
// (cross_entropy_forward_backward): each row is then read once from memory, and a second time from cache to write
// its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/gradient_cache.h"
#include "cross_entropy_args.h"

namespace fused_train {
namespace cpu {
namespace {

// Logits per parallel task: enough to amortise waking a thread; below twice this a call runs serially.
constexpr int64_t kGrainElements = 32768;

ScalarKind xent_scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default: return ScalarKind::Half;  // check_cross_entropy_call admits no other dtype
  }
}

// Rows per block of the target check (below): its blocks run in parallel, their sums added in block order.
constexpr int64_t kTargetBlockRows = int64_t{1} << 16;

// Checks that every class index is in [0, C) or ignore_index (before anything is written) and returns the
// weighted mean's denominator: Σ w_t over the rows that are not ignored, in row order within blocks of rows and
// then in block order, so the same for any thread count (a segmentation batch has millions of rows: on one
// thread this loop took 11% of a forward + backward of 8192 positions of 21 classes, by perf). The error names
// the first bad row.
template <class Index, class O>
double check_targets_and_weigh(const CrossEntropyCall& c, int64_t ignore_index) {
  const Index* t = c.target.const_data_ptr<Index>();
  const O* weight = c.weight.defined() ? c.weight.const_data_ptr<O>() : nullptr;
  const int64_t stride = c.target.stride(0);
  const int64_t blocks = (c.rows + kTargetBlockRows - 1) / kTargetBlockRows;
  std::vector<double> totals(blocks, 0.0);
  std::vector<int64_t> first_bad(blocks, -1);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double total = 0.0;
      const int64_t end = std::min(c.rows, (b + 1) * kTargetBlockRows);
      for (int64_t r = b * kTargetBlockRows; r < end; ++r) {
        const int64_t v = t[r * stride];
        if (v == ignore_index) continue;
        if (v < 0 || v >= c.classes) {
          first_bad[b] = r;
          break;
        }
        total += weight != nullptr ? static_cast<double>(weight[v]) : 1.0;
      }
      totals[b] = total;
    }
  });
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r = first_bad[b];
    TORCH_CHECK_INDEX(r < 0, "cross_entropy: target ", static_cast<int64_t>(t[r * stride]), " at position ", r,
                      " is out of bounds: expected 0 <= target < ", c.classes, " or target == ignore_index (",
                      ignore_index, ")");
    total += totals[b];
  }
  return total;
}

template <class O>
double check_targets_and_weigh(const CrossEntropyCall& c, int64_t ignore_index) {
  return c.target.scalar_type() == at::kInt ? check_targets_and_weigh<int32_t, O>(c, ignore_index)
                                            : check_targets_and_weigh<int64_t, O>(c, ignore_index);
}

CrossEntropyLaunch make_launch(const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing,
                               double lse_square_scale) {
  CrossEntropyLaunch l{};
  l.dtype = xent_scalar_kind(c.input.scalar_type());
  l.logits = c.input.const_data_ptr();
  l.logits_row_stride = c.input.stride(0);
  l.rows = c.rows;
  l.classes = c.classes;
  l.positions = c.spatial ? c.positions : 0;
  l.target = c.target.const_data_ptr();
  l.target_row_stride = c.target.stride(0);
  l.target_is_prob = c.target_is_prob;
  l.target_is_int32 = c.target.scalar_type() == at::kInt;
  l.weight = c.weight.defined() ? c.weight.const_data_ptr() : nullptr;
  l.ignore_index = ignore_index;
  l.label_smoothing = label_smoothing;
  l.lse_square_scale = lse_square_scale;
  l.class_weight_sum =
      c.class_weight_sum.defined() ? c.class_weight_sum.item<double>() : static_cast<double>(c.classes);
  return l;
}

bool run_serially(const CrossEntropyLaunch& l) {
  return l.rows * l.classes < 2 * kGrainElements || at::get_num_threads() == 1;
}

void run_rows(CrossEntropyBackwardFn fn, const CrossEntropyLaunch& l) {
  if (run_serially(l)) {
    fn(l, 0, l.rows);
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / l.classes);
    at::parallel_for(0, l.rows, grain, [&](int64_t b, int64_t e) { fn(l, b, e); });
  }
}

// The forward over all rows; returns the sums of the row losses (zero for reduction='none', which writes
// them per row), grouped as described at the top of this file.
CrossEntropySums run_forward_rows(const CrossEntropyLaunch& l) {
  const CrossEntropyForwardFn fn = kernel_table().cross_entropy_forward_rows;
  const int64_t rows_per_block = std::max<int64_t>(1, kGrainElements / l.classes);
  const int64_t blocks = (l.rows + rows_per_block - 1) / rows_per_block;
  const auto block_sums = [&](int64_t b) {
    return fn(l, b * rows_per_block, std::min(l.rows, (b + 1) * rows_per_block));
  };
  CrossEntropySums total;
  const auto add = [&](const CrossEntropySums& s) {
    total.loss += s.loss;
    total.z_loss += s.z_loss;
  };
  if (blocks == 1 || run_serially(l)) {
    for (int64_t b = 0; b < blocks; ++b) add(block_sums(b));
  } else {
    std::vector<CrossEntropySums> partial(blocks);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) partial[b] = block_sums(b);
    });
    for (const CrossEntropySums& s : partial) add(s);
  }
  return total;
}

// A 0-dim tensor holding v, without a dispatcher round trip (fill_) per value.
at::Tensor scalar_like(double v, const at::TensorOptions& options) {
  at::Tensor t = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "cross_entropy_scalar",
                                  [&] { *t.data_ptr<scalar_t>() = static_cast<scalar_t>(v); });
  return t;
}

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward ops' common body: (loss, z_loss, row_lse, denominator). grad: where to write the gradient for
// grad_loss = 1 (rows of grad_row_stride elements), or nullptr for none. opmath_loss: loss and z_loss in
// opmath (autocast) instead of the logits' dtype.
ForwardOutputs run_forward(const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing,
                           double lse_square_scale, bool opmath_loss, void* grad, int64_t grad_row_stride) {
  const bool is_double = c.opmath == at::kDouble;
  double denominator = 1.0;
  if (!c.target_is_prob) {
    const double weight_sum = is_double ? check_targets_and_weigh<double>(c, ignore_index)
                                        : check_targets_and_weigh<float>(c, ignore_index);
    // torch: the weighted mean over the rows that are not ignored (0/0 = NaN when all are, as torch).
    if (c.reduction == XentReduction::Mean) denominator = weight_sum;
  } else if (c.reduction == XentReduction::Mean) {
    denominator = static_cast<double>(c.rows);
  }
  const at::TensorOptions opmath_options = c.input.options().dtype(c.opmath);
  const at::TensorOptions options = opmath_loss ? opmath_options : c.input.options();
  at::Tensor lse = at::empty({c.rows, 2}, opmath_options);
  at::Tensor denominator_opmath = scalar_like(denominator, opmath_options);
  const bool per_row = c.reduction == XentReduction::None;
  at::Tensor loss = per_row ? at::empty({c.rows}, options) : at::Tensor();
  at::Tensor z_loss = per_row ? at::empty({c.rows}, options) : at::Tensor();
  CrossEntropySums sums;
  if (c.rows > 0) {
    CrossEntropyLaunch l = make_launch(c, ignore_index, label_smoothing, lse_square_scale);
    l.lse = lse.data_ptr();
    l.row_loss = per_row ? loss.data_ptr() : nullptr;
    l.row_z_loss = per_row ? z_loss.data_ptr() : nullptr;
    l.loss_opmath = opmath_loss;
    l.grad = grad;
    l.grad_row_stride = grad_row_stride;
    l.denominator = denominator_opmath.const_data_ptr();
    sums = run_forward_rows(l);
  }
  if (!per_row) {
    // A mean over a denominator of 0 is NaN, as torch's (its NLL part is 0/0 there), also where label
    // smoothing or the z-loss would make it ±inf.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss = scalar_like(denominator == 0.0 ? nan : sums.loss / denominator, options);
    z_loss = scalar_like(denominator == 0.0 ? nan : sums.z_loss / denominator, options);
  }
  return {loss, z_loss, lse, denominator_opmath};
}

ForwardOutputs cross_entropy_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                         bool opmath_loss) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  return run_forward(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss, nullptr, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale, bool opmath_loss) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, false);
  // The memory of the last large gradient when it is free again (cpu/gradient_cache.h).
  at::Tensor grad = reusable_gradient(c.rows, c.classes, input.options()).view(c.input.sizes());
  auto [loss, z_loss, lse, denominator] =
      run_forward(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss, grad.data_ptr(), c.classes);
  return {loss, z_loss, lse, denominator, grad};
}

ForwardOutputs cross_entropy_forward_backward_inplace_cpu(const at::Tensor& input, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t reduction, int64_t ignore_index,
                                                          double label_smoothing, double lse_square_scale,
                                                          bool opmath_loss) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward_", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, true);
  // Each row is summarised first, then read and written in place element by element; its true-class
  // logit is read before the row is overwritten.
  return run_forward(c, ignore_index, label_smoothing, lse_square_scale, opmath_loss, input.data_ptr(),
                     input.stride(0));
}

// keep_unit_rows: leave the rows whose grad_loss is exactly 1 as they are (they hold the forward's gradient).
void run_backward(const CrossEntropyCall& c, const at::Tensor& g, const at::Tensor& lse,
                  const at::Tensor& denominator, int64_t ignore_index, double label_smoothing,
                  double lse_square_scale, void* grad, int64_t grad_row_stride, bool keep_unit_rows) {
  if (c.rows == 0) return;
  // The kernels index the gradient by the targets: an out-of-range one raises here, before anything is written
  // (the forward that made lse checked them, but these ops take any targets).
  if (!c.target_is_prob) {
    c.opmath == at::kDouble ? check_targets_and_weigh<double>(c, ignore_index)
                            : check_targets_and_weigh<float>(c, ignore_index);
  }
  const at::Tensor denominator_opmath = denominator.reshape({});
  CrossEntropyLaunch l = make_launch(c, ignore_index, label_smoothing, lse_square_scale);
  l.lse_in = lse.const_data_ptr();
  l.grad = grad;
  l.grad_row_stride = grad_row_stride;
  l.grad_loss = g.const_data_ptr();
  l.grad_loss_stride = c.reduction == XentReduction::None ? g.stride(0) : 0;
  l.denominator = denominator_opmath.const_data_ptr();
  l.keep_unit_rows = keep_unit_rows;
  run_rows(kernel_table().cross_entropy_backward_rows, l);
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      const at::Tensor& denominator, int64_t reduction, int64_t ignore_index,
                                      double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_backward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  const at::Tensor g = check_cross_entropy_backward("cross_entropy_backward", c, grad_loss, lse, denominator);
  at::Tensor grad = at::empty(c.input.sizes(), input.options());
  run_backward(c, g, lse, denominator, ignore_index, label_smoothing, lse_square_scale, grad.data_ptr(), c.classes,
               false);
  return grad;
}

void cross_entropy_backward_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                        const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                        const at::Tensor& lse, const at::Tensor& denominator, int64_t reduction,
                                        int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_backward_", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, true);
  // Each row is read and then written in place, element by element in the same order, so the kernel
  // needs no second buffer; the true-class logit is read before its row is overwritten.
  const at::Tensor g = check_cross_entropy_backward("cross_entropy_backward_", c, grad_loss, lse, denominator);
  run_backward(c, g, lse, denominator, ignore_index, label_smoothing, lse_square_scale, input.data_ptr(),
               input.stride(0), false);
}

// grad_input *= scale, one element or one per row. A 0-dim CPU tensor multiplies as the scalar it holds,
// in opmath (GradScaler's 2^16 would be inf as an fp16 tensor).
void scale_rows_(const at::Tensor& grad_input, const at::Tensor& scale) {
  grad_input.mul_(row_scale_for(grad_input, scale));
}

bool all_ones(const at::Tensor& t) {
  bool ones = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "cross_entropy_grad_loss_is_one", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
    for (int64_t i = 0; i < t.numel() && ones; ++i) ones = static_cast<double>(p[i * stride]) == 1.0;
  });
  return ones;
}

// loss.backward()'s question, asked before anything else of the backward (one argument, so the call from
// Python costs what a scale did): is the forward's gradient final?
bool cross_entropy_grad_loss_is_one_cpu(const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad_loss.dim() <= 1 && at::isFloatingType(grad_loss.scalar_type()),
                    "cross_entropy_grad_loss_is_one: grad_loss must be a floating 0-dim or 1-D tensor, got shape ",
                    grad_loss.sizes(), " ", grad_loss.scalar_type());
  return all_ones(grad_loss);
}

// Whether every element is a nonzero power of two (GradScaler's scales, 1/2^k for accumulation).
bool all_powers_of_two(const at::Tensor& t) {
  bool powers = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "cross_entropy_apply_grad_loss_", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.dim() == 0 ? 0 : t.stride(0);
    for (int64_t i = 0; i < t.numel() && powers; ++i) {
      int exponent = 0;
      const double v = static_cast<double>(p[i * stride]);
      powers = std::isfinite(v) && std::abs(std::frexp(v, &exponent)) == 0.5;
    }
  });
  return powers;
}

// Turns the forward's gradient (written for grad_loss = 1) into the gradient for grad_loss: nothing to do,
// and nothing read but grad_loss, when it is all ones, as for loss.backward(); otherwise the rows whose
// grad_loss is not 1 are recomputed from the logits with grad_loss applied in opmath, so each element is
// rounded once (a multiply of the rounded gradient would round twice, and under fp16 loss scaling lose
// to underflow what the scale was meant to keep). The recompute moves the bytes a multiply would (N×C
// read, N×C written), but on CPU it costs an exp per logit: about 3× the multiply (2048×8192 fp32, 2
// threads: 18 ms against 5.4 ms). So a power-of-two grad_loss, GradScaler's, multiplies bf16/fp32/fp64
// gradients instead: exact there, the one rounding's result (their exponent range is fp32's; only entries
// below 2^-126, fp32's subnormals, could differ, by less than 2^-149·grad_loss). fp16's subnormals start
// at 2^-14, where loss-scaled gradients live: fp16 is always recomputed.
void cross_entropy_apply_grad_loss_inplace_cpu(const at::Tensor& grad_input, const at::Tensor& grad_loss,
                                               const at::Tensor& input, const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                               const at::Tensor& denominator, int64_t reduction, int64_t ignore_index,
                                               double label_smoothing, double lse_square_scale) {
  const char* op = "cross_entropy_apply_grad_loss_";
  const CrossEntropyCall c =
      check_cross_entropy_call(op, input, target, weight, reduction, label_smoothing, lse_square_scale, false);
  check_cross_entropy_grad_input(op, c, grad_input);
  const at::Tensor g = check_cross_entropy_backward(op, c, grad_loss, lse, denominator);
  if (all_ones(g)) return;
  if (c.input.scalar_type() != at::kHalf && all_powers_of_two(g)) {
    scale_rows_(grad_input, g.to(c.input.scalar_type()));  // exact: a power of two within the dtype's range
    return;
  }
  run_backward(c, g, lse, denominator, ignore_index, label_smoothing, lse_square_scale, grad_input.data_ptr(),
               grad_input.stride(0), true);
}

// Scales the forward's gradient (written for grad_loss = 1) by grad_loss; nothing to do, and nothing read
// but grad_loss, when it is 1, as it is for loss.backward(). For a gradient written over the logits
// (inplace_backward), which cannot be recomputed: a second rounding. The scale stays in opmath.
void cross_entropy_scale_grad_inplace_cpu(const at::Tensor& grad_input, const at::Tensor& grad_loss) {
  const at::Tensor scale = check_cross_entropy_scale_grad("cross_entropy_scale_grad_", grad_input, grad_loss);
  if (!all_ones(scale.reshape({-1}))) grad_input.mul_(scale);
}

}  // namespace
}  // namespace cpu
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, CPU, m) {
  m.impl("cross_entropy_forward", &fused_train::cpu::cross_entropy_forward_cpu);
  m.impl("cross_entropy_forward_backward", &fused_train::cpu::cross_entropy_forward_backward_cpu);
  m.impl("cross_entropy_forward_backward_", &fused_train::cpu::cross_entropy_forward_backward_inplace_cpu);
  m.impl("cross_entropy_backward", &fused_train::cpu::cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &fused_train::cpu::cross_entropy_backward_inplace_cpu);
  m.impl("cross_entropy_grad_loss_is_one", &fused_train::cpu::cross_entropy_grad_loss_is_one_cpu);
  m.impl("cross_entropy_apply_grad_loss_", &fused_train::cpu::cross_entropy_apply_grad_loss_inplace_cpu);
  m.impl("cross_entropy_scale_grad_", &fused_train::cpu::cross_entropy_scale_grad_inplace_cpu);
}
