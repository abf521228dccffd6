#include "gpstoken/partition.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define GPSTOKEN_PARTITION_AVX2 1
#endif

namespace gpstoken::partition {

namespace {

constexpr int kResize = 64;          // official: every region is resized to 64 x 64 before Sobel
constexpr int kBins = 512;           // histogram bins over (kLow, kHigh); only the upper half can fill
constexpr double kLow = -5.5, kHigh = 5.5;

// Bilinear taps of one axis, align_corners=False and no antialias (cv2 INTER_LINEAR == torch bilinear).
struct Taps {
  int i0[kResize], i1[kResize];
  double frac[kResize];
};

Taps bilinear_taps(int src) {
  Taps t;
  const double scale = double(src) / kResize;
  for (int d = 0; d < kResize; ++d) {
    double s = (d + 0.5) * scale - 0.5;
    if (s < 0) s = 0;
    int i0 = int(s);
    if (i0 > src - 1) i0 = src - 1;
    t.i0[d] = i0;
    t.i1[d] = std::min(i0 + 1, src - 1);
    t.frac[d] = s - i0;
  }
  return t;
}

// numpy.histogram's bin of v for uniform bins over [kLow, kHigh], edge corrections included, or -1.
int histogram_bin(double v) {
  if (!(v >= kLow && v <= kHigh)) return -1;
  const double step = (kHigh - kLow) / kBins;
  auto edge = [&](int i) { return i == kBins ? kHigh : i * step + kLow; };  // np.linspace
  int i = int((v - kLow) * (kBins / (kHigh - kLow)));
  if (i == kBins) i = kBins - 1;
  if (v < edge(i)) --i;
  if (v >= edge(i + 1) && i != kBins - 1) ++i;
  return i;
}

void histogram_bins_portable(const double* magnitude, int count, int* bins) {
  for (int k = 0; k < count; ++k) {
    const int bin = histogram_bin(magnitude[k]);
    bins[k] = bin < 0 ? kBins : bin;
  }
}

#ifdef GPSTOKEN_PARTITION_AVX2
// histogram_bin four at a time. Bin indices stay doubles (exact small integers) so that every edge
// comparison sees the values histogram_bin compares; no FMA, so edges round as there. (The upward
// correction never fires for magnitudes with these constants; it is kept to follow numpy's rules.)
[[gnu::target("avx2")]] void histogram_bins_avx2(const double* magnitude, int count, int* bins) {
  const __m256d high = _mm256_set1_pd(kHigh), low = _mm256_set1_pd(kLow);
  const __m256d scale = _mm256_set1_pd(kBins / (kHigh - kLow)), step = _mm256_set1_pd((kHigh - kLow) / kBins);
  const __m256d one = _mm256_set1_pd(1.0), last = _mm256_set1_pd(kBins - 1), spare = _mm256_set1_pd(kBins);
  int k = 0;
  for (; k + 4 <= count; k += 4) {
    const __m256d v = _mm256_loadu_pd(magnitude + k);
    // Magnitudes are >= 0 > kLow or NaN; NaN fails this test as in histogram_bin.
    const __m256d inside = _mm256_cmp_pd(v, high, _CMP_LE_OQ);
    const __m256d vc = _mm256_and_pd(v, inside);
    __m256d i = _mm256_mul_pd(_mm256_sub_pd(vc, low), scale);
    i = _mm256_min_pd(_mm256_round_pd(i, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), last);
    const __m256d lower_edge = _mm256_add_pd(_mm256_mul_pd(i, step), low);
    i = _mm256_sub_pd(i, _mm256_and_pd(_mm256_cmp_pd(vc, lower_edge, _CMP_LT_OQ), one));
    const __m256d upper_edge = _mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(i, one), step), low);
    const __m256d up = _mm256_and_pd(_mm256_cmp_pd(vc, upper_edge, _CMP_GE_OQ), _mm256_cmp_pd(i, last, _CMP_LT_OQ));
    i = _mm256_blendv_pd(spare, _mm256_add_pd(i, _mm256_and_pd(up, one)), inside);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bins + k), _mm256_cvttpd_epi32(i));
  }
  histogram_bins_portable(magnitude + k, count - k, bins + k);
}
#endif

struct Candidate {
  Region region;
  double m;
};

bool is_small(const Region& r, int min_size) {
  // Official test on inclusive ranges: both (x1 - x0) and (y1 - y0) <= min_size.
  return (r.y1 - r.y0) <= min_size && (r.x1 - r.x0) <= min_size;
}

std::pair<Region, Region> split_width(const Region& r) {
  const int left = r.width() / 2;
  return {{r.x0, r.y0, r.x0 + left - 1, r.y1}, {r.x0 + left, r.y0, r.x1, r.y1}};
}

