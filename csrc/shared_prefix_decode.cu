// Shared-prefix ("cascade") decode attention: one query row per sequence, KV in a paged cache.
//
// Two kernels (three on Hopper, below). The partials kernel runs two kinds of work item in one grid:
//   shared: (group, KV head, tile of members, split of the prefix). The tile's query rows (members x the G
//           query heads of the KV head) meet each prefix K/V tile once, loaded into shared memory, on tensor
//           cores: the prefix is read once per tile of members instead of once per sequence.
//   own:    (sequence, 4 consecutive KV heads, split of its own range): each warp takes one KV head's G query
//           heads, padded to 16 rows, against the sequence's own KV of that head. The 4 heads of a token are
//           contiguous in the cache, and an item streams 4 times as many tiles as one head would, which
//           amortises its pipeline's fill and drain.
// Each item writes, per query row, a normalised partial output and its log-sum-exp. The merge kernel then
// combines each (sequence, head)'s partials by log-sum-exp; on Hopper it is launched as a programmatic
// dependent of the partials kernel, so that its launch overlaps the partials' last blocks. Splits cut a range
// into whole tiles, at least min_shared_chunk (min_own_chunk) tokens, computed in the kernel from the runtime
// lengths, so one launch fits every step that a CUDA graph replays.
//
// Inside an item, 4 warps stream the range through a 3-stage cp.async pipeline (2 stages in the wgmma kernel that
// puts three blocks on a multiprocessor instead of two, for steps of many shared rows) of tiles of kBlockN K and V
// rows (kBlockN tokens of one head, or kBlockN / 4 tokens of 4 heads). Each warp owns 16 query rows (mma.sync
// m16n8k16 with fp32 accumulators and an online softmax in registers, FlashAttention-2 style); a shared item
// of fewer rows than 4 x 16 gives each warp a slice of every tile's keys instead, and the warps' results are
// merged through shared memory at the end. Built for sm_90a, a shared item of 64 rows may run on wgmma instead
// (attend_wgmma): the warpgroup's products read K and V from shared memory once for all 64 rows, where
// mma.sync has each warp load every tile through ldmatrix.
//
// A third kernel (shared_items_kernel, sm_90a) takes shared items of 128 rows where the plan asks for them: one
// block a multiprocessor, two producer warps copying 128-token K and V tiles by the tensor memory accelerator and
// two consumer warpgroups of 64 rows each that take turns at the tensor cores (FlashAttention-3's structure and
// ping-pong); the own items then run in the partials kernel before it.

#include "shared_prefix_decode.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace parrot_lc {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = 64;     // KV tokens per pipeline stage
// A partials kernel's pipeline has STAGES stages: 3 where two blocks share a multiprocessor, 2 where three do (a
// wgmma kernel held to 168 registers; faster where a step has many shared rows, see cuda_attention.plan).
template <int STAGES>
constexpr int kMinBlocks = STAGES == 2 ? 3 : 0;  // 0: no minimum (the compiler's choice)
constexpr int kOwnTokens = kBlockN / kWarps;  // tokens of an own item's tile (4 KV heads of each)

template <typename T>
struct Half;

template <>
struct Half<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  // d += a (16x16, row major) b (16x8, column major)
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Half<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; a token past the range is zero-filled, so that masked keys hold
// finite values (0 x NaN would poison P V) whatever the cache holds there.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// The layouts of a K or V tile in shared memory, in 16-byte chunks; chunk c of row r is stored at c ^ (r % 8)
// within its 128 bytes, which spreads the 8 rows that ldmatrix (or wgmma) reads at once over all 32 banks.
// kRows: (kBlockN, D), rows of D / 8 chunks (mma.sync, through ldmatrix). kWgmma: D / 64 blocks of
// (ROWS, 64), rows of 128 bytes: the 128-byte swizzle that wgmma reads (and the TMA writes), each block on a
// 1024-byte boundary.
enum class Layout { kRows, kWgmma };

template <int D, Layout L, int ROWS = kBlockN>
__device__ __forceinline__ int tile_chunk(int row, int chunk) {
  if constexpr (L == Layout::kRows) return row * (D / 8) + (chunk ^ (row & 7));
  return chunk / 8 * (ROWS * 8) + row * 8 + (chunk % 8 ^ (row & 7));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A wgmma shared-memory matrix descriptor for the 128-byte swizzle; offsets in bytes.
__device__ __forceinline__ uint64_t wgmma_desc(const void* p, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((smem_addr(p) & 0x3FFFF) >> 4) | static_cast<uint64_t>(leading >> 4) << 16 |
         static_cast<uint64_t>(stride >> 4) << 32 | 1ull << 62;
}

#define PARROT_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define PARROT_WGMMA_N64(TYPE)                                                                                \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                   \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                              \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "          \
               "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                               \
               : PARROT_ACC4(0), PARROT_ACC4(1), PARROT_ACC4(2), PARROT_ACC4(3), PARROT_ACC4(4),            \
                 PARROT_ACC4(5), PARROT_ACC4(6), PARROT_ACC4(7)                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate ? 1 : 0), "n"(TRANS ? 1 : 0))
#define PARROT_WGMMA_N128(TYPE)                                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                   \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                             \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "           \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "           \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "          \
               "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                               \
               : PARROT_ACC4(0), PARROT_ACC4(1), PARROT_ACC4(2), PARROT_ACC4(3), PARROT_ACC4(4),            \
                 PARROT_ACC4(5), PARROT_ACC4(6), PARROT_ACC4(7), PARROT_ACC4(8), PARROT_ACC4(9),            \
                 PARROT_ACC4(10), PARROT_ACC4(11), PARROT_ACC4(12), PARROT_ACC4(13), PARROT_ACC4(14),       \
                 PARROT_ACC4(15)                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate ? 1 : 0), "n"(TRANS ? 1 : 0))

// Warpgroup matrix products (sm_90a), issued by all 128 threads of the block: each warp holds 16 rows of the
// 64-row A operand in registers (mma.sync's m16n8k16 A layout) and of the accumulator (its C layout, 8 columns
// a tile); B comes from shared memory through a descriptor.
template <typename T>
struct Wgmma {
  // Orders this thread's earlier register writes (accumulators, A) before the next products.
  __device__ static void arrive() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
  __device__ static void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
  __device__ static void wait() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
  __device__ static void commit_and_wait() {
    commit();
    wait();
  }
  // Keep the compiler from moving reads or writes of accumulators (float) or A fragments (uint32_t) across the
  // asynchronous products.
  template <typename R, int N>
  __device__ static void fence(R (&x)[N][4]) {
    static_assert(std::is_same_v<R, float> || std::is_same_v<R, uint32_t>, "accumulators or A fragments");
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (std::is_same_v<R, float>)
          asm volatile("" : "+f"(x[i][j])::"memory");
        else
          asm volatile("" : "+r"(x[i][j])::"memory");
      }
  }
  // d (64 x 8N) += a (64 x 16) b (16 x 8N; b K-major, or MN-major if TRANS); d = a b if not accumulate (d's
  // registers then need no zeroing).
  template <bool TRANS, int N>
  __device__ static void mma(float (&d)[N][4], const uint32_t (&a)[4], uint64_t b, bool accumulate = true) {
    static_assert(N == 8 || N == 16, "m64n64k16 or m64n128k16");
    if constexpr (N == 8 && std::is_same_v<T, __nv_bfloat16>)
      PARROT_WGMMA_N64("bf16");
    else if constexpr (N == 8)
      PARROT_WGMMA_N64("f16");
    else if constexpr (std::is_same_v<T, __nv_bfloat16>)
      PARROT_WGMMA_N128("bf16");
    else
      PARROT_WGMMA_N128("f16");
  }
};
#undef PARROT_WGMMA_N128
#undef PARROT_WGMMA_N64
#undef PARROT_ACC4
#endif

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// What one work item computes: its query rows against KV [lo, hi) of one block table, into partial slot `slot`.
struct Item {
  const int* table;     // the block table row the range is read through
  const int* seq_ids;   // shared: the member sequences
  int seq, num_seqs;    // own: the sequence; shared: the number of members
  int kv_head, lo, hi, slot;  // own: the first of the warps' KV heads
};

