// Sizes of one GaussianSplat call, shared by the CPU and CUDA launchers and their hosts.
#pragma once

#include <cstdint>

namespace gpstoken {

struct SplatShape {
  int64_t batch;     // B
  int64_t tokens;    // L
  int64_t channels;  // C
  int height;        // H >= 2
  int width;         // W >= 2
};

}  // namespace gpstoken
