// See the design note in sparse_table.h.
//
// Contraction stays off here as well: the initial values must be the same
// bits on every platform (a + (b - a) * u must not become an fma on one and
// not on another).

#include "table/sparse_table.h"

#include "common/hash.h"
#include "common/prefetch.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the table file format is little-endian and written natively");

namespace fastps {

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr char kFileMagic[8] = {'F', 'A', 'S', 'T', 'P', 'S', 'S', 'P'};
constexpr char kEndMagic[8] = {'F', 'P', 'S', 'S', 'P', 'E', 'N', 'D'};
constexpr uint32_t kFileVersion = 1;
constexpr uint32_t kHeaderBytes = 128;
constexpr int64_t kMinPoolRows = 64;
// Populated-ahead window of a row pool (Note [Populating ahead]): twice the
// rows the last push made room for, within these bounds.
constexpr size_t kPopulateMin = size_t{2} << 20;
constexpr size_t kPopulateMax = size_t{16} << 20;
constexpr int64_t kSlotAhead = 16;  // Note "Lookahead" in sparse_table.h
constexpr int64_t kRowAhead = 4;
constexpr size_t kWriteBuffer = 1 << 20;

inline uint64_t mix(uint64_t x) { return mix64(x); }

inline double unit(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }  // [0, 1)

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

const char* sparse_init_name(SparseInit init) {
  switch (init) {
    case SparseInit::kZeros: return "zeros";
    case SparseInit::kUniform: return "uniform";
    case SparseInit::kNormal: return "normal";
  }
  return "?";
}

const char* eviction_name(Eviction e) {
  switch (e) {
    case Eviction::kNone: return "none";
    case Eviction::kLru: return "lru";
    case Eviction::kLfu: return "lfu";
    case Eviction::kTtl: return "ttl";
  }
  return "?";
}

void sparse_config_validate(const SparseTableConfig& c) {
  FASTPS_CHECK(c.dim >= 1 && c.dim <= (int64_t{1} << 24), "fastps: sparse table dim must be in [1, 2^24], got ",
               c.dim);
  FASTPS_CHECK(static_cast<int>(c.rule) < kNumSparseRules, "fastps: unknown sparse rule ",
               static_cast<int>(c.rule));
  FASTPS_CHECK(static_cast<int>(c.init) <= 2, "fastps: unknown initialiser ", static_cast<int>(c.init));
  FASTPS_CHECK(static_cast<int>(c.eviction) <= 3, "fastps: unknown eviction policy ",
               static_cast<int>(c.eviction));
  if (c.init == SparseInit::kUniform)
    FASTPS_CHECK(std::isfinite(c.init_a) && std::isfinite(c.init_b) && c.init_a <= c.init_b,
                 "fastps: uniform initialiser needs finite low <= high, got (", c.init_a, ", ", c.init_b, ")");
  if (c.init == SparseInit::kNormal)
    FASTPS_CHECK(std::isfinite(c.init_a) && std::isfinite(c.init_b) && c.init_b >= 0.0,
                 "fastps: normal initialiser needs a finite mean and std >= 0, got (", c.init_a, ", ",
                 c.init_b, ")");
  FASTPS_CHECK(c.max_rows >= 0, "fastps: max_rows must be >= 0 (0: no cap), got ", c.max_rows);
  FASTPS_CHECK(c.ttl_steps >= 0, "fastps: ttl_steps must be >= 0, got ", c.ttl_steps);
  if (c.eviction == Eviction::kTtl)
    FASTPS_CHECK(c.ttl_steps >= 1, "fastps: eviction 'ttl' needs ttl_steps >= 1");
  FASTPS_CHECK(c.admit_threshold >= 0 && c.admit_threshold <= (int64_t{1} << 32),
               "fastps: admit_threshold must be in [0, 2^32], got ", c.admit_threshold);
  FASTPS_CHECK(c.max_pending >= 1, "fastps: max_pending must be >= 1, got ", c.max_pending);
  FASTPS_CHECK(c.eviction_samples >= 1 && c.eviction_samples <= 1024,
               "fastps: eviction_samples must be in [1, 1024], got ", c.eviction_samples);
}

namespace {
// The uniform initialiser's loop, compiled twice (as the sparse optimizer
// kernels are): the 64-bit multiplies of mix64 vectorise only with AVX-512DQ
// (vpmullq), so a row's initial values take ~8x fewer instructions there.
// Same bits either way: integer hashing, exact int -> double conversion,
// then a + width * u as a double multiply and a double add (contraction is
// off in this file), rounded to float once.
inline __attribute__((always_inline)) void uniform_fill(uint64_t base, double a, double width, float* out,
                                                        int64_t dim) {
  for (int64_t j = 0; j < dim; ++j) {
    const double u = unit(mix(base + static_cast<uint64_t>(j + 1) * kGolden));
    out[j] = static_cast<float>(a + width * u);
  }
}

void uniform_fill_generic(uint64_t base, double a, double width, float* out, int64_t dim) {
  uniform_fill(base, a, width, out, dim);
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512dq,avx512vl"))) void uniform_fill_avx512(uint64_t base, double a,
                                                                              double width, float* out,
                                                                              int64_t dim) {
  uniform_fill(base, a, width, out, dim);
}

bool cpu_has_avx512dq() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
}
#endif
}  // namespace

