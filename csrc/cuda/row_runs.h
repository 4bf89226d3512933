// How the threads of a group share one row (or slice of a row) in the cross-entropy kernels
// (cross_entropy.cu): single elements up to the row's first 16-byte boundary, then whole 16-byte vectors,
// each thread taking every group-th one, then single elements again. Free of torch and of CUDA, so
// tests/cpp/test_xent_rows.cpp checks on the CPU that every element is visited exactly once, and every vector
// read aligned, whatever the row's address, length and group size.
#pragma once

#include <cstdint>
#include <cstring>

#include "fused_train/macros.h"

namespace fused_train {
namespace cuda {

// 16 bytes of T: one vector load or store.
template <class T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// One 16-byte load or store. A plain copy of a Pack is not always one: nvcc split Packs of c10::BFloat16 into
// eight 2-byte loads, and stores of float Packs, even through a uint4, into 4 + 4 + 8 bytes (ptxas, sm_90). The
// load through a uint4 stays whole; the store is written out in PTX.
template <class T>
FT_HOST_DEVICE FT_INLINE Pack<T> load_pack(const T* p) {
  Pack<T> pack;
#if defined(__CUDACC__)
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
  memcpy(&pack, words, sizeof(pack));
#else
  memcpy(&pack, p, sizeof(pack));
#endif
  return pack;
}

template <class T>
FT_HOST_DEVICE FT_INLINE void store_pack(T* p, const Pack<T>& pack) {
#if defined(__CUDA_ARCH__)
  uint32_t words[4];
  memcpy(words, &pack, sizeof(words));
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(words[0]), "r"(words[1]), "r"(words[2]),
               "r"(words[3])
               : "memory");
#else
  memcpy(p, &pack, sizeof(pack));
#endif
}

// Vectors a thread loads before it uses the first, so that that many loads are in flight per thread (one at a
// time left the bandwidth to the number of resident warps).
constexpr int kPacksInFlight = 4;

// A row of n elements at p: `head` single elements before its first 16-byte boundary (p is always aligned to
// sizeof(T)), then `vectors` whole Pack<T>s, then the n - head - vectors·kSize single elements left.
struct RowCut {
  int64_t head;
  int64_t vectors;
};

template <class T>
FT_HOST_DEVICE FT_INLINE RowCut cut_row(const T* p, int64_t n) {
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  int64_t head = misalign == 0 ? 0 : (16 - misalign) / static_cast<int64_t>(sizeof(T));
  head = head < n ? head : n;
  return {head, (n - head) / Pack<T>::kSize};
}

// The share of thread `lane` of `group` threads in the row of n elements at p: single(j) for each single element
// j it owns, whole(j, pack) for each vector it owns (j: the vector's first element; pack: its 16 bytes, read
// here). Vectors go kPacksInFlight at a time: all loaded, then all used.
template <class T, class Single, class Whole>
FT_HOST_DEVICE FT_INLINE void for_each_run(const T* p, int64_t n, int lane, int group, Single&& single, Whole&& whole) {
  const RowCut cut = cut_row(p, n);
  for (int64_t j = lane; j < cut.head; j += group) single(j);
  constexpr int K = Pack<T>::kSize;
  int64_t v = lane;
  for (; v + (kPacksInFlight - 1) * static_cast<int64_t>(group) < cut.vectors; v += kPacksInFlight * group) {
    Pack<T> packs[kPacksInFlight];
    for (int u = 0; u < kPacksInFlight; ++u) packs[u] = load_pack(p + cut.head + (v + u * group) * K);
    for (int u = 0; u < kPacksInFlight; ++u) whole(cut.head + (v + u * group) * K, packs[u]);
  }
  for (; v < cut.vectors; v += group) whole(cut.head + v * K, load_pack(p + cut.head + v * K));
  for (int64_t j = cut.head + cut.vectors * K + lane; j < n; j += group) single(j);
}

}  // namespace cuda
}  // namespace fused_train
