// gpstoken/splat_math.h — the one source of the GaussianSplat math (paper Eq. 2-3).
//
// Used unchanged by the CPU kernel, the CUDA kernel, the ONNX Runtime op and the TensorRT plugin,
// so everything here is an inline __host__ __device__ function on plain scalars: no allocation,
// no framework types.
//
// Conventions (the official GPSToken ones, so released checkpoints render the same):
//   * A token's Gaussian is g = (sigma_x, sigma_y, rho, mu_x, mu_y) in normalized image coordinates,
//     [-1, 1] over the image; x runs along columns, y along rows.
//   * Pixel centre i of an axis with n pixels sits at 2 i / (n - 1) - 1 ("align corners").
//   * The Gaussian is unnormalized (peak 1):
//       a = (x - mu_x) / sigma_x,  b = (y - mu_y) / sigma_y,  q = 1 - rho^2
//       G(x, y) = exp(-(a^2 - 2 rho a b + b^2) / (2 q))
//     and it is zero outside the axis-aligned support |x - mu_x| <= s sigma_x, |y - mu_y| <= s sigma_y
//     (boundary included; the box ignores rho). s is the support factor: official configs use 3,
//     the paper says 5.
//   * The rendered map is R(x, y, k) = sum_i G_i(x, y) f_i[k] (Eq. 3): no alpha, no normalization.
//
// Numeric guards: inside the support |a|, |b| <= s, and the exponent is written as a sum of squares
// (see gaussian_terms), so G is in [0, 1], never overflows and keeps its precision, however small
// sigma or 1 - |rho| get. Boxes are computed
// in floating point and clamped to the image before any integer conversion, so Gaussians far
// off-image (or with huge sigma) give empty or full boxes instead of overflowed indices.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define GPSTOKEN_HD __host__ __device__ __forceinline__
#else
#define GPSTOKEN_HD inline
#endif

