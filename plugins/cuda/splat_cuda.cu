#include "splat_cuda.h"

#include "gpstoken/splat_math.h"

namespace gpstoken::cuda {

namespace {

constexpr int kTile = 16;                   // tile side in pixels
constexpr int kTileThreads = kTile * kTile;  // one thread per pixel of a tile
constexpr int kWarp = 32;
constexpr int kBackwardThreads = 128;  // one Gaussian per backward block: its support is split over 4 warps
constexpr int kBackwardWarps = kBackwardThreads / kWarp;

// What a tile keeps of each Gaussian that reaches it: the per-Gaussian constants, computed once when the
// Gaussian is loaded instead of per pixel, and the support reach s * sigma (the same product in_support
// forms, so the test is unchanged).
template <typename T>
struct TileGaussian {
  GaussianCoeffs<T> coeffs;
  T mu_x, mu_y, reach_x, reach_y;
};

// Channels accumulated in registers per pass over the Gaussians: the launch picks the smallest of 8, 16 or
// 32 that covers C (official models: 16), so a tile culls and evaluates its Gaussians once.
template <int CH>
constexpr bool kValidChunk = CH == 8 || CH == 16 || CH == 32;

// T: arithmetic type; S: storage type of the tensors (S = __half reads and writes float16 while
// every product and sum stays in float32).
template <typename T, typename S, int CH>
__global__ void splat_forward_kernel(const S* __restrict__ gaussians, const S* __restrict__ features,
                                     S* __restrict__ out, int64_t L, int64_t C, int H, int W,
                                     T support, int tiles_x, int64_t tiles_per_image) {
  static_assert(kValidChunk<CH>, "channel chunk");
  __shared__ TileGaussian<T> tile_gaussians[kTileThreads];
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

  for (int64_t c0 = 0; c0 < C; c0 += CH) {
    T acc[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) acc[k] = T(0);

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
        TileGaussian<T>& tg = tile_gaussians[slot];
        tg.coeffs = gaussian_coeffs(g);
        tg.mu_x = g[kMuX];
        tg.mu_y = g[kMuY];
        tg.reach_x = support * g[kSigmaX];
        tg.reach_y = support * g[kSigmaY];
        tile_ids[slot] = int(i - base);
      }
      __syncthreads();

      if (pixel_inside) {
        for (int k = 0; k < total; ++k) {
          const TileGaussian<T>& tg = tile_gaussians[k];
          const T dx = cx - tg.mu_x, dy = cy - tg.mu_y;
          if (!within_reach(dx, dy, tg.reach_x, tg.reach_y)) continue;
          const T w = gaussian_terms(dx, dy, tg.coeffs).weight;
          const S* f = features + (b * L + base + tile_ids[k]) * C + c0;
#pragma unroll
          for (int cc = 0; cc < CH; ++cc)
            if (c0 + cc < C) acc[cc] += w * T(f[cc]);
        }
      }
      __syncthreads();  // the next batch of Gaussians reuses the shared arrays
    }

    if (pixel_inside) {
#pragma unroll
      for (int cc = 0; cc < CH; ++cc)
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

// The sum of `v` over the block, valid in thread 0 (every thread must call it: it synchronizes).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kBackwardWarps; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// One block per Gaussian, its support box split over the block's threads in row-major order (BoxWalk: no
// division per pixel). Every output element is written (zeros for empty supports).
template <typename T, int CH>
__global__ void splat_backward_kernel(const T* __restrict__ grad_out,
                                      const T* __restrict__ gaussians,
                                      const T* __restrict__ features,
                                      T* __restrict__ grad_gaussians, T* __restrict__ grad_features,
                                      int64_t L, int64_t C, int H, int W, T support) {
  static_assert(kValidChunk<CH>, "channel chunk");
  __shared__ T scratch[kBackwardWarps];
  const int64_t j = blockIdx.x;
  const int64_t b = j / L;
  const int64_t plane = int64_t(H) * W;

  T g[kNumParams];
#pragma unroll
  for (int k = 0; k < kNumParams; ++k) g[k] = gaussians[j * kNumParams + k];
  const T* f = features + j * C;
  const T* go_image = grad_out + b * C * plane;
  const GaussianCoeffs<T> coeffs = gaussian_coeffs(g);
  const PixelBox box = support_box<T>(g, support, H, W);

  T dg[kNumParams] = {T(0), T(0), T(0), T(0), T(0)};
  // The first channel pass also accumulates the Gaussian-parameter gradient (it needs every
  // channel of grad_out at the pixel); later passes only add feature-gradient chunks.
  for (int64_t c0 = 0; c0 < C; c0 += CH) {
    T df[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) df[k] = T(0);
    for (BoxWalk p(box, int(threadIdx.x), kBackwardThreads); p.valid(); p.next()) {
      const int x = p.x, y = p.y;
      const T dx = pixel_center<T>(x, W) - g[kMuX], dy = pixel_center<T>(y, H) - g[kMuY];
      if (!in_support(dx, dy, g, support)) continue;
      const GaussianTerms<T> terms = gaussian_terms(dx, dy, coeffs);
      if (terms.weight == T(0)) continue;
      const T* go = go_image + int64_t(y) * W + x;
#pragma unroll
      for (int cc = 0; cc < CH; ++cc)
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
    for (int cc = 0; cc < CH; ++cc) {
      const T total = block_sum(df[cc], scratch);
      if (threadIdx.x == 0 && c0 + cc < C) grad_features[j * C + c0 + cc] = total;
    }
  }
#pragma unroll
  for (int k = 0; k < kNumParams; ++k) {
    const T total = block_sum(dg[k], scratch);
    if (threadIdx.x == 0) grad_gaussians[j * kNumParams + k] = total;
  }
}

// The register chunk for C channels: 8, 16 or 32 (wider models take several passes of 32).
inline int channel_chunk(int64_t C) { return C <= 8 ? 8 : C <= 16 ? 16 : 32; }

}  // namespace

template <typename T, typename S>
cudaError_t launch_forward(const S* gaussians, const S* features, S* out, const SplatShape& s, T support,
                           cudaStream_t stream) {
  if (s.batch == 0 || s.channels == 0) return cudaSuccess;
  const int tiles_x = (s.width + kTile - 1) / kTile, tiles_y = (s.height + kTile - 1) / kTile;
  const int64_t tiles = int64_t(tiles_x) * tiles_y;
  const int64_t blocks = tiles * s.batch;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto launch = [&](auto kernel) {
    kernel<<<unsigned(blocks), kTileThreads, 0, stream>>>(gaussians, features, out, s.tokens, s.channels, s.height,
                                                           s.width, support, tiles_x, tiles);
  };
  switch (channel_chunk(s.channels)) {
    case 8: launch(splat_forward_kernel<T, S, 8>); break;
    case 16: launch(splat_forward_kernel<T, S, 16>); break;
    default: launch(splat_forward_kernel<T, S, 32>); break;
  }
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
  if (BL > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto launch = [&](auto kernel) {
    kernel<<<unsigned(BL), kBackwardThreads, 0, stream>>>(grad_out, gaussians, features, grad_gaussians, grad_features,
                                                          s.tokens, s.channels, s.height, s.width, support);
  };
  switch (channel_chunk(s.channels)) {
    case 8: launch(splat_backward_kernel<T, 8>); break;
    case 16: launch(splat_backward_kernel<T, 16>); break;
    default: launch(splat_backward_kernel<T, 32>); break;
  }
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
