// moelocal's CPU matrix-vector kernels: int8 activations times int8 / int4 weights, integer dot
// products, one weight layout for every instruction set (see moelocal/quant.py for the layout).
//
// A matrix is a stream of units, one per (group of 16 rows, block of 32 columns):
//   q8: 8 k-quads x 16 rows x 4 bytes (int8), then 16 fp16 scales   = 544 bytes (8.5 bits/weight)
//   q4: 4 chunks  x 16 rows x 4 bytes, then 16 fp16 scales          = 288 bytes (4.5 bits/weight)
//       byte i of row r in chunk j holds columns 4j+i (low nibble) and 16+4j+i (high), codes
//       0..15 standing for (code - 8) * scale
// Activations are quantized per row and block of 32 to int8 with a float scale. Each output is
//   y[m][n] = sum over blocks b (in order) of fma(float(isum_b), w_scale[n][b] * x_scale[m][b], .)
// with isum_b exact in int32, so every ISA path below gives the same bits, and a row's result
// depends neither on the other rows of x nor on the number of threads.
// The paths are picked at run time (compiled with target attributes, never -march=native):
//   2 AVX-512 VNNI (vpdpbusd), 1 AVX2 (vpmaddubsw), 0 portable C++.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOELOCAL_X86 1
#endif

namespace {

constexpr int64_t R = 16;   // rows per group
constexpr int64_t BK = 32;  // columns per block
constexpr int64_t Q8_UNIT = R * BK + 2 * R;
constexpr int64_t Q4_UNIT = R * BK / 2 + 2 * R;

struct Act {  // x quantized: per row, Kp int8 values, and per block a scale and the sum of codes
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
};

// Nearest, ties to even, as nearbyint in the default rounding mode for |v| < 2^22 (here <= 127):
// plain float adds the compiler vectorizes, where nearbyintf is a libm call per element.
inline float round_even(float v) {
  constexpr float magic = 12582912.f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int64_t Kp, Act& a) {
  const int64_t nb = Kp / BK;
  a.q.assign(M * Kp, 0);
  a.d.assign(M * nb, 0.f);
  a.sum.assign(M * nb, 0);
  for (int64_t m = 0; m < M; m++) {
    for (int64_t b = 0; b < nb; b++) {
      float v[BK];
      float amax = 0.f;
      for (int64_t i = 0; i < BK; i++) {
        int64_t k = b * BK + i;
        v[i] = k < K ? static_cast<float>(x[m * K + k]) : 0.f;
        amax = std::max(amax, std::fabs(v[i]));
      }
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int32_t s = 0;
      int8_t* q = &a.q[m * Kp + b * BK];
      for (int64_t i = 0; i < BK; i++) {
        q[i] = static_cast<int8_t>(round_even(v[i] * id));  // ties to even, as torch.round
        s += q[i];
      }
      a.d[m * nb + b] = d;
      a.sum[m * nb + b] = s;
    }
  }
}

struct Job {
  const uint8_t* w;
  const Act* a;
  float* y;  // (M, N) float32
  int64_t M, N, Kp;
};

inline float half_to_float(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(h);
}

// The hardware streamer stops at each 4 KiB page: a unit's lines are asked for 4 KiB ahead, into
// L2. Measured on mixtral-medium/large decode, 2 threads: +6-15% int8, +10-20% int4 over none,
// 2-16 KiB ahead alike; on one thread, into L1 gained less and NTA hints lost 30-60%.
constexpr int64_t PREFETCH_BYTES = 4096;

inline void prefetch_unit(const uint8_t* u, int64_t unit) {
  for (int64_t l = 0; l < unit; l += 64) __builtin_prefetch(u + PREFETCH_BYTES + l, 0, 2);
}

// Row group g's 16 results for row m of x, the padding rows left out.
inline void store_rows(const Job& j, int64_t g, int64_t m, const float* out) {
  for (int64_t r = 0; r < R && g * R + r < j.N; r++) j.y[m * j.N + g * R + r] = out[r];
}

// ---- portable ---------------------------------------------------------------------------------

template <bool Q4>
void gemv_generic(const Job& j, int64_t g0, int64_t g1) {
  const int64_t nb = j.Kp / BK, unit = Q4 ? Q4_UNIT : Q8_UNIT, data = unit - 2 * R;
  for (int64_t g = g0; g < g1; g++) {
    const uint8_t* wg = j.w + g * nb * unit;
    for (int64_t m = 0; m < j.M; m++) {
      const int8_t* xq = &j.a->q[m * j.Kp];
      float acc[R] = {0};
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* u = wg + b * unit;
        prefetch_unit(u, unit);
        const int8_t* xb = xq + b * BK;
        const float dx = j.a->d[m * nb + b];
        for (int64_t r = 0; r < R; r++) {
          int32_t isum = 0;
          if (Q4) {
            for (int64_t c = 0; c < 4; c++)
              for (int64_t i = 0; i < 4; i++) {
                uint8_t byte = u[c * 64 + r * 4 + i];
                isum += ((byte & 15) - 8) * xb[4 * c + i] + ((byte >> 4) - 8) * xb[16 + 4 * c + i];
              }
          } else {
            for (int64_t c = 0; c < 8; c++)
              for (int64_t i = 0; i < 4; i++)
                isum += static_cast<int8_t>(u[c * 64 + r * 4 + i]) * xb[4 * c + i];
          }
          const float dw = half_to_float(u + data + 2 * r);
          acc[r] = std::fma(static_cast<float>(isum), dw * dx, acc[r]);
        }
      }
      store_rows(j, g, m, acc);
    }
  }
}

