// The optimizer loops without vectorisation: the reference the tests compare
// the vectorised kernels with (tests/test_optim_parity.py, through
// optim_update_reference). Compiled with -fno-tree-vectorize (CMakeLists.txt);
// not a CPU variant, never picked for training.
#include <cmath>
#include <cstdint>

#include "table/optim_kernels.h"

namespace fastps {
namespace kernels {
namespace reference {
#include "table/optim_kernels.inc"
}  // namespace reference
}  // namespace kernels
}  // namespace fastps
