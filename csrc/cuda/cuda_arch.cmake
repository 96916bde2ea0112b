# The GPU architectures the CUDA kernels are built for (included by CMakeLists.txt).
#
# find_package(Torch) of a CUDA torch runs torch's Caffe2/public/cuda.cmake, which sets
# CMAKE_CUDA_ARCHITECTURES OFF (so -DCMAKE_CUDA_ARCHITECTURES=90 selects nothing; torch
# warns that it ignores it) and adds its own -gencode flags from TORCH_CUDA_ARCH_LIST.
# Without that list it probes the local GPU, and with none visible falls back to a
# "common" list that starts at compute_50, which nvcc 13 rejects: a CUDA build on a
# machine without a GPU failed. So the list is always set, before find_package(Torch).
#
# vae_fast_cuda_arch_list(<out> <nvcc version>) sets <out> to the CMake variable
# TORCH_CUDA_ARCH_LIST if given (-DTORCH_CUDA_ARCH_LIST=...), else the environment
# variable of that name, else "8.0;9.0" (A100; H100 and H200). Entries are torch's:
# "9.0", "9.0a", "9.0+PTX", names such as "Hopper"; separated by ';' or spaces. It
# fails at configure time, not in nvcc, on a compute capability below 7.5 with nvcc 13
# or newer, which dropped them.
function(vae_fast_cuda_arch_list out nvcc_version)
  if(NOT "${TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(archs "${TORCH_CUDA_ARCH_LIST}")
  elseif(NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(archs "$ENV{TORCH_CUDA_ARCH_LIST}")
  else()
    set(archs "8.0;9.0")
  endif()
  string(REGEX REPLACE "[ \t]+" ";" archs "${archs}")
  list(REMOVE_ITEM archs "")
  if(nvcc_version VERSION_GREATER_EQUAL 13.0)
    foreach(arch IN LISTS archs)
      if(arch MATCHES "^([0-9]+\\.[0-9])" AND CMAKE_MATCH_1 VERSION_LESS 7.5)
        message(FATAL_ERROR "vae_fast: TORCH_CUDA_ARCH_LIST has ${arch}, but nvcc ${nvcc_version} "
                            "builds for compute capability 7.5 and newer only")
      endif()
    endforeach()
  endif()
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()
