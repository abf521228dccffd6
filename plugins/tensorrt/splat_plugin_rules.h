// The GaussianSplat TensorRT plugin's decisions, free of TensorRT types: which attributes it takes and
// how they are validated, which dtypes/layouts it accepts, what shapes it needs and produces.
//
// The plugin (gaussian_splat_plugin.cpp) translates TensorRT's structs into these and back, so this
// header is what the CPU-only test (tests/rules_test.cpp) checks on machines without TensorRT.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "gpstoken/splat_shape.h"

namespace gpstoken::trt_rules {

inline constexpr char kPluginName[] = "GaussianSplat";  // = the ONNX node's op_type
inline constexpr char kPluginVersion[] = "1";
inline constexpr int kNumInputs = 2;    // gaussians (B, L, 5), features (B, L, C)
inline constexpr int kNumOutputs = 1;   // rendered map (B, C, H, W)
inline constexpr int kMaxSide = 32768;  // image side limit: keeps H * W far from int32 overflow
inline constexpr float kDefaultSupport = 3.0f;  // official gps_dmax; = SUPPORT in gpstoken_core/official.py

// The field types the plugin may receive (a subset of nvinfer1::PluginFieldType, mapped by the plugin).
enum class FieldKind { kInt32, kInt64, kFloat32, kFloat64, kOther };

struct RawField {
  const char* name;
  FieldKind kind;
  const void* data;
  int32_t length;
};

struct SplatFields {
  int32_t height = 0;
  int32_t width = 0;
  float support = kDefaultSupport;
};

// Serialization order and names; also the creator's advertised attributes.
inline constexpr const char* kFieldNames[] = {"height", "width", "support"};
inline constexpr FieldKind kFieldKinds[] = {FieldKind::kInt32, FieldKind::kInt32, FieldKind::kFloat32};

inline const char* kind_name(FieldKind k) {
  switch (k) {
    case FieldKind::kInt32: return "INT32";
    case FieldKind::kInt64: return "INT64";
    case FieldKind::kFloat32: return "FLOAT32";
    case FieldKind::kFloat64: return "FLOAT64";
    default: return "another type";
  }
}

namespace detail {

inline std::string read_int(const RawField& f, int64_t* value) {
  if (f.data == nullptr || f.length != 1)
    return std::string("attribute '") + f.name + "' must be one integer, got " + std::to_string(f.length) + " values";
  if (f.kind == FieldKind::kInt32) {
    int32_t v;
    std::memcpy(&v, f.data, sizeof v);
    *value = v;
  } else if (f.kind == FieldKind::kInt64) {
    std::memcpy(value, f.data, sizeof *value);
  } else {
    return std::string("attribute '") + f.name + "' must be an integer (INT), got " + kind_name(f.kind);
  }
  return {};
}

inline std::string read_float(const RawField& f, double* value) {
  if (f.data == nullptr || f.length != 1)
    return std::string("attribute '") + f.name + "' must be one float, got " + std::to_string(f.length) + " values";
  if (f.kind == FieldKind::kFloat32) {
    float v;
    std::memcpy(&v, f.data, sizeof v);
    *value = v;
  } else if (f.kind == FieldKind::kFloat64) {
    std::memcpy(value, f.data, sizeof *value);
  } else {
    return std::string("attribute '") + f.name + "' must be a float (FLOAT), got " + kind_name(f.kind);
  }
  return {};
}

}  // namespace detail

// Fills `out` from the attributes; returns "" or a message naming the offending attribute.
// `height` and `width` are required (TensorRT's ONNX parser only warns about missing attributes);
// `support` defaults to 3. Unknown names are ignored, as the parser passes every listed attribute.
inline std::string parse_fields(const RawField* fields, int32_t count, SplatFields* out) {
  SplatFields parsed;
  bool has_height = false, has_width = false;
  if (count < 0 || (count > 0 && fields == nullptr)) return "invalid field collection";
  for (int32_t i = 0; i < count; ++i) {
    const RawField& f = fields[i];
    if (f.name == nullptr) continue;
    const std::string name = f.name;
    if (name == "height" || name == "width") {
      int64_t v = 0;
      if (auto err = detail::read_int(f, &v); !err.empty()) return err;
      if (v < 2 || v > kMaxSide)
        return "attribute '" + name + "' must be in [2, " + std::to_string(kMaxSide) + "], got " + std::to_string(v);
      (name == "height" ? parsed.height : parsed.width) = int32_t(v);
      (name == "height" ? has_height : has_width) = true;
    } else if (name == "support") {
      double v = 0;
      if (auto err = detail::read_float(f, &v); !err.empty()) return err;
      if (!std::isfinite(v) || v <= 0 || v > 1e4)
        return "attribute 'support' must be a positive finite float (the support box in sigmas), got " + std::to_string(v);
      parsed.support = float(v);
    }
  }
  if (!has_height) return "attribute 'height' is missing (the rendered map's height in pixels)";
  if (!has_width) return "attribute 'width' is missing (the rendered map's width in pixels)";
  *out = parsed;
  return {};
}

// The fields an engine stores (getFieldsToSerialize), read back by parse_fields on deserialization.
// The pointers refer into `fields`, which must outlive the returned array.
struct SerializedFields {
  RawField entries[3];
};
inline SerializedFields serialize_fields(const SplatFields& fields) {
  return SerializedFields{{{kFieldNames[0], FieldKind::kInt32, &fields.height, 1},
                           {kFieldNames[1], FieldKind::kInt32, &fields.width, 1},
                           {kFieldNames[2], FieldKind::kFloat32, &fields.support, 1}}};
}

// ---- types and layouts --------------------------------------------------------------------------
enum class Element { kFloat32, kFloat16, kOther };

// pos counts inputs then outputs. Every tensor is dense row-major (linear) and all three share one
// float type: float32, or float16 (the kernel then accumulates in float32). This is exactly what
// enqueue dispatches on, nothing more.
inline bool supports_combination(int32_t pos, const Element* types, const bool* linear, int32_t nb_inputs,
                                 int32_t nb_outputs) {
  if (nb_inputs != kNumInputs || nb_outputs != kNumOutputs || pos < 0 || pos >= nb_inputs + nb_outputs)
    return false;
  if (!linear[pos]) return false;
  if (types[pos] != Element::kFloat32 && types[pos] != Element::kFloat16) return false;
  return pos == 0 || types[pos] == types[0];
}

// Output dtype from the input dtypes; "" or why not.
inline std::string output_type(const Element* inputs, int32_t nb_inputs, Element* output) {
  if (nb_inputs != kNumInputs) return "GaussianSplat takes 2 inputs (gaussians, features), got " + std::to_string(nb_inputs);
  if (inputs[0] != Element::kFloat32 && inputs[0] != Element::kFloat16)
    return "GaussianSplat inputs must be float32 or float16";
  if (inputs[1] != inputs[0]) return "GaussianSplat: gaussians and features must have the same dtype";
  *output = inputs[0];
  return {};
}

// ---- shapes ---------------------------------------------------------------------------------------
// Static checks of the input ranks/extents (-1 = unknown at build time). "" or the problem.
inline std::string check_input_dims(const int64_t* g, int32_t g_rank, const int64_t* f, int32_t f_rank) {
  if (g_rank != 3) return "gaussians must be (B, L, 5), got rank " + std::to_string(g_rank);
  if (f_rank != 3) return "features must be (B, L, C), got rank " + std::to_string(f_rank);
  if (g[2] != -1 && g[2] != 5) return "gaussians must be (B, L, 5), last dimension is " + std::to_string(g[2]);
  for (int d = 0; d < 2; ++d)
    if (g[d] != -1 && f[d] != -1 && g[d] != f[d])
      return std::string(d == 0 ? "batch" : "token count") + " differs between gaussians (" + std::to_string(g[d]) +
             ") and features (" + std::to_string(f[d]) + ")";
  return {};
}

// The output is (B, C, H, W): B from gaussians, C from features, H and W from the attributes.
// Expr/Builder are TensorRT's IDimensionExpr/IExprBuilder in the plugin; any type with
// `constant(int64_t)` works, so tests can run this without TensorRT.
template <typename Expr, typename Builder>
void output_dims(const Expr* const* g_dims, const Expr* const* f_dims, const SplatFields& fields, Builder& builder,
                 const Expr** out) {
  out[0] = g_dims[0];
  out[1] = f_dims[2];
  out[2] = builder.constant(fields.height);
  out[3] = builder.constant(fields.width);
}

// Concrete sizes of one enqueue.
inline SplatShape splat_shape(const int64_t* g, const int64_t* f, const SplatFields& fields) {
  return SplatShape{g[0], g[1], f[2], fields.height, fields.width};
}

}  // namespace gpstoken::trt_rules
