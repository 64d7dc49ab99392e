// IdMap: an open-addressing map from any int64 to a nonzero uint64, the
// index of a sparse table (see the design note in table/sparse_table.h:
// "Ids"). One thread at a time.
#pragma once

#include <cstdint>

#include "common/hash.h"
#include "common/mapped_buffer.h"

namespace fastps {

// Open-addressing map from any int64 to a nonzero uint64. See the design note.
class IdMap {
 public:
  explicit IdMap(int64_t min_capacity = 16);

  int64_t size() const { return size_; }
  int64_t capacity() const { return static_cast<int64_t>(mask_ + 1); }
  int64_t memory_bytes() const { return capacity() * static_cast<int64_t>(sizeof(Slot)); }

  // Slot holding `id`, or -1.
  int64_t find(int64_t id) const {
    uint64_t i = home(id);
    while (true) {
      const Slot& s = slots()[i];
      if (s.value == 0) return -1;
      if (s.id == id) return static_cast<int64_t>(i);
      i = (i + 1) & mask_;
    }
  }
  // Asks the cache for the slot where a lookup of `id` starts (a hint).
  void prefetch(int64_t id) const { __builtin_prefetch(&slots()[home(id)]); }
  int64_t slot_id(int64_t slot) const { return slots()[slot].id; }
  uint64_t slot_value(int64_t slot) const { return slots()[slot].value; }
  void set_slot_value(int64_t slot, uint64_t value) { slots()[slot].value = value; }

  // `id` must be absent and `value` nonzero. May grow (invalidates slots).
  void insert(int64_t id, uint64_t value);
  // Backward-shift deletion (invalidates slots after `slot` in its run).
  void erase_slot(int64_t slot);
  // The first occupied slot at or after `start` (mod capacity); -1 if empty.
  int64_t occupied_from(uint64_t start) const;

  template <typename F>
  void for_each(F&& f) const {
    for (int64_t i = 0; i < capacity(); ++i)
      if (slots()[i].value != 0) f(slots()[i].id, slots()[i].value);
  }

 private:
  struct Slot {
    int64_t id;
    uint64_t value;  // 0: empty
  };
  Slot* slots() const { return reinterpret_cast<Slot*>(buf_.data()); }
  uint64_t home(int64_t id) const { return mix64(static_cast<uint64_t>(id) ^ kSalt) & mask_; }
  void grow();

  static constexpr uint64_t kSalt = 0x2545F4914F6CDD1DULL;
  MappedBuffer buf_;  // capacity() zero-initialised (= empty) slots; Note [Mapped table memory]
  uint64_t mask_ = 0;
  int64_t size_ = 0;
};

}  // namespace fastps
