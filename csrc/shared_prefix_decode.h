// Shared-prefix ("cascade") decode attention over the paged KV cache: the interface between the torch-facing
// bindings and the CUDA kernels, kept free of torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace parrot_lc {

enum class DType { kBFloat16, kFloat16 };

// One decode step of one layer. Semantics are those of parrot_lc.engine.attention.DecodeLayout; every index
// tensor is int32, every tensor is on the same device, the last dimension of each is contiguous.
struct DecodeParams {
  const void* q;        // (B, Hq, D)
  const void* k_cache;  // (num_blocks, page, Hkv, D)
  const void* v_cache;  // (num_blocks, page, Hkv, D), the same strides as k_cache
  int64_t num_blocks;   // of the caches: the extent of the tensor maps that Hopper's copies read them through
  void* out;            // (B, Hq, D), contiguous
  float* part_out;      // (B, Hq, S, D), contiguous: one normalised partial output per KV split
  float* part_lse;      // (B, Hq, S), contiguous: its log-sum-exp, in base 2
  const int* block_tables;  // (B, max_blocks)
  const int* context_lens;  // (B,)
  const int* shared_lens;   // (B,)
  const int* group_ptr;     // (num_groups + 1,)
  const int* group_rows;    // (>= group_ptr[num_groups],)
  const int* group_tables;  // (num_groups, max_prefix_blocks)
  const int* group_lens;    // (num_groups,)
  int64_t q_stride_b, q_stride_h;
  int64_t kv_stride_block, kv_stride_slot, kv_stride_head;
  int64_t block_table_stride, group_table_stride;
  int batch, num_heads, num_kv_heads, head_dim, page, num_groups;
  // The grid, chosen by the caller from shapes alone (so that it can be captured in a CUDA graph): a shared
  // work item is 16 * shared_row_warps query rows (members x query heads of one KV head); each group has
  // shared_tiles of them per KV head, and each range is cut into shared_splits (own_splits) parts of at least
  // min_shared_chunk (min_own_chunk) tokens, computed in the kernel from the step's lengths.
  // S = shared_splits + own_splits.
  int shared_row_warps, shared_tiles, shared_splits, own_splits;
  int min_shared_chunk, min_own_chunk;
  // Shared items of 64 rows on Hopper's wgmma, where the kernels are built for sm_90a (elsewhere on mma.sync).
  // shared_row_warps 8: shared items of 128 rows on the warp-specialized kernel (sm_90a only, head_dim 128, the
  // caches' pages read whole by its tensor memory accelerator).
  bool wgmma;
  // Partials blocks a multiprocessor holds with wgmma at D=128: 2 (3 pipeline stages) or 3 (2 stages, at most 168
  // registers a thread); elsewhere 2 at D=128, 3 at D=64.
  int blocks_per_sm;
  bool programmatic_merge;  // launch the merge as a programmatic dependent of the partials (sm_90 and newer)
  float scale_log2;  // softmax scale x log2(e): the kernels work in base 2
  DType dtype;
};

// Enqueues the partials kernel and the merge on `stream`; throws std::invalid_argument for an unsupported
// configuration and std::runtime_error for a failed launch.
void launch_shared_prefix_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace parrot_lc
