// CUDA implementations of the optimizer ops: the same checks as the CPU (optimizer_args.h), then one
// multi_tensor_apply per call (cuda/multi_tensor_apply.cuh) with the functors of
// cuda/optimizer_functors.cuh, whose per-element math is optim_math.h.
//
// Nothing here waits for the GPU: lr, grad_scale and found_inf tensors on the device are read inside the
// kernel, the step counters advance inside it too, and only CPU scalar tensors are read on the host. The
// loss's bad-target step guard (cuda/bad_target.cuh) is read in the kernel as well: set, the step is skipped.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <type_traits>
#include <optional>
#include <vector>

#include "cuda/bad_target.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/optimizer_functors.cuh"
#include "optimizer_args.h"

namespace fused_train {
namespace cuda {
namespace {

// keep_alive holds converted copies until the launch is queued (the caching allocator then keeps their
// memory for this stream's later work only, so freeing them right after is safe).
ScalarArg scalar_arg(const std::optional<at::Tensor>& t, double absent, std::vector<at::Tensor>& keep_alive) {
  if (!t.has_value()) return {nullptr, absent, false};
  if (t->is_cpu()) return {nullptr, t->item<double>(), false};  // host memory: no synchronisation
  at::Tensor s = *t;
  if (s.scalar_type() != at::kFloat && s.scalar_type() != at::kDouble) {
    s = s.to(at::kFloat);  // exact for bf16/fp16; queued on the stream, no wait
    keep_alive.push_back(s);
  }
  return {s.data_ptr(), 0.0, s.scalar_type() == at::kDouble};
}

// Fills the scalars every functor shares. Returns false when the call has nothing to do: found_inf is a
// CPU tensor that is set and the grads need not be zeroed (with a device found_inf the kernel decides).
bool prepare_common(CommonScalars& c, const at::Device& device, double lr, const std::optional<at::Tensor>& lr_tensor,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    bool zero_grad, std::vector<at::Tensor>& keep_alive) {
  c.bad_target_guard = bad_target_step_guard(device.index());
  c.found_inf = scalar_arg(found_inf, 0.0, keep_alive);
  if (c.found_inf.ptr == nullptr && c.found_inf.value != 0.0 && !zero_grad) return false;
  c.lr = scalar_arg(lr_tensor, lr, keep_alive);
  c.grad_scale = scalar_arg(grad_scale, 1.0, keep_alive);
  c.grads = {zero_grad, grad_scale.has_value()};
  return true;
}

// The kernel advances fp32 step counters on the params' device in place. A step of another dtype runs on
// an fp32 copy that finish_optimizer_call copies back (device to device, no wait); a step on the CPU is
// refused: advancing it only when a device found_inf is clear would need the host to wait.
void prepare_steps(const char* op, OptimizerTensors& t) {
  for (size_t i = 0; i < t.steps.size(); ++i) {
    const at::Tensor step = t.steps[i];
    TORCH_CHECK(step.device() == t.device, op, ": state_steps[", i, "] is on ", step.device(),
                " but the params are on ", t.device,
                "; on CUDA the step counters advance inside the kernel, so they must live on the params' device "
                "(as torch's fused and capturable optimizers keep them)");
    if (step.scalar_type() != at::kFloat) {
      at::Tensor working = step.to(at::kFloat);
      t.copy_back.emplace_back(step, working);
      t.steps[i] = working;
    }
  }
}

// The launch's lists: param, grad, the used states in order, then the rounding seeds if the call has them.
template <int Depth>
std::array<at::TensorList, Depth> lists_of(const OptimizerTensors& t, const std::array<bool, 3>& used) {
  std::array<at::TensorList, Depth> lists;
  lists[0] = t.params;
  lists[1] = t.grads;
  int k = 2;
  for (int s = 0; s < 3; ++s) {
    if (!used[s]) continue;
    TORCH_INTERNAL_ASSERT(k < Depth);
    lists[k++] = t.states[s];
  }
  if (!t.rounding_seeds.empty()) {
    TORCH_INTERNAL_ASSERT(k < Depth);
    lists[k++] = t.rounding_seeds;
  }
  TORCH_INTERNAL_ASSERT(k == Depth);
  return lists;
}

// Where the seeds are among a launch's Depth lists: the last, when the call has them.
int seed_list_of(const OptimizerTensors& t, int depth) { return t.rounding_seeds.empty() ? -1 : depth - 1; }

// Runs an fp32-state functor, with the call's rounding offsets as the launches' index bases when it has them (bf16
// params with seeds only: the check refuses offsets without seeds, and seeds for other dtypes).
template <class T, int Depth, class Functor>
void launch_with_offsets(const OptimizerTensors& t, const std::array<at::TensorList, Depth>& lists,
                         const Functor& functor) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (!t.rounding_offsets.empty()) return multi_tensor_apply<Depth>(lists, t.steps, t.rounding_offsets, functor);
  }
  TORCH_INTERNAL_ASSERT(t.rounding_offsets.empty());
  multi_tensor_apply<Depth>(lists, t.steps, functor);
}

template <class T, int Depth, bool kSteps>
void launch_sgd(OptimizerTensors& t, const math::SgdHyper<opmath_t<T>>& hyper, const CommonScalars& common) {
  const SgdFunctor<T, Depth, kSteps> functor{hyper, common, seed_list_of(t, Depth)};
  launch_with_offsets<T, Depth>(t, lists_of<Depth>(t, {hyper.has_momentum, false, false}), functor);
}

template <class T, int Depth>
void launch_adam(OptimizerTensors& t, const math::AdamHyper<opmath_t<T>>& hyper, double beta1, double beta2,
                 double weight_decay, const CommonScalars& common) {
  const AdamFunctor<T, Depth> functor{hyper, beta1, beta2, weight_decay, common, seed_list_of(t, Depth)};
  launch_with_offsets<T, Depth>(t, lists_of<Depth>(t, {true, true, hyper.amsgrad}), functor);
}

template <class T, int Depth>
void launch_rmsprop(OptimizerTensors& t, const math::RmspropHyper<opmath_t<T>>& hyper,
                    const CommonScalars& common) {
  const RmspropFunctor<T, Depth> functor{hyper, common, seed_list_of(t, Depth)};
  launch_with_offsets<T, Depth>(t, lists_of<Depth>(t, {true, hyper.centered, hyper.has_momentum}), functor);
}

// An 8-bit op's launch: lists param, grad, the op's K moments' codes, their absmax (t.states holds (codes, absmax)
// per moment), then the rounding seeds when the call has them (bf16 params only: the check refuses others).
template <class T, class Op, bool kSteps = true>
void launch_8bit(OptimizerTensors& t, const Op& op, const CommonScalars& common) {
  constexpr int K = Op::kMoments;
  auto launch = [&](auto depth) {
    constexpr int Depth = decltype(depth)::value;
    std::array<at::TensorList, Depth> lists;
    lists[0] = t.params;
    lists[1] = t.grads;
    for (int k = 0; k < K; ++k) {
      lists[2 + k] = t.states[2 * k];
      lists[2 + K + k] = t.states[2 * k + 1];
    }
    constexpr bool kSeeded = Depth == 3 + 2 * K;
    if constexpr (kSeeded) lists[Depth - 1] = t.rounding_seeds;
    const Blockwise8bitFunctor<T, Depth, Op, kSteps> functor{op, common, kSeeded ? Depth - 1 : -1};
    if constexpr (kSeeded) {  // the call's rounding offsets (FSDP2 shards'), as in launch_with_offsets
      if (!t.rounding_offsets.empty()) {
        return multi_tensor_apply_8bit<Depth, true>(lists, t.steps, t.rounding_offsets, t.quant_rows, functor);
      }
    }
    multi_tensor_apply_8bit<Depth, false>(lists, t.steps, {}, t.quant_rows, functor);
  };
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (!t.rounding_seeds.empty()) return launch(std::integral_constant<int, 3 + 2 * K>{});
  }
  TORCH_INTERNAL_ASSERT(t.rounding_seeds.empty() && t.rounding_offsets.empty());
  launch(std::integral_constant<int, 2 + 2 * K>{});
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList state_steps, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::TensorList>& rounding_seeds,
                   at::OptionalIntArrayRef rounding_offsets) {
  const bool has_momentum = momentum != 0.0;
  OptimizerTensors t = check_sgd_step(params, grads, momentum_buffers, momentum, zero_grad, lr_tensor, grad_scale,
                                      found_inf, state_steps, rounding_seeds, rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("sgd_step_", t.device.index());
  prepare_steps("sgd_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  const bool has_steps = !t.steps.empty();
  const bool has_seeds = !t.rounding_seeds.empty();  // (bf16 only: the check refuses seeds for other dtypes)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "sgd_step_cuda", [&] {
    using O = opmath_t<scalar_t>;
    // lr-dependent fields are filled in per block (lr may be a device tensor).
    const auto hyper = math::make_sgd_hyper<O>(0.0, momentum, dampening, weight_decay, nesterov, maximize, is_first_step);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (has_seeds) {
        if (has_momentum) {
          launch_sgd<scalar_t, 4, true>(t, hyper, common);
        } else {
          launch_sgd<scalar_t, 3, true>(t, hyper, common);
        }
        return;
      }
    }
    if (has_steps) {  // steps without rounding: advanced all the same
      if (has_momentum) {
        launch_sgd<scalar_t, 3, true>(t, hyper, common);
      } else {
        launch_sgd<scalar_t, 2, true>(t, hyper, common);
      }
    } else if (has_momentum) {
      launch_sgd<scalar_t, 3, false>(t, hyper, common);
    } else {
      launch_sgd<scalar_t, 2, false>(t, hyper, common);
    }
  });
  finish_optimizer_call(t);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay, bool zero_grad,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& rounding_seeds,
                    at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                                       zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds, rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("adam_step_", t.device.index());
  prepare_steps("adam_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "adam_step_cuda", [&] {
    using O = opmath_t<scalar_t>;
    const auto hyper =
        math::make_adam_hyper<O>(0.0, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (!t.rounding_seeds.empty()) {
        if (amsgrad) {
          launch_adam<scalar_t, 6>(t, hyper, beta1, beta2, weight_decay, common);
        } else {
          launch_adam<scalar_t, 5>(t, hyper, beta1, beta2, weight_decay, common);
        }
        return;
      }
    }
    if (amsgrad) {
      launch_adam<scalar_t, 5>(t, hyper, beta1, beta2, weight_decay, common);
    } else {
      launch_adam<scalar_t, 4>(t, hyper, beta1, beta2, weight_decay, common);
    }
  });
  finish_optimizer_call(t);
}

