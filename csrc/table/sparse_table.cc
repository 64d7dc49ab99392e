// See the design note in sparse_table.h.

#include "table/sparse_table.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "common/hash.h"
#include "common/prefetch.h"
#include "table/table_file.h"

namespace fastps {

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int64_t kSlotAhead = 16;  // Note "Lookahead" in sparse_table.h
constexpr int64_t kRowAhead = 4;

inline uint64_t mix(uint64_t x) { return mix64(x); }

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

SparseTable::SparseTable(const SparseTableConfig& config, int64_t max_rows, int64_t max_pending,
                         uint64_t salt)
    : config_((sparse_config_validate(config), config)),
      state_floats_(sparse_state_floats(config.rule, config.dim)),
      row_bytes_(round_up(static_cast<int64_t>(sizeof(RowHeader)) +
                              4 * (config.dim + sparse_state_floats(config.rule, config.dim)),
                          16)),
      max_rows_(max_rows),
      max_pending_(std::max<int64_t>(1, max_pending)),
      pool_(row_bytes_, max_rows),
      rng_(mix(config.seed ^ mix(salt + kGolden))) {
  FASTPS_CHECK(max_rows >= 0, "fastps: max_rows must be >= 0");
}

SparseTable sparse_shard_table(const SparseTableConfig& c, int shard, int shards, const SparseSpread& spread) {
  return SparseTable(c, sparse_cap_share(sparse_server_rows(c, spread), shard, shards),
                     sparse_pending_share(sparse_pending_share(c.max_pending, spread.servers), shards),
                     static_cast<uint64_t>(shard));
}

SparseTableStats SparseTable::stats() const {
  SparseTableStats s = counters_;
  s.rows = map_.size();
  s.pending = pending_.size();
  s.memory_bytes = pool_.memory_bytes() + map_.memory_bytes() + pending_.memory_bytes() +
                   static_cast<int64_t>(refs_.capacity() * sizeof(SparseRowRef) +
                                        rows_.capacity() * sizeof(int64_t) + state_init_.capacity() * sizeof(float));
  return s;
}

uint64_t SparseTable::next_random() {
  rng_ += kGolden;
  return mix(rng_);
}

uint32_t SparseTable::lfu_count(const RowHeader& h) const {
  if (config_.eviction != Eviction::kLfu || config_.ttl_steps <= 0) return h.access_count;
  // Under SSP the step a push carries is its worker's own, so it can be
  // below a row's last access: no decay then (and no negative shift).
  const int64_t halvings = std::max<int64_t>(0, step_ - h.last_step) / config_.ttl_steps;
  return halvings >= 32 ? 0 : h.access_count >> halvings;
}

void SparseTable::touch(RowHeader& h) {
  const uint32_t count = lfu_count(h);  // before last_step moves: the decay since the last access
  h.last_step = std::max(h.last_step, step_);  // never backwards (SSP: steps per worker)
  h.touch = ++clock_;
  h.access_count = count == std::numeric_limits<uint32_t>::max() ? count : count + 1;
}

void SparseTable::remove_slot(int64_t slot) {
  pool_.release(static_cast<int64_t>(map_.slot_value(slot) - 1));
  map_.erase_slot(slot);
}

int64_t SparseTable::lookup_live(int64_t id) {
  const int64_t slot = map_.find(id);
  if (slot < 0) return -1;
  const int64_t row = static_cast<int64_t>(map_.slot_value(slot) - 1);
  if (expired(*header(row), step_)) {
    remove_slot(slot);
    ++counters_.expired;
    return -1;
  }
  return row;
}

int64_t SparseTable::locate(const int64_t* ids, const int64_t* index, int64_t n) {
  rows_.resize(static_cast<size_t>(n));
  int64_t missing = 0;
  for (int64_t k = 0; k < std::min(n, kSlotAhead); ++k) map_.prefetch(ids[index ? index[k] : k]);
  for (int64_t k = 0; k < n; ++k) {
    if (k + kSlotAhead < n) map_.prefetch(ids[index ? index[k + kSlotAhead] : k + kSlotAhead]);
    const int64_t slot = map_.find(ids[index ? index[k] : k]);
    missing += slot < 0;
    rows_[static_cast<size_t>(k)] = slot < 0 ? -1 : static_cast<int64_t>(map_.slot_value(slot) - 1);
  }
  return missing;
}

template <typename Sink>
void SparseTable::pull_into(const int64_t* ids, const int64_t* index, int64_t n, int64_t step, Sink& sink) {
  step_ = step;
  const int64_t dim = config_.dim;
  const size_t bytes = static_cast<size_t>(dim) * sizeof(float);
  // Under a TTL a lookup may free its row; elsewhere a pull changes no row's place.
  const bool ahead = config_.eviction != Eviction::kTtl;
  if (ahead) locate(ids, index, n);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = index ? index[k] : k;
    float* dst = sink.slot(i);
    int64_t row;
    if (ahead) {
      if (k + kRowAhead < n && rows_[static_cast<size_t>(k + kRowAhead)] >= 0)
        prefetch_span<1>(header(rows_[static_cast<size_t>(k + kRowAhead)]), sizeof(RowHeader) + bytes);
      row = rows_[static_cast<size_t>(k)];
    } else {
      row = lookup_live(ids[i]);
    }
    if (row >= 0) {
      std::memcpy(dst, weight(row), bytes);
      touch(*header(row));
    } else {
      sparse_init_values(config_, ids[i], dst);
    }
    sink.fan_out(i, dst);
  }
}

