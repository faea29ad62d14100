// minaction CPU backend: fused activation + activation-energy epilogues around MKL/oneDNN GEMMs.
//
// Layout (see minaction/backends/__init__.py): G independent models, x [G,M,K], w [G,N,K],
// b [G,N], y/z [G,M,N], e [G]. The un-batched layer is G == 1.
//
//   forward : z = x w^T + b (one BLAS call, bias folded in), then ONE pass over z that applies
//             the activation in place and accumulates e[g] = scale * sum |y|^p.
//   backward: ONE pass computing gz = (gy + ge[g]*scale*d|y|^p/dy) * act'(.) and, in the same
//             pass, the bias gradient (column sums of gz); then the two BLAS products.
//
// SIMD: the elementwise passes are written with ATen's at::vec::Vectorized<F> (F = float or
// double; half/bfloat16 are converted to float per row segment). Its width is fixed at compile
// time by the CPU_CAPABILITY_* macro, so minaction/backends/cpu.py builds this file once per
// instruction set (DEFAULT = plain C++, AVX2 = -mavx2 -mfma, AVX512 = -mavx512f/bw/vl/dq) as
// separate extensions, and loads the one the running CPU supports (never a wider one).
// The tail of a row segment is a partial vector (loadu/store with a count) whose unused lanes
// are masked out of the sums, so every element goes through the same arithmetic.
//
// NaN/Inf follow torch exactly: relu = clamp_min(z, 0) (NaN stays NaN), relu' passes the
// gradient where NOT (y <= 0) (torch's threshold_backward), sign(NaN) = 0 (abs backward), and
// gelu/silu/tanh/sigmoid and their derivatives use torch's own CPU formulas.
//
// Reductions are deterministic: the work is cut into (model, chunk of whole rows) tiles
// whose sizes depend only on the shapes, never on the thread count, and the tile partials
// are summed in a fixed order.
//
// Double backward: the C++ autograd formula of energy_linear, when called with grad mode on
// (backward(create_graph=True)), recomputes the layer from the saved x, w, b with
// differentiable ATen ops and returns autograd.grad of it, so the gradients are themselves
// differentiable (gradient penalties). The normal backward (grad mode off) uses the kernels.
//
// Registered here: implementations only. The schemas of the minaction:: ops are declared once,
// in minaction/backends/library.py, which is imported before this library is loaded.
//   minaction::linear_fwd, linear_bwd, act_fwd, act_bwd  -- CPU: the backend primitives
//   minaction::layer  -- Autograd: the whole layer with a C++ autograd formula (one call per
//                        direction for the eager hot path); CompositeExplicitAutograd: the same
//                        without autograd
//   minaction::epilogue -- the same for activation_energy (the epilogue after a convolution)
// and the plain C symbol minaction_cpu_isa(): the instruction set this build was compiled for.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>  // vec_reduce_all (vec256 pulls it in, vec512 does not)

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#define MINACTION_ISA "AVX512"
#elif defined(CPU_CAPABILITY_AVX2)
#define MINACTION_ISA "AVX2"
#else
#define MINACTION_ISA "DEFAULT"
#endif

namespace {

using at::Tensor;
template <typename F>
using Vec = at::vec::Vectorized<F>;

enum Act : int64_t { IDENTITY = 0, RELU = 1, GELU = 2, SILU = 3, TANH = 4, SIGMOID = 5, GELU_TANH = 6 };

constexpr int64_t kColBlock = 256;  // columns per tile (contiguous run inside a row)
constexpr int64_t kRowChunk = 128;  // rows per tile
constexpr int64_t kFlushElems = 2048;  // elements summed in float vectors before a flush into double

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };
template <typename T>
struct BufLen : std::integral_constant<int64_t, std::is_same_v<T, typename Acc<T>::type> ? 1 : kColBlock> {};

// ---------------------------------------------------------------- activations (torch's CPU formulas)
// exp and erf in float, inline. Vectorized<float>::exp() (and erf(), which uses it) is an
// out-of-line call into Sleef: around each call every live vector register is spilled and
// reloaded, so the fused gelu/silu/sigmoid passes ran 1.05-1.4x torch's own activations. These
// are inlined: exp is Cephes' expf (range reduction by ln 2 split in two parts, a degree-6
// polynomial, ~1 ulp); erf is Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula
// ATen's Vectorized<float>::erf uses. Double keeps Sleef (gradcheck runs in double).
// exp(x - n ln2) for the integer-valued n nearest x log2(e): Cephes' range reduction (ln 2 split in
// two parts) and degree-6 polynomial, shared by exp_f and exp_le0_f, which differ in how they get n
// and build 2^n.
inline Vec<float> exp_reduced_f(const Vec<float>& x, const Vec<float>& n) {
  Vec<float> r = at::vec::fmadd(n, Vec<float>(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec<float>(2.12194440e-4f), r);
  Vec<float> q = at::vec::fmadd(Vec<float>(1.9875691500e-4f), r, Vec<float>(1.3981999507e-3f));
  q = at::vec::fmadd(q, r, Vec<float>(8.3334519073e-3f));
  q = at::vec::fmadd(q, r, Vec<float>(4.1665795894e-2f));
  q = at::vec::fmadd(q, r, Vec<float>(1.6666665459e-1f));
  q = at::vec::fmadd(q, r, Vec<float>(5.0000001201e-1f));
  const Vec<float> er = at::vec::fmadd(q, r * r, r + Vec<float>(1.f));  // exp(r), |r| <= ln2 / 2
  return er;
}

inline Vec<float> exp_f(const Vec<float>& x) {
  // The input is clamped, not blended: below lo the exponent field of 2^(n-1) is 0, so the result
  // is exactly 0 (exp(-87.3) ~ 1.2e-38 is the smallest normal float); above hi the final products
  // overflow to inf. A clamp is one instruction per bound; the blends it replaced cost three
  // each on AVX-512 (compare to mask, mask to vector, vector back to mask): 1.4x torch's sigmoid.
  const Vec<float> hi(89.f), lo(-87.5f);
  const Vec<float> xc = at::vec::clamp(x, lo, hi);
  const Vec<float> n = (xc * Vec<float>(1.44269504088896341f)).round();  // x = n ln2 + r
  const Vec<float> er = exp_reduced_f(xc, n);
  // 2^(n-1) from its exponent bits (n - 1 + 127 is in 0..254 over [lo, hi]; 0 gives +0.0), times 2:
  // at x = hi, er * 2^127 is finite and the last product overflows to inf
  const at::vec::Vectorized<int32_t> bits =
      (at::vec::convert_to_int_of_same_size<float>(n) + at::vec::Vectorized<int32_t>(126))
      << at::vec::Vectorized<int32_t>(23);
  const Vec<float> out = er * at::vec::cast<float>(bits) * Vec<float>(2.f);
  // NaN: the clamp keeps it on AVX2/AVX-512 (maxps/minps return their second, NaN operand) and
  // the rest propagates it; the scalar DEFAULT build's clamp (std::max/min) drops it
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return out;
#else
  return Vec<float>::blendv(out, x, x != x);
#endif
}

// exp(x) for x in [-86.5, 0] (or NaN), as erf needs it: no range clamps, and the rounding of
// x log2(e) to an integer n is the float "magic number" trick: adding 1.5 * 2^23 (+ 127, the
// exponent bias) leaves n + 127 in the low mantissa bits, so 2^n is those bits shifted into the
// exponent field; no round, no float-to-int conversion, no bias add. n + 127 stays in 2..127.
inline Vec<float> exp_le0_f(const Vec<float>& x) {
  const Vec<float> magic(12583039.f);  // 1.5 * 2^23 + 127
  const Vec<float> t = at::vec::fmadd(x, Vec<float>(1.44269504088896341f), magic);
  const Vec<float> n = t - magic;
  const Vec<float> er = exp_reduced_f(x, n);
  const at::vec::Vectorized<int32_t> bits = at::vec::cast<int32_t>(t) << at::vec::Vectorized<int32_t>(23);
  return er * at::vec::cast<float>(bits);
}

// erf(x) = sign(x) (1 - t poly(t) exp(-x^2)), t = 1 / (1 + p|x|). |x| is capped at 9.3: erf rounds
// to 1 there already, and exp(-x^2) keeps to exp_le0_f's range; NaN passes the cap (minps returns
// its second operand, and the DEFAULT build's comparison keeps it). Returns |erf(x)| and the sign
// bit of x separately, so that gelu folds the sign into its own arithmetic.
inline Vec<float> erf_abs_f(const Vec<float>& x, Vec<float>& sign) {
  const Vec<float> one(1.f);
  sign = x & Vec<float>(-0.f);
  const Vec<float> ax = at::vec::clamp_max(x ^ sign, Vec<float>(9.3f));
  const Vec<float> t = one / at::vec::fmadd(Vec<float>(0.3275911f), ax, one);
  Vec<float> r = at::vec::fmadd(Vec<float>(1.061405429f), t, Vec<float>(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec<float>(1.421413741f));
  r = at::vec::fmadd(r, t, Vec<float>(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec<float>(0.254829592f));
  const Vec<float> e = exp_le0_f(ax * (ax ^ Vec<float>(-0.f)));  // exp(-x^2)
  return at::vec::fnmadd(r * t, e, one);  // 1 - r t exp(-x^2)
}

inline Vec<float> erf_f(const Vec<float>& x) {
  Vec<float> sign;
  const Vec<float> a = erf_abs_f(x, sign);
  return a | sign;
}

template <typename F>
inline Vec<F> exp_v(const Vec<F>& x) {
  if constexpr (std::is_same_v<F, float>) return exp_f(x);
  else return x.exp();
}

template <typename F>
inline Vec<F> erf_v(const Vec<F>& x) {
  if constexpr (std::is_same_v<F, float>) return erf_f(x);
  else return x.erf();
}

#if defined(CPU_CAPABILITY_AVX512)
// Phi(-x), the normal CDF at -x, on x in [(i - 1/2)/2, (i + 1/2)/2] for i = 0..15 (0 <= x < 7.75), as
// sum_j kPhiTab[j][i] u^j with u = 2x - i in [-1/2, 1/2]: degree-5 least-squares fits at Chebyshev
// nodes (float64, scipy.special.ndtr), rounded to float; |error| <= 5.3e-8 in float evaluation, under
// 1 ulp of 0.5. One vpermps per coefficient picks a lane's interval: 22 vector ops per 16 values, no
// division, no exp, against ~32 for the erf formula below. On a full-width AVX-512 core (Zen 5), where
// torch's gelu is oneDNN's JIT kernel (~200 us on 1 M floats), the erf formula's pass took 260-273 us
// and this one takes 120-124 us (bench/RESULTS.md, session 27). Written by csrc/tools/phi_table.py.
alignas(64) constexpr float kPhiTab[6][16] = {
  {0x1.0000000000000p-1f, 0x1.3bf1460000000p-2f, 0x1.44ed0e0000000p-3f, 0x1.11a46c0000000p-4f, 0x1.74bcee0000000p-6f, 0x1.96f4d40000000p-8f, 0x1.61de2e0000000p-10f, 0x1.e7dc860000000p-13f, 0x1.09aed60000000p-15f, 0x1.c80d140000000p-19f, 0x1.33d2d80000000p-22f, 0x1.464eee0000000p-26f, 0x1.0f4c080000000p-30f, 0x1.617cd40000000p-35f, 0x1.68a1580000000p-40f, 0x1.1fe8460000000p-45f},
  {-0x1.9884520000000p-3f, -0x1.6883d00000000p-3f, -0x1.ef8e5c0000000p-4f, -0x1.0940880000000p-4f, -0x1.ba4b420000000p-6f, -0x1.1f2efe0000000p-7f, -0x1.22720a0000000p-9f, -0x1.c989900000000p-12f, -0x1.18a9ec0000000p-14f, -0x1.0c2ac40000000p-17f, -0x1.8f1aa40000000p-21f, -0x1.ce989e0000000p-25f, -0x1.a198fe0000000p-29f, -0x1.259a6e0000000p-33f, -0x1.418cfe0000000p-38f, -0x1.12499a0000000p-43f},
  {-0x1.b000000000000p-51f, 0x1.687cd00000000p-6f, 0x1.ef89ba0000000p-6f, 0x1.8de2420000000p-6f, 0x1.ba516e0000000p-7f, 0x1.66ff880000000p-8f, 0x1.b3a7300000000p-10f, 0x1.903dd20000000p-12f, 0x1.1878a80000000p-14f, 0x1.2d448a0000000p-17f, 0x1.f1a5680000000p-21f, 0x1.3cc0440000000p-24f, 0x1.3740c60000000p-28f, 0x1.d8be240000000p-33f, 0x1.15b27c0000000p-37f, 0x1.f908400000000p-43f},
  {0x1.1054020000000p-7f, 0x1.68817c0000000p-8f, 0x1.5c19220000000p-22f, -0x1.ba0e3e0000000p-9f, -0x1.ba4ce60000000p-9f, -0x1.f699c40000000p-10f, -0x1.8347a60000000p-11f, -0x1.acec220000000p-13f, -0x1.5ebc9a0000000p-15f, -0x1.ade60a0000000p-18f, -0x1.8e95300000000p-21f, -0x1.1941c40000000p-24f, -0x1.2f65760000000p-28f, -0x1.f5ddd80000000p-33f, -0x1.3efe3c0000000p-37f, -0x1.382f6a0000000p-42f},
  {0x1.3480000000000p-48f, -0x1.45cb100000000p-10f, -0x1.4749720000000p-10f, -0x1.91d7560000000p-12f, 0x1.1e9f040000000p-12f, 0x1.81ba400000000p-12f, 0x1.b4fdb20000000p-13f, 0x1.3904c40000000p-14f, 0x1.3831080000000p-16f, 0x1.c354700000000p-19f, 0x1.e30c4e0000000p-22f, 0x1.83af8a0000000p-25f, 0x1.d699d40000000p-29f, 0x1.b28af40000000p-33f, 0x1.3289080000000p-37f, 0x1.4b75840000000p-42f},
  {-0x1.4297580000000p-12f, -0x1.2a18d00000000p-13f, 0x1.02d73c0000000p-13f, 0x1.7ca1d40000000p-13f, 0x1.2882740000000p-14f, -0x1.4e6c5e0000000p-16f, -0x1.2002ca0000000p-15f, -0x1.308e620000000p-16f, -0x1.8312860000000p-18f, -0x1.4eb0e00000000p-20f, -0x1.9d8a4c0000000p-23f, -0x1.7670440000000p-26f, -0x1.f87a020000000p-30f, -0x1.feb7ec0000000p-34f, -0x1.8736340000000p-38f, -0x1.c7c9280000000p-43f},
};

// Phi(z) = 1 - Phi(-|z|) for z > 0, else Phi(-|z|); 0 for |z| >= 7.75 (Phi(-7.75) < 5e-15) and for NaN
inline Vec<float> phi_tab_f(const Vec<float>& z) {
  const __m512 x = z;
  const __m512 ax = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  const __m512 magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: t's low mantissa bits hold round(2|z|)
  const __m512 t = _mm512_fmadd_ps(ax, _mm512_set1_ps(2.f), magic);
  const __m512 u = _mm512_fmsub_ps(ax, _mm512_set1_ps(2.f), _mm512_sub_ps(t, magic));  // 2|z| - i
  const __m512i idx = _mm512_castps_si512(t);  // vpermps reads its low 4 bits: i (garbage past 7.75, masked)
  __m512 q = _mm512_permutexvar_ps(idx, _mm512_load_ps(kPhiTab[5]));
  for (int j = 4; j >= 0; --j) q = _mm512_fmadd_ps(q, u, _mm512_permutexvar_ps(idx, _mm512_load_ps(kPhiTab[j])));
  q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(7.75f), _CMP_LT_OQ), q);
  return _mm512_mask_sub_ps(q, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(1.f), q);
}
#endif

// Phi(z) = (1 + erf(z/sqrt 2)) / 2, the normal CDF
template <typename F>
inline Vec<F> phi_v(const Vec<F>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<F, float>) return phi_tab_f(z);
#endif
  return Vec<F>(F(0.5)) * (Vec<F>(F(1)) + erf_v<F>(z * Vec<F>(F(M_SQRT1_2))));
}

// gelu(z) = z Phi(z): on AVX-512 z times the tabulated Phi (NaN and -inf give NaN, +inf gives inf, as
// the formula); elsewhere z/2 (1 + erf(z/sqrt 2)), as one fused multiply-add after erf
template <typename F>
inline Vec<F> gelu_v(const Vec<F>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<F, float>) return z * phi_tab_f(z);
#endif
  const Vec<F> hz = z * Vec<F>(F(0.5));
  if constexpr (std::is_same_v<F, float>) {
    Vec<float> sign;
    const Vec<float> a = erf_abs_f(z * Vec<float>(float(M_SQRT1_2)), sign);
    return at::vec::fmadd(hz, a | sign, hz);
  } else {
    return at::vec::fmadd(hz, (z * Vec<F>(F(M_SQRT1_2))).erf(), hz);
  }
}


