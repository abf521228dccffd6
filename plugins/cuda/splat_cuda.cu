#include "splat_cuda.h"

#include "gpstoken/splat_math.h"

namespace gpstoken::cuda {

namespace {

constexpr int kTile = 16;                   // tile side in pixels
constexpr int kTileThreads = kTile * kTile;  // one thread per pixel of a tile
constexpr int kWarp = 32;
constexpr int kChannelChunk = 8;           // channels accumulated in registers per pass
constexpr int kBackwardWarpsPerBlock = 4;  // Gaussians per backward block

// T: arithmetic type; S: storage type of the tensors (S = __half reads and writes float16 while
// every product and sum stays in float32).
template <typename T, typename S = T>
__global__ void splat_forward_kernel(const S* __restrict__ gaussians, const S* __restrict__ features,
                                     S* __restrict__ out, int64_t L, int64_t C, int H, int W,
                                     T support, int tiles_x, int64_t tiles_per_image) {
  __shared__ T tile_gaussians[kTileThreads][kNumParams];
  __shared__ int tile_ids[kTileThreads];
  __shared__ int warp_hits[kTileThreads / kWarp];

  const int64_t b = blockIdx.x / tiles_per_image;
  const int64_t t = blockIdx.x % tiles_per_image;
  const int tx0 = int(t % tiles_x) * kTile, ty0 = int(t / tiles_x) * kTile;
  const int x = tx0 + int(threadIdx.x) % kTile, y = ty0 + int(threadIdx.x) / kTile;
  const bool pixel_inside = x < W && y < H;
  const T cx = pixel_center<T>(x, W), cy = pixel_center<T>(y, H);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t plane = int64_t(H) * W;

  for (int64_t c0 = 0; c0 < C; c0 += kChannelChunk) {
    T acc[kChannelChunk];
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) acc[k] = T(0);

    for (int64_t base = 0; base < L; base += kTileThreads) {
      // Each thread tests one Gaussian against the tile; hits are compacted in token order.
      const int64_t i = base + threadIdx.x;
      T g[kNumParams];
      bool hit = false;
      if (i < L) {
#pragma unroll
        for (int k = 0; k < kNumParams; ++k) g[k] = T(gaussians[(b * L + i) * kNumParams + k]);
        if constexpr (sizeof(S) == 2) clamp_loaded_half_gaussian(g);  // float16 storage: keep q > 0
        const PixelBox box = support_box<T>(g, support, H, W);
        hit = !box.empty() && box.x0 < tx0 + kTile && box.x1 > tx0 && box.y0 < ty0 + kTile &&
              box.y1 > ty0;
      }
      const unsigned hits = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) warp_hits[warp] = __popc(hits);
      __syncthreads();
      int slot = 0, total = 0;
      for (int w = 0; w < kTileThreads / kWarp; ++w) {
        slot += w < warp ? warp_hits[w] : 0;
        total += warp_hits[w];
      }
      if (hit) {
        slot += __popc(hits & ((1u << lane) - 1u));
#pragma unroll
        for (int k = 0; k < kNumParams; ++k) tile_gaussians[slot][k] = g[k];
        tile_ids[slot] = int(i - base);
      }
      __syncthreads();

      if (pixel_inside) {
        for (int k = 0; k < total; ++k) {
          const T* gk = tile_gaussians[k];
          const T dx = cx - gk[kMuX], dy = cy - gk[kMuY];
          if (!in_support(dx, dy, gk, support)) continue;
          const T w = gaussian_terms(dx, dy, gaussian_coeffs(gk)).weight;
          const S* f = features + (b * L + base + tile_ids[k]) * C + c0;
#pragma unroll
          for (int cc = 0; cc < kChannelChunk; ++cc)
            if (c0 + cc < C) acc[cc] += w * T(f[cc]);
        }
      }
      __syncthreads();  // the next batch of Gaussians reuses the shared arrays
    }

    if (pixel_inside) {
#pragma unroll
      for (int cc = 0; cc < kChannelChunk; ++cc)
        if (c0 + cc < C) out[(b * C + c0 + cc) * plane + int64_t(y) * W + x] = S(acc[cc]);
    }
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void splat_backward_kernel(const T* __restrict__ grad_out,
                                      const T* __restrict__ gaussians,
                                      const T* __restrict__ features,
                                      T* __restrict__ grad_gaussians, T* __restrict__ grad_features,
                                      int64_t BL, int64_t L, int64_t C, int H, int W, T support) {
  const int64_t j = int64_t(blockIdx.x) * kBackwardWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= BL) return;  // the whole warp leaves together, so shuffles below stay full-warp
  const int64_t b = j / L;
  const int64_t plane = int64_t(H) * W;