#ifdef MOELOCAL_X86

// ---- AVX2: vpmaddubsw needs an unsigned operand ---------------------------------------------

template <bool Q4>
__attribute__((target("avx2,fma,f16c"))) void gemv_avx2(const Job& j, int64_t g0, int64_t g1) {
  const int64_t nb = j.Kp / BK, unit = Q4 ? Q4_UNIT : Q8_UNIT, data = unit - 2 * R;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  for (int64_t g = g0; g < g1; g++) {
    const uint8_t* wg = j.w + g * nb * unit;
    for (int64_t m = 0; m < j.M; m++) {
      const int8_t* xq = &j.a->q[m * j.Kp];
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* u = wg + b * unit;
        const int8_t* xb = xq + b * BK;
        prefetch_unit(u, unit);
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
        for (int64_t c = 0; c < (Q4 ? 4 : 8); c++) {
          const __m256i w0 = _mm256_loadu_si256((const __m256i*)(u + c * 64));
          const __m256i w1 = _mm256_loadu_si256((const __m256i*)(u + c * 64 + 32));
          int32_t x4;
          std::memcpy(&x4, xb + 4 * c, 4);
          const __m256i xv = _mm256_set1_epi32(x4);
          __m256i p0, p1;
          if constexpr (Q4) {  // codes 0..15 are the unsigned operand; -8 comes back via sum(x)
            int32_t xh;
            std::memcpy(&xh, xb + 16 + 4 * c, 4);
            const __m256i vh = _mm256_set1_epi32(xh);
            p0 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w0, low), xv),
                                  _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), low), vh));
            p1 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w1, low), xv),
                                  _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), low), vh));
          } else {  // |x| * (w with x's sign): pairs of products stay within int16 (|w|, |x| <= 127)
            const __m256i ax = _mm256_sign_epi8(xv, xv);
            p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv));
            p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv));
          }
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(p0, ones));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(p1, ones));
        }
        if constexpr (Q4) {
          const __m256i corr = _mm256_set1_epi32(8 * j.a->sum[m * nb + b]);
          s0 = _mm256_sub_epi32(s0, corr);
          s1 = _mm256_sub_epi32(s1, corr);
        }
        const __m256 dx = _mm256_set1_ps(j.a->d[m * nb + b]);
        const __m128i* sc = (const __m128i*)(u + data);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(sc)), dx), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(sc + 1)), dx), acc1);
      }
      float out[R];
      _mm256_storeu_ps(out, acc0);
      _mm256_storeu_ps(out + 8, acc1);
      store_rows(j, g, m, out);
    }
  }
}

// ---- AVX-512 VNNI: vpdpbusd, 16 rows x 4 columns per instruction ------------------------------

template <bool Q4>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
void gemv_avx512(const Job& j, int64_t g0, int64_t g1) {
  const int64_t nb = j.Kp / BK, unit = Q4 ? Q4_UNIT : Q8_UNIT, data = unit - 2 * R;
  const __m512i low = _mm512_set1_epi8(15), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = g0; g < g1; g++) {
    const uint8_t* wg = j.w + g * nb * unit;
    for (int64_t m = 0; m < j.M; m++) {
      const int8_t* xq = &j.a->q[m * j.Kp];
      __m512 acc = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; b++) {
        const uint8_t* u = wg + b * unit;
        const int8_t* xb = xq + b * BK;
        prefetch_unit(u, unit);
        // four accumulators: one chain of 8 vpdpbusd (5 cycles each) would bound the speed
        __m512i s[4];
        for (int64_t c = 0; c < 4; c++) s[c] = _mm512_setzero_si512();
        for (int64_t c = 0; c < (Q4 ? 4 : 8); c++) {
          const __m512i w = _mm512_loadu_si512(u + c * 64);
          int32_t x4;
          std::memcpy(&x4, xb + 4 * c, 4);
          if constexpr (Q4) {  // codes 0..15 are the unsigned operand; -8 comes back via sum(x)
            int32_t xh;
            std::memcpy(&xh, xb + 16 + 4 * c, 4);
            const int64_t a = 2 * (c & 1);
            s[a] = _mm512_dpbusd_epi32(s[a], _mm512_and_si512(w, low), _mm512_set1_epi32(x4));
            s[a + 1] = _mm512_dpbusd_epi32(s[a + 1], _mm512_and_si512(_mm512_srli_epi16(w, 4), low), _mm512_set1_epi32(xh));
          } else {  // (w + 128) as the unsigned operand; the 128s come back via sum(x)
            s[c & 3] = _mm512_dpbusd_epi32(s[c & 3], _mm512_xor_si512(w, flip), _mm512_set1_epi32(x4));
          }
        }
        __m512i t = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
        t = _mm512_sub_epi32(t, _mm512_set1_epi32((Q4 ? 8 : 128) * j.a->sum[m * nb + b]));
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(u + data)));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, _mm512_set1_ps(j.a->d[m * nb + b])), acc);
      }
      float out[R];
      _mm512_storeu_ps(out, acc);
      store_rows(j, g, m, out);
    }
  }
}

#endif  // MOELOCAL_X86

using Kernel = void (*)(const Job&, int64_t, int64_t);

Kernel pick(bool q4, int64_t isa) {
#ifdef MOELOCAL_X86
  if (isa >= 2) return q4 ? gemv_avx512<true> : gemv_avx512<false>;
  if (isa == 1) return q4 ? gemv_avx2<true> : gemv_avx2<false>;
#endif
  return q4 ? gemv_generic<true> : gemv_generic<false>;
}