// gelu's tanh approximation, torch's gelu(z, approximate="tanh") = z/2 (1 + tanh(u)) with
// u = sqrt(2/pi) (z + 0.044715 z^3), written as z * sigmoid(2u) = z / (1 + exp(-2u)): the same
// function without the cancellation of 1 + tanh(u) for negative u, and with the inline exp.
// NaN and +-inf as torch: gelu_tanh(-inf) = -inf / inf = nan, gelu_tanh(inf) = inf.
constexpr double kGeluTanhK2 = 2.0 * 0.79788456080286535588;  // 2 sqrt(2/pi)
constexpr double kGeluTanhC = 0.044715;

template <typename F>
inline Vec<F> gelu_tanh_sig_v(const Vec<F>& z) {  // sigmoid(2u)
  const Vec<F> z2 = z * z;
  const Vec<F> inner = at::vec::fmadd(z2, Vec<F>(F(kGeluTanhC)), Vec<F>(F(1))) * z;  // z + c z^3
  return (Vec<F>(F(1)) + exp_v<F>(inner * Vec<F>(F(-kGeluTanhK2)))).reciprocal();
}

template <int ACT, typename F>
inline Vec<F> act_v(const Vec<F>& z) {
  const Vec<F> one(F(1));
  if constexpr (ACT == IDENTITY) return z;
  if constexpr (ACT == RELU) return at::vec::clamp_min(z, Vec<F>(F(0)));  // NaN -> NaN, as torch.relu
  if constexpr (ACT == GELU) return gelu_v<F>(z);
  if constexpr (ACT == SILU) return z / (one + exp_v<F>(z.neg()));
  if constexpr (ACT == TANH) return z.tanh();
  if constexpr (ACT == SIGMOID) return (one + exp_v<F>(z.neg())).reciprocal();
  if constexpr (ACT == GELU_TANH) return z * gelu_tanh_sig_v<F>(z);
}

// g * act'(.), from the output y (and z for gelu/silu)
template <int ACT, typename F>
inline Vec<F> dact_mul_v(const Vec<F>& g, const Vec<F>& y, const Vec<F>& z) {
  const Vec<F> one(F(1));
  if constexpr (ACT == IDENTITY) return g;
  if constexpr (ACT == RELU) return Vec<F>::blendv(g, Vec<F>(F(0)), y <= Vec<F>(F(0)));  // threshold_backward
  if constexpr (ACT == GELU) {
    const Vec<F> cdf = phi_v<F>(z);
    const Vec<F> pdf = Vec<F>(F(M_2_SQRTPI * M_SQRT1_2 * 0.5)) * exp_v<F>(z * z * Vec<F>(F(-0.5)));
    return g * (cdf + z * pdf);
  }
  if constexpr (ACT == SILU) {
    const Vec<F> s = (one + exp_v<F>(z.neg())).reciprocal();
    return g * s * (one + z * (one - s));
  }
  if constexpr (ACT == TANH) return g * (one - y * y);
  if constexpr (ACT == SIGMOID) return g * (one - y) * y;
  if constexpr (ACT == GELU_TANH) {
    // d/dz z s(v) = s + z s (1 - s) v',  v = 2u,  v' = 2 sqrt(2/pi) (1 + 3c z^2)
    const Vec<F> sg = gelu_tanh_sig_v<F>(z);
    const Vec<F> dv = at::vec::fmadd(z * z, Vec<F>(F(3 * kGeluTanhC * kGeluTanhK2)), Vec<F>(F(kGeluTanhK2)));
    return g * at::vec::fmadd(z * sg * (one - sg), dv, sg);
  }
}

template <int P, typename F>
inline Vec<F> pow_p_v(const Vec<F>& y) {  // |y|^p, no pow()
  if constexpr (P == 2) return y * y;
  if constexpr (P == 1) return y.abs();
  return Vec<F>(F(0));
}

// gy + c * d|y|^p/dy  (c = ge*scale; for p = 2 the caller passes 2c). sign(NaN) = 0 as torch's abs backward
template <int P, typename F>
inline Vec<F> add_energy_grad_v(const Vec<F>& gy, const Vec<F>& y, const Vec<F>& c) {
  if constexpr (P == 2) return at::vec::fmadd(c, y, gy);
  if constexpr (P == 1) {
    const Vec<F> zero(F(0));
    const Vec<F> sgn = Vec<F>::blendv(zero, Vec<F>(F(1)), y > zero) - Vec<F>::blendv(zero, Vec<F>(F(1)), y < zero);
    return at::vec::fmadd(c, sgn, gy);
  }
  return gy;
}

template <typename F>
inline double hsum(const Vec<F>& v) {
  // fixed-order horizontal sum by in-register shuffles (deterministic). It runs once per row
  // segment (<= kColBlock columns): a scalar store-and-add chain here was a serial ~30-cycle
  // tail per 32 vectors, a large share of the relu+l2 pass
  return static_cast<double>(at::vec::vec_reduce_all<F>(std::plus<Vec<F>>(), v));
}

// ---------------------------------------------------------------- one row segment, compute type F
// Four independent vector accumulators: one accumulator made the pass latency-bound on the
// add chain (relu+l2 was 1.25x torch.relu alone on AVX2); the four are summed in a fixed order.
template <typename F>
struct Acc4 {
  Vec<F> a0{F(0)}, a1{F(0)}, a2{F(0)}, a3{F(0)};
  double flush() {  // horizontal sum (fixed order), then reset
    const double s = hsum((a0 + a1) + (a2 + a3));
    a0 = a1 = a2 = a3 = Vec<F>(F(0));
    return s;
  }
};

template <int P, typename F>
inline void acc_p(Vec<F>& a, const Vec<F>& v) {
  if constexpr (P == 2) a = at::vec::fmadd(v, v, a);
  if constexpr (P == 1) a = a + v.abs();
}

#if defined(CPU_CAPABILITY_AVX512)
// relu and identity in float are memory-bound: on the AVX-512 build their pass runs in 256-bit
// vectors (AVX-512VL masks for the tail). Measured on an AMD EPYC (Zen 4), idle, 1 thread, against
// torch's relu on [1, 2048, 512]: the 512-bit loop ran 1.08-1.12x, the same loop at 256 bits (the
// AVX2 build's) 1.04-1.08x. Same NaN rules as act_v: max(0, NaN) is NaN (maxps returns its second
// operand), and the sums are deterministic (fixed order, 4 accumulators).
template <int ACT, int P>
inline void seg_fwd_acc_ymm(const float* z, float* y, int64_t n, Acc4<float>& acc) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  auto act = [&](__m256 v) {
    if constexpr (ACT == RELU) return _mm256_max_ps(zero, v);
    else return v;
  };
  auto add = [&](__m256& a, __m256 v) {
    if constexpr (P == 2) a = _mm256_fmadd_ps(v, v, a);
    if constexpr (P == 1) a = _mm256_add_ps(a, _mm256_and_ps(v, absmask));
  };
  __m256 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256 v0 = act(_mm256_loadu_ps(z + j));
    const __m256 v1 = act(_mm256_loadu_ps(z + j + 8));
    const __m256 v2 = act(_mm256_loadu_ps(z + j + 16));
    const __m256 v3 = act(_mm256_loadu_ps(z + j + 24));
    _mm256_storeu_ps(y + j, v0);
    _mm256_storeu_ps(y + j + 8, v1);
    _mm256_storeu_ps(y + j + 16, v2);
    _mm256_storeu_ps(y + j + 24, v3);
    add(a0, v0);
    add(a1, v1);
    add(a2, v2);
    add(a3, v3);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 v = act(_mm256_loadu_ps(z + j));
    _mm256_storeu_ps(y + j, v);
    add(a0, v);
  }
  if (j < n) {  // masked-off lanes load as 0, and act(0) = 0 adds nothing
    const __mmask8 m = static_cast<__mmask8>((1u << (n - j)) - 1u);
    const __m256 v = act(_mm256_maskz_loadu_ps(m, z + j));
    _mm256_mask_storeu_ps(y + j, m, v);
    add(a1, v);
  }
  if constexpr (P != 0) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    acc.a0 = acc.a0 + Vec<float>(_mm512_zextps256_ps512(s));
  }
}
#endif

// y[0:n] = act(z[0:n]), and |y|^p added into acc (y as stored, i.e. after rounding when T != F
// is handled by the caller)
template <typename F, int ACT, int P>
inline void seg_fwd_acc(const F* z, F* y, int64_t n, Acc4<F>& acc) {
  constexpr int64_t W = Vec<F>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<F, float> && (ACT == RELU || ACT == IDENTITY)) {
    seg_fwd_acc_ymm<ACT, P>(z, y, n, acc);
    return;
  }
#endif
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    const Vec<F> v0 = act_v<ACT, F>(Vec<F>::loadu(z + j));
    const Vec<F> v1 = act_v<ACT, F>(Vec<F>::loadu(z + j + W));
    const Vec<F> v2 = act_v<ACT, F>(Vec<F>::loadu(z + j + 2 * W));
    const Vec<F> v3 = act_v<ACT, F>(Vec<F>::loadu(z + j + 3 * W));
    v0.store(y + j);
    v1.store(y + j + W);
    v2.store(y + j + 2 * W);
    v3.store(y + j + 3 * W);
    acc_p<P>(acc.a0, v0);
    acc_p<P>(acc.a1, v1);
    acc_p<P>(acc.a2, v2);
    acc_p<P>(acc.a3, v3);
  }
  for (; j + W <= n; j += W) {
    const Vec<F> v = act_v<ACT, F>(Vec<F>::loadu(z + j));
    v.store(y + j);
    acc_p<P>(acc.a0, v);
  }
  if (j < n) {
    const int64_t r = n - j;
    const Vec<F> v = act_v<ACT, F>(Vec<F>::loadu(z + j, r));
    v.store(y + j, static_cast<int>(r));
    if constexpr (P != 0) acc_p<P>(acc.a1, Vec<F>::set(Vec<F>(F(0)), v, r));
  }
}

// y[0:n] = act(z[0:n]); returns sum |y|^p
template <typename F, int ACT, int P>
inline double seg_fwd(const F* z, F* y, int64_t n) {
  Acc4<F> acc;
  seg_fwd_acc<F, ACT, P>(z, y, n, acc);
  return P != 0 ? acc.flush() : 0.0;
}

template <typename F, int P>
inline double seg_energy(const F* y, int64_t n) {
  constexpr int64_t W = Vec<F>::size();
  Vec<F> acc(F(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = acc + pow_p_v<P, F>(Vec<F>::loadu(y + j));
  if (j < n) acc = acc + Vec<F>::set(Vec<F>(F(0)), pow_p_v<P, F>(Vec<F>::loadu(y + j, n - j)), n - j);
  return hsum(acc);
}

// gz[0:n] = (gy + c*d|y|^p/dy) * act'(.); colacc[0:n] += gz when colacc != nullptr
template <typename F, int ACT, int P>
inline void seg_bwd(const F* gy, const F* y, const F* z, F* gz, F* colacc, int64_t n, F c) {
  constexpr int64_t W = Vec<F>::size();
  const Vec<F> cv(P == 2 ? F(2) * c : c);
  auto one = [&](int64_t j, int64_t cnt) {
    const bool full = cnt == W;
    const Vec<F> yv = full ? Vec<F>::loadu(y + j) : Vec<F>::loadu(y + j, cnt);
    const Vec<F> gv = full ? Vec<F>::loadu(gy + j) : Vec<F>::loadu(gy + j, cnt);
    const Vec<F> zv = z ? (full ? Vec<F>::loadu(z + j) : Vec<F>::loadu(z + j, cnt)) : yv;
    const Vec<F> out = dact_mul_v<ACT, F>(add_energy_grad_v<P, F>(gv, yv, cv), yv, zv);
    if (full) out.store(gz + j);
    else out.store(gz + j, static_cast<int>(cnt));
    if (colacc) {
      const Vec<F> s = (full ? Vec<F>::loadu(colacc + j) : Vec<F>::loadu(colacc + j, cnt)) + out;
      if (full) s.store(colacc + j);
      else s.store(colacc + j, static_cast<int>(cnt));
    }
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) one(j, W);
  if (j < n) one(j, n - j);
}

// Tiles are (model, chunk of whole rows): a tile never splits a row, since half-row segments
// with a row stride made the pass ~10x slower than streaming whole rows (measured on AVX2).
constexpr int64_t kTileElems = kColBlock * kRowChunk;
constexpr int64_t kMinTileRows = 16;

struct Tiles {
  int64_t G, M, N, rows, nrc;
  Tiles(int64_t G_, int64_t M_, int64_t N_)
      : G(G_), M(M_), N(N_),
        rows(std::max<int64_t>(kMinTileRows, (kTileElems + std::max<int64_t>(N_, 1) - 1) / std::max<int64_t>(N_, 1))),
        nrc(std::max<int64_t>(1, (M_ + rows - 1) / rows)) {}
  int64_t count() const { return G * nrc; }
  // tile t -> (model, first/last+1 row); tiles are ordered model, row chunk
  std::tuple<int64_t, int64_t, int64_t> tile(int64_t t) const {
    const int64_t g = t / nrc, rc = t % nrc;
    const int64_t r0 = rc * rows;
    return {g, r0, std::min(M, r0 + rows)};
  }
  // tiles per parallel chunk: about at::internal::GRAIN_SIZE elements, so small layers stay on one thread
  int64_t grain() const { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, rows * N)); }
};

// y = act(z) (in place when y == z) and e[g] = scale * sum |y|^p
template <typename T, int ACT, int P>
void act_energy_fwd_kernel(const T* z, T* y, int64_t G, int64_t M, int64_t N, double scale, void* e_out, bool e_double) {
  using F = typename Acc<T>::type;
  constexpr bool same = std::is_same_v<T, F>;
  Tiles tl(G, M, N);
  std::vector<double> part(tl.count(), 0.0);
  at::parallel_for(0, tl.count(), tl.grain(), [&](int64_t begin, int64_t end) {
    std::array<F, BufLen<T>::value> zb, yb;  // conversion buffers (half/bfloat16 only)
    for (int64_t t = begin; t < end; ++t) {
      const auto [g, r0, r1] = tl.tile(t);
      double acc_tile = 0.0;
      if constexpr (same) {
        // the tile's rows are one contiguous run: streamed in pieces of kFlushElems elements
        // (not row by row: per-row loop overhead cost ~5% at 512 columns), the float/double
        // vector sums flushed into the double tile sum after each piece (each lane then adds a
        // few dozen terms at most)
        Acc4<F> acc;
        const int64_t begin_off = (g * M + r0) * N, total = (r1 - r0) * N;
        for (int64_t o = 0; o < total; o += kFlushElems) {
          const int64_t n = std::min(kFlushElems, total - o);
          seg_fwd_acc<F, ACT, P>(z + begin_off + o, y + begin_off + o, n, acc);
          if constexpr (P != 0) acc_tile += acc.flush();
        }
        part[t] = acc_tile;
        continue;
      }
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j0 = 0; j0 < N; j0 += kColBlock) {  // row segments of <= kColBlock columns
          const int64_t n = std::min(kColBlock, N - j0);
          const int64_t off = (g * M + r) * N + j0;
          if constexpr (!same) {  // half/bfloat16: compute in float, energy of the rounded output (as the reference)
            at::vec::convert(z + off, zb.data(), n);
            seg_fwd<F, ACT, 0>(zb.data(), yb.data(), n);
            at::vec::convert(yb.data(), y + off, n);
            if constexpr (P != 0) {
              at::vec::convert(y + off, yb.data(), n);
              acc_tile += seg_energy<F, P>(yb.data(), n);
            }
          }
        }
      }
      part[t] = acc_tile;
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t t = g * tl.nrc; t < (g + 1) * tl.nrc; ++t) s += part[t];
    s *= scale;
    if (e_double) static_cast<double*>(e_out)[g] = s;
    else static_cast<float*>(e_out)[g] = static_cast<float>(s);
  }
}

