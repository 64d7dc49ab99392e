// See Note [Mapped table memory] in mapped_buffer.h.

#include "common/mapped_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

namespace fastps {

namespace {
size_t page_round(size_t bytes) {
  static const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return (bytes + page - 1) / page * page;
}
// FASTPS_HUGE_PAGES=0 turns the advice off (docs/configuration.md).
bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTPS_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}
}  // namespace

MappedBuffer::MappedBuffer(size_t bytes) {
  if (bytes == 0) return;
  const size_t n = page_round(bytes);
  // MAP_NORESERVE: the pages are charged as they are touched, not the whole
  // capacity up front (a doubled table must not fail the overcommit
  // heuristic for memory it has not used yet).
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<unsigned char*>(p);
  size_ = n;
  advise();
}

MappedBuffer::~MappedBuffer() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

MappedBuffer::MappedBuffer(MappedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedBuffer& MappedBuffer::operator=(MappedBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MappedBuffer::grow(size_t bytes) {
  if (bytes <= size_) return;
  if (data_ == nullptr) {
    *this = MappedBuffer(bytes);
    return;
  }
  const size_t n = page_round(bytes);
  void* p = ::mremap(data_, size_, n, MREMAP_MAYMOVE);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<unsigned char*>(p);
  size_ = n;
  advise();
}

void MappedBuffer::advise() {
#ifdef MADV_HUGEPAGE
  if (huge_pages_enabled() && size_ >= kHugePageFrom) ::madvise(data_, size_, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
}

}  // namespace fastps
