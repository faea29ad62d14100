// CUDA kernels of the fused energy operators: the activation + energy epilogue and the
// fused backward elementwise pass. The matrix products run in cuBLAS (called from the
// torch glue in energy_cuda.cpp); this file includes no torch headers so that CI can
// compile it alone with `nvcc -c -arch=sm_90`.
#include "energy_cuda.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kFwdThreads = 256;
constexpr int kFwdItems = 8;  // values per thread per block-iteration
constexpr int kBwdCols = 32;  // threadIdx.x: columns (coalesced)
constexpr int kBwdRowsThreads = 8;
constexpr int kBwdRowsPerThread = 16;
constexpr int kBwdRows = kBwdRowsThreads * kBwdRowsPerThread;  // rows per tile

// ----------------------------------------------------------------------------- dtype traits
template <typename T> struct Tr;
template <> struct Tr<float> {
  using C = float;  // compute type
  using E = float;  // energy type
  __device__ static C load(const float* p) { return *p; }
  __device__ static float store(C v) { return v; }
};
template <> struct Tr<double> {
  using C = double;
  using E = double;
  __device__ static C load(const double* p) { return *p; }
  __device__ static double store(C v) { return v; }
};
template <> struct Tr<__half> {
  using C = float;
  using E = float;
  __device__ static C load(const __half* p) { return __half2float(*p); }
  __device__ static __half store(C v) { return __float2half_rn(v); }
};
template <> struct Tr<__nv_bfloat16> {
  using C = float;
  using E = float;
  __device__ static C load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ static __nv_bfloat16 store(C v) { return __float2bfloat16_rn(v); }
};

// The scalar math is __host__ __device__ so that a host-side harness can check it without a
// GPU (tests/test_gpu_nan.py includes this file and runs it on the CPU).
#define MA_HD __host__ __device__ __forceinline__

MA_HD float d_erf(float x) { return erff(x); }
MA_HD double d_erf(double x) { return erf(x); }
MA_HD float d_exp(float x) { return expf(x); }
MA_HD double d_exp(double x) { return exp(x); }
MA_HD float d_tanh(float x) { return tanhf(x); }
MA_HD double d_tanh(double x) { return tanh(x); }

template <typename C> MA_HD C sigm(C z) { return C(1) / (C(1) + d_exp(-z)); }
// gelu(z, approximate="tanh") = z/2 (1 + tanh(u)) = z sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3):
// this is 2u (the sigmoid form has no cancellation in 1 + tanh(u) for negative u)
template <typename C> MA_HD C gelu_tanh_v(C z) { return C(1.5957691216057307) * (z + C(0.044715) * z * z * z); }

// NaN and Inf follow torch exactly: relu(nan) = nan (not `z > 0 ? z : 0`, which maps NaN to
// 0 and hides a diverged model), gelu(-inf) = silu(-inf) = nan, tanh(+-inf) = +-1.
template <typename C> MA_HD C act_fn(C z, int act) {
  switch (act) {
    case 1: return z < C(0) ? C(0) : z;
    case 2: return C(0.5) * z * (C(1) + d_erf(z * C(0.70710678118654752440)));
    case 3: return z * sigm(z);
    case 4: return d_tanh(z);
    case 5: return sigm(z);
    case 6: return z * sigm(gelu_tanh_v(z));
    default: return z;
  }
}

