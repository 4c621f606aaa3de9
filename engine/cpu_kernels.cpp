// CPU matmul kernels for the engine's hot path, built on first use by engine/kernels.py
// (torch.utils.cpp_extension, -O3 -march=native: the build is specific to the machine it runs on).
//
//   distserve::quant_linear_rows(x, qp, dp, mp, kind, K, N)
//                                                  y[M, N] = x[M, K] @ W^T, W's GGUF blocks interleaved by
//                                                  rows (quant_pack_rows), float32 out (x rounded to int16
//                                                  per block, below)
//   distserve::quant_pack_rows / quant_unpack_rows  GGUF's order <-> interleaved by rows, losslessly
//   distserve::quant_dequant_rows(qp, dp, mp, kind, K, N)  W as dense float32 [N, K] from the interleaved blocks
//   distserve::quant_linear(x, qs, d, m, kind, K)  the same product on W in GGUF's order (tools, tests)
//   distserve::quant_dequant(qs, d, m, kind, K)    W as dense float32 [N, K]
//   distserve::round_int16(x)                      x [M, K] as the products round it, float32
//   distserve::panel_linear(x, wp, b)              y = x @ W^T (+ b), float32, on W packed in panels of 16
//                                                  rows [N/16, K, 16] (register tiles, below)
//   distserve::decode_attention(q, k, v, k_cache, v_cache, tables, ctx_lens, scale)
//                                                  one decode step's attention over the paged cache, read in
//                                                  place (engine/attention.py paged_decode_attention)
//   distserve::argmax_rows(x)                      [B, V] -> [B] int64, each row's first index of its maximum
//   distserve::packed_linear(x, w, b, wr)          a linear on a prepacked weight, as an opaque op
//                                                  (torch.compile's lowering of the mkldnn ops wants the
//                                                  weight frozen into the graph). bf16: oneDNN's, and with
//                                                  the row-major copy wr [N, K] M <= 4 runs the engine's
//                                                  streaming bf16 GEMV instead (bf16_linear); float32 (w:
//                                                  panels): panel_linear for 1-64 rows, torch's linear on
//                                                  wr otherwise
//
// Quantized weights (engine/quant.py reads them from the GGUF blocks, losslessly), per output row n
// and block g of 32 values (nb blocks per row, padded to an even count with zero blocks):
//   Q4_0: qs u8 [N, nb, 16] nibbles, d f16 [N, nb]             w = d * (q - 8)
//   Q4_1: qs u8 [N, nb, 16] nibbles, d, m f16 [N, nb]          w = d * q + m
//   Q8_0: qs s8 [N, nb, 32], d f16 [N, nb]                      w = d * q
// byte j of a 4-bit block holds value j (low nibble) and value j + 16 (high nibble), as in GGUF. The vector
// kernels read them interleaved by rows (quant_pack_rows, below), so that a vector's lanes are output rows.
//
// The product rounds each row of x to int16 per block of 32 values and sums a block's products in int32
// (vpdpwssd / vpmaddwd), converting and scaling each block's sums in float32 once for 8 (AVX2) or 16 (AVX-512)
// output rows. A software prefetch runs QUANT_PF_BYTES ahead in the weights (~30% off a batch-1 product here).
// The weights are exact, and a row of x is rounded and summed the same way whatever else is in its batch (up
// to 64 rows: more go through the dense product on x rounded alike, engine/quant.py round_like_kernels, equal
// up to float32 summation order). The scalar build (no AVX2) multiplies in float32 instead. (llama.cpp rounds
// x to int8 per block: measured here, that costs SmolLM2 ~5% of teacher-forced top-1 agreement.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int QK = 32;  // values per GGUF block
#define UNROLL _Pragma("GCC unroll 32")  // a loop over a register tile, unrolled early
constexpr int64_t GR = 16;  // weight rows per group of the row-interleaved layout (quant_pack_rows)
constexpr int64_t QUANT_PF_BYTES = 4096;  // prefetch distance in a weight row (4-8 KiB alike; 1 KiB ~25% slower)
enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

inline float h2f(const at::Half* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline int64_t qs_bytes(int64_t kind) { return kind == Q8_0 ? 32 : 16; }

// ---- dequantization: the float32 values gguf-py computes, bit for bit ---------------------------
// (d * q is exact in float32; Q4_1's "+ m" rounds once). One block of 32 values:
inline void dequant_block_scalar(int64_t kind, const uint8_t* q, float dg, float mg, float* out) {
  if (kind == Q8_0) {
    for (int j = 0; j < QK; ++j) out[j] = dg * static_cast<float>(static_cast<int8_t>(q[j]));
  } else if (kind == Q4_1) {
    for (int j = 0; j < 16; ++j) {
      out[j] = dg * static_cast<float>(q[j] & 15) + mg;
      out[j + 16] = dg * static_cast<float>(q[j] >> 4) + mg;
    }
  } else {
    for (int j = 0; j < 16; ++j) {
      out[j] = dg * static_cast<float>((q[j] & 15) - 8);
      out[j + 16] = dg * static_cast<float>((q[j] >> 4) - 8);
    }
  }
}

void dequant_row(int64_t kind, const uint8_t* qs, const at::Half* d, const at::Half* m, int64_t nb, float* out) {
  for (int64_t g = 0; g < nb; ++g, out += QK)
    dequant_block_scalar(kind, qs + g * qs_bytes(kind), h2f(d + g), m ? h2f(m + g) : 0.f, out);
}

#ifdef __AVX2__
// ---- vector helpers, and a block dequantized in registers (the values above, for quant_dequant) ----
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr const char* kIsa = "avx512";
using Vec = __m512;
constexpr int VL = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vexp2i(Vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline Vec vround(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vbf16(const at::BFloat16* p) {  // VL bf16 values as float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a); }

template <int KIND>
inline void dequant_block(const uint8_t* q, const float* d, const float* m, Vec* w) {  // w[0..1]: values 0-15, 16-31
  const Vec dv = vbcast(d);
  if constexpr (KIND == Q8_0) {
    const __m128i* p = reinterpret_cast<const __m128i*>(q);
    w[0] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))));
    w[1] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1))));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i low = _mm_set1_epi8(15);
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(raw, low));
    const __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
    if constexpr (KIND == Q4_1) {  // fma rounds d * q + m once; d * q is exact, so = gguf's d * q + m
      const Vec mv = vbcast(m);
      w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), dv, mv);
      w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), dv, mv);
    } else {
      const __m512i eight = _mm512_set1_epi32(8);
      w[0] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)));
      w[1] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)));
    }
  }
}
#else
constexpr const char* kIsa = "avx2";
using Vec = __m256;
constexpr int VL = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vset(float a) { return _mm256_set1_ps(a); }
inline float vsum(Vec a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline Vec vexp2i(Vec n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline Vec vround(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vbf16(const at::BFloat16* p) {  // VL bf16 values as float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a); }

template <int KIND>
inline void dequant_block(const uint8_t* q, const float* d, const float* m, Vec* w) {  // w[0..3]: 8 values each
  const Vec dv = vbcast(d);
  if constexpr (KIND == Q8_0) {
    for (int i = 0; i < 4; ++i) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      w[i] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
    }
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    const __m256i v[4] = {_mm256_cvtepu8_epi32(lo), _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                          _mm256_cvtepu8_epi32(hi), _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))};
    if constexpr (KIND == Q4_1) {
      const Vec mv = vbcast(m);
      for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[i]), dv, mv);
    } else {
      const __m256i eight = _mm256_set1_epi32(8);
      for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_sub_epi32(v[i], eight)));
    }
  }
}
#endif
constexpr int NV = QK / VL;  // vectors per block

