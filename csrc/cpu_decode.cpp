// parrot_lc._cpu: a CPU engine's per-token work in compiled loops (parrot_lc/engine/cpu_kernels.py).
//
// A decode step of a small model on a CPU is not its products alone: run as torch ops, SmolLM2-135M's 30 layers
// cost about 1,500 small ops a step, ~13 ms of dispatch against ~15 ms of products. Here each sublayer's
// elementwise work is one call (the residual add with the norm, the rotary embedding, the gated activation,
// decode attention with its KV write), and products of a few rows with float16 weights read each weight once
// for all of them, converted to float32 in registers (F16C), with float32 sums (FMA).
//
// Every output element's sum runs in one fixed order (four 8-lane accumulators over k, added, then the lanes,
// then the tail), whatever the number of rows or threads, so a row's result does not depend on what it is
// batched with.
//
// The kernels use AVX2, FMA and F16C through function attributes, so the library loads on any x86-64 CPU;
// `supported()` says whether this one has them (the Python side uses the kernels only then). Elsewhere the
// functions exist and refuse.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define PARROT_X86 1
#define KERNEL __attribute__((target("avx2,fma,f16c")))
#else
#define PARROT_X86 0
#define KERNEL
#endif

namespace {

bool supported() {
#if PARROT_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

void check_supported() { TORCH_CHECK(supported(), "parrot_lc._cpu needs an x86-64 CPU with AVX2, FMA and F16C"); }

void check_float_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

#if PARROT_X86

KERNEL inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

KERNEL inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// e^x, 8 lanes: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (about 1 ulp), 2^n in the
// exponent bits. Inputs are clamped to where 2^n is a normal float (results below ~1e-38 come out ~1e-38).
KERNEL inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n));
}

KERNEL inline float exp1(float x) {
  float lanes[8];
  _mm256_storeu_ps(lanes, exp8(_mm256_set1_ps(x)));
  return lanes[0];
}

// out[t, n] = sum_k x[t, k] w[n, k] for one weight row n and TB input rows from t. The row is read front to
// back, a cache line (32 weights) an iteration into 4 accumulators per input row: the hardware prefetcher sees
// one sequential stream (interleaving several rows' streams read memory at ~60% of the rate), and the 4 x TB
// sums are independent chains.
template <int TB>
KERNEL void product_tile(const float* x, int64_t x_stride, const uint16_t* row, int64_t K, float* out,
                         int64_t out_stride, int64_t t) {
  constexpr int U = 4;
  __m256 acc[TB][U];
  for (int i = 0; i < TB; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 8 * u)));
      for (int i = 0; i < TB; ++i)
        acc[i][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (t + i) * x_stride + k + 8 * u), acc[i][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
    for (int i = 0; i < TB; ++i) acc[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (t + i) * x_stride + k), acc[i][0]);
  }
  for (int i = 0; i < TB; ++i) {
    __m256 all = acc[i][0];
    for (int u = 1; u < U; ++u) all = _mm256_add_ps(all, acc[i][u]);
    float s = sum_lanes(all);
    for (int64_t kk = k; kk < K; ++kk) s += half_to_float(row[kk]) * x[(t + i) * x_stride + kk];
    out[(t + i) * out_stride] = s;
  }
}

// One weight row against all T input rows, two at a time.
KERNEL void product_row(const float* x, int64_t x_stride, int64_t T, const uint16_t* row, int64_t K, float* out,
                        int64_t out_stride) {
  int64_t t = 0;
  for (; t + 2 <= T; t += 2) product_tile<2>(x, x_stride, row, K, out, out_stride, t);
  if (t < T) product_tile<1>(x, x_stride, row, K, out, out_stride, t);
}

#endif

// x (T, K) float32 times w (N, K) float16, transposed: (T, N) float32. Meant for a few rows (decode): each
// weight row is read from memory once for all of them.
torch::Tensor product_f16(const torch::Tensor& x, const torch::Tensor& w) {
  check_supported();
  check_float_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1), "x must be (T, K) and w (N, K)");
  TORCH_CHECK(w.scalar_type() == torch::kFloat16 && w.is_contiguous() && w.device().is_cpu(),
              "w must be a contiguous float16 CPU tensor");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({T, N}, x.options());