// d act / d z for gelu, silu, tanh, sigmoid (relu and identity: see act_bwd_value)
template <typename C> MA_HD C act_grad(C y, C z, int act) {
  switch (act) {
    case 2: {
      C cdf = C(0.5) * (C(1) + d_erf(z * C(0.70710678118654752440)));
      C pdf = d_exp(C(-0.5) * z * z) * C(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case 3: {
      C s = sigm(z);
      return s * (C(1) + z * (C(1) - s));
    }
    case 4: return C(1) - y * y;
    case 6: {
      C s = sigm(gelu_tanh_v(z));
      return s + z * s * (C(1) - s) * C(1.5957691216057307) * (C(1) + C(3 * 0.044715) * z * z);
    }
    default: return y * (C(1) - y);
  }
}

// gz from the output gradient g. relu is torch's threshold_backward, a select on the output
// (y <= 0 -> 0, else g: a NaN output passes g through, a NaN g where y <= 0 gives 0);
// identity passes g unchanged; the others multiply by the derivative as torch's formulas do.
template <typename C> MA_HD C act_bwd_value(C g, C y, C z, int act) {
  if (act == 1) return y <= C(0) ? C(0) : g;
  if (act == 0) return g;
  return g * act_grad<C>(y, z, act);
}

// c * d|y|^p / dy with c = ge[g] * scale; sign(nan) = 0 as torch's abs backward has it
template <typename C> MA_HD C energy_grad(C y, C c, int p) {
  if (p == 2) return C(2) * c * y;
  if (p == 1) return c * (y > C(0) ? C(1) : (y < C(0) ? C(-1) : C(0)));
  return C(0);
}

// block-wide sum; every thread gets the result in thread 0 only
template <typename E> __device__ E block_sum(E v, E* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  E s = E(0);
  if (threadIdx.x == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    for (int i = 0; i < nw; ++i) s += shm[i];  // fixed order: deterministic
  }
  return s;
}

// ----------------------------------------------------------------------------- forward epilogue
// grid (blocks, G); each block handles a contiguous chunk of kFwdThreads*kFwdItems values
// per iteration, striding by gridDim.x chunks.
template <typename T>
__global__ void act_fwd_kernel(const T* z, T* y,  // y may alias z: no __restrict__
                               typename Tr<T>::E* __restrict__ part, int64_t L,
                               int act, int p) {
  using C = typename Tr<T>::C;
  using E = typename Tr<T>::E;
  __shared__ E shm[kFwdThreads / 32];
  const int64_t g = blockIdx.y;
  const T* zg = z + g * L;
  T* yg = y + g * L;
  E acc = E(0);
  const int64_t chunk = (int64_t)kFwdThreads * kFwdItems;
  for (int64_t base = (int64_t)blockIdx.x * chunk; base < L; base += (int64_t)gridDim.x * chunk) {
#pragma unroll
    for (int i = 0; i < kFwdItems; ++i) {
      const int64_t idx = base + (int64_t)i * kFwdThreads + threadIdx.x;
      if (idx < L) {
        const T out = Tr<T>::store(act_fn<C>(Tr<T>::load(zg + idx), act));
        yg[idx] = out;
        if (p != 0) {
          const E v = (E)Tr<T>::load(&out);
          acc += p == 2 ? v * v : (v < E(0) ? -v : v);
        }
      }
    }
  }
  if (p != 0) {
    const E s = block_sum(acc, shm);
    if (threadIdx.x == 0) part[g * gridDim.x + blockIdx.x] = s;
  }
}

// ----------------------------------------------------------------------------- backward elementwise
// block (kBwdCols, kBwdRowsThreads); grid (ceil(M/kBwdRows), ceil(N/kBwdCols), G): the row tiles on x, the only
// grid axis past 65535 blocks (flattened [B, T, K] inputs reach millions of rows).
template <typename T>
__global__ void act_bwd_kernel(const T* __restrict__ gy, const typename Tr<T>::E* __restrict__ ge,
                               const T* __restrict__ y, const T* __restrict__ z, T* __restrict__ gz,
                               typename Tr<T>::E* __restrict__ gb_part, double scale, int64_t M, int64_t N,
                               int act, int p) {
  using C = typename Tr<T>::C;
  using E = typename Tr<T>::E;
  __shared__ E shm[kBwdRowsThreads][kBwdCols];
  const int64_t g = blockIdx.z;
  const int64_t n = (int64_t)blockIdx.y * kBwdCols + threadIdx.x;
  const int64_t m0 = (int64_t)blockIdx.x * kBwdRows;
  const C c = p != 0 ? (C)ge[g] * (C)scale : C(0);
  const bool need_z = act == 2 || act == 3 || act == 6;
  E col = E(0);
  if (n < N) {
    for (int r = 0; r < kBwdRowsPerThread; ++r) {
      const int64_t m = m0 + (int64_t)r * kBwdRowsThreads + threadIdx.y;
      if (m >= M) break;
      const int64_t off = (g * M + m) * N + n;
      const C yv = Tr<T>::load(y + off);
      C go = Tr<T>::load(gy + off);
      if (p != 0) go += energy_grad<C>(yv, c, p);
      const C zv = need_z ? Tr<T>::load(z + off) : yv;
      const T out = Tr<T>::store(act_bwd_value<C>(go, yv, zv, act));
      gz[off] = out;
      col += (E)Tr<T>::load(&out);
    }
  }
  if (gb_part != nullptr) {
    shm[threadIdx.y][threadIdx.x] = col;
    __syncthreads();
    if (threadIdx.y == 0 && n < N) {
      E s = E(0);
      for (int i = 0; i < kBwdRowsThreads; ++i) s += shm[i][threadIdx.x];  // fixed order
      gb_part[(g * gridDim.x + blockIdx.x) * N + n] = s;
    }
  }
}

template <typename T>
int launch_fwd(const void* z, void* y, void* part, int64_t G, int64_t L, int act, int p, cudaStream_t s) {
  if (G == 0 || L == 0) return 0;
  dim3 grid(minaction_act_fwd_blocks(L), (unsigned)G);
  act_fwd_kernel<T><<<grid, kFwdThreads, 0, s>>>(static_cast<const T*>(z), static_cast<T*>(y),
                                                  static_cast<typename Tr<T>::E*>(part), L, act, p);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_bwd(const void* gy, const void* ge, const void* y, const void* z, void* gz, void* gb_part, double scale,
               int64_t G, int64_t M, int64_t N, int act, int p, cudaStream_t s) {
  if (G == 0 || M == 0 || N == 0) return 0;
  dim3 grid((unsigned)minaction_act_bwd_row_tiles(M), (unsigned)((N + kBwdCols - 1) / kBwdCols), (unsigned)G);
  dim3 block(kBwdCols, kBwdRowsThreads);
  using E = typename Tr<T>::E;
  act_bwd_kernel<T><<<grid, block, 0, s>>>(static_cast<const T*>(gy), static_cast<const E*>(ge),
                                           static_cast<const T*>(y), static_cast<const T*>(z), static_cast<T*>(gz),
                                           static_cast<E*>(gb_part), scale, M, N, act, p);
  return (int)cudaGetLastError();
}

}  // namespace

extern "C" int minaction_act_fwd_blocks(int64_t L) {
  const int64_t chunk = (int64_t)kFwdThreads * kFwdItems;
  int64_t b = (L + chunk - 1) / chunk;
  if (b > 1024) b = 1024;  // grid-stride beyond this; keeps the partial buffer small
  return (int)(b < 1 ? 1 : b);
}

extern "C" int minaction_act_bwd_row_tiles(int64_t M) { return (int)((M + kBwdRows - 1) / kBwdRows); }

extern "C" int minaction_act_fwd(int dtype, const void* z, void* y, void* part, int64_t G, int64_t L, int act,
                                 int p, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_fwd<float>(z, y, part, G, L, act, p, stream);
    case 1: return launch_fwd<double>(z, y, part, G, L, act, p, stream);
    case 2: return launch_fwd<__half>(z, y, part, G, L, act, p, stream);
    case 3: return launch_fwd<__nv_bfloat16>(z, y, part, G, L, act, p, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}

extern "C" int minaction_act_bwd(int dtype, const void* gy, const void* ge, const void* y, const void* z, void* gz,
                                 void* gb_part, double scale, int64_t G, int64_t M, int64_t N, int act, int p,
                                 cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_bwd<float>(gy, ge, y, z, gz, gb_part, scale, G, M, N, act, p, stream);
    case 1: return launch_bwd<double>(gy, ge, y, z, gz, gb_part, scale, G, M, N, act, p, stream);
    case 2: return launch_bwd<__half>(gy, ge, y, z, gz, gb_part, scale, G, M, N, act, p, stream);
    case 3: return launch_bwd<__nv_bfloat16>(gy, ge, y, z, gz, gb_part, scale, G, M, N, act, p, stream);
    default: return (int)cudaErrorInvalidValue;
  }
}