// gz = (gy + ge[g]*scale*d|y|^p/dy) * act'(.), and gb[g, j] = sum_r gz[g, r, j] when gb != nullptr
template <typename T, int ACT, int P>
void act_energy_bwd_kernel(const T* gy, const float* ge_f, const double* ge_d, const T* y, const T* z, T* gz, T* gb,
                           int64_t G, int64_t M, int64_t N, double scale) {
  using F = typename Acc<T>::type;
  constexpr bool same = std::is_same_v<T, F>;
  Tiles tl(G, M, N);
  const bool want_b = gb != nullptr;
  std::vector<F> part(want_b ? tl.count() * N : 0, F(0));  // per-tile column sums, reduced in a fixed order
  at::parallel_for(0, tl.count(), tl.grain(), [&](int64_t begin, int64_t end) {
    std::array<F, BufLen<T>::value> gyb, yb, zb, gzb;  // conversion buffers (half/bfloat16 only)
    for (int64_t t = begin; t < end; ++t) {
      const auto [g, r0, r1] = tl.tile(t);
      const F c = P == 0 ? F(0) : static_cast<F>((ge_d ? ge_d[g] : static_cast<double>(ge_f[g])) * scale);
      F* colacc = want_b ? part.data() + t * N : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j0 = 0; j0 < N; j0 += kColBlock) {
          const int64_t n = std::min(kColBlock, N - j0);
          const int64_t off = (g * M + r) * N + j0;
          if constexpr (same) {
            seg_bwd<F, ACT, P>(gy + off, y + off, z ? z + off : nullptr, gz + off, want_b ? colacc + j0 : nullptr, n, c);
          } else {
            at::vec::convert(gy + off, gyb.data(), n);
            at::vec::convert(y + off, yb.data(), n);
            if (z) at::vec::convert(z + off, zb.data(), n);
            seg_bwd<F, ACT, P>(gyb.data(), yb.data(), z ? zb.data() : nullptr, gzb.data(), nullptr, n, c);
            at::vec::convert(gzb.data(), gz + off, n);
            if (want_b) {  // bias gradient from the rounded gz, as the reference sums it
              at::vec::convert(gz + off, gzb.data(), n);
              for (int64_t j = 0; j < n; ++j) colacc[j0 + j] += gzb[j];
            }
          }
        }
      }
    }
  });
  if (want_b) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < N; ++j) {
        F s = F(0);
        for (int64_t rc = 0; rc < tl.nrc; ++rc) s += part[(g * tl.nrc + rc) * N + j];
        gb[g * N + j] = static_cast<T>(s);
      }
  }
}

template <typename F>
void dispatch_act_p(int64_t act, int64_t p, F&& f) {
#define MA_CASE_P(A)                                                                   \
  switch (p) {                                                                         \
    case 0: f(std::integral_constant<int, A>(), std::integral_constant<int, 0>()); break; \
    case 1: f(std::integral_constant<int, A>(), std::integral_constant<int, 1>()); break; \
    case 2: f(std::integral_constant<int, A>(), std::integral_constant<int, 2>()); break; \
    default: TORCH_CHECK(false, "minaction: energy exponent p must be 0, 1 or 2, got ", p); \
  }
  switch (act) {
    case IDENTITY: MA_CASE_P(IDENTITY) break;
    case RELU: MA_CASE_P(RELU) break;
    case GELU: MA_CASE_P(GELU) break;
    case SILU: MA_CASE_P(SILU) break;
    case TANH: MA_CASE_P(TANH) break;
    case SIGMOID: MA_CASE_P(SIGMOID) break;
    case GELU_TANH: MA_CASE_P(GELU_TANH) break;
    default: TORCH_CHECK(false, "minaction: unknown activation code ", act);
  }
#undef MA_CASE_P
}

at::ScalarType energy_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// the linear primitives also take the plain layer (G omitted: x [M,K], w [N,K], b [N], y/z [M,N],
// e 0-dim), which minaction::layer passes as is: no unsqueeze/select/squeeze views per call
void check23(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "minaction: ", name, " must be [rows, cols] or [G, rows, cols], got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "minaction: ", name, " must be a CPU tensor, got ", t.device());
}

void check3(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, "minaction: ", name, " must be 3-D [G, rows, cols], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "minaction: ", name, " must be a CPU tensor, got ", t.device());
}

// y = act(z) [+ energy]; writes into y (which may be z itself)
Tensor epilogue_fwd(const Tensor& z, Tensor& y, int64_t act, int64_t p, double scale) {
  const bool plain = z.dim() == 2;
  const int64_t G = plain ? 1 : z.size(0), M = z.size(-2), N = z.size(-1);
  Tensor e = plain ? at::empty({}, z.options().dtype(energy_dtype(z.scalar_type())))
                   : at::empty({G}, z.options().dtype(energy_dtype(z.scalar_type())));
  const bool e_double = e.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "minaction_act_fwd", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    void* ep = e.data_ptr();
    dispatch_act_p(act, p, [&](auto A, auto P) {
      act_energy_fwd_kernel<scalar_t, decltype(A)::value, decltype(P)::value>(zp, yp, G, M, N, scale, ep, e_double);
    });
  });
  return e;
}

std::tuple<Tensor, Tensor> epilogue_bwd(const Tensor& gy_in, const Tensor& ge_in, const Tensor& y, const Tensor& z,
                                        int64_t act, int64_t p, double scale, bool need_b) {
  const bool plain = y.dim() == 2;
  const int64_t G = plain ? 1 : y.size(0), M = y.size(-2), N = y.size(-1);
  Tensor gy = gy_in.contiguous();
  Tensor ge = ge_in.to(energy_dtype(y.scalar_type())).contiguous();
  TORCH_CHECK(gy.sizes() == y.sizes(), "minaction: grad_y has shape ", gy.sizes(), ", expected ", y.sizes());
  TORCH_CHECK(ge.numel() == G, "minaction: grad_energy must have ", G, " elements, got ", ge.numel());
  Tensor gz = at::empty_like(y);
  Tensor gb = need_b ? (plain ? at::empty({N}, y.options()) : at::empty({G, N}, y.options()))
                     : at::empty({0}, y.options());
  const bool has_z = z.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "minaction_act_bwd", [&] {
    const float* gef = ge.scalar_type() == at::kFloat ? ge.const_data_ptr<float>() : nullptr;
    const double* ged = ge.scalar_type() == at::kDouble ? ge.const_data_ptr<double>() : nullptr;
    const scalar_t* zp = has_z ? z.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gbp = need_b ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_act_p(act, p, [&](auto A, auto P) {
      act_energy_bwd_kernel<scalar_t, decltype(A)::value, decltype(P)::value>(
          gy.const_data_ptr<scalar_t>(), gef, ged, y.const_data_ptr<scalar_t>(), zp, gz.mutable_data_ptr<scalar_t>(),
          gbp, G, M, N, scale);
    });
  });
  return {gz, gb};
}

bool needs_z(int64_t act) { return act == GELU || act == SILU || act == GELU_TANH; }

// ------------------------------------------------------------------ primitives (CPU kernels)
std::tuple<Tensor, Tensor, Tensor> act_fwd(const Tensor& z_in, int64_t act, int64_t p, double scale, bool keep_z) {
  check3(z_in, "z");
  Tensor z = z_in.contiguous();
  Tensor y = at::empty_like(z);
  Tensor e = epilogue_fwd(z, y, act, p, scale);
  return {y, keep_z ? z.clone() : at::empty({0}, z.options()), e};
}

Tensor act_bwd(const Tensor& gy, const Tensor& ge, const Tensor& y, const Tensor& z, int64_t act, int64_t p,
               double scale) {
  check3(y, "y");
  return std::get<0>(epilogue_bwd(gy, ge, y.contiguous(), z.contiguous(), act, p, scale, false));
}

std::tuple<Tensor, Tensor, Tensor> linear_fwd(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& b,
                                              int64_t act, int64_t p, double scale, bool keep_z) {
  check23(x_in, "x");
  check23(w_in, "w");
  const bool has_b = b.has_value() && b->defined();
  if (has_b) {  // addmm would broadcast a wrong-shaped bias silently
    const bool ok = x_in.dim() == 2 ? (b->dim() == 1 && b->size(0) == w_in.size(0))
                                    : (b->dim() == 2 && w_in.dim() == 3 && b->size(0) == w_in.size(0) &&
                                       b->size(1) == w_in.size(1));
    TORCH_CHECK(ok, "minaction: bias ", b->sizes(), " does not match weight ", w_in.sizes());
  }
  Tensor z;
  if (x_in.dim() == 2) {  // the plain layer
    TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == x_in.size(1), "minaction: weight ", w_in.sizes(),
                " does not match input ", x_in.sizes());
    z = has_b ? at::addmm(*b, x_in, w_in.t()) : at::mm(x_in, w_in.t());
  } else {
    const int64_t G = x_in.size(0), K = x_in.size(2);
    TORCH_CHECK(w_in.dim() == 3 && w_in.size(0) == G && w_in.size(2) == K, "minaction: weight ", w_in.sizes(),
                " does not match input ", x_in.sizes());
    // bmm even for one member (not mm): torch's mm and bmm round differently (bmm's small-size loop, BLAS
    // paths), and a member's arithmetic must not depend on how many members share its module (the study
    // trains a lone run as a group of one); bmm's members are computed independently of the batch size
    z = has_b ? at::baddbmm(b->unsqueeze(1), x_in, w_in.transpose(1, 2)) : at::bmm(x_in, w_in.transpose(1, 2));
  }
  if (!z.is_contiguous()) z = z.contiguous();
  if (keep_z) {
    Tensor y = at::empty_like(z);
    Tensor e = epilogue_fwd(z, y, act, p, scale);
    return {y, z, e};
  }
  Tensor e = epilogue_fwd(z, z, act, p, scale);  // in place: z becomes y
  return {z, at::empty({0}, z.options()), e};
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& ge, const Tensor& x, const Tensor& w,
                                              const Tensor& y, const Tensor& z, int64_t act, int64_t p, double scale,
                                              bool need_x, bool need_w, bool need_b) {
  check23(y, "y");
  const bool plain = y.dim() == 2;
  Tensor gz, gb;
  if (act == IDENTITY && p == 0) {
    gz = gy.contiguous();
    gb = need_b ? gz.sum(plain ? 0 : 1) : at::empty({0}, y.options());
  } else {
    std::tie(gz, gb) = epilogue_bwd(gy, ge, y, z, act, p, scale, need_b);
  }
  Tensor gx = at::empty({0}, y.options()), gw = at::empty({0}, y.options());  // distinct: outputs may not alias
  if (plain) {
    if (need_x) gx = at::mm(gz, w);
    if (need_w) gw = at::mm(gz.t(), x);
  } else {  // bmm for every G, one member included (see linear_fwd)
    if (need_x) gx = at::bmm(gz, w);
    if (need_w) gw = at::bmm(gz.transpose(1, 2), x);
  }
  return {gx, gw, gb};
}

// ------------------------------------------------------------------ the layer, with a C++ autograd formula
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<Tensor, Tensor, Tensor> call_linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                                   int64_t act, int64_t p, double scale, bool keep_z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::linear_fwd", "")
                       .typed<decltype(linear_fwd)>();
  return op.call(x, w, b, act, p, scale, keep_z);
}

std::tuple<Tensor, Tensor, Tensor> call_linear_bwd(const Tensor& gy, const Tensor& ge, const Tensor& x,
                                                   const Tensor& w, const Tensor& y, const Tensor& z, int64_t act,
                                                   int64_t p, double scale, bool nx, bool nw, bool nb) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::linear_bwd", "")
                       .typed<decltype(linear_bwd)>();
  return op.call(gy, ge, x, w, y, z, act, p, scale, nx, nw, nb);
}

// The layer recomputed with differentiable ATen ops (the double-backward path): y, e with the
// shapes energy_linear returns.
std::tuple<Tensor, Tensor> energy_linear_composite(const Tensor& x, const Tensor& w, const Tensor& b, int64_t act,
                                                   int64_t p, double scale) {
  Tensor z = at::matmul(x, w.transpose(-1, -2));
  if (b.defined()) z = z + b.unsqueeze(-2);
  Tensor y;
  switch (act) {
    case IDENTITY: y = z; break;
    case RELU: y = at::relu(z); break;
    case GELU: y = at::gelu(z); break;
    case SILU: y = at::silu(z); break;
    case TANH: y = at::tanh(z); break;
    case SIGMOID: y = at::sigmoid(z); break;
    case GELU_TANH: y = at::gelu(z, "tanh"); break;
    default: TORCH_CHECK(false, "minaction: unknown activation code ", act);
  }
  const bool plain = w.dim() == 2;
  Tensor yf = y.to(energy_dtype(y.scalar_type()));
  Tensor e;
  if (p == 0) e = plain ? at::zeros({}, yf.options()) : at::zeros({y.size(0)}, yf.options());
  else {
    Tensor a = p == 2 ? yf * yf : yf.abs();
    e = (plain ? a.sum() : a.sum(at::IntArrayRef{1, 2})) * scale;
  }
  return {y, e};
}

// energy_linear accepts the plain layer (x [M,K], w [N,K], b [N] -> y [M,N], e 0-dim) or the
// grouped one (x [G,M,K], w [G,N,K], b [G,N] -> y [G,M,N], e [G]); shapes are handled here,
// below autograd, so that a Python caller pays for one op call only.
//
// unit_scale is 1 (energy_reduction "sum") or 1/N ("mean"); the op divides by its own row count M,
// so that the caller passes a constant of the layer: under torch.compile a scale computed from the
// batch size in Python is a float specialised to one batch size, and every new size recompiled.
// While torch.compile traces with a symbolic M (dynamic shapes) the division cannot be folded into
// the kernels' double: the kernels then take unit_scale and the division is a traced tensor op
// (on e in forward, on e's gradient in backward), so one graph serves every batch size.
struct LayerScale {
  c10::SymInt rows;  // max(M, 1)
  double scale;      // what the kernels take: unit_scale / M, or unit_scale alone for a symbolic M
  bool symbolic;     // then e (and e's gradient) is divided by `rows` as a traced op
};

static LayerScale layer_scale(const Tensor& x, bool plain, double unit_scale) {
  c10::SymInt rows = (plain ? x.sym_size(0) : x.sym_size(1)).max(c10::SymInt(1));
  const auto known = rows.maybe_as_int();
  return {rows, known ? unit_scale / static_cast<double>(*known) : unit_scale, !known};
}

