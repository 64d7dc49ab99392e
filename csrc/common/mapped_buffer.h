// MappedBuffer: anonymous memory taken straight from the kernel, for the
// sparse tables' rows and index.
//
// Note [Mapped table memory]
// A sparse table grows by a few thousand random rows per step and is read at
// random afterwards. Two costs dominate once it outgrows the caches: a page
// fault per 4 KiB of new rows (with the page cleared) and a TLB miss per
// random access. So the table memory is one mapping per table and shard:
//  * mmap'd, zero-filled by the kernel and backed page by page on first
//    touch, so reserving capacity costs address space, not memory;
//  * grown in place or moved by mremap(MREMAP_MAYMOVE), which moves the page
//    tables, never the bytes (pointers into it are invalid after a grow);
//  * once it is at least kHugePageFrom bytes, advised MADV_HUGEPAGE, so the
//    kernel backs it with 2 MiB pages where it can (one fault and one TLB
//    entry per 2 MiB). Smaller buffers keep 4 KiB pages: a table of a few
//    rows must not cost 2 MiB of resident memory. The advice is a hint; where
//    transparent huge pages are off, nothing changes but speed.
//    FASTPS_HUGE_PAGES=0 turns the advice off. Measured (bench/README.md):
//    rows of a warm 1M-row table are pulled and pushed ~15% faster, while
//    creating rows costs ~15% more (a fault clears 2 MiB at once).
// Not thread-safe; one owner (the shard thread of its table).
#pragma once

#include <cstddef>

namespace fastps {

class MappedBuffer {
 public:
  static constexpr size_t kHugePageFrom = size_t{4} << 20;

  MappedBuffer() = default;
  // `bytes` zero bytes (rounded up to whole pages). Throws std::bad_alloc.
  explicit MappedBuffer(size_t bytes);
  ~MappedBuffer();
  MappedBuffer(MappedBuffer&& other) noexcept;
  MappedBuffer& operator=(MappedBuffer&& other) noexcept;
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;

  // Grows to at least `bytes` (never shrinks), keeping the contents; the new
  // bytes are zero. May move the buffer. Throws std::bad_alloc.
  void grow(size_t bytes);

  unsigned char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void advise();
  unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace fastps