std::pair<Region, Region> split_height(const Region& r) {
  const int top = r.height() / 2;
  return {{r.x0, r.y0, r.x1, r.y0 + top - 1}, {r.x0, r.y0 + top, r.x1, r.y1}};
}

// Shared split loop of Alg. 1 and Alg. 2; `score` gives a region's m, `square_split_by_width`
// decides square regions.
template <typename Score, typename SquareRule>
std::vector<Region> split_until(Region whole, int count, int min_size, Score score,
                                SquareRule square_split_by_width) {
  // The official loop stable-sorts the list (descending m) before every split. The list stays sorted
  // here instead: a child goes after every region whose m is >= its own, where a stable sort of the
  // list with the children appended would put it. The last split's children stay unsorted at the end,
  // as in the official result.
  std::vector<Candidate> list{{whole, count > 1 ? score(whole) : 0.0}};
  auto insert_sorted = [&](const Candidate& c) {
    const auto at = std::find_if(list.begin(), list.end(), [&](const Candidate& o) { return o.m < c.m; });
    list.insert(at, c);
  };
  while (int(list.size()) < count) {
    auto it = std::find_if(list.begin(), list.end(),
                           [&](const Candidate& c) { return !is_small(c.region, min_size); });
    if (it == list.end())
      throw std::runtime_error("partition: every region is at the minimum size before reaching " +
                               std::to_string(count) + " tokens");
    const Region r = it->region;
    list.erase(it);
    const int w = r.width(), h = r.height();
    bool by_width;
    if (w > h) {
      by_width = true;
    } else if (w < h) {
      by_width = false;
    } else {
      by_width = square_split_by_width(r);
    }
    const auto [a, b] = by_width ? split_width(r) : split_height(r);
    const Candidate first{a, score(a)}, second{b, score(b)};
    if (int(list.size()) + 2 < count) {
      insert_sorted(first);
      insert_sorted(second);
    } else {
      list.push_back(first);
      list.push_back(second);
    }
  }
  std::vector<Region> out;
  out.reserve(list.size());
  for (const Candidate& c : list) out.push_back(c.region);
  return out;
}

}  // namespace

GreyImage::GreyImage(const double* grey, int height, int width, const double* priority)
    : grey_(grey), priority_(priority), height_(height), width_(width) {
  if (priority_) {
    priority_integral_.assign(size_t(height + 1) * (width + 1), 0.0);
    for (int y = 0; y < height; ++y)
      for (int x = 0; x < width; ++x)
        priority_integral_[size_t(y + 1) * (width + 1) + x + 1] =
            priority[size_t(y) * width + x] + priority_integral_[size_t(y) * (width + 1) + x + 1] +
            priority_integral_[size_t(y + 1) * (width + 1) + x] -
            priority_integral_[size_t(y) * (width + 1) + x];
  }
}

