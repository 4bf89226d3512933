// Argument checking and layout preparation shared by the CPU and CUDA implementations of the optimizer
// ops. Everything here runs before any tensor is written, so a bad call leaves params, grads and state
// untouched.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

namespace fused_train {

// The tensors of one optimizer step after checking: every param has a grad of its dtype and shape, each
// used state list has one tensor per param in opmath (fp32 for bf16/fp16, else the param's dtype), and
// all share one device and one param dtype. States not used by the call are undefined tensors.
struct OptimizerTensors {
  std::vector<at::Tensor> params, grads;
  std::array<std::vector<at::Tensor>, 6> states;  // 8-bit state: (codes, absmax) per moment
  std::vector<at::Tensor> steps;  // empty when the optimizer keeps no step (SGD without stochastic rounding)
  // Empty, or one int64 one-element tensor per param on their device (bf16 params only): the update is rounded
  // into the param stochastically, with the bits of csrc/include/fused_train/stochastic_round.h.
  std::vector<at::Tensor> rounding_seeds;
  // Empty (all 0), or with the seeds one per param: the index, modulo 2^64, whose bits the param's element 0
  // draws (a shard's first element's index in its whole tensor).
  std::vector<uint64_t> rounding_offsets;
  // 8-bit calls: per param, the elements per row of its state's blocks (math::QuantRows), read from its absmax's
  // shape; empty for the other calls.
  std::vector<int64_t> quant_rows;
  // Non-dense or layout-mismatched entries run on contiguous copies; these pairs are copied back after.
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, working copy)
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  int64_t size() const { return static_cast<int64_t>(params.size()); }
};

struct StateList {
  const char* name;          // e.g. "exp_avgs"
  at::TensorList tensors;
  bool used;                 // false: the list must be empty (or is ignored if non-empty)
};

// Checks one call; throws c10::Error (Python: RuntimeError/ValueError/TypeError) naming the argument.
// writes_grad: the kernel writes grads (zeroing or unscaled write-back), so non-dense grads need copy-back.
// contiguous: the kernel walks params in their logical order (8-bit state's blocks), so any param or grad that
// is not contiguous runs on a contiguous copy.
OptimizerTensors check_optimizer_call(const char* op, at::TensorList params, at::TensorList grads,
                                      std::array<StateList, 3> states, at::TensorList steps, bool needs_steps,
                                      const std::optional<at::Tensor>& lr_tensor,
                                      const std::optional<at::Tensor>& grad_scale,
                                      const std::optional<at::Tensor>& found_inf, bool writes_grad,
                                      bool contiguous = false);

// The three optimizer ops' checks, one per schema, shared by the CPU and CUDA implementations.
// SGD keeps step counters only for stochastic rounding (its counter): state_steps is then one per param.
OptimizerTensors check_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                double momentum, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf, at::TensorList state_steps,
                                const std::optional<at::TensorList>& rounding_seeds,
                                at::OptionalIntArrayRef rounding_offsets = std::nullopt);
OptimizerTensors check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                 at::TensorList state_steps, bool amsgrad, bool zero_grad,
                                 const std::optional<at::Tensor>& lr_tensor,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf,
                                 const std::optional<at::TensorList>& rounding_seeds,
                                 at::OptionalIntArrayRef rounding_offsets = std::nullopt);
OptimizerTensors check_rmsprop_step(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                    at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                    at::TensorList state_steps, bool centered, double momentum, bool zero_grad,
                                    const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::TensorList>& rounding_seeds,
                                    at::OptionalIntArrayRef rounding_offsets = std::nullopt);

// 8-bit state: each moment as uint8 codes (contiguous, the param's shape) and a contiguous fp32 absmax whose shape
// says which elements each value covers (math::QuantRows): 1-D, one per kQuantBlock elements of the flat param;
// or 2-D (rows, blocks per row): the param as `rows` rows of numel / rows elements, each cut into blocks, the last
// one shorter. Every moment of a param has the same layout. Params float32, bfloat16 or float16. states holds the
// (codes, absmax) lists of the moments the call uses, in the op's order; quant_rows each param's row length.
// rounding_offsets: as check_adam_step's.
OptimizerTensors check_adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                                     at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                                     at::TensorList exp_avg_sq_absmax, at::TensorList state_steps, bool zero_grad,
                                     const std::optional<at::Tensor>& lr_tensor,
                                     const std::optional<at::Tensor>& grad_scale,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::TensorList>& rounding_seeds,
                                     at::OptionalIntArrayRef rounding_offsets = std::nullopt);
// SGD's momentum_buffer (momentum must be nonzero); state_steps only with rounding_seeds, as sgd_step_.
OptimizerTensors check_sgd8bit_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffer_codes,
                                    at::TensorList momentum_buffer_absmax, at::TensorList state_steps,
                                    double momentum, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                                    const std::optional<at::Tensor>& grad_scale,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::TensorList>& rounding_seeds,
                                    at::OptionalIntArrayRef rounding_offsets = std::nullopt);
// RMSprop's square_avg and momentum_buffer (momentum > 0; else empty lists).
OptimizerTensors check_rmsprop8bit_step(at::TensorList params, at::TensorList grads, at::TensorList square_avg_codes,
                                        at::TensorList square_avg_absmax, at::TensorList momentum_buffer_codes,
                                        at::TensorList momentum_buffer_absmax, at::TensorList state_steps,
                                        double momentum, bool zero_grad,
                                        const std::optional<at::Tensor>& lr_tensor,
                                        const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf,
                                        const std::optional<at::TensorList>& rounding_seeds,
                                        at::OptionalIntArrayRef rounding_offsets = std::nullopt);

// Copies the working copies back into the caller's tensors (only for non-dense entries).
void finish_optimizer_call(OptimizerTensors& t);

at::ScalarType opmath_type(at::ScalarType param_dtype);

}  // namespace fused_train