// ---- y = x @ W^T on integer dot products: x rounded to int16 per block ----------------------------
// Each row of x is rounded per block of 32 values to int16 (scale s = max|x| / 32767: an error of at
// most half a step, ~1.5e-5 of the block's largest value); the 4- or 8-bit weights widen to int16 and
// vpdpwssd / vpmaddwd sum a block's products in int32 (exact); each block's sum is converted and scaled
// by d * s in float32, and the weights' offset (Q4_1's m, Q4_0's -8 d) multiplies the rounded block's sum
// (s * the sum of its int16 values): the product of the weights with x as rounded, nothing else. Weights
// stay exact. round_int16 returns x so rounded, for the dense product of many rows (engine/quant.py).
struct XBlocks {            // x [M, K] rounded per block, nb blocks per row (zero blocks pad K)
  std::vector<int16_t> q;   // [M, nb * 32] in x's order
  std::vector<float> s;     // [M, nb] each block's scale (0 for padding)
  std::vector<float> t;     // [M, nb] each rounded block's sum, s * sum(q)
};

// A block's scale s and 1 / s from its largest magnitude. A block holding a NaN or an inf gets s = NaN, so
// its row's products come out NaN as a float32 product's would (and no other row's: each row has its own
// blocks); a block too small for 32767 / amax (below ~1e-34) rounds to zeros.
inline float block_scale(float amax, bool finite, float* s) {
  const float inv = 32767.f / amax;
  if (!finite || !std::isfinite(amax)) {
    *s = std::numeric_limits<float>::quiet_NaN();
    return 0.f;
  }
  if (amax > 0.f && std::isfinite(inv)) {
    *s = amax / 32767.f;
    return inv;
  }
  *s = 0.f;
  return 0.f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512i dot16(__m512i acc, __m512i w, __m512i x) {  // acc + the pairwise int16 products
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// one block of 32 floats -> int16 (values 0-15 to lo, 16-31 to hi), its scale s and the rounded block's
// sum s * sum(q) (what the offset term multiplies: the same x as the products see)
inline void round_block(const float* v, int16_t* lo, int16_t* hi, float* s, float* t) {
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const bool finite = (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q)) == 0;
  const __m512 inv = _mm512_set1_ps(block_scale(amax, finite, s));
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), _mm512_cvtsepi32_epi16(qa));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), _mm512_cvtsepi32_epi16(qb));
  *t = *s * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
}
#else
inline void round_block(const float* v, int16_t* lo, int16_t* hi, float* s, float* t) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a[4], m = _mm256_setzero_ps();
  int unordered = 0;
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_loadu_ps(v + 8 * i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, a[i]));
    unordered |= _mm256_movemask_ps(_mm256_cmp_ps(a[i], a[i], _CMP_UNORD_Q));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const __m256 inv = _mm256_set1_ps(block_scale(amax, unordered == 0, s));
  int16_t* out[2] = {lo, hi};
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i < 2; ++i) {  // packs interleaves 128-bit lanes; the permute puts them back in order
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(a[2 * i], inv));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(a[2 * i + 1], inv));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(q0, q1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i]), _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8));
  }
  __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  h4 = _mm_add_epi32(h4, _mm_shuffle_epi32(h4, 0x4E));
  h4 = _mm_add_epi32(h4, _mm_shuffle_epi32(h4, 0xB1));
  *t = *s * static_cast<float>(_mm_cvtsi128_si32(h4));
}
#endif

// x [M, K] -> XBlocks with nb blocks a row, in x's own order (rows in parallel when there are many)
void round_x(const float* x, int64_t M, int64_t K, int64_t nb, XBlocks& X) {
  X.q.assign(M * nb * QK, 0);
  X.s.assign(M * nb, 0.f);
  X.t.assign(M * nb, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t g = 0; g < K / QK; ++g) {
        int16_t* q = X.q.data() + (i * nb + g) * QK;
        round_block(x + i * K + g * QK, q, q + 16, &X.s[i * nb + g], &X.t[i * nb + g]);
      }
  });
}

constexpr int64_t SCALE_PF_TILES = 8;
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}
// the first QUANT_PF_BYTES of a range, before its loop's own prefetches (which run that far ahead) start
inline void prefetch_head(const void* p, int64_t bytes) { prefetch_span(p, std::min(bytes, QUANT_PF_BYTES)); }

// ---- the products, on weights interleaved by rows: lanes are output rows -------------------------
// Packed once at load (quant_pack_rows), 16 weight rows form a group, and a group's block holds, per
// chunk c, each row's bytes 2c and 2c + 1 side by side: [groups, nb, 8 (Q4) or 16 (Q8) chunks, 16 rows x 2].
// Widened to int16, a chunk is a vector whose int32 lane r pairs two of row r's values (Q4: values 2c, 2c + 1
// from the low nibbles, 2c + 16, 2c + 17 from the high ones; Q8: values 2c, 2c + 1); one vpmaddwd / vpdpwssd
// against x's pair broadcast to every lane adds those two products to each row's block sum. A block's sums
// for 8 (AVX2) or 16 rows (AVX-512) then take one conversion and one FMA together, where GGUF's row-by-row
// layout spent a conversion and an FMA per row and block, and a horizontal sum per row (32 rows of x: ~1.45x
// (AVX2) and ~1.75x (AVX-512) faster on the model's matrices, measured). The arithmetic, per row of x and
// output row: blocks in order, Q4's offset term first (acc += o * t), then acc += float(the block's exact
// int32 sum) * (d * s); every tile height does exactly that, so a row's result does not depend on its batch.
// d and m follow the same grouping: [groups, nb, 16].
constexpr int VPG = GR / VL;  // vectors per group: 2 (AVX2), 1 (AVX-512)
constexpr float kMinus8 = -8.f;  // Q4_0's offset per unit of d
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
using IVec = __m512i;
inline IVec izero() { return _mm512_setzero_si512(); }
inline IVec ibcast(const int16_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
inline IVec idot(IVec acc, IVec w, IVec x) { return dot16(acc, w, x); }
inline Vec icvt(IVec a) { return _mm512_cvtepi32_ps(a); }
inline Vec halves(const at::Half* h) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))); }
template <int KIND>
inline void widen(const uint8_t* p, IVec* lo, IVec* hi) {  // one vector: a chunk's 32 bytes
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (KIND == Q8_0) {
    *lo = _mm512_cvtepi8_epi16(raw);
  } else {
    const __m512i v = _mm512_cvtepu8_epi16(raw);
    *lo = _mm512_and_si512(v, _mm512_set1_epi16(15));
    *hi = _mm512_srli_epi16(v, 4);
  }
}
#else
using IVec = __m256i;
inline IVec izero() { return _mm256_setzero_si256(); }
inline IVec ibcast(const int16_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline IVec idot(IVec acc, IVec w, IVec x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
inline Vec icvt(IVec a) { return _mm256_cvtepi32_ps(a); }
inline Vec halves(const at::Half* h) {
#ifdef __F16C__
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
#else
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = h2f(h + i);
  return _mm256_load_ps(f);
#endif
}
template <int KIND>
inline void widen(const uint8_t* p, IVec* lo, IVec* hi) {  // one vector: half a chunk, 8 rows' 16 bytes
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (KIND == Q8_0) {
    *lo = _mm256_cvtepi8_epi16(raw);
  } else {
    const __m256i v = _mm256_cvtepu8_epi16(raw);
    *lo = _mm256_and_si256(v, _mm256_set1_epi16(15));
    *hi = _mm256_srli_epi16(v, 4);
  }
}
#endif
template <int KIND> constexpr int chunks() { return KIND == Q8_0 ? 16 : 8; }
template <int KIND> constexpr int64_t group_block_bytes() { return chunks<KIND>() * 2 * GR; }

// R rows of x by G groups (G * 16 output rows); y [R, ldy] from column 0 of the first group
// (the loops over the tile are unrolled early, as in fp32_tile: without it GCC 12 kept AVX2's 1-row sums in
// memory too, and the model's layers at 1 row took 3.1-3.2 ms instead of 2.5-2.6, bench.kernel_chain)
template <int KIND, int R, int G>
inline void rtile(const XBlocks& X, int64_t i0, int64_t nb, const uint8_t* q, const at::Half* d, const at::Half* mn,
                  float* y, int64_t ldy) {
  constexpr int C = G * VPG, NCH = chunks<KIND>();
  constexpr int64_t BB = group_block_bytes<KIND>();
  const int64_t ldx = nb * QK, gq = nb * BB, gd = nb * GR;
  const int16_t* xq = X.q.data() + i0 * ldx;
  const float* xs = X.s.data() + i0 * nb;
  const float* xt = X.t.data() + i0 * nb;
  Vec acc[R][C];
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int c = 0; c < C; ++c) acc[i][c] = vzero();
  for (int64_t b = 0; b < nb; ++b) {
    IVec dot[R][C];
    UNROLL for (int i = 0; i < R; ++i)
      UNROLL for (int c = 0; c < C; ++c) dot[i][c] = izero();
    for (int ch = 0; ch < NCH; ++ch) {
      IVec lo[C], hi[C];
      UNROLL for (int g = 0; g < G; ++g) {
        const uint8_t* p = q + g * gq + b * BB + ch * 2 * GR;
        if (ch % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + QUANT_PF_BYTES, _MM_HINT_T0);
        UNROLL for (int v = 0; v < VPG; ++v) widen<KIND>(p + v * 2 * VL, &lo[g * VPG + v], &hi[g * VPG + v]);
      }
      UNROLL for (int i = 0; i < R; ++i) {
        const int16_t* xr = xq + i * ldx + b * QK + 2 * ch;
        const IVec xl = ibcast(xr);
        if constexpr (KIND == Q8_0) {
          UNROLL for (int c = 0; c < C; ++c) dot[i][c] = idot(dot[i][c], lo[c], xl);
        } else {
          const IVec xh = ibcast(xr + 16);
          UNROLL for (int c = 0; c < C; ++c) dot[i][c] = idot(idot(dot[i][c], lo[c], xl), hi[c], xh);
        }
      }
    }
    UNROLL for (int g = 0; g < G; ++g)
      UNROLL for (int v = 0; v < VPG; ++v) {
        const int c = g * VPG + v;
        const Vec dv = halves(d + g * gd + b * GR + v * VL);
        Vec ov = vzero();
        if constexpr (KIND == Q4_1) ov = halves(mn + g * gd + b * GR + v * VL);
        if constexpr (KIND == Q4_0) ov = vmul(dv, vbcast(&kMinus8));
        UNROLL for (int i = 0; i < R; ++i) {
          if constexpr (KIND != Q8_0) acc[i][c] = vfma(ov, vbcast(xt + i * nb + b), acc[i][c]);
          acc[i][c] = vfma(icvt(dot[i][c]), vmul(dv, vbcast(xs + i * nb + b)), acc[i][c]);
        }
      }
  }
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int c = 0; c < C; ++c) vstore(y + i * ldy + c * VL, acc[i][c]);
}

