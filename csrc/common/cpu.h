// Note [CPU-specific kernels]
// The wheel runs on any x86-64 and is fast on newer ones. There is one way to
// get there: a hot loop is written once (an always_inline function or a
// template), then compiled for each instruction set by a small wrapper that
// carries __attribute__((target(...))) (or, for a whole file of kernels,
// #pragma GCC target around it: table/optim_kernels.cc), and the caller picks
// a wrapper at run time with the predicates below. Nothing is chosen at build
// time, so one binary serves every machine, and every variant computes the
// same bits (no contraction in any of these files: Note [Parity with
// torch.optim] in table/optimizer.h).
#pragma once

namespace fastps {

// Each is read once, then cached; false on other architectures.
bool cpu_has_avx2();
bool cpu_has_avx2_fma();
bool cpu_has_avx512dq_vl();  // AVX-512 F + DQ + VL

}  // namespace fastps
