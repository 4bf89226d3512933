// Argument checking and layout preparation shared by the CPU and CUDA implementations of the
// cross-entropy ops. Everything here runs before any output is written or any kernel is launched.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fused_train {

enum class XentReduction : int64_t { None = 0, Mean = 1, Sum = 2 };  // torch's at::Reduction values

// One checked call, on the logits as rows of classes: a 2-D view (rows, classes) with unit class stride (any row
// stride), or (batch, classes, positions) contiguous, the (N, C, d1, …, dK) layout of a segmentation loss, whose
// rows are its batch × positions, each row's classes at stride positions (row r = position r % positions of
// batch entry r / positions). The gradient has the logits' layout; row outputs (row_lse, a per-row loss) are
// in row order either way.
struct CrossEntropyCall {
  at::Tensor input;          // (rows, classes), or (batch, classes, positions) contiguous
  at::Tensor target;         // class indices (rows,) int64/int32, or probabilities of input's layout (2-D: unit
                             // class stride; 3-D: contiguous)
  at::Tensor weight;         // opmath (classes,) contiguous; undefined when unweighted and no linear term needs it
  at::Tensor class_weight_sum;  // opmath 0-dim Σ_c w_c when label smoothing is weighted; else undefined
  bool target_is_prob = false;
  int64_t rows = 0, classes = 0;
  bool spatial = false;      // 3-D input (batch, classes, positions)
  int64_t positions = 0;     // 3-D input: its positions (dim 2); 0 for 2-D input
  XentReduction reduction = XentReduction::Mean;
  at::ScalarType opmath = at::kFloat;
};

// The input dtypes the loss kernels take: float32, float64, bfloat16, float16 (TypeError naming op otherwise).
void check_cross_entropy_dtype(const char* op, at::ScalarType dtype);

// The loss options every cross-entropy op takes: reduction 0/1/2, label_smoothing in [0, 1], a finite
// lse_square_scale (ValueError naming the option otherwise).
void check_cross_entropy_options(const char* op, int64_t reduction, double label_smoothing, double lse_square_scale);

// A class weight: floating point, shape (classes,), on device.
void check_class_weight(const char* op, const at::Tensor& weight, int64_t classes, const at::Device& device);

// Checks one call and prepares its tensors; throws c10::Error (Python: ValueError/TypeError/RuntimeError)
// naming the argument and the expectation. writes_input: the call overwrites the logits with the gradient.
CrossEntropyCall check_cross_entropy_call(const char* op, const at::Tensor& input, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight, int64_t reduction,
                                          double label_smoothing, double lse_square_scale, bool writes_input);

// Checks the extra inputs of the backward: the forward's row_lse (rows, 2) and denominator (0-dim), opmath,
// and grad_loss ((rows,) for reduction='none', else one element) of any floating dtype; returns grad_loss
// in opmath (a copy only when it arrives in another dtype).
at::Tensor check_cross_entropy_backward(const char* op, const CrossEntropyCall& call, const at::Tensor& grad_loss,
                                        const at::Tensor& lse, const at::Tensor& denominator);

// Checks a gradient buffer the backward writes into: the logits' shape, dtype and device, unit class stride
// (3-D: contiguous), overlapping neither itself nor the logits.
void check_cross_entropy_grad_input(const char* op, const CrossEntropyCall& call, const at::Tensor& grad_input);

// Checks the arguments of cross_entropy_scale_grad_: a gradient (rows, classes) or (batch, classes, positions)
// and the loss's gradient, one element (reduced loss) or one per row (reduction='none'), on the same device.
// Returns grad_loss in grad_input's opmath, shaped to multiply it: 0-dim, (rows, 1) or (batch, 1, positions).
at::Tensor check_cross_entropy_scale_grad(const char* op, const at::Tensor& grad_input, const at::Tensor& grad_loss);

// A scale with one element or one per row, shaped to multiply a gradient of grad_input's layout (as above).
at::Tensor row_scale_for(const at::Tensor& grad_input, const at::Tensor& scale);

// A mean computed with ATen's kernels, total / denominator (0-dim tensors, no host synchronisation): NaN over a
// denominator of 0 (every row ignored, or every kept target of class weight 0), as torch's (its NLL part is 0/0
// there), also where label smoothing or the z-loss would make it ±inf.
at::Tensor mean_over(const at::Tensor& total, const at::Tensor& denominator);

}  // namespace fused_train
