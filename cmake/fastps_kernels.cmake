# The dense optimizer kernels, compiled once per instruction set; optimizer.cc
# picks one at run time, so the wheel runs on any x86-64 and is fast on
# AVX2+FMA. Shared by the wheel's build (CMakeLists.txt) and the C++ tests'
# (tests/cpp/CMakeLists.txt), so both compile the kernels alike.
#
#   fastps_add_kernel_variants(<source root>)
#
# defines the OBJECT libraries fastps_kernels_generic, fastps_kernels_avx2 and
# fastps_kernels_reference; link them with $<TARGET_OBJECTS:...>.
# FASTPS_VEC_REPORT (option of the top-level project) adds the compiler's
# vectorisation report.

# Hot loops: -O3, and no errno from sqrt so it inlines to one instruction.
# -ffp-contract=off keeps the optimizer arithmetic identical to torch's
# (see Note [Parity with torch.optim] in csrc/table/optimizer.h).
function(fastps_add_kernel_variants root)
  set(flags -O3 -fno-math-errno -ffp-contract=off)
  if(FASTPS_VEC_REPORT)
    list(APPEND flags -fopt-info-vec-optimized)
  endif()
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
    set(avx2 -mavx2 -mfma)
  else()
    set(avx2 "")
  endif()
  foreach(variant generic avx2 reference)
    add_library(fastps_kernels_${variant} OBJECT ${root}/csrc/table/optim_kernels.cc)
    target_include_directories(fastps_kernels_${variant} PRIVATE ${root}/csrc)
    target_compile_definitions(fastps_kernels_${variant} PRIVATE FASTPS_KERNEL_NS=${variant})
    target_compile_options(fastps_kernels_${variant} PRIVATE ${flags})
    set_target_properties(fastps_kernels_${variant} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  endforeach()
  target_compile_options(fastps_kernels_avx2 PRIVATE ${avx2})
  target_compile_options(fastps_kernels_reference PRIVATE -fno-tree-vectorize -fno-tree-slp-vectorize)
endfunction()
