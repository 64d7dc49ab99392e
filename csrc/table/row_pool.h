// RowPool: the rows of a sparse table in one growing mapping (see the design
// note in table/sparse_table.h: "Rows live in a row pool"). One thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/mapped_buffer.h"

namespace fastps {

// Fixed-size rows in one growing mapping (Note [Mapped table memory]), with a
// free list. Row r is at data + r * row_bytes; the mapping is page-aligned.
class RowPool {
 public:
  // `max_rows` > 0: the pool never needs more rows than that.
  RowPool(int64_t row_bytes, int64_t max_rows);

  // Room for `n` more allocate() calls without growing, so row pointers taken
  // now stay valid over them. Growing may move every row.
  void reserve(int64_t n);
  int64_t allocate();
  void release(int64_t row) { free_.push_back(row); }
  unsigned char* row(int64_t r) const { return buf_.data() + r * row_bytes_; }
  // Bytes of rows handed out so far, in whole pages (what the table has
  // touched; the rest of the mapping is address space only).
  int64_t memory_bytes() const;

 private:
  void populate_ahead(int64_t fresh);

  int64_t row_bytes_;
  int64_t max_rows_;
  int64_t capacity_ = 0;    // rows the mapping holds
  int64_t high_water_ = 0;  // rows ever handed out
  size_t populated_ = 0;    // bytes asked to be populated (Note [Populating ahead])
  MappedBuffer buf_;
  std::vector<int64_t> free_;
};

}  // namespace fastps