// every row of x against G groups at y's column 0: R rows at a time, then two, then one
template <int KIND, int R, int G>
inline void rtile_rows(const XBlocks& X, int64_t M, int64_t nb, const uint8_t* q, const at::Half* d,
                       const at::Half* mn, float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + R <= M; i += R) rtile<KIND, R, G>(X, i, nb, q, d, mn, y + i * ldy, ldy);
  if constexpr (R > 2)
    for (; i + 2 <= M; i += 2) rtile<KIND, 2, G>(X, i, nb, q, d, mn, y + i * ldy, ldy);
  for (; i < M; ++i) rtile<KIND, 1, G>(X, i, nb, q, d, mn, y + i * ldy, ldy);
}

// of the vector registers: AVX2 (16) 3 rows x 2 vectors of sums and of accumulators + 4 weight vectors;
// AVX-512 (32) 4 x 2. One row of x (batch 1): 2 groups a tile, the most weight streams in flight.
constexpr int RR_BIG = VL == 16 ? 4 : 3, RG_BIG = VL == 16 ? 2 : 1;

template <int KIND>
void quant_gemm_rows(const float* x, int64_t M, int64_t K, const uint8_t* qp, const at::Half* d, const at::Half* mn,
                     int64_t nb, int64_t N, float* y) {
  XBlocks X;
  round_x(x, M, K, nb, X);
  const int64_t groups = (N + GR - 1) / GR, full = N / GR, gq = nb * group_block_bytes<KIND>(), gd = nb * GR;
  at::parallel_for(0, full, 1, [&](int64_t g0, int64_t g1) {
    prefetch_head(qp + g0 * gq, (g1 - g0) * gq);
    prefetch_head(d + g0 * gd, (g1 - g0) * gd * 2);
    if (mn) prefetch_head(mn + g0 * gd, (g1 - g0) * gd * 2);
    const int64_t step = M == 1 ? 2 : RG_BIG;
    for (int64_t g = g0; g < g1; g += step) {
      if (g + SCALE_PF_TILES < g1) {  // the scales a few groups ahead (the tiles prefetch their weights)
        prefetch_span(d + (g + SCALE_PF_TILES) * gd, step * gd * 2);
        if (mn) prefetch_span(mn + (g + SCALE_PF_TILES) * gd, step * gd * 2);
      }
      const uint8_t* q = qp + g * gq;
      const at::Half* dg = d + g * gd;
      const at::Half* mg = mn ? mn + g * gd : nullptr;
      if (g + step > g1) rtile_rows<KIND, RR_BIG, 1>(X, M, nb, q, dg, mg, y + g * GR, N);  // a last odd group
      else if (M == 1) rtile<KIND, 1, 2>(X, 0, nb, q, dg, mg, y + g * GR, N);
      else rtile_rows<KIND, RR_BIG, RG_BIG>(X, M, nb, q, dg, mg, y + g * GR, N);
    }
  });
  if (groups > full) {  // the last group's rows past N are padding: its products go through a buffer
    std::vector<float> buf(M * GR);
    rtile_rows<KIND, RR_BIG, 1>(X, M, nb, qp + full * gq, d + full * gd, mn ? mn + full * gd : nullptr, buf.data(), GR);
    for (int64_t i = 0; i < M; ++i)
      std::memcpy(y + i * N + full * GR, buf.data() + i * GR, (N - full * GR) * sizeof(float));
  }
}
#else
constexpr const char* kIsa = "scalar";

// no vector unit: each weight row dequantized to float32 (dequant_row) and multiplied there
template <int KIND>
void quant_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qs, const at::Half* d, const at::Half* mn,
                int64_t nb, int64_t N, float* y) {
  const int64_t ldq = nb * (KIND == Q8_0 ? 32 : 16);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(nb * QK);
    for (int64_t n = n0; n < n1; ++n) {
      dequant_row(KIND, qs + n * ldq, d + n * nb, mn ? mn + n * nb : nullptr, nb, w.data());
      for (int64_t i = 0; i < M; ++i) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += w[k] * x[i * K + k];
        y[i * N + n] = acc;
      }
    }
  });
}
#endif

// x [M, K] as quant_linear rounds it: each block of 32 values s * round(x / s), float32 (the scalar build,
// which multiplies in float32, returns x)
at::Tensor round_int16(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % QK == 0, "x must be [M, K] with K a multiple of 32");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(x);
#ifdef __AVX2__
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel() / QK, 256, [&](int64_t b0, int64_t b1) {
    alignas(64) int16_t q[QK];
    float s, t;
    for (int64_t b = b0; b < b1; ++b) {
      round_block(xp + b * QK, q, q + 16, &s, &t);
      for (int j = 0; j < QK; ++j) op[b * QK + j] = s * static_cast<float>(q[j]);
    }
  });
#else
  out.copy_(x);
#endif
  return out;
}

// what both layouts share: a known kind, K a multiple of 32, nb blocks a row = K / 32 rounded up to even
void check_blocks(int64_t kind, int64_t K, int64_t nb) {
  TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "kind must be 0 (Q4_0), 1 (Q4_1) or 2 (Q8_0)");
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32");
  TORCH_CHECK(nb % 2 == 0 && nb * QK >= K && (nb - 1) * QK < K + QK, "nb must be K / 32 rounded up to even");
}

