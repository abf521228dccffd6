// CUDA implementation of the gpstoken::gaussian_splat operators (schemas live in ops.cpp).
// Linked only when torch was built with CUDA and nvcc is available. It uses torch's generic device
// API (not c10/cuda headers, which CPU wheels ship incomplete) so that CPU machines compile-check it.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "../cuda/splat_cuda.h"
#include "splat_checks.h"

namespace gpstoken::torch_ext {
namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(t.device()).native_handle());
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

at::Tensor splat_forward_cuda(const at::Tensor& gaussians, const at::Tensor& features,
                              int64_t height, int64_t width, double support) {
  const SplatShape s = check_splat_args(gaussians, features, height, width, support);
  const c10::DeviceGuard guard(gaussians.device());
  const at::Tensor g = gaussians.contiguous(), f = features.contiguous();
  at::Tensor out = at::empty({s.batch, s.channels, s.height, s.width}, g.options());
  const cudaStream_t stream = current_stream(gaussians);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gaussian_splat", [&] {
    check_cuda(cuda::splat_forward<scalar_t>(g.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(),
                                             out.data_ptr<scalar_t>(), s, scalar_t(support),
                                             stream),
               "gaussian_splat CUDA forward");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> splat_backward_cuda(const at::Tensor& grad_out,
                                                       const at::Tensor& gaussians,
                                                       const at::Tensor& features, int64_t height,
                                                       int64_t width, double support) {
  const SplatShape s = check_splat_args(gaussians, features, height, width, support);
  check_grad_out(grad_out, gaussians, s);
  const c10::DeviceGuard guard(gaussians.device());
  const at::Tensor go = grad_out.contiguous(), g = gaussians.contiguous(), f = features.contiguous();
  at::Tensor grad_g = at::empty_like(g), grad_f = at::empty_like(f);  // the kernel writes every element
  const cudaStream_t stream = current_stream(gaussians);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gaussian_splat_backward", [&] {
    check_cuda(cuda::splat_backward<scalar_t>(go.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                              f.data_ptr<scalar_t>(), grad_g.data_ptr<scalar_t>(),
                                              grad_f.data_ptr<scalar_t>(), s, scalar_t(support),
                                              stream),
               "gaussian_splat CUDA backward");
  });
  return {grad_g, grad_f};
}

}  // namespace

TORCH_LIBRARY_IMPL(gpstoken, CUDA, m) {
  m.impl("gaussian_splat", &splat_forward_cuda);
  m.impl("gaussian_splat_backward", &splat_backward_cuda);
}

}  // namespace gpstoken::torch_ext