class EnergyLinearFn : public torch::autograd::Function<EnergyLinearFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& w_in,
                               const std::optional<Tensor>& b_opt, int64_t act, int64_t p, double unit_scale,
                               double penalty) {
    const Tensor b_in = b_opt.has_value() ? *b_opt : Tensor();
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool plain = w_in.dim() == 2;
    TORCH_CHECK(w_in.dim() == (plain ? 2 : 3) && x_in.dim() == w_in.dim(),
                "minaction: energy_linear expects x [M,K] with w [N,K], or x [G,M,K] with w [G,N,K]; got x ",
                x_in.sizes(), " and w ", w_in.sizes());
    const LayerScale ls = layer_scale(x_in, plain, unit_scale);
    const double scale = ls.scale;
    const bool symbolic = ls.symbolic;
    // the plain layer goes to the primitive as is (2-D), without views. x is not made
    // contiguous: BLAS takes transposed views, and a shared input expanded over the G models
    // (stride 0) would otherwise be copied G times
    auto [y, z, e] = call_linear_fwd(x_in, w_in.contiguous(), b_opt, act, p, scale, needs_z(act));
    if (symbolic) e = e.div(c10::Scalar(ls.rows));
    // the inputs themselves are saved (not the unsqueezed views) so that a create_graph
    // backward can differentiate through them
    ctx->save_for_backward({x_in, w_in, b_in, y, z});
    ctx->set_materialize_grads(false);  // an unused energy output must stay "undefined", not zeros
    ctx->saved_data["act"] = act;
    ctx->saved_data["p"] = p;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["symbolic"] = symbolic;
    ctx->saved_data["plain"] = plain;
    ctx->saved_data["penalty"] = penalty;
    return {y, e};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x_in = saved[0], &w_in = saved[1], &b_in = saved[2], &y = saved[3], &z = saved[4];
    const int64_t act = ctx->saved_data["act"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool plain = ctx->saved_data["plain"].toBool();
    const bool symbolic = ctx->saved_data["symbolic"].toBool();  // scale lacks the 1/M (see LayerScale)
    const bool has_b = b_in.defined();
    const bool nx = ctx->needs_input_grad(0), nw = ctx->needs_input_grad(1), nb = has_b && ctx->needs_input_grad(2);
    if (!(nx || nw || nb)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    // penalty != 0: the layer adds penalty * dE/d(inputs) itself, as if `penalty * e` were in the loss
    // (the energy's incoming gradient is penalty, plus whatever reached e through the loss). Once per
    // forward, as a term of the loss would be: a later backward through this node (retain_graph, or the
    // second pass of a double backward, which comes back here for the seeds' graph) adds nothing.
    const double penalty = ctx->saved_data["penalty"].toDouble();
    if (penalty != 0.0) ctx->saved_data["penalty"] = 0.0;
    // an energy output that did not reach the loss contributes nothing (not 0 * d|y|^p, which is NaN at y = inf)
    const int64_t p = (grads[1].defined() || penalty != 0.0) ? ctx->saved_data["p"].toInt() : 0;
    const auto e_options = y.options().dtype(energy_dtype(y.scalar_type()));
    const auto e_sizes = plain ? std::vector<int64_t>{} : std::vector<int64_t>{y.size(0)};
    auto energy_grad = [&]() -> Tensor {  // e's gradient: the loss's, plus the layer's own penalty
      if (penalty == 0.0) return grads[1];
      Tensor own = at::full(e_sizes, penalty, e_options);
      return grads[1].defined() ? grads[1].to(own.scalar_type()).view(own.sizes()) + own : own;
    };
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): differentiable recomputation, so the returned gradients
      // carry a graph (gradient penalties, gradgradcheck)
      Tensor yv, ev;
      std::tie(yv, ev) = energy_linear_composite(x_in, w_in, b_in, act, p, scale);
      if (symbolic) ev = ev.div(c10::Scalar(layer_scale(x_in, plain, 1.0).rows));
      // the incoming gradients are grad_outputs, not factors of a scalar objective: autograd must
      // not differentiate through their own graph (it leads back into this node, whose lock we hold)
      std::vector<Tensor> outs_v, seeds;
      if (grads[0].defined() && yv.requires_grad()) {
        outs_v.push_back(yv);
        seeds.push_back(grads[0].view(yv.sizes()));
      }
      if (p != 0 && ev.requires_grad()) {
        outs_v.push_back(ev);
        seeds.push_back(energy_grad().to(ev.scalar_type()).view(ev.sizes()));
      }
      std::vector<Tensor> inputs, outs(3);
      std::vector<int> which;
      if (nx) { inputs.push_back(x_in); which.push_back(0); }
      if (nw) { inputs.push_back(w_in); which.push_back(1); }
      if (nb) { inputs.push_back(b_in); which.push_back(2); }
      std::vector<Tensor> res(inputs.size());
      if (!outs_v.empty())
        res = torch::autograd::grad(outs_v, inputs, seeds, /*retain_graph=*/true, /*create_graph=*/true,
                                    /*allow_unused=*/true);
      for (size_t i = 0; i < which.size(); ++i)
        outs[which[i]] = res[i].defined() ? res[i] : at::zeros_like(inputs[i]);
      return {outs[0], outs[1], outs[2], Tensor(), Tensor(), Tensor(), Tensor()};
    }
    Tensor gy = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(y);
    Tensor ge = p != 0 ? energy_grad() : at::zeros(e_sizes, e_options);
    if (symbolic && p != 0) ge = ge.div(c10::Scalar(layer_scale(x_in, plain, 1.0).rows));
    // plain: 2-D in, 2-D gradients out (the primitive takes both forms)
    auto [gx, gw, gb] = call_linear_bwd(gy, ge, x_in, w_in.contiguous(), y, z, act, p, scale, nx, nw, nb);
    return {nx ? gx : Tensor(), nw ? gw : Tensor(), nb ? gb : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> energy_linear_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                                  int64_t act, int64_t p, double unit_scale, double penalty) {
  auto out = EnergyLinearFn::apply(x, w, b, act, p, unit_scale, penalty);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> energy_linear_noautograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                                    int64_t act, int64_t p, double unit_scale, double /*penalty*/) {
  TORCH_CHECK((w.dim() == 2 || w.dim() == 3) && x.dim() == w.dim(),
              "minaction: energy_linear expects x [M,K] with w [N,K], or x [G,M,K] with w [G,N,K]; got x ",
              x.sizes(), " and w ", w.sizes());
  const LayerScale ls = layer_scale(x, w.dim() == 2, unit_scale);
  auto [y, z, e] = call_linear_fwd(x, w.contiguous(), b, act, p, ls.scale, false);
  if (ls.symbolic) e = e.div(c10::Scalar(ls.rows));
  return {y, e};
}

// ------------------------------------------------------------------ the epilogue, with a C++ autograd formula
// minaction::epilogue(z, act, p, mean, groups) is activation_energy's cpu path in one call per
// direction: z [B, ...] (groups == 0: one model, e 0-dim) or [G, B, ...] (groups == G: e [G]).
// Shapes, the scale and the contiguous copy are handled here, below autograd; the kernels are
// reached through the dispatcher (minaction::act_fwd / act_bwd), so fake tensors (torch.compile)
// take those ops' fakes.
std::tuple<Tensor, Tensor, Tensor> call_act_fwd(const Tensor& z, int64_t act, int64_t p, double scale, bool keep_z) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::act_fwd", "")
                       .typed<decltype(act_fwd)>();
  return op.call(z, act, p, scale, keep_z);
}

Tensor call_act_bwd(const Tensor& gy, const Tensor& ge, const Tensor& y, const Tensor& z, int64_t act, int64_t p,
                    double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::act_bwd", "")
                       .typed<decltype(act_bwd)>();
  return op.call(gy, ge, y, z, act, p, scale);
}

struct EpiShape {
  int64_t G, M, N;
  double scale;
};

// E = mean over the B rows of the sum (mean: the mean) over the other dims of |y|^p. In SymInts, for the
// epilogue op with a C++ autograd formula: while torch.compile traces with dynamic shapes, M (the batch)
// and N (e.g. a sequence length) may be symbolic; the kernels then take scale 1 and the division by
// `denom` is a traced op (on e forward, on its gradient backward), as in EnergyLinearFn, so that one
// graph serves every size. Eagerly every size is concrete and scale = 1 / denom.
struct SymEpiShape {
  int64_t G;
  c10::SymInt M, N, denom;
  double scale;
  bool symbolic;
};

SymEpiShape sym_epilogue_shape(const Tensor& z, bool mean, int64_t groups) {
  TORCH_CHECK(groups >= 0, "minaction: groups must be 0 (one model) or the number of models, got ", groups);
  const int64_t lead = groups > 0 ? 2 : 1;
  TORCH_CHECK(z.dim() >= lead, "minaction: activation_energy input of shape ", z.sym_sizes(),
              " has no batch dimension", groups > 0 ? " (with groups, the input is [models, batch, ...])" : "");
  TORCH_CHECK(groups == 0 || z.sym_size(0) == groups, "minaction: expected ", groups,
              " models in dim 0, got shape ", z.sym_sizes());
  c10::SymInt M = z.sym_size(lead - 1), N = 1;
  for (int64_t d = lead; d < z.dim(); ++d) N = N * z.sym_size(d);
  c10::SymInt denom = M.max(c10::SymInt(1));
  if (mean) denom = denom * N.max(c10::SymInt(1));
  const auto known = denom.maybe_as_int();
  return {groups > 0 ? groups : 1, M, N, denom, known ? 1.0 / static_cast<double>(*known) : 1.0, !known};
}

// the same in concrete sizes, for the ops that take only those (the fused epilogue + pool): a symbolic
// size is specialised (guarded), as z.size() does
EpiShape epilogue_shape(const Tensor& z, bool mean, int64_t groups) {
  const SymEpiShape s = sym_epilogue_shape(z, mean, groups);
  const int64_t denom = s.denom.guard_int(__FILE__, __LINE__);
  return {s.G, s.M.guard_int(__FILE__, __LINE__), s.N.guard_int(__FILE__, __LINE__), 1.0 / static_cast<double>(denom)};
}

// t (contiguous, as many elements) seen with the sizes of `like`. For concrete sizes a view; for
// symbolic ones an as_strided with the contiguous strides written out as products, because a
// view's strides come out as floor divisions (s**2 // s) that inductor cannot order
Tensor view_like(const Tensor& t, const Tensor& like) {
  const auto sizes = like.sym_sizes();
  bool symbolic = false;
  for (const auto& d : sizes) symbolic = symbolic || !d.maybe_as_int().has_value();
  if (!symbolic) return t.view(like.sizes());
  std::vector<c10::SymInt> strides(sizes.size());
  c10::SymInt acc = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = acc;
    acc = acc * sizes[d];
  }
  return t.as_strided_symint(sizes, strides);
}

Tensor apply_act_composite(const Tensor& z, int64_t act) {
  switch (act) {
    case IDENTITY: return z;
    case RELU: return at::relu(z);
    case GELU: return at::gelu(z);
    case SILU: return at::silu(z);
    case TANH: return at::tanh(z);
    case SIGMOID: return at::sigmoid(z);
    case GELU_TANH: return at::gelu(z, "tanh");
    default: TORCH_CHECK(false, "minaction: unknown activation code ", act);
  }
}

// A create_graph backward's differentiable recomputation: the gradients, with respect to `inputs`, of
// <gy, yv> + <ge, E>, where yv = act(z) was recomputed from the inputs with differentiable ops and
// E = scale * the sum of |yv|^p over every dim after the first (groups > 0: E [G]) or over all (groups 0).
// An undefined gy or ge leaves its term out; an input no term reaches gets an undefined gradient.
std::vector<Tensor> recomputed_grads(const Tensor& yv, const Tensor& gy, const Tensor& ge, int64_t p, int64_t groups,
                                     double scale, const std::vector<Tensor>& inputs, bool create_graph) {
  std::vector<Tensor> outs, seeds;
  if (gy.defined() && yv.requires_grad()) {
    outs.push_back(yv);
    seeds.push_back(gy.reshape(yv.sizes()));
  }
  if (p != 0 && ge.defined()) {
    Tensor yf = yv.to(energy_dtype(yv.scalar_type()));
    Tensor a = p == 2 ? yf * yf : yf.abs();
    std::vector<int64_t> dims;
    for (int64_t d = groups > 0 ? 1 : 0; d < a.dim(); ++d) dims.push_back(d);
    Tensor ev = a.sum(dims) * scale;
    if (ev.requires_grad()) {
      outs.push_back(ev);
      seeds.push_back(ge.to(ev.scalar_type()).reshape(ev.sizes()));
    }
  }
  if (outs.empty() || inputs.empty()) return std::vector<Tensor>(inputs.size());
  return torch::autograd::grad(outs, inputs, seeds, /*retain_graph=*/true, create_graph, /*allow_unused=*/true);
}


// The gradient with respect to z of <gy, y> + <ge, E(y)> for y = act(z) where act' is a function of y (relu,
// tanh, sigmoid, identity), in differentiable ATen ops of gy, ge and y, computed in the energy dtype: the
// create_graph backward of an epilogue that kept y only, and the backward of one whose output reached no loss
// (gy undefined: an ActivationObserver's pass, two passes over y, no zero gy). E = scale * the sum of |y|^p over
// every dim after the first (groups > 0: E [G]) or over all. An undefined gy or ge leaves its term out; both
// undefined: an undefined gradient.
Tensor grads_from_output(const Tensor& y, const Tensor& gy, const Tensor& ge, int64_t act, int64_t p, int64_t groups,
                         double scale) {
  Tensor yf = y.to(energy_dtype(y.scalar_type()));
  Tensor u;  // dL/dy
  if (p != 0 && ge.defined()) {
    std::vector<int64_t> shape(y.dim(), 1);
    if (groups > 0) shape[0] = -1;
    Tensor c = ge.to(yf.scalar_type()).reshape(shape) * (p == 2 ? 2.0 * scale : scale);  // groups 0: broadcast
    u = p == 2 ? yf * c : yf.sign() * c;
  }
  if (gy.defined()) {
    Tensor g = gy.reshape_symint(y.sym_sizes()).to(yf.scalar_type());
    u = u.defined() ? u + g : g;
  }
  if (!u.defined()) return Tensor();
  switch (act) {
    case IDENTITY: break;
    // as threshold_backward: 0 where y <= 0 (the energy's term alone is 0 there already)
    case RELU: if (gy.defined()) u = u.masked_fill(yf <= 0, 0); break;
    case TANH: u = u * (1 - yf * yf); break;
    case SIGMOID: u = u * (yf * (1 - yf)); break;
    default: TORCH_CHECK(false, "minaction: activation code ", act, " takes its derivative from z, not y");
  }
  return u.to(y.scalar_type());
}

// The epilogue's forward while torch.compile traces with symbolic sizes: y = act(z) and E in ATen ops, not
// the kernel. The kernel works on a [G, M, N] view, and its y seen with z's sizes is a view (an as_strided with
// product strides, or a view whose strides are floor divisions): inductor then asks for a channels-last order
// of that view's symbolic strides when a convolution reads it (conv -> norm -> activation -> conv) and fails
// ("cannot determine truth value of Relational"). In ATen ops y is a fresh tensor of z's sizes, and inductor
// fuses the activation and the sum into its own kernel. E in the energy dtype, divided by `denom` (the
// symbolic shape's scale is 1, see sym_epilogue_shape).
std::tuple<Tensor, Tensor> symbolic_epilogue(const Tensor& z_in, int64_t act, int64_t p, int64_t groups,
                                             const c10::SymInt& denom) {
  Tensor z = z_in.contiguous();
  Tensor y = act == IDENTITY ? z.clone() : apply_act_composite(z, act);
  const auto et = energy_dtype(z.scalar_type());
  std::vector<int64_t> dims;
  for (int64_t d = groups > 0 ? 1 : 0; d < z.dim(); ++d) dims.push_back(d);
  Tensor e;
  if (p == 0) {
    e = groups > 0 ? at::zeros({groups}, z.options().dtype(et)) : at::zeros({}, z.options().dtype(et));
  } else {
    Tensor yf = y.to(et);
    e = (p == 2 ? yf * yf : yf.abs()).sum(dims).div(c10::Scalar(denom));
  }
  return {y, e};
}

class ActEnergyFn : public torch::autograd::Function<ActEnergyFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z_in, int64_t act, int64_t p, bool mean,
                               int64_t groups, double penalty) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const SymEpiShape s = sym_epilogue_shape(z_in, mean, groups);
    Tensor y, e;
    if (s.symbolic || !s.M.maybe_as_int() || !s.N.maybe_as_int()) {
      std::tie(y, e) = symbolic_epilogue(z_in, act, p, groups, s.denom);
    } else {
      Tensor y3, unused;
      std::tie(y3, unused, e) = call_act_fwd(z_in.contiguous().view({s.G, *s.M.maybe_as_int(), *s.N.maybe_as_int()}),
                                             act, p, s.scale, false);
      y = y3.view(z_in.sizes());
      if (groups == 0) e = e.view(c10::IntArrayRef{});  // ({} alone would pick view(ScalarType))
    }
    // z itself: read by the gelu/silu derivative and by their create_graph backward. relu, tanh, sigmoid and
    // identity take their derivative from y (a create_graph backward too, through y's own node, as torch's
    // relu does), so they keep y only: an activation module costs what nn.ReLU's saved output costs
    ctx->save_for_backward({needs_z(act) ? z_in : Tensor(), y});
    ctx->set_materialize_grads(false);  // an unused energy output must stay "undefined", not zeros
    ctx->saved_data["act"] = act;
    ctx->saved_data["p"] = p;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["G"] = s.G;
    ctx->saved_data["M"] = s.M;
    ctx->saved_data["N"] = s.N;
    ctx->saved_data["denom"] = s.denom;
    ctx->saved_data["symbolic"] = s.symbolic;
    ctx->saved_data["scale"] = s.scale;
    ctx->saved_data["penalty"] = penalty;
    return {y, e};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &z_in = saved[0], &y = saved[1];
    const int64_t act = ctx->saved_data["act"].toInt();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t G = ctx->saved_data["G"].toInt();
    const c10::SymInt M = ctx->saved_data["M"].toSymInt(), N = ctx->saved_data["N"].toSymInt();
    const bool symbolic = ctx->saved_data["symbolic"].toBool();  // scale lacks 1/denom (see sym_epilogue_shape)
    const c10::SymInt denom = ctx->saved_data["denom"].toSymInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const variable_list none = {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    auto with = [&](Tensor gz) {
      variable_list out = {std::move(gz)};
      out.insert(out.end(), none.begin(), none.end());
      return out;
    };
    if (!ctx->needs_input_grad(0)) return with(Tensor());
    // penalty: as the layer's (EnergyLinearFn): the energy's gradient gets + penalty, once per forward
    const double penalty = ctx->saved_data["penalty"].toDouble();
    if (penalty != 0.0) ctx->saved_data["penalty"] = 0.0;
    // an energy output that did not reach the loss contributes nothing (not 0 * d|y|^p, which is NaN at y = inf)
    const int64_t p = (grads[1].defined() || penalty != 0.0) ? ctx->saved_data["p"].toInt() : 0;
    const auto e_options = y.options().dtype(energy_dtype(y.scalar_type()));
    auto energy_grad = [&]() -> Tensor {  // [G]: the loss's gradient of e, plus the penalty
      Tensor own = penalty != 0.0 ? at::full({G}, penalty, e_options) : Tensor();
      Tensor g = grads[1].defined() ? grads[1].to(e_options.dtype()).reshape({G}) : Tensor();
      g = own.defined() ? (g.defined() ? g + own : own) : g;
      return symbolic && g.defined() ? g.div(c10::Scalar(denom)) : g;
    };
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): differentiable, from z (gelu, silu: recomputed) or from the saved output y
      // (its node is this one, so a further derivative comes back here): gradient penalties, gradgradcheck
      Tensor gz = needs_z(act)
          ? recomputed_grads(apply_act_composite(z_in, act), grads[0], p != 0 ? energy_grad() : Tensor(), p, groups,
                             scale, {z_in}, /*create_graph=*/true)[0]
          : grads_from_output(y, grads[0], p != 0 ? energy_grad() : Tensor(), act, p, groups, scale);
      return with(gz.defined() ? gz : at::zeros_like(y));
    }
    const std::vector<c10::SymInt> gmn = {c10::SymInt(G), M, N};
    if (!grads[0].defined() && p != 0 && !needs_z(act)) {
      // the output reached no loss (an ActivationObserver's pass): dE/dz from y alone, with no zero gradient of
      // y materialised and read by the kernel
      Tensor gz = grads_from_output(y.view_symint(gmn), Tensor(), energy_grad(), act, p, /*groups=*/1, scale);
      return with(view_like(gz.contiguous(), y));
    }
    Tensor gy = grads[0].defined() ? grads[0].contiguous().view_symint(gmn) : at::zeros_symint(gmn, y.options());
    Tensor ge = p != 0 ? energy_grad() : at::zeros({G}, e_options);
    Tensor z3 = needs_z(act) ? z_in.contiguous().view_symint(gmn) : at::empty({0}, y.options());
    Tensor gz = call_act_bwd(gy, ge, y.view_symint(gmn), z3, act, p, scale);
    return with(view_like(gz, y));
  }
};