// The best path this CPU runs: 2 AVX-512 VNNI, 1 AVX2 (+FMA, F16C), 0 portable.
int64_t best_isa() {
#ifdef MOELOCAL_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

// x (M, K) float32/bfloat16/float16 @ W.T -> (M, N) in float32; W a q8 (bits 8) or q4 (bits 4)
// stream of Np x Kp (N, K rounded up to 16 and 32).
torch::Tensor gemv_float(const torch::Tensor& x, const torch::Tensor& w, int64_t bits, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "gemv: contiguous 2-D x");
  TORCH_CHECK(bits == 8 || bits == 4, "gemv: bits 8 or 4");
  TORCH_CHECK(isa <= best_isa(), "gemv: this CPU cannot run path ", isa);
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + BK - 1) / BK * BK, G = (N + R - 1) / R;
  const int64_t unit = bits == 4 ? Q4_UNIT : Q8_UNIT;
  TORCH_CHECK(w.numel() == G * (Kp / BK) * unit, "gemv: weights of ", w.numel(), " bytes for N=", N, " K=", K);
  Act a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_rows",
                                  [&] { quantize_rows(x.data_ptr<scalar_t>(), M, K, Kp, a); });
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  Job job{w.data_ptr<uint8_t>(), &a, y.data_ptr<float>(), M, N, Kp};
  const Kernel kernel = pick(bits == 4, isa);
  // at least ~32 KiB of weights per task, so that small matrices stay on one thread
  const int64_t grain = std::max<int64_t>(1, 32768 / ((Kp / BK) * unit));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) { kernel(job, g0, g1); });
  return y;
}

// gemv_float in x's dtype.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, int64_t bits, int64_t N, int64_t isa) {
  return gemv_float(x, w, bits, N, isa).to(x.scalar_type());
}

// One SwiGLU expert on a few rows, in one call (a dozen fewer dispatches from Python per expert):
// down(silu(gate) * up), times the rows' routing weights (M, 1) if given, in x's dtype, with the
// very roundings of ExpertLayout.forward's separate ops, so that both (and prefill) agree.
torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& gate_up, const torch::Tensor& down,
                     int64_t bits, int64_t I, const c10::optional<torch::Tensor>& weight, int64_t isa) {
  const auto gu = gemv(x, gate_up, bits, 2 * I, isa);
  const auto h = at::silu(gu.narrow(1, 0, I)) * gu.narrow(1, I, I);
  auto y = gemv(h, down, bits, x.size(1), isa);
  return weight.has_value() ? (y * *weight).to(x.scalar_type()) : y;
}

// ---- 16 floats at a time ---------------------------------------------------------------------

// A value of 16 float lanes: on AVX-512 one GCC vector (one register), below it two 8-lane halves
// (GCC lowers a 16-lane vector to AVX2 through memory: attention and the int4 fit ran 3-6x
// slower). Operations go lane by lane and sums across lanes run in one fixed tree, so every path
// computes the same bits; the kernels below are written once, for either (template V).
typedef float f16v __attribute__((vector_size(64)));
typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
constexpr int64_t L = 16;  // lanes

struct Halves {
  f8v lo, hi;
};
#define MOELOCAL_HALVES_OP(op)                                                                  \
  inline __attribute__((always_inline)) Halves operator op(Halves a, Halves b) {               \
    return {a.lo op b.lo, a.hi op b.hi};                                                        \
  }                                                                                             \
  inline __attribute__((always_inline)) Halves operator op(Halves a, float b) {                \
    return {a.lo op b, a.hi op b};                                                              \
  }                                                                                             \
  inline __attribute__((always_inline)) Halves& operator op##=(Halves& a, Halves b) { return a = a op b; }
MOELOCAL_HALVES_OP(+)
MOELOCAL_HALVES_OP(-)
MOELOCAL_HALVES_OP(*)
#undef MOELOCAL_HALVES_OP

template <int ISA>
using Vec = std::conditional_t<ISA == 2, f16v, Halves>;

// body.template operator()<ISA>() run on instruction-set path isa (2 AVX-512, 1 AVX2, 0 portable):
// the kernels below are templates on ISA, inlined into a function compiled for that target, so
// GCC vectorizes them for it. The body must be an always_inline lambda: left a function of its
// own, GCC compiled it for the default target (AVX-512 attention 4x slower). The caller has
// checked that this CPU runs isa.
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void on_avx512(const F& body) {
  body.template operator()<2>();
}
template <typename F>
__attribute__((target("avx2,f16c"))) void on_avx2(const F& body) {
  body.template operator()<1>();
}
template <typename F>
void on_path(int64_t isa, const F& body) {
#ifdef MOELOCAL_X86
  if (isa == 2) return on_avx512(body);
  if (isa == 1) return on_avx2(body);
#endif
  body.template operator()<0>();
}

template <typename V>
inline __attribute__((always_inline)) V splat(float x) {
  if constexpr (std::is_same_v<V, f16v>) {
    return f16v{} + x;
  } else {
    return {f8v{} + x, f8v{} + x};
  }
}

inline __attribute__((always_inline)) Halves halves(f16v v) {
  Halves h;
  std::memcpy(&h.lo, &v, sizeof h.lo);
  std::memcpy(&h.hi, reinterpret_cast<const char*>(&v) + sizeof h.lo, sizeof h.hi);
  return h;
}
inline __attribute__((always_inline)) Halves halves(Halves v) { return v; }

