// parrot_lc._cuda: the torch-facing side of the CUDA kernels. Checks what the kernels assume of their tensors
// (dtype, device, alignment, strides) and launches on the current stream of the tensors' device, so that a
// call captured in a CUDA graph is replayed there.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <stdexcept>

#include "shared_prefix_decode.h"

namespace {

void check_index(const torch::Tensor& t, const char* name, int64_t dims, const torch::Device& device) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void check_cache(const torch::Tensor& cache, const torch::Tensor& q, const char* name) {
  TORCH_CHECK(cache.dim() == 4, name, " must be (num_blocks, page, Hkv, D)");
  TORCH_CHECK(cache.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type());
  TORCH_CHECK(cache.device() == q.device(), name, " must be on q's device");
  // The kernel copies 16-byte chunks of a head's row.
  TORCH_CHECK(cache.stride(3) == 1 && cache.stride(0) % 8 == 0 && cache.stride(1) % 8 == 0 &&
                  cache.stride(2) % 8 == 0 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0,
              name, " must be 16-byte aligned with a contiguous head dimension");
}

void shared_prefix_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                          const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                          const torch::Tensor& shared_lens, const torch::Tensor& group_ptr,
                          const torch::Tensor& group_rows, const torch::Tensor& group_tables,
                          const torch::Tensor& group_lens, const torch::Tensor& part_out,
                          const torch::Tensor& part_lse, const torch::Tensor& out, double scale,
                          int64_t shared_row_warps, int64_t shared_tiles, int64_t shared_splits,
                          int64_t own_splits, int64_t min_shared_chunk, int64_t min_own_chunk,
                          bool wgmma, int64_t blocks_per_sm, bool programmatic_merge) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3, "q must be a CUDA tensor (B, Hq, D)");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf,
              "q must be bfloat16 or float16, got ", q.scalar_type());
  // The kernel reads q in pairs of elements.
  TORCH_CHECK(q.stride(2) == 1 && q.stride(0) % 2 == 0 && q.stride(1) % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 == 0,
              "q must be 4-byte aligned with a contiguous head dimension");
  check_cache(k_cache, q, "k_cache");
  check_cache(v_cache, q, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "k_cache and v_cache must have the same shape and strides");
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "the caches' head dimension must be q's");

  const auto device = q.device();
  check_index(block_tables, "block_tables", 2, device);
  check_index(context_lens, "context_lens", 1, device);
  check_index(shared_lens, "shared_lens", 1, device);
  check_index(group_ptr, "group_ptr", 1, device);
  check_index(group_rows, "group_rows", 1, device);
  check_index(group_tables, "group_tables", 2, device);
  check_index(group_lens, "group_lens", 1, device);
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch && shared_lens.size(0) == batch,
              "block_tables, context_lens and shared_lens must have a row per query row");
  const int64_t num_groups = group_ptr.size(0) - 1;
  TORCH_CHECK(num_groups >= 0 && group_lens.size(0) == num_groups && group_tables.size(0) == num_groups,
              "group_ptr, group_lens and group_tables must agree on the number of groups");

  const int64_t num_slots = shared_splits + own_splits;
  TORCH_CHECK(part_out.scalar_type() == torch::kFloat32 && part_out.is_contiguous() &&
                  part_out.sizes() == torch::IntArrayRef({batch, num_heads, num_slots, head_dim}),
              "part_out must be contiguous float32 (B, Hq, S, D)");
  TORCH_CHECK(part_lse.scalar_type() == torch::kFloat32 && part_lse.is_contiguous() &&
                  part_lse.sizes() == torch::IntArrayRef({batch, num_heads, num_slots}),
              "part_lse must be contiguous float32 (B, Hq, S)");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.is_contiguous() && out.sizes() == q.sizes(),
              "out must be contiguous (B, Hq, D) in q's dtype");
  TORCH_CHECK(part_out.device() == device && part_lse.device() == device && out.device() == device,
              "the outputs must be on q's device");

  parrot_lc::DecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.num_blocks = k_cache.size(0);
  p.out = out.data_ptr();
  p.part_out = part_out.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.shared_lens = shared_lens.data_ptr<int>();
  p.group_ptr = group_ptr.data_ptr<int>();
  p.group_rows = group_rows.data_ptr<int>();
  p.group_tables = group_tables.data_ptr<int>();
  p.group_lens = group_lens.data_ptr<int>();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.kv_stride_block = k_cache.stride(0);
  p.kv_stride_slot = k_cache.stride(1);
  p.kv_stride_head = k_cache.stride(2);
  p.block_table_stride = block_tables.stride(0);
  p.group_table_stride = group_tables.stride(0);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(head_dim);
  p.page = static_cast<int>(k_cache.size(1));
  p.num_groups = static_cast<int>(num_groups);
  p.shared_row_warps = static_cast<int>(shared_row_warps);
  p.shared_tiles = static_cast<int>(shared_tiles);
  p.shared_splits = static_cast<int>(shared_splits);
  p.own_splits = static_cast<int>(own_splits);
  p.min_shared_chunk = static_cast<int>(min_shared_chunk);
  p.min_own_chunk = static_cast<int>(min_own_chunk);
  p.wgmma = wgmma;
  p.blocks_per_sm = static_cast<int>(blocks_per_sm);
  p.programmatic_merge = programmatic_merge;
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.dtype = q.scalar_type() == torch::kBFloat16 ? parrot_lc::DType::kBFloat16 : parrot_lc::DType::kFloat16;

  const c10::cuda::CUDAGuard guard(device);
  try {
    parrot_lc::launch_shared_prefix_decode(p, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  } catch (const std::invalid_argument& error) {
    TORCH_CHECK_VALUE(false, error.what());
  } catch (const std::runtime_error& error) {
    TORCH_CHECK(false, error.what());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shared_prefix_decode", &shared_prefix_decode,
        "Shared-prefix decode attention over a paged KV cache: partials, then their log-sum-exp merge into out "
        "(see parrot_lc.engine.cuda_attention)");
}
