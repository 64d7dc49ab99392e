// The sparse optimizer hot loops. See Note [Sparse rules] in sparse_optim.h.
//
// Every per-row loop below is plain and contiguous over `dim` floats, so the
// compiler vectorises it (check with -fopt-info-vec-optimized). The loops are
// compiled twice from one source: inlined into an AVX2+FMA entry point (a
// `target` attribute; the CMake flags of this file stay the baseline) and into
// a generic one. The fma calls are explicit and contraction is off for the
// whole file (CMakeLists.txt sets -ffp-contract=off for it), so both variants
// compute the same bits. -fno-trapping-math (as torch builds) changes no
// result; it lets FTRL's select vectorise.

#include "table/sparse_optim.h"

#include <cmath>

#include "common/cpu.h"
#include "common/error.h"
#include "common/prefetch.h"

#define FASTPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastps {

int64_t sparse_state_floats(SparseRule rule, int64_t dim) {
  switch (rule) {
    case SparseRule::kSGD: return 0;
    case SparseRule::kAdagrad: return dim;
    case SparseRule::kRowWiseAdagrad: return 1;
    case SparseRule::kSparseAdam: return 2 * dim;
    case SparseRule::kRowAdam: return 2 * dim;
    case SparseRule::kFtrl: return 2 * dim;
  }
  return 0;
}

const char* sparse_rule_name(SparseRule rule) {
  switch (rule) {
    case SparseRule::kSGD: return "sgd";
    case SparseRule::kAdagrad: return "adagrad";
    case SparseRule::kRowWiseAdagrad: return "rowwise_adagrad";
    case SparseRule::kSparseAdam: return "sparse_adam";
    case SparseRule::kRowAdam: return "row_adam";
    case SparseRule::kFtrl: return "ftrl";
  }
  return "?";
}

float sparse_state_init(const SparseOptim& o, int64_t index, int64_t dim) {
  switch (o.rule) {
    case SparseRule::kAdagrad:
    case SparseRule::kRowWiseAdagrad:
      return static_cast<float>(o.initial_accumulator_value);
    case SparseRule::kFtrl:  // z[dim] then n[dim]
      return index < dim ? 0.0f : static_cast<float>(o.initial_accumulator_value);
    default:
      return 0.0f;
  }
}

void sparse_optim_validate(const SparseOptim& o) {
  FASTPS_CHECK(static_cast<int>(o.rule) < kNumSparseRules,
               "fastps: unknown sparse optimizer rule ", static_cast<int>(o.rule));
  FASTPS_CHECK(std::isfinite(o.lr) && o.lr >= 0.0, "fastps: invalid learning rate: ", o.lr);
  FASTPS_CHECK(std::isfinite(o.eps) && o.eps >= 0.0, "fastps: invalid epsilon value: ", o.eps);
  FASTPS_CHECK(o.lr_decay >= 0.0, "fastps: invalid lr_decay value: ", o.lr_decay);
  FASTPS_CHECK(o.initial_accumulator_value >= 0.0,
               "fastps: invalid initial_accumulator_value: ", o.initial_accumulator_value);
  FASTPS_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0, "fastps: invalid beta parameter at index 0: ",
               o.beta1);
  FASTPS_CHECK(o.beta2 >= 0.0 && o.beta2 < 1.0, "fastps: invalid beta parameter at index 1: ",
               o.beta2);
  FASTPS_CHECK(o.l1 >= 0.0 && o.l2 >= 0.0 && o.ftrl_beta >= 0.0,
               "fastps: FTRL l1, l2 and beta must be non-negative");
  if (o.rule == SparseRule::kFtrl)
    FASTPS_CHECK(o.lr > 0.0, "fastps: FTRL needs a positive learning rate, got ", o.lr);
  if (o.rule == SparseRule::kSparseAdam || o.rule == SparseRule::kRowAdam)
    FASTPS_CHECK(o.eps > 0.0, "fastps: invalid epsilon value: ", o.eps);
}

