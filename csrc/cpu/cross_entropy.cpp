// CPU implementations of the cross-entropy ops: check the call (cross_entropy_args.h), then run the rows in
// parallel with the kernels of the best instruction set (cpu/xent_kernels.h via kernel_table()). The
// forward writes per-row opmath losses and reduces them here, in double, in row order, so the result does
// not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/cpu_kernels.h"
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

// Every class index is in [0, C) or ignore_index; checked before anything is written.
template <class Index>
void check_targets_in_range(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const Index* t = target.const_data_ptr<Index>();
  const int64_t stride = target.stride(0);
  for (int64_t r = 0; r < target.size(0); ++r) {
    const int64_t v = t[r * stride];
    TORCH_CHECK_INDEX(v == ignore_index || (v >= 0 && v < classes), "cross_entropy: target ", v, " at position ", r,
                      " is out of bounds: expected 0 <= target < ", classes, " or target == ignore_index (",
                      ignore_index, ")");
  }
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

void run_rows(CrossEntropyRowsFn fn, const CrossEntropyLaunch& l) {
  if (l.rows * l.classes < 2 * kGrainElements || at::get_num_threads() == 1) {
    fn(l, 0, l.rows);
  } else {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / l.classes);
    at::parallel_for(0, l.rows, grain, [&](int64_t b, int64_t e) { fn(l, b, e); });
  }
}

template <class O>
double sum_in_row_order(const at::Tensor& t) {
  const O* p = t.const_data_ptr<O>();
  double s = 0.0;
  for (int64_t i = 0; i < t.numel(); ++i) s += static_cast<double>(p[i]);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double lse_square_scale) {
  const CrossEntropyCall c = check_cross_entropy_call("cross_entropy_forward", input, target, weight, reduction,
                                                      label_smoothing, lse_square_scale, false);
  if (!c.target_is_prob) {
    if (c.target.scalar_type() == at::kInt) {
      check_targets_in_range<int32_t>(c.target, c.classes, ignore_index);
    } else {
      check_targets_in_range<int64_t>(c.target, c.classes, ignore_index);
    }
  }
  const auto opts = input.options().dtype(c.opmath);
  at::Tensor lse = at::empty({c.rows, 2}, opts);
  at::Tensor row_loss = at::empty({c.rows}, opts);
  at::Tensor row_z_loss = at::empty({c.rows}, opts);
  at::Tensor row_weight = at::empty({c.rows}, opts);
  if (c.rows > 0) {
    CrossEntropyLaunch l = make_launch(c, ignore_index, label_smoothing, lse_square_scale);
    l.lse = lse.data_ptr();
    l.row_loss = row_loss.data_ptr();
    l.row_z_loss = row_z_loss.data_ptr();
    l.row_weight = row_weight.data_ptr();
    run_rows(kernel_table().cross_entropy_forward_rows, l);
  }
  const auto dtype = input.scalar_type();
  if (c.reduction == XentReduction::None) {
    return {row_loss.to(dtype), row_z_loss.to(dtype), lse, at::ones({}, opts)};
  }
  const bool is_double = c.opmath == at::kDouble;
  const auto sum = [&](const at::Tensor& t) { return is_double ? sum_in_row_order<double>(t) : sum_in_row_order<float>(t); };
  double denominator = 1.0;
  if (c.reduction == XentReduction::Mean) {
    // torch: weighted mean over the rows that are not ignored; probability targets: mean over rows.
    denominator = c.target_is_prob ? static_cast<double>(c.rows) : sum(row_weight);
  }
  // 0/0 = NaN when every target is ignored (or there are no rows), as torch.
  at::Tensor loss = at::scalar_tensor(sum(row_loss) / denominator, input.options());
  at::Tensor z_loss = at::scalar_tensor(sum(row_z_loss) / denominator, input.options());
  return {loss, z_loss, lse, at::scalar_tensor(denominator, opts)};
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

}  // namespace
}  // namespace cpu
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, CPU, m) {
  m.impl("cross_entropy_forward", &fused_train::cpu::cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &fused_train::cpu::cross_entropy_backward_cpu);
  m.impl("cross_entropy_backward_", &fused_train::cpu::cross_entropy_backward_inplace_cpu);
}
