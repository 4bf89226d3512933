// Body of every isa/kernels_<isa>.cpp: the kernels compiled for the instruction set named by
// CPU_CAPABILITY, gathered into that set's table. Included once per ISA translation unit.
#include "cpu/optimizer_kernels.h"
#include "cpu/xent_kernels.h"

#define FT_STRINGIFY_(x) #x
#define FT_STRINGIFY(x) FT_STRINGIFY_(x)

namespace fused_train {
namespace cpu {
namespace CPU_CAPABILITY {

const KernelTable& kernel_table() {
  static const KernelTable table{FT_STRINGIFY(CPU_CAPABILITY), &optimizer_chunks, &cross_entropy_forward_rows,
                                 &cross_entropy_backward_rows};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fused_train
