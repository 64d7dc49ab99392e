// See table/row_pool.h.

#include "table/row_pool.h"

#include <algorithm>

#include "common/error.h"

namespace fastps {

namespace {

constexpr int64_t kMinPoolRows = 64;
// Populated-ahead window of a row pool (Note [Populating ahead]): twice the
// rows the last push made room for, within these bounds.
constexpr size_t kPopulateMin = size_t{2} << 20;
constexpr size_t kPopulateMax = size_t{16} << 20;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

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

}  // namespace fastps
