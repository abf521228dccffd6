#include "gaussian_splat_plugin.h"

#include <dlfcn.h>

#include <cstdio>
#include <exception>

#include "../cuda/splat_cuda.h"

using namespace nvinfer1;

namespace gpstoken::trt {

namespace {

ILogger* g_logger = nullptr;  // from setLoggerFinder (dynamic loading) when TensorRT provides one

// TensorRT's registry, found at run time so that the library needs no link dependency on libnvinfer
// (it may be loaded by the TensorRT Python wheel, by trtexec, or by polygraphy via ctypes).
IPluginRegistry* find_registry() {
  using GetRegistry = IPluginRegistry* (*)();
  void* symbol = dlsym(RTLD_DEFAULT, "getPluginRegistry");
  if (symbol == nullptr) {
    const std::string library = "libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR);
    if (void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_NOLOAD)) symbol = dlsym(handle, "getPluginRegistry");
  }
  return symbol != nullptr ? reinterpret_cast<GetRegistry>(symbol)() : nullptr;
}

trt_rules::Element element(DataType type) {
  switch (type) {
    case DataType::kFLOAT: return trt_rules::Element::kFloat32;
    case DataType::kHALF: return trt_rules::Element::kFloat16;
    default: return trt_rules::Element::kOther;
  }
}

trt_rules::FieldKind field_kind(PluginFieldType type) {
  switch (type) {
    case PluginFieldType::kINT32: return trt_rules::FieldKind::kInt32;
    case PluginFieldType::kINT64: return trt_rules::FieldKind::kInt64;
    case PluginFieldType::kFLOAT32: return trt_rules::FieldKind::kFloat32;
    case PluginFieldType::kFLOAT64: return trt_rules::FieldKind::kFloat64;
    default: return trt_rules::FieldKind::kOther;
  }
}

PluginFieldType plugin_field_type(trt_rules::FieldKind kind) {
  return kind == trt_rules::FieldKind::kFloat32 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
}

}  // namespace

void report_error(IErrorRecorder* recorder, const std::string& message) {
  const std::string text = std::string("gpstoken GaussianSplat plugin: ") + message;
  if (recorder == nullptr)
    if (IPluginRegistry* registry = find_registry()) recorder = registry->getErrorRecorder();
  if (recorder != nullptr) {
    recorder->reportError(ErrorCode::kINVALID_ARGUMENT, text.c_str());
  } else if (g_logger != nullptr) {
    g_logger->log(ILogger::Severity::kERROR, text.c_str());
  } else {
    std::fprintf(stderr, "%s\n", text.c_str());
  }
}

// ---- plugin ------------------------------------------------------------------------------------

GaussianSplatPlugin::GaussianSplatPlugin(trt_rules::SplatFields fields, std::string plugin_namespace)
    : fields_(fields), namespace_(std::move(plugin_namespace)) {}

GaussianSplatPlugin::GaussianSplatPlugin(const GaussianSplatPlugin& other)
    : IPluginV3(), IPluginV3OneCore(), IPluginV3OneBuild(), IPluginV3OneRuntime(),
      fields_(other.fields_), namespace_(other.namespace_), recorder_(other.recorder_) {}

IPluginCapability* GaussianSplatPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

IPluginV3* GaussianSplatPlugin::clone() noexcept {
  try {
    return new GaussianSplatPlugin(*this);
  } catch (const std::exception& e) {
    report(std::string("clone failed: ") + e.what());
    return nullptr;
  }
}

char const* GaussianSplatPlugin::getPluginName() const noexcept { return trt_rules::kPluginName; }
char const* GaussianSplatPlugin::getPluginVersion() const noexcept { return trt_rules::kPluginVersion; }
char const* GaussianSplatPlugin::getPluginNamespace() const noexcept { return namespace_.c_str(); }

int32_t GaussianSplatPlugin::getNbOutputs() const noexcept { return trt_rules::kNumOutputs; }

int32_t GaussianSplatPlugin::getOutputDataTypes(DataType* output_types, int32_t nb_outputs, DataType const* input_types,
                                                int32_t nb_inputs) const noexcept {
  if (nb_outputs != trt_rules::kNumOutputs || nb_inputs != trt_rules::kNumInputs) {
    report("expects 2 inputs and 1 output, got " + std::to_string(nb_inputs) + " and " + std::to_string(nb_outputs));
    return -1;
  }
  const trt_rules::Element in[2] = {element(input_types[0]), element(input_types[1])};
  trt_rules::Element out{};
  if (auto err = trt_rules::output_type(in, nb_inputs, &out); !err.empty()) {
    report(err);
    return -1;
  }
  output_types[0] = input_types[0];
  return 0;
}