void check_packed(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t kind, int64_t K) {
  TORCH_CHECK(qs.dim() == 3 && qs.is_contiguous() && qs.element_size() == 1,
              "qs must be contiguous [N, nb, 16 or 32] bytes");
  check_blocks(kind, K, qs.size(1));
  TORCH_CHECK(qs.size(2) == qs_bytes(kind), "qs must be contiguous [N, nb, 16 or 32] bytes");
  const int64_t nb = qs.size(1);
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == qs.size(0) && d.size(1) == nb,
              "d must be contiguous float16 [N, nb]");
  TORCH_CHECK(kind != Q4_1 || (m.defined() && m.scalar_type() == at::kHalf && m.is_contiguous() && m.sizes() == d.sizes()),
              "Q4_1 needs m: contiguous float16 [N, nb]");
}

// one block of 32 values, on the vector unit where there is one (the same values as dequant_block_scalar)
inline void dequant_one(int64_t kind, const uint8_t* q, float dg, float mg, float* out) {
#ifdef __AVX2__
  Vec w[NV];
  if (kind == Q4_0) dequant_block<Q4_0>(q, &dg, &mg, w);
  else if (kind == Q4_1) dequant_block<Q4_1>(q, &dg, &mg, w);
  else dequant_block<Q8_0>(q, &dg, &mg, w);
  for (int v = 0; v < NV; ++v) vstore(out + v * VL, w[v]);
#else
  dequant_block_scalar(kind, q, dg, mg, out);
#endif
}

at::Tensor quant_dequant(const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& m_opt,
                         int64_t kind, int64_t K) {
  const at::Tensor m = m_opt.has_value() ? *m_opt : at::Tensor();
  check_packed(qs, d, m, kind, K);
  const int64_t N = qs.size(0), nb = qs.size(1);
  at::Tensor out = at::empty({N, nb * QK}, d.options().dtype(at::kFloat));
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = kind == Q4_1 ? m.data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t ldq = nb * qs_bytes(kind);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* q = qp + n * ldq;
      const at::Half* dn = dp + n * nb;
      const at::Half* mrow = mp ? mp + n * nb : nullptr;
      for (int64_t g = 0; g < nb; ++g)
        dequant_one(kind, q + g * qs_bytes(kind), h2f(dn + g), mrow ? h2f(mrow + g) : 0.f, op + (n * nb + g) * QK);
    }
  });
  return nb * QK == K ? out : out.narrow(1, 0, K).contiguous();
}

#ifndef __AVX2__
// the scalar build's product, on the blocks in GGUF's order
at::Tensor gguf_linear(const at::Tensor& x_in, const at::Tensor& qs, const at::Tensor& d,
                        const c10::optional<at::Tensor>& m_opt, int64_t kind, int64_t K) {
  const at::Tensor m = m_opt.has_value() ? *m_opt : at::Tensor();
  check_packed(qs, d, m, kind, K);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = qs.size(0), nb = qs.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(qs.data_ptr());
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = kind == Q4_1 ? m.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (kind == Q4_0) quant_gemm<Q4_0>(xp, M, K, qp, dp, mp, nb, N, yp);
  else if (kind == Q4_1) quant_gemm<Q4_1>(xp, M, K, qp, dp, mp, nb, N, yp);
  else quant_gemm<Q8_0>(xp, M, K, qp, dp, mp, nb, N, yp);
  return y;
}
#endif

// ---- the row-interleaved layout (quant_gemm_rows): packing and unpacking, lossless --------------
// qp u8 [groups, nb, chunks, 32]: qp[g, b, c, 2r + j] = qs[16g + r, b, 2c + j] (chunks: 8 for Q4, 16 for Q8);
// d, m f16 [groups, nb, 16]: [g, b, r] = [16g + r, b]. Rows past N (the last group's padding) are zeros.
using Blocks = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>>;
Blocks quant_pack_rows(const at::Tensor& qs, const at::Tensor& d, const c10::optional<at::Tensor>& m_opt,
                       int64_t kind, int64_t K) {
  const at::Tensor m = m_opt.has_value() ? *m_opt : at::Tensor();
  check_packed(qs, d, m, kind, K);
  const int64_t N = qs.size(0), nb = qs.size(1), QB = qs_bytes(kind), groups = (N + GR - 1) / GR;
  auto grouped = [&](const at::Tensor& t) {  // rows padded with zeros to whole groups: [groups, 16, ...]
    std::vector<int64_t> pad(2 * t.dim(), 0);
    pad.back() = groups * GR - N;  // (constant_pad_nd pads the last dimension first)
    std::vector<int64_t> shape{groups, GR};
    shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
    return at::constant_pad_nd(t, pad).view(shape);
  };
  // [g, r, b, c, j] -> [g, b, c, r, j]: quant_unpack_rows' permutation, inverted
  at::Tensor qp = grouped(qs.view({N, nb, QB / 2, 2})).permute({0, 2, 3, 1, 4}).contiguous().view({groups, nb, QB / 2, 2 * GR});
  at::Tensor dp = grouped(d).permute({0, 2, 1}).contiguous();
  if (!m.defined()) return {qp, dp, c10::nullopt};
  return {qp, dp, grouped(m).permute({0, 2, 1}).contiguous()};
}

void check_rows(const at::Tensor& qp, const at::Tensor& dp, const at::Tensor& mp, int64_t kind, int64_t K, int64_t N) {
  TORCH_CHECK(N > 0, "N must be positive");
  TORCH_CHECK(qp.dim() == 4 && qp.is_contiguous() && qp.element_size() == 1,
              "qp must be contiguous [ceil(N / 16), nb, 8 or 16, 32] bytes");
  check_blocks(kind, K, qp.size(1));
  TORCH_CHECK(qp.size(0) == (N + GR - 1) / GR && qp.size(2) == qs_bytes(kind) / 2 && qp.size(3) == 2 * GR,
              "qp must be contiguous [ceil(N / 16), nb, 8 or 16, 32] bytes");
  const int64_t nb = qp.size(1);
  TORCH_CHECK(dp.scalar_type() == at::kHalf && dp.is_contiguous() && dp.dim() == 3 && dp.size(0) == qp.size(0) &&
                  dp.size(1) == nb && dp.size(2) == GR,
              "dp must be contiguous float16 [groups, nb, 16]");
  TORCH_CHECK(kind != Q4_1 || (mp.defined() && mp.scalar_type() == at::kHalf && mp.is_contiguous() && mp.sizes() == dp.sizes()),
              "Q4_1 needs mp: contiguous float16 [groups, nb, 16]");
}

// the GGUF-order blocks back: (qs [N, nb, 16 | 32], d [N, nb], m [N, nb] or undefined)
Blocks quant_unpack_rows(const at::Tensor& qp, const at::Tensor& dp, const c10::optional<at::Tensor>& mp_opt,
                                          int64_t kind, int64_t K, int64_t N) {
  const at::Tensor mp = mp_opt.has_value() ? *mp_opt : at::Tensor();
  check_rows(qp, dp, mp, kind, K, N);
  const int64_t nb = qp.size(1), QB = qs_bytes(kind);
  // [g, b, c, r, j] -> [g, r, b, c, j] = [n, b, 2c + j]
  at::Tensor qs = qp.view({qp.size(0), nb, QB / 2, GR, 2}).permute({0, 3, 1, 2, 4}).reshape({-1, nb, QB}).narrow(0, 0, N);
  at::Tensor d = dp.permute({0, 2, 1}).reshape({-1, nb}).narrow(0, 0, N).contiguous();
  at::Tensor m = mp.defined() ? mp.permute({0, 2, 1}).reshape({-1, nb}).narrow(0, 0, N).contiguous() : at::Tensor();
  return {qs.contiguous(), d, m.defined() ? c10::optional<at::Tensor>(m) : c10::nullopt};
}

