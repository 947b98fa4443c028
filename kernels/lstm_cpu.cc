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
// vectorized (AVX2) from one exp polynomial.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <cmath>
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

// exp(x), Cephes-style: 2^n · p(r), |r| ≤ ln2/2, about 1 ulp in float32.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
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
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = sign(x)·(1 - e)/(1 + e), e = exp(-2|x|): no cancellation for large |x|; for small
// |x| a short odd polynomial keeps the relative error small.
inline __m256 tanh8(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 e = exp8(_mm256_mul_ps(ax, _mm256_set1_ps(-2.f)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 big = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 x2 = _mm256_mul_ps(ax, ax);  // tanh x ≈ x - x³/3 + 2x⁵/15 - 17x⁷/315, |x| < 0.05
  __m256 s = _mm256_fmadd_ps(x2, _mm256_set1_ps(-17.f / 315.f), _mm256_set1_ps(2.f / 15.f));
  s = _mm256_fmadd_ps(s, x2, _mm256_set1_ps(-1.f / 3.f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(s, x2), ax, ax);
  const __m256 use_small = _mm256_cmp_ps(ax, _mm256_set1_ps(0.05f), _CMP_LT_OQ);
  return _mm256_or_ps(_mm256_blendv_ps(big, small, use_small), sign);
}

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

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
// wait.
void forward(ffi::ThreadPool& pool, Sizes s, bool reverse, int threads, const float* xs,
             const float* w_x, const float* bias, const float* w_h, const float* h0,
             const float* c0, float* hs, float* c_last, float* cs, float* acts) {
  const int T = s.time, B = s.batch, H = s.hidden, F = s.features, G = 4 * H;
  const bool save = cs != nullptr;
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
    const int panels = (static_cast<int>(cols.size()) + NR - 1) / NR;
    const int ldp = panels * NR;
    AlignedBuffer packed_h(static_cast<size_t>(panels) * H * NR);
    AlignedBuffer packed_x(static_cast<size_t>(panels) * F * NR);
    // x_t W_x for a chunk of steps at a time, about PROJECTION_ROWS rows of x: W_x is read once a
    // chunk (at batch 1 a step's projection alone would read all of it for one row).
    const int chunk = std::clamp(PROJECTION_ROWS / B, 1, T);
    AlignedBuffer pre(static_cast<size_t>(chunk) * B * ldp), c_state(static_cast<size_t>(B) * nu);
    AlignedBuffer b_own(ldp);
    if (nu) {
      pack_columns(w_h, H, G, cols, packed_h.p);
      pack_columns(w_x, F, G, cols, packed_x.p);
      for (size_t c = 0; c < cols.size(); ++c) b_own.p[c] = bias[cols[c]];
    }
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
      if (nu) gemm(n * B, F, x_rows.data(), packed_x.p, panels, pre.p);
    };
    project(0);
    for (int step = 0; step < T; ++step) {
      const int t = time_of(step);
      const float* h_in = step == 0 ? h0 : hs + static_cast<size_t>(time_of(step - 1)) * H;
      const size_t h_stride = step == 0 ? H : static_cast<size_t>(T) * H;
      float* pre_t = pre.p + static_cast<size_t>(step % chunk) * B * ldp;
      if (nu) {
        gemm(B, H, strided_rows(h_rows, h_in, h_stride), packed_h.p, panels, pre_t,
             /*accumulate=*/true);
        for (int b = 0; b < B; ++b) {
          const size_t row = static_cast<size_t>(b) * T + t;
          const float* pr = pre_t + static_cast<size_t>(b) * ldp;
          const float* bo = b_own.p;
          float* c = c_state.p + static_cast<size_t>(b) * nu;
          float* h = hs + row * H + u0;
          int j = 0;
          const auto gate8 = [&](int g) {
            return _mm256_add_ps(_mm256_loadu_ps(pr + g * nu + j), _mm256_loadu_ps(bo + g * nu + j));
          };
          for (; j + 8 <= nu; j += 8) {
            const __m256 i = sigmoid8(gate8(0)), f = sigmoid8(gate8(1));
            const __m256 g = tanh8(gate8(2)), o = sigmoid8(gate8(3));
            const __m256 c_t = _mm256_fmadd_ps(f, _mm256_loadu_ps(c + j), _mm256_mul_ps(i, g));
            _mm256_storeu_ps(c + j, c_t);
            _mm256_storeu_ps(h + j, _mm256_mul_ps(o, tanh8(c_t)));
            if (save) {
              float* a = acts + row * G + u0 + j;
              _mm256_storeu_ps(cs + row * H + u0 + j, c_t);
              _mm256_storeu_ps(a, i);
              _mm256_storeu_ps(a + H, f);
              _mm256_storeu_ps(a + 2 * H, g);
              _mm256_storeu_ps(a + 3 * H, o);
            }
          }
          for (; j < nu; ++j) {
            const float i = sigmoid1(pr[j] + bo[j]), f = sigmoid1(pr[nu + j] + bo[nu + j]);
            const float g = std::tanh(pr[2 * nu + j] + bo[2 * nu + j]);
            const float o = sigmoid1(pr[3 * nu + j] + bo[3 * nu + j]);
            c[j] = f * c[j] + i * g;
            h[j] = o * std::tanh(c[j]);
            if (save) {
              float* a = acts + row * G + u0 + j;
              cs[row * H + u0 + j] = c[j];
              a[0] = i, a[H] = f, a[2 * H] = g, a[3 * H] = o;
            }
          }
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
// reads its units' four gates before it writes their gradients in their place).
void backward(ffi::ThreadPool& pool, Sizes s, bool reverse, int threads, const float* w_h, const float* c0,
              const float* cs, const float* acts, const float* dhs, const float* dh_last,
              const float* dc_last, float* dpre, float* dh0, float* dc0) {
  const int T = s.time, B = s.batch, H = s.hidden, G = 4 * H;
  run_parts(pool, threads, [&](int part, int parts, Barrier& barrier) {
    const auto [u0, u1] = units_of(part, parts, H);
    const int nu = u1 - u0;
    std::vector<int> rows;
    for (int u = u0; u < u1; ++u) rows.push_back(u);
    const int panels = (nu + NR - 1) / NR;
    const int ldp = panels * NR;
    AlignedBuffer packed(static_cast<size_t>(panels) * G * NR);
    if (nu) pack_rows(w_h, G, rows, packed.p);
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
        int j = 0;
        const __m256 one = _mm256_set1_ps(1.f);
        for (; j + 8 <= nu; j += 8) {
          const int u = u0 + j;
          const __m256 i = _mm256_loadu_ps(a + u), f = _mm256_loadu_ps(a + H + u);
          const __m256 g = _mm256_loadu_ps(a + 2 * H + u), o = _mm256_loadu_ps(a + 3 * H + u);
          const __m256 tc = tanh8(_mm256_loadu_ps(cs + row + u));
          const __m256 h_grad = _mm256_add_ps(_mm256_loadu_ps(dhs + row + u), _mm256_loadu_ps(dhb + j));
          const __m256 c_grad = _mm256_fmadd_ps(_mm256_mul_ps(h_grad, o), _mm256_fnmadd_ps(tc, tc, one),
                                                _mm256_loadu_ps(dcb + j));
          _mm256_storeu_ps(d + u, _mm256_mul_ps(_mm256_mul_ps(c_grad, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i))));
          _mm256_storeu_ps(d + H + u, _mm256_mul_ps(_mm256_mul_ps(c_grad, _mm256_loadu_ps(cp + u)),
                                                    _mm256_mul_ps(f, _mm256_sub_ps(one, f))));
          _mm256_storeu_ps(d + 2 * H + u, _mm256_mul_ps(_mm256_mul_ps(c_grad, i), _mm256_fnmadd_ps(g, g, one)));
          _mm256_storeu_ps(d + 3 * H + u, _mm256_mul_ps(_mm256_mul_ps(h_grad, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o))));
          _mm256_storeu_ps(dcb + j, _mm256_mul_ps(c_grad, f));
        }
        for (; j < nu; ++j) {
          const int u = u0 + j;
          const float i = a[u], f = a[H + u], g = a[2 * H + u], o = a[3 * H + u];
          const float tc = std::tanh(cs[row + u]);
          const float h_grad = dhs[row + u] + dhb[j];
          const float c_grad = dcb[j] + h_grad * o * (1 - tc * tc);
          d[u] = c_grad * g * i * (1 - i);
          d[H + u] = c_grad * cp[u] * f * (1 - f);
          d[2 * H + u] = c_grad * i * (1 - g * g);
          d[3 * H + u] = h_grad * tc * o * (1 - o);
          dcb[j] = c_grad * f;
        }
      }
      barrier.wait();
      if (nu)
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
                        ffi::ResultBuffer<ffi::F32> acts, int32_t reverse, int32_t threads) {
  const auto dx = xs.dimensions(), dh = w_h.dimensions();
  if (dx.size() != 3 || dh.size() != 2 || dh[1] != 4 * dh[0])
    return ffi::Error::InvalidArgument("expected xs [B, T, F] and w_h [H, 4H]");
  const Sizes s{static_cast<int>(dx[1]), static_cast<int>(dx[0]), static_cast<int>(dh[0]),
                static_cast<int>(dx[2])};
  const bool save = acts->element_count() > 0;  // [0]-shaped cs and acts: inference, not saved
  forward(pool, s, reverse != 0, parts_for(threads, s.hidden), xs.typed_data(), w_x.typed_data(),
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
                         int32_t reverse, int32_t threads) {
  const auto d = acts.dimensions();
  if (d.size() != 3 || d[2] % 4) return ffi::Error::InvalidArgument("acts must be [B, T, 4H]");
  const Sizes s{static_cast<int>(d[1]), static_cast<int>(d[0]), static_cast<int>(d[2] / 4), 0};
  backward(pool, s, reverse != 0, parts_for(threads, s.hidden), w_h.typed_data(), c0.typed_data(),
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
                                  .Attr<int32_t>("threads"));

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
                                  .Attr<int32_t>("threads"));
