#include "splat_cpu.h"

#include <algorithm>
#include <memory>
#include <vector>

#include "gpstoken/splat_math.h"

namespace gpstoken::cpu {

namespace {

constexpr int kTile = 16;  // pixels per tile side: a tile's C-channel accumulator stays in L1/L2

struct TileGrid {
  int tiles_x, tiles_y;
  int64_t count() const { return int64_t(tiles_x) * tiles_y; }
};

TileGrid make_tile_grid(int height, int width) {
  return {(width + kTile - 1) / kTile, (height + kTile - 1) / kTile};
}

// Tokens overlapping each tile, in token order, as CSR: tile t of image b lists
// ids[offsets[b*T + t] .. offsets[b*T + t + 1]).
struct TileBins {
  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
};

TileBins bin_by_tile(const std::vector<PixelBox>& boxes, const SplatShape& s, const TileGrid& grid) {
  const int64_t tiles = grid.count();
  TileBins bins;
  bins.offsets.assign(s.batch * tiles + 1, 0);
  auto for_each_tile = [&](int64_t j, auto&& visit) {
    const PixelBox& box = boxes[j];
    if (box.empty()) return;
    const int64_t base = (j / s.tokens) * tiles;
    for (int ty = box.y0 / kTile; ty <= (box.y1 - 1) / kTile; ++ty)
      for (int tx = box.x0 / kTile; tx <= (box.x1 - 1) / kTile; ++tx)
        visit(base + int64_t(ty) * grid.tiles_x + tx);
  };
  const int64_t n = s.batch * s.tokens;
  for (int64_t j = 0; j < n; ++j) for_each_tile(j, [&](int64_t t) { ++bins.offsets[t + 1]; });
  for (int64_t t = 0; t < s.batch * tiles; ++t) bins.offsets[t + 1] += bins.offsets[t];
  bins.ids.resize(bins.offsets.back());
  std::vector<int64_t> cursor(bins.offsets.begin(), bins.offsets.end() - 1);
  for (int64_t j = 0; j < n; ++j)
    for_each_tile(j, [&](int64_t t) { bins.ids[cursor[t]++] = int32_t(j % s.tokens); });
  return bins;
}

// Normalized pixel centres of one axis, computed once per call.
template <typename T>
std::vector<T> pixel_centers(int n) {
  std::vector<T> centers(n);
  for (int i = 0; i < n; ++i) centers[i] = pixel_center<T>(i, n);
  return centers;
}

}  // namespace

void serial_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  if (n > 0) body(0, n);
}

template <typename T>
void splat_forward(const T* gaussians, const T* features, T* out, const SplatShape& s, T support,
                   const ParallelFor& parallel_for) {
  const int64_t H = s.height, W = s.width, C = s.channels, L = s.tokens;
  const int64_t plane = H * W;
  if (s.batch == 0 || C == 0) return;
  const TileGrid grid = make_tile_grid(s.height, s.width);
  const int64_t tiles = grid.count();

  std::vector<PixelBox> boxes(s.batch * L);
  parallel_for(s.batch * L, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      boxes[j] = support_box<T>(gaussians + j * kNumParams, support, s.height, s.width);
  });
  const TileBins bins = bin_by_tile(boxes, s, grid);
  const std::vector<T> xs = pixel_centers<T>(s.width), ys = pixel_centers<T>(s.height);

  parallel_for(s.batch * tiles, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(int64_t(kTile) * kTile * C);  // (tile row, tile col, C)
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / tiles, t = bt % tiles;
      const int tx0 = int(t % grid.tiles_x) * kTile, ty0 = int(t / grid.tiles_x) * kTile;
      const int tx1 = std::min<int>(tx0 + kTile, s.width), ty1 = std::min<int>(ty0 + kTile, s.height);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t k = bins.offsets[bt]; k < bins.offsets[bt + 1]; ++k) {
        const int64_t i = bins.ids[k];
        const T* g = gaussians + (b * L + i) * kNumParams;
        const T* __restrict f = features + (b * L + i) * C;
        const GaussianCoeffs<T> coeffs = gaussian_coeffs(g);
        const PixelBox& box = boxes[b * L + i];
        for (int y = std::max(box.y0, ty0); y < std::min(box.y1, ty1); ++y) {
          const T dy = ys[y] - g[kMuY];
          for (int x = std::max(box.x0, tx0); x < std::min(box.x1, tx1); ++x) {
            const T dx = xs[x] - g[kMuX];
            if (!in_support(dx, dy, g, support)) continue;
            const T w = gaussian_terms(dx, dy, coeffs).weight;
            T* __restrict a = acc.data() + ((y - ty0) * kTile + (x - tx0)) * C;
            for (int64_t c = 0; c < C; ++c) a[c] += w * f[c];
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        T* o = out + (b * C + c) * plane;
        for (int y = ty0; y < ty1; ++y)
          for (int x = tx0; x < tx1; ++x) o[y * W + x] = acc[((y - ty0) * kTile + (x - tx0)) * C + c];
      }
    }
  });
}