std::tuple<Tensor, Tensor> epilogue_autograd(const Tensor& z, int64_t act, int64_t p, bool mean, int64_t groups,
                                             double penalty) {
  auto out = ActEnergyFn::apply(z, act, p, mean, groups, penalty);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> epilogue_noautograd(const Tensor& z, int64_t act, int64_t p, bool mean, int64_t groups,
                                               double /*penalty*/) {
  const SymEpiShape s = sym_epilogue_shape(z, mean, groups);
  if (s.symbolic || !s.M.maybe_as_int() || !s.N.maybe_as_int()) return symbolic_epilogue(z, act, p, groups, s.denom);
  auto [y3, unused, e] = call_act_fwd(z.contiguous().view({s.G, *s.M.maybe_as_int(), *s.N.maybe_as_int()}), act, p,
                                      s.scale, false);
  if (groups == 0) e = e.view(c10::IntArrayRef{});
  return {y3.view(z.sizes()), e};
}

// ------------------------------------------------------------------ max-pool by 2 (the cnn's pooling)
// minaction::max_pool2(x, dims): max over non-overlapping windows of 2 (dims == 1: the last dim)
// or 2x2 (dims == 2: the last two), floor mode, no padding: F.max_pool1d/2d(x, 2) exactly, same
// values and the same element chosen (scan order row-major, a later element replaces the max when
// it is greater or NaN, as torch's CPU kernel). torch's CPU max_pool2d on NCHW float was 22% of a
// batched cnn image step (131 ms of 595, G = 10, 1 thread): it keeps int64 indices, and its
// backward zero-fills the input gradient before scattering. Here the window's position is one
// uint8, and the backward writes every input gradient element once (0 or the output gradient).
// One output row is act_pool_row below with the identity and no energy: y[0:OW], ip[0:OW] from input
// rows r0 (and r1 for 2x2 windows), 2*OW inputs each. Vector path (F = float/double): a window's pair
// sits in even/odd lanes, split by deinterleave2; branch-free selects (a scalar loop with data-dependent
// branches mispredicted on ReLU outputs: 74 ms for the cnn's first pooling, against 124 ms for torch's).
// The window helpers (the fused epilogue + pool's too, further down):

// |y|^p of the first `cnt` lanes of y, into a
template <int P, typename F>
inline void acc_masked(Vec<F>& a, const Vec<F>& y, int64_t cnt) {
  if constexpr (P != 0) {
    if (cnt >= Vec<F>::size()) acc_p<P>(a, y);
    else if (cnt > 0) acc_p<P>(a, Vec<F>::set(Vec<F>(F(0)), y, cnt));
  }
}

// act(z) of the 2n inputs at r (n <= V windows of 2), split into window positions 0 and 1 (even and
// odd elements); with P != 0, |act(z)|^p of the 2n inputs added into ea, eb
template <typename F, int ACT, int P>
inline void load_pairs(const F* r, int64_t n, Vec<F>& y0, Vec<F>& y1, Vec<F>* z0, Vec<F>* z1, Vec<F>* ea,
                       Vec<F>* eb) {
  constexpr int64_t V = Vec<F>::size();
  const int64_t n2 = 2 * n;
  Vec<F> za, zb;
  if (n2 == 2 * V) {
    za = Vec<F>::loadu(r);
    zb = Vec<F>::loadu(r + V);
  } else {
    za = Vec<F>::loadu(r, std::min(n2, V));
    zb = n2 > V ? Vec<F>::loadu(r + V, n2 - V) : Vec<F>(F(0));
  }
  if constexpr (P != 0) {
    if (ea) {
      const Vec<F> ya = act_v<ACT, F>(za), yb = act_v<ACT, F>(zb);
      acc_masked<P, F>(*ea, ya, std::min(n2, V));
      acc_masked<P, F>(*eb, yb, n2 - V);
    }
  }
  auto [ze, zo] = at::vec::deinterleave2(za, zb);
  y0 = act_v<ACT, F>(ze);
  y1 = act_v<ACT, F>(zo);
  if (z0) {
    *z0 = ze;
    *z1 = zo;
  }
}

// the window maximum of up to 4 candidates, max_pool2's rule: a later element wins when greater or NaN
template <typename F>
struct WinMax {
  Vec<F> m, k{F(0)};
  explicit WinMax(const Vec<F>& first) : m(first) {}
  template <bool IDX>
  void take(const Vec<F>& v, F i) {
    const Vec<F> c = (v > m) | (v != v);
    m = Vec<F>::blendv(m, v, c);
    if constexpr (IDX) k = Vec<F>::blendv(k, Vec<F>(i), c);
  }
};

// one output row of the fused forward: y[0:OW] (and ip[0:OW] when KEEP) from input rows r0 (and r1)
template <typename F, int ACT, int P, int KH, bool KEEP>
inline void act_pool_row(const F* r0, const F* r1, F* y, uint8_t* ip, int64_t OW, Acc4<F>& acc) {
  constexpr int64_t V = Vec<F>::size();
  for (int64_t ow = 0; ow < OW; ow += V) {
    const int64_t n = std::min(V, OW - ow);
    Vec<F> y0, y1, y2, y3;
    load_pairs<F, ACT, P>(r0 + 2 * ow, n, y0, y1, nullptr, nullptr, &acc.a0, &acc.a1);
    WinMax<F> w(y0);
    w.template take<KEEP>(y1, F(1));
    if constexpr (KH == 2) {
      load_pairs<F, ACT, P>(r1 + 2 * ow, n, y2, y3, nullptr, nullptr, &acc.a2, &acc.a3);
      w.template take<KEEP>(y2, F(2));
      w.template take<KEEP>(y3, F(3));
    }
    if (n == V) w.m.store(y + ow);
    else w.m.store(y + ow, static_cast<int>(n));
    if constexpr (KEEP) {
      F kb[V];
      w.k.store(kb);
      for (int64_t j = 0; j < n; ++j) ip[ow + j] = static_cast<uint8_t>(kb[j]);
    }
  }
}

// the 2n elements at q from a and b (n2 = 2n <= 2V), the tail masked
template <typename F>
inline void store_pair(F* q, int64_t n2, const Vec<F>& a, const Vec<F>& b) {
  constexpr int64_t V = Vec<F>::size();
  if (n2 == 2 * V) {
    a.store(q);
    b.store(q + V);
  } else {
    a.store(q, static_cast<int>(std::min(n2, V)));
    if (n2 > V) b.store(q + V, static_cast<int>(n2 - V));
  }
}

// the backward of one output row: r0[0:2*OW] (and r1) = g at the chosen position, else 0
template <typename F, int KH>
inline void unpool_row(const F* g, const uint8_t* ip, F* r0, F* r1, int64_t OW) {
  constexpr int64_t V = Vec<F>::size();
  const Vec<F> zero(F(0));
  for (int64_t ow = 0; ow < OW; ow += V) {
    const int64_t n = std::min(V, OW - ow);
    F kb[V] = {};
    for (int64_t j = 0; j < n; ++j) kb[j] = static_cast<F>(ip[ow + j]);
    const Vec<F> k = Vec<F>::loadu(kb);
    const Vec<F> gv = n == V ? Vec<F>::loadu(g + ow) : Vec<F>::loadu(g + ow, n);
    auto pick = [&](F i) { return Vec<F>::blendv(zero, gv, k == Vec<F>(i)); };
    auto [a, b] = at::vec::interleave2(pick(F(0)), pick(F(1)));
    store_pair(r0 + 2 * ow, 2 * n, a, b);
    if constexpr (KH == 2) {
      auto [c, d] = at::vec::interleave2(pick(F(2)), pick(F(3)));
      store_pair(r1 + 2 * ow, 2 * n, c, d);
    }
  }
}

template <typename T, int KH>
void maxpool2_fwd_kernel(const T* x, T* y, uint8_t* idx, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = KH == 2 ? H / 2 : H, OW = W / 2;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const T* xp = x + p * H * W;
      T* yp = y + p * OH * OW;
      uint8_t* ip = idx + p * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const T* r0 = xp + (KH == 2 ? 2 * oh : oh) * W;
        const T* r1 = r0 + W;
        if constexpr (std::is_same_v<T, typename Acc<T>::type>) {
          Acc4<T> unused;  // no energy (P = 0)
          act_pool_row<T, IDENTITY, 0, KH, true>(r0, r1, yp + oh * OW, ip + oh * OW, OW, unused);
          continue;
        }
        for (int64_t ow = 0; ow < OW; ++ow) {  // half/bfloat16: compared in float, branch-free
          using A = typename Acc<T>::type;
          A m = static_cast<A>(r0[2 * ow]);
          uint8_t k = 0;
          auto take = [&](A v, uint8_t i) {
            const bool c = (v > m) | (v != v);
            m = c ? v : m;
            k = c ? i : k;
          };
          take(static_cast<A>(r0[2 * ow + 1]), 1);
          if constexpr (KH == 2) {
            take(static_cast<A>(r1[2 * ow]), 2);
            take(static_cast<A>(r1[2 * ow + 1]), 3);
          }
          yp[oh * OW + ow] = static_cast<T>(m);
          ip[oh * OW + ow] = k;
        }
      }
    }
  });
}

template <typename T, int KH>
void maxpool2_bwd_kernel(const T* gy, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = KH == 2 ? H / 2 : H, OW = W / 2;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      const T* gp = gy + p * OH * OW;
      const uint8_t* ip = idx + p * OH * OW;
      T* xp = gx + p * H * W;
      for (int64_t oh = 0; oh < OH; ++oh) {
        T* r0 = xp + (KH == 2 ? 2 * oh : oh) * W;
        T* r1 = r0 + W;
        if constexpr (std::is_same_v<T, typename Acc<T>::type>) {
          unpool_row<T, KH>(gp + oh * OW, ip + oh * OW, r0, r1, OW);
        } else {
          for (int64_t ow = 0; ow < OW; ++ow) {
            const T g = gp[oh * OW + ow], zero = T(0);
            const uint8_t k = ip[oh * OW + ow];
            r0[2 * ow] = k == 0 ? g : zero;
            r0[2 * ow + 1] = k == 1 ? g : zero;
            if constexpr (KH == 2) {
              r1[2 * ow] = k == 2 ? g : zero;
              r1[2 * ow + 1] = k == 3 ? g : zero;
            }
          }
        }
        if (W % 2) {  // the last column is in no window
          r0[W - 1] = T(0);
          if constexpr (KH == 2) r1[W - 1] = T(0);
        }
      }
      if (KH == 2 && H % 2)  // nor is the last row
        for (int64_t w = 0; w < W; ++w) xp[(H - 1) * W + w] = T(0);
    }
  });
}

// x [..., H, W] (dims 2) or [..., W] (dims 1), as planes of H x W (H = 1 for dims 1)
std::tuple<int64_t, int64_t, int64_t> pool_planes(const Tensor& x, int64_t dims) {
  TORCH_CHECK(dims == 1 || dims == 2, "minaction: max_pool2 pools the last 1 or 2 dims, got dims=", dims);
  TORCH_CHECK(x.dim() >= dims + 1, "minaction: max_pool2 with dims=", dims, " needs at least ", dims + 1,
              " dims (a leading batch or channel dim), got shape ", x.sizes());
  const int64_t W = x.size(-1), H = dims == 2 ? x.size(-2) : 1;
  TORCH_CHECK(W >= 2 && H >= (dims == 2 ? 2 : 1), "minaction: max_pool2 needs every pooled dim >= 2, got shape ",
              x.sizes());
  const int64_t planes = x.numel() / (H * W);
  return {planes, H, W};
}

std::vector<int64_t> pooled_shape(const Tensor& x, int64_t dims) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() /= 2;
  if (dims == 2) s[s.size() - 2] /= 2;
  return s;
}

std::tuple<Tensor, Tensor> maxpool2_fwd(const Tensor& x_in, int64_t dims) {
  TORCH_CHECK(x_in.device().is_cpu(), "minaction: max_pool2 input must be a CPU tensor, got ", x_in.device());
  auto [planes, H, W] = pool_planes(x_in, dims);
  Tensor x = x_in.contiguous();
  Tensor y = at::empty(pooled_shape(x, dims), x.options());
  Tensor idx = at::empty(pooled_shape(x, dims), x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "minaction_maxpool2_fwd", [&] {
    if (dims == 2)
      maxpool2_fwd_kernel<scalar_t, 2>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                       idx.mutable_data_ptr<uint8_t>(), planes, H, W);
    else
      maxpool2_fwd_kernel<scalar_t, 1>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                       idx.mutable_data_ptr<uint8_t>(), planes, H, W);
  });
  return {y, idx};
}

Tensor maxpool2_bwd(const Tensor& gy_in, const Tensor& idx, c10::SymIntArrayRef in_size, int64_t dims) {
  std::vector<int64_t> size;
  for (const auto& v : in_size) size.push_back(v.expect_int());
  Tensor gx = at::empty(size, gy_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto [planes, H, W] = pool_planes(gx, dims);
  TORCH_CHECK(gy_in.sizes() == idx.sizes() && idx.scalar_type() == at::kByte &&
                  gy_in.sizes() == c10::IntArrayRef(pooled_shape(gx, dims)),
              "minaction: max_pool2 backward: grad ", gy_in.sizes(), " and indices ", idx.sizes(),
              " do not match the input ", gx.sizes());
  Tensor gy = gy_in.contiguous();
  Tensor id = idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gy.scalar_type(), "minaction_maxpool2_bwd", [&] {
    if (dims == 2)
      maxpool2_bwd_kernel<scalar_t, 2>(gy.const_data_ptr<scalar_t>(), id.const_data_ptr<uint8_t>(),
                                       gx.mutable_data_ptr<scalar_t>(), planes, H, W);
    else
      maxpool2_bwd_kernel<scalar_t, 1>(gy.const_data_ptr<scalar_t>(), id.const_data_ptr<uint8_t>(),
                                       gx.mutable_data_ptr<scalar_t>(), planes, H, W);
  });
  return gx;
}

// the scatter of the backward as differentiable ops (create_graph=True): each output gradient
// times a one-hot of its window position, the windows laid back out, odd edges padded with zeros
Tensor maxpool2_bwd_composite(const Tensor& gy, const Tensor& idx, c10::IntArrayRef in_size, int64_t dims) {
  Tensor oh = at::one_hot(idx.to(at::kLong), dims == 2 ? 4 : 2).to(gy.scalar_type());
  Tensor g = gy.unsqueeze(-1) * oh;  // [..., OH, OW, k]
  const int64_t n = gy.dim();
  Tensor full;
  if (dims == 2) {
    // [..., OH, OW, 2, 2] -> [..., OH, 2, OW, 2] -> [..., 2*OH, 2*OW]
    std::vector<int64_t> s(gy.sizes().begin(), gy.sizes().end());
    s.push_back(2);
    s.push_back(2);
    Tensor g5 = g.reshape(s).transpose(n - 1, n);
    std::vector<int64_t> o(gy.sizes().begin(), gy.sizes().end() - 2);
    o.push_back(gy.size(-2) * 2);
    o.push_back(gy.size(-1) * 2);
    full = g5.reshape(o);
    full = at::constant_pad_nd(full, {0, in_size[n - 1] - full.size(-1), 0, in_size[n - 2] - full.size(-2)});
  } else {
    std::vector<int64_t> o(gy.sizes().begin(), gy.sizes().end() - 1);
    o.push_back(gy.size(-1) * 2);
    full = g.reshape(o);
    full = at::constant_pad_nd(full, {0, in_size[n - 1] - full.size(-1)});
  }
  return full;
}