// Part `split` of `splits` of [lo, hi): whole tiles of `tile` tokens, at least min_chunk tokens; trailing parts
// of a short range come out empty (lo >= hi).
__device__ __forceinline__ void split_range(int lo, int hi, int split, int splits, int min_chunk, int tile,
                                            Item& item) {
  int chunk = max(ceil_div(max(hi - lo, 0), splits), min_chunk);
  chunk = ceil_div(chunk, tile) * tile;
  item.lo = lo + split * chunk;
  item.hi = min(hi, item.lo + chunk);
}

// The query row r of an item (0 <= r < 64): for a shared item, query head r % G of member r / G; for an own
// item, query head r % 16 of KV head kv_head + r / 16. False for padding rows.
template <bool OWN>
__device__ __forceinline__ bool row_target(const DecodeParams& p, const Item& item, int group, int r, int& seq,
                                           int& head) {
  if constexpr (OWN) {
    const int kv_head = item.kv_head + r / 16;
    if (r % 16 >= group || kv_head >= p.num_kv_heads) return false;
    seq = item.seq;
    head = kv_head * group + r % 16;
  } else {
    const int member = r / group;
    if (member >= item.num_seqs) return false;
    seq = item.seq_ids[member];
    head = item.kv_head * group + r % group;
  }
  return true;
}

// Where token `pos` of the item's range lies in a cache, in elements (head 0); -1 past the range's end.
__device__ __forceinline__ int64_t token_offset(const DecodeParams& p, const Item& item, int pos) {
  if (pos >= item.hi) return -1;
  return item.table[pos / p.page] * p.kv_stride_block + (pos % p.page) * p.kv_stride_slot;
}

// Issues one tile's K and V copies; `offsets` are its tokens' token_offset. Tile row r is token r of the
// item's KV head or, for an own item, token r % 16 of KV head kv_head + r / 16 (zeros past the last head).
template <int D, bool OWN, Layout L>
__device__ __forceinline__ void load_tile(const DecodeParams& p, const Item& item, const int64_t* offsets,
                                          uint4* k_tile, uint4* v_tile) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr int kTokens = OWN ? kOwnTokens : kBlockN;
  const int chunk = threadIdx.x % kChunks;
  const auto* k = static_cast<const uint16_t*>(p.k_cache);
  const auto* v = static_cast<const uint16_t*>(p.v_cache);
#pragma unroll
  for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
    const int row = threadIdx.x / kChunks + i * kRowsPerPass;
    const int kv_head = item.kv_head + row / kTokens;
    const int64_t offset = offsets[row % kTokens];
    const bool valid = offset >= 0 && kv_head < p.num_kv_heads;
    const int64_t src = valid ? offset + kv_head * p.kv_stride_head + chunk * 8 : 0;
    cp_async_16(k_tile + tile_chunk<D, L>(row, chunk), k + src, valid);
    cp_async_16(v_tile + tile_chunk<D, L>(row, chunk), v + src, valid);
  }
}

// The KV tiles of an item's range streamed through STAGES stages of shared memory by cp.async. Tile t's token
// offsets live in offsets[t % STAGES], looked up once per token (not per 16-byte chunk) and a pipeline step
// ahead, so that no copy waits on a block-table read.
template <int D, bool OWN, Layout L, int STAGES>
struct Pipeline {
  static constexpr int kTokens = OWN ? kOwnTokens : kBlockN;  // tokens per tile
  static constexpr int kStage = 2 * kBlockN * (D / 8);        // one stage's K and V, in 16-byte chunks

  const DecodeParams& p;
  const Item& item;
  uint4* stages;
  int64_t* offsets;  // (STAGES, kTokens)
  int num_tiles;
  int64_t prefetched = 0;  // this thread's token offset of tile + STAGES, read during tile

  // Looks up the first STAGES tiles' offsets and issues the first STAGES - 1 tiles.
  __device__ Pipeline(const DecodeParams& p, const Item& item, uint4* smem)
      : p(p), item(item), stages(smem), offsets(reinterpret_cast<int64_t*>(smem + STAGES * kStage)),
        num_tiles(ceil_div(item.hi - item.lo, kTokens)) {
    if (threadIdx.x < kTokens)
      for (int s = 0; s < STAGES; ++s) offsets[s * kTokens + threadIdx.x] = offset(s);
    __syncthreads();
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_tiles) load(s);
      cp_async_commit();  // empty groups too, so that the wait in next() counts the same for every tile
    }
  }

  __device__ int64_t offset(int tile) const { return token_offset(p, item, item.lo + tile * kTokens + threadIdx.x); }
  __device__ uint4* k_tile(int tile) const { return stages + tile % STAGES * kStage; }
  __device__ uint4* v_tile(int tile) const { return k_tile(tile) + kStage / 2; }
  __device__ void load(int tile) {
    load_tile<D, OWN, L>(p, item, offsets + tile % STAGES * kTokens, k_tile(tile), v_tile(tile));
  }

  // Waits until `tile` is in shared memory for every thread (and, for wgmma, for the async proxy) and all are
  // done with the stage it refills: with tile + STAGES - 1, issued now. Tile `tile` was issued, so its offsets
  // slot is free for tile + STAGES: looked up now, stored by done() after this tile's math.
  __device__ void next(int tile) {
    cp_async_wait<STAGES - 2>();
    if constexpr (L == Layout::kWgmma) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (tile + STAGES - 1 < num_tiles) load(tile + STAGES - 1);
    cp_async_commit();
    if (threadIdx.x < kTokens && tile + STAGES < num_tiles) prefetched = offset(tile + STAGES);
  }
  __device__ void done(int tile) {
    if (threadIdx.x < kTokens && tile + STAGES < num_tiles) offsets[tile % STAGES * kTokens + threadIdx.x] = prefetched;
  }
};

// An empty split (lo >= hi) writes lse -inf for its rows, which the merge skips (it never reads out then).
template <bool OWN, int ROWS>
__device__ __forceinline__ bool write_empty(const DecodeParams& p, const Item& item, int group) {
  if (item.lo < item.hi) return false;
  const int64_t num_slots = p.shared_splits + p.own_splits;
  for (int r = threadIdx.x; r < ROWS; r += kThreads) {
    int seq, head;
    if (row_target<OWN>(p, item, group, r, seq, head))
      p.part_lse[(static_cast<int64_t>(seq) * p.num_heads + head) * num_slots + item.slot] = -INFINITY;
  }
  return true;
}

