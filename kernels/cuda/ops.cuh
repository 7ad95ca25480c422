// Host-side launchers of the CUDA kernels, shared by the real CUDA backend (backend_cuda.cu) and the
// emulator backend (kernels/emu): both own memory and a stream and call these with device pointers.
//
// `status` points to two device int32 {code, detail}. A kernel that finds bad data (an index out of range, a
// list out of order) records the first StatusCode there with atomicCAS and leaves its outputs untouched
// (for evict_compact: leaves *every* (row, head) untouched). The backend reads it at synchronisation.
// `workspace` is device memory of at least *_workspace_bytes(args) bytes, 256-byte aligned, owned by the backend.
#pragma once

#include "../backend.h"
#include "portable.cuh"

namespace scalekv::cuda_ops {

size_t attention_workspace_bytes(const AttentionArgs& a);
void attention(const AttentionArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

size_t evict_compact_workspace_bytes(const EvictCompactArgs& a);
void evict_compact(const EvictCompactArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

size_t selection_workspace_bytes(const SelectionArgs& a);
void selection(const SelectionArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

}  // namespace scalekv::cuda_ops
