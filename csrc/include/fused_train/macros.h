// Portability macros for the torch-free headers shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FT_HOST_DEVICE __host__ __device__
#define FT_INLINE __forceinline__
#else
#define FT_HOST_DEVICE
#define FT_INLINE inline
#endif

#include <cmath>

namespace fused_train {
namespace math {

// Scalar overloads; the CPU kernels also instantiate the update math with at::vec::Vectorized,
// whose overloads below are picked by the templates (x.sqrt(), maximum found by ADL).
FT_HOST_DEVICE FT_INLINE float sqrt_(float x) { return ::sqrtf(x); }
FT_HOST_DEVICE FT_INLINE double sqrt_(double x) { return ::sqrt(x); }
template <class V>
FT_INLINE V sqrt_(const V& x) {
  return x.sqrt();
}

// NaN-propagating like torch.maximum, which amsgrad uses.
FT_HOST_DEVICE FT_INLINE float max_(float a, float b) { return (a != a || a > b) ? a : b; }
FT_HOST_DEVICE FT_INLINE double max_(double a, double b) { return (a != a || a > b) ? a : b; }
template <class V>
FT_INLINE V max_(const V& a, const V& b) {
  return maximum(a, b);
}

}  // namespace math
}  // namespace fused_train
