// Torch glue of the CUDA backend: the matrix products in cuBLAS (at::baddbmm / at::bmm),
// the activation + energy epilogue and the backward elementwise pass in the plain-C CUDA
// launchers of energy_cuda.cu. Registered as the CUDA implementations of the operators
// minaction::{linear_fwd, linear_bwd, act_fwd, act_bwd}, whose schemas are declared once in
// minaction/backends/library.py, with the semantics of minaction/backends/composite.py (see
// minaction/backends/__init__.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "energy_cuda.cuh"

namespace {

using at::Tensor;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "minaction cuda backend: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

at::ScalarType energy_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "minaction cuda backend: ", what, " failed: ", cudaGetErrorString((cudaError_t)err));
}

void check_act(int64_t act, int64_t p) {
  TORCH_CHECK(act >= 0 && act <= 6, "minaction cuda backend: unknown activation code ", act);
  TORCH_CHECK(p == 0 || p == 1 || p == 2, "minaction cuda backend: energy exponent must be 0, 1 or 2, got ", p);
}

// y = act(z) (in place when z is not kept), e[g] = scale * sum |y|^p
std::tuple<Tensor, Tensor> epilogue(Tensor z, int64_t act, int64_t p, double scale, bool keep_z, Tensor& y) {
  const int64_t G = z.size(0);
  const int64_t L = G ? z.numel() / G : 0;
  y = keep_z ? at::empty_like(z) : z;
  const auto et = energy_type(z);
  const int nb = minaction_act_fwd_blocks(L);
  Tensor part = at::zeros({G, nb}, z.options().dtype(et));
  if (z.numel()) {
    check_cuda(minaction_act_fwd(dtype_code(z), z.data_ptr(), y.data_ptr(), part.data_ptr(), G, L, (int)act, (int)p,
                                 c10::cuda::getCurrentCUDAStream()),
               "activation/energy kernel");
  }
  Tensor e = p == 0 ? at::zeros({G}, z.options().dtype(et)) : part.sum(1).mul_(scale);
  return {keep_z ? z : at::empty({0}, z.options()), e};
}

std::tuple<Tensor, Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b,
                                              int64_t act, int64_t p, double scale, bool keep_z) {
  check_act(act, p);
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.size(0) == w.size(0) && x.size(2) == w.size(2),
              "linear_fwd expects x [G,M,K] and w [G,N,K], got ", x.sizes(), " and ", w.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  Tensor z = (b.has_value() && b->defined()) ? at::baddbmm(b->unsqueeze(1), x, w.transpose(1, 2))
                                             : at::bmm(x, w.transpose(1, 2));
  z = z.contiguous();
  Tensor y;
  auto [zs, e] = epilogue(z, act, p, scale, keep_z, y);
  return {y, zs, e};
}

// gz, and optionally the bias gradient as fixed-order column sums of gz
Tensor backward_pass(const Tensor& gy_, const Tensor& ge, const Tensor& y_, const Tensor& z_, int64_t act, int64_t p,
                     double scale, bool need_b, Tensor* gb) {
  Tensor gy = gy_.contiguous(), y = y_.contiguous();
  const bool need_z = act == 2 || act == 3 || act == 6;
  TORCH_CHECK(!need_z || z_.numel() == y.numel(), "gelu/silu/gelu_tanh backward needs the saved pre-activation z");
  Tensor z = need_z ? z_.contiguous() : Tensor();
  const int64_t G = y.size(0), M = y.size(1), N = y.numel() / std::max<int64_t>(G * M, 1);
  Tensor gz = at::empty_like(y);
  const auto et = energy_type(y);
  Tensor ge_e = ge.numel() ? ge.to(et).contiguous() : at::zeros({G}, y.options().dtype(et));
  Tensor part;
  if (need_b) part = at::zeros({G, minaction_act_bwd_row_tiles(M), N}, y.options().dtype(et));
  if (y.numel()) {
    check_cuda(minaction_act_bwd(dtype_code(y), gy.data_ptr(), ge_e.data_ptr(), y.data_ptr(),
                                 need_z ? z.data_ptr() : nullptr, gz.data_ptr(), need_b ? part.data_ptr() : nullptr,
                                 scale, G, M, N, (int)act, (int)p, c10::cuda::getCurrentCUDAStream()),
               "backward elementwise kernel");
  }
  if (need_b) *gb = part.sum(1).to(y.scalar_type());
  return gz;
}

std::tuple<Tensor, Tensor, Tensor> linear_bwd(const Tensor& gy, const Tensor& ge, const Tensor& x, const Tensor& w,
                                              const Tensor& y, const Tensor& z, int64_t act, int64_t p, double scale,
                                              bool need_x, bool need_w, bool need_b) {
  check_act(act, p);
  c10::cuda::CUDAGuard guard(y.device());
  Tensor gb = at::empty({0}, y.options());
  Tensor gz = backward_pass(gy, ge, y, z, act, p, scale, need_b, &gb);
  Tensor gx = need_x ? at::bmm(gz, w) : at::empty({0}, y.options());
  Tensor gw = need_w ? at::bmm(gz.transpose(1, 2), x) : at::empty({0}, y.options());
  return {gx, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> act_fwd(const Tensor& z, int64_t act, int64_t p, double scale, bool keep_z) {
  check_act(act, p);
  c10::cuda::CUDAGuard guard(z.device());
  // the epilogue writes y over its input unless z is kept: give it a private copy then
  Tensor zc = keep_z ? z.contiguous() : z.contiguous().clone();
  Tensor y;
  auto [zs, e] = epilogue(zc, act, p, scale, keep_z, y);
  return {y, zs, e};
}

Tensor act_bwd(const Tensor& gy, const Tensor& ge, const Tensor& y, const Tensor& z, int64_t act, int64_t p,
               double scale) {
  check_act(act, p);
  c10::cuda::CUDAGuard guard(y.device());
  return backward_pass(gy, ge, y, z, act, p, scale, false, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(minaction, CUDA, m) {
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("act_fwd", &act_fwd);
  m.impl("act_bwd", &act_bwd);
}
