// Spatially-adaptive initialization (GPSToken paper Alg. 1), following the official implementation
// (released checkpoints were trained with it; differences from the paper are noted inline).
//
// A tile is split in halves, most complex region first, until it holds `num_tokens` regions.
// Complexity of a region of h x w pixels: m = H^lambda * h * w + sum(priority over the region), where H
// is the entropy (log2) of the histogram of Sobel gradient magnitudes of the region's grey image after
// a bilinear resize to 64 x 64.
#pragma once

#include <cstdint>
#include <vector>

namespace gpstoken::partition {

// Inclusive pixel ranges, as the official code keeps them.
struct Region {
  int x0, y0, x1, y1;
  int width() const { return x1 - x0 + 1; }
  int height() const { return y1 - y0 + 1; }
};

// The defaults are the official ones, as in gpstoken_core/official.py (TOKENS_PER_TILE,
// PARTITION_LAMBDA, MIN_REGION); Python always passes its values.
struct Options {
  int num_tokens = 128;
  double lam = 2.5;   // lambda, the entropy exponent (official configs; the paper's value too)
  int min_size = 8;   // official adaptive_minhw (the paper says 4)
};

// Grey image in [0, 1], row-major height x width (official: (0.299R + 0.587G + 0.114B of x/127.5 - 1
// + 1) / 2). `priority` is null or a height x width map whose region sums are added to m.
class GreyImage {
 public:
  GreyImage(const double* grey, int height, int width, const double* priority);
  int height() const { return height_; }
  int width() const { return width_; }
  // Entropy-weighted complexity m of a region, priority included.
  double complexity(const Region& r, double lam) const;
  // Entropy H (bits) of the region's Sobel-magnitude histogram, the core of m.
  double entropy(const Region& r) const;

 private:
  const double* grey_;
  const double* priority_;
  int height_, width_;
  std::vector<double> priority_integral_;  // (H+1) x (W+1) summed-area table
};

// The entropy kernel has a portable build and an AVX2 build, chosen at run time (no -march flags in the
// wheel); both give the same bits. simd_available: this CPU can run the AVX2 one. use_simd: pick it (when
// available) or the portable one for every thread; returns the previous choice. Tests compare the two.
bool simd_available();
bool use_simd(bool enabled);

// The entropy's histogram bins (numpy.histogram(v, 512, (-5.5, 5.5)), edge rules included) of `count`
// magnitudes (>= 0 or NaN); out of range -> 512. Exposed so that tests can probe the bin edges.
void histogram_bins(const double* magnitude, int count, int* bins);

// The largest token count a tile of this size can reach with min_size (every region "small").
int max_tokens(int height, int width, int min_size);

// Alg. 1 on one tile. Throws std::invalid_argument on bad options.
// Order of the result: the official one (the last sorted list minus the split region, then its children).
std::vector<Region> partition_tile(const GreyImage& image, const Options& options);

// Region -> Gaussian (sigma_x, sigma_y, rho, mu_x, mu_y) in the official normalized convention on a
// tile of height x width: sigma = (x1 - x0) / width * 2 / 3, mu = 2 * centre / (width - 1) - 1.
void region_to_gaussian(const Region& r, int height, int width, double out[5]);

// Calibration (paper Alg. 2): snap predicted means to the s_min pixel grid of a height x width tile,
// then rebuild a valid partition with the same number of regions by splitting (Alg. 1's rules, with
// the count of predicted means inside a region as its complexity). Returns regions.
std::vector<Region> calibrate(const double* gaussians, int count, int height, int width, int s_min);

}  // namespace gpstoken::partition
