// Internal: the per-ISA kernel entry points and the float scalars they use.
// optim_kernels.cc defines them once per instruction set (Note [CPU-specific
// kernels] in common/cpu.h); optimizer.cc picks one at run time.
#pragma once

#include <cstdint>

namespace fastps {
namespace kernels {

// Per-step float scalars, rounded from double exactly as ATen rounds a Scalar.
struct SgdScalars {
  float sign;             // -1 if maximize
  float weight_decay;     // 0 disables
  float momentum;         // 0 disables
  float one_minus_damp;   // 1 - dampening
  float neg_lr;           // -lr
  bool nesterov;
  bool first_step;
};

struct AdamScalars {
  float sign;
  float weight_decay;     // L2 form (Adam); 0 disables
  float decay;            // 1 - lr*wd (AdamW); 1 disables
  bool decoupled;
  float lerp_w;           // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  bool amsgrad;
};

struct AdagradScalars {
  float sign;
  float weight_decay;
  float eps;
  float neg_clr;          // -lr / (1 + (step-1)*lr_decay)
};

#define FASTPS_DECLARE_KERNELS(ns)                                                               \
  namespace ns {                                                                                 \
  void sgd(const SgdScalars& s, float* p, const float* g, float* buf, int64_t n);                \
  void adam(const AdamScalars& s, float* p, const float* g, float* m, float* v, float* vmax,     \
            int64_t n);                                                                          \
  void adagrad(const AdagradScalars& s, float* p, const float* g, float* sum, int64_t n);        \
  }

FASTPS_DECLARE_KERNELS(generic)
FASTPS_DECLARE_KERNELS(avx2)
FASTPS_DECLARE_KERNELS(reference)

}  // namespace kernels
}  // namespace fastps
