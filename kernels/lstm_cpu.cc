// The LSTM recurrence on CPU, forward and backward, as two XLA FFI handlers (jaxmodels.kernels.lstm_cpu
// builds this file with the system's C++ compiler on first use and registers the handlers).
//
// Forward, per step t (gates i, f, g, o):
//   [i f g o] = σ,σ,tanh,σ(x_t W_x + h_{t-1} W_h + b),  C_t = f·C_{t-1} + i·g,  h_t = o·tanh(C_t).
// Backward, per step in reverse (δh_t = δhs_t + δh from step t+1, δC from step t+1):
//   δC = δC_next + δh_t·o·(1 - tanh²C_t), δpre = [δC·g·i(1-i), δC·C_{t-1}·f(1-f), δC·i·(1-g²),
//   δh_t·tanh C_t·o(1-o)], δC_{t-1} = δC·f, δh_{t-1} = δpre W_hᵀ.
// The weight and input gradients are matmuls over all steps, done outside by XLA.
//
// Threads: the hidden units are split into parts, one persistent thread per part, for the whole
// sequence. A part owns its units' four gate columns of W_h (forward) and their rows (backward),
// packed once into 16-column panels that stay in the core's cache; its units' C stays local. The
// one exchange per step is h_t (forward) or δpre_t (backward), written to the outputs and read
// by all parts after one barrier. The matmuls are a register-blocked kernel (16 columns a call,
// named accumulators: AVX-512 8 rows where the CPU has it, else AVX2/FMA 6 rows); σ and tanh are
// vectorized (16 or 8 floats, as the matmuls) from one exp polynomial.
//
// Bfloat16 (the `bf16` attribute; built with AMX where the CPU has it): the per-step matmuls
// (h_{t-1} W_h, x_t W_x, and δpre_t W_hᵀ) take their operands rounded to bfloat16 and accumulate in
// float32 on AMX tiles; everything else stays float32. Elsewhere `bf16` changes nothing.
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int NR = 16;  // panel width: one AVX-512 vector, two AVX2 vectors
#if defined(__AVX512F__)
constexpr int MR = 8;  // rows per micro-kernel call
#else
constexpr int MR = 6;
#endif
constexpr int KC = 128;  // the matmuls' k per pass (see gemm)
constexpr int PROJECTION_ROWS = 128;  // rows of x per input projection (a chunk of steps)

struct Barrier {
  explicit Barrier(int n) : n(n) {}
  // Spins, then yields: a part whose thread was descheduled (more threads than cores) gets the
  // core back instead of the waiters burning it.
  void wait() {
    if (n == 1) return;
    const int gen = generation.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }
  const int n;
  std::atomic<int> count{0};
  std::atomic<int> generation{0};
};

struct AlignedBuffer {
  explicit AlignedBuffer(size_t n)
      : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64))) {
    std::memset(p, 0, ((n * 4 + 63) / 64) * 64);
  }
  ~AlignedBuffer() { std::free(p); }
  float* p;
};

// Packs the columns cols of w [k, ldw] into panels [panels][k][NR], zero-padded. A panel of 16
// adjacent columns (the usual case: a gate's units are adjacent) is two vector copies a row.
void pack_columns(const float* w, int k, int ldw, const std::vector<int>& cols, float* out) {
  const int n = static_cast<int>(cols.size()), panels = (n + NR - 1) / NR;
  for (int p = 0; p < panels; ++p) {
    float* panel = out + static_cast<size_t>(p) * k * NR;
    const int c0 = p * NR;
    if (c0 + NR <= n && cols[c0 + NR - 1] - cols[c0] == NR - 1) {
      const float* src = w + cols[c0];
      for (int kk = 0; kk < k; ++kk) {
        _mm256_store_ps(panel + kk * NR, _mm256_loadu_ps(src + static_cast<size_t>(kk) * ldw));
        _mm256_store_ps(panel + kk * NR + 8, _mm256_loadu_ps(src + static_cast<size_t>(kk) * ldw + 8));
      }
      continue;
    }
    for (int kk = 0; kk < k; ++kk)
      for (int j = 0; j < NR; ++j)
        panel[kk * NR + j] = c0 + j < n ? w[static_cast<size_t>(kk) * ldw + cols[c0 + j]] : 0.f;
  }
}

// Packs the rows rows of w [*, k] (row-major, k columns) as columns of wᵀ: [panels][k][NR],
// zero-padded; each row is read once, in order.
void pack_rows(const float* w, int k, const std::vector<int>& rows, float* out) {
  const int n = static_cast<int>(rows.size()), panels = (n + NR - 1) / NR;
  for (int p = 0; p < panels; ++p) {
    float* panel = out + static_cast<size_t>(p) * k * NR;
    for (int j = 0; j < NR; ++j) {
      const int r = p * NR + j;
      const float* src = r < n ? w + static_cast<size_t>(rows[r]) * k : nullptr;
      for (int kk = 0; kk < k; ++kk) panel[kk * NR + j] = src ? src[kk] : 0.f;
    }
  }
}

// Row r of a micro-kernel's R rows of a, from column k0; row 0 for r >= R (never read).
template <int R>
inline const float* row(const float* const* rows, int r, int k0) {
  return (r < R ? rows[r] : rows[0]) + k0;
}

#if defined(__AVX512F__)
// AVX-512 (built where the CPU has it): a panel row of 16 floats is one vector, and a call takes
// up to MR rows of a and P = PANELS (2) panels: 16 accumulators, each k one vector load a panel and
// one broadcast a row for 16 FMAs, so that the FMA units, not the loads, set the pace.
constexpr int PANELS = 2;

