#include "table/dense_table.h"

#include "common/error.h"

namespace fastps {

void DenseTable::bind(uint64_t key, float* param, int64_t numel, float* const* state, int num_state) {
  FASTPS_CHECK(num_state >= 0 && num_state <= kMaxStateBuffers, "bad state buffer count ", num_state);
  DenseChunk& c = chunks_[key];
  c.param = param;
  c.numel = numel;
  c.num_state = num_state;
  for (int i = 0; i < kMaxStateBuffers; ++i) c.state[i] = i < num_state ? state[i] : nullptr;
}

DenseChunk& DenseTable::at(uint64_t key) {
  auto it = chunks_.find(key);
  FASTPS_CHECK(it != chunks_.end(), "fastps: unknown dense key ", key, " (was the tensor registered?)");
  return it->second;
}

void DenseTable::update(uint64_t key, const float* grad, int64_t numel, const OptimHyper& hyper,
                        double step, bool first_step) {
  DenseChunk& c = at(key);
  FASTPS_CHECK(numel == c.numel, "fastps: gradient chunk has ", numel, " elements, table has ",
               c.numel);
  FASTPS_CHECK(optim_state_count(hyper) <= c.num_state, "fastps: chunk ", key, " holds ", c.num_state,
               " state buffers, the optimizer needs ", optim_state_count(hyper));
  optim_update(hyper, step, first_step, c.param, grad, c.state, numel);
}

void OwnedDenseChunk::ensure_state(const OptimHyper& h) {
  const int need = optim_state_count(h);
  for (int i = 0; i < need; ++i) {
    if (state[i].size() == size_t(numel)) continue;
    const float init = h.kind == OptimKind::kAdagrad ? float(h.initial_accumulator_value) : 0.0f;
    state[i].assign(size_t(numel), init);
  }
}

std::vector<float>& OwnedDenseChunk::buffer(uint32_t buf) {
  if (buf == 0) return param;
  FASTPS_CHECK(buf <= kMaxStateBuffers, "state buffer ", buf, " does not exist");
  if (state[buf - 1].size() != size_t(numel)) state[buf - 1].assign(size_t(numel), 0.0f);
  return state[buf - 1];
}

void OwnedDenseChunk::apply(const OptimHyper& h, const float* grad) {
  ensure_state(h);
  float* st[kMaxStateBuffers] = {state[0].data(), state[1].data(), state[2].data()};
  double s = 1.0;
  if (h.kind != OptimKind::kSGD) {
    step += 1.0f;
    s = step;
  }
  optim_update(h, s, fresh, param.data(), grad, st, numel);
  fresh = false;
}

}  // namespace fastps