namespace gpstoken {

// Parameter order inside a token's 5-vector.
enum GaussianParam : int { kSigmaX = 0, kSigmaY = 1, kRho = 2, kMuX = 3, kMuY = 4, kNumParams = 5 };

// Normalized coordinate of pixel centre `i` on an axis of `n >= 2` pixels.
template <typename T>
GPSTOKEN_HD T pixel_center(int i, int n) {
  return T(2 * i) / T(n - 1) - T(1);
}

// Half-open pixel ranges [x0, x1) x [y0, y1) that contain every pixel centre inside a Gaussian's
// support (and possibly one more pixel on each side: callers still run `in_support` per pixel, so
// the box only has to be conservative). Empty when x0 >= x1 or y0 >= y1.
struct PixelBox {
  int x0, x1, y0, y1;
  GPSTOKEN_HD bool empty() const { return x0 >= x1 || y0 >= y1; }
};

// The pixels of a box in row-major order, shared by `threads` walkers: walker k visits pixels k, k + threads,
// k + 2 threads, ... with (x, y) stepped by (threads mod w, threads div w) and at most one wrap per step, so
// there is no division per pixel (the CUDA backward kernel splits a Gaussian's support over a block).
struct BoxWalk {
  int x, y, x_begin, x_end, y_end, width, step_x, step_y;
  GPSTOKEN_HD BoxWalk(const PixelBox& box, int walker, int threads) {
    const bool empty = box.empty();
    width = empty ? 1 : box.x1 - box.x0;  // 1: nothing is visited, and no division by 0
    x_begin = box.x0;
    x_end = box.x0 + width;
    y_end = empty ? box.y0 : box.y1;
    step_x = threads % width;
    step_y = threads / width;
    x = box.x0 + walker % width;
    y = empty ? y_end : box.y0 + walker / width;
  }
  GPSTOKEN_HD bool valid() const { return y < y_end; }
  GPSTOKEN_HD void next() {
    x += step_x;
    y += step_y;
    if (x >= x_end) {
      x -= width;
      ++y;
    }
  }
};

// Pixel index range [lo, hi) of one axis whose centres may lie within `mu +- half_width`.
template <typename T>
GPSTOKEN_HD void support_range(T mu, T half_width, int n, int* lo, int* hi) {
  // pixel_center(i) = c  <=>  i = (c + 1) (n - 1) / 2
  const T scale = T(n - 1) / T(2);
  T first = (mu - half_width + T(1)) * scale - T(1);  // one pixel of slack for rounding
  T last = (mu + half_width + T(1)) * scale + T(1);
  // Clamping through negated comparisons also maps NaN to the full axis; `in_support` then rejects
  // every pixel, since comparisons with NaN are false.
  if (!(first > T(-1))) first = T(-1);
  if (!(last < T(n))) last = T(n);
  if (!(first <= last)) {
    *lo = 0;
    *hi = 0;
    return;
  }
  int lo_i = static_cast<int>(first);  // truncation == floor for first >= -1 up to the +1 slack
  int hi_i = static_cast<int>(last) + 1;
  *lo = lo_i < 0 ? 0 : lo_i;
  *hi = hi_i > n ? n : hi_i;
}

template <typename T>
GPSTOKEN_HD PixelBox support_box(const T* g, T support, int height, int width) {
  PixelBox box;
  support_range<T>(g[kMuX], support * g[kSigmaX], width, &box.x0, &box.x1);
  support_range<T>(g[kMuY], support * g[kSigmaY], height, &box.y0, &box.y1);
  return box;
}

// The exact support test of the official renderer: boundary included, rho ignored.
template <typename T>
GPSTOKEN_HD bool in_support(T dx, T dy, const T* g, T support) {
  const T ax = dx < T(0) ? -dx : dx;
  const T ay = dy < T(0) ? -dy : dy;
  return ax <= support * g[kSigmaX] && ay <= support * g[kSigmaY];
}

// in_support with the reaches s * sigma_x, s * sigma_y formed once per Gaussian (the same products, so the
// same decisions).
template <typename T>
GPSTOKEN_HD bool within_reach(T dx, T dy, T reach_x, T reach_y) {
  const T ax = dx < T(0) ? -dx : dx;
  const T ay = dy < T(0) ? -dy : dy;
  return ax <= reach_x && ay <= reach_y;
}

// Per-Gaussian constants, computed once per Gaussian rather than once per pixel.
template <typename T>
struct GaussianCoeffs {
  T inv_sigma_x, inv_sigma_y;
  T rho;
  T one_minus_abs_rho;  // 1 - |rho|, exact in floating point for |rho| >= 1/2 (Sterbenz)
  T inv_q;              // 1 / (1 - rho^2), with 1 - rho^2 as (1 - rho)(1 + rho) for precision near |rho| = 1
};

template <typename T>
GPSTOKEN_HD GaussianCoeffs<T> gaussian_coeffs(const T* g) {
  GaussianCoeffs<T> c;
  c.inv_sigma_x = T(1) / g[kSigmaX];
  c.inv_sigma_y = T(1) / g[kSigmaY];
  c.rho = g[kRho];
  c.one_minus_abs_rho = T(1) - (c.rho < T(0) ? -c.rho : c.rho);
  c.inv_q = T(1) / ((T(1) - c.rho) * (T(1) + c.rho));
  return c;
}

// Intermediate terms shared by the weight and its gradient at one pixel.
template <typename T>
struct GaussianTerms {
  T a, b;       // standardized offsets (x - mu_x)/sigma_x, (y - mu_y)/sigma_y
  T d, e;       // a - rho b and b - rho a
  T de_over_q;  // d e / q = a b - 2 rho z (the rho gradient's factor)
  T z;          // exponent: G = exp(-z), z >= 0
  T weight;     // G
};

GPSTOKEN_HD float exp_t(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);  // not __expf: its error near 0 is too coarse for gradients
#else
  return std::exp(v);
#endif
}
GPSTOKEN_HD double exp_t(double v) {
#if defined(__CUDA_ARCH__)
  return exp(v);
#else
  return std::exp(v);
#endif
}

// u - rho v without catastrophic cancellation as |rho| -> 1: for rho >= 0 it is (u - v) + (1 - rho) v,
// where u - v is exact when u ~ v and 1 - rho is exact (Sterbenz); for rho < 0, (u + v) - (1 + rho) v.
template <typename T>
GPSTOKEN_HD T minus_rho_times(T u, T v, const GaussianCoeffs<T>& c) {
  return c.rho >= T(0) ? (u - v) + c.one_minus_abs_rho * v : (u + v) - c.one_minus_abs_rho * v;
}

