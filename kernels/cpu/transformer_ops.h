// The CPU kernels of the Infinity transformer ops (contracts in ../backend.h), one file each.
#pragma once

#include <cmath>

#include "../backend.h"
#include "thread_pool.h"

namespace scalekv::cpu {

void gemm(ThreadPool& pool, const GemmArgs& a);
void layer_norm(ThreadPool& pool, const LayerNormArgs& a);
void rms_norm(ThreadPool& pool, const RmsNormArgs& a);
void gated_activation(ThreadPool& pool, const GatedActivationArgs& a);
void segment_attention(ThreadPool& pool, const SegmentAttentionArgs& a);
void gated_residual(ThreadPool& pool, const GatedResidualArgs& a);
void activation(ThreadPool& pool, const ActivationArgs& a);
void qk_norm_rope(ThreadPool& pool, const QkNormRopeArgs& a);
void cross_attention(ThreadPool& pool, const CrossAttentionArgs& a);
void cfg_tau(ThreadPool& pool, const CfgTauArgs& a);
void topk_topp_mask(ThreadPool& pool, const TopkToppMaskArgs& a);
void sample_bits(ThreadPool& pool, const SampleBitsArgs& a);

// Masks one row of V logits in place with the top-k / top-p rule of TopkToppMaskArgs; `order` is scratch
// of V entries. Shared by topk_topp_mask and sample_bits so both follow one definition.
void mask_top_k_top_p(float* x, int V, int top_k, double top_p, int* order);

// The activations as torch computes them in f32 (F.silu; F.gelu(approximate='tanh')).
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f, kKappa = 0.044715f;
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + kKappa * x * x * x)));
}
inline float apply_epilogue(Epilogue e, float x) {
  switch (e) {
    case Epilogue::none: return x;
    case Epilogue::gelu_tanh: return gelu_tanh(x);
    case Epilogue::silu: return silu(x);
  }
  return x;
}

}  // namespace scalekv::cpu