#if PARROT_X86
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
  float* op = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  // At least 16 rows (tens of KB of weights) per task.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) product_row(xp, x_stride, T, wp + n * K, K, op + n, N);
  });
#endif
  return out;
}

// (x + residual, then RMS-normalised times weight): returns (normed, x + residual); without a residual, x is
// the residual stream as it is.
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                        const c10::optional<torch::Tensor>& residual) {
  check_float_rows(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous (T, C)");
  const int64_t T = x.size(0), C = x.size(1);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == C,
              "weight must be a contiguous float32 (C,)");
  torch::Tensor stream = x;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == torch::kFloat32,
                "residual must be a contiguous float32 tensor of x's shape");
    stream = torch::empty_like(x);
  }
  auto normed = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* sp = stream.data_ptr<float>();
  float* np = normed.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = xp + t * C;
      float* sr = sp + t * C;
      if (rp != nullptr)
        for (int64_t c = 0; c < C; ++c) sr[c] = xr[c] + rp[t * C + c];
      float squares = 0.f;
      for (int64_t c = 0; c < C; ++c) squares += sr[c] * sr[c];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(C) + static_cast<float>(eps));
      for (int64_t c = 0; c < C; ++c) np[t * C + c] = sr[c] * inv * wp[c];
    }
  });
  return {normed, stream};
}

// In place on q (T, Hq, D) and k (T, Hkv, D), views whose last dimension is contiguous: x * cos + (x's halves
// swapped) * sin, with cos and sin (T, D) as rope's (sin already signed (-sin, sin)).
void rotary_(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_float_rows(q, "q");
  check_float_rows(k, "k");
  check_float_rows(cos, "cos");
  check_float_rows(sin, "sin");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q must be (T, Hq, D) and k (T, Hkv, D)");
  const int64_t T = q.size(0), D = q.size(2), half = D / 2;
  TORCH_CHECK(cos.numel() == T * D && sin.numel() == T * D && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous (T, D)");
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  auto rotate = [&](const torch::Tensor& x, int64_t t) {
    float* base = x.data_ptr<float>() + t * x.stride(0);
    float before[512];
    for (int64_t h = 0; h < x.size(1); ++h) {
      float* row = base + h * x.stride(1);
      for (int64_t d = 0; d < D; ++d) before[d] = row[d];
      for (int64_t d = 0; d < D; ++d)
        row[d] = before[d] * cp[t * D + d] + before[d < half ? d + half : d - half] * snp[t * D + d];
    }
  };
  TORCH_CHECK(D % 2 == 0 && D <= 512, "head dim must be even and at most 512");
  at::parallel_for(0, T, 32, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      rotate(q, t);
      rotate(k, t);
    }
  });
}

#if PARROT_X86
// One row of silu(gate) * up: g / (1 + e^-g) * u.
KERNEL void silu_mul_row(const float* gate, const float* up, float* out, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < I; ++i) out[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
}
#endif

// silu(gate) * up for gate_up (T, 2I), the two halves side by side: (T, I).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_supported();
  check_float_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be (T, 2I)");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({T, I}, gate_up.options());
#if PARROT_X86
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul_row(gp + t * stride, gp + t * stride + I, op + t * I, I);
  });
#endif
  return out;
}

#if PARROT_X86
KERNEL inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float s = sum_lanes(acc);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// out += p * v over D.
KERNEL inline void add_scaled(float* out, float p, const float* v, int64_t D) {
  const __m256 ps = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + d), _mm256_loadu_ps(out + d)));
  for (; d < D; ++d) out[d] += p * v[d];
}

