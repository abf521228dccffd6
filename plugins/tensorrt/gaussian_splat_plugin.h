// TensorRT plugin for the GaussianSplat node of gpstoken's decoder.onnx (TensorRT 11, IPluginV3).
//
//   inputs  gaussians (B, L, 5), features (B, L, C)   float32 or float16, dense
//   output  map (B, C, H, W), same dtype               H, W from the node's attributes
//   fields  height, width (INT32), support (FLOAT32, default 3)
//
// The kernel is plugins/cuda (math: gpstoken/splat_math.h); the decisions (fields, types, shapes)
// are in splat_plugin_rules.h so they can be tested without TensorRT.
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

#include "splat_plugin_rules.h"

namespace gpstoken::trt {

class GaussianSplatPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  GaussianSplatPlugin(trt_rules::SplatFields fields, std::string plugin_namespace);
  GaussianSplatPlugin(const GaussianSplatPlugin& other);
  GaussianSplatPlugin& operator=(const GaussianSplatPlugin&) = delete;
  ~GaussianSplatPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             nvinfer1::DataType const* input_types, int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nb_inputs, nvinfer1::DimsExprs const* shape_inputs,
                          int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* in_out, int32_t nb_inputs,
                                 int32_t nb_outputs) noexcept override;
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nb_inputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nb_outputs) noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nb_inputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nb_outputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nb_inputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nb_outputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* input_desc, nvinfer1::PluginTensorDesc const* output_desc,
                  void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  const trt_rules::SplatFields& fields() const { return fields_; }

 private:
  void report(const std::string& message) const;

  trt_rules::SplatFields fields_;
  std::string namespace_;
  nvinfer1::IErrorRecorder* recorder_ = nullptr;  // the execution context's, once attached
  // getFieldsToSerialize points into these; they live as long as the plugin.
  std::vector<nvinfer1::PluginField> serialized_;
  nvinfer1::PluginFieldCollection serialized_collection_{};
};

class GaussianSplatPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  GaussianSplatPluginCreator();

  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  // nullptr (with the reason reported) for missing or invalid fields.
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fields,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> attributes_;
  nvinfer1::PluginFieldCollection attribute_collection_{};
  std::string namespace_;
};

// Errors go to TensorRT's error recorder when one is reachable (the execution context's, else the
// plugin registry's), otherwise to the logger handed over by setLoggerFinder, otherwise to stderr.
void report_error(nvinfer1::IErrorRecorder* recorder, const std::string& message);

}  // namespace gpstoken::trt