namespace {

std::atomic<bool> g_use_simd{simd_available()};

// Entropy of a region, written once and compiled twice: for any x86-64 and, with wider vectors for the
// compiler's loops and the AVX2 binning, for CPUs that have AVX2 (chosen at run time).
template <bool kAvx2>
[[gnu::always_inline]] inline double region_entropy(const double* grey, int stride, const Region& r) {
  const int h = r.height(), w = r.width();
  const Taps tx = bilinear_taps(w), ty = bilinear_taps(h);
  double img[kResize][kResize];
  if (h <= kResize) {
    // Upscaled: output rows reuse source rows, so interpolate each source row along x once and then blend
    // rows along y. Same expressions as the direct form below, so the same values.
    double rows[kResize][kResize];
    for (int y = ty.i0[0]; y <= ty.i1[kResize - 1]; ++y) {
      const double* src = grey + size_t(r.y0 + y) * stride + r.x0;
      for (int dx = 0; dx < kResize; ++dx) {
        const double fx = tx.frac[dx];
        rows[y][dx] = src[tx.i0[dx]] * (1 - fx) + src[tx.i1[dx]] * fx;
      }
    }
    for (int dy = 0; dy < kResize; ++dy) {
      const double *top = rows[ty.i0[dy]], *bottom = rows[ty.i1[dy]];
      const double fy = ty.frac[dy];
      for (int dx = 0; dx < kResize; ++dx) img[dy][dx] = top[dx] * (1 - fy) + bottom[dx] * fy;
    }
  } else {
    for (int dy = 0; dy < kResize; ++dy) {
      const double* row0 = grey + size_t(r.y0 + ty.i0[dy]) * stride + r.x0;
      const double* row1 = grey + size_t(r.y0 + ty.i1[dy]) * stride + r.x0;
      const double fy = ty.frac[dy];
      for (int dx = 0; dx < kResize; ++dx) {
        const double fx = tx.frac[dx];
        const double top = row0[tx.i0[dx]] * (1 - fx) + row0[tx.i1[dx]] * fx;
        const double bottom = row1[tx.i0[dx]] * (1 - fx) + row1[tx.i1[dx]] * fx;
        img[dy][dx] = top * (1 - fy) + bottom * fy;
      }
    }
  }
  // Sobel 3x3 (cv2 ksize 3), BORDER_REPLICATE. Magnitudes first, in a loop the compiler vectorizes
  // (sqrt included), then the histogram.
  double magnitude[kResize * kResize];
  for (int y = 0; y < kResize; ++y) {
    const double* up = img[y > 0 ? y - 1 : 0];
    const double* mid = img[y];
    const double* down = img[y < kResize - 1 ? y + 1 : kResize - 1];
    double* out = magnitude + y * kResize;
    auto sobel = [&](int x, int xm, int xp) {
      const double gx = (up[xp] + 2 * mid[xp] + down[xp]) - (up[xm] + 2 * mid[xm] + down[xm]);
      const double gy = (down[xm] + 2 * down[x] + down[xp]) - (up[xm] + 2 * up[x] + up[xp]);
      return std::sqrt(gx * gx + gy * gy);
    };
    out[0] = sobel(0, 0, 1);
    for (int x = 1; x < kResize - 1; ++x) out[x] = sobel(x, x - 1, x + 1);  // branch-free: vectorizes
    out[kResize - 1] = sobel(kResize - 1, kResize - 2, kResize - 1);
  }
  int bins[kResize * kResize];
#ifdef GPSTOKEN_PARTITION_AVX2
  if constexpr (kAvx2) histogram_bins_avx2(magnitude, kResize * kResize, bins);
  else histogram_bins_portable(magnitude, kResize * kResize, bins);
#else
  histogram_bins_portable(magnitude, kResize * kResize, bins);
#endif
  // Four interleaved counts: flat areas put long runs in one bin, which would wait on one counter.
  int counts[4][kBins + 1] = {};
  for (int k = 0; k < kResize * kResize; k += 4)
    for (int j = 0; j < 4; ++j) ++counts[j][bins[k + j]];
  const int total = kResize * kResize - (counts[0][kBins] + counts[1][kBins] + counts[2][kBins] + counts[3][kBins]);
  double entropy = 0;
  for (int i = 0; i < kBins; ++i) {
    const int n = counts[0][i] + counts[1][i] + counts[2][i] + counts[3][i];
    if (n == 0) continue;  // an empty bin adds exactly 0 * log2(1e-10) = 0
    const double q = n / (total + 1e-5);
    entropy -= q * std::log2(q + 1e-10);
  }
  return entropy;
}

double region_entropy_portable(const double* grey, int stride, const Region& r) {
  return region_entropy<false>(grey, stride, r);
}

#ifdef GPSTOKEN_PARTITION_AVX2
[[gnu::target("avx2")]] double region_entropy_avx2(const double* grey, int stride, const Region& r) {
  return region_entropy<true>(grey, stride, r);
}
#endif

}  // namespace

