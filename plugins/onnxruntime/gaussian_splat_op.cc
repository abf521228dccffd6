// ONNX Runtime custom-op library: gpstoken::GaussianSplat on the CPU, computed by the same kernel as
// the torch op (plugins/cpu, math in gpstoken/splat_math.h).
//
//   so = onnxruntime.SessionOptions(); so.register_custom_ops_library("libgpstoken_ort_ops.so")
//
// Node: GaussianSplat(gaussians float (B, L, 5), features float (B, L, C)) -> (B, C, height, width),
// attributes height, width (int, >= 2) and support (float, > 0), domain "gpstoken", version 1.
// Build against headers no newer than the oldest ONNX Runtime you deploy: GetApi(ORT_API_VERSION)
// returns nullptr on an older runtime and registration then fails with a message.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/splat_cpu.h"

namespace {

constexpr const char* kDomain = "gpstoken";
constexpr const char* kOpName = "GaussianSplat";

// ORT does not lend its intra-op pool to lite custom ops; chunks run on std::threads.
void thread_for(int64_t n, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t workers = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  if (workers <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + workers - 1) / workers;
  for (int64_t begin = chunk; begin < n; begin += chunk) {
    pool.emplace_back(body, begin, std::min(n, begin + chunk));
  }
  body(0, std::min(n, chunk));
  for (auto& t : pool) t.join();
}

struct GaussianSplatKernel {
  GaussianSplatKernel(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    height_ = kernel_info.GetAttribute<int64_t>("height");
    width_ = kernel_info.GetAttribute<int64_t>("width");
    support_ = kernel_info.GetAttribute<float>("support");
    if (height_ < 2 || width_ < 2 || !(support_ > 0.0f)) {
      ORT_CXX_API_THROW("GaussianSplat: needs height >= 2, width >= 2 and support > 0, got height " +
                            std::to_string(height_) + ", width " + std::to_string(width_) +
                            ", support " + std::to_string(support_),
                        ORT_INVALID_ARGUMENT);
    }
  }

  void Compute(const Ort::Custom::Tensor<float>& gaussians, const Ort::Custom::Tensor<float>& features,
               Ort::Custom::Tensor<float>& rendered) {
    const std::vector<int64_t> g = gaussians.Shape();
    const std::vector<int64_t> f = features.Shape();
    if (g.size() != 3 || g[2] != 5 || f.size() != 3 || f[0] != g[0] || f[1] != g[1]) {
      ORT_CXX_API_THROW("GaussianSplat: expects gaussians (B, L, 5) and features (B, L, C) with the same B and L",
                        ORT_INVALID_ARGUMENT);
    }
    const gpstoken::SplatShape shape{g[0], g[1], f[2], static_cast<int>(height_), static_cast<int>(width_)};
    float* out = rendered.Allocate({g[0], f[2], height_, width_});
    gpstoken::cpu::splat_forward<float>(gaussians.Data(), features.Data(), out, shape, support_, thread_for);
  }

 private:
  int64_t height_ = 0;
  int64_t width_ = 0;
  float support_ = 0.0f;
};

std::mutex g_domains_mutex;
std::vector<std::unique_ptr<Ort::CustomOpDomain>> g_domains;  // must outlive the sessions

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // the runtime is older than the headers this library was built with
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "libgpstoken_ort_ops: this ONNX Runtime is older than the headers the library was built with");
  }
  Ort::InitApi(api);
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> op{
      Ort::Custom::CreateLiteCustomOp<GaussianSplatKernel>(kOpName, "CPUExecutionProvider")};
  try {
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(op.get());
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> lock(g_domains_mutex);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& err) {
    return api->CreateStatus(ORT_FAIL, err.what());
  }
  return nullptr;
}