void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                       double lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                       bool maximize, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::TensorList>& rounding_seeds,
                       at::OptionalIntArrayRef rounding_offsets) {
  const bool has_momentum = momentum > 0.0;
  OptimizerTensors t = check_rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                                          centered, momentum, zero_grad, lr_tensor, grad_scale, found_inf,
                                          rounding_seeds, rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("rmsprop_step_", t.device.index());
  prepare_steps("rmsprop_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "rmsprop_step_cuda", [&] {
    using O = opmath_t<scalar_t>;
    const auto hyper = math::make_rmsprop_hyper<O>(0.0, alpha, eps, weight_decay, momentum, centered, maximize);
    int depth = 2 + 1 + int{centered} + int{has_momentum};
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) depth += t.rounding_seeds.empty() ? 0 : 1;
    switch (depth) {
      case 3: launch_rmsprop<scalar_t, 3>(t, hyper, common); break;
      case 4: launch_rmsprop<scalar_t, 4>(t, hyper, common); break;
      case 5: launch_rmsprop<scalar_t, 5>(t, hyper, common); break;
      default: launch_rmsprop<scalar_t, 6>(t, hyper, common); break;
    }
  });
  finish_optimizer_call(t);
}

void adam8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                        at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_codes,
                        at::TensorList exp_avg_sq_absmax, at::TensorList state_steps, double lr, double beta1,
                        double beta2, double weight_decay, double eps, bool maximize, bool decoupled_weight_decay,
                        bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::TensorList>& rounding_seeds,
                        at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_adam8bit_step(params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                                           exp_avg_sq_absmax, state_steps, zero_grad, lr_tensor, grad_scale,
                                           found_inf, rounding_seeds, rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("adam8bit_step_", t.device.index());
  prepare_steps("adam8bit_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "adam8bit_step_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // (the check refuses float64)
      Adam8bitElementOp op{};
      op.h = math::make_adam_hyper<float>(0.0, beta1, beta2, weight_decay, eps, false, maximize,
                                          decoupled_weight_decay);
      op.beta1 = beta1;
      op.beta2 = beta2;
      op.weight_decay = weight_decay;
      launch_8bit<scalar_t>(t, op, common);
    }
  });
  finish_optimizer_call(t);
}

