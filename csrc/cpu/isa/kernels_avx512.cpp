// CPU kernels for the avx512 instruction set: setup.py and CMakeLists.txt compile this file with that
// set's flags and -DCPU_CAPABILITY=AVX512.
#include "cpu/kernel_table.inl"
