// Argument checks shared by the CPU and CUDA registrations of gpstoken::gaussian_splat.
// Messages name the tensor, the expected shape and what arrived.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

#include "gpstoken/splat_shape.h"

namespace gpstoken::torch_ext {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " " << t.scalar_type() << " on " << t.device();
  return os.str();
}

inline SplatShape check_splat_args(const at::Tensor& gaussians, const at::Tensor& features,
                                   int64_t height, int64_t width, double support) {
  TORCH_CHECK_VALUE(gaussians.dim() == 3 && gaussians.size(2) == 5,
                    "gaussians must be (B, L, 5) (sigma_x, sigma_y, rho, mu_x, mu_y), got ",
                    describe(gaussians));
  TORCH_CHECK_VALUE(features.dim() == 3 && features.size(0) == gaussians.size(0) &&
                        features.size(1) == gaussians.size(1),
                    "features must be (B, L, C) with B, L of gaussians ", gaussians.sizes(),
                    ", got ", describe(features));
  TORCH_CHECK_VALUE(
      gaussians.scalar_type() == at::kFloat || gaussians.scalar_type() == at::kDouble,
      "gaussians must be float32 or float64, got ", describe(gaussians));
  TORCH_CHECK_VALUE(features.scalar_type() == gaussians.scalar_type(),
                    "features must have the dtype of gaussians (", gaussians.scalar_type(),
                    "), got ", describe(features));
  TORCH_CHECK_VALUE(features.device() == gaussians.device(),
                    "features must be on the device of gaussians (", gaussians.device(), "), got ",
                    describe(features));
  TORCH_CHECK_VALUE(height >= 2 && width >= 2 && height <= (1 << 20) && width <= (1 << 20),
                    "size must be (H, W) with 2 <= H, W <= 2^20, got (", height, ", ", width, ")");
  TORCH_CHECK_VALUE(support > 0 && support < 1e30, "support must be a finite number > 0, got ",
                    support);
  return SplatShape{gaussians.size(0), gaussians.size(1), features.size(2), int(height),
                    int(width)};
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& gaussians,
                           const SplatShape& s) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.batch &&
                        grad_out.size(1) == s.channels && grad_out.size(2) == s.height &&
                        grad_out.size(3) == s.width,
                    "grad_out must be (", s.batch, ", ", s.channels, ", ", s.height, ", ", s.width,
                    "), got ", describe(grad_out));
  TORCH_CHECK_VALUE(grad_out.scalar_type() == gaussians.scalar_type() &&
                        grad_out.device() == gaussians.device(),
                    "grad_out must match gaussians' dtype and device, got ", describe(grad_out));
}

}  // namespace gpstoken::torch_ext
