// The torch operators gpstoken::gaussian_splat and gpstoken::gaussian_splat_backward: schemas
// (declared once, here) and the CPU implementation. Autograd and the fake (meta) kernels are
// registered from Python in gpstoken/splatting.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../cpu/splat_cpu.h"
#include "splat_checks.h"

namespace gpstoken::torch_ext {
namespace {

void torch_parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, n, 1, body);
}

at::Tensor splat_forward_cpu(const at::Tensor& gaussians, const at::Tensor& features,
                             int64_t height, int64_t width, double support) {
  const SplatShape s = check_splat_args(gaussians, features, height, width, support);
  TORCH_CHECK_VALUE(gaussians.device().is_cpu(), "gaussians must be on the CPU here");
  const at::Tensor g = gaussians.contiguous(), f = features.contiguous();
  at::Tensor out = at::empty({s.batch, s.channels, s.height, s.width}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gaussian_splat", [&] {
    cpu::splat_forward<scalar_t>(g.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(),
                                 out.data_ptr<scalar_t>(), s, scalar_t(support),
                                 torch_parallel_for);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> splat_backward_cpu(const at::Tensor& grad_out,
                                                      const at::Tensor& gaussians,
                                                      const at::Tensor& features, int64_t height,
                                                      int64_t width, double support) {
  const SplatShape s = check_splat_args(gaussians, features, height, width, support);
  check_grad_out(grad_out, gaussians, s);
  const at::Tensor go = grad_out.contiguous(), g = gaussians.contiguous(), f = features.contiguous();
  at::Tensor grad_g = at::empty_like(g), grad_f = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gaussian_splat_backward", [&] {
    cpu::splat_backward<scalar_t>(go.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                  f.data_ptr<scalar_t>(), grad_g.data_ptr<scalar_t>(),
                                  grad_f.data_ptr<scalar_t>(), s, scalar_t(support),
                                  torch_parallel_for);
  });
  return {grad_g, grad_f};
}

}  // namespace

TORCH_LIBRARY(gpstoken, m) {
  m.def(
      "gaussian_splat(Tensor gaussians, Tensor features, int height, int width, float support) "
      "-> Tensor");
  m.def(
      "gaussian_splat_backward(Tensor grad_out, Tensor gaussians, Tensor features, int height, "
      "int width, float support) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gpstoken, CPU, m) {
  m.impl("gaussian_splat", &splat_forward_cpu);
  m.impl("gaussian_splat_backward", &splat_backward_cpu);
}

}  // namespace gpstoken::torch_ext
