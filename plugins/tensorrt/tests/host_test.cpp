// Host-side test of the built TensorRT plugin libraries, without libnvinfer or a GPU:
//   gpstoken_trt_host_test path/to/libgpstoken_trt.so path/to/libgpstoken_trt_selfregister.so
// dlopens the getCreators library like IPluginRegistry::loadLibrary does, then drives the creator and
// the plugin through TensorRT's own interfaces (headers only): fields, capability interfaces, dtypes,
// formats, output shapes (with a constant-folding stand-in for TensorRT's expression builder),
// serialization round trip, clone, and the errors for bad fields (through the logger given to
// setLoggerFinder, then through the registry's error recorder). This executable exports a stand-in
// `getPluginRegistry`, so loading the self-registering library shows exactly one registration and the
// getCreators library none. Built by CMake when TensorRT headers are found.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "check.h"

using namespace nvinfer1;


// ---- stand-ins for TensorRT's implementation objects ---------------------------------------------
class FakeExprImpl final : public apiv::VDimensionExpr {
 public:
  explicit FakeExprImpl(int64_t v, bool constant = true) : value_(v), constant_(constant) {}
  bool isConstant() const override { return constant_; }
  int64_t getConstantValue() const override { return constant_ ? value_ : INT64_MIN; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t value_;
  bool constant_;
};

class FakeExpr final : public IDimensionExpr {
 public:
  explicit FakeExpr(int64_t v, bool constant = true) : impl_(v, constant) { mImpl = &impl_; }

 private:
  FakeExprImpl impl_;
};

class FakeBuilderImpl final : public apiv::VExprBuilder {
 public:
  IDimensionExpr const* constant(int64_t value) override {
    made_.push_back(std::make_unique<FakeExpr>(value));
    return made_.back().get();
  }
  IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override {
    return nullptr;  // the plugin needs no arithmetic on dimensions
  }
  IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
    return nullptr;
  }

 private:
  std::vector<std::unique_ptr<FakeExpr>> made_;
};

class FakeBuilder final : public IExprBuilder {
 public:
  FakeBuilder() { mImpl = &impl_; }

 private:
  FakeBuilderImpl impl_;
};

class CapturingLogger final : public ILogger {
 public:
  void log(Severity severity, AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error = msg;
  }
  std::string last_error;
};

class Finder final : public ILoggerFinder {
 public:
  explicit Finder(ILogger* logger) : logger_(logger) {}
  ILogger* findLogger() override { return logger_; }

 private:
  ILogger* logger_;
};

class RecordingErrorRecorder final : public IErrorRecorder {
 public:
  int32_t getNbErrors() const noexcept override { return int32_t(errors.size()); }
  ErrorCode getErrorCode(int32_t i) const noexcept override { return codes.at(size_t(i)); }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors.at(size_t(i)).c_str(); }
  bool hasOverflowed() const noexcept override { return false; }
  void clear() noexcept override { errors.clear(), codes.clear(); }
  bool reportError(ErrorCode code, ErrorDesc desc) noexcept override {
    codes.push_back(code), errors.emplace_back(desc);
    return true;
  }
  RefCount incRefCount() noexcept override { return 1; }
  RefCount decRefCount() noexcept override { return 1; }
  std::vector<std::string> errors;
  std::vector<ErrorCode> codes;
};

// What the self-registering library finds through dlsym(RTLD_DEFAULT, "getPluginRegistry").
class RecordingRegistry final : public IPluginRegistry {
 public:
  void setErrorRecorder(IErrorRecorder* const r) noexcept override { recorder = r; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return recorder; }
  bool isParentSearchEnabled() const override { return false; }
  void setParentSearchEnabled(bool const) override {}
  PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
  void deregisterLibrary(PluginLibraryHandle) noexcept override {}
  bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override {
    for (auto* c : creators)
      if (c == &creator) return false;  // as TensorRT: a creator registers once
    creators.push_back(&creator);
    namespaces.emplace_back(ns ? ns : "<null>");
    return true;
  }
  IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override {
    *n = int32_t(creators.size());
    return creators.data();
  }
  IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override {
    return nullptr;
  }
  bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
  IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
  int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
  IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override { return getAllCreators(n); }

  IErrorRecorder* recorder = nullptr;
  std::vector<IPluginCreatorInterface*> creators;
  std::vector<std::string> namespaces;
};

static RecordingRegistry g_registry;

extern "C" __attribute__((visibility("default"))) IPluginRegistry* getPluginRegistry() noexcept { return &g_registry; }