// W as dense float32 [N, K] from the interleaved blocks (QuantLinear's dense product for prefill chunks)
at::Tensor quant_dequant_rows(const at::Tensor& qp, const at::Tensor& dp, const c10::optional<at::Tensor>& mp_opt,
                              int64_t kind, int64_t K, int64_t N) {
  const at::Tensor mp = mp_opt.has_value() ? *mp_opt : at::Tensor();
  check_rows(qp, dp, mp, kind, K, N);
  const int64_t nb = qp.size(1), QB = qs_bytes(kind);
  at::Tensor out = at::empty({N, nb * QK}, dp.options().dtype(at::kFloat));
  const uint8_t* q = static_cast<const uint8_t*>(qp.data_ptr());
  const at::Half* d = dp.data_ptr<at::Half>();
  const at::Half* m = kind == Q4_1 ? mp.data_ptr<at::Half>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    alignas(64) uint8_t block[32];
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t g = n / GR, r = n % GR;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* chunks = q + (g * nb + b) * QB * GR;
        for (int64_t c = 0; c < QB / 2; ++c) {  // the row's bytes 2c, 2c + 1 (see quant_pack_rows)
          block[2 * c] = chunks[c * 2 * GR + 2 * r];
          block[2 * c + 1] = chunks[c * 2 * GR + 2 * r + 1];
        }
        const int64_t s = (g * nb + b) * GR + r;
        dequant_one(kind, block, h2f(d + s), m ? h2f(m + s) : 0.f, o + (n * nb + b) * QK);
      }
    }
  });
  return nb * QK == K ? out : out.narrow(1, 0, K).contiguous();
}

at::Tensor quant_linear_rows(const at::Tensor& x_in, const at::Tensor& qp, const at::Tensor& dp,
                             const c10::optional<at::Tensor>& mp_opt, int64_t kind, int64_t K, int64_t N) {
#ifdef __AVX2__
  const at::Tensor mp = mp_opt.has_value() ? *mp_opt : at::Tensor();
  check_rows(qp, dp, mp, kind, K, N);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be [M, K]");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), nb = qp.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* q = static_cast<const uint8_t*>(qp.data_ptr());
  const at::Half* d = dp.data_ptr<at::Half>();
  const at::Half* mn = kind == Q4_1 ? mp.data_ptr<at::Half>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (kind == Q4_0) quant_gemm_rows<Q4_0>(xp, M, K, q, d, mn, nb, N, yp);
  else if (kind == Q4_1) quant_gemm_rows<Q4_1>(xp, M, K, q, d, mn, nb, N, yp);
  else quant_gemm_rows<Q8_0>(xp, M, K, q, d, mn, nb, N, yp);
  return y;
#else  // the scalar build multiplies the GGUF-order blocks in float32
  const auto [qs, d, m] = quant_unpack_rows(qp, dp, mp_opt, kind, K, N);
  return gguf_linear(x_in, qs, d, m, kind, K);
#endif
}

// W in GGUF's order. The vector builds interleave it first: the engine does that once at load (engine/quant.py),
// this is for tools and tests.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                        const c10::optional<at::Tensor>& m, int64_t kind, int64_t K) {
#ifdef __AVX2__
  const auto [qp, dp, mp] = quant_pack_rows(qs, d, m, kind, K);
  return quant_linear_rows(x, qp, dp, mp, kind, K, qs.size(0));
#else
  return gguf_linear(x, qs, d, m, kind, K);
#endif
}

// ---- bf16 weights, small M: one streaming pass over the weights, fp32 accumulation --------------
// Decode at batch 1-4 is a read of every weight once: what decides its speed is how fast the rows
// stream in. Two weight rows per tile (each dot product in its own accumulators, dpbf16 over 32
// values), and a software prefetch PF_BYTES ahead in the row-major matrix -- which runs into the next
// tile's rows, so the whole matrix is read as one prefetched sequential stream. Measured on a Sapphire
// Rapids core pair (bench/RESULTS.md): ~1.5x oneDNN's prepacked linear at M = 1, ~1.25x at M = 4;
// from M = 5 up oneDNN's AMX kernels win, and packed_linear hands over to them.
#if defined(__AVX512BF16__)
constexpr int64_t GEMV_MAX_ROWS = 4;
constexpr int64_t PF_BYTES = 2048;

template <int MR, int NR>
inline void bf16_tile(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* b, int64_t K, at::BFloat16* y,
                      int64_t ldy) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(x + i * K + k);
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k) + PF_BYTES, _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      y[i * ldy + r] = at::BFloat16(_mm512_reduce_add_ps(acc[i][r]) + (b ? static_cast<float>(b[r]) : 0.f));
}

template <int MR>
void bf16_gemv(const at::BFloat16* x, int64_t K, const at::BFloat16* w, const at::BFloat16* b, int64_t N,
               at::BFloat16* y) {
  constexpr int NR = 2;
  at::parallel_for(0, N / NR, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) bf16_tile<MR, NR>(x, w + t * NR * K, b ? b + t * NR : b, K, y + t * NR, N);
  });
  for (int64_t n = N / NR * NR; n < N; ++n) bf16_tile<MR, 1>(x, w + n * K, b ? b + n : b, K, y + n, N);
}
constexpr bool kBf16Dot = true;
#else
constexpr int64_t GEMV_MAX_ROWS = 0;
constexpr bool kBf16Dot = false;
#endif

// y [M, N] bf16 = x [M, K] @ w [N, K]^T (+ b [N], added in float32), for M <= GEMV_MAX_ROWS and K % 32 == 0
// (else torch's linear)
at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& b_opt) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16");
#if defined(__AVX512BF16__)
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0);
  if (K % 32 == 0 && M >= 1 && M <= GEMV_MAX_ROWS) {
    const at::Tensor x = x_in.to(at::kBFloat16).contiguous();
    at::Tensor y = at::empty({M, N}, x.options());
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    at::Tensor b;
    if (b_opt.has_value()) b = b_opt->to(at::kBFloat16).contiguous();
    const at::BFloat16* bp = b.defined() ? b.data_ptr<at::BFloat16>() : nullptr;
    switch (M) {
      case 1: bf16_gemv<1>(xp, K, wp, bp, N, yp); break;
      case 2: bf16_gemv<2>(xp, K, wp, bp, N, yp); break;
      case 3: bf16_gemv<3>(xp, K, wp, bp, N, yp); break;
      default: bf16_gemv<4>(xp, K, wp, bp, N, yp); break;
    }
    return y;
  }
#endif
  return at::linear(x_in.to(at::kBFloat16), w, b_opt);
}

// ---- float32 weights, decode batches: panels of 16 weight rows ---------------------------------
// A decode batch of float32 rows multiplies every weight a few times: the product is the weight stream
// with FMAs on it. W is packed once at load into panels of 16 rows, K-major (engine/linear.py panels():
// wp [N/16, K, 16], wp[p, k, j] = W[16p + j, k]), so that one vector load is one k of 16 output columns
// and a tile's panels stream through memory in order. A tile keeps MR rows of x by FP_NV vectors of
// output columns in registers (AVX-512: 8 x 48, 24 accumulators; AVX2: 6 x 16, 12): per k, FP_NV weight
// loads, MR broadcasts of x and MR * FP_NV FMAs, summed in k's order (the same order at every tile
// height, so a row's product does not depend on its batch). The row tiles of one column tile reread its
// panels from L2. The two threads split the column tiles.
constexpr int64_t PANEL = 16;  // weight rows per panel (engine/linear.py PANEL)
#ifdef __AVX2__
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr int FP_MR = 8, FP_NV = 3;
#else
constexpr int FP_MR = 6, FP_NV = 2;
#endif
static_assert(FP_NV * VL % PANEL == 0, "a column tile is whole panels");

