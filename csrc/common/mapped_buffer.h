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
//    set_huge_pages(false) (FASTPS_HUGE_PAGES=0) turns the advice off. Measured (bench/README.md):
//    rows of a warm 1M-row table are pulled and pushed ~15% faster, while
//    creating rows costs ~15% more (a fault clears 2 MiB at once).
//
// Note [Populating ahead]
// Even with the faults batched, a table that keeps meeting new ids spends most
// of a push beyond a warm one in the kernel clearing the pages of its new rows
// (`clear_page_erms` and the fault path were ~40% of a cold push's samples;
// with the pages populated before the push, a cold Adam push of the benchmark's
// batches took 1.4 ms instead of 2.3-3.2). populate_async() hands that work to
// one process-wide background thread, which backs a range with pages by
// madvise(MADV_POPULATE_WRITE) (Linux 5.14+; where the kernel lacks it the
// thread stops asking) while the table's owner does something else: the rows
// a push creates next are then already backed. It never writes the memory, so
// it cannot race with the owner's writes; the mapping itself (address, size)
// is shared with the thread under a mutex that grow() and the destructor also
// take, 2 MiB at a time, so a grow waits at most one such piece.
// FASTPS_PREFAULT=0 turns it off. The cost: populated, not yet used memory,
// per row pool (one per table and shard) up to twice the bytes of the rows
// the last push could have created, within 2-16 MiB; `memory_bytes` in a
// table's stats does not count it.
//
// Not thread-safe; one owner (the shard thread of its table).
#pragma once

#include <cstddef>
#include <memory>

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

  // Asks the background thread to back bytes [from, to) (clamped to the
  // buffer, widened to whole pages) with memory now; returns at once. A hint:
  // contents never change, and it may be dropped (Note [Populating ahead]).
  void populate_async(size_t from, size_t to);

  // The mapping as the background thread sees it (defined in the .cc).
  struct Shared;

 private:
  void advise();
  void release();  // unmaps (under shared_'s mutex)
  void publish();  // tells shared_ (if any) where the mapping is now; under its mutex
  unsigned char* data_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<Shared> shared_;  // created by the first populate_async()
};

// Process-wide settings, on by default; the Python configuration resolver
// sets them from FASTPS_HUGE_PAGES and FASTPS_PREFAULT. Any thread; they
// apply to mappings made or grown afterwards (huge pages) and to the next
// populate_async() (populating ahead).
void set_huge_pages(bool on);
bool huge_pages();
void set_populate_ahead(bool on);

// Whether populate_async() does anything here (set_populate_ahead() and the
// kernel's support, as far as known so far).
bool populate_ahead_enabled();

// Waits until the background thread has no request left (tests and benchmarks).
void populate_ahead_drain();

}  // namespace fastps