namespace {
struct DenseSink {  // row i at out + i * dim
  float* out;
  int64_t dim;
  float* slot(int64_t i) const { return out + i * dim; }
  void fan_out(int64_t, const float*) const {}
};
struct ChainSink {  // row i at every position of its chain
  float* out;
  const int64_t* first;
  const int64_t* next;
  int64_t dim;
  float* slot(int64_t i) const { return out + first[i] * dim; }
  void fan_out(int64_t i, const float* values) const {
    const size_t bytes = static_cast<size_t>(dim) * sizeof(float);
    for (int64_t p = next[first[i]]; p >= 0; p = next[p]) std::memcpy(out + p * dim, values, bytes);
  }
};
}  // namespace

void SparseTable::pull(const int64_t* ids, const int64_t* index, int64_t n, float* out, int64_t step) {
  DenseSink sink{out, config_.dim};
  pull_into(ids, index, n, step, sink);
}

void SparseTable::pull_scatter(const int64_t* ids, const int64_t* index, int64_t n, const int64_t* first,
                               const int64_t* next, float* out, int64_t step) {
  ChainSink sink{out, first, next, config_.dim};
  pull_into(ids, index, n, step, sink);
}

int64_t SparseTable::rows_needed(const int64_t* ids, const int64_t* index, int64_t n) const {
  const int64_t k_admit = config_.admit_threshold;
  int64_t needed = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t id = ids[index ? index[k] : k];
    const int64_t slot = map_.find(id);
    if (slot >= 0 && !expired(*header(static_cast<int64_t>(map_.slot_value(slot) - 1)), step_)) continue;
    if (k_admit > 1) {
      const int64_t ps = pending_.find(id);
      const uint64_t counted = ps >= 0 ? pending_.slot_value(ps) : 0;
      if (static_cast<int64_t>(counted) + 1 < k_admit) continue;
    }
    ++needed;
  }
  return needed;
}

void SparseTable::check_capacity(const int64_t* ids, const int64_t* index, int64_t n) const {
  if (config_.eviction != Eviction::kNone || max_rows_ == 0) return;
  const int64_t needed = rows_needed(ids, index, n);
  FASTPS_CHECK_TYPED(CapacityError, size() + needed <= max_rows_,
                     "fastps: sparse table is full: a push needs ", needed, " new rows on a shard holding ",
                     size(), " of its ", max_rows_, " (max_rows=", config_.max_rows,
                     " split over the shards). Raise max_rows or enable eviction "
                     "('lru', 'lfu' or 'ttl'); nothing was changed by this push");
}

bool SparseTable::admit(int64_t id) {
  const int64_t k_admit = config_.admit_threshold;
  if (k_admit <= 1) return true;
  const int64_t slot = pending_.find(id);
  if (slot >= 0) {
    const uint64_t counted = pending_.slot_value(slot) + 1;
    if (static_cast<int64_t>(counted) >= k_admit) {
      pending_.erase_slot(slot);
      return true;
    }
    pending_.set_slot_value(slot, counted);
    ++counters_.rejected;
    return false;
  }
  if (pending_.size() >= max_pending_) {
    // Drop the lowest count among sampled entries (that id starts over).
    int64_t victim = -1;
    for (int s = 0; s < config_.eviction_samples; ++s) {
      const int64_t c = pending_.occupied_from(next_random());
      if (victim < 0 || pending_.slot_value(c) < pending_.slot_value(victim)) victim = c;
    }
    pending_.erase_slot(victim);
  }
  pending_.insert(id, 1);
  ++counters_.rejected;
  return false;
}