template <typename T>
void splat_backward(const T* grad_out, const T* gaussians, const T* features, T* grad_gaussians,
                    T* grad_features, const SplatShape& s, T support,
                    const ParallelFor& parallel_for) {
  const int64_t H = s.height, W = s.width, C = s.channels, L = s.tokens;
  const int64_t plane = H * W;
  // Channels-last copy of grad_out, so that one pixel's C values are contiguous.
  // Uninitialized on purpose: every element is written below (a std::vector would memset it first).
  const std::unique_ptr<T[]> grad_hwc(new T[s.batch * plane * C]);
  parallel_for(s.batch * H, [&](int64_t begin, int64_t end) {
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / H, y = by % H;
      for (int64_t c = 0; c < C; ++c) {
        const T* src = grad_out + (b * C + c) * plane + y * W;
        T* dst = grad_hwc.get() + (b * plane + y * W) * C + c;
        for (int64_t x = 0; x < W; ++x) dst[x * C] = src[x];
      }
    }
  });

  const std::vector<T> xs = pixel_centers<T>(s.width), ys = pixel_centers<T>(s.height);
  parallel_for(s.batch * L, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t b = j / L;
      const T* g = gaussians + j * kNumParams;
      const T* __restrict f = features + j * C;
      T* __restrict df = grad_features + j * C;
      const GaussianCoeffs<T> coeffs = gaussian_coeffs(g);
      std::fill(df, df + C, T(0));
      T dg[kNumParams] = {T(0), T(0), T(0), T(0), T(0)};
      const PixelBox box = support_box<T>(g, support, s.height, s.width);
      for (int y = box.y0; y < box.y1; ++y) {
        const T dy = ys[y] - g[kMuY];
        for (int x = box.x0; x < box.x1; ++x) {
          const T dx = xs[x] - g[kMuX];
          if (!in_support(dx, dy, g, support)) continue;
          const GaussianTerms<T> terms = gaussian_terms(dx, dy, coeffs);
          if (terms.weight == T(0)) continue;  // underflow: value and gradient are both 0
          const T* __restrict go = grad_hwc.get() + (b * plane + int64_t(y) * W + x) * C;
          T f_dot_go = T(0);
          // Without the simd reduction the compiler keeps the dot product a serial scalar chain.
#pragma omp simd reduction(+ : f_dot_go)
          for (int64_t c = 0; c < C; ++c) {
            f_dot_go += f[c] * go[c];
            df[c] += terms.weight * go[c];
          }
          T dw[kNumParams];
          gaussian_weight_grad(terms, coeffs, dw);
          for (int k = 0; k < kNumParams; ++k) dg[k] += f_dot_go * dw[k];
        }
      }
      for (int k = 0; k < kNumParams; ++k) grad_gaussians[j * kNumParams + k] = dg[k];
    }
  });
}

#define GPSTOKEN_INSTANTIATE(T)                                                                 \
  template void splat_forward<T>(const T*, const T*, T*, const SplatShape&, T,                  \
                                 const ParallelFor&);                                           \
  template void splat_backward<T>(const T*, const T*, const T*, T*, T*, const SplatShape&, T, \
                                  const ParallelFor&);
GPSTOKEN_INSTANTIATE(float)
GPSTOKEN_INSTANTIATE(double)
#undef GPSTOKEN_INSTANTIATE

}  // namespace gpstoken::cpu
