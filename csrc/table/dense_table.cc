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

}  // namespace fastps