int32_t GaussianSplatPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nb_inputs, DimsExprs const*, int32_t,
                                             DimsExprs* outputs, int32_t nb_outputs, IExprBuilder& builder) noexcept {
  if (nb_inputs != trt_rules::kNumInputs || nb_outputs != trt_rules::kNumOutputs) {
    report("expects 2 inputs and 1 output");
    return -1;
  }
  int64_t g[3] = {-1, -1, -1}, f[3] = {-1, -1, -1};
  for (int d = 0; d < 3 && d < inputs[0].nbDims; ++d)
    if (inputs[0].d[d]->isConstant()) g[d] = inputs[0].d[d]->getConstantValue();
  for (int d = 0; d < 3 && d < inputs[1].nbDims; ++d)
    if (inputs[1].d[d]->isConstant()) f[d] = inputs[1].d[d]->getConstantValue();
  if (auto err = trt_rules::check_input_dims(g, inputs[0].nbDims, f, inputs[1].nbDims); !err.empty()) {
    report(err);
    return -1;
  }
  outputs[0].nbDims = 4;
  trt_rules::output_dims(inputs[0].d, inputs[1].d, fields_, builder, outputs[0].d);
  return 0;
}

bool GaussianSplatPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* in_out,
                                                    int32_t nb_inputs, int32_t nb_outputs) noexcept {
  const int32_t n = nb_inputs + nb_outputs;
  if (n != trt_rules::kNumInputs + trt_rules::kNumOutputs || pos < 0 || pos >= n) return false;
  trt_rules::Element types[3];
  bool linear[3];
  for (int32_t i = 0; i <= pos; ++i) {  // only 0..pos are decided when TensorRT asks about pos
    types[i] = element(in_out[i].desc.type);
    linear[i] = in_out[i].desc.format == TensorFormat::kLINEAR;
  }
  return trt_rules::supports_combination(pos, types, linear, nb_inputs, nb_outputs);
}

int32_t GaussianSplatPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nb_inputs,
                                             DynamicPluginTensorDesc const*, int32_t nb_outputs) noexcept {
  if (nb_inputs != trt_rules::kNumInputs || nb_outputs != trt_rules::kNumOutputs) return -1;
  auto err = trt_rules::check_input_dims(in[0].desc.dims.d, in[0].desc.dims.nbDims, in[1].desc.dims.d,
                                         in[1].desc.dims.nbDims);
  if (!err.empty()) {
    report(err);
    return -1;
  }
  return 0;
}

size_t GaussianSplatPlugin::getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                                             int32_t) const noexcept {
  return 0;  // the kernel keeps its per-tile lists in shared memory
}

int32_t GaussianSplatPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nb_inputs, PluginTensorDesc const*,
                                           int32_t nb_outputs) noexcept {
  if (nb_inputs != trt_rules::kNumInputs || nb_outputs != trt_rules::kNumOutputs) return -1;
  auto err = trt_rules::check_input_dims(in[0].dims.d, in[0].dims.nbDims, in[1].dims.d, in[1].dims.nbDims);
  if (!err.empty()) {
    report(err);
    return -1;
  }
  return 0;
}

int32_t GaussianSplatPlugin::enqueue(PluginTensorDesc const* input_desc, PluginTensorDesc const*,
                                     void const* const* inputs, void* const* outputs, void*,
                                     cudaStream_t stream) noexcept {
  const SplatShape shape = trt_rules::splat_shape(input_desc[0].dims.d, input_desc[1].dims.d, fields_);
  cudaError_t status = cudaErrorInvalidValue;
  switch (input_desc[0].type) {
    case DataType::kFLOAT:
      status = cuda::splat_forward<float>(static_cast<const float*>(inputs[0]), static_cast<const float*>(inputs[1]),
                                          static_cast<float*>(outputs[0]), shape, fields_.support, stream);
      break;
    case DataType::kHALF:
      status = cuda::splat_forward_fp16(static_cast<const __half*>(inputs[0]), static_cast<const __half*>(inputs[1]),
                                        static_cast<__half*>(outputs[0]), shape, fields_.support, stream);
      break;
    default:
      report("enqueue got a dtype other than float32/float16");
      return -1;
  }
  if (status != cudaSuccess) {
    report(std::string("kernel launch failed: ") + cudaGetErrorString(status));
    return -1;
  }
  return 0;
}