namespace {

// Per-push scalars, in float once (as ATen rounds a Python scalar).
struct Scalars {
  float sign;       // -1 under maximize
  float neg_lr;     // SGD, row-wise Adagrad
  float neg_clr;    // Adagrad
  float eps;
  float c1, c2;     // 1-beta1, 1-beta2
  float neg_step_size;  // SparseAdam (table-wide step)
  double lr, beta1, beta2;
  float inv_lr;         // FTRL
  float beta_over_lr;   // FTRL: beta / lr
  float two_l2, l1;     // FTRL
  float dim_f;          // row-wise Adagrad: mean = sum / dim
};

double adam_step_size(double lr, double beta1, double beta2, int64_t step) {
  // Python: bias_correction1 = 1 - beta1**step; step_size = lr * math.sqrt(bc2) / bc1
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return lr * std::sqrt(bc2) / bc1;
}

Scalars make_scalars(const SparseOptim& o, int64_t step, int64_t dim) {
  Scalars s{};
  s.sign = o.maximize ? -1.0f : 1.0f;
  s.neg_lr = static_cast<float>(-o.lr);
  s.neg_clr = static_cast<float>(-(o.lr / (1.0 + static_cast<double>(step - 1) * o.lr_decay)));
  s.eps = static_cast<float>(o.eps);
  s.c1 = static_cast<float>(1.0 - o.beta1);
  s.c2 = static_cast<float>(1.0 - o.beta2);
  s.lr = o.lr;
  s.beta1 = o.beta1;
  s.beta2 = o.beta2;
  s.neg_step_size = static_cast<float>(-adam_step_size(o.lr, o.beta1, o.beta2, step));
  s.inv_lr = o.lr > 0.0 ? static_cast<float>(1.0 / o.lr) : 0.0f;
  s.beta_over_lr = o.lr > 0.0 ? static_cast<float>(o.ftrl_beta / o.lr) : 0.0f;
  s.two_l2 = static_cast<float>(2.0 * o.l2);
  s.l1 = static_cast<float>(o.l1);
  s.dim_f = static_cast<float>(dim);
  return s;
}

// ---- per-row kernels (always inlined into each ISA entry point) ----

FASTPS_ALWAYS_INLINE void sgd_row(const Scalars& s, float* __restrict w, const float* __restrict g,
                                  int64_t dim) {
  const float sign = s.sign, neg_lr = s.neg_lr;
  for (int64_t i = 0; i < dim; ++i) w[i] = std::fma(g[i] * sign, neg_lr, w[i]);  // add_(g, alpha=-lr)
}

FASTPS_ALWAYS_INLINE void adagrad_row(const Scalars& s, float* __restrict w, float* __restrict sum,
                                      const float* __restrict g, int64_t dim) {
  const float sign = s.sign, eps = s.eps, nclr = s.neg_clr;
  for (int64_t i = 0; i < dim; ++i) {
    const float d = g[i] * sign;
    const float si = sum[i] + d * d;            // state_sum.add_(sparse(g.pow(2)))
    sum[i] = si;
    const float stdv = std::sqrt(si) + eps;      // std_values.sqrt_().add_(eps)
    w[i] = std::fma(d / stdv, nclr, w[i]);       // param.add_(sparse(g / std), alpha=-clr)
  }
}

FASTPS_ALWAYS_INLINE void rowwise_adagrad_row(const Scalars& s, float* __restrict w,
                                              float* __restrict acc, const float* __restrict g,
                                              int64_t dim) {
  const float sign = s.sign;
  // Sum of squares in 8 independent lanes (vectorisable without reassociation).
  constexpr int kLanes = 8;
  float lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = g[i + l] * sign;
      lane[l] += d * d;
    }
  for (int64_t t = i; t < dim; ++t) {
    const float d = g[t] * sign;
    lane[t - i] += d * d;
  }
  const float sq = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                   ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  const float a = acc[0] + sq / s.dim_f;  // acc += mean(g^2)
  acc[0] = a;
  const float neg_mult = s.neg_lr / (std::sqrt(a) + s.eps);  // -lr / (sqrt(acc) + eps)
  for (int64_t j = 0; j < dim; ++j) w[j] = std::fma(g[j] * sign, neg_mult, w[j]);
}

FASTPS_ALWAYS_INLINE void adam_row(const Scalars& s, float nss, float* __restrict w,
                                   float* __restrict m, float* __restrict v,
                                   const float* __restrict g, int64_t dim) {
  const float sign = s.sign, c1 = s.c1, c2 = s.c2, eps = s.eps;
  for (int64_t i = 0; i < dim; ++i) {
    const float d = g[i] * sign;
    const float mi = m[i], vi = v[i];
    const float dm = (d - mi) * c1;              // grad.sub(old_exp_avg).mul_(1 - beta1)
    m[i] = mi + dm;                              // exp_avg.add_(sparse(dm))
    const float dv = (d * d - vi) * c2;          // grad.pow(2).sub_(old).mul_(1 - beta2)
    v[i] = vi + dv;                              // exp_avg_sq.add_(sparse(dv))
    const float numer = dm + mi;                 // dm.add_(old_exp_avg)
    const float denom = std::sqrt(dv + vi) + eps;  // dv.add_(old).sqrt_().add_(eps)
    w[i] = w[i] + (numer / denom) * nss;         // param.add_(sparse(-step_size * numer/denom))
  }
}