Tensor call_maxpool2_bwd(const Tensor& gy, const Tensor& idx, c10::IntArrayRef in_size, int64_t dims);

class MaxPool2Fn : public torch::autograd::Function<MaxPool2Fn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t dims) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("minaction::maxpool2_fwd", "")
                         .typed<decltype(maxpool2_fwd)>();
    auto [y, idx] = op.call(x, dims);
    ctx->save_for_backward({idx});
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["size"] = x.sizes().vec();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor idx = ctx->get_saved_variables()[0];
    const int64_t dims = ctx->saved_data["dims"].toInt();
    const std::vector<int64_t> size = ctx->saved_data["size"].toIntVector();
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    if (at::GradMode::is_enabled()) return {maxpool2_bwd_composite(grads[0], idx, size, dims), Tensor()};
    return {call_maxpool2_bwd(grads[0], idx, size, dims), Tensor()};
  }
};

Tensor call_maxpool2_bwd(const Tensor& gy, const Tensor& idx, c10::IntArrayRef in_size, int64_t dims) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::maxpool2_bwd", "")
                       .typed<decltype(maxpool2_bwd)>();
  return op.call(gy, idx, c10::fromIntArrayRefSlow(in_size), dims);
}

Tensor max_pool2_autograd(const Tensor& x, int64_t dims) { return MaxPool2Fn::apply(x, dims)[0]; }

Tensor max_pool2_noautograd(const Tensor& x, int64_t dims) {
  return std::get<0>(maxpool2_fwd(x, dims));
}


// ------------------------------------------------------------------ activation + energy + max-pool by 2, fused
// minaction::epilogue_pool2(z, act, p, mean, groups, dims): (max_pool2(act(z), dims), E) in one pass,
// E exactly as minaction::epilogue's (every element of act(z) counts, those outside the windows of an
// odd size too). The cnn's conv blocks run it: the full-size activation is never written, nor are
// window positions; the backward reads z and the pooled gradient, finds each window's element again
// (the same vector code as the forward, so the same choice) and writes gz once. The epilogue +
// max_pool2 pair wrote and read a full-size y, a full-size gradient of y and the positions.
// The element chosen in each window is max_pool2's on act(z) (same scan, same NaN rule), and gz is
// computed with the epilogue backward's formula per element, so values and gradients equal that pair
// bit for bit; only E's summation order differs (float rounding).
// float and double only (ops/pool.py runs the pair for other dtypes).

// energy of act(z[0:n]) (elements in no window)
template <typename F, int ACT, int P>
inline void energy_only(const F* z, int64_t n, Acc4<F>& acc) {
  constexpr int64_t V = Vec<F>::size();
  for (int64_t j = 0; j < n; j += V) {
    const int64_t c = std::min(V, n - j);
    const Vec<F> y = act_v<ACT, F>(c == V ? Vec<F>::loadu(z + j) : Vec<F>::loadu(z + j, c));
    acc_masked<P, F>(acc.a3, y, c);
  }
}

// gz of one element from its output gradient g: the epilogue backward's formula
template <typename F, int ACT, int P>
inline Vec<F> act_grad_v(const Vec<F>& g, const Vec<F>& y, const Vec<F>& z, const Vec<F>& cv) {
  return dact_mul_v<ACT, F>(add_energy_grad_v<P, F>(g, y, cv), y, z);
}

// gz of elements in no window (their output gradient is 0)
template <typename F, int ACT, int P>
inline void grad_only(const F* z, F* gz, int64_t n, const Vec<F>& cv) {
  constexpr int64_t V = Vec<F>::size();
  const Vec<F> zero(F(0));
  for (int64_t j = 0; j < n; j += V) {
    const int64_t c = std::min(V, n - j);
    const Vec<F> zv = c == V ? Vec<F>::loadu(z + j) : Vec<F>::loadu(z + j, c);
    const Vec<F> out = act_grad_v<F, ACT, P>(zero, act_v<ACT, F>(zv), zv, cv);
    if (c == V) out.store(gz + j);
    else out.store(gz + j, static_cast<int>(c));
  }
}

// one output row of the fused backward: gz rows q0 (and q1) from the pooled gradient g and the input
// rows r0 (and r1), each window's element found again as the forward found it
template <typename F, int ACT, int P, int KH>
inline void act_unpool_row(const F* g, const F* r0, const F* r1, F* q0, F* q1, int64_t OW, const Vec<F>& cv) {
  constexpr int64_t V = Vec<F>::size();
  const Vec<F> zero(F(0));
  for (int64_t ow = 0; ow < OW; ow += V) {
    const int64_t n = std::min(V, OW - ow);
    Vec<F> y0, y1, y2, y3, z0, z1, z2, z3;
    load_pairs<F, ACT, 0>(r0 + 2 * ow, n, y0, y1, &z0, &z1, nullptr, nullptr);
    WinMax<F> w(y0);
    w.template take<true>(y1, F(1));
    if constexpr (KH == 2) {
      load_pairs<F, ACT, 0>(r1 + 2 * ow, n, y2, y3, &z2, &z3, nullptr, nullptr);
      w.template take<true>(y2, F(2));
      w.template take<true>(y3, F(3));
    }
    const Vec<F> gv = n == V ? Vec<F>::loadu(g + ow) : Vec<F>::loadu(g + ow, n);
    auto pick = [&](F i) { return Vec<F>::blendv(zero, gv, w.k == Vec<F>(i)); };
    auto [a, b] = at::vec::interleave2(act_grad_v<F, ACT, P>(pick(F(0)), y0, z0, cv),
                                       act_grad_v<F, ACT, P>(pick(F(1)), y1, z1, cv));
    store_pair(q0 + 2 * ow, 2 * n, a, b);
    if constexpr (KH == 2) {
      auto [c, d] = at::vec::interleave2(act_grad_v<F, ACT, P>(pick(F(2)), y2, z2, cv),
                                         act_grad_v<F, ACT, P>(pick(F(3)), y3, z3, cv));
      store_pair(q1 + 2 * ow, 2 * n, c, d);
    }
  }
}

// z viewed as R = G*M rows of `pr` planes of H x W (H = 1 for dims 1); energy per row, then e[g]
template <typename F, int ACT, int P, int KH, bool KEEP>
void act_pool2_fwd_kernel(const F* z, F* y, uint8_t* idx, int64_t G, int64_t M, int64_t pr, int64_t H, int64_t W,
                          double scale, F* e) {
  const int64_t OH = KH == 2 ? H / 2 : H, OW = W / 2, R = G * M;
  std::vector<double> part(R, 0.0);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, pr * H * W));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double s = 0.0;
      for (int64_t pl = 0; pl < pr; ++pl) {
        const int64_t plane = r * pr + pl;
        const F* zp = z + plane * H * W;
        F* yp = y + plane * OH * OW;
        uint8_t* ipp = KEEP ? idx + plane * OH * OW : nullptr;
        Acc4<F> acc;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const F* r0 = zp + (KH == 2 ? 2 * oh : oh) * W;
          const F* r1 = KH == 2 ? r0 + W : nullptr;
          act_pool_row<F, ACT, P, KH, KEEP>(r0, r1, yp + oh * OW, KEEP ? ipp + oh * OW : nullptr, OW, acc);
          if (P != 0 && W % 2) {  // the last column is in no window
            energy_only<F, ACT, P>(r0 + W - 1, 1, acc);
            if constexpr (KH == 2) energy_only<F, ACT, P>(r1 + W - 1, 1, acc);
          }
        }
        if (P != 0 && KH == 2 && H % 2) energy_only<F, ACT, P>(zp + (H - 1) * W, W, acc);  // nor is the last row
        if constexpr (P != 0) s += acc.flush();
      }
      part[r] = s;
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    double s = 0.0;
    for (int64_t m = 0; m < M; ++m) s += part[g * M + m];
    e[g] = static_cast<F>(s * scale);
  }
}

template <typename F, int ACT, int P, int KH>
void act_pool2_bwd_kernel(const F* gy, const F* ge, const F* z, F* gz, int64_t G, int64_t M, int64_t pr, int64_t H,
                          int64_t W, double scale) {
  const int64_t OH = KH == 2 ? H / 2 : H, OW = W / 2, R = G * M;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, pr * H * W));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const F c = P == 0 ? F(0) : static_cast<F>(static_cast<double>(ge[r / M]) * scale);
      const Vec<F> cv(P == 2 ? F(2) * c : c);
      for (int64_t pl = 0; pl < pr; ++pl) {
        const int64_t plane = r * pr + pl;
        const F* zp = z + plane * H * W;
        F* qp = gz + plane * H * W;
        const F* gp = gy + plane * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
          const int64_t h0 = KH == 2 ? 2 * oh : oh;
          act_unpool_row<F, ACT, P, KH>(gp + oh * OW, zp + h0 * W, KH == 2 ? zp + (h0 + 1) * W : nullptr,
                                        qp + h0 * W, KH == 2 ? qp + (h0 + 1) * W : nullptr, OW, cv);
          if (W % 2) {
            grad_only<F, ACT, P>(zp + h0 * W + W - 1, qp + h0 * W + W - 1, 1, cv);
            if constexpr (KH == 2) grad_only<F, ACT, P>(zp + (h0 + 1) * W + W - 1, qp + (h0 + 1) * W + W - 1, 1, cv);
          }
        }
        if (KH == 2 && H % 2) grad_only<F, ACT, P>(zp + (H - 1) * W, qp + (H - 1) * W, W, cv);
      }
    }
  });
}

struct PoolShape {
  int64_t G, M, pr, H, W;
  double scale;
};

// z [B, ...] (groups 0) or [G, B, ...] (groups G), pooled over its last `dims` dims, which follow the lead dims
PoolShape pool_shape(const Tensor& z, bool mean, int64_t groups, int64_t dims) {
  const EpiShape s = epilogue_shape(z, mean, groups);
  const int64_t lead = groups > 0 ? 2 : 1;
  TORCH_CHECK(dims == 1 || dims == 2, "minaction: epilogue_pool2 pools the last 1 or 2 dims, got dims=", dims);
  TORCH_CHECK(z.dim() >= lead + dims, "minaction: epilogue_pool2 with dims=", dims, " needs ", dims,
              " pooled dims after the ", lead == 2 ? "[models, batch]" : "batch", " dims, got shape ", z.sizes());
  const int64_t W = z.size(-1), H = dims == 2 ? z.size(-2) : 1;
  TORCH_CHECK(W >= 2 && (dims == 1 || H >= 2), "minaction: epilogue_pool2 needs every pooled dim >= 2, got shape ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "minaction: epilogue_pool2 takes float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.device().is_cpu(), "minaction: epilogue_pool2 input must be a CPU tensor, got ", z.device());
  return {s.G, s.M, s.N / (H * W), H, W, s.scale};
}

// primitives. Forward: (y pooled, uint8 window positions when keep_idx (else empty), e)
std::tuple<Tensor, Tensor, Tensor> act_pool2_fwd(const Tensor& z_in, int64_t act, int64_t p, bool mean, int64_t groups,
                                                 int64_t dims, bool keep_idx) {
  const PoolShape s = pool_shape(z_in, mean, groups, dims);
  Tensor z = z_in.contiguous();
  Tensor y = at::empty(pooled_shape(z, dims), z.options());
  Tensor idx = keep_idx ? at::empty(pooled_shape(z, dims), z.options().dtype(at::kByte))
                        : at::empty({0}, z.options().dtype(at::kByte));
  Tensor e = groups > 0 ? at::empty({s.G}, z.options()) : at::empty({}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "minaction_act_pool2_fwd", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* ip = keep_idx ? idx.mutable_data_ptr<uint8_t>() : nullptr;
    scalar_t* ep = e.mutable_data_ptr<scalar_t>();
    dispatch_act_p(act, p, [&](auto A, auto P) {
      constexpr int a = decltype(A)::value, pp = decltype(P)::value;
      auto run = [&](auto KH, auto KEEP) {
        act_pool2_fwd_kernel<scalar_t, a, pp, decltype(KH)::value, decltype(KEEP)::value>(zp, yp, ip, s.G, s.M, s.pr,
                                                                                         s.H, s.W, s.scale, ep);
      };
      using one = std::integral_constant<int, 1>;
      using two = std::integral_constant<int, 2>;
      if (dims == 2) keep_idx ? run(two(), std::true_type()) : run(two(), std::false_type());
      else keep_idx ? run(one(), std::true_type()) : run(one(), std::false_type());
    });
  });
  return {y, idx, e};
}

Tensor act_pool2_bwd(const Tensor& gy_in, const Tensor& ge_in, const Tensor& z_in, int64_t act, int64_t p, bool mean,
                     int64_t groups, int64_t dims) {
  const PoolShape s = pool_shape(z_in, mean, groups, dims);
  Tensor z = z_in.contiguous();
  const auto pooled = pooled_shape(z, dims);
  TORCH_CHECK(gy_in.sizes() == c10::IntArrayRef(pooled), "minaction: epilogue_pool2 backward: grad ", gy_in.sizes(),
              " does not match the pooled input ", c10::IntArrayRef(pooled));
  TORCH_CHECK(ge_in.numel() == s.G, "minaction: grad_energy must have ", s.G, " elements, got ", ge_in.numel());
  Tensor gy = gy_in.to(z.scalar_type()).contiguous();
  Tensor ge = ge_in.to(z.scalar_type()).contiguous();
  Tensor gz = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "minaction_act_pool2_bwd", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* gep = ge.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* qp = gz.mutable_data_ptr<scalar_t>();
    dispatch_act_p(act, p, [&](auto A, auto P) {
      constexpr int a = decltype(A)::value, pp = decltype(P)::value;
      if (dims == 2) act_pool2_bwd_kernel<scalar_t, a, pp, 2>(gp, gep, zp, qp, s.G, s.M, s.pr, s.H, s.W, s.scale);
      else act_pool2_bwd_kernel<scalar_t, a, pp, 1>(gp, gep, zp, qp, s.G, s.M, s.pr, s.H, s.W, s.scale);
    });
  });
  return gz;
}

std::tuple<Tensor, Tensor, Tensor> call_act_pool2_fwd(const Tensor& z, int64_t act, int64_t p, bool mean,
                                                      int64_t groups, int64_t dims, bool keep_idx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::act_pool2_fwd", "")
                       .typed<decltype(act_pool2_fwd)>();
  return op.call(z, act, p, mean, groups, dims, keep_idx);
}

Tensor call_act_pool2_bwd(const Tensor& gy, const Tensor& ge, const Tensor& z, int64_t act, int64_t p, bool mean,
                          int64_t groups, int64_t dims) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::act_pool2_bwd", "")
                       .typed<decltype(act_pool2_bwd)>();
  return op.call(gy, ge, z, act, p, mean, groups, dims);
}

