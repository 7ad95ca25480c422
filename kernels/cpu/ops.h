// The CPU kernels. Each validates what only the data can tell (index contents) before writing anything.
#pragma once

#include "../backend.h"
#include "thread_pool.h"

namespace scalekv::cpu {

void attention(ThreadPool& pool, const AttentionArgs& a);
void evict_compact(ThreadPool& pool, const EvictCompactArgs& a);
void selection(ThreadPool& pool, const SelectionArgs& a);

}  // namespace scalekv::cpu
