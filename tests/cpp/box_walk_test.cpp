// BoxWalk (gpstoken/splat_math.h), as the CUDA backward kernel uses it, run on the host: for each box and
// walker count, every pixel of the box is visited exactly once, by walker (row-major index) mod threads,
// and empty boxes visit nothing. Prints "ok <boxes checked>" or the first failure.
#include <cstdio>
#include <vector>

#include "gpstoken/splat_math.h"

int main() {
  using gpstoken::BoxWalk;
  using gpstoken::PixelBox;
  int checked = 0;
  const int threads_list[] = {1, 32, 128, 129};
  const int widths[] = {1, 2, 3, 7, 31, 32, 33, 64, 127, 128, 129, 300};
  const int heights[] = {1, 2, 5, 64, 130};
  for (int threads : threads_list)
    for (int w : widths)
      for (int h : heights) {
        const PixelBox box{5, 5 + w, 11, 11 + h};
        std::vector<int> seen(size_t(w) * h, 0);
        for (int k = 0; k < threads; ++k) {
          long expected = k;
          for (BoxWalk p(box, k, threads); p.valid(); p.next(), expected += threads) {
            const long index = long(p.y - box.y0) * w + (p.x - box.x0);
            if (p.x < box.x0 || p.x >= box.x1 || p.y < box.y0 || p.y >= box.y1 || index != expected) {
              std::printf("FAIL threads %d box %dx%d walker %d: (%d, %d), expected index %ld\n", threads, w, h, k, p.x,
                          p.y, expected);
              return 1;
            }
            ++seen[size_t(index)];
          }
          if (expected < long(w) * h && k < long(w) * h) {
            std::printf("FAIL threads %d box %dx%d walker %d stopped early at %ld\n", threads, w, h, k, expected);
            return 1;
          }
        }
        for (int v : seen)
          if (v != 1) {
            std::printf("FAIL threads %d box %dx%d: a pixel visited %d times\n", threads, w, h, v);
            return 1;
          }
        ++checked;
      }
  const PixelBox empties[] = {{5, 5, 0, 10}, {5, 9, 3, 3}, {9, 5, 3, 1}};
  for (const PixelBox& box : empties)
    for (int k = 0; k < 128; ++k)
      if (BoxWalk(box, k, 128).valid()) {
        std::printf("FAIL empty box visited\n");
        return 1;
      }
  std::printf("ok %d\n", checked);
  return 0;
}