// c [R, P·NR] = (c +) a [R, k] x P panels [k, NR] (the second `next` floats after the first), R <=
// MR rows of a given by pointers: the accumulators are named variables (an array of vectors would
// be kept in memory by the compiler, one store per FMA).
template <int R, int P>
inline void micro(int k, const float* const* rows, int k0, const float* panel, size_t next,
                  float* c, int ldc, bool accumulate) {
  static_assert(P == 1 || P == 2);
  __m512 c00 = _mm512_setzero_ps(), c10 = c00, c20 = c00, c30 = c00, c40 = c00, c50 = c00,
         c60 = c00, c70 = c00, c01 = c00, c11 = c00, c21 = c00, c31 = c00, c41 = c00, c51 = c00,
         c61 = c00, c71 = c00;
  const float *a0 = row<R>(rows, 0, k0), *a1 = row<R>(rows, 1, k0), *a2 = row<R>(rows, 2, k0),
              *a3 = row<R>(rows, 3, k0), *a4 = row<R>(rows, 4, k0), *a5 = row<R>(rows, 5, k0),
              *a6 = row<R>(rows, 6, k0), *a7 = row<R>(rows, 7, k0);
  const float* panel1 = panel + (P > 1 ? next : 0);
  for (int kk = 0; kk < k; ++kk) {
    const __m512 b0 = _mm512_load_ps(panel + kk * NR);
    const __m512 b1 = P > 1 ? _mm512_load_ps(panel1 + kk * NR) : b0;
    __m512 x;
#define JM_ROW(r)                                                \
  if constexpr (R > r) {                                         \
    x = _mm512_set1_ps(a##r[kk]);                                \
    c##r##0 = _mm512_fmadd_ps(x, b0, c##r##0);                   \
    if constexpr (P > 1) c##r##1 = _mm512_fmadd_ps(x, b1, c##r##1); \
  }
    JM_ROW(0) JM_ROW(1) JM_ROW(2) JM_ROW(3) JM_ROW(4) JM_ROW(5) JM_ROW(6) JM_ROW(7)
#undef JM_ROW
  }
#define JM_STORE(r)                                                                \
  if constexpr (R > r) {                                                           \
    if (accumulate) c##r##0 = _mm512_add_ps(c##r##0, _mm512_loadu_ps(c + r * ldc)); \
    _mm512_storeu_ps(c + r * ldc, c##r##0);                                        \
    if constexpr (P > 1) {                                                         \
      if (accumulate)                                                              \
        c##r##1 = _mm512_add_ps(c##r##1, _mm512_loadu_ps(c + r * ldc + NR));       \
      _mm512_storeu_ps(c + r * ldc + NR, c##r##1);                                 \
    }                                                                              \
  }
  JM_STORE(0) JM_STORE(1) JM_STORE(2) JM_STORE(3) JM_STORE(4) JM_STORE(5) JM_STORE(6) JM_STORE(7)
#undef JM_STORE
}

// c [1, NR] = (c +) a [1, k] x panel [k, NR], one row: eight partial sums over k (k mod 8), so
// that eight FMA chains run at once, not one (as at batch 1).
inline void micro_row(int k, const float* a, const float* panel, float* c, bool accumulate) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
  int kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    const float* b = panel + kk * NR;
#define JM_SUM(q) s##q = _mm512_fmadd_ps(_mm512_set1_ps(a[kk + q]), _mm512_load_ps(b + q * NR), s##q);
    JM_SUM(0) JM_SUM(1) JM_SUM(2) JM_SUM(3) JM_SUM(4) JM_SUM(5) JM_SUM(6) JM_SUM(7)
#undef JM_SUM
  }
  for (; kk < k; ++kk) s0 = _mm512_fmadd_ps(_mm512_set1_ps(a[kk]), _mm512_load_ps(panel + kk * NR), s0);
  __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)),
                             _mm512_add_ps(_mm512_add_ps(s4, s5), _mm512_add_ps(s6, s7)));
  if (accumulate) sum = _mm512_add_ps(sum, _mm512_loadu_ps(c));
  _mm512_storeu_ps(c, sum);
}
#else
// AVX2: a panel row of 16 floats is two vectors; MR rows and one panel a call, 2·MR FMA chains.
constexpr int PANELS = 1;

// c [R, NR] = (c +) a [R, k] x panel [k, NR], R <= MR rows of a given by pointers: the accumulators are named variables (an
// array of vectors would be kept in memory by the compiler, one store per FMA).
template <int R, int P>
inline void micro(int k, const float* const* rows, int k0, const float* panel, size_t /*next*/,
                  float* c, int ldc, bool accumulate) {
  static_assert(P == 1);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = row<R>(rows, 0, k0), *a1 = row<R>(rows, 1, k0), *a2 = row<R>(rows, 2, k0),
              *a3 = row<R>(rows, 3, k0), *a4 = row<R>(rows, 4, k0), *a5 = row<R>(rows, 5, k0);
  for (int kk = 0; kk < k; ++kk) {
    const __m256 b0 = _mm256_load_ps(panel + kk * NR);
    const __m256 b1 = _mm256_load_ps(panel + kk * NR + 8);
    __m256 x;
#define JM_ROW(r)                                  \
  if constexpr (R > r) {                           \
    x = _mm256_broadcast_ss(a##r + kk);            \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0);     \
    c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1);     \
  }
    JM_ROW(0) JM_ROW(1) JM_ROW(2) JM_ROW(3) JM_ROW(4) JM_ROW(5)
#undef JM_ROW
  }
#define JM_STORE(r)                                                      \
  if constexpr (R > r) {                                                 \
    if (accumulate) {                                                    \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(c + r * ldc));     \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(c + r * ldc + 8)); \
    }                                                                    \
    _mm256_storeu_ps(c + r * ldc, c##r##0);                              \
    _mm256_storeu_ps(c + r * ldc + 8, c##r##1);                          \
  }
  JM_STORE(0) JM_STORE(1) JM_STORE(2) JM_STORE(3) JM_STORE(4) JM_STORE(5)
#undef JM_STORE
}

