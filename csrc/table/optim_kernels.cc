// The optimizer hot loops, compiled for each instruction set in this one file
// (Note [CPU-specific kernels] in common/cpu.h): the bodies are in
// optim_kernels.inc; optimizer.cc picks a namespace at run time.
#include <cmath>
#include <cstdint>

#include "table/optim_kernels.h"

namespace fastps {
namespace kernels {

namespace generic {
#include "table/optim_kernels.inc"
}  // namespace generic

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {  // (the generic code again where there is no AVX2)
#include "table/optim_kernels.inc"
}  // namespace avx2
#if defined(__x86_64__)
#pragma GCC pop_options
#endif

}  // namespace kernels
}  // namespace fastps
