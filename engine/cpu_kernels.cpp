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
//   distserve::packed_linear(x, w, b, wr)          a linear on a prepacked weight, as an opaque op
//                                                  (torch.compile's lowering of the mkldnn / mkl ops
//                                                  wants the weight frozen into the graph). bf16: oneDNN's,
//                                                  and with the row-major copy wr [N, K] M <= 4 runs the
//                                                  engine's streaming bf16 GEMV instead (bf16_linear);
//                                                  float32: MKL's packed sgemm for 2-64 rows, torch's
//                                                  linear on wr otherwise (fp32_packed_linear)
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
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = vzero();
  for (int64_t b = 0; b < nb; ++b) {
    IVec dot[R][C];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) dot[i][c] = izero();
    for (int ch = 0; ch < NCH; ++ch) {
      IVec lo[C], hi[C];
      for (int g = 0; g < G; ++g) {
        const uint8_t* p = q + g * gq + b * BB + ch * 2 * GR;
        if (ch % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + QUANT_PF_BYTES, _MM_HINT_T0);
        for (int v = 0; v < VPG; ++v) widen<KIND>(p + v * 2 * VL, &lo[g * VPG + v], &hi[g * VPG + v]);
      }
      for (int i = 0; i < R; ++i) {
        const int16_t* xr = xq + i * ldx + b * QK + 2 * ch;
        const IVec xl = ibcast(xr);
        if constexpr (KIND == Q8_0) {
          for (int c = 0; c < C; ++c) dot[i][c] = idot(dot[i][c], lo[c], xl);
        } else {
          const IVec xh = ibcast(xr + 16);
          for (int c = 0; c < C; ++c) dot[i][c] = idot(idot(dot[i][c], lo[c], xl), hi[c], xh);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < VPG; ++v) {
        const int c = g * VPG + v;
        const Vec dv = halves(d + g * gd + b * GR + v * VL);
        Vec ov = vzero();
        if constexpr (KIND == Q4_1) ov = halves(mn + g * gd + b * GR + v * VL);
        if constexpr (KIND == Q4_0) ov = vmul(dv, vbcast(&kMinus8));
        for (int i = 0; i < R; ++i) {
          if constexpr (KIND != Q8_0) acc[i][c] = vfma(ov, vbcast(xt + i * nb + b), acc[i][c]);
          acc[i][c] = vfma(icvt(dot[i][c]), vmul(dv, vbcast(xs + i * nb + b)), acc[i][c]);
        }
      }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) vstore(y + i * ldy + c * VL, acc[i][c]);
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

// ---- float32 weights, decode batches: MKL's sgemm on a prepacked weight ---------------------------
// A plain sgemm packs the weight matrix into its kernel's layout on every call: at 2-64 rows that copy
// is as large as the product itself. torch's mkl::_mkl_linear multiplies by a matrix MKL packed once
// (engine/linear.py packs it at load and checks once per process that the pack serves every row count:
// torch calls it only at the count it was packed for). Measured on the model's 30 layers, 2 threads,
// Sapphire Rapids capped at AVX2: 4 rows 26 vs 40 ms, 8 rows 29 vs 43, 32 rows 52 vs 67 (bench/RESULTS.md);
// at 1 row MKL's sgemv on the row-major copy is ~10% faster, at 512 rows the plain sgemm ~4%.
constexpr int64_t MKL_PACK_MIN_ROWS = 2;
constexpr int64_t MKL_PACK_MAX_ROWS = 64;

at::Tensor fp32_packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                              const at::Tensor& wr) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0;
  if (M < MKL_PACK_MIN_ROWS || M > MKL_PACK_MAX_ROWS) return at::linear(x, wr, b);
  // MKL reads the pack by these sizes without checking them: a mismatch must fail here, as F.linear's would
  TORCH_CHECK(w.is_mkldnn() && wr.dim() == 2 && x.size(1) == wr.size(1), "x [M, K] and a pack of wr [N, K]");
  TORCH_CHECK(!b.has_value() || b->numel() == wr.size(0), "bias must have N values");
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkl::_mkl_linear", "");
  torch::jit::Stack stack{x, w, wr, b, c10::IValue(M)};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// a linear on the prepacked weight w (the branch lives here so that a compiled graph with a symbolic
// batch keeps one opaque op). bf16: oneDNN's, or with the row-major copy wr bf16_linear for small M;
// float32: fp32_packed_linear (wr required)
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         const std::optional<at::Tensor>& wr) {
  if (w.scalar_type() == at::kFloat) {
    TORCH_CHECK(wr.has_value(), "a float32 packed weight needs its row-major copy");
    return fp32_packed_linear(x, w, b, *wr);
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
}

// the prepacked weight is an opaque oneDNN tensor: its dispatch key is MkldnnCPU
TORCH_LIBRARY_IMPL(distserve, MkldnnCPU, m) { m.impl("packed_linear", &packed_linear); }

// which vector path was compiled in, for logs and the bench
extern "C" const char* distserve_kernels_isa() {
  static const std::string s = std::string(kIsa) + (kBf16Dot ? "+bf16" : "");
  return s.c_str();
}