// The next column tile's panels (one contiguous range) are prefetched into L2 while this one computes, evenly
// over all its row tiles (a line every `every` k): without that the first row tile waits on memory (at 32 rows
// ~4x its FMA time here) and the others on nothing; issued faster than memory delivers, the prefetches hold the
// fill buffers that the row tiles' own loads from L2 need (AVX2, 32 rows: a line per k in the first row tile
// 61-64 ms, spread over the 6 51-55). Where the row tiles are fewer than the tile's panels, one line per k
// falls behind and the hardware prefetcher alone streams better. A line in every 2-8 (the hardware filling
// the gaps) was slower at every size. Measured on the model's matrices, 2 threads (bench/RESULTS.md):
// AVX-512 (3 panels a tile) 32 rows 39.6 vs 46.3 ms without it (MKL's packed sgemm 48), 24 rows 33.2 vs 39.1,
// 16 rows 31.8 vs 33.0 and 1 row 19.2 vs 21.5 with it; AVX2 (1 panel) 4 rows 23.0 vs 29.9, 8 rows 26-28 vs
// 37.5 (MKL ~34), 1 row 23.1 (F.linear 23.6).
constexpr int64_t FP_AHEAD_ROW_TILES = FP_NV * VL / PANEL;
struct Ahead {
  const char* p;    // the next line to fetch, up to end
  const char* end;
  int64_t every;    // k steps per line
  int64_t left;     // k steps to the next line
  inline void step() {
    if (p < end && --left == 0) {
      left = every;
      _mm_prefetch(p, _MM_HINT_T1);
      p += 64;
    }
  }
};

// y[0..MR) [.., NV * VL) = x[0..MR) @ the tile's columns (+ b); w: its first panel, panels K * PANEL apart
template <int MR, int NV>
inline void fp32_tile(const float* x, int64_t K, const float* w, const float* b, float* y, int64_t ldy, Ahead& ahead) {
  Ahead pf = ahead;  // in registers while the loop runs
  Vec acc[MR][NV];    // (every loop over MR / NV is unrolled before GCC's scalar replacement: else the sums
                      // also live in memory, a store per FMA)
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = vzero();
  _Pragma("GCC unroll 4")  // the loop's own instructions (prefetch check, counters) held AVX2 tiles at ~76% of peak
  for (int64_t k = 0; k < K; ++k) {  // FMA rate with the weights in L2, ~92% unrolled (32 rows: 51 -> 47 ms)
    pf.step();
    Vec wv[NV];
    UNROLL for (int v = 0; v < NV; ++v) wv[v] = vload(w + (v * VL / PANEL) * K * PANEL + k * PANEL + (v * VL) % PANEL);
    UNROLL for (int i = 0; i < MR; ++i) {
      const Vec xb = vbcast(x + i * K + k);
      UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = vfma(xb, wv[v], acc[i][v]);
    }
  }
  ahead = pf;
  if (b)
    UNROLL for (int i = 0; i < MR; ++i)
      UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = vadd(acc[i][v], vload(b + v * VL));
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int v = 0; v < NV; ++v) vstore(y + i * ldy + v * VL, acc[i][v]);
}

// a row tile of R < FP_MR rows
template <int NV, int R = 1>
inline void fp32_rest(int64_t r, const float* x, int64_t K, const float* w, const float* b, float* y, int64_t ldy,
                      Ahead& pf) {
  if constexpr (R < FP_MR) {
    if (r == R) fp32_tile<R, NV>(x, K, w, b, y, ldy, pf);
    else fp32_rest<NV, R + 1>(r, x, K, w, b, y, ldy, pf);
  }
}

// every row of x by one column tile of NV vectors; next_bytes: the thread's next tile, right after this one
// in memory, to prefetch (0: none)
template <int NV>
void fp32_column(const float* x, int64_t M, int64_t K, const float* w, const float* b, float* y, int64_t N,
                 int64_t next_bytes) {
  // tiles of FP_MR rows; a short last one (under FP_MR / 2) shares the rows of the one before it evenly
  const int64_t r = M % FP_MR, split = M > FP_MR && r > 0 && r < FP_MR / 2 ? M - FP_MR - r : M - r;
  const int64_t row_tiles = split / FP_MR + (M - split > FP_MR ? 2 : M > split);
  const char* next = reinterpret_cast<const char*>(w + NV * VL * K);
  const int64_t ahead = row_tiles >= FP_AHEAD_ROW_TILES ? next_bytes : 0;  // bytes to prefetch (an empty range: none)
  const int64_t every = std::max<int64_t>(1, row_tiles * K / std::max<int64_t>(1, ahead / 64));
  Ahead pf{next, next + ahead, every, every};
  for (int64_t m = 0; m < M;) {
    const int64_t h = m < split ? FP_MR : m == split && split + FP_MR < M ? (M - split) / 2 : M - m;
    if (h == FP_MR) fp32_tile<FP_MR, NV>(x + m * K, K, w, b, y + m * N, N, pf);
    else fp32_rest<NV>(h, x + m * K, K, w, b, y + m * N, N, pf);
    m += h;
  }
}

// the last column tile, narrower where N is not a multiple of FP_NV * VL (N % 16 == 0 always)
template <int NV = FP_NV - 1>
void fp32_narrow(int64_t nv, const float* x, int64_t M, int64_t K, const float* w, const float* b, float* y, int64_t N) {
  if constexpr (NV >= 1) {
    if (nv == NV) fp32_column<NV>(x, M, K, w, b, y, N, 0);
    else fp32_narrow<NV - 1>(nv, x, M, K, w, b, y, N);
  }
}

void fp32_panel_gemm(const float* x, int64_t M, int64_t K, const float* wp, const float* b, int64_t N, float* y) {
  constexpr int64_t TC = FP_NV * VL;  // columns per tile
  const int64_t full = N / TC, tiles = full + (N % TC != 0);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* w = wp + t * TC * K;  // panels are K * PANEL floats, TC / PANEL of them per tile
      const float* bt = b ? b + t * TC : nullptr;
      if (t < full) {  // the thread's next tile is prefetched (the other thread fetches its own)
        const int64_t next_cols = t + 1 == t1 ? 0 : t + 1 < full ? TC : N % TC;
        fp32_column<FP_NV>(x, M, K, w, bt, y + t * TC, N, next_cols * K * 4);
      } else {
        fp32_narrow(N % TC / VL, x, M, K, w, bt, y + t * TC, N);
      }
    }
  });
}
#endif

// y [M, N] = x [M, K] @ W^T (+ b) on W's panels wp [N/16, K, 16], float32
at::Tensor panel_linear(const at::Tensor& x_in, const at::Tensor& wp, const std::optional<at::Tensor>& b_opt) {
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == PANEL && wp.scalar_type() == at::kFloat && wp.is_contiguous(),
              "wp must be contiguous float32 panels [N/16, K, 16]");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == wp.size(1), "x must be [M, K]");
  const int64_t M = x_in.size(0), K = wp.size(1), N = wp.size(0) * PANEL;
  TORCH_CHECK(!b_opt.has_value() || b_opt->numel() == N, "bias must have N values");
#ifdef __AVX2__
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor b;
  if (b_opt.has_value()) b = b_opt->to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0) fp32_panel_gemm(x.data_ptr<float>(), M, K, wp.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                             N, y.data_ptr<float>());
  return y;
#else
  return at::linear(x_in.to(at::kFloat), wp.permute({0, 2, 1}).reshape({N, K}), b_opt);
#endif
}

// ---- decode attention over the paged cache ---------------------------------------------------------
// One new token per sequence: what engine/attention.py paged_decode_attention computes (its docstring has the
// shapes), with each sequence's cached K and V rows read in place from their blocks, one task per sequence and
// KV head. Each K row is read once (the next ones prefetched) for the scores of every query head of the group,
// then softmax in float32, then each V row once for their weighted sums. (torch.compile's fused version of the
// same Python read the cache at ~9 GB/s here.)
#ifdef __AVX2__
inline Vec vexp(Vec x) {  // e^x for x <= 0 (softmax after its max): Cephes' expf, within ~2 ulp
  x = vmax(x, vset(-87.3f));
  const Vec n = vround(vmul(x, vset(1.44269504088896341f)));
  Vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.f)));
  return vmul(p, vexp2i(n));
}

