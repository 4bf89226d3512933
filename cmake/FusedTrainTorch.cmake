# libtorch for the fused_train build. Defines:
#   fused_train_libtorch       INTERFACE target: torch's headers and libraries (torch_cpu + c10 for a CPU build,
#                              the whole of torch with CUDA for FUSED_TRAIN_WITH_CUDA)
#   FUSED_TRAIN_TORCH_VERSION  e.g. "2.14.1+cu130"
#   FUSED_TRAIN_CUDA_ARCHS     the TORCH_CUDA_ARCH_LIST compiled for ("" for a CPU build)

# Torch_DIR from the Python interpreter's torch unless given: the build compiles against the torch that will load
# the ops, never against some other libtorch on the machine.
if(NOT Torch_DIR)
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_FOUND)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__)"
      OUTPUT_VARIABLE _torch_query RESULT_VARIABLE _torch_query_rc ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_torch_query_rc EQUAL 0)
      string(REPLACE "\n" ";" _torch_query "${_torch_query}")
      list(GET _torch_query 0 _torch_cmake_prefix)
      list(GET _torch_query 1 FUSED_TRAIN_TORCH_VERSION)
      set(Torch_DIR "${_torch_cmake_prefix}/Torch" CACHE PATH "Folder holding libtorch's TorchConfig.cmake")
    endif()
  endif()
  if(NOT Torch_DIR)
    message(FATAL_ERROR "fused_train: libtorch not found. Pass -DPython3_EXECUTABLE=<python with torch> or "
                        "-DTorch_DIR=<libtorch>/share/cmake/Torch.")
  endif()
endif()
get_filename_component(_torch_prefix "${Torch_DIR}/../../.." ABSOLUTE)
if(NOT FUSED_TRAIN_TORCH_VERSION)
  include("${Torch_DIR}/TorchConfigVersion.cmake")
  set(FUSED_TRAIN_TORCH_VERSION "${PACKAGE_VERSION}")
endif()

# A CUDA build of torch makes find_package(Torch) require a CUDA toolkit (Caffe2Config.cmake stops without one)
# even for a CPU-only consumer. Point it at the toolkit as setup.py finds it: the nvcc on PATH may be a wrapper
# script, so the root is taken from CUDA_HOME / CUDA_PATH / /usr/local/cuda where it holds libcudart.
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
    if(_root AND EXISTS "${_root}/lib64/libcudart.so" AND EXISTS "${_root}/bin/nvcc")
      set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit root")
      break()
    endif()
  endforeach()
endif()
set(_have_cuda_toolkit FALSE)
if(CUDA_TOOLKIT_ROOT_DIR AND EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64/libcudart.so")
  set(_have_cuda_toolkit TRUE)
endif()
set(_torch_is_cuda_build FALSE)
if(EXISTS "${_torch_prefix}/lib/libtorch_cuda.so")
  set(_torch_is_cuda_build TRUE)
endif()

set(FUSED_TRAIN_CUDA_ARCHS "")
if(FUSED_TRAIN_WITH_CUDA)
  if(NOT _torch_is_cuda_build)
    message(FATAL_ERROR "fused_train: FUSED_TRAIN_WITH_CUDA=ON but the torch at ${_torch_prefix} is a CPU-only build")
  endif()
  if(NOT _have_cuda_toolkit)
    message(FATAL_ERROR "fused_train: FUSED_TRAIN_WITH_CUDA=ON but no CUDA toolkit was found. Set CUDA_HOME (or "
                        "-DCUDA_TOOLKIT_ROOT_DIR) to the toolkit root, the folder holding lib64/libcudart.so.")
  endif()
  # torch's cuda.cmake turns TORCH_CUDA_ARCH_LIST into -gencode flags; without one it would compile for a dozen
  # architectures. The default is setup.py's (DEFAULT_CUDA_ARCHS).
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
    if(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
      set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
    else()
      set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
    endif()
  endif()
  set(FUSED_TRAIN_CUDA_ARCHS "${TORCH_CUDA_ARCH_LIST}")
  find_package(Torch REQUIRED)
  add_library(fused_train_libtorch INTERFACE)
  target_link_libraries(fused_train_libtorch INTERFACE torch)
elseif(_have_cuda_toolkit OR NOT _torch_is_cuda_build)
  # For a CUDA build of torch this also enables CMake's CUDA language and checks the toolkit; pinning the
  # architecture list spares it compiling and running a GPU-detection program that a CPU build has no use for.
  if(_torch_is_cuda_build AND NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "9.0")
  endif()
  find_package(Torch REQUIRED)
  add_library(fused_train_libtorch INTERFACE)
  target_link_libraries(fused_train_libtorch INTERFACE torch_cpu c10)
  target_compile_options(fused_train_libtorch INTERFACE ${TORCH_CXX_FLAGS})
else()
  # A CUDA build of torch and no toolkit: the CPU kernels need only libtorch_cpu and libc10, so take them
  # straight from the torch installation (the layout of the pip wheel and of the libtorch archive).
  message(STATUS "fused_train: no CUDA toolkit for this CUDA build of torch; linking its CPU libraries directly")
  foreach(_lib c10 torch_cpu)
    find_library(FUSED_TRAIN_${_lib}_LIBRARY ${_lib} PATHS "${_torch_prefix}/lib" NO_DEFAULT_PATH REQUIRED)
  endforeach()
  add_library(fused_train_libtorch INTERFACE)
  target_include_directories(fused_train_libtorch SYSTEM INTERFACE
    "${_torch_prefix}/include" "${_torch_prefix}/include/torch/csrc/api/include")
  target_link_libraries(fused_train_libtorch INTERFACE
    "${FUSED_TRAIN_torch_cpu_LIBRARY}" "${FUSED_TRAIN_c10_LIBRARY}")
endif()
message(STATUS "fused_train: torch ${FUSED_TRAIN_TORCH_VERSION} at ${_torch_prefix}")
