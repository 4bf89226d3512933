// The CPU loss's reusable gradient memory (gradient_cache.cpp): what it keeps, for how long, and how a
// user gives it back (torch.ops.fused_train.empty_cache, fused_train.empty_cache() in Python).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fused_train {
namespace cpu {

// A (rows, classes) tensor to write a loss gradient into: for gradients of at least 1 MiB, the memory of the
// last such gradient when nothing but the cache refers to it any more and its size matches, else fresh
// memory, which the cache then keeps in its place. So the cache holds at most one buffer, of the size of
// the most recent large gradient, and never one the caller still uses.
at::Tensor reusable_gradient(int64_t rows, int64_t classes, const at::TensorOptions& options);

// Drops the cache's reference: the memory goes back to the OS as soon as no gradient still uses it.
void empty_gradient_cache();

}  // namespace cpu
}  // namespace fused_train
