// CPU implementations of the optimizer ops: check the call, advance the step counters, cut every
// param into chunks and run all chunks of the call in one parallel region with the kernels of the best
// instruction set (cpu/optimizer_kernels.h via kernel_table()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_kernels.h"
#include "fused_train/optim_math.h"
#include "fused_train/quant_math.h"
#include "fused_train/stochastic_round.h"
#include "optimizer_args.h"

namespace fused_train {
namespace cpu {
namespace {

// Elements per chunk: large enough to amortise the per-chunk setup, small enough to balance threads.
constexpr int64_t kChunk = 32768;
// Below this many elements in total, one thread is faster than waking the pool.
constexpr int64_t kSerialBelow = 65536;

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Half;
    default: TORCH_CHECK(false, "fused_train: unsupported dtype ", t);
  }
}

double read_scalar(const at::Tensor& t) { return t.item<double>(); }

// Fills the launch's pointers, chunks the work and runs it. steps_and_scalars sets the per-slot
// scalars (Adam's bias corrections) after the step counters have advanced.
template <class PerSlot>
void run(OptimizerLaunch launch, OptimizerTensors& t, PerSlot per_slot) {
  const int64_t n = t.size();
  std::vector<ParamSlot> slots(n);
  std::vector<ChunkRange> chunks;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    ParamSlot& s = slots[i];
    s.param = t.params[i].data_ptr();
    s.grad = t.grads[i].data_ptr();
    for (int k = 0; k < 6; ++k) {
      const auto& list = t.states[k];
      s.state[k] = i < static_cast<int64_t>(list.size()) && list[i].defined() ? list[i].data_ptr() : nullptr;
    }
    s.numel = t.params[i].numel();
    s.quant_row = t.quant_rows.empty() ? 0 : t.quant_rows[i];
    per_slot(i, s);
    // (8-bit state: a chunk updates the blocks that start in it, see math::QuantRows)
    for (int64_t b = 0; b < s.numel; b += kChunk) chunks.push_back({i, b, std::min(b + kChunk, s.numel)});
    total += s.numel;
  }
  launch.dtype = scalar_kind(t.dtype);
  launch.slots = slots.data();
  launch.chunks = chunks.data();
  const auto run_chunks = kernel_table().optimizer_chunks;
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  if (total < kSerialBelow || at::get_num_threads() == 1) {
    run_chunks(launch, 0, n_chunks);
  } else {
    at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) { run_chunks(launch, b, e); });
  }
  finish_optimizer_call(t);
}

// Common prologue: lr from the tensor if given, GradScaler's inputs. Returns false when the step must be
// skipped (found_inf set): params, state and step counters stay untouched, but grads the step was to zero
// are still zeroed, as the CUDA kernels do, so the optimizer's record of zeroed grads holds either way.
bool begin_launch(OptimizerLaunch& l, at::TensorList grads, double lr, const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  bool zero_grad) {
  if (found_inf.has_value() && read_scalar(*found_inf) != 0.0) {
    if (zero_grad) {
      for (const at::Tensor& g : grads) g.zero_();
    }
    return false;
  }
  l.lr = lr_tensor.has_value() ? read_scalar(*lr_tensor) : lr;
  l.zero_grad = zero_grad;
  l.has_grad_scale = grad_scale.has_value();
  l.grad_scale = l.has_grad_scale ? read_scalar(*grad_scale) : 1.0;
  return true;
}

// Adds one to a step counter and returns the new value, as torch's `step_t += 1`. Written through the
// pointer: a dispatched add_ per parameter would dominate a step over thousands of small tensors.
double advance_step(const at::Tensor& step) {
  switch (step.scalar_type()) {
    case at::kFloat: return ++*step.data_ptr<float>();
    case at::kDouble: return ++*step.data_ptr<double>();
    default: {
      at::Tensor s = step;
      s.add_(1);
      return read_scalar(s);
    }
  }
}