template <typename T>
inline Vec vrow(const T* p) {
  if constexpr (std::is_same_v<T, float>) return vload(p);
  else return vbf16(p);
}

struct Paged {  // one layer's K or V cache: [blocks, bs, KVH, D], rows contiguous, blocks `stride` apart
  int64_t stride, bs, row;  // elements between blocks, tokens per block, elements per token (KVH * D)
};

constexpr int64_t ATT_AHEAD = 16;  // rows prefetched ahead, across block boundaries

template <typename T>
inline void prefetch_row(const T* r, int64_t D) {
  for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) _mm_prefetch(reinterpret_cast<const char*>(r) + b, _MM_HINT_T0);
}

// C = D / VL vectors per head. q, kn, vn: rows of D, one sequence's heads contiguous, sequences qs / ks / vs
// elements apart. Each K row and each V row is read once, for the G query heads of its KV head together.
template <typename T, int C>
void decode_attention_impl(const T* q, int64_t qs, const T* kn, int64_t ks, const T* vn, int64_t vs, const T* kc,
                           const T* vc, const Paged& c, const int64_t* tables, int64_t nb, const int64_t* ctx, float scale,
                           int64_t B, int64_t H, int64_t KVH, T* out) {
  constexpr int64_t D = C * VL;
  const int64_t G = H / KVH;
  const std::ptrdiff_t v_off = vc - kc;  // a V row is its K row moved by this (the caches share their layout)
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const T*> rows;  // [n] the task's cached K rows, in place
    std::vector<float> w, qf, o, inv;  // [G, n + 1] scores then weights; [G, D] q scaled; [G, D] outputs; [G] 1 / sums
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, h = task % KVH, n = ctx[b] - 1, S = n + 1;
      rows.resize(n);
      for (int64_t t = 0, j = 0; t < n; ++j) {  // block by block (a division per row cost ~10% of the op)
        const T* r = kc + tables[b * nb + j] * c.stride + h * D;
        for (int64_t o = 0; o < c.bs && t < n; ++o, ++t, r += c.row) rows[t] = r;
      }
      w.resize(G * S), qf.resize(G * D), o.assign(G * D, 0.f), inv.resize(G);
      for (int64_t g = 0; g < G; ++g)
        UNROLL for (int i = 0; i < C; ++i)
          vstore(qf.data() + g * D + i * VL, vmul(vrow(q + b * qs + (h * G + g) * D + i * VL), vset(scale)));
      for (int64_t t = 0; t < S; ++t) {  // scores: the cached rows, then the new token's own k
        if (t + ATT_AHEAD < n) prefetch_row(rows[t + ATT_AHEAD], D);
        const T* r = t < n ? rows[t] : kn + b * ks + h * D;
        Vec kr[C];
        UNROLL for (int i = 0; i < C; ++i) kr[i] = vrow(r + i * VL);
        for (int64_t g = 0; g < G; ++g) {
          Vec acc = vzero();
          UNROLL for (int i = 0; i < C; ++i) acc = vfma(vload(qf.data() + g * D + i * VL), kr[i], acc);
          w[g * S + t] = vsum(acc);
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax in float32
        float* wg = w.data() + g * S;
        float mx = wg[0], sum = 0.f;
        int64_t t = 0;
        if (S >= VL) {  // lane-wise first: one scalar max after another waits on each (~13% of the op at 512)
          Vec m = vload(wg);
          for (t = VL; t + VL <= S; t += VL) m = vmax(m, vload(wg + t));
          alignas(64) float lanes[VL];
          vstore(lanes, m);
          for (int l = 0; l < VL; ++l) mx = std::max(mx, lanes[l]);
        }
        for (; t < S; ++t) mx = std::max(mx, wg[t]);
        t = 0;
        for (; t + VL <= S; t += VL) {
          const Vec e = vexp(vadd(vload(wg + t), vset(-mx)));
          vstore(wg + t, e);
          sum += vsum(e);
        }
        for (; t < S; ++t) sum += (wg[t] = std::exp(wg[t] - mx));
        inv[g] = 1.f / sum;
      }
      for (int64_t t = 0; t < S; ++t) {  // the weighted sum of the V rows
        if (t + ATT_AHEAD < n) prefetch_row(rows[t + ATT_AHEAD] + v_off, D);
        const T* r = t < n ? rows[t] + v_off : vn + b * vs + h * D;
        Vec vr[C];
        UNROLL for (int i = 0; i < C; ++i) vr[i] = vrow(r + i * VL);
        for (int64_t g = 0; g < G; ++g) {
          const Vec p = vset(w[g * S + t]);
          UNROLL for (int i = 0; i < C; ++i) vstore(o.data() + g * D + i * VL, vfma(p, vr[i], vload(o.data() + g * D + i * VL)));
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        T* oh = out + (b * H + h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) oh[i] = static_cast<T>(o[g * D + i] * inv[g]);
      }
    }
  });
}

// vectors per head (D / VL) the attention kernel is instantiated for, or 0
inline int64_t att_vectors(int64_t D) {
  const int64_t c = D % VL == 0 ? D / VL : 0;
  return c == 2 || c == 4 || c == 8 || c == 16 ? c : 0;
}
#endif

// q [B, H, D]; k, v [B, KVH, D] the new token's; k_cache, v_cache [blocks, bs, KVH, D] (views of one layer, rows
// contiguous); tables [B, nb] int64; ctx_lens [B] int64 (tokens including the new one) -> [B, H, D] in q's dtype
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& tables, const at::Tensor& ctx_lens,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
              k.size(2) == q.size(2) && q.size(1) % k.size(1) == 0, "q [B, H, D], k and v [B, KVH, D]");
  const int64_t B = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
              k_cache.size(2) == KVH && k_cache.size(3) == D && k_cache.stride(3) == 1 && k_cache.stride(2) == D &&
              k_cache.stride(1) == KVH * D, "k_cache, v_cache: [blocks, block_size, KVH, D], rows contiguous");
  for (const at::Tensor* t : {&k, &v, &k_cache, &v_cache})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v and the caches share one dtype");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kLong && ctx_lens.dim() == 1 &&
              ctx_lens.size(0) == B && ctx_lens.scalar_type() == at::kLong, "tables [B, nb] and ctx_lens [B], int64");
  const at::Tensor tb = tables.contiguous(), cl = ctx_lens.contiguous();
  const int64_t nb = tb.size(1), bs = k_cache.size(1), blocks = k_cache.size(0);
  const int64_t* tp = tb.data_ptr<int64_t>();
  const int64_t* cp = cl.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cp[b] >= 1 && cp[b] - 1 <= nb * bs, "ctx_lens[", b, "] = ", cp[b], " outside 1..", nb * bs + 1);
    for (int64_t j = 0; j < (cp[b] - 1 + bs - 1) / bs; ++j)
      TORCH_CHECK(tp[b * nb + j] >= 0 && tp[b * nb + j] < blocks, "block id ", tp[b * nb + j], " outside the cache");
  }
  // the step's q, k, v are views of wider rows: each sequence's heads contiguous is all the kernel needs
  const auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous(); };
  const at::Tensor qc = rows(q), kc = rows(k), vc = rows(v);
  at::Tensor out = at::empty({B, H, D}, q.options());
#ifdef __AVX2__
  const Paged c{k_cache.stride(0), bs, KVH * D};
  const auto run = [&](auto tag, auto cv) {
    using T = decltype(tag);
    constexpr int C = decltype(cv)::value;
    decode_attention_impl<T, C>(qc.data_ptr<T>(), qc.stride(0), kc.data_ptr<T>(), kc.stride(0), vc.data_ptr<T>(),
                                vc.stride(0), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), c, tp, nb, cp,
                                static_cast<float>(scale), B, H, KVH, out.data_ptr<T>());
  };
  const auto by_width = [&](auto tag) {
    switch (att_vectors(D)) {
      case 2: run(tag, std::integral_constant<int, 2>{}); return true;
      case 4: run(tag, std::integral_constant<int, 4>{}); return true;
      case 8: run(tag, std::integral_constant<int, 8>{}); return true;
      case 16: run(tag, std::integral_constant<int, 16>{}); return true;
      default: return false;
    }
  };
  if (B == 0) return out;
  if (q.scalar_type() == at::kFloat ? by_width(float{}) : q.scalar_type() == at::kBFloat16 && by_width(at::BFloat16{}))
    return out;
