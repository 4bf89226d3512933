#include "cross_entropy_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

#include "optimizer_args.h"

namespace fused_train {

void check_cross_entropy_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   op, ": input must be float32, float64, bfloat16 or float16, got ", dtype);
}

void check_cross_entropy_options(const char* op, int64_t reduction, double label_smoothing, double lse_square_scale) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(lse_square_scale), op, ": lse_square_scale must be finite, got ",
                    lse_square_scale);
}

void check_class_weight(const char* op, const at::Tensor& weight, int64_t classes, const at::Device& device) {
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), op, ": weight must be floating point, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == classes, op, ": weight must have one entry per class (",
                    classes, "), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == device, op, ": weight must be on ", device, " like input, got ",
                    weight.device());
}

CrossEntropyCall check_cross_entropy_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, int64_t reduction,
                                          double label_smoothing, double lse_square_scale, bool writes_input) {
  CrossEntropyCall c;
  const auto dtype = input.scalar_type();
  check_cross_entropy_dtype(op, dtype);
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, op,
                    ": input must be 2-D (rows, classes) or 3-D (batch, classes, positions), got shape ",
                    input.sizes());
  const bool spatial = c.spatial = input.dim() == 3;
  c.classes = input.size(1);
  c.positions = spatial ? input.size(2) : 0;
  c.rows = spatial ? input.size(0) * c.positions : input.size(0);
  TORCH_CHECK_VALUE(c.classes > 0, op, ": input must have at least one class, got shape ", input.sizes());
  check_cross_entropy_options(op, reduction, label_smoothing, lse_square_scale);
  c.reduction = static_cast<XentReduction>(reduction);
  c.opmath = opmath_type(dtype);

  // The kernels read a row with vector loads, which needs unit class stride (2-D; any row stride is fine) or
  // the dense (batch, classes, positions) layout (3-D); other views are copied once, the cost of the read it
  // enables.
  const bool as_is = spatial ? input.is_contiguous() : (input.stride(1) == 1 || c.classes == 1);
  if (as_is) {
    c.input = input;
  } else {
    TORCH_CHECK(!writes_input, op, ": the in-place backward needs input with ",
                spatial ? "a contiguous layout" : "unit class stride", ", got strides ", input.strides());
    c.input = input.contiguous();
  }
  if (writes_input) {
    TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
                ": the in-place backward needs input without overlapping rows (e.g. not expanded)");
  }

  c.target_is_prob = at::isFloatingType(target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == input.device(), op, ": target must be on ", input.device(), " like input, got ",
                    target.device());
  if (c.target_is_prob) {
    TORCH_CHECK_TYPE(target.scalar_type() == dtype, op, ": probability target must have input's dtype ", dtype,
                     ", got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), op, ": probability target must have input's shape ",
                      input.sizes(), ", got ", target.sizes());
    if (spatial) {
      c.target = target.contiguous();
    } else {
      c.target = (target.stride(1) == 1 || c.classes == 1) ? target : target.contiguous();
    }
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                     ": class-index target must be int64 or int32, got ", target.scalar_type());
    if (spatial) {
      TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == input.size(0) && target.size(1) == c.positions, op,
                        ": class-index target must have shape (batch, positions) = (", input.size(0), ", ",
                        c.positions, ") for input of shape ", input.sizes(), ", got ", target.sizes());
      c.target = target.reshape({c.rows});  // one entry per row, in row order (a view unless strided oddly)
    } else {
      TORCH_CHECK_VALUE(target.dim() == 1, op, ": class-index target must be 1-D (rows,), got shape ",
                        target.sizes());
      TORCH_CHECK_VALUE(target.size(0) == c.rows, op, ": target has ", target.size(0), " rows but input has ",
                        c.rows);
      c.target = target;
    }
  }

  const bool linear = c.target_is_prob || label_smoothing > 0.0;
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    check_class_weight(op, w, c.classes, input.device());
    c.weight = w.to(c.opmath).contiguous();
    if (linear && !c.target_is_prob) c.class_weight_sum = c.weight.sum();
  } else if (linear) {
    // The linear-term kernels read a weight per class; ones keep them free of an unweighted variant.
    c.weight = at::ones({c.classes}, input.options().dtype(c.opmath));
  }
  return c;
}

