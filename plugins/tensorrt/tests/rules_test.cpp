// CPU test of the GaussianSplat plugin's rules (splat_plugin_rules.h), without TensorRT.
// Built by CMake as gpstoken_trt_rules_test and run by tests/test_tensorrt.py. Prints every
// failed check and exits non-zero if any failed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "../splat_plugin_rules.h"
#include "check.h"

using namespace gpstoken::trt_rules;


static bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

static void test_fields() {
  int32_t h = 64, w = 48;
  float support = 5.0f;
  int64_t h64 = 32;
  double support64 = 2.5;
  SplatFields out;

  RawField good[] = {{"height", FieldKind::kInt32, &h, 1}, {"width", FieldKind::kInt32, &w, 1},
                     {"support", FieldKind::kFloat32, &support, 1}};
  CHECK(parse_fields(good, 3, &out).empty());
  CHECK(out.height == 64 && out.width == 48 && out.support == 5.0f);

  // ONNX INT arrives as INT32 from TensorRT's parser; INT64 and FLOAT64 are accepted too.
  RawField wide[] = {{"width", FieldKind::kInt32, &w, 1}, {"height", FieldKind::kInt64, &h64, 1},
                     {"support", FieldKind::kFloat64, &support64, 1}, {"plugin_version", FieldKind::kOther, "1", 2}};
  CHECK(parse_fields(wide, 4, &out).empty());
  CHECK(out.height == 32 && out.width == 48 && out.support == 2.5f);

  // support defaults to the official 3
  RawField no_support[] = {{"height", FieldKind::kInt32, &h, 1}, {"width", FieldKind::kInt32, &w, 1}};
  CHECK(parse_fields(no_support, 2, &out).empty() && out.support == 3.0f);

  const SplatFields before = out;
  std::string err = parse_fields(good, 1, &out);  // width missing
  CHECK(contains(err, "'width' is missing"));
  err = parse_fields(nullptr, 0, &out);
  CHECK(contains(err, "'height' is missing"));
  CHECK(out.height == before.height && out.width == before.width);  // failures leave `out` untouched

  for (int32_t bad : {0, 1, -5, kMaxSide + 1}) {
    RawField f[] = {{"height", FieldKind::kInt32, &bad, 1}, {"width", FieldKind::kInt32, &w, 1}};
    err = parse_fields(f, 2, &out);
    CHECK(contains(err, "'height' must be in [2, "));
  }
  float as_float = 64.0f;
  RawField typed[] = {{"height", FieldKind::kFloat32, &as_float, 1}, {"width", FieldKind::kInt32, &w, 1}};
  CHECK(contains(parse_fields(typed, 2, &out), "'height' must be an integer (INT), got FLOAT32"));
  int32_t pair[2] = {4, 4};
  RawField array[] = {{"height", FieldKind::kInt32, pair, 2}, {"width", FieldKind::kInt32, &w, 1}};
  CHECK(contains(parse_fields(array, 2, &out), "'height' must be one integer, got 2 values"));
  RawField null_data[] = {{"height", FieldKind::kInt32, nullptr, 1}, {"width", FieldKind::kInt32, &w, 1}};
  CHECK(!parse_fields(null_data, 2, &out).empty());

  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    RawField f[] = {{"height", FieldKind::kInt32, &h, 1}, {"width", FieldKind::kInt32, &w, 1},
                    {"support", FieldKind::kFloat32, &bad, 1}};
    CHECK(contains(parse_fields(f, 3, &out), "'support' must be a positive finite float"));
  }
  RawField support_int[] = {{"height", FieldKind::kInt32, &h, 1}, {"width", FieldKind::kInt32, &w, 1},
                            {"support", FieldKind::kInt32, &h, 1}};
  CHECK(contains(parse_fields(support_int, 3, &out), "'support' must be a float (FLOAT), got INT32"));
}

static void test_serialization_round_trip() {
  for (SplatFields original : {SplatFields{2, 2, 0.5f}, SplatFields{256, 128, 3.0f}, SplatFields{kMaxSide, 7, 5.25f}}) {
    const SerializedFields stored = serialize_fields(original);
    CHECK(std::string(stored.entries[0].name) == "height" && std::string(stored.entries[2].name) == "support");
    SplatFields restored{0, 0, 0.0f};
    CHECK(parse_fields(stored.entries, 3, &restored).empty());
    CHECK(restored.height == original.height && restored.width == original.width &&
          restored.support == original.support);
  }
}