// 16 numbers from p as floats; with n < 16, only n of them and zeros after.
template <typename V, typename T>
inline __attribute__((always_inline)) V load(const T* p) {
  V v;  // Halves: lo then hi, as the lanes
  if constexpr (std::is_same_v<T, float> && std::is_same_v<V, f16v>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v.lo, p, sizeof v.lo);
    std::memcpy(&v.hi, p + L / 2, sizeof v.hi);
  } else {
    float f[L];
    for (int64_t i = 0; i < L; i++) f[i] = static_cast<float>(p[i]);
    std::memcpy(&v, f, sizeof v);
  }
  return v;
}

template <typename V, typename T>
inline __attribute__((always_inline)) V load(const T* p, int64_t n) {
  if (n >= L) return load<V>(p);
  T part[L] = {};
  std::copy(p, p + n, part);
  return load<V>(part);
}

template <typename V>
inline __attribute__((always_inline)) void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename V>
inline __attribute__((always_inline)) V vmax(V a, V b) {
  if constexpr (std::is_same_v<V, f16v>) {
    return a > b ? a : b;
  } else {
    return {a.lo > b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi};
  }
}

template <typename V>
inline __attribute__((always_inline)) V vmin(V a, V b) {
  if constexpr (std::is_same_v<V, f16v>) {
    return a < b ? a : b;
  } else {
    return {a.lo < b.lo ? a.lo : b.lo, a.hi < b.hi ? a.hi : b.hi};
  }
}

// The lanes' sum in a fixed tree: lane l + lane l+8, then +4, +2, +1.
template <typename V>
inline __attribute__((always_inline)) float lane_sum(V a) {
  const Halves h = halves(a);
  const f8v b = h.lo + h.hi;
  f4v c0, c1;
  std::memcpy(&c0, &b, sizeof c0);
  std::memcpy(&c1, reinterpret_cast<const char*>(&b) + sizeof c0, sizeof c1);
  const f4v c = c0 + c1;
  return (c[0] + c[2]) + (c[1] + c[3]);
}

// The largest lane (a max in any order is exact).
template <typename V>
inline __attribute__((always_inline)) float lane_max(V a) {
  const Halves h = halves(a);
  const f8v m = h.lo > h.hi ? h.lo : h.hi;
  float top = m[0];
  for (int64_t i = 1; i < 8; i++) top = m[i] > top ? m[i] : top;
  return top;
}

// 2^n for whole numbers n in -126..127, as floats, from their bits.
template <typename V>
inline __attribute__((always_inline)) V pow2(V n) {
  V out;
  if constexpr (std::is_same_v<V, f16v>) {
    const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
    std::memcpy(&out, &bits, sizeof out);
  } else {
    const i8v lo = (__builtin_convertvector(n.lo, i8v) + 127) << 23;
    const i8v hi = (__builtin_convertvector(n.hi, i8v) + 127) << 23;
    std::memcpy(&out.lo, &lo, sizeof lo);
    std::memcpy(&out.hi, &hi, sizeof hi);
  }
  return out;
}

// Whole numbers 0..255 held as floats -> 16 bytes.
template <typename V>
inline __attribute__((always_inline)) void store_bytes(uint8_t* p, V v) {
  if constexpr (std::is_same_v<V, f16v>) {
    const u8x16 b = __builtin_convertvector(__builtin_convertvector(v, i16v), u8x16);
    std::memcpy(p, &b, sizeof b);
  } else {
    const u8x8 lo = __builtin_convertvector(__builtin_convertvector(v.lo, i8v), u8x8);
    const u8x8 hi = __builtin_convertvector(__builtin_convertvector(v.hi, i8v), u8x8);
    std::memcpy(p, &lo, sizeof lo);
    std::memcpy(p + sizeof lo, &hi, sizeof hi);
  }
}

// e^x for x <= 0 in plain float arithmetic (libm's expf is a call per element, and vector
// libraries differ between instruction sets): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor
// polynomial to r^7, times 2^n made from its bits.
template <typename V>
inline __attribute__((always_inline)) V exp_nonpositive(V x) {
  const V magic = splat<V>(12582912.f);  // round_even's
  x = vmax(x, splat<V>(-87.f));
  const V n = (x * 1.44269504f + magic) - magic;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts (Cody-Waite)
  V p = splat<V>(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + splat<V>(c);
  return p * pow2(n);
}

// ---- quantization ------------------------------------------------------------------------------

// quant.py's fit_int4 for one block of 32: Q4_0's start (the largest magnitude at code 0) and the
// other sign's (at code 15), each refined by `steps` least-squares scales, the better kept. The
// same steps as the torch version, on the block's two vectors; its sums run in another order
// (lanes, then lane_sum's tree), so a code may differ.
template <typename V>
struct Codes {  // a block's codes minus 8, as floats
  V lo, hi;
};

template <typename V>
inline __attribute__((always_inline)) V round_codes(V w, float inv) {
  const V magic = splat<V>(12582912.f);  // round_even's
  return vmin(vmax((w * inv + magic) - magic, splat<V>(-8.f)), splat<V>(7.f));
}

template <typename V>
inline __attribute__((always_inline)) Codes<V> codes_for(V w0, V w1, float scale) {
  const float inv = scale != 0.f ? 1.f / scale : 0.f;
  return {round_codes(w0, inv), round_codes(w1, inv)};
}

// NB blocks of 32 (consecutive in w and in codes), each fit from both starts: 2 * NB chains of
// dependent steps (round, sum, divide, round again), interleaved. One chain alone kept the FPU
// waiting on latency; each chain does exactly the operations it did alone, so the same codes.
template <int ISA, int NB>
inline __attribute__((always_inline)) void fit_blocks(const float* w, int64_t steps, uint8_t* codes,
                                                      c10::Half* scale_out) {
  using V = Vec<ISA>;
  constexpr float STARTS[2] = {-8.f, 7.f};
  V w0[NB], w1[NB];
  float scale[NB][2];
  Codes<V> t[NB][2];
#pragma GCC unroll 8
  for (int b = 0; b < NB; b++) {
    const float* wb = w + b * BK;
    w0[b] = load<V>(wb), w1[b] = load<V>(wb + L);
    const float top = lane_max(vmax(vmax(w0[b], w0[b] * -1.f), vmax(w1[b], w1[b] * -1.f)));
    int64_t big = 0;  // the first of the largest magnitude, as the scalar search finds it
    while (big < BK - 1 && !(std::fabs(wb[big]) == top)) big++;  // (NaN weights: none is)
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++) {
      scale[b][k] = wb[big] / STARTS[k];
      t[b][k] = codes_for(w0[b], w1[b], scale[b][k]);
    }
  }
  for (int64_t s = 0; s < steps; s++) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; b++) {
#pragma GCC unroll 2
      for (int k = 0; k < 2; k++) {
        const Codes<V>& c = t[b][k];
        const float tt = lane_sum(c.lo * c.lo + c.hi * c.hi);
        const float tw = lane_sum(c.lo * w0[b] + c.hi * w1[b]);
        if (tt > 0.f) scale[b][k] = tw / tt;
        t[b][k] = codes_for(w0[b], w1[b], scale[b][k]);
      }
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; b++) {
    float best_err = INFINITY;
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++) {
      const c10::Half half(scale[b][k]);
      const float rounded = static_cast<float>(half);
      const Codes<V> c = codes_for(w0[b], w1[b], rounded);
      const V e0 = w0[b] - c.lo * rounded, e1 = w1[b] - c.hi * rounded;
      const float err = lane_sum(e0 * e0 + e1 * e1);
      if (err < best_err) {
        best_err = err;
        store_bytes(codes + b * BK, c.lo + 8.f), store_bytes(codes + b * BK + L, c.hi + 8.f);
        scale_out[b] = half;
      }
    }
  }
}

