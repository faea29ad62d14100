// Plain C interface of the CUDA kernels in energy_cuda.cu (no torch headers on either side).
//
// Tensors are passed as raw pointers to contiguous [G, M, N] (or [G, L]) buffers. dtype
// codes: 0 float32, 1 float64, 2 float16, 3 bfloat16. Energy partial buffers are float64
// for float64 inputs and float32 otherwise. Activation codes: 0 identity, 1 relu, 2 gelu
// (erf), 3 silu, 4 tanh, 5 sigmoid, 6 gelu_tanh. p: 0 no energy, 1 L1, 2 L2. Every launcher returns a
// cudaError_t value (0 = success) and never synchronises.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Number of blocks per group the forward epilogue uses for L values (the width of `part`).
int minaction_act_fwd_blocks(int64_t L);

// y = act(z) elementwise over G groups of L values; part[g, blk] = sum |y|^p over the
// values block blk of group g handled (rounded y, like the stored output). y may alias z.
int minaction_act_fwd(int dtype, const void* z, void* y, void* part, int64_t G, int64_t L, int act, int p,
                      cudaStream_t stream);

// Row tiles the backward pass uses (the middle extent of `gb_part`).
int minaction_act_bwd_row_tiles(int64_t M);

// gz = (gy + ge[g] * scale * d|y|^p/dy) * act'(y, z) over [G, M, N]; z is read only for
// gelu/silu/gelu_tanh (may be null otherwise). ge holds G values in the energy dtype. When gb_part
// is non-null, gb_part[g, t, n] = sum of gz[g, m, n] over the rows m of row tile t
// ([G, row_tiles, N], energy dtype).
int minaction_act_bwd(int dtype, const void* gy, const void* ge, const void* y, const void* z, void* gz,
                      void* gb_part, double scale, int64_t G, int64_t M, int64_t N, int act, int p,
                      cudaStream_t stream);

#ifdef __cplusplus
}
#endif