// c [1, NR] = (c +) a [1, k] x panel [k, NR], one row: four partial sums over k (k mod 4) so that
// eight FMA chains run at once, not two (an FMA waits ~4 cycles for its accumulator; one row's
// two chains would leave the FMA units idle three quarters of the time, as at batch 1).
inline void micro_row(int k, const float* a, const float* panel, float* c, bool accumulate) {
  __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00,
         s30 = s00, s31 = s00;
  int kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    const float* b = panel + kk * NR;
    __m256 x = _mm256_broadcast_ss(a + kk);
    s00 = _mm256_fmadd_ps(x, _mm256_load_ps(b), s00);
    s01 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 8), s01);
    x = _mm256_broadcast_ss(a + kk + 1);
    s10 = _mm256_fmadd_ps(x, _mm256_load_ps(b + NR), s10);
    s11 = _mm256_fmadd_ps(x, _mm256_load_ps(b + NR + 8), s11);
    x = _mm256_broadcast_ss(a + kk + 2);
    s20 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 2 * NR), s20);
    s21 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 2 * NR + 8), s21);
    x = _mm256_broadcast_ss(a + kk + 3);
    s30 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 3 * NR), s30);
    s31 = _mm256_fmadd_ps(x, _mm256_load_ps(b + 3 * NR + 8), s31);
  }
  for (; kk < k; ++kk) {
    const __m256 x = _mm256_broadcast_ss(a + kk);
    s00 = _mm256_fmadd_ps(x, _mm256_load_ps(panel + kk * NR), s00);
    s01 = _mm256_fmadd_ps(x, _mm256_load_ps(panel + kk * NR + 8), s01);
  }
  __m256 c0 = _mm256_add_ps(_mm256_add_ps(s00, s10), _mm256_add_ps(s20, s30));
  __m256 c1 = _mm256_add_ps(_mm256_add_ps(s01, s11), _mm256_add_ps(s21, s31));
  if (accumulate) {
    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(c));
    c1 = _mm256_add_ps(c1, _mm256_loadu_ps(c + 8));
  }
  _mm256_storeu_ps(c, c0);
  _mm256_storeu_ps(c + 8, c1);
}
#endif

// The last rows of a gemm, fewer than MR, against P panels: micro<R, P> for R = left, micro_row
// (a panel at a time) for one.
template <int R, int P>
inline void micro_tail(int left, int k, const float* const* rows, int k0, const float* panel,
                       size_t next, float* c, int ldc, bool accumulate) {
  if constexpr (R == 1) {
    if (left == 1)
      for (int q = 0; q < P; ++q) micro_row(k, rows[0] + k0, panel + q * next, c + q * NR, accumulate);
  } else if (left == R) {
    micro<R, P>(k, rows, k0, panel, next, c, ldc, accumulate);
  } else {
    micro_tail<R - 1, P>(left, k, rows, k0, panel, next, c, ldc, accumulate);
  }
}

// c [m, P·NR] = (c +) a [m, k] x P panels from panel, `next` floats apart: MR rows at a time.
template <int P>
inline void panel_rows(int m, int k, const float* const* rows, int k0, const float* panel,
                       size_t next, float* c, int ldc, bool accumulate) {
  int r = 0;
  for (; r + MR <= m; r += MR)
    micro<MR, P>(k, rows + r, k0, panel, next, c + static_cast<size_t>(r) * ldc, ldc, accumulate);
  micro_tail<MR - 1, P>(m - r, k, rows + r, k0, panel, next, c + static_cast<size_t>(r) * ldc, ldc,
                        accumulate);
}

// c [m, panels*NR] = (c +) a [m, k] x packed panels, the rows of a given by pointers. k is taken
// KC at a time, so that the panels' slices (KC x 16 each) and the rows' slices (m x KC) stay in L1
// while each serves all the others; PANELS panels a call where the CPU has the registers for it.
void gemm(int m, int k, const float* const* rows, const float* packed, int panels, float* c,
          bool accumulate = false) {
  const int ldc = panels * NR;
  const size_t next = static_cast<size_t>(k) * NR;  // from a panel to the next
  for (int k0 = 0; k0 < k; k0 += KC) {
    const int kc = std::min(KC, k - k0);
    const bool acc = accumulate || k0 > 0;
    int p = 0;
    for (; p + PANELS <= panels; p += PANELS)
      panel_rows<PANELS>(m, kc, rows, k0, packed + p * next + k0 * NR, next, c + p * NR, ldc, acc);
    for (; p < panels; ++p)
      panel_rows<1>(m, kc, rows, k0, packed + p * next + k0 * NR, next, c + p * NR, ldc, acc);
  }
}

// Points rows at the rows of a, stride apart (a reused vector: nothing is allocated per step).
const float* const* strided_rows(std::vector<const float*>& rows, const float* a, size_t stride) {
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = a + r * stride;
  return rows.data();
}