static void test_formats() {
  const Element all[] = {Element::kFloat32, Element::kFloat16, Element::kOther};
  int accepted_full = 0;
  for (Element a : all)
    for (Element b : all)
      for (Element c : all)
        for (int layout = 0; layout < 8; ++layout) {
          const Element types[3] = {a, b, c};
          const bool linear[3] = {bool(layout & 1), bool(layout & 2), bool(layout & 4)};
          // Expected, stated directly: a tensor is accepted iff it is linear, float32 or float16, and has the
          // first input's type; TensorRT asks pos by pos, so the answer for pos may use only 0..pos.
          for (int pos = 0; pos < 3; ++pos) {
            const bool expected = linear[pos] && (types[pos] == Element::kFloat32 || types[pos] == Element::kFloat16) &&
                                  types[pos] == types[0];
            CHECK(supports_combination(pos, types, linear, 2, 1) == expected);
          }
          bool all_ok = true;
          for (int pos = 0; pos < 3; ++pos) all_ok = all_ok && supports_combination(pos, types, linear, 2, 1);
          accepted_full += all_ok;
        }
  CHECK(accepted_full == 2);  // exactly all-float32-linear and all-float16-linear
  const Element f32[3] = {Element::kFloat32, Element::kFloat32, Element::kFloat32};
  const bool lin[3] = {true, true, true};
  CHECK(!supports_combination(3, f32, lin, 2, 1));
  CHECK(!supports_combination(-1, f32, lin, 2, 1));
  CHECK(!supports_combination(0, f32, lin, 3, 1));

  Element out = Element::kOther;
  const Element half_in[2] = {Element::kFloat16, Element::kFloat16};
  CHECK(output_type(half_in, 2, &out).empty() && out == Element::kFloat16);
  const Element mixed[2] = {Element::kFloat32, Element::kFloat16};
  CHECK(contains(output_type(mixed, 2, &out), "same dtype"));
  const Element ints[2] = {Element::kOther, Element::kOther};
  CHECK(contains(output_type(ints, 2, &out), "float32 or float16"));
  CHECK(!output_type(half_in, 3, &out).empty());
}

// Constant-folding stand-ins for TensorRT's IDimensionExpr / IExprBuilder.
struct Expr {
  int64_t value;
};
struct Builder {
  std::vector<Expr*> made;
  const Expr* constant(int64_t v) {
    made.push_back(new Expr{v});
    return made.back();
  }
  ~Builder() {
    for (Expr* e : made) delete e;
  }
};

static void test_shapes() {
  int64_t g[3] = {4, 128, 5}, f[3] = {4, 128, 16};
  CHECK(check_input_dims(g, 3, f, 3).empty());
  int64_t dyn_g[3] = {-1, -1, 5}, dyn_f[3] = {-1, -1, 32};
  CHECK(check_input_dims(dyn_g, 3, dyn_f, 3).empty());
  int64_t g6[3] = {4, 128, 6};
  CHECK(contains(check_input_dims(g6, 3, f, 3), "last dimension is 6"));
  int64_t f_other_batch[3] = {2, 128, 16};
  CHECK(contains(check_input_dims(g, 3, f_other_batch, 3), "batch differs"));
  int64_t f_other_tokens[3] = {4, 64, 16};
  CHECK(contains(check_input_dims(g, 3, f_other_tokens, 3), "token count differs"));
  CHECK(contains(check_input_dims(g, 2, f, 3), "rank 2"));
  CHECK(contains(check_input_dims(g, 3, f, 4), "rank 4"));

  const SplatFields fields{64, 48, 3.0f};
  Expr b{7}, l{100}, five{5}, c{16};
  const Expr* gd[3] = {&b, &l, &five};
  const Expr* fd[3] = {&b, &l, &c};
  const Expr* out[4] = {};
  Builder builder;
  output_dims(gd, fd, fields, builder, out);
  CHECK(out[0] == &b && out[1] == &c);  // batch and channels pass through as expressions (dynamic dims)
  CHECK(out[2]->value == 64 && out[3]->value == 48);

  const gpstoken::SplatShape s = splat_shape(g, f, fields);
  CHECK(s.batch == 4 && s.tokens == 128 && s.channels == 16 && s.height == 64 && s.width == 48);
}

int main() {
  test_fields();
  test_serialization_round_trip();
  test_formats();
  test_shapes();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all GaussianSplat plugin rule checks passed\n");
  return 0;
}