bool simd_available() {
#ifdef GPSTOKEN_PARTITION_AVX2
  __builtin_cpu_init();  // may run from a static initializer, before libgcc's own
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool use_simd(bool enabled) {
  return g_use_simd.exchange(enabled && simd_available());
}

void histogram_bins(const double* magnitude, int count, int* bins) {
#ifdef GPSTOKEN_PARTITION_AVX2
  if (g_use_simd.load(std::memory_order_relaxed)) return histogram_bins_avx2(magnitude, count, bins);
#endif
  histogram_bins_portable(magnitude, count, bins);
}

double GreyImage::entropy(const Region& r) const {
#ifdef GPSTOKEN_PARTITION_AVX2
  if (g_use_simd.load(std::memory_order_relaxed)) return region_entropy_avx2(grey_, width_, r);
#endif
  return region_entropy_portable(grey_, width_, r);
}

double GreyImage::complexity(const Region& r, double lam) const {
  double m = std::pow(entropy(r), lam) * r.height() * r.width();
  if (priority_) {
    const size_t s = width_ + 1;
    m += priority_integral_[size_t(r.y1 + 1) * s + r.x1 + 1] - priority_integral_[size_t(r.y0) * s + r.x1 + 1] -
         priority_integral_[size_t(r.y1 + 1) * s + r.x0] + priority_integral_[size_t(r.y0) * s + r.x0];
  }
  return m;
}

int max_tokens(int height, int width, int min_size) {
  // The fewest leaves any sequence of allowed splits ends with, so every count up to it is reachable.
  std::map<std::pair<int, int>, int> memo;
  auto leaves = [&](auto&& self, int h, int w) -> int {
    if (h - 1 <= min_size && w - 1 <= min_size) return 1;
    const auto key = std::make_pair(h, w);
    if (auto it = memo.find(key); it != memo.end()) return it->second;
    int best = -1;
    if (w >= h) best = self(self, h, w / 2) + self(self, h, w - w / 2);
    if (h >= w) {
      const int by_height = self(self, h / 2, w) + self(self, h - h / 2, w);
      best = best < 0 ? by_height : std::min(best, by_height);
    }
    return memo[key] = best;
  };
  return leaves(leaves, height, width);
}

std::vector<Region> partition_tile(const GreyImage& image, const Options& o) {
  if (o.min_size < 1) throw std::invalid_argument("min_size must be >= 1");
  if (o.num_tokens < 1) throw std::invalid_argument("num_tokens must be >= 1");
  const int limit = max_tokens(image.height(), image.width(), o.min_size);
  if (o.num_tokens > limit)
    throw std::invalid_argument("num_tokens " + std::to_string(o.num_tokens) + " is more than a " +
                                std::to_string(image.width()) + "x" + std::to_string(image.height()) +
                                " tile allows with min_size " + std::to_string(o.min_size) + " (" +
                                std::to_string(limit) + ")");
  const Region whole{0, 0, image.width() - 1, image.height() - 1};
  // Square splits score four children and keep two: remember scores instead of recomputing them.
  std::map<std::array<int, 4>, double> scores;
  auto score = [&](const Region& r) {
    const std::array<int, 4> key{r.x0, r.y0, r.x1, r.y1};
    if (auto it = scores.find(key); it != scores.end()) return it->second;
    return scores[key] = image.complexity(r, o.lam);
  };
  auto square_rule = [&](const Region& r) {
    // Official: width iff min(m_left, m_right) < min(m_top, m_bottom); a tie goes to height
    // (the paper says <=, i.e. width).
    const auto [l, rr] = split_width(r);
    const auto [t, b] = split_height(r);
    return std::min(score(l), score(rr)) < std::min(score(t), score(b));
  };
  return split_until(whole, o.num_tokens, o.min_size, score, square_rule);
}

void region_to_gaussian(const Region& r, int height, int width, double out[5]) {
  out[0] = double(r.x1 - r.x0) / width * 2.0 / 3.0;
  out[1] = double(r.y1 - r.y0) / height * 2.0 / 3.0;
  out[2] = 0.0;
  out[3] = 2.0 * ((r.x0 + r.x1) / 2.0) / (width - 1) - 1.0;
  out[4] = 2.0 * ((r.y0 + r.y1) / 2.0) / (height - 1) - 1.0;
}

std::vector<Region> calibrate(const double* gaussians, int count, int height, int width, int s_min) {
  if (s_min < 1) throw std::invalid_argument("s_min must be >= 1");
  if (count < 1) throw std::invalid_argument("calibrate needs at least one Gaussian");
  const int limit = max_tokens(height, width, s_min);
  if (count > limit)
    throw std::invalid_argument(std::to_string(count) + " Gaussians are more than a " +
                                std::to_string(width) + "x" + std::to_string(height) +
                                " tile holds with s_min " + std::to_string(s_min) + " (" +
                                std::to_string(limit) + ")");
  // Step 1: snap each mean to the centre of its s_min x s_min grid cell (pixel units).
  std::vector<std::pair<double, double>> means(count);
  for (int i = 0; i < count; ++i) {
    auto snap = [&](double mu, int n) {
      double p = (mu + 1.0) * (n - 1) / 2.0;  // normalized -> pixel
      if (!(p >= 0)) p = 0;                  // NaN or off-image means land on the border cell
      if (p > n - 1) p = n - 1;
      int cell = int(p / s_min);
      const int last = (n - 1) / s_min;
      if (cell > last) cell = last;
      const double centre = cell * s_min + (s_min - 1) / 2.0;
      return centre > n - 1 ? double(n - 1) : centre;
    };
    means[i] = {snap(gaussians[i * 5 + 3], width), snap(gaussians[i * 5 + 4], height)};
  }
  // Step 2: re-partition with m = number of snapped means inside the region.
  auto score = [&](const Region& r) {
    int n = 0;
    for (const auto& [x, y] : means) n += x >= r.x0 && x <= r.x1 && y >= r.y0 && y <= r.y1;
    return double(n);
  };
  auto square_rule = [&](const Region& r) {
    // Split along x unless a snapped mean lies exactly on the vertical split line.
    const double line = r.x0 + r.width() / 2 - 0.5;
    for (const auto& [x, y] : means)
      if (x == line && y >= r.y0 && y <= r.y1) return false;
    return true;
  };
  return split_until(Region{0, 0, width - 1, height - 1}, count, s_min, score, square_rule);
}

}  // namespace gpstoken::partition