// A row's block of 32 as float32: zeros past the matrix's edges (the padding of quant.py's layout);
// bf16 widened by a shift (a vector op, where c10's conversion is a call per value).
template <typename T>
inline __attribute__((always_inline)) void block_as_float(const T* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < BK; c++) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const uint32_t bits = c < n ? uint32_t(src[c].x) << 16 : 0;
      std::memcpy(dst + c, &bits, 4);
    } else {
      dst[c] = c < n ? static_cast<float>(src[c]) : 0.f;
    }
  }
}

// quant.py's quantize_int8 for one block: the same float operations, so the same bytes.
inline __attribute__((always_inline)) void int8_block(const float* w, int8_t* codes, c10::Half* scale) {
  float top = 0.f;
  for (int64_t c = 0; c < BK; c++) top = std::max(top, std::fabs(w[c]));
  *scale = c10::Half(top / 127.f);
  const float s = static_cast<float>(*scale), inv = s > 0.f ? 1.f / s : 0.f;
  for (int64_t c = 0; c < BK; c++) codes[c] = int8_t(std::clamp(std::nearbyint(w[c] * inv), -127.f, 127.f));
}

// Unit u (16 rows x 32 columns) of w: each row's block quantized, then stored as quant.py's pack
// lays it out: the rows' bytes in k-quads (quad q: 4 bytes of row 0, of row 1, ...; int4 holds
// columns c and c + 16 in byte c), then the 16 fp16 scales.
template <int ISA, typename T>
inline __attribute__((always_inline)) void quantize_unit(const T* w, int64_t N, int64_t K, int64_t u,
                                                         int64_t bits, int64_t steps, uint8_t* unit) {
  constexpr int NB = ISA == 2 ? 4 : 2;  // blocks fit together (AVX-512 has registers for 4)
  const int64_t nb = (K + BK - 1) / BK, g = u / nb, b = u % nb, row_bytes = BK * bits / 8;
  alignas(64) float blocks[R][BK];
  alignas(64) uint8_t codes[R][BK];
  c10::Half* scales = reinterpret_cast<c10::Half*>(unit + R * row_bytes);
  for (int64_t r = 0; r < R; r++) {
    const int64_t row = g * R + r, n = row < N ? std::min(BK, K - b * BK) : 0;
    block_as_float(w + row * K + b * BK, n, blocks[r]);
  }
  if (bits == 4) {
    for (int64_t r = 0; r < R; r += NB) fit_blocks<ISA, NB>(blocks[r], steps, codes[r], scales + r);
  }
  for (int64_t r = 0; r < R; r++) {
    uint8_t bytes[BK];
    if (bits == 4) {
      for (int64_t c = 0; c < BK / 2; c++) bytes[c] = codes[r][c] | codes[r][c + BK / 2] << 4;
    } else {
      int8_block(blocks[r], reinterpret_cast<int8_t*>(bytes), scales + r);
    }
    for (int64_t q = 0; q < row_bytes / 4; q++) std::memcpy(unit + q * 4 * R + r * 4, bytes + q * 4, 4);
  }
}

