// See table/id_map.h and the design note in table/sparse_table.h.

#include "table/id_map.h"

#include <cstring>

#include "common/error.h"

namespace fastps {

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

}  // namespace fastps
