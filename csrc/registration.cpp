// Every fused_train op's schema, in one place. Implementations: cpu/*.cpp (CPU) and cuda/*.cu (CUDA);
// fake (meta) implementations for torch.compile: fused_train/_ops.py.
//
// Conventions (as aten::_fused_adam_): lists of tensors, each mutated list with its own alias set,
// hyperparameters keyword-only, mutating ops end in `_` and return ().
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cpu/cpu_kernels.h"
#include "cpu/gradient_cache.h"

TORCH_LIBRARY(fused_train, m) {
  // rounding_seeds (bf16 params, fused_train.optim's bf16_stochastic_round): one int64 one-element tensor per param
  // on its device; the update is rounded into the param stochastically with bits drawn from (seed, step, element)
  // (csrc/include/fused_train/stochastic_round.h). SGD then takes state_steps as the counter (else it is empty; a
  // plain list, not an optional one: torch 2.5's auto_functionalize cannot take a mutated Tensor[]?).
  // rounding_offsets (with rounding_seeds, one per param; default all 0): the index, modulo 2^64, whose bits the
  // param's element 0 draws. A shard (an FSDP2 param's local tensor) passes its first element's index in the
  // whole tensor, so that it rounds as the whole tensor would and not with its sibling shards' bits.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] state_steps, "
      "*, float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool is_first_step, bool zero_grad, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor[]? rounding_seeds=None, int[]? rounding_offsets=None) -> ()");
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, bool zero_grad, "
      "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? rounding_seeds=None, "
      "int[]? rounding_offsets=None) -> ()");
  // 8-bit Adam/AdamW (fused_train.optim.Adam8bit): each moment as uint8 codes of the param's shape and a contiguous
  // fp32 absmax whose shape says its blocks (math::QuantRows in csrc/include/fused_train/quant_math.h): 1-D, one per
  // 256 elements of the flat param; 2-D (the param's dim 0, blocks per row), each row's blocks of 256, the last one
  // shorter. rounding_offsets: as adam_step_'s.
  m.def(
      "adam8bit_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avg_codes, "
      "Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_codes, Tensor(f!)[] exp_avg_sq_absmax, "
      "Tensor(g!)[] state_steps, *, float lr, float beta1, float beta2, float weight_decay, float eps, "
      "bool maximize, bool decoupled_weight_decay, bool zero_grad, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? rounding_seeds=None, "
      "int[]? rounding_offsets=None) -> ()");
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "
      "Tensor(e!)[] momentum_buffers, Tensor(f!)[] state_steps, *, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, bool zero_grad, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? rounding_seeds=None, "
      "int[]? rounding_offsets=None) -> ()");
  // 8-bit SGD and RMSprop (fused_train.optim.SGD8bit, RMSprop8bit), as adam8bit_step_: SGD's momentum_buffer; RMSprop's
  // square_avg (unsigned code) and momentum_buffer (momentum > 0; else empty lists). No centered RMSprop: its variance
  // (square_avg - grad_avg²) is below the 8-bit codes' error wherever the gradient's mean dominates.
  // sgd8bit_step_ takes state_steps only with rounding_seeds, as sgd_step_.
  m.def(
      "sgd8bit_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffer_codes, "
      "Tensor(d!)[] momentum_buffer_absmax, Tensor(e!)[] state_steps, *, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool maximize, bool is_first_step, bool zero_grad, Tensor? lr_tensor=None, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor[]? rounding_seeds=None, "
      "int[]? rounding_offsets=None) -> ()");
  m.def(
      "rmsprop8bit_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avg_codes, "
      "Tensor(d!)[] square_avg_absmax, Tensor(e!)[] momentum_buffer_codes, Tensor(f!)[] momentum_buffer_absmax, "
      "Tensor(g!)[] state_steps, *, float lr, float alpha, float eps, float weight_decay, float momentum, "
      "bool maximize, bool zero_grad, Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor[]? rounding_seeds=None, int[]? rounding_offsets=None) -> ()");

  // -- cross-entropy ops --
  // On a 2-D view (rows, classes) of the logits; fused_train.nn maps every torch input shape onto it.
  // reduction: 0 none, 1 mean, 2 sum. row_lse (rows, 2) holds each row's log-sum-exp as (max, log Σ exp(x - max))
  // and denominator (0-dim) the mean's divisor, both opmath (fp64 for fp64 logits, fp32 otherwise): what the
  // backward needs besides the logits. loss and z_loss have the logits' dtype, or opmath with opmath_loss
  // (autocast, where torch's cross_entropy returns fp32). grad_loss may have any floating dtype; it is applied
  // in opmath.
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, *, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale, bool opmath_loss=False) -> (Tensor loss, Tensor z_loss, "
      "Tensor row_lse, Tensor denominator)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, Tensor row_lse, "
      "Tensor denominator, *, int reduction, int ignore_index, float label_smoothing, float lse_square_scale) "
      "-> Tensor");
  // Writes the gradient over the logits (input), for callers that no longer need them.
  m.def(
      "cross_entropy_backward_(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight, Tensor row_lse, "
      "Tensor denominator, *, int reduction, int ignore_index, float label_smoothing, float lse_square_scale) "
      "-> ()");
  // The forward that also writes the gradient for grad_loss = 1 (ones for reduction='none') while each row
  // is still in cache; the loss's backward then applies the real grad_loss (apply_grad_loss_).
  m.def(
      "cross_entropy_forward_backward(Tensor input, Tensor target, Tensor? weight, *, int reduction, "
      "int ignore_index, float label_smoothing, float lse_square_scale, bool opmath_loss=False) -> (Tensor loss, "
      "Tensor z_loss, Tensor row_lse, Tensor denominator, Tensor grad_input)");
  // The same, writing the gradient over the logits (input), for callers that no longer need them.
  m.def(
      "cross_entropy_forward_backward_(Tensor(a!) input, Tensor target, Tensor? weight, *, int reduction, "
      "int ignore_index, float label_smoothing, float lse_square_scale, bool opmath_loss=False) -> (Tensor loss, "
      "Tensor z_loss, Tensor row_lse, Tensor denominator)");
  // Whether grad_loss is known, without a host sync, to be all ones (forward_backward's gradient is then
  // final): on CPU it is read; on CUDA the answer is always false, and apply_grad_loss_ checks on the device.
  // One tensor argument: this is the whole backward of every loss.backward() on CPU.
  m.def("cross_entropy_grad_loss_is_one(Tensor grad_loss) -> bool");
  // Makes forward_backward's gradient (for grad_loss = 1) the gradient for grad_loss: rows whose grad_loss is
  // exactly 1 are left as they are, the others recomputed from the logits with grad_loss applied before the
  // one rounding. grad_input must not overlap input.
  m.def(
      "cross_entropy_apply_grad_loss_(Tensor(a!) grad_input, Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor row_lse, Tensor denominator, *, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale) -> ()");
  // grad_input *= grad_loss (one element, or one per row for reduction='none'), for a gradient written over
  // the logits (forward_backward_), which cannot be recomputed: a second rounding.
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad_input, Tensor grad_loss) -> ()");
  // The loss alone, its autograd node in C++ (cross_entropy_autograd.cpp) over the ops above: what
  // fused_train.nn.functional.cross_entropy runs for (N, C) logits that need a gradient, where a Python
  // autograd.Function's node would cost more than the loss at small sizes.
  m.def(
      "cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, *, int reduction, int ignore_index, "
      "float label_smoothing, float lse_square_scale, bool opmath_loss=False) -> Tensor");

  // -- linear + cross-entropy (csrc/linear_cross_entropy.cpp) --
  // cross_entropy(input @ linear_weight.T + linear_bias, target) over chunks of chunk_rows rows (0: sized
  // automatically), never holding the (N, V) logits. input (N, H); target (N,) class indices or (N, V)
  // probabilities; softcap c > 0 caps the logits at c·tanh(logits / c) (0: none). The forward also returns the
  // gradients asked for (input_grad, ...) for a loss gradient of 1, for a reduced loss; the others are empty.
  // row_lse (N, 2) and denominator (0-dim), opmath, are what the backward needs to recompute them.
  // opmath_weight_grad: where the GEMMs run in half precision, linear_weight's gradient is summed across chunks in
  // opmath (fp32) and rounded once, instead of in its dtype (rounded once per chunk).
  m.def(
      "linear_cross_entropy_forward(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, "
      "Tensor? weight, *, int reduction, int ignore_index, float label_smoothing, float lse_square_scale, "
      "float softcap, int chunk_rows, bool input_grad, bool linear_weight_grad, bool linear_bias_grad, "
      "bool opmath_loss=False, bool opmath_weight_grad=False) -> (Tensor loss, Tensor row_lse, "
      "Tensor denominator, Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)");
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor linear_weight, Tensor target, "
      "Tensor? linear_bias, Tensor? weight, Tensor row_lse, Tensor denominator, *, int reduction, "
      "int ignore_index, float label_smoothing, float lse_square_scale, float softcap, int chunk_rows, "
      "bool input_grad, bool linear_weight_grad, bool linear_bias_grad, bool opmath_weight_grad=False) -> "
      "(Tensor grad_input, Tensor grad_linear_weight, Tensor grad_linear_bias)");

  // Releases the memory fused_train keeps between calls for reuse (today the CPU loss's one gradient
  // buffer, cpu/gradient_cache.h), as torch.cuda.empty_cache does for torch's caching allocator.
  m.def("empty_cache() -> ()", &fused_train::cpu::empty_gradient_cache);

  // Build facts for fused_train.build_info(), as "key=value" lines.
  m.def("build_info() -> str", []() -> std::string {
    std::ostringstream s;
    s << "torch_version=" << FUSED_TRAIN_TORCH_VERSION << "\n"
      << "cuda_compiled=" << FUSED_TRAIN_WITH_CUDA << "\n"
      << "cuda_archs=" << FUSED_TRAIN_CUDA_ARCHS << "\n"
      << "cpu_capability=" << fused_train::cpu::kernel_table().isa << "\n"
      << "cpu_bf16_dot_product=" << fused_train::cpu::has_bf16_dot_product() << "\n";
    return s.str();
  });
}