// Weights (N, K) float32, bf16 or fp16 -> the int8 or int4 units of quant.py's layout,
// (Np / 16, Kp / 32, unit bytes): fit (or rounded) and packed in one pass, on every thread.
torch::Tensor quantize_units(const torch::Tensor& w, int64_t bits, int64_t steps, int64_t isa) {
  TORCH_CHECK(w.dim() == 2 && (bits == 4 || bits == 8), "quantize_units: an (N, K) matrix, 4 or 8 bits");
  TORCH_CHECK(isa <= best_isa(), "quantize_units: this CPU cannot run path ", isa);
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), groups = (N + R - 1) / R, nb = (K + BK - 1) / BK;
  const int64_t unit = bits == 4 ? Q4_UNIT : Q8_UNIT;
  auto out = torch::empty({groups, nb, unit}, w.options().dtype(torch::kUInt8));
  uint8_t* op = out.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "quantize_units", [&] {
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    at::parallel_for(0, groups * nb, 16, [&](int64_t u0, int64_t u1) {
      on_path(isa, [&]<int ISA>() __attribute__((always_inline)) {
        for (int64_t u = u0; u < u1; u++) quantize_unit<ISA>(wp, N, K, u, bits, steps, op + u * unit);
      });
    });
  });
  return out;
}

// ---- the small ops between the matmuls: one call each instead of 5-8 from Python ---------------

// transformers' RMSNorm: weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), weight in x's
// dtype. The same roundings in the same order; only the mean's sum runs in another order (in
// double, so closer to the exact value).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "rms_norm: weight");
  const auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t D = x.size(-1), rows = x.numel() / D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; r++) {
      double ss = 0;
      for (int64_t i = 0; i < D; i++) {
        const float v = static_cast<float>(xp[r * D + i]);
        ss += static_cast<double>(v * v);
      }
      const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
      for (int64_t i = 0; i < D; i++) {
        const scalar_t n = static_cast<scalar_t>(static_cast<float>(xp[r * D + i]) * inv);
        yp[r * D + i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(n));
      }
    }
  });
  return y;
}

// x * cos + roll(x, d/2) * sin for x (B, H, T, d) of any strides, cos and sin (B, 1, T, d) with
// rotate_half's sign in sin (models/common.py's Rotary): each product rounded to x's dtype, then
// their sum, as the torch ops do, so the same bits. Returns a contiguous (B, H, T, d).
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.dim() == 4, "rope: 4-D tensors");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: dtypes");
  auto y = torch::empty(x.sizes(), x.options());
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), d = x.size(3), half = d / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    const auto xa = x.accessor<scalar_t, 4>();
    const auto ca = cos.accessor<scalar_t, 4>();
    const auto sa = sin.accessor<scalar_t, 4>();
    auto ya = y.accessor<scalar_t, 4>();
    for (int64_t b = 0; b < B; b++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t t = 0; t < T; t++)
          for (int64_t i = 0; i < d; i++) {
            const int64_t j = i < half ? i + half : i - half;  // roll by d/2
            const scalar_t a = static_cast<float>(xa[b][h][t][i]) * static_cast<float>(ca[b][0][t][i]);
            const scalar_t r = static_cast<float>(xa[b][h][t][j]) * static_cast<float>(sa[b][0][t][i]);
            ya[b][h][t][i] = static_cast<float>(a) + static_cast<float>(r);
          }
  });
  return y;
}


// ---- attention with one order of sums per query row --------------------------------------------

// Softmax attention where a query row's result depends only on its own numbers: each score is a
// sum over the head dimension in index order, the softmax's sum runs in L lanes over the row's own
// keys combined in a fixed tree, and its output sums the values in key order; nothing depends on
// how many rows come with it, how long the cache is or which SIMD path runs (no FMA contraction,
// -ffp-contract=off, so every vector width computes the same values). A prompt prefilled at once,
// in pieces, or token by token then gives every row the same bits, where fused attention kernels
// block queries and keys by the call's sizes.
constexpr int64_t TQ = 8;  // query positions per work unit: they share the keys they read

struct AttentionJob {
  int64_t H, KV, T, S, dk, dv, window;
  float scale;
  const float* sinks;  // per head, or null
  int64_t kstride[3], vstride[3];  // of k and v's batch rows, heads and positions (a cache's view)
  int64_t first(int64_t pos) const { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; }
};