FASTPS_ALWAYS_INLINE void ftrl_row(const Scalars& s, float* __restrict w, float* __restrict z,
                                   float* __restrict n, const float* __restrict g, int64_t dim) {
  const float sign = s.sign, inv_lr = s.inv_lr, bol = s.beta_over_lr, two_l2 = s.two_l2, l1 = s.l1;
  for (int64_t i = 0; i < dim; ++i) {
    const float d = g[i] * sign;
    const float ni = n[i];
    const float nn = ni + d * d;
    const float sqrt_nn = std::sqrt(nn);
    const float sigma = (sqrt_nn - std::sqrt(ni)) * inv_lr;
    const float zi = (z[i] + d) - sigma * w[i];
    z[i] = zi;
    n[i] = nn;
    const float quad = (sqrt_nn * inv_lr + bol) + two_l2;
    const float wi = (std::copysign(l1, zi) - zi) / quad;  // (sign(z)*l1 - z) / quad
    w[i] = std::fabs(zi) <= l1 ? 0.0f : wi;
  }
}

// Rows ahead of the one being updated whose memory is asked for: a large
// table's rows are cache misses, and a row's update is too short to hide one
// (Note "Lookahead" in sparse_table.h).
constexpr int64_t kPrefetchRows = 2;

FASTPS_ALWAYS_INLINE void prefetch_row(const SparseRowRef* rows, int64_t r, int64_t n, int64_t dim,
                                       int64_t state_floats) {
  if (r + kPrefetchRows >= n) return;
  const SparseRowRef& x = rows[r + kPrefetchRows];
  prefetch_span<1>(x.weight, static_cast<size_t>(dim) * 4);
  if (state_floats > 0) prefetch_span<1>(x.state, static_cast<size_t>(state_floats) * 4);
  prefetch_span<0>(x.grad, static_cast<size_t>(dim) * 4);
}

FASTPS_ALWAYS_INLINE void apply_all(const SparseOptim& o, int64_t step, const SparseRowRef* rows,
                                    int64_t n, int64_t dim) {
  const Scalars s = make_scalars(o, step, dim);
  const int64_t sf = sparse_state_floats(o.rule, dim);
  switch (o.rule) {
    case SparseRule::kSGD:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        sgd_row(s, rows[r].weight, rows[r].grad, dim);
      }
      return;
    case SparseRule::kAdagrad:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        adagrad_row(s, rows[r].weight, rows[r].state, rows[r].grad, dim);
      }
      return;
    case SparseRule::kRowWiseAdagrad:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        rowwise_adagrad_row(s, rows[r].weight, rows[r].state, rows[r].grad, dim);
      }
      return;
    case SparseRule::kSparseAdam:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        adam_row(s, s.neg_step_size, rows[r].weight, rows[r].state, rows[r].state + dim, rows[r].grad, dim);
      }
      return;
    case SparseRule::kRowAdam:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        const float nss = static_cast<float>(-adam_step_size(s.lr, s.beta1, s.beta2, rows[r].row_step));
        adam_row(s, nss, rows[r].weight, rows[r].state, rows[r].state + dim, rows[r].grad, dim);
      }
      return;
    case SparseRule::kFtrl:
      for (int64_t r = 0; r < n; ++r) {
        prefetch_row(rows, r, n, dim, sf);
        ftrl_row(s, rows[r].weight, rows[r].state, rows[r].state + dim, rows[r].grad, dim);
      }
      return;
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void apply_avx2(const SparseOptim& o, int64_t step,
                                                     const SparseRowRef* rows, int64_t n,
                                                     int64_t dim) {
  apply_all(o, step, rows, n, dim);
}
#endif

}  // namespace

void sparse_optim_apply_generic(const SparseOptim& o, int64_t step, const SparseRowRef* rows,
                                int64_t n, int64_t dim) {
  apply_all(o, step, rows, n, dim);
}

void sparse_optim_apply(const SparseOptim& o, int64_t step, const SparseRowRef* rows, int64_t n,
                        int64_t dim) {
#if defined(__x86_64__)
  if (cpu_has_avx2_fma()) return apply_avx2(o, step, rows, n, dim);
#endif
  sparse_optim_apply_generic(o, step, rows, n, dim);
}

const char* sparse_optim_isa() { return cpu_has_avx2_fma() ? "avx2+fma" : "generic"; }

}  // namespace fastps