void sgd8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffer_codes,
                       at::TensorList momentum_buffer_absmax, at::TensorList state_steps, double lr, double momentum,
                       double dampening, double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                       bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::TensorList>& rounding_seeds,
                       at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_sgd8bit_step(params, grads, momentum_buffer_codes, momentum_buffer_absmax, state_steps,
                                          momentum, zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds,
                                          rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("sgd8bit_step_", t.device.index());
  prepare_steps("sgd8bit_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "sgd8bit_step_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // (the check refuses float64)
      const Sgd8bitElementOp op{
          math::make_sgd_hyper<float>(0.0, momentum, dampening, weight_decay, nesterov, maximize, is_first_step)};
      if (t.steps.empty()) {
        launch_8bit<scalar_t, Sgd8bitElementOp, false>(t, op, common);
      } else {  // the stochastic rounding's counters (or steps kept without it: advanced all the same)
        launch_8bit<scalar_t, Sgd8bitElementOp, true>(t, op, common);
      }
    }
  });
  finish_optimizer_call(t);
}

void rmsprop8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avg_codes,
                           at::TensorList square_avg_absmax, at::TensorList momentum_buffer_codes,
                           at::TensorList momentum_buffer_absmax, at::TensorList state_steps, double lr, double alpha,
                           double eps, double weight_decay, double momentum, bool maximize, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                           const std::optional<at::TensorList>& rounding_seeds,
                           at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_rmsprop8bit_step(params, grads, square_avg_codes, square_avg_absmax, momentum_buffer_codes,
                                              momentum_buffer_absmax, state_steps, momentum, zero_grad, lr_tensor,
                                              grad_scale, found_inf, rounding_seeds, rounding_offsets);
  if (t.size() == 0) return;
  c10::cuda::OptionalCUDAGuard guard(t.device);
  raise_if_bad_target_seen("rmsprop8bit_step_", t.device.index());
  prepare_steps("rmsprop8bit_step_", t);
  std::vector<at::Tensor> keep_alive;
  CommonScalars common{};
  if (!prepare_common(common, t.device, lr, lr_tensor, grad_scale, found_inf, zero_grad, keep_alive)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "rmsprop8bit_step_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // (the check refuses float64)
      const auto hyper = math::make_rmsprop_hyper<float>(0.0, alpha, eps, weight_decay, momentum, false, maximize);
      auto launch = [&](auto op) {
        op.h = hyper;
        launch_8bit<scalar_t>(t, op, common);
      };
      if (hyper.has_momentum) {
        launch(Rmsprop8bitElementOp<true>{});
      } else {
        launch(Rmsprop8bitElementOp<false>{});
      }
    }
  });
  finish_optimizer_call(t);
}

}  // namespace
}  // namespace cuda
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, CUDA, m) {
  m.impl("adam8bit_step_", &fused_train::cuda::adam8bit_step_cuda);
  m.impl("sgd_step_", &fused_train::cuda::sgd_step_cuda);
  m.impl("adam_step_", &fused_train::cuda::adam_step_cuda);
  m.impl("rmsprop_step_", &fused_train::cuda::rmsprop_step_cuda);
  m.impl("sgd8bit_step_", &fused_train::cuda::sgd8bit_step_cuda);
  m.impl("rmsprop8bit_step_", &fused_train::cuda::rmsprop8bit_step_cuda);
}