// A work unit's rows (see attend_unit) over keys kb and values vb, positions [lo, lo + n) (floats,
// or T as stored), qf their queries; out is the batch row's.
template <typename V, typename T, typename U>
inline __attribute__((always_inline)) void attend_keys(const AttentionJob& j, const V* qf, const U* kb,
                                                       const U* vb, int64_t ks, int64_t vs, T* out, int64_t kvh,
                                                       int64_t t0, int64_t t1, int64_t lo, int64_t n, V* scores,
                                                       V* acc, V* kf) {
  const int64_t G = j.H / j.KV, rows = G * (t1 - t0), dk = j.dk, dv = j.dv;
  const int64_t kd = (dk + L - 1) / L, vd = (dv + L - 1) / L, nv = (n + L - 1) / L, off = j.S - j.T;
  // A score: the lanes' products over the head, then their sum in a fixed tree; 4 keys at a time
  // (independent chains), the last 1-3 with copies of the last key.
  for (int64_t s = 0; s < n; s += 4) {
    for (int64_t e = 0; e < 4; e++) {
      const U* key = kb + std::min(s + e, n - 1) * ks;
      for (int64_t c = 0; c < kd; c++) kf[e * kd + c] = load<V>(key + c * L, dk - c * L);
    }
    for (int64_t r = 0; r < rows; r++) {
      const V* qr = qf + r * kd;
      V a0 = qr[0] * kf[0], a1 = qr[0] * kf[kd], a2 = qr[0] * kf[2 * kd], a3 = qr[0] * kf[3 * kd];
      for (int64_t c = 1; c < kd; c++) {
        a0 += qr[c] * kf[c], a1 += qr[c] * kf[kd + c];
        a2 += qr[c] * kf[2 * kd + c], a3 += qr[c] * kf[3 * kd + c];
      }
      float* sc = reinterpret_cast<float*>(scores + r * nv) + s;  // room up to nv * L >= s + 4
      sc[0] = lane_sum(a0) * j.scale, sc[1] = lane_sum(a1) * j.scale;
      sc[2] = lane_sum(a2) * j.scale, sc[3] = lane_sum(a3) * j.scale;
    }
  }
  for (int64_t r = 0; r < rows; r++) {
    const int64_t t = t0 + r / G, h = kvh * G + r % G, pos = off + t;
    const int64_t first = j.first(pos) - lo, count = pos + 1 - j.first(pos);
    float* sc = reinterpret_cast<float*>(scores + r * nv) + first;  // the row's own keys
    V top = splat<V>(j.sinks ? j.sinks[h] : sc[0]);  // the largest score (any order: exact)
    for (int64_t i = 0; i + L <= count; i += L) top = vmax(load<V>(sc + i), top);
    float mx = lane_max(top);
    for (int64_t i = count / L * L; i < count; i++) mx = sc[i] > mx ? sc[i] : mx;
    V lanes = {};  // the softmax's sum: key first + i in lane i % 16
    for (int64_t i = 0; i < count; i += L) {
      const int64_t m = std::min(L, count - i);
      float e[L];
      store(e, exp_nonpositive(load<V>(sc + i, m) - mx));
      std::fill(e + m, e + L, 0.f);
      std::memcpy(sc + i, e, m * sizeof(float));
      lanes += load<V>(e);
    }
    float total = lane_sum(lanes);
    if (j.sinks) {
      float e[L];
      store(e, exp_nonpositive(splat<V>(j.sinks[h] - mx)));
      total += e[0];
    }
    const U* vr = vb + first * vs;
    int64_t c0 = 0;
    for (; c0 + 4 <= vd && (c0 + 4) * L <= dv; c0 += 4) {  // the values summed in key order
      V a0 = {}, a1 = {}, a2 = {}, a3 = {};  // in registers (acc could alias sc)
      for (int64_t i = 0; i < count; i++) {
        const U* vi = vr + i * vs + c0 * L;
        const V p = splat<V>(sc[i]);
        a0 += p * load<V>(vi);
        a1 += p * load<V>(vi + L);
        a2 += p * load<V>(vi + 2 * L);
        a3 += p * load<V>(vi + 3 * L);
      }
      acc[c0] = a0, acc[c0 + 1] = a1, acc[c0 + 2] = a2, acc[c0 + 3] = a3;
    }
    for (; c0 < vd; c0++) {
      V a = {};
      for (int64_t i = 0; i < count; i++) a += splat<V>(sc[i]) * load<V>(vr + i * vs + c0 * L, dv - c0 * L);
      acc[c0] = a;
    }
    const float inv = 1.f / total;
    T* o = out + (h * j.T + t) * dv;  // out: batch row b's
    for (int64_t c = 0; c < vd; c++) {
      float y[L];
      store(y, acc[c] * inv);
      for (int64_t i = 0; i < std::min(L, dv - c * L); i++) o[c * L + i] = static_cast<T>(y[i]);
    }
  }
}


// One work unit: batch row b, KV head kvh, query positions t0..t1-1 with their G heads each:
// rows = G * (t1 - t0) query rows, row r = (t - t0) * G + g.
template <int ISA, typename T>
inline __attribute__((always_inline)) void attend_unit(const AttentionJob& j, const T* q, const T* k,
                                                       const T* v, T* out, int64_t b, int64_t kvh,
                                                       int64_t t0, int64_t t1, std::vector<float>& buf,
                                                       std::vector<float>& floats) {
  const int64_t G = j.H / j.KV, rows = G * (t1 - t0), dk = j.dk, dv = j.dv;
  const int64_t kd = (dk + L - 1) / L, vd = (dv + L - 1) / L;  // vectors per key, per value
  const int64_t off = j.S - j.T;  // position of query t: off + t
  const int64_t lo = j.first(off + t0), n = off + t1 - lo;  // keys any row sees: [lo, off + t1)
  const int64_t nv = (n + L - 1) / L;
  buf.resize((rows * (kd + nv) + vd + 4 * kd + 1) * L);  // + 1 vector: room to align to 64 bytes
  using V = Vec<ISA>;
  V* qf = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});  // rows x kd
  V* scores = qf + rows * kd;    // rows x nv*L floats: key lo + s at s
  V* acc = scores + rows * nv;   // vd
  V* kf = acc + vd;              // 4 keys
  for (int64_t t = t0; t < t1; t++)
    for (int64_t g = 0; g < G; g++) {
      const T* qr = q + ((b * j.H + kvh * G + g) * j.T + t) * dk;
      for (int64_t c = 0; c < kd; c++) qf[((t - t0) * G + g) * kd + c] = load<V>(qr + c * L, dk - c * L);
    }
  const int64_t ks = j.kstride[2], vs = j.vstride[2];
  const T* kt = k + b * j.kstride[0] + kvh * j.kstride[1] + lo * ks;
  const T* vt = v + b * j.vstride[0] + kvh * j.vstride[1] + lo * vs;
  out += b * j.H * j.T * dv;
  if (std::is_same_v<T, float> || t1 - t0 == 1)
    return attend_keys(j, qf, kt, vt, ks, vs, out, kvh, t0, t1, lo, n, scores, acc, kf);
  floats.resize(n * (dk + dv));  // keys and values as floats, made once for the unit's rows
  float *kf32 = floats.data(), *vf32 = kf32 + n * dk;
  for (int64_t s = 0; s < n; s++) {
    for (int64_t i = 0; i < dk; i++) kf32[s * dk + i] = static_cast<float>(kt[s * ks + i]);
    for (int64_t i = 0; i < dv; i++) vf32[s * dv + i] = static_cast<float>(vt[s * vs + i]);
  }
  attend_keys(j, qf, kf32, vf32, dk, dv, out, kvh, t0, t1, lo, n, scores, acc, kf);
}