// This lane's A fragments of Q for query rows row_block * 16 + quad_row (+ 8), straight from global memory
// (their latency hidden behind the pipeline's first loads); padding rows are zeros. The layout is mma.sync's
// m16n8k16 A fragment, which is also a warp's share of wgmma's m64k16 A in registers.
template <typename T, int D, bool OWN>
__device__ __forceinline__ void load_q(const DecodeParams& p, const Item& item, int group, int row_block,
                                       uint32_t (&q_frag)[D / 16][4]) {
  const int quad_row = threadIdx.x % 32 / 4, quad_col = threadIdx.x % 4;
  const T* q_row[2];
  for (int i = 0; i < 2; ++i) {
    int seq, head;
    q_row[i] = row_target<OWN>(p, item, group, row_block * 16 + quad_row + 8 * i, seq, head)
                   ? static_cast<const T*>(p.q) + seq * p.q_stride_b + head * p.q_stride_h
                   : nullptr;
  }
#pragma unroll
  for (int k = 0; k < D / 16; ++k)
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // a0: (row, k 0-7), a1: (row + 8, k 0-7), a2, a3: k 8-15
      const T* row = q_row[r % 2];
      q_frag[k][r] = row ? *reinterpret_cast<const uint32_t*>(row + 16 * k + 8 * (r / 2) + 2 * quad_col) : 0u;
    }
}

// Folds a warp's scores of one tile (16 rows x 8 kScoreTiles keys, the first at tile_start; mma's C layout)
// into the online softmax in base 2: unless the tile is FULL (every key before hi), keys at or past hi are -inf;
// the running max (of scores x scale, base 2) and this lane's share of the sum are updated, score becomes
// exp2(score x scale - max) (one FFMA a score: the scale is applied with the max's subtraction), and the factor
// by which the output must be rescaled is returned in alpha. A row may see no key in this tile (a key slice past
// the end), hence the guard against (-inf) - (-inf).
template <bool FULL, int kScoreTiles>
__device__ __forceinline__ void softmax_scores(float (&score)[kScoreTiles][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&alpha)[2], int tile_start, int hi,
                                               float scale_log2) {
  const int quad_col = threadIdx.x % 4;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kScoreTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!FULL && tile_start + 8 * j + 2 * quad_col + e % 2 >= hi) score[j][e] = -INFINITY;
      tile_max[e / 2] = fmaxf(tile_max[e / 2], score[j][e]);
    }
  float base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
    tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
    const float new_max = fmaxf(row_max[i], tile_max[i] * scale_log2);
    base[i] = new_max == -INFINITY ? 0.f : new_max;
    alpha[i] = exp2f(row_max[i] - base[i]);
    row_max[i] = new_max;
    row_sum[i] *= alpha[i];
  }
#pragma unroll
  for (int j = 0; j < kScoreTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      score[j][e] = exp2f(fmaf(score[j][e], scale_log2, -base[e / 2]));
      row_sum[e / 2] += score[j][e];
    }
}

template <int kOutTiles>
__device__ __forceinline__ void rescale(float (&out)[kOutTiles][4], const float (&alpha)[2]) {
#pragma unroll
  for (int c = 0; c < kOutTiles; ++c)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[c][e] *= alpha[e / 2];
}

// softmax_scores, then the output rescaled: mma.sync's items, every tile masked.
template <int kScoreTiles, int kOutTiles>
__device__ __forceinline__ void online_softmax(float (&score)[kScoreTiles][4], float (&out)[kOutTiles][4],
                                               float (&row_max)[2], float (&row_sum)[2], int tile_start, int hi,
                                               float scale_log2) {
  float alpha[2];
  softmax_scores<false>(score, row_max, row_sum, alpha, tile_start, hi, scale_log2);
  rescale(out, alpha);
}

// Tile `tile` (BLOCK_N keys) of an item's range into the online softmax, and the output rescaled: wgmma's items,
// where every tile but a range's last is full (no key to mask).
template <int BLOCK_N, int kScoreTiles, int kOutTiles>
__device__ __forceinline__ void tile_softmax(float (&score)[kScoreTiles][4], float (&out)[kOutTiles][4],
                                             float (&row_max)[2], float (&row_sum)[2], const Item& item, int tile,
                                             float scale_log2) {
  float alpha[2];
  const int tile_start = item.lo + tile * BLOCK_N;
  if (tile_start + BLOCK_N <= item.hi)
    softmax_scores<true>(score, row_max, row_sum, alpha, tile_start, item.hi, scale_log2);
  else
    softmax_scores<false>(score, row_max, row_sum, alpha, tile_start, item.hi, scale_log2);
  rescale(out, alpha);
}

// The A fragment of P for keys 16k .. 16k + 15: score n-tiles 2k and 2k + 1.
template <typename T, int N>
__device__ __forceinline__ void p_fragment(const float (&score)[N][4], int k, uint32_t (&a)[4]) {
  a[0] = Half<T>::pack(score[2 * k][0], score[2 * k][1]);
  a[1] = Half<T>::pack(score[2 * k][2], score[2 * k][3]);
  a[2] = Half<T>::pack(score[2 * k + 1][0], score[2 * k + 1][1]);
  a[3] = Half<T>::pack(score[2 * k + 1][2], score[2 * k + 1][3]);
}

// The full row sums, from the 4 lanes of each row.
__device__ __forceinline__ void reduce_sums(float (&row_sum)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffff, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffff, row_sum[i], 2);
  }
}

// Writes this warp's rows (row_block * 16 + quad_row (+ 8)) as partial slot item.slot: the normalised output
// and its log-sum-exp. Every row saw key lo, so its sum is at least 1.
template <int D, bool OWN>
__device__ __forceinline__ void write_rows(const DecodeParams& p, const Item& item, int group, int row_block,
                                           const float (&out)[D / 8][4], const float (&row_max)[2],
                                           const float (&row_sum)[2]) {
  const int64_t num_slots = p.shared_splits + p.own_splits;
  const int quad_row = threadIdx.x % 32 / 4, quad_col = threadIdx.x % 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int seq, head;
    if (!row_target<OWN>(p, item, group, row_block * 16 + quad_row + 8 * i, seq, head)) continue;
    const int64_t slot = (static_cast<int64_t>(seq) * p.num_heads + head) * num_slots + item.slot;
    const float inv = 1.f / row_sum[i];
    float* dst = p.part_out + slot * D + 2 * quad_col;
#pragma unroll
    for (int c = 0; c < D / 8; ++c)
      *reinterpret_cast<float2*>(dst + 8 * c) = make_float2(out[c][2 * i] * inv, out[c][2 * i + 1] * inv);
    if (quad_col == 0) p.part_lse[slot] = row_max[i] + log2f(row_sum[i]);
  }
}