class ActPool2Fn : public torch::autograd::Function<ActPool2Fn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& z, int64_t act, int64_t p, bool mean,
                               int64_t groups, int64_t dims, double penalty) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, unused, e] = call_act_pool2_fwd(z, act, p, mean, groups, dims, false);
    ctx->save_for_backward({z});
    ctx->set_materialize_grads(false);
    ctx->saved_data["act"] = act;
    ctx->saved_data["p"] = p;
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["dims"] = dims;
    ctx->saved_data["penalty"] = penalty;
    return {y, e};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor z = ctx->get_saved_variables()[0];
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool mean = ctx->saved_data["mean"].toBool();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const int64_t dims = ctx->saved_data["dims"].toInt();
    const variable_list none = {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    auto with = [&](Tensor gz) {
      variable_list out = {std::move(gz)};
      out.insert(out.end(), none.begin(), none.end());
      return out;
    };
    if (!ctx->needs_input_grad(0)) return with(Tensor());
    // the penalty as the epilogue's: + penalty on the energy's gradient, once per forward
    const double penalty = ctx->saved_data["penalty"].toDouble();
    if (penalty != 0.0) ctx->saved_data["penalty"] = 0.0;
    const int64_t p = (grads[1].defined() || penalty != 0.0) ? ctx->saved_data["p"].toInt() : 0;
    const EpiShape s = epilogue_shape(z, mean, groups);
    auto energy_grad = [&]() -> Tensor {
      Tensor own = penalty != 0.0 ? at::full({s.G}, penalty, z.options()) : Tensor();
      if (!grads[1].defined()) return own;
      Tensor g = grads[1].to(z.scalar_type()).reshape({s.G});
      return own.defined() ? g + own : g;
    };
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): differentiable recomputation (the epilogue's) through the forward's
      // windows, whose positions the forward kernel gives again
      Tensor idx;
      {
        at::AutoDispatchBelowADInplaceOrView guard;
        idx = std::get<1>(call_act_pool2_fwd(z.detach(), act, 0, mean, groups, dims, true));
      }
      Tensor gy = grads[0].defined() ? maxpool2_bwd_composite(grads[0], idx, z.sizes(), dims) : Tensor();
      Tensor gz = recomputed_grads(apply_act_composite(z, act), gy, p != 0 ? energy_grad() : Tensor(), p, groups,
                                   s.scale, {z}, /*create_graph=*/true)[0];
      return with(gz.defined() ? gz : at::zeros_like(z));
    }
    Tensor gy = grads[0].defined() ? grads[0] : at::zeros(pooled_shape(z, dims), z.options());
    Tensor ge = p != 0 ? energy_grad() : at::zeros({s.G}, z.options());
    return with(call_act_pool2_bwd(gy, ge, z, act, p, mean, groups, dims));
  }
};

std::tuple<Tensor, Tensor> epilogue_pool2_autograd(const Tensor& z, int64_t act, int64_t p, bool mean, int64_t groups,
                                                   int64_t dims, double penalty) {
  auto out = ActPool2Fn::apply(z, act, p, mean, groups, dims, penalty);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> epilogue_pool2_noautograd(const Tensor& z, int64_t act, int64_t p, bool mean,
                                                     int64_t groups, int64_t dims, double /*penalty*/) {
  auto [y, idx, e] = call_act_pool2_fwd(z, act, p, mean, groups, dims, false);
  return {y, e};
}

// ------------------------------------------------------------------ the cnn's first block on images, fused
// minaction::conv_pool2(x, w, b, act, p, mean, pad): max_pool2(act(conv2d(x, w, b, padding=pad)), 2) and the
// epilogue's E of act(conv2d(...)), for one input channel: x [B, 1, H, W] with H, W even, w [C, 1, k, k]
// with k odd and pad = k / 2, stride 1. The study's image and spike models start so (1 x 28 x 28, 16
// channels): oneDNN ran that convolution at ~30 GFLOP/s (9 multiply-adds per output) and its output and
// gradient (the block's largest tensors) went through memory four times. Here the conv output is never
// stored: per sample, the padded image is split into even and odd columns (it stays in L1), each pooled
// row's 2 x 2 windows are computed in registers, activated, summed into E and pooled; the backward computes
// them again and accumulates the weight and bias gradients directly. Deterministic: per-sample partial sums
// reduced in sample order. Values equal the unfused block to float rounding (another summation order than
// oneDNN's); the element chosen in a window is max_pool2's rule on these values. No input gradient: the
// Python side uses this op only when x does not require one (a create_graph backward recomputes with
// differentiable ops, input gradient included).

template <typename F>
struct SplitImage {  // one sample's zero-padded image, even columns in e, odd in o, rows of stride S
  int64_t Hp, Q, S;
  std::vector<F> e, o;
  SplitImage(int64_t H, int64_t W, int64_t pad)
      : Hp(H + 2 * pad), Q((W + 2 * pad) / 2), S(Q + Vec<F>::size()), e(Hp * S, F(0)), o(Hp * S, F(0)) {}
  void fill(const F* x, int64_t H, int64_t W, int64_t pad) {
    for (int64_t r = 0; r < H; ++r) {
      const F* xr = x + r * W;
      F* er = e.data() + (r + pad) * S;
      F* orow = o.data() + (r + pad) * S;
      for (int64_t c = 0; c < W; ++c) {  // padded column c + pad: even -> e, odd -> o
        const int64_t pc = c + pad;
        ((pc & 1) ? orow : er)[pc >> 1] = xr[c];
      }
    }
  }
};

// the 2 x 2 window rows (h0 = 2 oh, h1 = 2 oh + 1) of one channel at pooled columns ow.. (V lanes):
// z_e0/z_o0 = conv output at row h0, even/odd columns; z_e1/z_o1 at row h1
// (K a compile-time constant: the loops unroll and the K*K weights stay in registers)
template <typename F, int K>
inline void conv_window_rows(const SplitImage<F>& im, int64_t oh, int64_t ow, const Vec<F>* wv, const Vec<F>& bv,
                             Vec<F>& ze0, Vec<F>& zo0, Vec<F>& ze1, Vec<F>& zo1) {
  constexpr int pad = K / 2, k = K;
  ze0 = zo0 = ze1 = zo1 = bv;
  Vec<F> xe[pad + 1], xo[pad + 1];
  for (int r = 0; r <= K; ++r) {  // padded input rows 2 oh + r feed rows h0 (kernel row r) and h1 (r - 1)
    const F* er = im.e.data() + (2 * oh + r) * im.S + ow;
    const F* orow = im.o.data() + (2 * oh + r) * im.S + ow;
    for (int s = 0; s <= pad; ++s) {
      xe[s] = Vec<F>::loadu(er + s);
      xo[s] = Vec<F>::loadu(orow + s);
    }
    const int i0 = r, i1 = r - 1;  // the kernel row this input row is for h0 / h1
    for (int j = 0; j < k; ++j) {
      // z_e[ow] += w_ij x[2ow + j];  z_o[ow] += w_ij x[2ow + 1 + j]
      const Vec<F>& a = (j & 1) ? xo[j >> 1] : xe[j >> 1];
      const Vec<F>& c = (j & 1) ? xe[(j + 1) >> 1] : xo[j >> 1];
      if (i0 < k) {
        ze0 = at::vec::fmadd(wv[i0 * k + j], a, ze0);
        zo0 = at::vec::fmadd(wv[i0 * k + j], c, zo0);
      }
      if (i1 >= 0) {
        ze1 = at::vec::fmadd(wv[i1 * k + j], a, ze1);
        zo1 = at::vec::fmadd(wv[i1 * k + j], c, zo1);
      }
    }
  }
}

template <typename F, int ACT, int P, int K>
void conv_pool2_fwd_kernel(const F* x, const F* w, const F* b, F* y, F* e, int64_t B, int64_t C, int64_t H,
                           int64_t W, double scale) {
  constexpr int64_t k = K;
  constexpr int64_t V = Vec<F>::size();
  const int64_t OH = H / 2, OW = W / 2, pad = k / 2;
  std::vector<double> part(B, 0.0);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    SplitImage<F> im(H, W, pad);
    Vec<F> wv[K * K];
    for (int64_t s = begin; s < end; ++s) {
      im.fill(x + s * H * W, H, W, pad);
      double es = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t q = 0; q < k * k; ++q) wv[q] = Vec<F>(w[c * k * k + q]);
        const Vec<F> bv(b ? b[c] : F(0));
        F* yc = y + (s * C + c) * OH * OW;
        Acc4<F> acc;
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ow += V) {
            const int64_t n = std::min(V, OW - ow);
            Vec<F> z0, z1, z2, z3;
            conv_window_rows<F, K>(im, oh, ow, wv, bv, z0, z1, z2, z3);
            const Vec<F> y0 = act_v<ACT, F>(z0), y1 = act_v<ACT, F>(z1), y2 = act_v<ACT, F>(z2),
                         y3 = act_v<ACT, F>(z3);
            acc_masked<P, F>(acc.a0, y0, n);
            acc_masked<P, F>(acc.a1, y1, n);
            acc_masked<P, F>(acc.a2, y2, n);
            acc_masked<P, F>(acc.a3, y3, n);
            WinMax<F> wm(y0);
            wm.template take<false>(y1, F(1));
            wm.template take<false>(y2, F(2));
            wm.template take<false>(y3, F(3));
            if (n == V) wm.m.store(yc + oh * OW + ow);
            else wm.m.store(yc + oh * OW + ow, static_cast<int>(n));
          }
        }
        if constexpr (P != 0) es += acc.flush();
      }
      part[s] = es;
    }
  });
  double tot = 0.0;
  for (int64_t s = 0; s < B; ++s) tot += part[s];
  e[0] = static_cast<F>(tot * scale);
}

template <typename F, int ACT, int P, int K>
void conv_pool2_bwd_kernel(const F* gy, F ge, const F* x, const F* w, const F* b, F* gw, F* gb, int64_t B, int64_t C,
                           int64_t H, int64_t W, double scale) {
  constexpr int64_t k = K;
  constexpr int64_t V = Vec<F>::size();
  const int64_t OH = H / 2, OW = W / 2, pad = k / 2, KK = k * k;
  const F cs = P == 0 ? F(0) : static_cast<F>(static_cast<double>(ge) * scale);
  const Vec<F> cv(P == 2 ? F(2) * cs : cs);
  std::vector<double> pw(B * C * KK, 0.0), pb(B * C, 0.0);  // per-sample partial sums
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    SplitImage<F> im(H, W, pad);
    Vec<F> wv[K * K], aw[K * K];
    const Vec<F> zero(F(0));
    for (int64_t s = begin; s < end; ++s) {
      im.fill(x + s * H * W, H, W, pad);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t q = 0; q < KK; ++q) {
          wv[q] = Vec<F>(w[c * KK + q]);
          aw[q] = zero;
        }
        Vec<F> ab = zero;
        const Vec<F> bv(b ? b[c] : F(0));
        const F* gc = gy + (s * C + c) * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
          for (int64_t ow = 0; ow < OW; ow += V) {
            const int64_t n = std::min(V, OW - ow);
            Vec<F> z0, z1, z2, z3;
            conv_window_rows<F, K>(im, oh, ow, wv, bv, z0, z1, z2, z3);
            const Vec<F> y0 = act_v<ACT, F>(z0), y1 = act_v<ACT, F>(z1), y2 = act_v<ACT, F>(z2),
                         y3 = act_v<ACT, F>(z3);
            WinMax<F> wm(y0);
            wm.template take<true>(y1, F(1));
            wm.template take<true>(y2, F(2));
            wm.template take<true>(y3, F(3));
            const Vec<F> gv = n == V ? Vec<F>::loadu(gc + oh * OW + ow) : Vec<F>::loadu(gc + oh * OW + ow, n);
            auto grad = [&](F i, const Vec<F>& yy, const Vec<F>& zz) {
              const Vec<F> g = act_grad_v<F, ACT, P>(Vec<F>::blendv(zero, gv, wm.k == Vec<F>(i)), yy, zz, cv);
              return n == V ? g : Vec<F>::set(zero, g, n);  // lanes past the row: no gradient
            };
            const Vec<F> g0 = grad(F(0), y0, z0), g1 = grad(F(1), y1, z1), g2 = grad(F(2), y2, z2),
                         g3 = grad(F(3), y3, z3);
            ab = ab + ((g0 + g1) + (g2 + g3));
            for (int r = 0; r <= K; ++r) {
              const F* er = im.e.data() + (2 * oh + r) * im.S + ow;
              const F* orow = im.o.data() + (2 * oh + r) * im.S + ow;
              const int i0 = r, i1 = r - 1;
              for (int j = 0; j < K; ++j) {
                const Vec<F> a = Vec<F>::loadu(((j & 1) ? orow : er) + (j >> 1));
                const Vec<F> cc = Vec<F>::loadu(((j & 1) ? er + ((j + 1) >> 1) : orow + (j >> 1)));
                if (i0 < k) aw[i0 * k + j] = at::vec::fmadd(g0, a, at::vec::fmadd(g1, cc, aw[i0 * k + j]));
                if (i1 >= 0) aw[i1 * k + j] = at::vec::fmadd(g2, a, at::vec::fmadd(g3, cc, aw[i1 * k + j]));
              }
            }
          }
        }
        for (int64_t q = 0; q < KK; ++q) pw[(s * C + c) * KK + q] = hsum(aw[q]);
        pb[s * C + c] = hsum(ab);
      }
    }
  });
  for (int64_t q = 0; q < C * KK; ++q) {
    double t = 0.0;
    for (int64_t s = 0; s < B; ++s) t += pw[s * C * KK + q];
    gw[q] = static_cast<F>(t);
  }
  if (gb)
    for (int64_t c = 0; c < C; ++c) {
      double t = 0.0;
      for (int64_t s = 0; s < B; ++s) t += pb[s * C + c];
      gb[c] = static_cast<F>(t);
    }
}

template <typename Fn>
void dispatch_k(int64_t k, Fn&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: TORCH_CHECK(false, "minaction: conv_pool2 takes kernel sizes 1, 3, 5 or 7, got ", k);
  }
}

void check_conv_pool2(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1, "minaction: conv_pool2 takes x [B, 1, H, W], got ", x.sizes());
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0 && x.size(2) >= 2 && x.size(3) >= 2,
              "minaction: conv_pool2 needs even H and W, got ", x.sizes());
  TORCH_CHECK(w.dim() == 4 && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1 && w.size(2) <= 7,
              "minaction: conv_pool2 takes w [C, 1, k, k] with k 1, 3, 5 or 7, got ", w.sizes());
  TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->size(0) == w.size(0)), "minaction: conv_pool2 bias must be [",
              w.size(0), "]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "minaction: conv_pool2 takes CPU tensors");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) && w.scalar_type() == x.scalar_type() &&
                  (!b.has_value() || b->scalar_type() == x.scalar_type()),
              "minaction: conv_pool2 takes float32 or float64 tensors of one dtype");
}

double conv_pool2_scale(const Tensor& x, const Tensor& w, bool mean) {
  const double B = static_cast<double>(std::max<int64_t>(x.size(0), 1));
  const double N = static_cast<double>(w.size(0) * x.size(2) * x.size(3));
  return 1.0 / (B * (mean ? N : 1.0));
}

std::tuple<Tensor, Tensor> conv_pool2_fwd(const Tensor& x_in, const Tensor& w_in, const std::optional<Tensor>& b_in,
                                          int64_t act, int64_t p, bool mean) {
  check_conv_pool2(x_in, w_in, b_in);
  Tensor x = x_in.contiguous(), w = w_in.contiguous();
  Tensor b = b_in.has_value() ? b_in->contiguous() : Tensor();
  const int64_t B = x.size(0), C = w.size(0), H = x.size(2), W = x.size(3), k = w.size(2);
  Tensor y = at::empty({B, C, H / 2, W / 2}, x.options());
  Tensor e = at::empty({}, x.options());
  const double scale = conv_pool2_scale(x, w, mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minaction_conv_pool2_fwd", [&] {
    dispatch_act_p(act, p, [&](auto A, auto P) {
      dispatch_k(k, [&](auto KC) {
        conv_pool2_fwd_kernel<scalar_t, decltype(A)::value, decltype(P)::value, decltype(KC)::value>(
            x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
            e.mutable_data_ptr<scalar_t>(), B, C, H, W, scale);
      });
    });
  });
  return {y, e};
}

std::tuple<Tensor, Tensor> conv_pool2_bwd(const Tensor& gy_in, const Tensor& ge_in, const Tensor& x_in,
                                          const Tensor& w_in, const std::optional<Tensor>& b_in, int64_t act, int64_t p,
                                          bool mean) {
  check_conv_pool2(x_in, w_in, b_in);
  Tensor x = x_in.contiguous(), w = w_in.contiguous();
  Tensor b = b_in.has_value() ? b_in->contiguous() : Tensor();
  const int64_t B = x.size(0), C = w.size(0), H = x.size(2), W = x.size(3), k = w.size(2);
  TORCH_CHECK(gy_in.sizes() == c10::IntArrayRef({B, C, H / 2, W / 2}), "minaction: conv_pool2 backward: grad ",
              gy_in.sizes(), " does not match the output [", B, ", ", C, ", ", H / 2, ", ", W / 2, "]");
  Tensor gy = gy_in.to(x.scalar_type()).contiguous();
  Tensor gw = at::empty_like(w);
  Tensor gb = b.defined() ? at::empty_like(b) : at::empty({0}, x.options());
  const double scale = conv_pool2_scale(x, w, mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "minaction_conv_pool2_bwd", [&] {
    const scalar_t ge = p != 0 ? ge_in.to(x.scalar_type()).item<scalar_t>() : scalar_t(0);
    dispatch_act_p(act, p, [&](auto A, auto P) {
      dispatch_k(k, [&](auto KC) {
        conv_pool2_bwd_kernel<scalar_t, decltype(A)::value, decltype(P)::value, decltype(KC)::value>(
            gy.const_data_ptr<scalar_t>(), ge, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, gw.mutable_data_ptr<scalar_t>(),
            b.defined() ? gb.mutable_data_ptr<scalar_t>() : nullptr, B, C, H, W, scale);
      });
    });
  });
  return {gw, gb};
}

