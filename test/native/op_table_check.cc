// The op table driven from C++ alone, with no N-API: a harness builds OpInputs, gets the checked launch and
// runs it on the CPU backend. Checks valid calls against a double reference on random inputs (seed printed),
// and that bad calls throw the coded OpError naming the operand. Run by `npm test` (scripts/test-native.mjs).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "../../csrc/op_table.h"

using namespace scalekv;

namespace {

using skv_check::checks;
using skv_check::expect;
using skv_check::failures;

const OpDecl& find(const char* name) {
  for (const OpDecl& op : op_table())
    if (std::strcmp(op.name, name) == 0) return op;
  throw std::logic_error(std::string("no op ") + name);
}

struct Host {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

OpInputs inputs(const OpDecl& op, const std::map<std::string, Host*>& tensors, const std::map<std::string, AttrValue>& attrs) {
  OpInputs in;
  for (const OperandDecl& x : op.operands) {
    TensorRef r;
    auto it = tensors.find(x.name);
    if (it != tensors.end()) r = TensorRef{true, it->second->dtype, &it->second->shape, it->second->data.data(), it->second->data.data()};
    in.operands.push_back(r);
  }
  for (const AttrDecl& a : op.attrs) {
    auto it = attrs.find(a.name);
    in.attrs.push_back(it == attrs.end() ? AttrValue{} : it->second);
  }
  return in;
}

AttrValue number(double x) {
  AttrValue v;
  v.kind = AttrValue::number;
  v.num = x;
  return v;
}

// The call must be rejected with `code`, naming `name`.
void rejects(const OpDecl& op, const OpInputs& in, const char* code, const char* name, const std::string& what) {
  try {
    check_and_bind(op, in);
    expect(false, what + ": accepted");
  } catch (const OpError& e) {
    expect(e.code == code, what + ": code " + e.code + " (" + e.what() + ")");
    expect(std::string(e.what()).find(name) != std::string::npos, what + ": names " + name + " (" + e.what() + ")");
  }
}

}  // namespace

int main() {
  skv_check::program = "op_table_check";
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  auto host = [&](std::vector<int64_t> shape) {
    Host h{DType::f32, shape, {}};
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    for (int64_t i = 0; i < n; ++i) h.data.push_back(normal(rng));
    return h;
  };
  std::unique_ptr<Backend> cpu = make_cpu_backend(1);

  // add: runs, and the sum is exact in f32.
  const OpDecl& add = find("add");
  Host a = host({2, 3}), b = host({2, 3}), out = host({2, 3});
  for (float& x : out.data) x = NAN;
  check_and_bind(add, inputs(add, {{"a", &a}, {"b", &b}, {"out", &out}}, {}))(*cpu);
  bool exact = true;
  for (size_t i = 0; i < out.data.size(); ++i) exact = exact && out.data[i] == a.data[i] + b.data[i];
  expect(exact, "add: out = a + b");
  Host wrong_dtype = b;
  wrong_dtype.dtype = DType::i32;
  rejects(add, inputs(add, {{"a", &a}, {"b", &wrong_dtype}, {"out", &out}}, {}), "ERR_DTYPE", "b", "add with an i32 b");
  rejects(add, inputs(add, {{"a", &a}, {"b", &b}}, {}), "ERR_INVALID_ARG", "out", "add without out");
  // In place is declared for add (out may be a), not for gemm.
  check_and_bind(add, inputs(add, {{"a", &a}, {"b", &b}, {"out", &a}}, {}));
  expect(true, "add: out may be a");

  // gemm: leading axes flattened, K and N solved from the shapes; against a double reference.
  const OpDecl& gemm = find("gemm");
  Host x = host({2, 3, 5}), w = host({4, 5}), y = host({2, 3, 4});
  check_and_bind(gemm, inputs(gemm, {{"x", &x}, {"w", &w}, {"y", &y}}, {}))(*cpu);
  double worst = 0;
  for (int m = 0; m < 6; ++m)
    for (int n = 0; n < 4; ++n) {
      double ref = 0, scale = 0;
      for (int k = 0; k < 5; ++k) ref += double(x.data[m * 5 + k]) * w.data[n * 5 + k], scale += std::fabs(double(x.data[m * 5 + k]) * w.data[n * 5 + k]);
      worst = std::max(worst, std::fabs(y.data[m * 4 + n] - ref) / std::max(scale, 1e-30));
    }
  expect(worst < 1e-6, "gemm: y = x w^T within 1e-6 of the float64 reference, relative to sum |x w| (got " + std::to_string(worst) + ")");
  Host y_bad = host({2, 3, 5});
  rejects(gemm, inputs(gemm, {{"x", &x}, {"w", &w}, {"y", &y_bad}}, {}), "ERR_SHAPE", "y", "gemm with y [2, 3, 5]");
  Host x_flat = host({6, 5});
  rejects(gemm, inputs(gemm, {{"x", &x_flat}, {"w", &w}, {"y", &y}}, {}), "ERR_SHAPE", "y", "gemm with x [6, 5] and y [2, 3, 4]");
  Host square = host({5, 5});
  rejects(gemm, inputs(gemm, {{"x", &square}, {"w", &square}, {"y", &square}}, {}), "ERR_INVALID_ARG", "y", "gemm with y = x");

  // selection: a budget outside [window, keys] is ERR_BUDGET; the out axis bound to the budget attribute.
  const OpDecl& selection = find("selection");
  Host logits = host({1, 2, 2, 6}), window = host({2}), kept = host({1, 2, 3});
  window.dtype = DType::i32;
  kept.dtype = DType::i32;
  rejects(selection, inputs(selection, {{"logits", &logits}, {"windowKeys", &window}, {"out", &kept}}, {{"budget", number(7)}}),
          "ERR_SHAPE", "out", "selection with out [1, 2, 3] and budget 7");
  Host kept7 = host({1, 2, 7});
  kept7.dtype = DType::i32;
  rejects(selection, inputs(selection, {{"logits", &logits}, {"windowKeys", &window}, {"out", &kept7}}, {{"budget", number(7)}}),
          "ERR_BUDGET", "budget", "selection with budget 7 over 6 keys");
  rejects(selection, inputs(selection, {{"logits", &logits}, {"windowKeys", &window}, {"out", &kept}}, {{"budget", number(2.5)}}),
          "ERR_INVALID_ARG", "budget", "selection with budget 2.5");

  std::printf("op_table_check: %d checks, %d failed (seed %u, %zu ops declared)\n", checks, failures, seed, op_table().size());
  return failures ? 1 : 0;
}