void sparse_init_values(const SparseTableConfig& c, int64_t id, float* out) {
  const int64_t dim = c.dim;
  if (c.init == SparseInit::kZeros) {
    std::fill(out, out + dim, 0.0f);
    return;
  }
  const uint64_t base = mix(static_cast<uint64_t>(id) ^ mix(c.seed + kGolden));
  const double a = c.init_a, b = c.init_b;
  if (c.init == SparseInit::kUniform) {
#if defined(__x86_64__)
    if (cpu_has_avx512dq()) return uniform_fill_avx512(base, a, b - a, out, dim);
#endif
    return uniform_fill_generic(base, a, b - a, out, dim);
  }
  constexpr double kTwoPi = 2.0 * 3.141592653589793;
  for (int64_t j = 0; j < dim; ++j) {
    const uint64_t k = static_cast<uint64_t>(2 * j);
    const double u1 = 1.0 - unit(mix(base + (k + 1) * kGolden));  // (0, 1]
    const double u2 = unit(mix(base + (k + 2) * kGolden));
    const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
    out[j] = static_cast<float>(a + b * z);
  }
}

// ---------------------------------------------------------------- IdMap

IdMap::IdMap(int64_t min_capacity) {
  int64_t cap = 16;
  while (cap < min_capacity) cap *= 2;
  buf_ = MappedBuffer(static_cast<size_t>(cap) * sizeof(Slot));  // zero: every slot empty
  mask_ = static_cast<uint64_t>(cap - 1);
}

void IdMap::insert(int64_t id, uint64_t value) {
  FASTPS_ASSERT(value != 0);
  if ((size_ + 1) * 10 > capacity() * 7) grow();
  uint64_t i = home(id);
  while (slots()[i].value != 0) i = (i + 1) & mask_;
  slots()[i] = Slot{id, value};
  ++size_;
}

void IdMap::grow() {
  const int64_t old_cap = capacity();
  MappedBuffer old(static_cast<size_t>(2 * old_cap) * sizeof(Slot));
  std::swap(old, buf_);
  mask_ = static_cast<uint64_t>(2 * old_cap - 1);
  const Slot* from = reinterpret_cast<const Slot*>(old.data());
  for (int64_t k = 0; k < old_cap; ++k) {
    const Slot& s = from[k];
    if (s.value == 0) continue;
    uint64_t i = home(s.id);
    while (slots()[i].value != 0) i = (i + 1) & mask_;
    slots()[i] = s;
  }
}

void IdMap::erase_slot(int64_t slot) {
  Slot* const t = slots();
  uint64_t i = static_cast<uint64_t>(slot);
  FASTPS_ASSERT(t[i].value != 0);
  uint64_t j = i;
  while (true) {
    j = (j + 1) & mask_;
    if (t[j].value == 0) break;
    const uint64_t k = home(t[j].id);
    // Leave the entry where it is if its home lies cyclically in (i, j].
    const bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
    if (stays) continue;
    t[i] = t[j];
    i = j;
  }
  t[i] = Slot{0, 0};
  --size_;
}

int64_t IdMap::occupied_from(uint64_t start) const {
  if (size_ == 0) return -1;
  uint64_t i = start & mask_;
  while (slots()[i].value == 0) i = (i + 1) & mask_;
  return static_cast<int64_t>(i);
}

// ---------------------------------------------------------------- RowPool

RowPool::RowPool(int64_t row_bytes, int64_t max_rows) : row_bytes_(row_bytes), max_rows_(max_rows) {
  FASTPS_ASSERT(row_bytes > 0);
}