// ---------------------------------------------------------------------------------------------
// Elementwise math on vectors of VW floats: AVX-512 where built for it, else AVX2. GCC and Clang
// give the vector types + - * /; the rest are these helpers. vload and vstore take the first n
// floats (masked: no access past them), for the last units of a part.

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int VW = 16;
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }   // a·b + c
inline Vec vfnma(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a·b
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vround(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vexp2i(Vec n) {  // 2^n for whole n in the exponent's range
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_castsi512_ps(e);
}
inline Vec vabs(Vec x) { return _mm512_abs_ps(x); }
inline Vec vcopysign(Vec magnitude, Vec sign) {
  const __m512i bit = _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), bit));
}
inline Vec vwhere_below(Vec x, float bound, Vec below, Vec otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset(bound), _CMP_LT_OQ), otherwise, below);
}
inline __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline Vec vload(const float* p, int n) {
  return n == VW ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p);
}
inline void vstore(float* p, Vec v, int n) {
  if (n == VW) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, first(n), v);
}
// The bits of VW bfloat16 from the bit patterns u of VW floats (already rounded, shifted down).
inline void store_halves(uint16_t* p, __m512i u) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(u));
}
inline __m512i as_int(Vec v) { return _mm512_castps_si512(v); }
inline __m512i rounded_half_bits(__m512i u) {  // u's upper 16 bits, rounded to nearest even
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}
// VW pairs (lo[j], hi[j]) rounded to bfloat16, lo in the low half.
inline void store_pairs(uint32_t* p, Vec lo, Vec hi) {
  const __m512i pairs = _mm512_or_si512(rounded_half_bits(as_int(lo)), _mm512_slli_epi32(rounded_half_bits(as_int(hi)), 16));
  _mm512_storeu_si512(p, pairs);
}
#else
using Vec = __m256;
constexpr int VW = 8;
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vfnma(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vround(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vexp2i(Vec n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_castsi256_ps(e);
}
inline Vec vabs(Vec x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
inline Vec vcopysign(Vec magnitude, Vec sign) {
  return _mm256_or_ps(magnitude, _mm256_and_ps(sign, _mm256_set1_ps(-0.f)));
}
inline Vec vwhere_below(Vec x, float bound, Vec below, Vec otherwise) {
  return _mm256_blendv_ps(otherwise, below, _mm256_cmp_ps(x, vset(bound), _CMP_LT_OQ));
}
inline __m256i first(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec vload(const float* p, int n) {
  return n == VW ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(n));
}
inline void vstore(float* p, Vec v, int n) {
  if (n == VW) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, first(n), v);
}
inline void store_halves(uint16_t* p, __m256i u) {  // values below 2^16: packing saturates nothing
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline __m256i as_int(Vec v) { return _mm256_castps_si256(v); }
inline __m256i rounded_half_bits(__m256i u) {
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
}
inline void store_pairs(uint32_t* p, Vec lo, Vec hi) {
  const __m256i pairs = _mm256_or_si256(rounded_half_bits(as_int(lo)), _mm256_slli_epi32(rounded_half_bits(as_int(hi)), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pairs);
}
#endif

// exp(x), Cephes-style: 2^n · p(r), |r| ≤ ln2/2, about 1 ulp in float32. A NaN stays NaN (min
// and max return their second operand when either is NaN: x is that one).
inline Vec vexp(Vec x) {
  x = vmin(vset(88.3f), vmax(vset(-87.3f), x));
  const Vec n = vround(x * vset(1.44269504088896341f));
  Vec r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, r * r, r + vset(1.f));
  return p * vexp2i(n);
}

inline Vec vsigmoid(Vec x) { return vset(1.f) / (vset(1.f) + vexp(-x)); }

// tanh(x) = sign(x)·(1 - e)/(1 + e), e = exp(-2|x|): no cancellation for large |x|; for small
// |x| a short odd polynomial keeps the relative error small.
inline Vec vtanh(Vec x) {
  const Vec ax = vabs(x);
  const Vec e = vexp(ax * vset(-2.f));
  const Vec big = (vset(1.f) - e) / (vset(1.f) + e);
  const Vec x2 = ax * ax;  // tanh x ≈ x - x³/3 + 2x⁵/15 - 17x⁷/315, |x| < 0.05
  Vec s = vfma(x2, vset(-17.f / 315.f), vset(2.f / 15.f));
  s = vfma(s, x2, vset(-1.f / 3.f));
  const Vec small = vfma(s * x2, ax, ax);
  return vcopysign(vwhere_below(ax, 0.05f, small, big), x);
}

// ---------------------------------------------------------------------------------------------
// Bfloat16 operands on AMX tiles. A tile holds up to 16 rows of 64 bytes; TDPBF16PS adds to a
// float32 tile C [16, 16] the product of A [16, 32] (bfloat16) and B [32, 16] (bfloat16, stored as
// 16 rows of k pairs: B[2r][n], B[2r+1][n] adjacent, the "VNNI" layout).

using half = uint16_t;  // the bits of a bfloat16
constexpr int KB = 32;  // k per tile product: the operands' k is padded to a multiple of it

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// x rounded to the nearest bfloat16 (ties to even), as the hardware's conversions do.
inline half to_half(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<half>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// dst [n] = src [n] rounded to bfloat16, a vector at a time.
inline void to_half_row(const float* src, int n, half* dst) {
  int j = 0;
  for (; j + VW <= n; j += VW) store_halves(dst + j, rounded_half_bits(as_int(vload(src + j, VW))));
  for (; j < n; ++j) dst[j] = to_half(src[j]);
}

// Two bfloat16 of adjacent k, the lower k in the low half: an element of a B tile's row.
using pair = uint32_t;

inline pair to_pair(float lo, float hi) { return to_half(lo) | static_cast<pair>(to_half(hi)) << 16; }

// The B operand of the tiles: panels of NR columns, [panels][kp / 2][NR] pairs, kp = k rounded up
// to KB, zero-padded, from the columns `cols` of w [k, ldw] (float32). A panel of 16 adjacent
// columns (a gate's units are adjacent) is converted a vector of pairs at a time.
std::vector<pair> pack_columns_half(const float* w, int k, int ldw, const std::vector<int>& cols) {
  const int n = static_cast<int>(cols.size()), panels = (n + NR - 1) / NR, kp = round_up(k, KB);
  std::vector<pair> out(static_cast<size_t>(panels) * kp / 2 * NR);
  for (int p = 0; p < panels; ++p) {
    const int c0 = p * NR;
    const bool adjacent = c0 + NR <= n && cols[c0 + NR - 1] - cols[c0] == NR - 1;
    for (int r = 0; r < kp / 2; ++r) {
      pair* dst = out.data() + (static_cast<size_t>(p) * kp / 2 + r) * NR;
      const int k0 = 2 * r;
      if (adjacent && k0 + 1 < k) {
        const float* lo = w + static_cast<size_t>(k0) * ldw + cols[c0];
        for (int j = 0; j < NR; j += VW) store_pairs(dst + j, vload(lo + j, VW), vload(lo + ldw + j, VW));
        continue;
      }
      const auto at = [&](int kk, int col) {
        return kk < k && col < n ? w[static_cast<size_t>(kk) * ldw + cols[col]] : 0.f;
      };
      for (int j = 0; j < NR; ++j) dst[j] = to_pair(at(k0, c0 + j), at(k0 + 1, c0 + j));
    }
  }
  return out;
}

// The same from the rows `rows` of w [*, k] (row-major), as columns of wᵀ: each pair is two
// adjacent floats of a row.
std::vector<pair> pack_rows_half(const float* w, int k, const std::vector<int>& rows) {
  const int n = static_cast<int>(rows.size()), panels = (n + NR - 1) / NR, kp = round_up(k, KB);
  std::vector<pair> out(static_cast<size_t>(panels) * kp / 2 * NR);
  for (int i = 0; i < n; ++i) {
    const float* src = w + static_cast<size_t>(rows[i]) * k;
    pair* dst = out.data() + static_cast<size_t>(i / NR) * kp / 2 * NR + i % NR;
    for (int r = 0; r < kp / 2; ++r) {
      const int k0 = 2 * r;
      dst[static_cast<size_t>(r) * NR] = to_pair(k0 < k ? src[k0] : 0.f, k0 + 1 < k ? src[k0 + 1] : 0.f);
    }
  }
  return out;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool AMX_BUILD = true;

// The tile configuration of one thread: tiles 0-3 are C, 4-5 are A (`rows` rows each), 6-7 are B
// (16 rows); set again only when the rows change (the last rows of a gemm, batch < 16), and
// released when the part ends.
struct Tiles {
  void use(int rows) {
    if (rows == configured) return;
    alignas(64) uint8_t config[64] = {};
    config[0] = 1;  // palette 1
    for (int t = 0; t < 8; ++t) {
      const uint16_t bytes = 64;
      std::memcpy(config + 16 + 2 * t, &bytes, sizeof bytes);
      config[48 + t] = static_cast<uint8_t>(t < 6 ? rows : 16);
    }
    _tile_loadconfig(config);
    configured = rows;
  }
  ~Tiles() {
    if (configured) _tile_release();
  }
  int configured = 0;
};

// c [rows, P·NR] = (c +) a [rows, kp] x P panels (`next` bfloat16 apart): one A tile a k step
// serves P B tiles; the C tiles stay in the tile registers over all of k.
template <int P>
void tile_panels(int kp, const half* a, int lda, const pair* panel, size_t next, float* c, int ldc,
                 bool accumulate) {
  const int sc = ldc * static_cast<int>(sizeof(float)), sa = lda * static_cast<int>(sizeof(half));
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (P > 1) _tile_loadd(1, c + NR, sc);
    if constexpr (P > 2) _tile_loadd(2, c + 2 * NR, sc);
    if constexpr (P > 3) _tile_loadd(3, c + 3 * NR, sc);
  } else {
    _tile_zero(0);
    if constexpr (P > 1) _tile_zero(1);
    if constexpr (P > 2) _tile_zero(2);
    if constexpr (P > 3) _tile_zero(3);
  }
  for (int k0 = 0; k0 < kp; k0 += KB) {
    const pair* b = panel + static_cast<size_t>(k0 / 2) * NR;
    _tile_loadd(4, a + k0, sa);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (P > 1) {
      _tile_loadd(7, b + next, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (P > 2) {
      _tile_loadd(6, b + 2 * next, 64);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (P > 3) {
      _tile_loadd(7, b + 3 * next, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (P > 1) _tile_stored(1, c + NR, sc);
  if constexpr (P > 2) _tile_stored(2, c + 2 * NR, sc);
  if constexpr (P > 3) _tile_stored(3, c + 3 * NR, sc);
}

// c [32, 2·NR] = (c +) a [32, kp] x 2 panels: two A tiles and two B tiles a k step for four
// products, each tile loaded once for two of them.
void tile_2x2(int kp, const half* a, int lda, const pair* panel, size_t next, float* c, int ldc,
              bool accumulate) {
  const int sc = ldc * static_cast<int>(sizeof(float)), sa = lda * static_cast<int>(sizeof(half));
  const half* a1 = a + static_cast<size_t>(16) * lda;
  float* c1 = c + static_cast<size_t>(16) * ldc;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    _tile_loadd(1, c + NR, sc);
    _tile_loadd(2, c1, sc);
    _tile_loadd(3, c1 + NR, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int k0 = 0; k0 < kp; k0 += KB) {
    const pair* b = panel + static_cast<size_t>(k0 / 2) * NR;
    _tile_loadd(4, a + k0, sa);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + next, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + k0, sa);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + NR, sc);
  _tile_stored(2, c1, sc);
  _tile_stored(3, c1 + NR, sc);
}

// c [m, panels·NR] (row stride ldc) = (c +) a [m, kp] (bfloat16, row stride lda, kp a multiple of
// KB) x panels packed for the tiles (pack_columns_half): 32 rows by 2 panels at a time (tile_2x2),
// all the rows for a pair of panels before the next pair, so that the pair's B tiles are read
// from memory once and from L1 for the other rows (a part's W_h is larger than L1, and can be
// larger than L2); what is left, up to 4 panels by 16 rows at a time. The last rows, fewer than
// 16, take a tile configuration of their own, once.
void tile_gemm(Tiles& tiles, int m, int kp, const half* a, int lda, const pair* packed, int panels,
               float* c, int ldc, bool accumulate) {
  const size_t next = static_cast<size_t>(kp) / 2 * NR;
  const auto rows_of = [&](int r, int p, int count) {  // rows [r, r + 16) x panels [p, p + count)
    const half* ar = a + static_cast<size_t>(r) * lda;
    const pair* b = packed + p * next;
    float* cr = c + static_cast<size_t>(r) * ldc + p * NR;
    switch (count) {
      case 4: return tile_panels<4>(kp, ar, lda, b, next, cr, ldc, accumulate);
      case 3: return tile_panels<3>(kp, ar, lda, b, next, cr, ldc, accumulate);
      case 2: return tile_panels<2>(kp, ar, lda, b, next, cr, ldc, accumulate);
      default: return tile_panels<1>(kp, ar, lda, b, next, cr, ldc, accumulate);
    }
  };
  const int paired = m / 32 * 32, full = m / 16 * 16;  // rows in blocks of 32; of 16
  if (full) tiles.use(16);
  for (int p = 0; p + 2 <= panels && paired; p += 2)  // two panels by 32 rows
    for (int r = 0; r < paired; r += 32)
      tile_2x2(kp, a + static_cast<size_t>(r) * lda, lda, packed + p * next, next,
               c + static_cast<size_t>(r) * ldc + p * NR, ldc, accumulate);
  if (paired && panels % 2)  // the last panel
    for (int r = 0; r < paired; r += 16) rows_of(r, panels - 1, 1);
  if (full > paired)  // the last 16 rows
    for (int p = 0; p < panels; p += 4) rows_of(paired, p, std::min(4, panels - p));
  if (m > full) {  // the last rows, fewer than 16
    tiles.use(m - full);
    for (int p = 0; p < panels; p += 4) rows_of(full, p, std::min(4, panels - p));
  }
}
#else
constexpr bool AMX_BUILD = false;  // built without AMX: the bf16 attribute changes nothing
struct Tiles {};
void tile_gemm(Tiles&, int, int, const half*, int, const pair*, int, float*, int, bool) {}
#endif

// Whether this process may use the AMX tiles: Linux grants their state on request, once.
bool tiles_ready() {
  constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
  static const bool ready = AMX_BUILD && syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
  return ready;
}

// Splits n hidden units over the threads: [begin, end) of part p, multiples of 8 where possible.
std::pair<int, int> units_of(int part, int parts, int hidden) {
  const int blocks = (hidden + 7) / 8;
  const int b0 = blocks * part / parts, b1 = blocks * (part + 1) / parts;
  return {std::min(hidden, b0 * 8), std::min(hidden, b1 * 8)};
}

// Runs f(part, parts, barrier) for parts 0 .. parts-1 at once: part 0 on the calling thread, the
// others on threads of XLA's intra-op pool (the threads that sit idle while this kernel runs, so
// that no extra threads compete with them for the cores). Up to `want` parts: helpers scheduled on
// the pool join for about 200 µs, and the parts are those that joined by then, so a busy pool
// makes the kernel run with fewer threads, never wait for one. The team lives on the heap: a
// helper scheduled late finds it closed and returns.
struct Team {
  std::mutex mutex;
  int joined = 1;
  bool closed = false;
  std::atomic<bool> go{false};
  std::atomic<int> finished{0};
  std::unique_ptr<Barrier> barrier;
  std::function<void(int, int, Barrier&)> body;
};

template <typename F>
void run_parts(ffi::ThreadPool& pool, int want, F&& f) {
  want = static_cast<int>(std::min<int64_t>(want, pool.num_threads() + 1));
  if (want <= 1) {
    Barrier single(1);
    f(0, 1, single);
    return;
  }
  auto team = std::make_shared<Team>();
  team->body = f;
  for (int p = 1; p < want; ++p)
    pool.Schedule([team] {
      int part;
      {
        std::lock_guard<std::mutex> lock(team->mutex);
        if (team->closed) return;
        part = team->joined++;
      }
      while (!team->go.load(std::memory_order_acquire)) _mm_pause();
      team->body(part, team->barrier->n, *team->barrier);
      team->finished.fetch_add(1, std::memory_order_release);
    });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
  int parts;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(team->mutex);
      if (team->joined == want || std::chrono::steady_clock::now() > deadline) {
        team->closed = true;
        parts = team->joined;
        break;
      }
    }
    std::this_thread::yield();
  }
  team->barrier = std::make_unique<Barrier>(parts);
  team->go.store(true, std::memory_order_release);
  f(0, parts, *team->barrier);
  while (team->finished.load(std::memory_order_acquire) != parts - 1) _mm_pause();
}

// Asks the operating system for 2 MiB pages under the 2 MiB-aligned part of [p, p + bytes): XLA
// allocates a large output afresh each call (mapped memory), and the first write to each of its
// 4 KiB pages is a page fault: up to a third of the forward's time when it saves its activations
// for the backward. A hint: where transparent huge pages are off it changes nothing.
void prefer_huge_pages(void* p, size_t bytes) {
  constexpr uintptr_t HUGE = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(HUGE - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

struct Sizes {
  int time, batch, hidden, features;
};

// Forward: xs [B, T, F], w_x [F, 4H], b [4H], w_h [H, 4H], h0, c0 [B, H] -> hs [B, T, H] and
// c_last [B, H] (C after the last step); with save, also cs [B, T, H] (C_t) and acts [B, T, 4H]
// (the activated gates i, f, g, o), which the backward pass reads. Everything is batch-major, as
// the caller's xs and hs are, so that nothing is transposed around the kernel. Each part computes
// its columns of x_t W_x for the next step before the step's barrier, while it would otherwise
// wait. With `tiles`, the matmuls take bfloat16 operands on AMX tiles: W_h and W_x packed once, x
// rounded a chunk at a time, h_t rounded by its part into a shared copy of two slots (step s reads
// slot (s + 1) % 2 and writes slot s % 2, which every part finished reading at step s - 1's
// barrier).
void forward(ffi::ThreadPool& pool, Sizes s, bool reverse, int threads, bool tiles,
             const float* xs, const float* w_x, const float* bias, const float* w_h,
             const float* h0, const float* c0, float* hs, float* c_last, float* cs, float* acts) {
  const int T = s.time, B = s.batch, H = s.hidden, F = s.features, G = 4 * H;
  const int Hp = round_up(H, KB), Fp = round_up(F, KB);  // k of the tiles' operands
  const bool save = cs != nullptr;
  std::vector<half> h_half(tiles ? static_cast<size_t>(2) * B * Hp : 0);  // zero-padded
  if (tiles)
    for (int b = 0; b < B; ++b) to_half_row(h0 + static_cast<size_t>(b) * H, H, h_half.data() + (B + b) * Hp);
  prefer_huge_pages(hs, sizeof(float) * T * B * H);
  if (save) {
    prefer_huge_pages(cs, sizeof(float) * T * B * H);
    prefer_huge_pages(acts, sizeof(float) * T * B * G);
  }
  run_parts(pool, threads, [&](int part, int parts, Barrier& barrier) {
    const auto [u0, u1] = units_of(part, parts, H);
    const int nu = u1 - u0;
    std::vector<int> cols;
    for (int g = 0; g < 4; ++g)
      for (int u = u0; u < u1; ++u) cols.push_back(g * H + u);
    const int n_cols = static_cast<int>(cols.size()), panels = (n_cols + NR - 1) / NR;
    const int ldp = panels * NR;
    AlignedBuffer packed_h(tiles ? 0 : static_cast<size_t>(panels) * H * NR);
    AlignedBuffer packed_x(tiles ? 0 : static_cast<size_t>(panels) * F * NR);
    std::vector<pair> packed_h16, packed_x16;
    // x_t W_x for a chunk of steps at a time, about PROJECTION_ROWS rows of x: W_x is read once a
    // chunk (at batch 1 a step's projection alone would read all of it for one row).
    const int chunk = std::clamp(PROJECTION_ROWS / B, 1, T);
    AlignedBuffer pre(static_cast<size_t>(chunk) * B * ldp), c_state(static_cast<size_t>(B) * nu);
    AlignedBuffer b_own(ldp);
    std::vector<half> x_half(tiles ? static_cast<size_t>(chunk) * B * Fp : 0);  // zero-padded
    Tiles tile_state;
    if (nu && tiles) {
      packed_h16 = pack_columns_half(w_h, H, G, cols);
      packed_x16 = pack_columns_half(w_x, F, G, cols);
    } else if (nu) {
      pack_columns(w_h, H, G, cols, packed_h.p);
      pack_columns(w_x, F, G, cols, packed_x.p);
    }
    for (int c = 0; c < n_cols; ++c) b_own.p[c] = bias[cols[c]];
    for (int b = 0; b < B; ++b)
      std::memcpy(c_state.p + static_cast<size_t>(b) * nu, c0 + static_cast<size_t>(b) * H + u0,
                  sizeof(float) * nu);
    const auto time_of = [&](int step) { return reverse ? T - 1 - step : step; };
    std::vector<const float*> x_rows(static_cast<size_t>(chunk) * B), h_rows(B);
    const auto project = [&](int first) {  // pre = x_t W_x for the chunk's steps, rows (step, b)
      const int n = std::min(chunk, T - first);
      for (int i = 0; i < n; ++i)
        for (int b = 0; b < B; ++b)
          x_rows[i * B + b] = xs + (static_cast<size_t>(b) * T + time_of(first + i)) * F;
      if (!nu) return;
      if (!tiles) return gemm(n * B, F, x_rows.data(), packed_x.p, panels, pre.p);
      for (int r = 0; r < n * B; ++r) to_half_row(x_rows[r], F, x_half.data() + static_cast<size_t>(r) * Fp);
      tile_gemm(tile_state, n * B, Fp, x_half.data(), Fp, packed_x16.data(), panels, pre.p, ldp, false);
    };
    project(0);
    for (int step = 0; step < T; ++step) {
      const int t = time_of(step);
      const float* h_in = step == 0 ? h0 : hs + static_cast<size_t>(time_of(step - 1)) * H;
      const size_t h_stride = step == 0 ? H : static_cast<size_t>(T) * H;
      float* pre_t = pre.p + static_cast<size_t>(step % chunk) * B * ldp;
      if (nu) {
        if (tiles)
          tile_gemm(tile_state, B, Hp, h_half.data() + static_cast<size_t>((step + 1) % 2) * B * Hp,
                    Hp, packed_h16.data(), panels, pre_t, ldp, /*accumulate=*/true);
        else
          gemm(B, H, strided_rows(h_rows, h_in, h_stride), packed_h.p, panels, pre_t,
               /*accumulate=*/true);
        for (int b = 0; b < B; ++b) {
          const size_t row = static_cast<size_t>(b) * T + t;
          const float* pr = pre_t + static_cast<size_t>(b) * ldp;
          float* c = c_state.p + static_cast<size_t>(b) * nu;
          float* h = hs + row * H + u0;
          for (int j = 0; j < nu; j += VW) {
            const int n = std::min(VW, nu - j);
            const auto gate = [&](int g) { return vload(pr + g * nu + j, n) + vload(b_own.p + g * nu + j, n); };
            const Vec i = vsigmoid(gate(0)), f = vsigmoid(gate(1)), g = vtanh(gate(2)), o = vsigmoid(gate(3));
            const Vec c_t = vfma(f, vload(c + j, n), i * g);
            vstore(c + j, c_t, n);
            vstore(h + j, o * vtanh(c_t), n);
            if (save) {
              float* a = acts + row * G + u0 + j;
              vstore(cs + row * H + u0 + j, c_t, n);
              vstore(a, i, n);
              vstore(a + H, f, n);
              vstore(a + 2 * H, g, n);
              vstore(a + 3 * H, o, n);
            }
          }
          if (tiles) to_half_row(h, nu, h_half.data() + (static_cast<size_t>(step % 2) * B + b) * Hp + u0);
        }
        if ((step + 1) % chunk == 0 && step + 1 < T) project(step + 1);
      }
      barrier.wait();
    }
    for (int b = 0; b < B; ++b)
      std::memcpy(c_last + static_cast<size_t>(b) * H + u0, c_state.p + static_cast<size_t>(b) * nu,
                  sizeof(float) * nu);
  });
}

// Backward: the gate gradients dpre [B, T, 4H] and dh0, dc0 [B, H] from dhs [B, T, H] (the
// gradient reaching each h_t from outside the recurrence), dh_T, dc_T [B, H] and what forward
// saved (acts, cs), with c0 and w_h. dpre may be acts itself (the caller aliases them: a step
// reads its units' four gates before it writes their gradients in their place). With `tiles`,
// δpre_t W_hᵀ takes bfloat16 operands on AMX tiles: δpre_t rounded by each part into a shared copy
// of two slots, as the forward's h_t.
void backward(ffi::ThreadPool& pool, Sizes s, bool reverse, int threads, bool tiles,
              const float* w_h, const float* c0, const float* cs, const float* acts,
              const float* dhs, const float* dh_last, const float* dc_last, float* dpre,
              float* dh0, float* dc0) {
  const int T = s.time, B = s.batch, H = s.hidden, G = 4 * H, Gp = round_up(G, KB);
  std::vector<half> dpre_half(tiles ? static_cast<size_t>(2) * B * Gp : 0);  // zero-padded
  run_parts(pool, threads, [&](int part, int parts, Barrier& barrier) {
    const auto [u0, u1] = units_of(part, parts, H);
    const int nu = u1 - u0;
    std::vector<int> rows;
    for (int u = u0; u < u1; ++u) rows.push_back(u);
    const int panels = (nu + NR - 1) / NR;
    const int ldp = panels * NR;
    AlignedBuffer packed(tiles ? 0 : static_cast<size_t>(panels) * G * NR);
    std::vector<pair> packed16;
    Tiles tile_state;
    if (nu && tiles)
      packed16 = pack_rows_half(w_h, G, rows);
    else if (nu)
      pack_rows(w_h, G, rows, packed.p);
    std::vector<const float*> dpre_rows(B);
    AlignedBuffer dh(static_cast<size_t>(B) * ldp), dc(static_cast<size_t>(B) * ldp);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < nu; ++j) {
        dh.p[b * ldp + j] = dh_last[b * H + u0 + j];
        dc.p[b * ldp + j] = dc_last[b * H + u0 + j];
      }
    for (int step = 0; step < T; ++step) {
      const int t = reverse ? step : T - 1 - step;
      const bool first = reverse ? t == T - 1 : t == 0;
      const int prev = reverse ? t + 1 : t - 1;
      for (int b = 0; b < B && nu; ++b) {
        const size_t row = (static_cast<size_t>(b) * T + t) * H;
        const float* a = acts + (static_cast<size_t>(b) * T + t) * G;
        float* d = dpre + (static_cast<size_t>(b) * T + t) * G;
        float* dhb = dh.p + b * ldp;
        float* dcb = dc.p + b * ldp;
        const float* cp = first ? c0 + static_cast<size_t>(b) * H
                                : cs + (static_cast<size_t>(b) * T + prev) * H;
        const Vec one = vset(1.f);
        for (int j = 0; j < nu; j += VW) {
          const int n = std::min(VW, nu - j), u = u0 + j;
          const Vec i = vload(a + u, n), f = vload(a + H + u, n);
          const Vec g = vload(a + 2 * H + u, n), o = vload(a + 3 * H + u, n);
          const Vec tc = vtanh(vload(cs + row + u, n));
          const Vec h_grad = vload(dhs + row + u, n) + vload(dhb + j, n);
          const Vec c_grad = vfma(h_grad * o, vfnma(tc, tc, one), vload(dcb + j, n));
          vstore(d + u, c_grad * g * (i * (one - i)), n);
          vstore(d + H + u, c_grad * vload(cp + u, n) * (f * (one - f)), n);
          vstore(d + 2 * H + u, c_grad * i * vfnma(g, g, one), n);
          vstore(d + 3 * H + u, h_grad * tc * (o * (one - o)), n);
          vstore(dcb + j, c_grad * f, n);
        }
        if (tiles)
          for (int g = 0; g < 4; ++g)
            to_half_row(d + g * H + u0, nu, dpre_half.data() + (static_cast<size_t>(step % 2) * B + b) * Gp + g * H + u0);
      }
      barrier.wait();
      if (nu && tiles)
        tile_gemm(tile_state, B, Gp, dpre_half.data() + static_cast<size_t>(step % 2) * B * Gp, Gp,
                  packed16.data(), panels, dh.p, ldp, false);
      else if (nu)
        gemm(B, G, strided_rows(dpre_rows, dpre + static_cast<size_t>(t) * G, static_cast<size_t>(T) * G),
             packed.p, panels, dh.p);
    }
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < nu; ++j) {
        dh0[b * H + u0 + j] = dh.p[b * ldp + j];
        dc0[b * H + u0 + j] = dc.p[b * ldp + j];
      }
  });
}

int parts_for(int64_t threads, int hidden) {
  const int most = std::max(1, (hidden + 7) / 8);
  return static_cast<int>(std::clamp<int64_t>(threads, 1, most));
}

ffi::Error forward_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs,
                        ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> b,
                        ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                        ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> hs,
                        ffi::ResultBuffer<ffi::F32> c_last, ffi::ResultBuffer<ffi::F32> cs,
                        ffi::ResultBuffer<ffi::F32> acts, int32_t reverse, int32_t threads,
                        int32_t bf16) {
  const auto dx = xs.dimensions(), dh = w_h.dimensions();
  if (dx.size() != 3 || dh.size() != 2 || dh[1] != 4 * dh[0])
    return ffi::Error::InvalidArgument("expected xs [B, T, F] and w_h [H, 4H]");
  const Sizes s{static_cast<int>(dx[1]), static_cast<int>(dx[0]), static_cast<int>(dh[0]),
                static_cast<int>(dx[2])};
  const bool save = acts->element_count() > 0;  // [0]-shaped cs and acts: inference, not saved
  forward(pool, s, reverse != 0, parts_for(threads, s.hidden), bf16 && tiles_ready(),
          xs.typed_data(), w_x.typed_data(),
          b.typed_data(), w_h.typed_data(), h0.typed_data(), c0.typed_data(), hs->typed_data(),
          c_last->typed_data(), save ? cs->typed_data() : nullptr,
          save ? acts->typed_data() : nullptr);
  return ffi::Error::Success();
}

ffi::Error backward_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> c0,
                         ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> acts,
                         ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> dh_last,
                         ffi::Buffer<ffi::F32> dc_last, ffi::ResultBuffer<ffi::F32> dpre,
                         ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0,
                         int32_t reverse, int32_t threads, int32_t bf16) {
  const auto d = acts.dimensions();
  if (d.size() != 3 || d[2] % 4) return ffi::Error::InvalidArgument("acts must be [B, T, 4H]");
  const Sizes s{static_cast<int>(d[1]), static_cast<int>(d[0]), static_cast<int>(d[2] / 4), 0};
  backward(pool, s, reverse != 0, parts_for(threads, s.hidden), bf16 && tiles_ready(),
           w_h.typed_data(), c0.typed_data(),
           cs.typed_data(), acts.typed_data(), dhs.typed_data(), dh_last.typed_data(),
           dc_last.typed_data(), dpre->typed_data(), dh0->typed_data(), dc0->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))
EXPORT XLA_FFI_Error* JaxmodelsLstmForward(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* JaxmodelsLstmBackward(XLA_FFI_CallFrame*);

// 1 where this CPU runs the kernels (AVX2 and FMA; AVX-512F too where built for it), else 0:
// checked before any handler is registered, as the instruction set is chosen at build time.
EXPORT int JaxmodelsLstmCpuSupported() {
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return 0;
#endif
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// 1 where the bf16 attribute runs the matmuls on AMX tiles (built with AMX, and Linux granted the
// tiles' state to this process), else 0.
EXPORT int JaxmodelsLstmCpuTiles() { return tiles_ready(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmodelsLstmForward, forward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmodelsLstmBackward, backward_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<int32_t>("bf16"));