  T g[kNumParams];
#pragma unroll
  for (int k = 0; k < kNumParams; ++k) g[k] = gaussians[j * kNumParams + k];
  const T* f = features + j * C;
  const T* go_image = grad_out + b * C * plane;
  const GaussianCoeffs<T> coeffs = gaussian_coeffs(g);
  const PixelBox box = support_box<T>(g, support, H, W);
  const int box_w = box.empty() ? 0 : box.x1 - box.x0;
  const int64_t area = box.empty() ? 0 : int64_t(box_w) * (box.y1 - box.y0);

  T dg[kNumParams] = {T(0), T(0), T(0), T(0), T(0)};
  // The first channel pass also accumulates the Gaussian-parameter gradient (it needs every
  // channel of grad_out at the pixel); later passes only add feature-gradient chunks.
  for (int64_t c0 = 0; c0 < C; c0 += kChannelChunk) {
    T df[kChannelChunk];
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) df[k] = T(0);
    for (int64_t p = lane; p < area; p += kWarp) {
      const int x = box.x0 + int(p % box_w), y = box.y0 + int(p / box_w);
      const T dx = pixel_center<T>(x, W) - g[kMuX], dy = pixel_center<T>(y, H) - g[kMuY];
      if (!in_support(dx, dy, g, support)) continue;
      const GaussianTerms<T> terms = gaussian_terms(dx, dy, coeffs);
      if (terms.weight == T(0)) continue;
      const T* go = go_image + int64_t(y) * W + x;
#pragma unroll
      for (int cc = 0; cc < kChannelChunk; ++cc)
        if (c0 + cc < C) df[cc] += terms.weight * go[(c0 + cc) * plane];
      if (c0 == 0) {
        T f_dot_go = T(0);
        for (int64_t c = 0; c < C; ++c) f_dot_go += f[c] * go[c * plane];
        T dw[kNumParams];
        gaussian_weight_grad(terms, coeffs, dw);
#pragma unroll
        for (int k = 0; k < kNumParams; ++k) dg[k] += f_dot_go * dw[k];
      }
    }
#pragma unroll
    for (int cc = 0; cc < kChannelChunk; ++cc) {
      const T total = warp_sum(df[cc]);
      if (lane == 0 && c0 + cc < C) grad_features[j * C + c0 + cc] = total;
    }
  }
#pragma unroll
  for (int k = 0; k < kNumParams; ++k) {
    const T total = warp_sum(dg[k]);
    if (lane == 0) grad_gaussians[j * kNumParams + k] = total;
  }
}

}  // namespace

template <typename T, typename S>
cudaError_t launch_forward(const S* gaussians, const S* features, S* out, const SplatShape& s, T support,
                           cudaStream_t stream) {
  if (s.batch == 0 || s.channels == 0) return cudaSuccess;
  const int tiles_x = (s.width + kTile - 1) / kTile, tiles_y = (s.height + kTile - 1) / kTile;
  const int64_t tiles = int64_t(tiles_x) * tiles_y;
  const int64_t blocks = tiles * s.batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  splat_forward_kernel<T, S><<<unsigned(blocks), kTileThreads, 0, stream>>>(
      gaussians, features, out, s.tokens, s.channels, s.height, s.width, support, tiles_x, tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t splat_forward(const T* gaussians, const T* features, T* out, const SplatShape& s,
                          T support, cudaStream_t stream) {
  return launch_forward<T, T>(gaussians, features, out, s, support, stream);
}

cudaError_t splat_forward_fp16(const __half* gaussians, const __half* features, __half* out,
                               const SplatShape& shape, float support, cudaStream_t stream) {
  return launch_forward<float, __half>(gaussians, features, out, shape, support, stream);
}

template <typename T>
cudaError_t splat_backward(const T* grad_out, const T* gaussians, const T* features,
                           T* grad_gaussians, T* grad_features, const SplatShape& s, T support,
                           cudaStream_t stream) {
  const int64_t BL = s.batch * s.tokens;
  if (BL == 0) return cudaSuccess;
  const int64_t blocks = (BL + kBackwardWarpsPerBlock - 1) / kBackwardWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  splat_backward_kernel<T><<<unsigned(blocks), kBackwardWarpsPerBlock * kWarp, 0, stream>>>(
      grad_out, gaussians, features, grad_gaussians, grad_features, BL, s.tokens, s.channels,
      s.height, s.width, support);
  return cudaGetLastError();
}

#define GPSTOKEN_INSTANTIATE(T)                                                                 \
  template cudaError_t splat_forward<T>(const T*, const T*, T*, const SplatShape&, T,           \
                                        cudaStream_t);                                          \
  template cudaError_t splat_backward<T>(const T*, const T*, const T*, T*, T*, const SplatShape&, \
                                         T, cudaStream_t);
GPSTOKEN_INSTANTIATE(float)
GPSTOKEN_INSTANTIATE(double)
#undef GPSTOKEN_INSTANTIATE

}  // namespace gpstoken::cuda