// Stochastic rounding, when the call has seeds: the launch asks for it and each slot gets its stream at step.
void set_rounding(OptimizerLaunch& l, const OptimizerTensors& t) { l.stochastic_round = !t.rounding_seeds.empty(); }
void set_rounding_stream(const OptimizerTensors& t, int64_t i, double step, ParamSlot& s) {
  if (t.rounding_seeds.empty()) return;
  const at::Tensor& seed = t.rounding_seeds[i];
  s.rounding_stream = math::rounding_stream(*seed.data_ptr<int64_t>(), step);
  if (!t.rounding_offsets.empty()) s.rounding_offset = t.rounding_offsets[i];
}

// What follows an op's checks, shared by the fp32 and 8-bit ops of one update (kind): GradScaler's prologue, the
// hyperparameters into the launch, the steps advanced and the kernels run. The 8-bit kernels read their codes from
// quant_math.h's constants.
using OptionalTensor = std::optional<at::Tensor>;

// Adam: each param's step advances, then its bias corrections (in double, as torch) go into its slot.
void step_adam(OptimizerKind kind, OptimizerTensors& t, at::TensorList grads, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               bool zero_grad, const OptionalTensor& lr_tensor, const OptionalTensor& grad_scale,
               const OptionalTensor& found_inf) {
  OptimizerLaunch l{};
  if (t.size() == 0 || !begin_launch(l, grads, lr, lr_tensor, grad_scale, found_inf, zero_grad)) return;
  l.kind = kind;
  l.beta1 = beta1;
  l.beta2 = beta2;
  l.eps = eps;
  l.weight_decay = weight_decay;
  l.decoupled_weight_decay = decoupled_weight_decay;
  l.amsgrad = amsgrad;
  l.maximize = maximize;
  set_rounding(l, t);
  run(l, t, [&](int64_t i, ParamSlot& s) {
    const double step = advance_step(t.steps[i]);
    const auto bc = math::adam_bias_correction(l.lr, l.beta1, l.beta2, step);
    s.neg_step_size = bc.neg_step_size;
    s.bc2_sqrt = bc.bc2_sqrt;
    set_rounding_stream(t, i, step, s);
  });
}

// SGD: its steps exist for stochastic rounding, as its counter.
void step_sgd(OptimizerKind kind, OptimizerTensors& t, at::TensorList grads, double lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize, bool is_first_step, bool zero_grad,
              const OptionalTensor& lr_tensor, const OptionalTensor& grad_scale, const OptionalTensor& found_inf) {
  OptimizerLaunch l{};
  if (t.size() == 0 || !begin_launch(l, grads, lr, lr_tensor, grad_scale, found_inf, zero_grad)) return;
  l.kind = kind;
  l.momentum = momentum;
  l.dampening = dampening;
  l.weight_decay = weight_decay;
  l.nesterov = nesterov;
  l.maximize = maximize;
  l.first_step = is_first_step;
  set_rounding(l, t);
  run(l, t, [&](int64_t i, ParamSlot& s) {
    if (!t.steps.empty()) set_rounding_stream(t, i, advance_step(t.steps[i]), s);
  });
}

