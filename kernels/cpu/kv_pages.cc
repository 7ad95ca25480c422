// Page-table checks of the paged K/V history (backend.h, KvPages): an op reads or writes tokens [begin, end) of
// every row, so the entries covering them must name pages of the pool; entries past them are never dereferenced.
#include <string>

#include "ops.h"

namespace scalekv::cpu {

void check_kv_pages(const KvPages& p, int rows, int begin, int end, const char* op) {
  if (!p.table || end <= begin) return;
  const int first = begin / p.page_tokens;
  const int last = (end - 1) / p.page_tokens;
  for (int r = 0; r < rows; ++r) {
    for (int i = first; i <= last; ++i) {
      const int32_t page = p.table[int64_t(r) * p.table_pages + i];
      if (page < 0 || page >= p.pages)
        throw BackendError(StatusCode::index_out_of_range,
                           std::string(op) + ": pageTable[" + std::to_string(r) + ", " + std::to_string(i) + "] = " +
                               std::to_string(page) + " is outside the pool's [0, " + std::to_string(p.pages) + ") pages");
    }
  }
}

}  // namespace scalekv::cpu
