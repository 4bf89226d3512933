// Why the CPU loss keeps one gradient's memory between calls. A fresh buffer of that size costs the OS a
// page fault per 4 KiB on first write: for 4096×32000 fp32 logits ~130 ms on our CI machine, more than the
// kernel's whole read-and-write pass. Only the storage is kept, not the tensor, so autograd still hands the
// gradient over without a copy (AccumulateGrad steals a tensor nobody else holds); the storage is reused
// only when nothing but this cache refers to it any more, so reuse is invisible to callers: a gradient the
// caller still holds is never written. Small gradients come cheaply from the allocator's free lists and are
// not kept.
#include "cpu/gradient_cache.h"

#include <mutex>

namespace fused_train {
namespace cpu {
namespace {

constexpr int64_t kReuseGradBytes = 1 << 20;

std::mutex& cache_mutex() {
  static std::mutex mutex;
  return mutex;
}

c10::Storage& kept_storage() {
  static c10::Storage& kept = *new c10::Storage();  // never destroyed: no free after the allocator at exit
  return kept;
}

}  // namespace

at::Tensor reusable_gradient(int64_t rows, int64_t classes, const at::TensorOptions& options) {
  const int64_t bytes = rows * classes * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kReuseGradBytes) return at::empty({rows, classes}, options);
  const std::lock_guard<std::mutex> lock(cache_mutex());
  c10::Storage& kept = kept_storage();
  if (!(kept && kept.use_count() == 1 && static_cast<int64_t>(kept.nbytes()) == bytes)) {
    kept = c10::Storage();  // a buffer that cannot be reused goes before the new one comes: one at a time
    kept = at::empty({rows, classes}, options).storage();
  }
  return at::empty({0}, options).set_(kept, 0, {rows, classes}, {classes, 1});
}

void empty_gradient_cache() {
  c10::Storage released;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex());
    std::swap(released, kept_storage());
  }
  // `released` goes out of scope here, outside the lock: the free (an munmap for large buffers) holds no one up.
}

}  // namespace cpu
}  // namespace fused_train
