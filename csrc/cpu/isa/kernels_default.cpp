// CPU kernels for the default instruction set: setup.py and CMakeLists.txt compile this file with that
// set's flags and -DCPU_CAPABILITY=DEFAULT.
#include "cpu/kernel_table.inl"
