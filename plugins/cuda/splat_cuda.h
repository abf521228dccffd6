// CUDA launchers of GaussianSplat on raw, contiguous, row-major device buffers.
// Same contract as plugins/cpu/splat_cpu.h; the math is in gpstoken/splat_math.h.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "gpstoken/splat_shape.h"

namespace gpstoken::cuda {

// out (B, C, H, W) = sum_i G_i f_i; overwrites `out`.
//   gaussians (B, L, 5), features (B, L, C)
// One block per 16x16-pixel tile: the block culls the Gaussians against its tile in shared memory
// (keeping token order, so the sum order is fixed), then each thread sums its pixel.
template <typename T>
cudaError_t splat_forward(const T* gaussians, const T* features, T* out, const SplatShape& shape,
                          T support, cudaStream_t stream);

// The same on float16 tensors: reads and writes float16, computes and accumulates in float32
// (inference only: the TensorRT plugin's fp16 path).
cudaError_t splat_forward_fp16(const __half* gaussians, const __half* features, __half* out,
                               const SplatShape& shape, float support, cudaStream_t stream);

// grad_out (B, C, H, W) -> grad_gaussians (B, L, 5), grad_features (B, L, C); both overwritten.
// One warp per Gaussian walks only that Gaussian's support box, then reduces with shuffles:
// every output has a single writer, so there are no atomics and results are deterministic.
template <typename T>
cudaError_t splat_backward(const T* grad_out, const T* gaussians, const T* features,
                           T* grad_gaussians, T* grad_features, const SplatShape& shape, T support,
                           cudaStream_t stream);

}  // namespace gpstoken::cuda
