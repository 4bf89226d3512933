// Stochastic rounding of an fp32 update into a bf16 param (bf16_stochastic_round=True), shared by the CPU and
// CUDA kernels and checked without libtorch in tests/cpp.
//
// Why: a bf16 param has 8 significant bits, so an update smaller than half its spacing (|Δ| < 2^-9 |p|: lr 1e-4
// on weights of order 1 already) is rounded away to nearest and the weight stops learning. Rounded up with the
// probability of its fractional part instead, the expected stored value is the exact fp32 result, and small
// updates accumulate on average (Gupta et al., "Deep Learning with Limited Numerical Precision", 2015).
//
// The random bits are counter-based, a pure function of (param seed, step, element index): no generator state,
// nothing read or advanced on the host per step, and the same bits on every device, thread count and chunking.
// The seed is the param's own (an int64 in its optimizer state), the step its step counter after the increment.
// The element index counts from the op's rounding offset (0 but for a shard: an FSDP2 shard's first element's
// index in its whole tensor), so shards draw the bits the whole tensor would, not each other's.
// fused_train/reference.py computes the same bits in torch ops for the tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fused_train/macros.h"

namespace fused_train {
namespace math {

// A bijective 32-bit integer hash with full avalanche (two multiply-xorshift rounds; constants from Chris
// Wellons' hash-prospector "lowbias32").
FT_HOST_DEVICE FT_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// splitmix64's finalizer (Steele, Lea & Flood 2014).
FT_HOST_DEVICE FT_INLINE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// One param's stream at one step: once per param and step. step is the step counter after its increment (an
// fp32 or double count; anything but a count >= 0 counts as 0). The step is mixed with an odd multiplier and a
// constant of its own, so that (seed, step) pairs do not map onto each other when seeds are themselves splitmix64
// outputs of small integers (fused_train/optim/_base.py's _position_seed).
FT_HOST_DEVICE FT_INLINE uint64_t rounding_stream(int64_t seed, double step) {
  const uint64_t t = step >= 1.0 && step < 1.8e19 ? static_cast<uint64_t>(step) : 0;
  return mix64(static_cast<uint64_t>(seed) ^ mix64(t * 0xd1b54a32d192ed03ull + 0x8bb84b93962eacc9ull));
}

// The key of the stream's elements [index_high · 2^32, (index_high + 1) · 2^32).
FT_HOST_DEVICE FT_INLINE uint32_t rounding_key(uint64_t stream, uint32_t index_high) {
  return static_cast<uint32_t>(stream) ^ mix32(static_cast<uint32_t>(stream >> 32) + index_high);
}

// 32 random bits of the element whose index has low half index_low. Of these, the high 16 round.
FT_HOST_DEVICE FT_INLINE uint32_t rounding_bits(uint32_t key, uint32_t index_low) { return mix32(index_low ^ key); }

FT_HOST_DEVICE FT_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}
FT_HOST_DEVICE FT_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// x rounded to one of its two bf16 neighbours, returned as the fp32 value of that bf16 (its low 16 bits zero, so
// the kernels' round-to-nearest narrowing that follows is exact). Adding r = bits >> 16, uniform on [0, 2^16),
// to x's bit pattern carries into the kept bits with probability (x's dropped bits) / 2^16, which is where x
// lies between the neighbours: magnitudes round away from zero with that probability, toward zero otherwise,
// so E[result] = x. ±inf stay; a finite x past the largest bf16 may become inf with that probability, as it
// would by nearest rounding above the midpoint. NaN is returned unchanged (its narrowing keeps it NaN).
FT_HOST_DEVICE FT_INLINE float round_to_bf16_stochastic(float x, uint32_t bits) {
  if (x != x) return x;
  return bits_float((float_bits(x) + (bits >> 16)) & 0xffff0000u);
}

// How the kernels round one run of consecutive elements of a param (a CPU tile or 8-bit block, a CUDA chunk; fewer
// than 2^32 of them): the keys once per run, and per element a select between two. A run may cross a multiple of
// 2^32 (a shard's offset puts its runs anywhere), where the key changes: element i is past the crossing exactly
// when the low half of first + i has wrapped below first's. Default-constructed, or made with on = false (rounding
// to nearest, or not a bf16 param), it leaves values as they are.
struct RunRounding {
  bool on = false;
  uint32_t key = 0;       // of first's 2^32 range
  uint32_t next_key = 0;  // of the range after it
  uint32_t first_low = 0;

  // The run of elements first, first + 1, ... (indices modulo 2^64) of the param whose stream at this step is
  // `stream`.
  FT_HOST_DEVICE FT_INLINE static RunRounding make(bool on, uint64_t stream, uint64_t first) {
    RunRounding r;
    if (on) {
      const uint32_t high = static_cast<uint32_t>(first >> 32);
      r.on = true;
      r.key = rounding_key(stream, high);
      r.next_key = rounding_key(stream, high + 1u);
      r.first_low = static_cast<uint32_t>(first);
    }
    return r;
  }
  // The bits of element i of the run.
  FT_HOST_DEVICE FT_INLINE uint32_t bits(int64_t i) const {
    const uint32_t low = first_low + static_cast<uint32_t>(i);
    return rounding_bits(low < first_low ? next_key : key, low);
  }
  // Element i of the run, before it narrows to the param's dtype (other math types, fp64's, pass through).
  template <class V>
  FT_HOST_DEVICE FT_INLINE V apply(V x, int64_t i) const {
    if constexpr (std::is_same_v<V, float>) {
      if (on) return round_to_bf16_stochastic(x, bits(i));
    }
    return x;
  }
};

}  // namespace math
}  // namespace fused_train