void SparseTable::flush_updates(const SparseOptim& o) {
  if (refs_.empty()) return;
  sparse_optim_apply(o, step_, refs_.data(), static_cast<int64_t>(refs_.size()), config_.dim);
  refs_.clear();
}

void SparseTable::evict_one(const SparseOptim& o) {
  const bool lfu = config_.eviction == Eviction::kLfu;
  int64_t best = -1;
  bool best_current = true;
  uint64_t best_primary = 0, best_touch = 0;
  for (int s = 0; s < config_.eviction_samples; ++s) {
    const int64_t slot = map_.occupied_from(next_random());
    const RowHeader& h = *header(static_cast<int64_t>(map_.slot_value(slot) - 1));
    const bool current = h.touch >= call_start_;  // touched by this push
    const uint64_t primary = lfu ? lfu_count(h) : h.touch;
    const bool better = best < 0 || (!current && best_current) ||
                        (current == best_current &&
                         (primary < best_primary || (primary == best_primary && h.touch < best_touch)));
    if (better) {
      best = slot;
      best_current = current;
      best_primary = primary;
      best_touch = h.touch;
    }
  }
  FASTPS_ASSERT(best >= 0);
  // The victim may be waiting for this push's update: apply the pending
  // updates before its memory can be reused.
  if (best_current) flush_updates(o);
  const RowHeader& h = *header(static_cast<int64_t>(map_.slot_value(best) - 1));
  if (expired(h, step_))
    ++counters_.expired;
  else
    ++counters_.evicted;
  remove_slot(best);
}

int64_t SparseTable::create_row(int64_t id, const SparseOptim& o) {
  if (max_rows_ > 0 && map_.size() >= max_rows_) {
    FASTPS_CHECK_TYPED(CapacityError, config_.eviction != Eviction::kNone,
                       "fastps: sparse table is full (max_rows=", config_.max_rows,
                       "); raise max_rows or enable eviction");
    evict_one(o);
  }
  const int64_t row = pool_.allocate();
  map_.insert(id, static_cast<uint64_t>(row) + 1);
  RowHeader* h = header(row);
  *h = RowHeader{id, step_, 0, 0, 0};
  sparse_init_values(config_, id, weight(row));
  if (state_floats_ > 0)  // SGD has no state: state_init_ is empty and its data() may be null
    std::memcpy(state(row), state_init_.data(), static_cast<size_t>(state_floats_) * sizeof(float));
  ++counters_.admitted;
  return row;
}

void SparseTable::sweep_expired(int64_t budget) {
  if (map_.size() == 0) return;
  const int64_t cap = map_.capacity();
  uint64_t i = sweep_cursor_ & static_cast<uint64_t>(cap - 1);
  for (int64_t b = 0; b < budget && b < cap; ++b) {
    const uint64_t v = map_.slot_value(static_cast<int64_t>(i));
    if (v != 0 && expired(*header(static_cast<int64_t>(v - 1)), step_)) {
      remove_slot(static_cast<int64_t>(i));  // a later entry may shift into slot i: look again
      ++counters_.expired;
      continue;
    }
    i = (i + 1) & static_cast<uint64_t>(cap - 1);
  }
  sweep_cursor_ = i;
}

void SparseTable::fill_state_template(const SparseOptim& o) {
  state_init_.resize(static_cast<size_t>(state_floats_));
  for (int64_t j = 0; j < state_floats_; ++j) state_init_[static_cast<size_t>(j)] = sparse_state_init(o, j, config_.dim);
}