// One sequence's G query heads of one KV head over its KV [0, L) in the paged cache.
KERNEL void attend_group(const float* q, int64_t q_head_stride, const float* k_cache, const float* v_cache,
                         int64_t block_stride, int64_t token_stride, const int64_t* table, int64_t block_size,
                         int64_t L, int64_t G, int64_t D, float scale, float* out, int64_t out_head_stride,
                         std::vector<float>& scores) {
  scores.assign(static_cast<size_t>(G * L), 0.f);
  for (int64_t j = 0; j < L; ++j) {
    const float* key = k_cache + table[j / block_size] * block_stride + (j % block_size) * token_stride;
    for (int64_t g = 0; g < G; ++g) scores[g * L + j] = dot(q + g * q_head_stride, key, D) * scale;
  }
  std::vector<float> totals(G);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * L;
    float row_max = -INFINITY;
    for (int64_t j = 0; j < L; ++j) row_max = std::max(row_max, s[j]);
    const __m256 m = _mm256_set1_ps(row_max);
    __m256 sums = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
      _mm256_storeu_ps(s + j, e);
      sums = _mm256_add_ps(sums, e);
    }
    float total = sum_lanes(sums);
    for (; j < L; ++j) {
      s[j] = exp1(s[j] - row_max);
      total += s[j];
    }
    totals[g] = total;
    float* o = out + g * out_head_stride;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
  }
  for (int64_t j = 0; j < L; ++j) {
    const float* value = v_cache + table[j / block_size] * block_stride + (j % block_size) * token_stride;
    for (int64_t g = 0; g < G; ++g) add_scaled(out + g * out_head_stride, scores[g * L + j], value, D);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / totals[g];
    float* o = out + g * out_head_stride;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}
#endif

// A decode step's attention: writes each sequence's new k and v (B, Hkv, D) at its cache slot, then attends its
// query row q (B, Hq, D) over its KV [0, context_lens[b]) through its block table. The caches are
// (num_blocks, block_size, Hkv, D) float32. Returns (B, Hq, D).
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                               const torch::Tensor& block_tables, const torch::Tensor& context_lens, double scale) {
  check_supported();
  for (const auto* t : {&q, &k, &v}) check_float_rows(*t, "q, k and v");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == torch::kFloat32 &&
                  v_cache.scalar_type() == torch::kFloat32,
              "the caches must be contiguous float32 (num_blocks, block_size, Hkv, D)");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == Hkv && k_cache.size(3) == D && Hq % Hkv == 0, "q, k and the caches disagree");
  for (const auto* t : {&slots, &context_lens})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous() && t->numel() == B,
                "slots and context_lens must be contiguous int64 (B,)");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == B,
              "block_tables must be contiguous int64 (B, max_blocks)");
  auto out = torch::empty({B, Hq, D}, q.options());
#if PARROT_X86
  const int64_t token_stride = Hkv * D, block_stride = block_size * token_stride;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * block_size, max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < num_slots, "slot ", sp[b], " is outside the cache");
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * block_size, "context length ", lp[b], " is outside its table");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * max_blocks + i] >= 0 && tables[b * max_blocks + i] < k_cache.size(0), "block ",
                  tables[b * max_blocks + i], " is outside the cache");
  }
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* kr = k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1);
      const float* vr = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
      std::copy(kr, kr + D, kc + sp[b] * token_stride + h * D);
      std::copy(vr, vr + D, vc + sp[b] * token_stride + h * D);
    }
  const int64_t G = Hq / Hkv;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads only where an item (one KV head of one sequence) is worth a fork and join: ~2^17 multiply-adds.
  const int64_t longest = *std::max_element(lp, lp + B);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, longest * G * D));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      attend_group(qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), kc + h * D, vc + h * D, block_stride,
                   token_stride, tables + b * max_blocks, block_size, lp[b], G, D, static_cast<float>(scale),
                   op + (b * Hq + h * G) * D, D, scores);
    }
  });
#endif
  return out;
}

}  // namespace

// The kernels run without the GIL, as torch's own ops do: the server's event loop and the client threads of an
// in-process server go on while a step computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using released = py::call_guard<py::gil_scoped_release>;
  m.def("supported", &supported, "whether this CPU has AVX2, FMA and F16C (what the kernels use)");
  m.def("product_f16", &product_f16, "x (T, K) float32 times w (N, K) float16, transposed: (T, N)", released());
  m.def("add_rms_norm", &add_rms_norm, "(normed, residual stream) of x plus the residual", released());
  m.def("rotary_", &rotary_, "rotary position embedding of q and k, in place", released());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up (T, 2I)", released());
  m.def("decode_attention", &decode_attention, "a decode step's KV write and attention over the paged cache",
        released());
}
