// Chooses, once per process, the instruction set whose kernels run: the best one this CPU supports,
// lowered (never raised) by FUSED_TRAIN_CPU_CAPABILITY=default|avx2|avx512.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/cpu_kernels.h"

namespace fused_train {
namespace cpu {
namespace {

int best_supported_level() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return 2;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int requested_level() {
  const char* env = std::getenv("FUSED_TRAIN_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return 2;
  if (std::strcmp(env, "default") == 0) return 0;
  if (std::strcmp(env, "avx2") == 0) return 1;
  return 2;
}

const KernelTable& choose() {
  const int level = std::min(best_supported_level(), requested_level());
#if FUSED_TRAIN_X86_ISAS
  if (level == 2) return AVX512::kernel_table();
  if (level == 1) return AVX2::kernel_table();
#endif
  (void)level;
  return DEFAULT::kernel_table();
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable& table = choose();
  return table;
}

bool has_bf16_dot_product() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // CPUID leaf 7, subleaf 1: EAX bit 5 is AVX512_BF16 (AMX CPUs have it too). AVX-512's own state must be
    // enabled by the OS as well, which best_supported_level checks.
    if (best_supported_level() < 2 || !__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return ((eax >> 5) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fused_train