void RowPool::reserve(int64_t n) {
  const int64_t fresh = std::max<int64_t>(0, n - static_cast<int64_t>(free_.size()));
  int64_t needed = high_water_ + fresh;
  // At max_rows_ live rows a new one reuses an evicted row: no more are ever handed out.
  if (max_rows_ > 0) needed = std::max(high_water_ + 1, std::min(needed, max_rows_));
  if (needed > capacity_) {
    int64_t cap = std::max<int64_t>({needed, 2 * capacity_, kMinPoolRows});
    if (max_rows_ > 0) cap = std::max(needed, std::min(cap, max_rows_));
    try {
      buf_.grow(static_cast<size_t>(cap) * static_cast<size_t>(row_bytes_));
    } catch (const std::bad_alloc&) {
      if (cap == needed) throw;
      cap = needed;  // no room to double: grow by what this call needs only
      buf_.grow(static_cast<size_t>(cap) * static_cast<size_t>(row_bytes_));
    }
    capacity_ = cap;
  }
  populate_ahead(fresh);
}

void RowPool::populate_ahead(int64_t fresh) {
  // Note [Populating ahead]: the rows after the `fresh` ones this call makes
  // room for are the next calls' new rows; have their pages backed meanwhile.
  // Small pools fault rarely: left alone.
  if (buf_.size() < MappedBuffer::kHugePageFrom) return;
  const size_t row = static_cast<size_t>(row_bytes_);
  const size_t next = static_cast<size_t>(high_water_ + fresh) * row;
  const size_t window = std::clamp(2 * static_cast<size_t>(fresh) * row, kPopulateMin, kPopulateMax);
  const size_t want = std::min(next + window, buf_.size());
  if (want <= populated_) return;
  buf_.populate_async(std::max(populated_, next), want);
  populated_ = want;
}

int64_t RowPool::allocate() {
  if (!free_.empty()) {
    const int64_t r = free_.back();
    free_.pop_back();
    return r;
  }
  if (high_water_ == capacity_) reserve(1);
  return high_water_++;
}

int64_t RowPool::memory_bytes() const {
  const int64_t page = buf_.size() >= MappedBuffer::kHugePageFrom ? int64_t{2} << 20 : int64_t{4} << 10;
  const int64_t touched = std::min(round_up(high_water_ * row_bytes_, page), static_cast<int64_t>(buf_.size()));
  return touched + static_cast<int64_t>(free_.capacity() * sizeof(int64_t));
}

// ---------------------------------------------------------------- SparseTable

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

SparseTable sparse_shard_table(const SparseTableConfig& c, int shard, int shards) {
  return SparseTable(c, sparse_cap_share(c.max_rows, shard, shards), sparse_pending_share(c.max_pending, shards),
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
  FASTPS_CHECK(o.rule == config_.rule, "fastps: push with rule '", sparse_rule_name(o.rule),
               "' on a table created for '", sparse_rule_name(config_.rule),
               "' (the optimizer state layout differs)");
  FASTPS_CHECK(step >= 1, "fastps: the table step must be >= 1, got ", step);
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
  FASTPS_CHECK_TYPED(CapacityError, max_rows_ == 0 || map_.size() < max_rows_,
                     "fastps: the file holds more rows than this table's cap (max_rows=", config_.max_rows,
                     "); load it into a table with a larger max_rows");
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

// ---------------------------------------------------------------- files

namespace {
std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::atomic<uint64_t> g_tmp_counter{0};
}  // namespace

SparseFileWriter::SparseFileWriter(const std::string& path) : path_(path) {
  FASTPS_CHECK(!path.empty(), "fastps: empty file name");
  tmp_ = path + ".tmp." + std::to_string(::getpid()) + "." +
         std::to_string(g_tmp_counter.fetch_add(1, std::memory_order_relaxed));
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FASTPS_CHECK_TYPED(CheckpointError, fd_ >= 0, "fastps: cannot create ", tmp_, ": ", errno_text(errno));
  buf_.reserve(kWriteBuffer);
}

SparseFileWriter::~SparseFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void SparseFileWriter::flush() {
  const unsigned char* p = buf_.data();
  size_t left = buf_.size();
  while (left > 0) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0 && errno == EINTR) continue;
    FASTPS_CHECK_TYPED(CheckpointError, w > 0, "fastps: writing ", tmp_, " failed: ", errno_text(errno));
    p += w;
    left -= static_cast<size_t>(w);
  }
  buf_.clear();
}

