// The CPU kernels. Each validates what only the data can tell (index contents) before writing anything.
#pragma once

#include "../backend.h"
#include "thread_pool.h"

namespace scalekv::cpu {

// ERR_INDEX_RANGE unless the page-table entries of tokens [begin, end) of every row name pages of the pool.
void check_kv_pages(const KvPages& p, int rows, int begin, int end, const char* op);

void attention(ThreadPool& pool, const AttentionArgs& a);
void evict_compact(ThreadPool& pool, const EvictCompactArgs& a);
void selection(ThreadPool& pool, const SelectionArgs& a);

// Latent and VAE-decoder ops, one file each (kernels/cpu/<op>.cc).
void bits_to_codes(ThreadPool& pool, const BitsToCodesArgs& a);
void resize_bilinear(ThreadPool& pool, const ResizeBilinearArgs& a);
void conv2d(ThreadPool& pool, const Conv2dArgs& a);
void group_norm(ThreadPool& pool, const GroupNormArgs& a);
void upsample_nearest2x(ThreadPool& pool, const UpsampleNearest2xArgs& a);
void pixel_shuffle2x(ThreadPool& pool, const PixelShuffle2xArgs& a);
void pixel_unshuffle2x(ThreadPool& pool, const PixelUnshuffle2xArgs& a);
void add(ThreadPool& pool, const AddArgs& a);
void cast(ThreadPool& pool, const CastArgs& a);
void transpose12(ThreadPool& pool, const Transpose12Args& a);
void image_to_u8(ThreadPool& pool, const ImageToU8Args& a);

}  // namespace scalekv::cpu
