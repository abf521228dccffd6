// _gpstoken_partition: numpy-only Python binding of the partition (Alg. 1) and calibration (Alg. 2).
// It never touches torch, so the slim runtime imports it as well as gpstoken does.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

#include "gpstoken/partition.h"

namespace py = pybind11;
using namespace gpstoken::partition;

namespace {

using GreyArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

void require_2d(const GreyArray& a, const char* name) {
  if (a.ndim() != 2) throw py::value_error(std::string(name) + " must be a 2-D (H, W) array");
}

py::array_t<int32_t> regions_to_array(const std::vector<Region>& regions) {
  py::array_t<int32_t> out({py::ssize_t(regions.size()), py::ssize_t(4)});
  auto o = out.mutable_unchecked<2>();
  for (size_t i = 0; i < regions.size(); ++i) {
    o(i, 0) = regions[i].x0;
    o(i, 1) = regions[i].y0;
    o(i, 2) = regions[i].x1;
    o(i, 3) = regions[i].y1;
  }
  return out;
}

struct Job {
  const double* grey;
  const double* priority;
  int height, width;
  Options options;
  std::vector<Region> result;
  std::exception_ptr error;
};

}  // namespace

PYBIND11_MODULE(_gpstoken_partition, m) {
  m.doc() = "GPSToken partition (Alg. 1) and calibration (Alg. 2) on numpy arrays";

  m.def(
      "grey_from_rgb",
      [](py::array_t<uint8_t, py::array::c_style | py::array::forcecast> rgb) {
        if (rgb.ndim() != 3 || rgb.shape(2) != 3)
          throw py::value_error("image must be (H, W, 3) uint8");
        const py::ssize_t h = rgb.shape(0), w = rgb.shape(1);
        py::array_t<double> grey({h, w});
        auto in = rgb.unchecked<3>();
        auto out = grey.mutable_unchecked<2>();
        for (py::ssize_t y = 0; y < h; ++y)
          for (py::ssize_t x = 0; x < w; ++x) {
            // Official: x / 127.5 - 1, BT.601 luma, then back to [0, 1].
            const double g = 0.299 * (in(y, x, 0) / 127.5 - 1) + 0.587 * (in(y, x, 1) / 127.5 - 1) +
                             0.114 * (in(y, x, 2) / 127.5 - 1);
            out(y, x) = (g + 1) / 2;
          }
        return grey;
      },
      py::arg("rgb"), "(H, W, 3) uint8 -> (H, W) float64 grey in [0, 1], as the official partition sees it");

  m.def(
      "partition_many",
      [](std::vector<GreyArray> greys, std::vector<int> num_tokens, double lam, int min_size,
         std::vector<std::optional<GreyArray>> priorities, int threads) {
        if (num_tokens.size() != greys.size() || priorities.size() != greys.size())
          throw py::value_error("greys, num_tokens and priorities must have the same length");
        std::vector<Job> jobs(greys.size());
        for (size_t i = 0; i < greys.size(); ++i) {
          require_2d(greys[i], "grey");
          Job& j = jobs[i];
          j.grey = greys[i].data();
          j.height = int(greys[i].shape(0));
          j.width = int(greys[i].shape(1));
          j.priority = nullptr;
          if (priorities[i]) {
            require_2d(*priorities[i], "priority");
            if (priorities[i]->shape(0) != j.height || priorities[i]->shape(1) != j.width)
              throw py::value_error("priority must have the shape of its image");
            j.priority = priorities[i]->data();
          }
          if (j.height < 1 || j.width < 1) throw py::value_error("empty image");
          j.options = Options{num_tokens[i], lam, min_size};
        }
        {
          py::gil_scoped_release release;
          const int n_threads = std::max(1, std::min<int>(threads, int(jobs.size())));
          auto work = [&](int t) {
            for (size_t i = t; i < jobs.size(); i += n_threads) {
              try {
                const GreyImage image(jobs[i].grey, jobs[i].height, jobs[i].width, jobs[i].priority);
                jobs[i].result = partition_tile(image, jobs[i].options);
              } catch (...) {
                jobs[i].error = std::current_exception();
              }
            }
          };
          std::vector<std::thread> pool;
          for (int t = 1; t < n_threads; ++t) pool.emplace_back(work, t);
          work(0);
          for (auto& th : pool) th.join();
        }
        py::list out;
        for (Job& j : jobs) {
          if (j.error) std::rethrow_exception(j.error);
          out.append(regions_to_array(j.result));
        }
        return out;
      },
      py::arg("greys"), py::arg("num_tokens"), py::arg("lam"), py::arg("min_size"), py::arg("priorities"),
      py::arg("threads") = 1,
      "Alg. 1 on each (H, W) grey tile, in parallel; returns a list of (L, 4) int32 boxes x0, y0, x1, y1 "
      "(inclusive pixels)");

  m.def(
      "region_complexity",
      [](GreyArray grey, std::vector<int> box, double lam, std::optional<GreyArray> priority) {
        require_2d(grey, "grey");
        const GreyImage image(grey.data(), int(grey.shape(0)), int(grey.shape(1)),
                              priority ? priority->data() : nullptr);
        return image.complexity(Region{box.at(0), box.at(1), box.at(2), box.at(3)}, lam);
      },
      py::arg("grey"), py::arg("box"), py::arg("lam"), py::arg("priority") = py::none());

  m.def("simd_available", &simd_available, "Whether this CPU runs the AVX2 build of the entropy kernel");
  m.def("use_simd", &use_simd, py::arg("enabled"),
        "Use the AVX2 entropy kernel (when available) or the portable one; returns the previous choice. "
        "Both give identical results (tests compare them).");

  m.def(
      "histogram_bins",
      [](GreyArray magnitudes) {
        if (magnitudes.ndim() != 1) throw py::value_error("magnitudes must be 1-D");
        py::array_t<int32_t> out(magnitudes.shape(0));
        histogram_bins(magnitudes.data(), int(magnitudes.shape(0)), out.mutable_data());
        return out;
      },
      py::arg("magnitudes"),
      "Bins of the entropy histogram (numpy.histogram over 512 bins of (-5.5, 5.5)) for magnitudes >= 0; "
      "out of range -> 512");

  m.def("max_tokens", &max_tokens, py::arg("height"), py::arg("width"), py::arg("min_size"),
        "The largest token count every split sequence of an HxW tile reaches with min_size");

  m.def(
      "regions_to_gaussians",
      [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> boxes, int height, int width) {
        if (boxes.ndim() != 2 || boxes.shape(1) != 4) throw py::value_error("boxes must be (L, 4)");
        py::array_t<double> out({boxes.shape(0), py::ssize_t(5)});
        auto b = boxes.unchecked<2>();
        double* o = out.mutable_data();
        for (py::ssize_t i = 0; i < boxes.shape(0); ++i)
          region_to_gaussian(Region{b(i, 0), b(i, 1), b(i, 2), b(i, 3)}, height, width, o + 5 * i);
        return out;
      },
      py::arg("boxes"), py::arg("height"), py::arg("width"),
      "(L, 4) inclusive pixel boxes -> (L, 5) official g_init (sigma = (x1 - x0) / W * 2/3, rho 0, centre)");

  m.def(
      "calibrate",
      [](py::array_t<double, py::array::c_style | py::array::forcecast> gaussians, int height, int width,
         int s_min) {
        if (gaussians.ndim() != 2 || gaussians.shape(1) != 5)
          throw py::value_error("gaussians must be (L, 5)");
        std::vector<Region> regions;
        try {
          regions = calibrate(gaussians.data(), int(gaussians.shape(0)), height, width, s_min);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
        return regions_to_array(regions);
      },
      py::arg("gaussians"), py::arg("height"), py::arg("width"), py::arg("s_min"),
      "Alg. 2: snap means to the s_min grid, re-partition by counts; returns (L, 4) boxes");
}