// RMSprop: each param's step advances (the rounding's counter, when there are seeds).
void step_rmsprop(OptimizerKind kind, OptimizerTensors& t, at::TensorList grads, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize, bool zero_grad,
                  const OptionalTensor& lr_tensor, const OptionalTensor& grad_scale,
                  const OptionalTensor& found_inf) {
  OptimizerLaunch l{};
  if (t.size() == 0 || !begin_launch(l, grads, lr, lr_tensor, grad_scale, found_inf, zero_grad)) return;
  l.kind = kind;
  l.beta2 = alpha;
  l.eps = eps;
  l.weight_decay = weight_decay;
  l.momentum = momentum;
  l.centered = centered;
  l.maximize = maximize;
  set_rounding(l, t);
  run(l, t, [&](int64_t i, ParamSlot& s) { set_rounding_stream(t, i, advance_step(t.steps[i]), s); });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList state_steps, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                  bool is_first_step, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::TensorList>& rounding_seeds,
                  at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_sgd_step(params, grads, momentum_buffers, momentum, zero_grad, lr_tensor, grad_scale,
                                      found_inf, state_steps, rounding_seeds, rounding_offsets);
  step_sgd(OptimizerKind::Sgd, t, grads, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step,
           zero_grad, lr_tensor, grad_scale, found_inf);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                   bool maximize, bool decoupled_weight_decay, bool zero_grad,
                   const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::TensorList>& rounding_seeds,
                   at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                                       zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds, rounding_offsets);
  step_adam(OptimizerKind::Adam, t, grads, lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
            decoupled_weight_decay, zero_grad, lr_tensor, grad_scale, found_inf);
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                      double lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                      bool maximize, bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::TensorList>& rounding_seeds,
                      at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                                          centered, momentum, zero_grad, lr_tensor, grad_scale, found_inf,
                                          rounding_seeds, rounding_offsets);
  step_rmsprop(OptimizerKind::Rmsprop, t, grads, lr, alpha, eps, weight_decay, momentum, centered, maximize,
               zero_grad, lr_tensor, grad_scale, found_inf);
}

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
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
  step_adam(OptimizerKind::Adam8bit, t, grads, lr, beta1, beta2, weight_decay, eps, false, maximize,
            decoupled_weight_decay, zero_grad, lr_tensor, grad_scale, found_inf);
}

void sgd8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffer_codes,
                      at::TensorList momentum_buffer_absmax, at::TensorList state_steps, double lr, double momentum,
                      double dampening, double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                      bool zero_grad, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::TensorList>& rounding_seeds,
                      at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_sgd8bit_step(params, grads, momentum_buffer_codes, momentum_buffer_absmax, state_steps,
                                          momentum, zero_grad, lr_tensor, grad_scale, found_inf, rounding_seeds,
                                          rounding_offsets);
  step_sgd(OptimizerKind::Sgd8bit, t, grads, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step,
           zero_grad, lr_tensor, grad_scale, found_inf);
}

void rmsprop8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avg_codes,
                          at::TensorList square_avg_absmax, at::TensorList momentum_buffer_codes,
                          at::TensorList momentum_buffer_absmax, at::TensorList state_steps, double lr, double alpha,
                          double eps, double weight_decay, double momentum, bool maximize, bool zero_grad,
                          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::TensorList>& rounding_seeds,
                          at::OptionalIntArrayRef rounding_offsets) {
  OptimizerTensors t = check_rmsprop8bit_step(params, grads, square_avg_codes, square_avg_absmax, momentum_buffer_codes,
                                              momentum_buffer_absmax, state_steps, momentum, zero_grad, lr_tensor,
                                              grad_scale, found_inf, rounding_seeds, rounding_offsets);
  step_rmsprop(OptimizerKind::Rmsprop8bit, t, grads, lr, alpha, eps, weight_decay, momentum, false, maximize,
               zero_grad, lr_tensor, grad_scale, found_inf);
}

}  // namespace
}  // namespace cpu
}  // namespace fused_train

TORCH_LIBRARY_IMPL(fused_train, CPU, m) {
  m.impl("adam8bit_step_", &fused_train::cpu::adam8bit_step_cpu);
  m.impl("sgd_step_", &fused_train::cpu::sgd_step_cpu);
  m.impl("adam_step_", &fused_train::cpu::adam_step_cpu);
  m.impl("rmsprop_step_", &fused_train::cpu::rmsprop_step_cpu);
  m.impl("sgd8bit_step_", &fused_train::cpu::sgd8bit_step_cpu);
  m.impl("rmsprop8bit_step_", &fused_train::cpu::rmsprop8bit_step_cpu);
}