IPluginV3* GaussianSplatPlugin::attachToContext(IPluginResourceContext* context) noexcept {
  auto* copy = static_cast<GaussianSplatPlugin*>(clone());
  if (copy != nullptr && context != nullptr) copy->recorder_ = context->getErrorRecorder();
  return copy;
}

PluginFieldCollection const* GaussianSplatPlugin::getFieldsToSerialize() noexcept {
  serialized_.clear();
  for (const trt_rules::RawField& f : trt_rules::serialize_fields(fields_).entries)
    serialized_.emplace_back(f.name, f.data, plugin_field_type(f.kind), f.length);
  serialized_collection_.nbFields = int32_t(serialized_.size());
  serialized_collection_.fields = serialized_.data();
  return &serialized_collection_;
}

void GaussianSplatPlugin::report(const std::string& message) const { report_error(recorder_, message); }

// ---- creator -----------------------------------------------------------------------------------

GaussianSplatPluginCreator::GaussianSplatPluginCreator() {
  for (size_t i = 0; i < std::size(trt_rules::kFieldNames); ++i)
    attributes_.emplace_back(trt_rules::kFieldNames[i], nullptr, plugin_field_type(trt_rules::kFieldKinds[i]), 1);
  attribute_collection_.nbFields = int32_t(attributes_.size());
  attribute_collection_.fields = attributes_.data();
}

char const* GaussianSplatPluginCreator::getPluginName() const noexcept { return trt_rules::kPluginName; }
char const* GaussianSplatPluginCreator::getPluginVersion() const noexcept { return trt_rules::kPluginVersion; }
char const* GaussianSplatPluginCreator::getPluginNamespace() const noexcept { return namespace_.c_str(); }
PluginFieldCollection const* GaussianSplatPluginCreator::getFieldNames() noexcept { return &attribute_collection_; }

IPluginV3* GaussianSplatPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fields,
                                                    TensorRTPhase) noexcept {
  try {
    std::vector<trt_rules::RawField> raw;
    if (fields != nullptr)
      for (int32_t i = 0; i < fields->nbFields; ++i) {
        const PluginField& f = fields->fields[i];
        raw.push_back({f.name, field_kind(f.type), f.data, f.length});
      }
    trt_rules::SplatFields parsed;
    if (auto err = trt_rules::parse_fields(raw.data(), int32_t(raw.size()), &parsed); !err.empty()) {
      report_error(nullptr, std::string("node ") + (name ? name : "?") + ": " + err);
      return nullptr;
    }
    return new GaussianSplatPlugin(parsed, namespace_);
  } catch (const std::exception& e) {
    report_error(nullptr, std::string("createPlugin failed: ") + e.what());
    return nullptr;
  }
}

}  // namespace gpstoken::trt

// ---- registration ------------------------------------------------------------------------------
// One library, one route (TensorRT refuses a creator registered twice):
//  * default: `getCreators` for IPluginRegistry::loadLibrary, trt.get_plugin_registry().load_library
//    and trtexec --dynamicPlugins;
//  * built with GPSTOKEN_TRT_SELF_REGISTER: registers itself when loaded (ctypes.CDLL, polygraphy
//    --plugins, trtexec --staticPlugins); TensorRT must be loaded first.

namespace {
gpstoken::trt::GaussianSplatPluginCreator& creator() {
  static gpstoken::trt::GaussianSplatPluginCreator instance;
  return instance;
}
}  // namespace

#if defined(GPSTOKEN_TRT_SELF_REGISTER)
namespace {
struct SelfRegistration {
  SelfRegistration() {
    IPluginRegistry* registry = gpstoken::trt::find_registry();
    if (registry == nullptr) {
      std::fprintf(stderr,
                   "gpstoken GaussianSplat plugin: TensorRT's plugin registry was not found (libnvinfer.so.%d is not "
                   "loaded), so the plugin could not register itself; import tensorrt before loading this library\n",
                   NV_TENSORRT_MAJOR);
      return;
    }
    if (!registry->registerCreator(creator(), ""))
      std::fprintf(stderr, "gpstoken GaussianSplat plugin: registration failed (already registered?)\n");
  }
};
const SelfRegistration self_registration;
}  // namespace
#else
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& count) {
  static IPluginCreatorInterface* const creators[] = {&creator()};
  count = 1;
  return creators;
}

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
  gpstoken::trt::g_logger = finder != nullptr ? finder->findLogger() : nullptr;
}
#endif
