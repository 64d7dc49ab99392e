// The optimizer hot loops. See Note [Parity with torch.optim] in optimizer.h.
//
// This file is compiled several times, once per instruction set, with
// FASTPS_KERNEL_NS naming the namespace (generic, avx2, reference). Every
// option that changes the arithmetic is a template parameter so that each loop
// body is branch-free and the compiler vectorises it (checked with
// -fopt-info-vec-optimized; see docs/development.md).
#include <cmath>
#include <cstdint>

#include "table/optim_kernels.h"

#ifndef FASTPS_KERNEL_NS
#error "FASTPS_KERNEL_NS must name the kernel namespace"
#endif

namespace fastps {
namespace kernels {
namespace FASTPS_KERNEL_NS {

namespace {

// torch.maximum: NaN in either operand propagates.
inline float nan_max(float a, float b) {
  return (a != a || a > b) ? a : b;
}

template <bool kWd, int kMom, bool kNesterov>
void sgd_loop(const SgdScalars& s, float* __restrict p, const float* __restrict g,
              float* __restrict buf, int64_t n) {
  const float sign = s.sign, wd = s.weight_decay, mom = s.momentum;
  const float omd = s.one_minus_damp, neg_lr = s.neg_lr;
  for (int64_t i = 0; i < n; ++i) {
    float d = g[i] * sign;
    if (kWd) d = std::fma(p[i], wd, d);          // grad.add(param, alpha=wd)
    if (kMom == 1) {                              // buf = grad.clone()
      buf[i] = d;
      if (kNesterov) d = std::fma(d, mom, d);
    } else if (kMom == 2) {                       // buf.mul_(m).add_(grad, alpha=1-damp)
      float b = std::fma(d, omd, buf[i] * mom);
      buf[i] = b;
      d = kNesterov ? std::fma(b, mom, d) : b;    // grad.add(buf, alpha=m) or buf
    }
    p[i] = std::fma(d, neg_lr, p[i]);             // param.add_(grad, alpha=-lr)
  }
}

template <bool kWd, bool kDecoupled, bool kAmsgrad, bool kSmallW>
void adam_loop(const AdamScalars& s, float* __restrict p, const float* __restrict g,
               float* __restrict m, float* __restrict v, float* __restrict vmax, int64_t n) {
  const float sign = s.sign, wd = s.weight_decay, decay = s.decay;
  const float w = s.lerp_w, w_minus_1 = s.lerp_w - 1.0f;
  const float beta2 = s.beta2, c2 = s.one_minus_beta2, bc2 = s.bc2_sqrt;
  const float eps = s.eps, nss = s.neg_step_size;
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i];
    float d = g[i] * sign;
    if (kWd) d = std::fma(pi, wd, d);            // grad.add(param, alpha=wd)
    if (kDecoupled) pi = pi * decay;              // param.mul_(1 - lr*wd)
    const float mi = m[i];
    // exp_avg.lerp_(grad, 1-beta1), as ATen's lerp_vec
    const float mn = kSmallW ? std::fma(w, d - mi, mi) : std::fma(w_minus_1, d - mi, d);
    m[i] = mn;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)
    float vi = v[i] * beta2;
    vi = std::fma(c2 * d, d, vi);
    v[i] = vi;
    if (kAmsgrad) {
      vi = nan_max(vmax[i], vi);                  // torch.maximum(max_exp_avg_sq, exp_avg_sq)
      vmax[i] = vi;
    }
    const float denom = std::sqrt(vi) / bc2 + eps;
    p[i] = pi + (nss * mn) / denom;               // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
}

template <bool kWd>
void adagrad_loop(const AdagradScalars& s, float* __restrict p, const float* __restrict g,
                  float* __restrict sum, int64_t n) {
  const float sign = s.sign, wd = s.weight_decay, eps = s.eps, nclr = s.neg_clr;
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    float d = g[i] * sign;
    if (kWd) d = std::fma(pi, wd, d);
    const float si = std::fma(d, d, sum[i]);      // state_sum.addcmul_(grad, grad, value=1)
    sum[i] = si;
    const float stdv = std::sqrt(si) + eps;       // state_sum.sqrt().add_(eps)
    p[i] = pi + (nclr * d) / stdv;                // param.addcdiv_(grad, std, value=-clr)
  }
}

}  // namespace

void sgd(const SgdScalars& s, float* p, const float* g, float* buf, int64_t n) {
  const bool wd = s.weight_decay != 0.0f;
  const int mom = s.momentum == 0.0f ? 0 : (s.first_step ? 1 : 2);
#define FASTPS_SGD(W, M, N) \
  if (wd == W && mom == M && s.nesterov == N) return sgd_loop<W, M, N>(s, p, g, buf, n);
  FASTPS_SGD(false, 0, false) FASTPS_SGD(true, 0, false)
  FASTPS_SGD(false, 1, false) FASTPS_SGD(true, 1, false)
  FASTPS_SGD(false, 2, false) FASTPS_SGD(true, 2, false)
  FASTPS_SGD(false, 1, true) FASTPS_SGD(true, 1, true)
  FASTPS_SGD(false, 2, true) FASTPS_SGD(true, 2, true)
  // momentum == 0 with nesterov is rejected by the front end; treat as plain SGD.
  if (wd) return sgd_loop<true, 0, false>(s, p, g, buf, n);
  return sgd_loop<false, 0, false>(s, p, g, buf, n);
#undef FASTPS_SGD
}

void adam(const AdamScalars& s, float* p, const float* g, float* m, float* v, float* vmax,
          int64_t n) {
  const bool l2 = !s.decoupled && s.weight_decay != 0.0f;
  const bool dec = s.decoupled;
  const bool small = std::fabs(s.lerp_w) < 0.5f;  // ATen's is_lerp_weight_small
#define FASTPS_ADAM(W, D, A, S)                                         \
  if (l2 == W && dec == D && s.amsgrad == A && small == S)              \
    return adam_loop<W, D, A, S>(s, p, g, m, v, vmax, n);
#define FASTPS_ADAM_S(W, D, A) FASTPS_ADAM(W, D, A, true) FASTPS_ADAM(W, D, A, false)
  FASTPS_ADAM_S(false, false, false) FASTPS_ADAM_S(true, false, false)
  FASTPS_ADAM_S(false, true, false)  FASTPS_ADAM_S(false, false, true)
  FASTPS_ADAM_S(true, false, true)   FASTPS_ADAM_S(false, true, true)
#undef FASTPS_ADAM_S
#undef FASTPS_ADAM
}

void adagrad(const AdagradScalars& s, float* p, const float* g, float* sum, int64_t n) {
  if (s.weight_decay != 0.0f) return adagrad_loop<true>(s, p, g, sum, n);
  return adagrad_loop<false>(s, p, g, sum, n);
}

}  // namespace FASTPS_KERNEL_NS
}  // namespace kernels
}  // namespace fastps