at::Tensor check_cross_entropy_backward(const char* op, const CrossEntropyCall& call, const at::Tensor& grad_loss,
                                        const at::Tensor& lse, const at::Tensor& denominator) {
  const auto& dev = call.input.device();
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == call.rows && lse.size(1) == 2 &&
                        lse.scalar_type() == call.opmath && lse.device() == dev && lse.is_contiguous(),
                    op, ": row_lse must be the forward's contiguous (", call.rows, ", 2) ", call.opmath,
                    " tensor on ", dev, ", got shape ", lse.sizes(), " ", lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK_VALUE(denominator.numel() == 1 && denominator.scalar_type() == call.opmath &&
                        denominator.device() == dev,
                    op, ": denominator must be the forward's one-element ", call.opmath, " tensor on ", dev);
  if (call.reduction == XentReduction::None) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == call.rows, op,
                      ": grad_loss must have shape (", call.rows, ",) for reduction='none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must hold one element for a reduced loss, got shape ",
                      grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(grad_loss.device() == dev, op, ": grad_loss must be on ", dev, ", got ", grad_loss.device());
  // Opmath, not the logits' dtype: an fp32 grad_loss of 2^16 (GradScaler's default scale, under autocast)
  // is inf in fp16.
  return grad_loss.scalar_type() == call.opmath ? grad_loss : grad_loss.to(call.opmath);
}

void check_cross_entropy_grad_input(const char* op, const CrossEntropyCall& call, const at::Tensor& grad_input) {
  const bool layout = call.spatial ? grad_input.is_contiguous()
                                         : grad_input.dim() == 2 && (grad_input.stride(1) == 1 || call.classes == 1);
  TORCH_CHECK_VALUE(grad_input.sizes() == call.input.sizes() && grad_input.scalar_type() == call.input.scalar_type() &&
                        grad_input.device() == call.input.device() && layout,
                    op, ": grad_input must be a (", call.input.size(0), ", ", call.classes,
                    call.spatial ? ", " + std::to_string(call.positions) : std::string(), ") ",
                    call.input.scalar_type(), " tensor on ", call.input.device(),
                    call.spatial ? ", contiguous" : " with unit class stride",
                    ", got shape ", grad_input.sizes(), " ", grad_input.scalar_type(), " on ", grad_input.device(),
                    " with strides ", grad_input.strides());
  // TooHard (either side not dense, e.g. logits[:, :V] of a padded vocabulary) is decided by the storages: the
  // gradient is a buffer of its own unless it was made from the logits' memory.
  const at::MemOverlapStatus overlap = at::get_overlap_status(grad_input, call.input);
  const bool overlaps = overlap == at::MemOverlapStatus::Full || overlap == at::MemOverlapStatus::Partial ||
                        (overlap == at::MemOverlapStatus::TooHard &&
                         grad_input.storage().is_alias_of(call.input.storage()));
  TORCH_CHECK(at::has_internal_overlap(grad_input) != at::MemOverlap::Yes && !overlaps, op,
              ": grad_input must not overlap itself or input (the logits are read after rows are written)");
}

at::Tensor check_cross_entropy_scale_grad(const char* op, const at::Tensor& grad_input, const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(grad_input.dim() == 2 || grad_input.dim() == 3, op,
                    ": grad_input must be 2-D (rows, classes) or 3-D (batch, classes, positions), got shape ",
                    grad_input.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == grad_input.device(), op, ": grad_loss must be on ", grad_input.device(),
                    ", got ", grad_loss.device());
  const int64_t rows = grad_input.dim() == 3 ? grad_input.size(0) * grad_input.size(2) : grad_input.size(0);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 || (grad_loss.dim() == 1 && grad_loss.size(0) == rows), op,
                    ": grad_loss must hold one element or one per row (", rows, "), got shape ", grad_loss.sizes());
  // Opmath: GradScaler's 2^16 is inf in fp16.
  const at::ScalarType opmath = opmath_type(grad_input.scalar_type());
  const at::Tensor scale = grad_loss.scalar_type() == opmath ? grad_loss : grad_loss.to(opmath);
  return row_scale_for(grad_input, scale);
}

at::Tensor row_scale_for(const at::Tensor& grad_input, const at::Tensor& scale) {
  if (scale.numel() == 1) return scale.reshape({});
  if (grad_input.dim() == 3) return scale.reshape({grad_input.size(0), 1, grad_input.size(2)});
  return scale.reshape({-1, 1});
}

at::Tensor mean_over(const at::Tensor& total, const at::Tensor& denominator) {
  return at::where(denominator != 0, total / denominator, std::numeric_limits<double>::quiet_NaN());
}

}  // namespace fused_train