// One work item on mma.sync. ROW_WARPS warps hold 16 query rows each; the other kWarps / ROW_WARPS of each row
// block's warps take disjoint key slices of every tile. An OWN item has a KV head per warp (ROW_WARPS 4), each
// scoring its own kBlockN / 4 rows of every tile.
template <typename T, int D, int ROW_WARPS, bool OWN, int STAGES>
__device__ void attend(const DecodeParams& p, const Item& item, uint4* smem) {
  static_assert(!OWN || ROW_WARPS == kWarps, "an own item has one KV head per warp");
  using Tiles = Pipeline<D, OWN, Layout::kRows, STAGES>;
  constexpr int kKeySplit = kWarps / ROW_WARPS;
  constexpr int kKeys = Tiles::kTokens / kKeySplit;  // keys of a tile this warp scores
  constexpr int kScoreTiles = kKeys / 8;             // n-tiles of its scores (16 x kKeys)
  constexpr int kOutTiles = D / 8;                   // n-tiles of its output (16 x D)
  constexpr int kDimSteps = D / 16;                  // k-steps over the head dimension
  const int group = p.num_heads / p.num_kv_heads;
  if (write_empty<OWN, 16 * ROW_WARPS>(p, item, group)) return;

  Tiles tiles(p, item, smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_block = warp % ROW_WARPS, key_part = warp / ROW_WARPS;
  // This warp's keys: tile rows row0 .. row0 + kKeys - 1, which are tokens key0 .. of the tile.
  const int row0 = OWN ? warp * Tiles::kTokens : key_part * kKeys;
  const int key0 = OWN ? 0 : key_part * kKeys;
  uint32_t q_frag[kDimSteps][4];
  load_q<T, D, OWN>(p, item, group, row_block, q_frag);

  float out[kOutTiles][4] = {};                // (16, D): c0, c1 row quad_row, c2, c3 row quad_row + 8
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scores x scale, base 2
  float row_sum[2] = {0.f, 0.f};              // this lane's share of the softmax denominator

  for (int tile = 0; tile < tiles.num_tiles; ++tile) {
    tiles.next(tile);
    const uint4* k_tile = tiles.k_tile(tile);
    const uint4* v_tile = tiles.v_tile(tile);

    float score[kScoreTiles][4] = {};  // (16, kKeys) = Q K^T
#pragma unroll
    for (int k = 0; k < kDimSteps; k += 2) {
#pragma unroll
      for (int j = 0; j < kScoreTiles; ++j) {
        // Four 8x8 matrices: keys 8j .. 8j + 7, head-dim chunks 2k .. 2k + 3 (b0, b1 of k-steps k, k + 1).
        uint32_t b[4];
        ldmatrix_x4(b, k_tile + tile_chunk<D, Layout::kRows>(row0 + 8 * j + lane % 8, 2 * k + lane / 8));
        Half<T>::mma(score[j], q_frag[k], b[0], b[1]);
        Half<T>::mma(score[j], q_frag[k + 1], b[2], b[3]);
      }
    }
    online_softmax(score, out, row_max, row_sum, item.lo + tile * Tiles::kTokens + key0, item.hi, p.scale_log2);

    // out += P V: V's B fragments come transposed.
#pragma unroll
    for (int k = 0; k < kKeys / 16; ++k) {
      uint32_t a[4];
      p_fragment<T>(score, k, a);
#pragma unroll
      for (int c = 0; c < kOutTiles; c += 2) {
        // Four 8x8 matrices: keys +0-7 and +8-15 of head-dim chunk c, then of chunk c + 1.
        uint32_t b[4];
        ldmatrix_x4_trans(
            b, v_tile + tile_chunk<D, Layout::kRows>(row0 + 16 * k + lane % 8 + 8 * (lane / 8 % 2), c + lane / 16));
        Half<T>::mma(out[c], a, b[0], b[1]);
        Half<T>::mma(out[c + 1], a, b[2], b[3]);
      }
    }
    tiles.done(tile);
  }
  reduce_sums(row_sum);

  if constexpr (kKeySplit == 1) {
    write_rows<D, OWN>(p, item, group, row_block, out, row_max, row_sum);
  } else {
    // Merge the key slices of each row block through shared memory, over the drained pipeline's buffers.
    constexpr int kStride = D + 8;  // pads rows so that a half-warp's float2 stores hit distinct banks
    const int quad_row = lane / 4, quad_col = lane % 4;
    const int64_t num_slots = p.shared_splits + p.own_splits;
    cp_async_wait<0>();
    __syncthreads();
    float* red_out = reinterpret_cast<float*>(smem);  // (kWarps, 16, kStride)
    float* red_max = red_out + kWarps * 16 * kStride;  // (kWarps, 16)
    float* red_sum = red_max + kWarps * 16;            // (kWarps, 16)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp * 16 + quad_row + 8 * i;
#pragma unroll
      for (int c = 0; c < kOutTiles; ++c)
        *reinterpret_cast<float2*>(red_out + r * kStride + 8 * c + 2 * quad_col) =
            make_float2(out[c][2 * i], out[c][2 * i + 1]);
      if (quad_col == 0) {
        red_max[r] = row_max[i];
        red_sum[r] = row_sum[i];
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ROW_WARPS * 16 * (D / 4); idx += kThreads) {
      const int r = idx / (D / 4), d = idx % (D / 4) * 4;  // row of the item, first of 4 columns
      int seq, head;
      if (!row_target<OWN>(p, item, group, r, seq, head)) continue;
      float m = -INFINITY;
      for (int s = 0; s < kKeySplit; ++s) m = fmaxf(m, red_max[(s * ROW_WARPS + r / 16) * 16 + r % 16]);
      float sum = 0.f;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < kKeySplit; ++s) {
        const int w = (s * ROW_WARPS + r / 16) * 16 + r % 16;
        const float weight = exp2f(red_max[w] - m);  // a slice that saw no key: max -inf, weight 0
        sum += red_sum[w] * weight;
        const float4 x = *reinterpret_cast<const float4*>(red_out + w * kStride + d);
        acc.x += weight * x.x;
        acc.y += weight * x.y;
        acc.z += weight * x.z;
        acc.w += weight * x.w;
      }
      const int64_t slot = (static_cast<int64_t>(seq) * p.num_heads + head) * num_slots + item.slot;
      const float inv = 1.f / sum;  // the range is not empty, so some slice saw a key: sum >= 1
      *reinterpret_cast<float4*>(p.part_out + slot * D + d) =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (d == 0) p.part_lse[slot] = m + log2f(sum);
    }
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr uint32_t kAtom = 8 * 128;  // bytes of 8 rows of 128 bytes: one swizzle atom

// Issues S = Q K^T (64 x BLOCK_N; its first product overwrites score) for a K tile of BLOCK_N rows in the kWgmma
// layout: head dims 16k .. 16k + 15 are block k / 4, bytes 32 (k % 4) of each row.
template <typename T, int D, int BLOCK_N>
__device__ __forceinline__ void issue_scores(float (&score)[BLOCK_N / 8][4], const uint32_t (&q_frag)[D / 16][4],
                                             const char* k_tile) {
#pragma unroll
  for (int k = 0; k < D / 16; ++k)
    Wgmma<T>::template mma<false>(score, q_frag[k], wgmma_desc(k_tile + k / 4 * (BLOCK_N * 128) + k % 4 * 32, 16,
                                                                kAtom), k > 0);
}

// Issues O += P V for a V tile of BLOCK_N rows in the kWgmma layout: keys 16k .. 16k + 15 are two swizzle atoms
// from 16k.
template <typename T, int D, int BLOCK_N>
__device__ __forceinline__ void issue_values(float (&out)[D / 8][4], const uint32_t (&a)[BLOCK_N / 16][4],
                                             const char* v_tile) {
#pragma unroll
  for (int k = 0; k < BLOCK_N / 16; ++k)
    Wgmma<T>::template mma<true>(out, a[k], wgmma_desc(v_tile + k * 2 * kAtom, BLOCK_N * 128, kAtom));
}

// Tile `tile` of an item's range (BLOCK_N keys) against a warpgroup's 64 query rows on Hopper's wgmma (sm_90a): each
// warp holds 16 rows as in attend, but the tensor cores read K and V straight from shared memory (the kWgmma
// layout of BLOCK_N rows) for all 64 rows at once, at wgmma's rate. Q and P are the A operands, in registers;
// S = Q K^T is m64nBLOCK_Nk16 with K as a K-major B, O += P V is m64nDk16 with V as an MN-major B. Each product is
// waited for before what reads it.
template <typename T, int D, int BLOCK_N>
__device__ __forceinline__ void wgmma_tile(const uint32_t (&q_frag)[D / 16][4], const char* k_tile,
                                           const char* v_tile, float (&out)[D / 8][4], float (&row_max)[2],
                                           float (&row_sum)[2], const Item& item, int tile, const DecodeParams& p) {
  float score[BLOCK_N / 8][4];  // (64, BLOCK_N) = Q K^T
  Wgmma<T>::fence(score);
  Wgmma<T>::arrive();
  issue_scores<T, D, BLOCK_N>(score, q_frag, k_tile);
  Wgmma<T>::commit_and_wait();
  Wgmma<T>::fence(score);

  tile_softmax<BLOCK_N>(score, out, row_max, row_sum, item, tile, p.scale_log2);

  uint32_t a[BLOCK_N / 16][4];
#pragma unroll
  for (int k = 0; k < BLOCK_N / 16; ++k) p_fragment<T>(score, k, a[k]);
  Wgmma<T>::fence(a);
  Wgmma<T>::fence(out);
  Wgmma<T>::arrive();
  issue_values<T, D, BLOCK_N>(out, a, v_tile);
  Wgmma<T>::commit_and_wait();
  Wgmma<T>::fence(out);
}

// A shared item of 64 query rows on wgmma, its tiles copied by the block's 4 warps (Pipeline). Running P V under
// the next tile's softmax inside the warpgroup (FlashAttention-3's overlap) and 128-row items on two warpgroups
// that share the copies measured no faster on the H100, whose two or three resident blocks already overlap each
// other (benchmarks/RESULTS.md, fifth session); see shared_items_kernel for 128-row items whose copies a
// producer warp issues.
template <typename T, int D, int STAGES>
__device__ void attend_wgmma(const DecodeParams& p, const Item& item, uint4* smem) {
  using Tiles = Pipeline<D, false, Layout::kWgmma, STAGES>;
  const int group = p.num_heads / p.num_kv_heads;
  if (write_empty<false, 64>(p, item, group)) return;

  Tiles tiles(p, item, smem);
  const int warp = threadIdx.x / 32;
  uint32_t q_frag[D / 16][4];
  load_q<T, D, false>(p, item, group, warp, q_frag);

  float out[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  for (int tile = 0; tile < tiles.num_tiles; ++tile) {
    tiles.next(tile);
    wgmma_tile<T, D, kBlockN>(q_frag, reinterpret_cast<const char*>(tiles.k_tile(tile)),
                              reinterpret_cast<const char*>(tiles.v_tile(tile)), out, row_max, row_sum,
                              item, tile, p);
    tiles.done(tile);
  }
  reduce_sums(row_sum);
  write_rows<D, false>(p, item, group, warp, out, row_max, row_sum);
}
#endif

// Shared work item `index` of the grid's (group, KV head, split, tile of members) of `rows` query rows, its
// range cut into whole tiles of `tile_tokens`; false for a tile past its group's size this step (no rows).
__device__ __forceinline__ bool shared_item(const DecodeParams& p, int index, int rows, int tile_tokens, Item& item) {
  const int members_per_tile = rows / (p.num_heads / p.num_kv_heads);
  const int tile = index % p.shared_tiles;
  index /= p.shared_tiles;
  const int split = index % p.shared_splits;
  index /= p.shared_splits;
  item.kv_head = index % p.num_kv_heads;
  const int g = index / p.num_kv_heads;
  const int first = p.group_ptr[g] + tile * members_per_tile;
  const int members = p.group_ptr[g + 1] - first;
  if (members <= 0) return false;
  item.seq_ids = p.group_rows + first;
  item.num_seqs = min(members, members_per_tile);
  item.table = p.group_tables + g * p.group_table_stride;
  item.slot = split;
  split_range(0, p.group_lens[g], split, p.shared_splits, p.min_shared_chunk, tile_tokens, item);
  return true;
}

// Own items come first (blocks [0, num_own_items)): they are the longest when many sequences share a short
// prefix, and the shared items' shorter splits then even out the end of the grid. Shared items are ordered so
// that the tiles of one (group, KV head, split) run side by side and share the prefix chunk through L2.
// WGMMA: shared items on attend_wgmma where the kernel is built for sm_90a (elsewhere on attend).
template <typename T, int D, int SHARED_ROW_WARPS, bool WGMMA, int STAGES>
__global__ void __launch_bounds__(kThreads, kMinBlocks<STAGES>)
    partials_kernel(const DecodeParams p, int num_own_items) {
  static_assert(!WGMMA || SHARED_ROW_WARPS == kWarps, "a wgmma item has 64 rows");
  extern __shared__ uint4 smem[];
#if __CUDA_ARCH__ >= 900
  // Every block is running: the merge may be launched (it waits for this grid's end before reading).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  int index = blockIdx.x;
  Item item;
  if (index < num_own_items) {
    const int split = index % p.own_splits;
    index /= p.own_splits;
    const int head_groups = ceil_div(p.num_kv_heads, kWarps);
    item.kv_head = index % head_groups * kWarps;
    const int b = index / head_groups;
    item.seq = b;
    item.table = p.block_tables + b * p.block_table_stride;
    item.slot = p.shared_splits + split;
    split_range(p.shared_lens[b], p.context_lens[b], split, p.own_splits, p.min_own_chunk, kOwnTokens, item);
    attend<T, D, kWarps, true, STAGES>(p, item, smem);
  } else {
    if (!shared_item(p, index - num_own_items, 16 * SHARED_ROW_WARPS, kBlockN, item)) return;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if constexpr (WGMMA) {
      // The 128-byte swizzle's atoms must lie on 1024-byte boundaries (launch() allocates the slack).
      attend_wgmma<T, D, STAGES>(p, item, smem + (1024 - smem_addr(smem) % 1024) % 1024 / 16);
      return;
    }
#endif
    attend<T, D, SHARED_ROW_WARPS, false, STAGES>(p, item, smem);
  }
}

// Shared items of 128 query rows on a warp-specialized block (FlashAttention-3's structure, sm_90a): warps 0 and 1
// of warpgroup 0 are the producers, their lanes issuing the tensor memory accelerator's copies of each tile's K
// (warp 0) and V (warp 1) (no other thread computes a copy's address); warpgroups 1 and 2 are consumers of 64 rows each, which read
// every tile of the shared memory once for both. A stage's K and V tiles are ordered by mbarriers of their own,
// never a CTA barrier: full_k[s] (full_v[s]) completes when the tile's bytes have landed, empty_k[s] (empty_v[s])
// when the consumers' 8 warps are done with it, so that a K tile is refilled as soon as Q K^T has read it. The
// producer gives up registers to the consumers (setmaxnreg): one block a multiprocessor. The two consumers take
// turns at the tensor cores (FlashAttention-3's ping-pong, see consume).
constexpr int kWsBlockN = 128;  // keys a tile
constexpr int kWsStages = 3;
constexpr int kWsBarriers = 4 * kWsStages;  // full and empty, of K tiles and of V tiles
constexpr int kWsConsumers = 2;
constexpr int kWsThreads = (kWsConsumers + 1) * kThreads;
template <int D>
constexpr int kWsTileBytes = kWsBlockN * D * 2;  // a K or V tile

// The K and V caches as tensors of the TMA: (D, Hkv, num_blocks x page) elements, read in boxes of 64 head dims
// of one KV head and min(page, kWsBlockN) consecutive slots, 128-byte swizzled (the kWgmma layout).
struct KVMaps {
  CUtensorMap k, v;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kWsRows = kWsConsumers * 64;  // query rows of an item

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives and adds `bytes` to the transactions the current phase waits for.
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// Waits for the completion of the barrier's phase of this parity.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, int parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// Copies the box at (c0, c1, c2) of `map` to dst; its bytes complete a transaction of `bar`.
__device__ __forceinline__ void tma_copy(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(smem_addr(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
      : "memory");
}

// The stages of a warp-specialized block: kWsStages of a K tile then a V tile (kWgmma layout, kWsBlockN rows),
// then the full and empty barriers of the K tiles, then the V tiles'.
template <int D>
struct WsStages {
  static constexpr int kTileBytes = kWsTileBytes<D>;
  char* base;
  uint64_t* full_k;   // (kWsStages,)
  uint64_t* empty_k;  // (kWsStages,)
  uint64_t* full_v;   // (kWsStages,)
  uint64_t* empty_v;  // (kWsStages,)

  __device__ explicit WsStages(char* smem)
      : base(smem),
        full_k(reinterpret_cast<uint64_t*>(smem + kWsStages * 2 * kTileBytes)),
        empty_k(full_k + kWsStages),
        full_v(empty_k + kWsStages),
        empty_v(full_v + kWsStages) {}
  __device__ char* k_tile(int tile) const { return base + tile % kWsStages * 2 * kTileBytes; }
  __device__ char* v_tile(int tile) const { return k_tile(tile) + kTileBytes; }
};

// Named barriers of a warp-specialized block (0 is __syncthreads): the consumers' V zeroing, and each consumer's
// turn at the tensor cores.
constexpr int kWsZeroBarrier = 1;
constexpr int kWsTurnBarrier = 2;  // + the consumer's index
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// A producer warp, of K tiles (warp 0) or of V tiles (warp 1): lane l copies box l of each tile (64 head dims,
// `box` tokens: a page, or the tile within a page) into its stage once the consumers have released that stage's
// tile of its kind, so that K tiles, released sooner, are refilled without waiting for the V tiles. Boxes wholly
// past the range are not copied (their V rows are zeroed by the consumers; their keys are masked).
template <int D>
__device__ void produce(const DecodeParams& p, const Item& item, const KVMaps& maps, const WsStages<D>& stages,
                        int num_tiles, bool is_v) {
  constexpr int kHalves = D / 64;
  const int lane = threadIdx.x % 32, box = min(p.page, kWsBlockN);
  const int half = lane % kHalves, row = lane / kHalves * box;
  const bool copies = lane < kHalves * (kWsBlockN / box);  // the plan keeps a tile's boxes within 32
  // The cache block of this lane's box of `tile`, looked up a tile ahead; -1 where it lies past the range.
  auto lookup = [&](int tile) {
    const int pos = item.lo + tile * kWsBlockN + row;
    return copies && tile < num_tiles && pos < item.hi ? item.table[pos / p.page] : -1;
  };
  uint64_t* const full = is_v ? stages.full_v : stages.full_k;
  uint64_t* const empty = is_v ? stages.empty_v : stages.empty_k;
  const CUtensorMap* map = is_v ? &maps.v : &maps.k;
  int block = lookup(0);
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile % kWsStages;
    if (tile >= kWsStages) mbarrier_wait(empty + stage, (tile / kWsStages + 1) % 2);
    const int boxes = __popc(__ballot_sync(0xffffffff, block >= 0));
    if (lane == 0) mbarrier_expect_bytes(full + stage, boxes * box * 128);
    __syncwarp();
    if (block >= 0) {
      const int slot = block * p.page + (item.lo + tile * kWsBlockN + row) % p.page;
      char* dst = (is_v ? stages.v_tile(tile) : stages.k_tile(tile)) + (half * kWsBlockN + row) * 128;
      tma_copy(dst, map, half * 64, item.kv_head, slot, full + stage);
    }
    block = lookup(tile + 1);
  }
}

constexpr int kWsPair = kWsConsumers * kThreads;  // the threads of both consumers

// Step t of a consumer (see consume): VALUES, P V of tile t - 1 (t > 0); SCORES, S = Q K^T of tile t and its
// softmax (t < num_tiles). Compile-time, so that every product of a step is issued on one path (ptxas serializes
// products issued on paths it cannot prove uniform).
template <bool VALUES, bool SCORES, typename T, int D>
__device__ __forceinline__ void consume_step(const DecodeParams& p, const Item& item, const WsStages<D>& stages,
                                             int t, int num_tiles, const uint32_t (&q_frag)[D / 16][4],
                                             float (&out)[D / 8][4], float (&row_max)[2], float (&row_sum)[2],
                                             float (&score)[kWsBlockN / 8][4], uint32_t (&a)[kWsBlockN / 16][4]) {
  const int consumer_thread = threadIdx.x - kThreads;
  const int consumer = consumer_thread / kThreads;
  if constexpr (SCORES) mbarrier_wait(stages.full_k + t % kWsStages, t / kWsStages % 2);
  if constexpr (VALUES) {
    const int v = t - 1;
    mbarrier_wait(stages.full_v + v % kWsStages, v / kWsStages % 2);
    const int first = item.hi - (item.lo + v * kWsBlockN);
    if (first < kWsBlockN) {
      // The range's last tile: V rows past its end become zeros (their probabilities are 0, but 0 x NaN is not,
      // and a page's slots past the range or an uncopied box's stale bytes may hold anything).
      auto* rows = reinterpret_cast<uint4*>(stages.v_tile(v));
      for (int i = consumer_thread; i < (kWsBlockN - first) * (D / 8); i += kWsPair)
        rows[tile_chunk<D, Layout::kWgmma, kWsBlockN>(first + i / (D / 8), i % (D / 8))] = make_uint4(0, 0, 0, 0);
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the zeros visible to the products
      named_barrier_sync(kWsZeroBarrier, kWsPair);
    }
  }
  named_barrier_sync(kWsTurnBarrier + consumer, kWsPair);  // this consumer's turn
  Wgmma<T>::fence(a);
  Wgmma<T>::fence(out);
  Wgmma<T>::fence(score);
  Wgmma<T>::arrive();
  if constexpr (VALUES) issue_values<T, D, kWsBlockN>(out, a, stages.v_tile(t - 1));
  if constexpr (SCORES) issue_scores<T, D, kWsBlockN>(score, q_frag, stages.k_tile(t));
  Wgmma<T>::commit();
  // The other consumer's turn (consumer 1's last turn passes to no one: consumer 0 has taken all of its own).
  if (SCORES || consumer == 0) named_barrier_arrive(kWsTurnBarrier + 1 - consumer, kWsPair);
  Wgmma<T>::wait();
  Wgmma<T>::fence(out);
  Wgmma<T>::fence(score);
  if (threadIdx.x % 32 == 0) {
    if constexpr (SCORES) mbarrier_arrive(stages.empty_k + t % kWsStages);
    if constexpr (VALUES) mbarrier_arrive(stages.empty_v + (t - 1) % kWsStages);
  }
  if constexpr (SCORES) {
    tile_softmax<kWsBlockN>(score, out, row_max, row_sum, item, t, p.scale_log2);  // out holds the tiles before t
#pragma unroll
    for (int k = 0; k < kWsBlockN / 16; ++k) p_fragment<T>(score, k, a[k]);
  }
}

// A consumer warpgroup: query rows 64 wg .. 64 wg + 63 of the item against every tile. Step t issues the products
// P V of tile t - 1 and S = Q K^T of tile t together, then computes tile t's softmax; the two consumers take turns
// at the issue (named barriers, FlashAttention-3's ping-pong: consumer 0 first), so that one's products run on
// the tensor cores while the other computes its softmax. A K tile is released once its S is computed, a V tile
// once its P V is.
template <typename T, int D>
__device__ void consume(const DecodeParams& p, const Item& item, const WsStages<D>& stages, int num_tiles,
                        int group) {
  const int consumer_thread = threadIdx.x - kThreads;
  const int row_block = consumer_thread / 32;  // warps 0-3 of consumer 0, then 4-7 of consumer 1
  uint32_t q_frag[D / 16][4];
  load_q<T, D, false>(p, item, group, row_block, q_frag);
  float out[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float score[kWsBlockN / 8][4];           // (64, kWsBlockN) = Q K^T of the tile being read
  uint32_t a[kWsBlockN / 16][4] = {};      // P of the tile before, the A operand of its P V
  if (consumer_thread >= kThreads) named_barrier_arrive(kWsTurnBarrier, kWsPair);
  consume_step<false, true, T, D>(p, item, stages, 0, num_tiles, q_frag, out, row_max, row_sum, score, a);
  for (int t = 1; t < num_tiles; ++t)
    consume_step<true, true, T, D>(p, item, stages, t, num_tiles, q_frag, out, row_max, row_sum, score, a);
  consume_step<true, false, T, D>(p, item, stages, num_tiles, num_tiles, q_frag, out, row_max, row_sum, score, a);
  reduce_sums(row_sum);
  write_rows<D, false>(p, item, group, row_block, out, row_max, row_sum);
}
#endif

// The shared items of a step whose plan has items of 128 rows (shared_row_warps 8); the own items run in the
// partials kernel before it. Launched as a programmatic dependent of that kernel, its blocks start while the own
// items run; each waits for their end before it exits, so that the merge (a programmatic dependent of this grid)
// reads both kinds of partials.
template <typename T, int D>
__global__ void __launch_bounds__(kWsThreads, 1)
    shared_items_kernel(const DecodeParams p, const __grid_constant__ KVMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint4 smem[];
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const int group = p.num_heads / p.num_kv_heads;
  Item item;
  if (shared_item(p, blockIdx.x, kWsRows, kWsBlockN, item) && !write_empty<false, kWsRows>(p, item, group)) {
    // The 128-byte swizzle's atoms must lie on 1024-byte boundaries (the launch allocates the slack).
    const WsStages<D> stages(reinterpret_cast<char*>(smem) + (1024 - smem_addr(smem) % 1024) % 1024);
    if (threadIdx.x == 0) {
      for (int s = 0; s < kWsStages; ++s) {
        mbarrier_init(stages.full_k + s, 1);
        mbarrier_init(stages.full_v + s, 1);
        mbarrier_init(stages.empty_k + s, kWsConsumers * kWarps);
        mbarrier_init(stages.empty_v + s, kWsConsumers * kWarps);
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const int num_tiles = ceil_div(item.hi - item.lo, kWsBlockN);
    if (threadIdx.x < kThreads) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
      if (threadIdx.x < 64) produce<D>(p, item, maps, stages, num_tiles, threadIdx.x >= 32);
    } else {
      asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
      consume<T, D>(p, item, stages, num_tiles, group);
    }
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#else
  __trap();  // planned only where the extension is built for sm_90a (cuda_attention.plan)
#endif
}

// One warp per (sequence, head), each lane D / 32 columns. A sequence in no group (shared_lens 0) has no
// shared partials written for it, so only its own slots are read; a row that saw no key comes out 0. An empty
// split's output was never written: its weight is 0 and a select (not a product, NaN-safe) drops it, so the
// loads of all slots can be in flight together.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) merge_kernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "a lane merges 2 or 4 columns");
  using Vec = std::conditional_t<D == 128, float4, float2>;
  constexpr int kPerLane = D / 32;
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the partials kernel has finished, its writes visible
#endif
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= p.batch * p.num_heads) return;
  const int num_slots = p.shared_splits + p.own_splits;
  const int first = p.shared_lens[row / p.num_heads] > 0 ? 0 : p.shared_splits;
  const float* lse = p.part_lse + static_cast<int64_t>(row) * num_slots;
  float m = -INFINITY;
  for (int s = first + lane; s < num_slots; s += 32) m = fmaxf(m, lse[s]);
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, offset));

  float acc[kPerLane] = {};
  float sum = 0.f;
  if (m != -INFINITY) {
    const float* part = p.part_out + static_cast<int64_t>(row) * num_slots * D + lane * kPerLane;
#pragma unroll 16  // a step's partials loads in flight together (a short merge is latency-bound)
    for (int s = first; s < num_slots; ++s) {
      const float l = lse[s];
      const Vec v = *reinterpret_cast<const Vec*>(part + s * D);
      const float* x = reinterpret_cast<const float*>(&v);
      const float weight = l == -INFINITY ? 0.f : exp2f(l - m);
      sum += weight;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += weight > 0.f ? weight * x[i] : 0.f;
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  uint32_t packed[kPerLane / 2];
#pragma unroll
  for (int i = 0; i < kPerLane / 2; ++i) packed[i] = Half<T>::pack(acc[2 * i] * inv, acc[2 * i + 1] * inv);
  auto* dst = static_cast<T*>(p.out) + static_cast<int64_t>(row) * D + lane * kPerLane;
  if constexpr (kPerLane == 4)
    *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
  else
    *reinterpret_cast<uint32_t*>(dst) = packed[0];
}

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

// Launches kernel(args...) on `stream`: as a programmatic dependent of the kernel before it where
// p.programmatic_merge (its blocks may start once that one's have all started; it waits by griddepcontrol.wait).
template <typename... Params, typename... Args>
void launch_dependent(void (*kernel)(Params...), int64_t blocks, int threads, int smem, const DecodeParams& p,
                      cudaStream_t stream, const char* what, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute programmatic = {};
  programmatic.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  programmatic.val.programmaticStreamSerializationAllowed = 1;
  if (p.programmatic_merge) {
    config.attrs = &programmatic;
    config.numAttrs = 1;
  }
  check(cudaLaunchKernelEx(&config, kernel, args...), what);
}

// The merge of every (sequence, head)'s partials, after the kernels that write them.
template <typename T, int D>
void launch_merge(const DecodeParams& p, cudaStream_t stream) {
  launch_dependent(merge_kernel<T, D>, ceil_div(p.batch * p.num_heads, kWarps), kThreads, 0, p, stream,
                   "shared_prefix_decode: merge kernel launch", p);
}

// The partials kernel over the own items and, unless own_only, the shared items.
template <typename T, int D, int SHARED_ROW_WARPS, bool WGMMA, int STAGES = 3>
void launch_partials(const DecodeParams& p, cudaStream_t stream, bool own_only = false) {
  const int64_t own_items = static_cast<int64_t>(p.batch) * ceil_div(p.num_kv_heads, kWarps) * p.own_splits;
  const int64_t shared_items = static_cast<int64_t>(p.num_groups) * p.num_kv_heads * p.shared_tiles * p.shared_splits;
  const int64_t items = own_items + (own_only ? 0 : shared_items);
  if (items > 0x7fffffff) throw std::invalid_argument("shared_prefix_decode: too many work items for one grid");
  constexpr int kStagesBytes = STAGES * 2 * kBlockN * D * sizeof(T);
  // + the tiles' token offsets, + slack to align a wgmma item's stages
  constexpr int kSmem = kStagesBytes + STAGES * kBlockN * sizeof(int64_t) + (WGMMA ? 1024 : 0);
  static_assert(kWarps * 16 * (D + 8 + 2) * sizeof(float) <= kStagesBytes, "the key-slice merge reuses the stages");
  auto* kernel = partials_kernel<T, D, SHARED_ROW_WARPS, WGMMA, STAGES>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
        "shared_prefix_decode: raising the shared-memory limit");
  kernel<<<static_cast<int>(items), kThreads, kSmem, stream>>>(p, static_cast<int>(own_items));
  check(cudaGetLastError(), "shared_prefix_decode: partials kernel launch");
}

template <typename T, int D, int SHARED_ROW_WARPS, bool WGMMA, int STAGES = 3>
void launch(const DecodeParams& p, cudaStream_t stream) {
  launch_partials<T, D, SHARED_ROW_WARPS, WGMMA, STAGES>(p, stream);
  launch_merge<T, D>(p, stream);
}

// The driver's cuTensorMapEncodeTiled, through the runtime (no link to libcuda); null where unavailable.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const auto encode = [] {
    void* fn = nullptr;
#if CUDART_VERSION >= 12050
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
#endif
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The caches of `p` as KVMaps; throws where their layout does not suit the TMA (cuda_attention.plan checks the
// same): a tile's boxes whole pages (pages dividing kWsBlockN, or multiples of it), at most 32 of them (one a
// producer lane), the blocks contiguous slots, the strides and bases 16-byte aligned.
template <typename T, int D>
KVMaps encode_kv_maps(const DecodeParams& p) {
  const int box = std::min(p.page, kWsBlockN);
  const bool pages_fit = (p.page % kWsBlockN == 0 || kWsBlockN % p.page == 0) && 2 * (D / 64) * (kWsBlockN / box) <= 32;
  const int64_t bytes = sizeof(T), slots = static_cast<int64_t>(p.num_blocks) * p.page;
  const bool aligned = (p.kv_stride_head * bytes) % 16 == 0 && (p.kv_stride_slot * bytes) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0;
  if (!pages_fit || !aligned || p.kv_stride_block != p.page * p.kv_stride_slot || slots >= (int64_t{1} << 31))
    throw std::invalid_argument("shared_prefix_decode: the caches' layout does not suit 128-row shared items");
  const auto encode = tensor_map_encoder();
  if (encode == nullptr)
    throw std::invalid_argument("shared_prefix_decode: 128-row shared items need the driver's cuTensorMapEncodeTiled");
  const CUtensorMapDataType type =
      std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(p.num_kv_heads),
                              static_cast<cuuint64_t>(slots)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.kv_stride_head * bytes),
                                 static_cast<cuuint64_t>(p.kv_stride_slot * bytes)};
  const cuuint32_t box_dims[3] = {64, 1, static_cast<cuuint32_t>(box)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  KVMaps maps;
  for (auto [map, cache] : {std::pair{&maps.k, p.k_cache}, std::pair{&maps.v, p.v_cache}})
    if (encode(map, type, 3, const_cast<void*>(cache), dims, strides, box_dims, element_strides,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
      throw std::runtime_error("shared_prefix_decode: encoding the caches' tensor maps");
  return maps;
}

// A step with 128-row shared items: the own items in the partials kernel, the shared items in the
// warp-specialized kernel as its programmatic dependent (their blocks start as the own items' free the
// multiprocessors), then the merge.
template <typename T, int D>
void launch_warp_specialized(const DecodeParams& p, cudaStream_t stream) {
  const KVMaps maps = encode_kv_maps<T, D>(p);
  launch_partials<T, D, kWarps, false>(p, stream, true);
  const int64_t items = static_cast<int64_t>(p.num_groups) * p.num_kv_heads * p.shared_tiles * p.shared_splits;
  if (items > 0x7fffffff) throw std::invalid_argument("shared_prefix_decode: too many work items for one grid");
  if (items > 0) {
    constexpr int kSmem = kWsStages * 2 * kWsTileBytes<D> + kWsBarriers * sizeof(uint64_t) + 1024;
    auto* kernel = shared_items_kernel<T, D>;
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
          "shared_prefix_decode: raising the shared-memory limit");
    launch_dependent(kernel, items, kWsThreads, kSmem, p, stream, "shared_prefix_decode: shared items kernel launch",
                     p, maps);
  }
  launch_merge<T, D>(p, stream);
}

template <typename T, int D>
void launch_rows(const DecodeParams& p, cudaStream_t stream) {
  if (p.shared_row_warps == 2 * kWarps) {
    if constexpr (D == 128) return launch_warp_specialized<T, D>(p, stream);
    throw std::invalid_argument("shared_prefix_decode: 128-row shared items need head_dim 128");
  }
  if (p.wgmma) {
    if constexpr (D == 128)  // at D=64 three blocks fit a multiprocessor with 3 stages
      if (p.blocks_per_sm == 3) return launch<T, D, 4, true, 2>(p, stream);
    return launch<T, D, 4, true>(p, stream);
  }
  switch (p.shared_row_warps) {
    case 1: return launch<T, D, 1, false>(p, stream);
    case 2: return launch<T, D, 2, false>(p, stream);
    case 4: return launch<T, D, 4, false>(p, stream);
  }
  throw std::invalid_argument("shared_prefix_decode: shared_row_warps must be 1, 2, 4 or 8");
}

template <typename T>
void launch_dim(const DecodeParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_rows<T, 64>(p, stream);
    case 128: return launch_rows<T, 128>(p, stream);
  }
  throw std::invalid_argument("shared_prefix_decode: head_dim must be 64 or 128, got " + std::to_string(p.head_dim));
}

}  // namespace

void launch_shared_prefix_decode(const DecodeParams& p, cudaStream_t stream) {
  const int group = p.num_kv_heads > 0 ? p.num_heads / p.num_kv_heads : 0;
  if (group < 1 || group > 8 || group * p.num_kv_heads != p.num_heads)
    throw std::invalid_argument("shared_prefix_decode: query heads must be 1 to 8 times the KV heads");
  if (p.page < 1) throw std::invalid_argument("shared_prefix_decode: page size must be positive");
  if (p.own_splits < 1 || p.shared_splits < 0 || p.shared_tiles < 0 ||
      (p.num_groups > 0 && p.shared_tiles > 0 && p.shared_splits < 1) || p.min_shared_chunk < 1 ||
      p.min_own_chunk < 1)
    throw std::invalid_argument("shared_prefix_decode: bad split counts");
  if (16 * p.shared_row_warps < group)
    throw std::invalid_argument("shared_prefix_decode: a shared tile must hold a member's query heads");
  if (p.wgmma ? p.shared_row_warps < kWarps : p.shared_row_warps > kWarps)
    throw std::invalid_argument(
        "shared_prefix_decode: wgmma shared items have 64 or 128 rows (shared_row_warps 4 or 8), mma.sync ones at "
        "most 64");
  if (p.blocks_per_sm != 2 && p.blocks_per_sm != 3)
    throw std::invalid_argument("shared_prefix_decode: blocks_per_sm must be 2 or 3");
  if (p.batch == 0) return;
  if (p.dtype == DType::kBFloat16)
    launch_dim<__nv_bfloat16>(p, stream);
  else
    launch_dim<__half>(p, stream);
}

}  // namespace parrot_lc