void SparseFileWriter::write(const void* data, size_t n) {
  sha_.update(data, n);
  const unsigned char* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    if (buf_.size() == kWriteBuffer) flush();
    const size_t take = std::min(n, kWriteBuffer - buf_.size());
    buf_.insert(buf_.end(), p, p + take);
    p += take;
    n -= take;
  }
}

void SparseFileWriter::commit() {
  FASTPS_ASSERT(!committed_ && fd_ >= 0);
  write(kEndMagic, sizeof(kEndMagic));
  const Sha256Digest digest = sha_.finish();
  buf_.insert(buf_.end(), digest.begin(), digest.end());  // the digest is not hashed
  flush();
  FASTPS_CHECK_TYPED(CheckpointError, ::fsync(fd_) == 0, "fastps: fsync of ", tmp_, " failed: ", errno_text(errno));
  const int fd = fd_;
  fd_ = -1;
  FASTPS_CHECK_TYPED(CheckpointError, ::close(fd) == 0, "fastps: closing ", tmp_, " failed: ", errno_text(errno));
  FASTPS_CHECK_TYPED(CheckpointError, ::rename(tmp_.c_str(), path_.c_str()) == 0, "fastps: renaming ", tmp_,
                     " to ", path_, " failed: ", errno_text(errno));
  committed_ = true;
  const std::string dir = dir_of(path_);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  FASTPS_CHECK_TYPED(CheckpointError, dfd >= 0, "fastps: cannot open directory ", dir, ": ", errno_text(errno));
  const int rc = ::fsync(dfd);
  const int saved = errno;
  ::close(dfd);
  errno = saved;
  FASTPS_CHECK_TYPED(CheckpointError, rc == 0, "fastps: fsync of directory ", dir, " failed: ", errno_text(errno));
}

SparseFileReader::SparseFileReader(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "rb");
  FASTPS_CHECK_TYPED(CheckpointError, f_ != nullptr, "fastps: cannot open ", path, ": ", errno_text(errno));
  struct stat st;
  FASTPS_CHECK_TYPED(CheckpointError, ::fstat(::fileno(f_), &st) == 0, "fastps: cannot stat ", path, ": ",
                     errno_text(errno));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t trailer = sizeof(kEndMagic) + kSha256DigestSize;
  FASTPS_CHECK_TYPED(CheckpointError, size >= kHeaderBytes + trailer, "fastps: ", path,
                     " is truncated or not a fastps sparse table file (", size, " bytes)");
  data_end_ = size - trailer;
}

SparseFileReader::~SparseFileReader() {
  if (f_ != nullptr) std::fclose(f_);
}

void SparseFileReader::read(void* data, size_t n) {
  FASTPS_CHECK_TYPED(CheckpointError, n <= remaining(), "fastps: ", path_,
                     " is truncated or corrupt (a record runs past the end of the data)");
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(data, 1, n, f_) == n, "fastps: reading ", path_,
                     " failed: ", errno_text(errno));
  sha_.update(data, n);
  pos_ += n;
}

bool SparseFileReader::digest_ok() {
  unsigned char chunk[1 << 14];
  uint64_t left = data_end_ - pos_ + sizeof(kEndMagic);
  while (left > 0) {
    const size_t take = static_cast<size_t>(std::min<uint64_t>(left, sizeof(chunk)));
    if (std::fread(chunk, 1, take, f_) != take) return false;
    sha_.update(chunk, take);
    left -= take;
  }
  Sha256Digest stored;
  if (std::fread(stored.data(), 1, stored.size(), f_) != stored.size()) return false;
  const Sha256Digest actual = sha_.finish();
  return constant_time_equal(stored.data(), actual.data(), stored.size());
}

void SparseFileReader::finish() {
  FASTPS_CHECK_TYPED(CheckpointError, remaining() == 0, "fastps: ", path_,
                     " is corrupt: ", remaining(), " unexpected bytes before the end marker");
  char end[sizeof(kEndMagic)];
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(end, 1, sizeof(end), f_) == sizeof(end), "fastps: reading ",
                     path_, " failed");
  sha_.update(end, sizeof(end));
  Sha256Digest stored;
  FASTPS_CHECK_TYPED(CheckpointError, std::fread(stored.data(), 1, stored.size(), f_) == stored.size(),
                     "fastps: reading ", path_, " failed");
  const Sha256Digest actual = sha_.finish();
  FASTPS_CHECK_TYPED(CheckpointError,
                     std::memcmp(end, kEndMagic, sizeof(end)) == 0 &&
                         constant_time_equal(stored.data(), actual.data(), stored.size()),
                     "fastps: ", path_, " is corrupt (SHA-256 checksum mismatch)");
  FASTPS_CHECK_TYPED(CheckpointError, std::fgetc(f_) == EOF, "fastps: ", path_,
                     " is corrupt (data after the checksum)");
}