// G at offset (dx, dy) = (x - mu_x, y - mu_y), assuming the caller checked `in_support`.
//   z = (a^2 - 2 rho a b + b^2) / (2 q),  q = 1 - rho^2.
// For |rho| < 1/2 the expanded form is accurate (a^2 - 2 rho a b + b^2 >= (a^2 + b^2) / 2) and is kept as
// it always was, so ordinary tokens render bit for bit as before. Nearer |rho| = 1 it cancels (~4e-2
// weight error in float32 at rho = 0.999999), so there z = b^2/2 + d^2/(2q), d = a - rho b formed
// without cancellation: a sum of two non-negative terms that keeps its digits.
template <typename T>
GPSTOKEN_HD GaussianTerms<T> gaussian_terms(T dx, T dy, const GaussianCoeffs<T>& c) {
  GaussianTerms<T> t;
  t.a = dx * c.inv_sigma_x;
  t.b = dy * c.inv_sigma_y;
  if (c.one_minus_abs_rho > T(0.5)) {
    t.d = t.a - c.rho * t.b;
    t.e = t.b - c.rho * t.a;
    t.z = (t.a * t.a - T(2) * c.rho * t.a * t.b + t.b * t.b) * (T(0.5) * c.inv_q);
    if (t.z < T(0)) t.z = T(0);  // rounding, for a ~ b
    t.de_over_q = t.a * t.b - T(2) * c.rho * t.z;
  } else {
    t.d = minus_rho_times(t.a, t.b, c);
    t.e = minus_rho_times(t.b, t.a, c);
    t.z = T(0.5) * (t.b * t.b + t.d * t.d * c.inv_q);
    t.de_over_q = t.d * t.e * c.inv_q;
  }
  t.weight = exp_t(-t.z);
  return t;
}

// G at pixel (ix, iy) of a height x width map; 0 outside the support.
template <typename T>
GPSTOKEN_HD T gaussian_weight(int ix, int iy, const T* g, T support, int height, int width) {
  const T dx = pixel_center<T>(ix, width) - g[kMuX];
  const T dy = pixel_center<T>(iy, height) - g[kMuY];
  if (!in_support(dx, dy, g, support)) return T(0);
  return gaussian_terms(dx, dy, gaussian_coeffs(g)).weight;
}

// dG/d(sigma_x, sigma_y, rho, mu_x, mu_y) from the terms at one pixel inside the support.
//   dz/da = d/q,  dz/db = e/q,  dz/drho = (2 rho z - a b)/q = -d e / q^2  (d e / q: see gaussian_terms)
//   da/dmu_x = -1/sigma_x,  da/dsigma_x = -a/sigma_x  (b likewise);  dG = -G dz.
template <typename T>
GPSTOKEN_HD void gaussian_weight_grad(const GaussianTerms<T>& t, const GaussianCoeffs<T>& c,
                                      T grad[kNumParams]) {
  const T w_over_q = t.weight * c.inv_q;
  const T da = w_over_q * t.d * c.inv_sigma_x;  // = dG/dmu_x
  const T db = w_over_q * t.e * c.inv_sigma_y;  // = dG/dmu_y
  grad[kSigmaX] = da * t.a;
  grad[kSigmaY] = db * t.b;
  grad[kRho] = w_over_q * t.de_over_q;
  grad[kMuX] = da;
  grad[kMuY] = db;
}

// Float16 storage: |rho| rounds to exactly 1 above 0.99976 and sigma can underflow to 0, which make
// q = 0 (inf / NaN weights that spread through the decoder's norms). Clamp what was loaded to the
// nearest float16 values that stay finite: |rho| <= 1 - 2^-11 (the largest float16 below 1), sigma >=
// 2^-24 (the smallest positive float16).
constexpr float kHalfRhoLimit = 0.99951171875f;
constexpr float kHalfSigmaMin = 5.9604644775390625e-08f;

template <typename T>
GPSTOKEN_HD void clamp_loaded_half_gaussian(T* g) {
  if (!(g[kSigmaX] >= T(kHalfSigmaMin))) g[kSigmaX] = T(kHalfSigmaMin);  // also maps NaN: then empty
  if (!(g[kSigmaY] >= T(kHalfSigmaMin))) g[kSigmaY] = T(kHalfSigmaMin);
  if (g[kRho] > T(kHalfRhoLimit)) g[kRho] = T(kHalfRhoLimit);
  if (g[kRho] < -T(kHalfRhoLimit)) g[kRho] = -T(kHalfRhoLimit);
}

}  // namespace gpstoken
