#include "table/optimizer.h"

#include <cmath>

#include "common/cpu.h"
#include "common/error.h"
#include "table/optim_kernels.h"

namespace fastps {

int optim_state_count(const OptimHyper& h) {
  switch (h.kind) {
    case OptimKind::kSGD: return h.momentum != 0.0 ? 1 : 0;
    case OptimKind::kAdam: return h.amsgrad ? 3 : 2;
    case OptimKind::kAdagrad: return 1;
  }
  return 0;
}

std::string optim_state_name(const OptimHyper& h, int index) {
  static const char* const kAdam[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  FASTPS_CHECK(index >= 0 && index < optim_state_count(h), "state index ", index, " out of range");
  switch (h.kind) {
    case OptimKind::kSGD: return "momentum_buffer";
    case OptimKind::kAdam: return kAdam[index];
    case OptimKind::kAdagrad: return "sum";
  }
  return "";
}

namespace {

using kernels::AdagradScalars;
using kernels::AdamScalars;
using kernels::SgdScalars;

// Python computes these in double; ATen rounds each Scalar to float once.
SgdScalars sgd_scalars(const OptimHyper& h, bool first_step) {
  SgdScalars s;
  s.sign = h.maximize ? -1.0f : 1.0f;
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.momentum = static_cast<float>(h.momentum);
  s.one_minus_damp = static_cast<float>(1.0 - h.dampening);
  s.neg_lr = static_cast<float>(-h.lr);
  s.nesterov = h.nesterov;
  s.first_step = first_step;
  if (h.momentum == 0.0) s.momentum = 0.0f;
  return s;
}

AdamScalars adam_scalars(const OptimHyper& h, double step) {
  AdamScalars s;
  s.sign = h.maximize ? -1.0f : 1.0f;
  s.decoupled = h.decoupled_weight_decay && h.weight_decay != 0.0;
  s.weight_decay = s.decoupled ? 0.0f : static_cast<float>(h.weight_decay);
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.lerp_w = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  const double bc1 = 1.0 - std::pow(h.beta1, step);
  const double bc2 = 1.0 - std::pow(h.beta2, step);
  s.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));  // Python's `** 0.5` is pow, not sqrt
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(h.lr / bc1));
  s.amsgrad = h.amsgrad;
  return s;
}

AdagradScalars adagrad_scalars(const OptimHyper& h, double step) {
  AdagradScalars s;
  s.sign = h.maximize ? -1.0f : 1.0f;
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.eps = static_cast<float>(h.eps);
  s.neg_clr = static_cast<float>(-(h.lr / (1.0 + (step - 1.0) * h.lr_decay)));
  return s;
}

template <typename Sgd, typename Adam, typename Adagrad>
void run(Sgd sgd, Adam adam, Adagrad adagrad, const OptimHyper& h, double step, bool first_step,
         float* param, const float* grad, float* const* state, int64_t n) {
  switch (h.kind) {
    case OptimKind::kSGD:
      sgd(sgd_scalars(h, first_step), param, grad, h.momentum != 0.0 ? state[0] : nullptr, n);
      return;
    case OptimKind::kAdam:
      adam(adam_scalars(h, step), param, grad, state[0], state[1], h.amsgrad ? state[2] : nullptr, n);
      return;
    case OptimKind::kAdagrad:
      adagrad(adagrad_scalars(h, step), param, grad, state[0], n);
      return;
  }
}

}  // namespace

void optim_update(const OptimHyper& h, double step, bool first_step, float* param, const float* grad,
                  float* const* state, int64_t n) {
  if (cpu_has_avx2_fma()) {
    run(kernels::avx2::sgd, kernels::avx2::adam, kernels::avx2::adagrad, h, step, first_step, param,
        grad, state, n);
  } else {
    run(kernels::generic::sgd, kernels::generic::adam, kernels::generic::adagrad, h, step,
        first_step, param, grad, state, n);
  }
}

void optim_update_reference(const OptimHyper& h, double step, bool first_step, float* param,
                            const float* grad, float* const* state, int64_t n) {
  run(kernels::reference::sgd, kernels::reference::adam, kernels::reference::adagrad, h, step,
      first_step, param, grad, state, n);
}

const char* optim_kernel_isa() { return cpu_has_avx2_fma() ? "avx2+fma" : "generic"; }

}  // namespace fastps