void SparseTable::push(const int64_t* ids, const int64_t* index, int64_t n, const float* grads,
                       const SparseOptim& o, int64_t step) {
  sparse_check_push(config_, o, step, "this table");
  step_ = step;
  check_capacity(ids, index, n);
  if (config_.eviction == Eviction::kTtl) sweep_expired(64 + 2 * n);
  fill_state_template(o);
  const int64_t dim = config_.dim;
  // Without eviction no new row frees another, so ids can be looked up ahead.
  const bool ahead = config_.eviction == Eviction::kNone;
  const int64_t fresh = ahead ? locate(ids, index, n) : n;  // rows this push may create
  pool_.reserve(fresh);  // row pointers taken below must survive this push's new rows
  call_start_ = clock_ + 1;
  refs_.clear();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = index ? index[k] : k;
    const int64_t id = ids[i];
    int64_t row;
    if (ahead) {
      if (k + kRowAhead < n && rows_[static_cast<size_t>(k + kRowAhead)] >= 0)
        prefetch_span<1>(header(rows_[static_cast<size_t>(k + kRowAhead)]), sizeof(RowHeader));
      row = rows_[static_cast<size_t>(k)];
      if (row < 0) {  // an id repeated in this push may have got its row by now (ids should be unique)
        const int64_t slot = map_.find(id);
        if (slot >= 0) row = static_cast<int64_t>(map_.slot_value(slot) - 1);
      }
    } else {
      row = lookup_live(id);
    }
    if (row < 0) {
      if (!admit(id)) continue;
      row = create_row(id, o);
    }
    RowHeader& h = *header(row);
    touch(h);
    if (h.step_count != std::numeric_limits<uint32_t>::max()) ++h.step_count;
    refs_.push_back(SparseRowRef{weight(row), state(row), grads + i * dim, static_cast<int64_t>(h.step_count)});
  }
  flush_updates(o);
}

void SparseTable::write_section(SparseFileWriter& w) const {
  const size_t record = sizeof(RowHeader) + 4 * static_cast<size_t>(config_.dim + state_floats_);
  w.put<uint64_t>(static_cast<uint64_t>(map_.size()));
  w.put<uint64_t>(static_cast<uint64_t>(pending_.size()));
  map_.for_each([&](int64_t, uint64_t v) { w.write(pool_.row(static_cast<int64_t>(v - 1)), record); });
  pending_.for_each([&](int64_t id, uint64_t count) {
    w.put<int64_t>(id);
    w.put<uint64_t>(count);
  });
}

void SparseTable::append_section(std::vector<uint8_t>& out) const {
  const size_t record = sizeof(RowHeader) + 4 * static_cast<size_t>(config_.dim + state_floats_);
  const size_t at = out.size();
  out.resize(at + 16 + record * static_cast<size_t>(map_.size()) + 16 * static_cast<size_t>(pending_.size()));
  uint8_t* p = out.data() + at;
  const uint64_t counts[2] = {static_cast<uint64_t>(map_.size()), static_cast<uint64_t>(pending_.size())};
  std::memcpy(p, counts, 16);  // the file format is little-endian, as the row records (memcpy'd) are
  p += 16;
  map_.for_each([&](int64_t, uint64_t v) {
    std::memcpy(p, pool_.row(static_cast<int64_t>(v - 1)), record);
    p += record;
  });
  pending_.for_each([&](int64_t id, uint64_t count) {
    std::memcpy(p, &id, 8);
    std::memcpy(p + 8, &count, 8);
    p += 16;
  });
}

void SparseTable::load_row(const RowHeader& h, const float* values) {
  FASTPS_CHECK_TYPED(CheckpointError, map_.find(h.id) < 0, "fastps: corrupt sparse table file: id ", h.id,
                     " appears twice");
  sparse_check_file_rows(config_, map_.size() + 1, max_rows_, "");
  const int64_t row = pool_.allocate();
  map_.insert(h.id, static_cast<uint64_t>(row) + 1);
  std::memcpy(header(row), &h, sizeof(RowHeader));
  std::memcpy(weight(row), values, 4 * static_cast<size_t>(config_.dim + state_floats_));
  clock_ = std::max(clock_, h.touch);
}

void SparseTable::load_pending(int64_t id, uint64_t count) {
  FASTPS_CHECK_TYPED(CheckpointError, count >= 1 && pending_.find(id) < 0,
                     "fastps: corrupt sparse table file: bad admission count for id ", id);
  if (pending_.size() >= max_pending_) return;  // over this table's bound: that id starts over
  pending_.insert(id, count);
}

}  // namespace fastps