#endif
  TORCH_CHECK(false, "decode_attention: no kernel for ", q.scalar_type(), " heads of ", D, " (",
              kIsa, " build); decode_attention_supported() says which");
}

// what decode_attention runs on (engine/kernels.py decode_attention asks once, at model load)
bool decode_attention_supported(at::ScalarType dtype, int64_t D) {
#ifdef __AVX2__
  return (dtype == at::kFloat || dtype == at::kBFloat16) && att_vectors(D) != 0;
#else
  (void)dtype, (void)D;
  return false;
#endif
}

// ---- greedy tokens: each row's first index of its maximum ------------------------------------------
// torch.max(x, -1).indices over a decode batch's logits, 32 x 49,152 float32 on 2 threads, took ~1.2 ms of a
// step; this is one pass at memory speed. Same result as torch: the first index of the maximum, or of the
// first NaN where a row has one. AM_CHAINS independent (max, index) pairs per lane: one pair's compare and
// blend wait on the previous ones (~6 cycles a vector; 4 pairs: AVX2 17 -> 8 us a row of 49,152).
constexpr int AM_CHAINS = 4;
int64_t argmax_row(const float* x, int64_t V) {
  int64_t j = 0;
  float best = -std::numeric_limits<float>::infinity();
  int64_t at = 0;
  bool nan = false;
#ifdef __AVX2__
  constexpr int64_t STEP = AM_CHAINS * VL;
  if (V >= STEP) {  // per lane of each chain: its largest value and where it first occurs (strictly greater replaces)
    alignas(64) float idx0[VL];
    for (int i = 0; i < VL; ++i) idx0[i] = float(i);
    Vec mv[AM_CHAINS], iv[AM_CHAINS], lane[AM_CHAINS];
    Vec bad = vzero();  // lanes that saw a NaN
    const Vec step = vset(float(STEP));
    UNROLL for (int c = 0; c < AM_CHAINS; ++c) {
      mv[c] = vset(-std::numeric_limits<float>::infinity()), iv[c] = vzero();
      lane[c] = vadd(vload(idx0), vset(float(c * VL)));
    }
    for (; j + STEP <= V; j += STEP) {
      UNROLL for (int c = 0; c < AM_CHAINS; ++c) {
        const Vec v = vload(x + j + c * VL);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        const __mmask16 gt = _mm512_cmp_ps_mask(v, mv[c], _CMP_GT_OQ);
        mv[c] = _mm512_mask_mov_ps(mv[c], gt, v);
        iv[c] = _mm512_mask_mov_ps(iv[c], gt, lane[c]);
        bad = _mm512_mask_mov_ps(bad, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vset(1.f));
#else
        const Vec gt = _mm256_cmp_ps(v, mv[c], _CMP_GT_OQ);
        mv[c] = _mm256_blendv_ps(mv[c], v, gt);
        iv[c] = _mm256_blendv_ps(iv[c], lane[c], gt);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
#endif
        lane[c] = vadd(lane[c], step);
      }
    }
    alignas(64) float m[VL], i[VL], nb[VL];
    vstore(nb, bad);
    for (int c = 0; c < AM_CHAINS; ++c) {
      vstore(m, mv[c]), vstore(i, iv[c]);
      for (int l = 0; l < VL; ++l) {
        nan = nan || nb[l] != 0.f;
        const int64_t il = static_cast<int64_t>(i[l]);  // exact: V < 2^24
        if (m[l] > best || (m[l] == best && il < at)) best = m[l], at = il;
      }
    }
  }
#endif
  for (; j < V; ++j) {
    nan = nan || std::isnan(x[j]);
    if (x[j] > best) best = x[j], at = j;
  }
  if (nan)
    for (int64_t t = 0; t < V; ++t)
      if (std::isnan(x[t])) return t;
  return at;
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0 && x_in.size(1) < (int64_t(1) << 24), "x must be [B, V], 0 < V < 2^24");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = argmax_row(xp + b * V, V);
  });
  return out;
}

// float32 decode batches (PANEL_MIN_ROWS..PANEL_MAX_ROWS rows) on the panels; prefill chunks on the row-major
// copy wr (MKL's sgemm blocks a large product better)
constexpr int64_t PANEL_MIN_ROWS = 1;
constexpr int64_t PANEL_MAX_ROWS = 64;

// a linear on the prepacked weight w (the branch lives here so that a compiled graph with a symbolic
// batch keeps one opaque op). bf16: oneDNN's, or with the row-major copy wr bf16_linear for small M;
// float32: panel_linear on its panels for decode batches, else torch's linear on wr (required)
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& wr) {
  if (w.scalar_type() == at::kFloat) {
    TORCH_CHECK(wr.has_value(), "float32 panels need their row-major copy");
    const int64_t M = x.dim() == 2 ? x.size(0) : 0;
    return M >= PANEL_MIN_ROWS && M <= PANEL_MAX_ROWS ? panel_linear(x, w, b) : at::linear(x, *wr, b);
  }
  if (wr.has_value() && x.dim() == 2 && x.size(0) <= GEMV_MAX_ROWS && x.size(1) % 32 == 0)
    return bf16_linear(x, *wr, b);
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, b, c10::IValue(std::string("none")), c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY(distserve, m) {
  m.def("quant_linear(Tensor x, Tensor qs, Tensor d, Tensor? m, int kind, int K) -> Tensor");
  m.def("quant_dequant(Tensor qs, Tensor d, Tensor? m, int kind, int K) -> Tensor");
  m.def("round_int16(Tensor x) -> Tensor");
  m.def("quant_pack_rows(Tensor qs, Tensor d, Tensor? m, int kind, int K) -> (Tensor, Tensor, Tensor?)");
  m.def("quant_unpack_rows(Tensor qp, Tensor dp, Tensor? mp, int kind, int K, int N) -> (Tensor, Tensor, Tensor?)");
  m.def("quant_linear_rows(Tensor x, Tensor qp, Tensor dp, Tensor? mp, int kind, int K, int N) -> Tensor");
  m.def("quant_dequant_rows(Tensor qp, Tensor dp, Tensor? mp, int kind, int K, int N) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor w, Tensor? b, Tensor? wr=None) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor wp, Tensor? b) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor tables, "
        "Tensor ctx_lens, float scale) -> Tensor");
  m.def("decode_attention_supported(ScalarType dtype, int D) -> bool");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequant", &quant_dequant);
  m.impl("round_int16", &round_int16);
  m.impl("quant_pack_rows", &quant_pack_rows);
  m.impl("quant_unpack_rows", &quant_unpack_rows);
  m.impl("quant_linear_rows", &quant_linear_rows);
  m.impl("quant_dequant_rows", &quant_dequant_rows);
  m.impl("packed_linear", &packed_linear);
  m.impl("panel_linear", &panel_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("argmax_rows", &argmax_rows);
}

// no tensor argument to dispatch on: a catch-all kernel
TORCH_LIBRARY_FRAGMENT(distserve, m) {
  m.impl("decode_attention_supported", c10::DispatchKey::CatchAll, &decode_attention_supported);
}

// the prepacked weight is an opaque oneDNN tensor: its dispatch key is MkldnnCPU
TORCH_LIBRARY_IMPL(distserve, MkldnnCPU, m) { m.impl("packed_linear", &packed_linear); }

// which vector path was compiled in, for logs and the bench
extern "C" const char* distserve_kernels_isa() {
  static const std::string s = std::string(kIsa) + (kBf16Dot ? "+bf16" : "");
  return s.c_str();
}