void write_sparse_header(SparseFileWriter& w, const SparseTableConfig& c, int64_t step,
                         uint32_t num_sections) {
  const int64_t state = sparse_state_floats(c.rule, c.dim);
  w.write(kFileMagic, sizeof(kFileMagic));
  w.put<uint32_t>(kFileVersion);
  w.put<uint32_t>(kHeaderBytes);
  w.put<int64_t>(c.dim);
  w.put<int64_t>(state);
  w.put<uint32_t>(static_cast<uint32_t>(c.rule));
  w.put<uint32_t>(static_cast<uint32_t>(c.init));
  w.put<double>(c.init_a);
  w.put<double>(c.init_b);
  w.put<uint64_t>(c.seed);
  w.put<uint32_t>(static_cast<uint32_t>(c.eviction));
  w.put<uint32_t>(static_cast<uint32_t>(c.eviction_samples));
  w.put<int64_t>(c.max_rows);
  w.put<int64_t>(c.ttl_steps);
  w.put<int64_t>(c.admit_threshold);
  w.put<int64_t>(c.max_pending);
  w.put<int64_t>(step);
  w.put<int64_t>(static_cast<int64_t>(sizeof(RowHeader)) + 4 * (c.dim + state));
  w.put<uint32_t>(num_sections);
  w.put<uint32_t>(0);
}

SparseFileHeader read_sparse_header(SparseFileReader& r) {
  char magic[sizeof(kFileMagic)];
  r.read(magic, sizeof(magic));
  FASTPS_CHECK_TYPED(CheckpointError, std::memcmp(magic, kFileMagic, sizeof(magic)) == 0,
                     "fastps: not a fastps sparse table file (bad magic)");
  const uint32_t version = r.get<uint32_t>();
  FASTPS_CHECK_TYPED(CheckpointError, version == kFileVersion, "fastps: sparse table file version ", version,
                     " is not supported (this build reads version ", kFileVersion, ")");
  FASTPS_CHECK_TYPED(CheckpointError, r.get<uint32_t>() == kHeaderBytes,
                     "fastps: corrupt sparse table file (header size)");
  SparseFileHeader h;
  SparseTableConfig& c = h.config;
  c.dim = r.get<int64_t>();
  h.state_floats = r.get<int64_t>();
  const uint32_t rule = r.get<uint32_t>();
  const uint32_t init = r.get<uint32_t>();
  c.init_a = r.get<double>();
  c.init_b = r.get<double>();
  c.seed = r.get<uint64_t>();
  const uint32_t eviction = r.get<uint32_t>();
  c.eviction_samples = static_cast<int>(r.get<uint32_t>());
  c.max_rows = r.get<int64_t>();
  c.ttl_steps = r.get<int64_t>();
  c.admit_threshold = r.get<int64_t>();
  c.max_pending = r.get<int64_t>();
  h.step = r.get<int64_t>();
  h.record_bytes = r.get<int64_t>();
  h.num_sections = r.get<uint32_t>();
  r.get<uint32_t>();
  FASTPS_CHECK_TYPED(CheckpointError,
                     rule < kNumSparseRules && init <= 2 && eviction <= 3 && c.dim >= 1 &&
                         c.dim <= (int64_t{1} << 24) && h.step >= 0,
                     "fastps: corrupt sparse table file (header fields out of range)");
  c.rule = static_cast<SparseRule>(rule);
  c.init = static_cast<SparseInit>(init);
  c.eviction = static_cast<Eviction>(eviction);
  FASTPS_CHECK_TYPED(CheckpointError,
                     h.state_floats == sparse_state_floats(c.rule, c.dim) &&
                         h.record_bytes == static_cast<int64_t>(sizeof(RowHeader)) + 4 * (c.dim + h.state_floats),
                     "fastps: corrupt sparse table file (row layout)");
  return h;
}

}  // namespace fastps
