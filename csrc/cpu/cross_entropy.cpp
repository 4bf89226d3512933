// CPU implementations of the cross-entropy ops: check the call (cross_entropy_args.h), then run the rows in
// parallel with the kernels of the best instruction set (cpu/xent_kernels.h via kernel_table()).
//
// The forward adds the row losses in double, in row order within blocks of rows whose size depends on the
// shape alone, then the blocks' sums in block order: the result is the same, bit for bit, for any thread
// count. The mean's denominator comes from the targets before the logits are read, so the forward can also
// write the gradient (cross_entropy_forward_backward): each row is then read once from memory, and a
// second time from cache to write its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Checks that every class index is in [0, C) or ignore_index (before anything is written) and returns the
// weighted mean's denominator: Σ w_t over the rows that are not ignored, in row order.
template <class Index, class O>
double check_targets_and_weigh(const CrossEntropyCall& c, int64_t ignore_index) {
  const Index* t = c.target.const_data_ptr<Index>();
  const O* weight = c.weight.defined() ? c.weight.const_data_ptr<O>() : nullptr;
  const int64_t stride = c.target.stride(0);
  double total = 0.0;
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t v = t[r * stride];
    if (v == ignore_index) continue;
    TORCH_CHECK_INDEX(v >= 0 && v < c.classes, "cross_entropy: target ", v, " at position ", r,
                      " is out of bounds: expected 0 <= target < ", c.classes, " or target == ignore_index (",
                      ignore_index, ")");
    total += weight != nullptr ? static_cast<double>(weight[v]) : 1.0;
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
// grad_loss = 1 (rows of grad_row_stride elements), or nullptr for none.
ForwardOutputs run_forward(const CrossEntropyCall& c, int64_t ignore_index, double label_smoothing,
                           double lse_square_scale, void* grad, int64_t grad_row_stride) {
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
  const at::TensorOptions options = c.input.options();
  const at::TensorOptions opmath_options = options.dtype(c.opmath);
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
    l.grad = grad;
    l.grad_row_stride = grad_row_stride;
    l.denominator = denominator_opmath.const_data_ptr();
    sums = run_forward_rows(l);
  }
  if (!per_row) {
    loss = scalar_like(sums.loss / denominator, options);
    z_loss = scalar_like(sums.z_loss / denominator, options);
  }
  return {loss, z_loss, lse, denominator_opmath};
}

ForwardOutputs cross_entropy_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  return run_forward(c, ignore_index, label_smoothing, lse_square_scale, nullptr, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_backward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, false);
  // The memory of the last large gradient when it is free again (cpu/gradient_cache.h).
  at::Tensor grad = reusable_gradient(c.rows, c.classes, input.options());
  auto [loss, z_loss, lse, denominator] =
      run_forward(c, ignore_index, label_smoothing, lse_square_scale, grad.data_ptr(), c.classes);
  return {loss, z_loss, lse, denominator, grad};
}

ForwardOutputs cross_entropy_forward_backward_inplace_cpu(const at::Tensor& input, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t reduction, int64_t ignore_index,
                                                          double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward_backward_", input, target, weight,
                                                      reduction, label_smoothing, lse_square_scale, true);
  // Each row is summarised first, then read and written in place element by element; its true-class
  // logit is read before the row is overwritten.
  return run_forward(c, ignore_index, label_smoothing, lse_square_scale, input.data_ptr(), input.stride(0));
}

void run_backward(const CrossEntropyCall& c, const at::Tensor& grad_loss, const at::Tensor& lse,
                  const at::Tensor& denominator, int64_t ignore_index, double label_smoothing,
                  double lse_square_scale, void* grad, int64_t grad_row_stride) {
  const at::Tensor g = check_cross_entropy_backward("cross_entropy_backward", c, grad_loss, lse, denominator);
  if (c.rows == 0) return;
  const at::Tensor denominator_opmath = denominator.reshape({});
  CrossEntropyLaunch l = make_launch(c, ignore_index, label_smoothing, lse_square_scale);
  l.lse_in = lse.const_data_ptr();
  l.grad = grad;
  l.grad_row_stride = grad_row_stride;
  l.grad_loss = g.const_data_ptr();
  l.grad_loss_stride = c.reduction == XentReduction::None ? g.stride(0) : 0;
  l.denominator = denominator_opmath.const_data_ptr();
  run_rows(kernel_table().cross_entropy_backward_rows, l);
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      const at::Tensor& denominator, int64_t reduction, int64_t ignore_index,
                                      double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_backward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  at::Tensor grad = at::empty({c.rows, c.classes}, input.options());
  run_backward(c, grad_loss, lse, denominator, ignore_index, label_smoothing, lse_square_scale, grad.data_ptr(),
               c.classes);
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
  run_backward(c, grad_loss, lse, denominator, ignore_index, label_smoothing, lse_square_scale,
               input.data_ptr(), input.stride(0));
}

// Scales the forward's gradient (written for grad_loss = 1) by grad_loss; nothing to do, and nothing read
// but grad_loss, when it is 1, as it is for loss.backward().
void cross_entropy_scale_grad_inplace_cpu(const at::Tensor& grad_input, const at::Tensor& grad_loss) {
  const at::Tensor scale = check_cross_entropy_scale_grad("cross_entropy_scale_grad_", grad_input, grad_loss);
  bool all_ones = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "cross_entropy_scale_grad_", [&] {
    const scalar_t* g = scale.const_data_ptr<scalar_t>();
    const int64_t stride = scale.dim() == 0 ? 0 : scale.stride(0);
    for (int64_t i = 0; i < scale.numel() && all_ones; ++i) all_ones = static_cast<double>(g[i * stride]) == 1.0;
  });
  if (!all_ones) grad_input.mul_(scale.dim() == 0 ? scale : scale.unsqueeze(1));
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
  m.impl("cross_entropy_scale_grad_", &fused_train::cpu::cross_entropy_scale_grad_inplace_cpu);
}