class ConvPool2Fn : public torch::autograd::Function<ConvPool2Fn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                               int64_t act, int64_t p, bool mean, double penalty) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("minaction::conv_pool2_fwd", "")
                         .typed<decltype(conv_pool2_fwd)>();
    auto [y, e] = op.call(x, w, b, act, p, mean);
    ctx->save_for_backward({x, w, b.has_value() ? *b : Tensor()});
    ctx->set_materialize_grads(false);
    ctx->saved_data["act"] = act;
    ctx->saved_data["p"] = p;
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["penalty"] = penalty;
    return {y, e};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2];
    const int64_t act = ctx->saved_data["act"].toInt();
    const bool mean = ctx->saved_data["mean"].toBool();
    const variable_list none = {Tensor(), Tensor(), Tensor(), Tensor()};
    auto with = [&](Tensor gx, Tensor gw, Tensor gb) {
      variable_list out = {std::move(gx), std::move(gw), std::move(gb)};
      out.insert(out.end(), none.begin(), none.end());
      return out;
    };
    const double penalty = ctx->saved_data["penalty"].toDouble();
    if (penalty != 0.0) ctx->saved_data["penalty"] = 0.0;
    const int64_t p = (grads[1].defined() || penalty != 0.0) ? ctx->saved_data["p"].toInt() : 0;
    Tensor ge;
    if (p != 0) {
      ge = penalty != 0.0 ? at::full({}, penalty, x.options()) : at::zeros({}, x.options());
      if (grads[1].defined()) ge = ge + grads[1].to(x.scalar_type()).reshape({});
    }
    const bool nb = b.defined() && ctx->needs_input_grad(2);
    if (at::GradMode::is_enabled() || ctx->needs_input_grad(0)) {
      // differentiable recomputation (a create_graph backward, or an input gradient): the unfused block,
      // its windows found on the recomputed activation (oneDNN's values may differ from the kernel's by
      // rounding, so in a near tie the window's element may differ from the forward's)
      const bool create_graph = at::GradMode::is_enabled();
      at::AutoGradMode grad_on(true);
      Tensor z = at::conv2d(x, w, b, 1, w.size(2) / 2);
      Tensor gy;
      if (grads[0].defined()) {
        Tensor idx = std::get<1>(call_act_pool2_fwd(z.detach(), act, 0, mean, 0, 2, true));
        gy = maxpool2_bwd_composite(grads[0], idx, z.sizes(), 2);
      }
      std::vector<Tensor> inputs;
      std::vector<int> which;
      if (ctx->needs_input_grad(0)) { inputs.push_back(x); which.push_back(0); }
      if (ctx->needs_input_grad(1)) { inputs.push_back(w); which.push_back(1); }
      if (nb) { inputs.push_back(b); which.push_back(2); }
      auto gs = recomputed_grads(apply_act_composite(z, act), gy, ge, p, 0, conv_pool2_scale(x, w, mean), inputs,
                                 create_graph);
      Tensor out3[3];
      for (size_t q = 0; q < which.size(); ++q) out3[which[q]] = gs[q];
      return with(out3[0], out3[1], out3[2]);
    }
    if (!ctx->needs_input_grad(1) && !nb) return with(Tensor(), Tensor(), Tensor());
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("minaction::conv_pool2_bwd", "")
                         .typed<decltype(conv_pool2_bwd)>();
    Tensor gy = grads[0].defined() ? grads[0] : at::zeros({x.size(0), w.size(0), x.size(2) / 2, x.size(3) / 2},
                                                          x.options());
    auto [gw, gb] = op.call(gy, p != 0 ? ge : at::zeros({}, x.options()), x, w,
                            b.defined() ? std::optional<Tensor>(b) : std::nullopt, act, p, mean);
    return with(Tensor(), ctx->needs_input_grad(1) ? gw : Tensor(), nb ? gb : Tensor());
  }
};

std::tuple<Tensor, Tensor> conv_pool2_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                               int64_t act, int64_t p, bool mean, double penalty) {
  auto out = ConvPool2Fn::apply(x, w, b, act, p, mean, penalty);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> conv_pool2_noautograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                                                 int64_t act, int64_t p, bool mean, double /*penalty*/) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minaction::conv_pool2_fwd", "")
                       .typed<decltype(conv_pool2_fwd)>();
  return op.call(x, w, b, act, p, mean);
}

// ------------------------------------------------------------------ rate-coded spikes (the spike datasets)
// minaction::rate_spikes(p, seed, T) -> s [B, T, *rest] float: s[b, t, j] = 1 where u < p[b, j], else 0,
// with u the uniform float32 numbers torch.rand((B, T, *rest), generator=torch.Generator().manual_seed(seed))
// draws, in the same order: torch's CPU generator is MT19937 seeded with the seed's low 32 bits
// (init_genrand), and a float32 uniform is (output & (2^24 - 1)) * 2^-24. So the spikes equal
// torch.rand(...).lt_(p.unsqueeze(1)) bit for bit (tests/data check it against torch). torch draws one
// number per element through a locked, serial, per-element kernel (~3 ns each here); this generates
// the stream 624 words at a time in plain loops the ISA build vectorises, and compares in the same pass.
struct MT19937 {
  static constexpr int N = 624, Mm = 397;
  uint32_t s[N];
  explicit MT19937(uint32_t seed) {
    s[0] = seed;
    for (int j = 1; j < N; ++j) s[j] = 1812433253u * (s[j - 1] ^ (s[j - 1] >> 30)) + static_cast<uint32_t>(j);
  }
  static inline uint32_t mix(uint32_t a, uint32_t b, uint32_t c) {  // c ^ twist(a's upper bit, b's lower bits)
    const uint32_t y = (a & 0x80000000u) | (b & 0x7fffffffu);
    return c ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
  }
  void twist() {  // three loops without wrap-around indexing (each one vectorisable)
    for (int k = 0; k < N - Mm; ++k) s[k] = mix(s[k], s[k + 1], s[k + Mm]);
    for (int k = N - Mm; k < N - 1; ++k) s[k] = mix(s[k], s[k + 1], s[k + Mm - N]);
    s[N - 1] = mix(s[N - 1], s[0], s[Mm - 1]);
  }
  // the next N numbers of the stream as torch's float32 uniforms: twist, tempering, (word & 2^24-1) * 2^-24
  void next_uniforms(float* u) {
    twist();
    for (int k = 0; k < N; ++k) {
      uint32_t y = s[k];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      u[k] = static_cast<float>(static_cast<int32_t>(y & 0xffffffu)) * (1.0f / 16777216.0f);
    }
  }
};

// COUNT false: out [B, T, R] = (u < p) per number of the stream, o-th output element = o-th number.
// COUNT true, the same stream counted: out [B, 1, R], c[b, j] = number of t with u[b, t, j] < p[b, j] (a
// float32 count, exact), so rate_spike_counts(p, seed, T) == rate_spikes(p, seed, T).sum(1, keepdim=True)
// without writing the T spike frames (a model that reads only their time mean divides by T).
template <typename T, bool COUNT>
void rate_spikes_kernel(const T* p, T* out, int64_t B, int64_t Tn, int64_t R, uint32_t seed) {
  MT19937 mt(seed);
  const int64_t total = B * Tn * R;
  alignas(64) float u[MT19937::N];
  if constexpr (COUNT) std::fill(out, out + B * R, T(0));
  int64_t o = 0;  // the o-th number of the stream
  while (o < total) {
    mt.next_uniforms(u);
    int64_t k = 0;
    while (k < MT19937::N && o < total) {  // compare, row by row of the pixel vector
      const int64_t j = o % R, row = o / R;  // row = b * Tn + t
      const int64_t b = row / Tn;
      const T* pr = p + b * R + j;
      const int64_t n = std::min<int64_t>(R - j, MT19937::N - k);
      if constexpr (COUNT) {
        T* dst = out + b * R + j;
        for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(u[k + i]) < static_cast<float>(pr[i]) ? T(1) : T(0);
      } else {
        T* dst = out + o;
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(u[k + i]) < static_cast<float>(pr[i]) ? T(1) : T(0);
      }
      k += n;
      o += n;
    }
  }
}

// rate_spikes (count false: [B, T, ...]) and rate_spike_counts (count true: [B, 1, ...]) of p [B, ...]
Tensor spikes_op(const Tensor& p_in, int64_t seed, int64_t T, bool count, const char* name) {
  TORCH_CHECK(p_in.device().is_cpu(), "minaction: ", name, " takes a CPU tensor, got ", p_in.device());
  TORCH_CHECK(p_in.scalar_type() == at::kFloat, "minaction: ", name, " takes float32 probabilities, got ",
              p_in.scalar_type());
  TORCH_CHECK(p_in.dim() >= 1, "minaction: ", name, " needs a batch dim, got shape ", p_in.sizes());
  TORCH_CHECK(T >= 1, "minaction: ", name, " needs T >= 1, got ", T);
  Tensor p = p_in.contiguous();
  std::vector<int64_t> shape(p.sizes().begin(), p.sizes().end());
  shape.insert(shape.begin() + 1, count ? 1 : T);
  Tensor out = at::empty(shape, p.options());
  const int64_t B = p.size(0);
  const int64_t R = B ? p.numel() / B : 0;
  const uint32_t s32 = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  if (out.numel() > 0) {
    if (count) rate_spikes_kernel<float, true>(p.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, T, R, s32);
    else rate_spikes_kernel<float, false>(p.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, T, R, s32);
  }
  return out;
}

Tensor rate_spikes(const Tensor& p, int64_t seed, int64_t T) { return spikes_op(p, seed, T, false, "rate_spikes"); }

Tensor rate_spike_counts(const Tensor& p, int64_t seed, int64_t T) {
  return spikes_op(p, seed, T, true, "rate_spike_counts");
}

// unit_stats(y, p, unit_dim): y [G, ...] viewed as [G, A, U, S] (U = y.size(unit_dim), A the dims between the
// first and unit_dim, S the dims after it): sums[g, u] = sum over a, s of |y|^p (p 1 or 2) and nnz[g] = the
// non-zero elements of member g (a NaN counts; -0.0 does not), both accumulated in double. One pass over y,
// where the torch ops it replaces (activation statistics: (y * y).sum(dims), sign().abs_(), nan_to_num_,
// a float64 sum) made four and a temporary per pass.
template <typename F, int P>
void unit_stats_kernel(const F* y, int64_t G, int64_t A, int64_t U, int64_t S, double* sums, double* nnz) {
  constexpr int64_t V = Vec<F>::size();
  const Vec<F> zero(F(0)), one(F(1));
  auto powv = [](const Vec<F>& v) { return P == 2 ? v * v : v.abs(); };
  auto pows = [](F v) { return static_cast<double>(P == 2 ? v * v : std::abs(v)); };
  at::parallel_for(0, G, 1, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      double* sg = sums + g * U;
      std::fill(sg, sg + U, 0.0);
      double count = 0.0;
      const F* yg = y + g * A * U * S;
      if (S >= V) {  // a plane of S values per (a, u): reduce it in vector lanes, then into its unit
        for (int64_t a = 0; a < A; ++a) {
          for (int64_t u = 0; u < U; ++u) {
            const F* pl = yg + (a * U + u) * S;
            Vec<F> sv = zero, cv = zero;
            int64_t i = 0;
            for (; i + V <= S; i += V) {
              const Vec<F> v = Vec<F>::loadu(pl + i);
              sv = sv + powv(v);
              cv = cv + Vec<F>::blendv(zero, one, v != zero);
            }
            double sd = hsum(sv), cd = hsum(cv);
            for (; i < S; ++i) {
              sd += pows(pl[i]);
              cd += pl[i] != F(0) ? 1.0 : 0.0;
            }
            sg[u] += sd;
            count += cd;
          }
        }
      } else {  // rows of R = U * S values (a linear layer: S = 1): per-position vector partials over
        // blocks of rows (at most 512 per block: float counts stay exact), then into the units in double
        const int64_t R = U * S;
        std::vector<F> ps(R), pc(R);
        for (int64_t a0 = 0; a0 < A; a0 += 512) {
          const int64_t a1 = std::min<int64_t>(A, a0 + 512);
          std::fill(ps.begin(), ps.end(), F(0));
          std::fill(pc.begin(), pc.end(), F(0));
          for (int64_t a = a0; a < a1; ++a) {
            const F* row = yg + a * R;
            int64_t j = 0;
            for (; j + V <= R; j += V) {
              const Vec<F> v = Vec<F>::loadu(row + j);
              (Vec<F>::loadu(ps.data() + j) + powv(v)).store(ps.data() + j);
              (Vec<F>::loadu(pc.data() + j) + Vec<F>::blendv(zero, one, v != zero)).store(pc.data() + j);
            }
            for (; j < R; ++j) {
              ps[j] += P == 2 ? row[j] * row[j] : std::abs(row[j]);
              pc[j] += row[j] != F(0) ? F(1) : F(0);
            }
          }
          for (int64_t j = 0; j < R; ++j) {
            sg[j / S] += static_cast<double>(ps[j]);
            count += static_cast<double>(pc[j]);
          }
        }
      }
      nnz[g] = count;
    }
  });
}

std::tuple<Tensor, Tensor> unit_stats(const Tensor& y_in, int64_t p, int64_t unit_dim) {
  TORCH_CHECK(y_in.device().is_cpu(), "minaction: unit_stats takes a CPU tensor, got ", y_in.device());
  TORCH_CHECK(y_in.scalar_type() == at::kFloat || y_in.scalar_type() == at::kDouble,
              "minaction: unit_stats takes float32 or float64, got ", y_in.scalar_type());
  TORCH_CHECK(p == 1 || p == 2, "minaction: unit_stats takes p 1 or 2, got ", p);
  TORCH_CHECK(y_in.dim() >= 2 && unit_dim >= 1 && unit_dim < y_in.dim(),
              "minaction: unit_stats needs y [G, ...] with 1 <= unit_dim < y.dim(), got shape ", y_in.sizes(),
              " and unit_dim ", unit_dim);
  Tensor y = y_in.contiguous();
  const int64_t G = y.size(0), U = y.size(unit_dim);
  int64_t A = 1, S = 1;
  for (int64_t d = 1; d < unit_dim; ++d) A *= y.size(d);
  for (int64_t d = unit_dim + 1; d < y.dim(); ++d) S *= y.size(d);
  Tensor sums = at::empty({G, U}, y.options().dtype(at::kDouble));
  Tensor nnz = at::empty({G}, y.options().dtype(at::kDouble));
  if (G == 0 || U == 0) return {sums.zero_(), nnz.zero_()};
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "minaction_unit_stats", [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    double* sp = sums.mutable_data_ptr<double>();
    double* np = nnz.mutable_data_ptr<double>();
    if (p == 2) unit_stats_kernel<scalar_t, 2>(yp, G, A, U, S, sp, np);
    else unit_stats_kernel<scalar_t, 1>(yp, G, A, U, S, sp, np);
  });
  return {sums, nnz};
}

}  // namespace

extern "C" const char* minaction_cpu_isa() { return MINACTION_ISA; }

TORCH_LIBRARY_IMPL(minaction, CPU, m) {
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("act_fwd", &act_fwd);
  m.impl("act_bwd", &act_bwd);
  m.impl("maxpool2_fwd", &maxpool2_fwd);
  m.impl("maxpool2_bwd", &maxpool2_bwd);
  m.impl("act_pool2_fwd", &act_pool2_fwd);
  m.impl("act_pool2_bwd", &act_pool2_bwd);
  m.impl("rate_spikes", &rate_spikes);
  m.impl("rate_spike_counts", &rate_spike_counts);
  m.impl("unit_stats", &unit_stats);
  m.impl("conv_pool2_fwd", &conv_pool2_fwd);
  m.impl("conv_pool2_bwd", &conv_pool2_bwd);
}

TORCH_LIBRARY_IMPL(minaction, Autograd, m) {
  m.impl("layer", &energy_linear_autograd);
  m.impl("epilogue", &epilogue_autograd);
  m.impl("max_pool2", &max_pool2_autograd);
  m.impl("epilogue_pool2", &epilogue_pool2_autograd);
  m.impl("conv_pool2", &conv_pool2_autograd);
}

TORCH_LIBRARY_IMPL(minaction, CompositeExplicitAutograd, m) {
  m.impl("layer", &energy_linear_noautograd);
  m.impl("epilogue", &epilogue_noautograd);
  m.impl("max_pool2", &max_pool2_noautograd);
  m.impl("epilogue_pool2", &epilogue_pool2_noautograd);
  m.impl("conv_pool2", &conv_pool2_noautograd);
}
