// The op table: every op of the engine declared once — its operands (direction, dtype set, symbolic shape,
// aliasing), its scalar attributes (kind, default, range), its backend entry — in the manner of PyTorch's
// native_functions.yaml and ggml's op enum, but as data: one generic checker (op_table.cc) validates every
// call against its declaration and throws an OpError naming the op, the operand and what was expected versus
// given; a per-op bind function then adds the rules a declaration cannot say (headDim % 8, budget ranges, ...)
// and fills the backend's argument struct. Nothing here depends on N-API: the binding (addon.cc) only turns
// JS values into OpInputs, and a C++ harness can drive the same checks.
//
// Why data and not generated code: the declaration is read at run time by the checker, by the binding (one
// generic method per op), by `opTable()` in JS (from which scripts/gen-op-types.mjs writes the TS argument
// types, checked for drift by a test) and by the op-table test, which derives its wrong-rank/dtype/dim calls
// from it. One source, no generator in either native build (cmake-js and node-gyp).
//
// Shape grammar: "[rows, heads, Lq, headDim]"; alternatives "[batch, tokens, C] | [batch, C]"; a dimension is
// a symbol, an integer, a product of them ("3*heads*headDim"), optionally "+ k" ("batch+1"); "...S" is a run of
// dimensions that must equal every other "...S" of the call (a run no other operand names is free); "=x" is x's exact
// shape. A symbol named like an integer attribute is that attribute's value. Dtype grammar: "f32|bf16",
// "=x" (x's dtype), "any".
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/backend.h"

namespace scalekv {

// A rejected call: code is ERR_SHAPE, ERR_DTYPE, ERR_INVALID_ARG or ERR_BUDGET.
struct OpError : std::runtime_error {
  std::string code;
  OpError(std::string c, const std::string& message) : std::runtime_error(message), code(std::move(c)) {}
};

enum class Io { in, out, inout };

struct OperandDecl {
  const char* name;
  Io io;
  bool optional;
  const char* dtypes;
  const char* shape;
  const char* may_alias;  // comma-separated operands this output may be (in place, same dtype); "" for none
};

enum class AttrKind { integer, number, boolean, choice, int_list };

struct AttrDecl {
  const char* name;
  AttrKind kind;
  bool required;
  bool has_default;
  double fallback;        // integer/number/boolean default; choice: index into choices
  double min, max;        // inclusive (integer, number, int_list entries)
  const char* choices;    // choice: "none|gelu_tanh|silu"
  int length;             // int_list
};

struct ParsedOp;
class OpCall;
using Launch = std::function<void(Backend&)>;

struct OpDecl {
  const char* name;     // the JS method
  const char* kernel;   // the backend entry, as profiles name it
  const char* summary;
  std::vector<OperandDecl> operands;
  std::vector<AttrDecl> attrs;
  Launch (*bind)(const OpCall&);
  // Valid calls for the op-table test, one per line: "operands present | symbol=value ... | attr=value ...".
  const char* examples;
  const ParsedOp* parsed = nullptr;  // filled by op_table()
};

const std::vector<OpDecl>& op_table();

// The declarations as JSON: [{name, kernel, summary, examples, operands: [{name, io, optional, dtypes, shape,
// mayAlias}], attributes: [{name, kind, required, default?, min?, max?, choices?, length?}]}].
std::string op_table_json();

// One call's arguments, in declaration order. `storage` identifies memory for the aliasing rule (views of one
// tensor share it); `data` is what the kernel receives.
struct TensorRef {
  bool present = false;
  DType dtype = DType::f32;
  const std::vector<int64_t>* shape = nullptr;
  const void* storage = nullptr;
  void* data = nullptr;
};

struct AttrValue {
  enum Kind { absent, number, boolean, text, list, other } kind = absent;
  double num = 0;
  bool flag = false;
  std::string str;
  std::vector<double> items;
};

struct OpInputs {
  std::vector<TensorRef> operands;
  std::vector<AttrValue> attrs;
};

// A checked call, as the bind functions see it.
class OpCall {
 public:
  OpCall(const OpDecl& op, const OpInputs& in) : op_(op), in_(in) {}
  const OpDecl& op() const { return op_; }
  bool has(const char* operand) const { return ref(operand).present; }
  const TensorRef& ref(const char* operand) const;
  DType dtype(const char* operand) const { return ref(operand).dtype; }
  const std::vector<int64_t>& shape(const char* operand) const { return *ref(operand).shape; }
  int64_t numel(const char* operand) const;
  void* data(const char* operand) const { return ref(operand).present ? ref(operand).data : nullptr; }
  template <class T>
  T* data_as(const char* operand) const { return static_cast<T*>(data(operand)); }
  // A symbol the shapes bound; `fallback` where no present operand has it.
  int64_t dim(const char* symbol, int64_t fallback = -1) const;
  bool given(const char* attr) const;
  double number(const char* attr) const;
  int integer(const char* attr) const;
  bool flag(const char* attr) const;
  int choice(const char* attr) const;
  const std::vector<double>& list(const char* attr) const;
  [[noreturn]] void fail(const char* code, const std::string& message) const;

  // Fixed capacity, so checking a call allocates nothing (op_table() rejects a declaration that needs more).
  static constexpr size_t kMaxSymbols = 32, kMaxAttrs = 16, kMaxOperands = 32;
  std::array<int64_t, kMaxSymbols> symbols;  // by the op's symbol index; -1 unbound
  std::array<double, kMaxAttrs> attr_values;  // NaN: not given and no default

 private:
  const OpDecl& op_;
  const OpInputs& in_;
  mutable size_t next_operand_ = 0;  // where ref() starts looking
};

// Checks `in` against `op`'s declaration and runs its bind: the launch to enqueue, or an OpError.
Launch check_and_bind(const OpDecl& op, const OpInputs& in);

}  // namespace scalekv
