// Fused sparse optimizers for embedding rows: one pass over a row's `dim`
// floats (and its optimizer state) per unique id per push.
//
// Note [Sparse rules]
// The rules and their formulas are in docs/sparse.md. Two of them reproduce a
// torch.optim sparse code path operation by operation on float32:
//  * kAdagrad = torch.optim.Adagrad on a sparse gradient:
//      sum += g*g (rounded product, then add); std = sqrt(sum) + eps;
//      w = fma(g / std, -clr, w)   (ATen's axpy); clr = lr / (1 + (step-1)*lr_decay)
//  * kSparseAdam = torch.optim.SparseAdam (functional.sparse_adam):
//      dm = (g - m)*(1-b1); m += dm; dv = (g*g - v)*(1-b2); v += dv;
//      denom = sqrt(dv + v_old) + eps; w = w + ((dm + m_old) / denom) * (-step_size)
//    with step_size = lr*sqrt(1-b2^step)/(1-b1^step) computed in double.
// Both use the table-wide `step`. kRowAdam is the same arithmetic with the
// bias corrections taken from the row's own step count (rows that are rarely
// pushed get full bias correction on each of their first steps, where
// SparseAdam's table-wide step has long made it ~1). kRowWiseAdagrad (one
// accumulator per row, FBGEMM's EXACT_ROWWISE_ADAGRAD) and kFtrl (FTRL-Proximal,
// TensorFlow's ApplyFtrlV2 with lr_power = -0.5) have no torch counterpart.
//
// Scalars are computed in double, as Python does, and rounded to float once.
// sparse_optim.cc is compiled with fp contraction off: only the fma calls
// written out are fused (see Note [Parity with torch.optim] in optimizer.h).
//
// Thread safety: none needed; a row is touched only by its shard's thread.
#pragma once

#include <cstdint>
#include <string>

namespace fastps {

enum class SparseRule : uint8_t {
  kSGD = 0,             // w -= lr * g
  kAdagrad = 1,         // torch.optim.Adagrad, sparse path; state: sum[dim]
  kRowWiseAdagrad = 2,  // FBGEMM row-wise Adagrad; state: 1 float per row
  kSparseAdam = 3,      // torch.optim.SparseAdam (lazy Adam); state: exp_avg[dim], exp_avg_sq[dim]
  kRowAdam = 4,         // lazy Adam with per-row bias correction; same state
  kFtrl = 5,            // FTRL-Proximal; state: z[dim], n[dim]
};
constexpr int kNumSparseRules = 6;

// One push's rule and hyperparameters (torch names where torch has the rule).
struct SparseOptim {
  SparseRule rule = SparseRule::kSGD;
  double lr = 0.01;
  double eps = 1e-8;
  bool maximize = false;
  // Adagrad, row-wise Adagrad
  double lr_decay = 0.0;                   // Adagrad only
  double initial_accumulator_value = 0.0;  // Adagrad, row-wise Adagrad, FTRL (n)
  // SparseAdam, RowAdam
  double beta1 = 0.9;
  double beta2 = 0.999;
  // FTRL
  double l1 = 0.0;
  double l2 = 0.0;
  double ftrl_beta = 0.0;
};

// Number of float state values a row of `dim` floats keeps under `rule`.
int64_t sparse_state_floats(SparseRule rule, int64_t dim);
const char* sparse_rule_name(SparseRule rule);
// Value each state float starts from when a row is created.
float sparse_state_init(const SparseOptim& o, int64_t index, int64_t dim);
// Throws InvalidArgument for a hyperparameter the rule cannot use.
void sparse_optim_validate(const SparseOptim& o);

// One row's pointers for a batched update.
struct SparseRowRef {
  float* weight;      // dim floats
  float* state;       // sparse_state_floats(rule, dim) floats
  const float* grad;  // dim floats
  int64_t row_step;   // the row's own step count, after this update (RowAdam)
};

// Applies the rule to `n` rows of `dim` floats. `step` is the table-wide step
// of this push (>= 1). Chooses an AVX2+FMA or a generic variant at run time;
// both give the same bits (every fma is written out, nothing else is fused).
void sparse_optim_apply(const SparseOptim& o, int64_t step, const SparseRowRef* rows, int64_t n,
                        int64_t dim);
// Same, always the generic variant (the reference for the fast path's tests).
void sparse_optim_apply_generic(const SparseOptim& o, int64_t step, const SparseRowRef* rows,
                                int64_t n, int64_t dim);
const char* sparse_optim_isa();

}  // namespace fastps