static DynamicPluginTensorDesc desc(DataType type, TensorFormat format) {
  DynamicPluginTensorDesc d{};
  d.desc.type = type;
  d.desc.format = format;
  return d;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::printf("usage: %s libgpstoken_trt.so libgpstoken_trt_selfregister.so\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::printf("cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  auto set_logger_finder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
  CHECK(get_creators != nullptr && set_logger_finder != nullptr);
  if (get_creators == nullptr || set_logger_finder == nullptr) return 1;
  CapturingLogger logger;
  Finder finder(&logger);
  set_logger_finder(&finder);

  int32_t count = 0;
  IPluginCreatorInterface* const* creators = get_creators(count);
  CHECK(count == 1);
  CHECK(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  CHECK(std::strcmp(creator->getPluginName(), "GaussianSplat") == 0);
  CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(creator->getPluginNamespace(), "") == 0);

  PluginFieldCollection const* names = creator->getFieldNames();
  CHECK(names->nbFields == 3);
  CHECK(std::strcmp(names->fields[0].name, "height") == 0 && names->fields[0].type == PluginFieldType::kINT32);
  CHECK(std::strcmp(names->fields[1].name, "width") == 0 && names->fields[1].type == PluginFieldType::kINT32);
  CHECK(std::strcmp(names->fields[2].name, "support") == 0 && names->fields[2].type == PluginFieldType::kFLOAT32);

  // As TensorRT's ONNX parser passes the node's attributes (INT -> INT32, FLOAT -> FLOAT32).
  int32_t height = 64, width = 48;
  float support = 5.0f;
  PluginField fields[] = {PluginField("height", &height, PluginFieldType::kINT32, 1),
                          PluginField("width", &width, PluginFieldType::kINT32, 1),
                          PluginField("support", &support, PluginFieldType::kFLOAT32, 1)};
  PluginFieldCollection fc{3, fields};
  IPluginV3* plugin = creator->createPlugin("splat_node", &fc, TensorRTPhase::kBUILD);
  CHECK(plugin != nullptr);
  if (plugin == nullptr) return 1;

  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  CHECK(core != nullptr && build != nullptr && runtime != nullptr);
  CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
  CHECK(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
  CHECK(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
  CHECK(std::strcmp(core->getPluginName(), "GaussianSplat") == 0);
  CHECK(build->getNbOutputs() == 1);

  // dtypes
  DataType out_type = DataType::kINT32;
  const DataType f32[2] = {DataType::kFLOAT, DataType::kFLOAT};
  const DataType f16[2] = {DataType::kHALF, DataType::kHALF};
  const DataType mixed[2] = {DataType::kFLOAT, DataType::kHALF};
  CHECK(build->getOutputDataTypes(&out_type, 1, f32, 2) == 0 && out_type == DataType::kFLOAT);
  CHECK(build->getOutputDataTypes(&out_type, 1, f16, 2) == 0 && out_type == DataType::kHALF);
  CHECK(build->getOutputDataTypes(&out_type, 1, mixed, 2) != 0);
  CHECK(logger.last_error.find("same dtype") != std::string::npos);

  // formats: exactly all-float32-linear and all-float16-linear
  const DataType types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kINT8, DataType::kINT32, DataType::kBF16};
  const TensorFormat formats[] = {TensorFormat::kLINEAR, TensorFormat::kCHW32, TensorFormat::kHWC};
  int accepted = 0, combinations = 0;
  for (DataType a : types)
    for (DataType b : types)
      for (DataType c : types)
        for (TensorFormat fa : formats)
          for (TensorFormat fb : formats)
            for (TensorFormat fo : formats) {
              DynamicPluginTensorDesc io[3] = {desc(a, fa), desc(b, fb), desc(c, fo)};
              bool ok = true;
              for (int pos = 0; pos < 3; ++pos) ok = ok && build->supportsFormatCombination(pos, io, 2, 1);
              accepted += ok;
              ++combinations;
              if (ok) CHECK(a == b && b == c && fa == TensorFormat::kLINEAR && fb == fa && fo == fa);
            }
  CHECK(accepted == 2 && combinations == 3375);

  // output shapes: (B, C, H, W) with B and C dynamic
  FakeExpr batch(0, false), tokens(0, false), five(5), channels(16);
  DimsExprs in[2];
  in[0].nbDims = 3;
  in[0].d[0] = &batch, in[0].d[1] = &tokens, in[0].d[2] = &five;
  in[1].nbDims = 3;
  in[1].d[0] = &batch, in[1].d[1] = &tokens, in[1].d[2] = &channels;
  DimsExprs out{};
  FakeBuilder builder;
  CHECK(build->getOutputShapes(in, 2, nullptr, 0, &out, 1, builder) == 0);
  CHECK(out.nbDims == 4 && out.d[0] == &batch && out.d[1] == &channels);
  CHECK(out.d[2]->isConstant() && out.d[2]->getConstantValue() == 64);
  CHECK(out.d[3]->isConstant() && out.d[3]->getConstantValue() == 48);
  FakeExpr six(6);
  in[0].d[2] = &six;
  CHECK(build->getOutputShapes(in, 2, nullptr, 0, &out, 1, builder) != 0);
  CHECK(logger.last_error.find("last dimension is 6") != std::string::npos);
  CHECK(build->getWorkspaceSize(nullptr, 2, nullptr, 1) == 0);

  // serialization round trip through the creator (as on engine deserialization) and clone
  PluginFieldCollection const* stored = runtime->getFieldsToSerialize();
  CHECK(stored->nbFields == 3);
  IPluginV3* restored = creator->createPlugin("splat_node", stored, TensorRTPhase::kRUNTIME);
  CHECK(restored != nullptr);
  IPluginV3* cloned = plugin->clone();
  CHECK(cloned != nullptr);
  for (IPluginV3* p : {restored, cloned}) {
    if (p == nullptr) continue;
    auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* again = rt->getFieldsToSerialize();
    CHECK(again->nbFields == 3);
    CHECK(*static_cast<int32_t const*>(again->fields[0].data) == 64);
    CHECK(*static_cast<int32_t const*>(again->fields[1].data) == 48);
    CHECK(*static_cast<float const*>(again->fields[2].data) == 5.0f);
    delete p;
  }

  // bad fields: nullptr and a message naming the attribute, never a crash
  struct Bad {
    PluginField field;
    const char* message;
  };
  int32_t zero = 0;
  float negative = -1.0f;
  int64_t wide = 40;
  Bad bad[] = {
      {PluginField("height", &zero, PluginFieldType::kINT32, 1), "'height' must be in [2, "},
      {PluginField("height", &support, PluginFieldType::kFLOAT32, 1), "'height' must be an integer"},
      {PluginField("support", &negative, PluginFieldType::kFLOAT32, 1), "'support' must be a positive"},
      {PluginField("support", &wide, PluginFieldType::kINT64, 1), "'support' must be a float"},
  };
  for (Bad& b : bad) {
    PluginField f[] = {fields[0], fields[1], fields[2], b.field};  // later fields override
    PluginFieldCollection c{4, f};
    logger.last_error.clear();
    CHECK(creator->createPlugin("bad_node", &c, TensorRTPhase::kBUILD) == nullptr);
    CHECK(logger.last_error.find(b.message) != std::string::npos);
    CHECK(logger.last_error.find("bad_node") != std::string::npos);
  }
  PluginFieldCollection only_height{1, fields};
  CHECK(creator->createPlugin("n", &only_height, TensorRTPhase::kBUILD) == nullptr);
  CHECK(logger.last_error.find("'width' is missing") != std::string::npos);
  CHECK(creator->createPlugin("n", nullptr, TensorRTPhase::kBUILD) == nullptr);

  // with an error recorder on the registry, errors go there (as kINVALID_ARGUMENT)
  RecordingErrorRecorder recorder;
  g_registry.setErrorRecorder(&recorder);
  logger.last_error.clear();
  CHECK(creator->createPlugin("n", &only_height, TensorRTPhase::kBUILD) == nullptr);
  CHECK(recorder.getNbErrors() == 1 && recorder.getErrorCode(0) == ErrorCode::kINVALID_ARGUMENT);
  CHECK(recorder.getNbErrors() == 1 && std::string(recorder.getErrorDesc(0)).find("'width' is missing") != std::string::npos);
  CHECK(logger.last_error.empty());
  g_registry.setErrorRecorder(nullptr);
  delete plugin;

  // registration: the getCreators library registered nothing by itself; the other one registers once
  int32_t registered = -1;
  g_registry.getAllCreators(&registered);
  CHECK(registered == 0);
  void* self = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
  CHECK(self != nullptr);
  CHECK(dlsym(self, "getCreators") == nullptr);  // one route per library
  void* again = dlopen(argv[2], RTLD_NOW | RTLD_LOCAL);
  CHECK(again == self);
  IPluginCreatorInterface* const* all = g_registry.getAllCreators(&registered);
  CHECK(registered == 1);
  if (registered == 1) {
    auto* c = static_cast<IPluginCreatorV3One*>(all[0]);
    CHECK(std::strcmp(c->getPluginName(), "GaussianSplat") == 0 && g_registry.namespaces[0].empty());
    CHECK(c != creator);  // its own creator instance, not the getCreators library's
  }

  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all GaussianSplat plugin host checks passed (%d format combinations)\n", combinations);
  return 0;
}