template <int ISA, typename T>
inline __attribute__((always_inline)) void attend_rows(const AttentionJob& j, const T* q, const T* k, const T* v, T* out, int64_t u0, int64_t u1) {
  std::vector<float> buf, floats;
  const int64_t blocks = (j.T + TQ - 1) / TQ;
  for (int64_t u = u0; u < u1; u++) {  // u = (b * KV + kvh) * blocks + block: a thread's queries share keys
    const int64_t blk = u % blocks, kvh = u / blocks % j.KV, b = u / blocks / j.KV;
    attend_unit<ISA>(j, q, k, v, out, b, kvh, blk * TQ, std::min(j.T, (blk + 1) * TQ), buf, floats);
  }
}

// q (B, H, T, dk) attending to k (B, KV, S, dk) and v (B, KV, S, dv), H a multiple of KV: the
// queries are the last T of the S positions, each seeing the keys up to its own (and within the
// last `window`, if > 0); scores times `scale`; `sinks` (H,) float32 logits that attend to
// nothing (gpt-oss). -> (B, H, T, dv) in q's dtype.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                        int64_t window, const c10::optional<torch::Tensor>& sinks, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: 4-D tensors");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "attention: dtypes");
  TORCH_CHECK(isa <= best_isa(), "attention: this CPU cannot run path ", isa);
  // keys and values read through their strides (a KV cache's view holds room for more
  // positions), each position's numbers side by side
  const auto qc = q.contiguous();
  const auto kc = k.stride(3) == 1 ? k : k.contiguous(), vc = v.stride(3) == 1 ? v : v.contiguous();
  AttentionJob j{q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), window,
                 static_cast<float>(scale), nullptr, {kc.stride(0), kc.stride(1), kc.stride(2)},
                 {vc.stride(0), vc.stride(1), vc.stride(2)}};
  const int64_t B = q.size(0);
  TORCH_CHECK(j.H % j.KV == 0 && j.S >= j.T && k.size(3) == j.dk && v.size(2) == j.S, "attention: shapes");
  torch::Tensor sink;
  if (sinks.has_value()) {
    sink = sinks->to(torch::kFloat32).contiguous();
    TORCH_CHECK(sink.numel() == j.H, "attention: one sink per head");
    j.sinks = sink.data_ptr<float>();
  }
  auto out = torch::empty({B, j.H, j.T, j.dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention", [&] {
    const scalar_t *qp = qc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t blocks = (j.T + TQ - 1) / TQ, per_unit = j.S * (j.dk + j.dv) * (j.H / j.KV) * std::min(j.T, TQ);
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / per_unit);  // multiply-adds per thread, at least
    at::parallel_for(0, B * j.KV * blocks, grain, [&](int64_t u0, int64_t u1) {
      on_path(isa, [&]<int ISA>() __attribute__((always_inline)) { attend_rows<ISA>(j, qp, kp, vp, op, u0, u1); });
    });
  });
  return out;
}

// x (M, K) @ w (N, K).T -> (M, N), all float32, each output a sum over K in L lanes and then the
// fixed tree, as attention's scores: a row's results depend on nothing but the row (a router's
// logits are then the same for a token prefilled with others and one decoded alone; BLAS picks
// its blocking by the row count). For small N (routers): one pass over w per row.
template <int ISA>
inline __attribute__((always_inline)) void linear_rows_body(const float* x, const float* w, float* y, int64_t N,
                                                            int64_t K, int64_t u0, int64_t u1) {
  using V = Vec<ISA>;
  const int64_t kd = (K + L - 1) / L;
  for (int64_t u = u0; u < u1; u++) {
    const int64_t m = u / N, n = u % N;
    const float *xr = x + m * K, *wr = w + n * K;
    V a = load<V>(xr, K) * load<V>(wr, K);
    for (int64_t c = 1; c < kd; c++) a += load<V>(xr + c * L, K - c * L) * load<V>(wr + c * L, K - c * L);
    y[u] = lane_sum(a);
  }
}

torch::Tensor linear_rows(const torch::Tensor& x, const torch::Tensor& w, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "linear_rows: float32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_rows: shapes");
  TORCH_CHECK(isa <= best_isa(), "linear_rows: this CPU cannot run path ", isa);
  const auto xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M * N, std::max<int64_t>(1, (1 << 16) / (K + 1)), [&](int64_t u0, int64_t u1) {
    on_path(isa, [&]<int ISA>() __attribute__((always_inline)) { linear_rows_body<ISA>(xp, wp, yp, N, K, u0, u1); });
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x @ W.T with W in a q8/q4 stream");
  m.def("swiglu", &swiglu, "one SwiGLU expert over q8/q4 streams");
  m.def("rms_norm", &rms_norm, "transformers' RMSNorm");
  // without the GIL: convert reads the next expert on a thread while this one is quantized
  m.def("quantize_units", &quantize_units, "a matrix into int8/int4 units, fit and packed",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &rope, "rotary embedding, rotate_half layout");
  m.def("attention", &attention, "softmax attention, one order of sums per query row");
  m.def("linear_rows", &linear_rows, "x @ w.T in float32, each row on its own");
  m.def("best_isa", &best_isa, "2 AVX-512 VNNI, 1 AVX2, 0 portable");
}
