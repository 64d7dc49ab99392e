// Server-side dense optimizers: one fused, single pass over a chunk.
//
// Note [Parity with torch.optim]
// The rules reproduce torch.optim's single-tensor CPU code path operation by
// operation on float32, so that results agree to the last bit or nearly:
//  * scalars (bias corrections, step sizes, decays) are computed in double, as
//    Python does, then rounded to float once, as ATen does for a Scalar;
//  * `add(alpha=)`, `lerp` and `addcmul` use a fused multiply-add (ATen's
//    vectorised kernels call vec::fmadd; addcmul is fma(value*t1, t2, self));
//    `addcdiv` is self + (value*t1)/t2 unfused; `mul` and `div` are plain;
//  * the translation unit is compiled with -ffp-contract=off so that the
//    compiler never fuses what torch does not.
// Remaining differences are in torch's scalar tail loops (which the compiler
// may contract) and its sqrt; the parity tests state the tolerance.
#pragma once

#include <cstdint>
#include <string>

namespace fastps {

enum class OptimKind : uint8_t { kSGD = 0, kAdam = 1, kAdagrad = 2 };

// Hyperparameters of one param group, as the user wrote them (torch names).
struct OptimHyper {
  OptimKind kind = OptimKind::kSGD;
  double lr = 1e-3;
  double weight_decay = 0.0;
  bool maximize = false;
  // SGD
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
  // Adam / AdamW
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  bool amsgrad = false;
  bool decoupled_weight_decay = false;
  // Adagrad
  double lr_decay = 0.0;
  double initial_accumulator_value = 0.0;
};

// Number of float state buffers the rule keeps per parameter element.
int optim_state_count(const OptimHyper& h);
std::string optim_state_name(const OptimHyper& h, int index);

// One fused update of n elements. `state` holds optim_state_count(h) buffers.
// `step` is the step number after increment (1 on the first step), as torch's
// state['step']. For SGD with momentum, `first_step` selects buf = grad.
// Thread safety: none needed; each chunk is touched by one shard thread.
void optim_update(const OptimHyper& h, double step, bool first_step, float* param, const float* grad,
                  float* const* state, int64_t n);

// Plain scalar reference of the same rule, used by the C++ self-test of the
// vectorised path (never on the hot path).
void optim_update_reference(const OptimHyper& h, double step, bool first_step, float* param,
                            const float* grad, float* const* state, int64_t n);

// Which kernel variant optim_update runs on this CPU ("avx2+fma" or "generic").
const char* optim_kernel_isa();

}  // namespace fastps
