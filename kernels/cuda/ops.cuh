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

// A launcher that takes a slower kernel than its dtypes would allow (e.g. SIMT for bf16 data) says why, so the
// fallback is never silent: `op` and `reason` are string literals, remembered per host thread (slow_path.cu).
void note_slow_path(const char* op, const char* reason);
struct SlowPath {
  const char* op = nullptr;      // e.g. "gemm"
  const char* reason = nullptr;  // e.g. "K % 8 != 0"
};
// The note since the last take ({nullptr, nullptr}: none), cleared.
SlowPath take_slow_path();
// The backend's profile label for the slow path noted since the last take ("gemm:simt (K % 8 != 0)"), else null;
// clears the note. The label lives as long as the process.
const char* take_slow_path_label();

size_t attention_workspace_bytes(const AttentionArgs& a);
void attention(const AttentionArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

size_t evict_compact_workspace_bytes(const EvictCompactArgs& a);
void evict_compact(const EvictCompactArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

size_t selection_workspace_bytes(const SelectionArgs& a);
void selection(const SelectionArgs& a, cudaStream_t stream, int32_t* status, void* workspace);

// Transformer ops (gemm.cu, layer_norm.cu, ...): no workspace. Only cross_attention and
// segment_attention (cuSeqlens out of order or range) and qk_norm_rope (a page-table entry out of range) report
// data errors: index_out_of_range, the outputs untouched.
void gemm(const GemmArgs& a, cudaStream_t stream, int32_t* status);
void layer_norm(const LayerNormArgs& a, cudaStream_t stream, int32_t* status);
void rms_norm(const RmsNormArgs& a, cudaStream_t stream, int32_t* status);
void gated_activation(const GatedActivationArgs& a, cudaStream_t stream, int32_t* status);
void segment_attention(const SegmentAttentionArgs& a, cudaStream_t stream, int32_t* status);
void gated_residual(const GatedResidualArgs& a, cudaStream_t stream, int32_t* status);
void activation(const ActivationArgs& a, cudaStream_t stream, int32_t* status);
void qk_norm_rope(const QkNormRopeArgs& a, cudaStream_t stream, int32_t* status);
void cross_attention(const CrossAttentionArgs& a, cudaStream_t stream, int32_t* status);
void cfg_tau(const CfgTauArgs& a, cudaStream_t stream, int32_t* status);
void topk_topp_mask(const TopkToppMaskArgs& a, cudaStream_t stream, int32_t* status);
void sample_bits(const SampleBitsArgs& a, cudaStream_t stream, int32_t* status);

// Latent and VAE-decoder ops (bits_to_codes.cu, resize_bilinear.cu, ...): no data errors, so no status word.
// group_norm needs group_norm_workspace_bytes(a) of workspace (per-chunk moments, then mean/rstd per group).
void bits_to_codes(const BitsToCodesArgs& a, cudaStream_t stream);
void resize_bilinear(const ResizeBilinearArgs& a, cudaStream_t stream);
void conv2d(const Conv2dArgs& a, cudaStream_t stream);
size_t group_norm_workspace_bytes(const GroupNormArgs& a);
void group_norm(const GroupNormArgs& a, cudaStream_t stream, void* workspace);
void upsample_nearest2x(const UpsampleNearest2xArgs& a, cudaStream_t stream);
void pixel_shuffle2x(const PixelShuffle2xArgs& a, cudaStream_t stream);
void pixel_unshuffle2x(const PixelUnshuffle2xArgs& a, cudaStream_t stream);
void add(const AddArgs& a, cudaStream_t stream);
void cast(const CastArgs& a, cudaStream_t stream);
void transpose12(const Transpose12Args& a, cudaStream_t stream);
void image_to_u8(const ImageToU8Args& a, cudaStream_t stream);

}  // namespace scalekv::cuda_ops
