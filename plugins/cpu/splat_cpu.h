// CPU launchers of GaussianSplat on raw, contiguous, row-major buffers.
// The math is in gpstoken/splat_math.h; this file only decides which (pixel, Gaussian) pairs to visit.
#pragma once

#include <cstdint>
#include <functional>

#include "gpstoken/splat_shape.h"

namespace gpstoken::cpu {

// Runs body(begin, end) over disjoint chunks covering [0, n), possibly on several threads.
// The torch binding passes at::parallel_for; other hosts may pass `serial_for`.
using ParallelFor =
    std::function<void(int64_t n, const std::function<void(int64_t begin, int64_t end)>& body)>;

void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& body);

// out (B, C, H, W) = sum_i G_i f_i. Overwrites `out` entirely.
//   gaussians (B, L, 5), features (B, L, C)
// Gaussians are binned into 16x16-pixel tiles by their support box, and tiles are rendered in
// parallel, each pixel summing its Gaussians in token order (so results do not depend on threads).
template <typename T>
void splat_forward(const T* gaussians, const T* features, T* out, const SplatShape& shape,
                   T support, const ParallelFor& parallel_for);

// Gradients of sum(grad_out * out).
//   grad_out (B, C, H, W) -> grad_gaussians (B, L, 5), grad_features (B, L, C); both overwritten.
// One work item per Gaussian visits only its own support box and owns its outputs: no atomics.
template <typename T>
void splat_backward(const T* grad_out, const T* gaussians, const T* features, T* grad_gaussians,
                    T* grad_features, const SplatShape& shape, T support,
                    const ParallelFor& parallel_for);

}  // namespace gpstoken::cpu
