// The generic checker and the declarations of op_table.h.
#include "op_table.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <limits>

namespace scalekv {

// ------------------------------------------------------------------------------------------ parsed form

struct DimExpr {
  int run = -1;  // >= 0: the run "...S"; -1: a scalar expression
  int64_t coef = 1;
  std::vector<int> syms;
  int64_t addend = 0;
  std::string text;
};

struct ShapeAlt {
  std::vector<DimExpr> dims;
  int run_at = -1;  // where the run is, if any
  size_t fixed() const { return dims.size() - (run_at >= 0 ? 1 : 0); }
};

struct ParsedOperand {
  unsigned dtype_mask = 0;  // bit per DType; 0 with dtype_same < 0: any
  int dtype_same = -1;
  int shape_same = -1;
  std::vector<ShapeAlt> alts;
  std::vector<int> may_alias;
};

struct ParsedOp {
  std::vector<std::string> symbols;
  // Which symbol a bind function's literal names, remembered by the literal's address: dim() is on every
  // call's path. Slots are claimed once and never change, so readers need no lock.
  struct SymbolKey {
    std::atomic<const char*> key{nullptr};
    int index = -1;
  };
  mutable std::array<SymbolKey, 32> symbol_keys;
  mutable std::atomic<size_t> symbol_keys_used{0};
  std::vector<int> symbol_attr;  // the integer attribute a symbol names, or -1
  std::vector<std::string> runs;
  std::vector<ParsedOperand> operands;
  std::vector<std::vector<std::string>> choices;  // per attribute
};

namespace {

constexpr double kI32Max = 2147483647.0;
constexpr size_t kMaxRuns = 4, kMaxDims = 64;
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == sep) {
      out.push_back(trim(s.substr(start, i - start)));
      start = i + 1;
    }
  }
  return out;
}

bool is_integer_text(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

int operand_index(const OpDecl& op, const std::string& name) {
  for (size_t i = 0; i < op.operands.size(); ++i)
    if (name == op.operands[i].name) return int(i);
  return -1;
}

// Bind functions name operands and attributes with the declaration's own literals, so pointer equality
// almost always answers (these lookups are on every call's path); strcmp covers the rest.
int attr_index(const OpDecl& op, const char* name) {
  for (size_t i = 0; i < op.attrs.size(); ++i)
    if (op.attrs[i].name == name) return int(i);
  for (size_t i = 0; i < op.attrs.size(); ++i)
    if (std::strcmp(name, op.attrs[i].name) == 0) return int(i);
  return -1;
}

[[noreturn]] void bad_decl(const OpDecl& op, const std::string& what) {
  throw std::logic_error(std::string("op table: ") + op.name + ": " + what);
}

int intern(std::vector<std::string>& names, const std::string& name) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return int(i);
  names.push_back(name);
  return int(names.size() - 1);
}

DimExpr parse_dim(const OpDecl& op, ParsedOp& p, const std::string& text) {
  DimExpr d;
  d.text = text;
  if (text.rfind("...", 0) == 0) {
    if (text.size() == 3) bad_decl(op, "a run needs a name ('...S')");
    d.run = intern(p.runs, text.substr(3));
    return d;
  }
  std::string product = text;
  const size_t plus = text.find('+');
  if (plus != std::string::npos) {
    const std::string k = trim(text.substr(plus + 1));
    if (!is_integer_text(k)) bad_decl(op, "bad addend in '" + text + "'");
    d.addend = std::stoll(k);
    product = text.substr(0, plus);
  }
  for (const std::string& term : split(product, '*')) {
    if (term.empty()) bad_decl(op, "empty term in '" + text + "'");
    if (is_integer_text(term)) {
      d.coef *= std::stoll(term);
    } else {
      const int s = intern(p.symbols, term);
      if (p.symbol_attr.size() < p.symbols.size()) p.symbol_attr.push_back(attr_index(op, term.c_str()));
      d.syms.push_back(s);
    }
  }
  return d;
}

void parse_op(const OpDecl& op, ParsedOp& p) {
  for (const AttrDecl& a : op.attrs) p.choices.push_back(a.kind == AttrKind::choice ? split(a.choices, '|') : std::vector<std::string>{});
  for (const OperandDecl& od : op.operands) {
    ParsedOperand po;
    const std::string dt = od.dtypes;
    if (dt.rfind("=", 0) == 0) {
      po.dtype_same = operand_index(op, dt.substr(1));
      if (po.dtype_same < 0) bad_decl(op, std::string(od.name) + ": unknown operand in dtype '" + dt + "'");
    } else if (dt != "any") {
      for (const std::string& name : split(dt, '|')) {
        bool known = false;
        for (DType t : {DType::f32, DType::bf16, DType::f16, DType::i32, DType::u8})
          if (name == dtype_name(t)) po.dtype_mask |= 1u << unsigned(t), known = true;
        if (!known) bad_decl(op, std::string(od.name) + ": unknown dtype '" + name + "'");
      }
    }
    const std::string sh = od.shape;
    if (sh.rfind("=", 0) == 0) {
      po.shape_same = operand_index(op, sh.substr(1));
      if (po.shape_same < 0) bad_decl(op, std::string(od.name) + ": unknown operand in shape '" + sh + "'");
    } else {
      for (const std::string& alt : split(sh, '|')) {
        if (alt.size() < 2 || alt.front() != '[' || alt.back() != ']') bad_decl(op, "shape '" + alt + "' is not [...]");
        ShapeAlt a;
        const std::string body = trim(alt.substr(1, alt.size() - 2));
        if (!body.empty())
          for (const std::string& dim : split(body, ',')) {
            a.dims.push_back(parse_dim(op, p, dim));
            if (a.dims.back().run != -1) {
              if (a.run_at >= 0) bad_decl(op, "two runs in '" + alt + "'");
              a.run_at = int(a.dims.size() - 1);
            }
          }
        po.alts.push_back(std::move(a));
      }
    }
    for (const std::string& name : split(od.may_alias, ','))
      if (!name.empty()) {
        const int j = operand_index(op, name);
        if (j < 0) bad_decl(op, std::string(od.name) + ": unknown operand in may_alias '" + name + "'");
        po.may_alias.push_back(j);
      }
    p.operands.push_back(std::move(po));
  }
  size_t dims = 0;
  for (const ParsedOperand& po : p.operands) {
    size_t most = 0;
    for (const ShapeAlt& a : po.alts) most = std::max(most, a.dims.size());
    dims += most;
  }
  if (p.symbols.size() > OpCall::kMaxSymbols || op.attrs.size() > OpCall::kMaxAttrs ||
      op.operands.size() > OpCall::kMaxOperands || p.runs.size() > kMaxRuns || dims > kMaxDims)
    bad_decl(op, "more operands, symbols, attributes, runs or dimensions than the checker holds");
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string dtype_set_text(unsigned mask) {
  std::string s;
  for (DType t : {DType::f32, DType::bf16, DType::f16, DType::i32, DType::u8})
    if (mask & (1u << unsigned(t))) s += (s.empty() ? "" : " or ") + std::string(dtype_name(t));
  return s;
}

std::string number_text(double x) {
  if (x == std::floor(x) && std::fabs(x) < 9.1e15) return std::to_string(int64_t(x));
  return std::to_string(x);
}

// Where a symbol got its value, for messages.
struct Binding {
  int operand;  // -1: an attribute
  int axis;
};

class Checker {
 public:
  Checker(const OpDecl& op, const OpInputs& in, OpCall& call) : op_(op), p_(*op.parsed), in_(in), call_(call) {}

  void run() {
    presence();
    attributes();
    dtypes();
    shapes();
    aliasing();
  }

 private:
  [[noreturn]] void fail(const char* code, const std::string& message) const { call_.fail(code, message); }
  const char* name(int i) const { return op_.operands[size_t(i)].name; }
  const TensorRef& ref(int i) const { return in_.operands[size_t(i)]; }

  void presence() {
    if (in_.operands.size() != op_.operands.size() || in_.attrs.size() != op_.attrs.size())
      throw std::logic_error(std::string(op_.name) + ": inputs do not follow the declaration");
    for (size_t i = 0; i < op_.operands.size(); ++i)
      if (!in_.operands[i].present && !op_.operands[i].optional)
        fail("ERR_INVALID_ARG", std::string(op_.operands[i].name) + " is required");
  }

  void attributes() {
    call_.attr_values.fill(std::nan(""));
    for (size_t i = 0; i < op_.attrs.size(); ++i) {
      const AttrDecl& a = op_.attrs[i];
      const AttrValue& v = in_.attrs[i];
      double& out = call_.attr_values[i];
      const char* n = a.name;
      if (v.kind == AttrValue::absent) {
        if (a.required) fail("ERR_INVALID_ARG", std::string(n) + " is required");
        if (a.has_default) out = a.fallback;
        continue;
      }
      switch (a.kind) {
        case AttrKind::integer:
        case AttrKind::number: {
          const bool integral = a.kind == AttrKind::integer;
          if (v.kind != AttrValue::number || !std::isfinite(v.num) || (integral && v.num != std::floor(v.num)) ||
              v.num < a.min || v.num > a.max)
            fail("ERR_INVALID_ARG", std::string(n) + " must be " + (integral ? "an integer" : "a finite number") + range_text(a) +
                                        ", got " + value_text(v));
          out = v.num;
          break;
        }
        case AttrKind::boolean:
          if (v.kind != AttrValue::boolean) fail("ERR_INVALID_ARG", std::string(n) + " must be a boolean, got " + value_text(v));
          out = v.flag ? 1 : 0;
          break;
        case AttrKind::choice: {
          const auto& choices = p_.choices[i];
          for (size_t c = 0; c < choices.size(); ++c)
            if (v.kind == AttrValue::text && v.str == choices[c]) out = double(c);
          if (std::isnan(out)) {
            std::string list;
            for (size_t c = 0; c < choices.size(); ++c) list += (c ? ", '" : "'") + choices[c] + "'";
            fail("ERR_INVALID_ARG", std::string(n) + " must be one of " + list + ", got " + value_text(v));
          }
          break;
        }
        case AttrKind::int_list: {
          bool ok = v.kind == AttrValue::list && int(v.items.size()) == a.length;
          for (double x : v.items) ok = ok && x == std::floor(x) && x >= a.min && x <= a.max;
          if (!ok)
            fail("ERR_INVALID_ARG", std::string(n) + " must be " + std::to_string(a.length) + " integers" + range_text(a) + ", got " +
                                        value_text(v));
          out = 0;
          break;
        }
      }
    }
  }

  static std::string range_text(const AttrDecl& a) {
    if (a.min == -kInf && a.max == kInf) return "";
    if (a.max == kInf || a.max == kI32Max || a.max >= 9e15) return " >= " + number_text(a.min);
    return " in [" + number_text(a.min) + ", " + number_text(a.max) + "]";
  }

  static std::string value_text(const AttrValue& v) {
    switch (v.kind) {
      case AttrValue::number: return number_text(v.num);
      case AttrValue::boolean: return v.flag ? "true" : "false";
      case AttrValue::text: return "'" + v.str + "'";
      case AttrValue::list: return "a list of " + std::to_string(v.items.size());
      default: return "a value of another type";
    }
  }

  void dtypes() {
    for (size_t i = 0; i < op_.operands.size(); ++i) {
      const TensorRef& t = ref(int(i));
      if (!t.present) continue;
      const ParsedOperand& po = p_.operands[i];
      if (po.dtype_same >= 0) {
        const TensorRef& other = ref(po.dtype_same);
        if (other.present && other.dtype != t.dtype)
          fail("ERR_DTYPE", std::string(name(int(i))) + " must have " + name(po.dtype_same) + "'s dtype " +
                                dtype_name(other.dtype) + ", got " + dtype_name(t.dtype));
      } else if (po.dtype_mask && !(po.dtype_mask & (1u << unsigned(t.dtype)))) {
        fail("ERR_DTYPE", std::string(name(int(i))) + " must be " + dtype_set_text(po.dtype_mask) + ", got " +
                              dtype_name(t.dtype));
      }
    }
  }

  struct Pending {
    int operand, axis;
    const DimExpr* expr;
  };

  void shapes() {
    auto& sym = call_.symbols;
    sym.fill(-1);
    for (size_t s = 0; s < p_.symbols.size(); ++s) {
      const int a = p_.symbol_attr[s];
      if (a >= 0 && !std::isnan(call_.attr_values[size_t(a)])) {
        sym[s] = int64_t(call_.attr_values[size_t(a)]);
        binding_[s] = {-1, 0};
      }
    }
    struct Run {
      int operand = -1;
      size_t at = 0, length = 0;
    };
    std::array<Run, kMaxRuns> runs{};
    std::array<Pending, kMaxDims> pending;  // the first n_pending are set
    size_t n_pending = 0;
    for (size_t i = 0; i < op_.operands.size(); ++i) {
      const TensorRef& t = ref(int(i));
      const ParsedOperand& po = p_.operands[i];
      if (!t.present || po.shape_same >= 0) continue;
      const std::vector<int64_t>& shape = *t.shape;
      const ShapeAlt* alt = nullptr;
      for (const ShapeAlt& a : po.alts)
        if (a.run_at >= 0 ? shape.size() >= a.fixed() : shape.size() == a.fixed()) {
          alt = &a;
          break;
        }
      if (!alt) fail("ERR_SHAPE", std::string(name(int(i))) + " must be " + op_.operands[i].shape + ", got " + shape_text(shape));
      const size_t run_len = shape.size() - alt->fixed();
      size_t axis = 0;
      for (const DimExpr& d : alt->dims) {
        if (d.run < 0) {
          pending[n_pending++] = {int(i), int(axis), &d};
          ++axis;
          continue;
        }
        Run& r = runs[size_t(d.run)];
        if (r.operand < 0) {
          r = {int(i), axis, run_len};
        } else {
          const std::vector<int64_t>& theirs = *ref(r.operand).shape;
          if (r.length != run_len || !std::equal(theirs.begin() + long(r.at), theirs.begin() + long(r.at + r.length), shape.begin() + long(axis)))
            fail("ERR_SHAPE", std::string(name(int(i))) + " has " + d.text + " = " + shape_text({shape.begin() + long(axis), shape.begin() + long(axis + run_len)}) +
                                  " where " + name(r.operand) + " has " + d.text + " = " +
                                  shape_text({theirs.begin() + long(r.at), theirs.begin() + long(r.at + r.length)}) + " (" +
                                  name(int(i)) + " " + shape_text(shape) + ", " + name(r.operand) + " " + shape_text(theirs) + ")");
        }
        axis += run_len;
      }
    }
    // Solve and check the scalar dimensions; a product with one unknown symbol binds it.
    std::array<bool, kMaxDims> done{};
    for (bool progress = true; progress;) {
      progress = false;
      for (size_t k = 0; k < n_pending; ++k)
        if (!done[k] && resolve(pending[k])) done[k] = progress = true;
    }
    // A product whose symbols no other dimension determines would go unchecked: a flaw of the declaration.
    for (size_t k = 0; k < n_pending; ++k)
      if (!done[k])
        throw std::logic_error(std::string(op_.name) + ": the declaration leaves " + pending[k].expr->text + " of " +
                               name(pending[k].operand) + " undetermined");
    for (size_t i = 0; i < op_.operands.size(); ++i) {
      const ParsedOperand& po = p_.operands[i];
      if (!ref(int(i)).present || po.shape_same < 0 || !ref(po.shape_same).present) continue;
      const auto& mine = *ref(int(i)).shape;
      const auto& theirs = *ref(po.shape_same).shape;
      if (mine != theirs)
        fail("ERR_SHAPE", std::string(name(int(i))) + " must have " + name(po.shape_same) + "'s shape " +
                              shape_text(theirs) + ", got " + shape_text(mine));
    }
  }

  bool resolve(const Pending& w) {
    auto& sym = call_.symbols;
    const DimExpr& d = *w.expr;
    const int64_t given = (*ref(w.operand).shape)[size_t(w.axis)];
    int unknown = -1, unknowns = 0;
    int64_t known = d.coef;
    for (int s : d.syms) {
      if (sym[size_t(s)] < 0) {
        if (unknown != s) ++unknowns;
        unknown = s;
      } else {
        known *= sym[size_t(s)];
      }
    }
    if (unknowns == 0) {
      if (known + d.addend != given) mismatch(w, given, known + d.addend);
      return true;
    }
    if (unknowns > 1 || std::count(d.syms.begin(), d.syms.end(), unknown) > 1) return false;
    if (known == 0) {
      if (given != d.addend) mismatch(w, given, d.addend);
      return true;  // the symbol stays free here
    }
    const int64_t rest = given - d.addend;
    if (rest < 0 || rest % known != 0)
      fail("ERR_SHAPE", std::string(name(w.operand)) + " dim " + std::to_string(w.axis) + " (" + d.text + ") is " +
                            std::to_string(given) + ", which is not " + d.text + " for any " + p_.symbols[size_t(unknown)] +
                            " (" + name(w.operand) + " " + shape_text(*ref(w.operand).shape) + ")");
    sym[size_t(unknown)] = rest / known;
    binding_[size_t(unknown)] = {w.operand, w.axis};
    return true;
  }

  [[noreturn]] void mismatch(const Pending& w, int64_t given, int64_t want) const {
    const DimExpr& d = *w.expr;
    std::string from;
    for (int s : d.syms) {
      if (call_.symbols[size_t(s)] < 0) continue;  // left free by a zero factor
      const Binding& b = binding_[size_t(s)];
      from += (from.empty() ? "" : ", ") + p_.symbols[size_t(s)] + " = " + std::to_string(call_.symbols[size_t(s)]) +
              (b.operand < 0 ? " (the attribute)"
                             : " (" + std::string(name(b.operand)) + " dim " + std::to_string(b.axis) + ", shape " +
                                   shape_text(*ref(b.operand).shape) + ")");
    }
    fail("ERR_SHAPE", std::string(name(w.operand)) + " dim " + std::to_string(w.axis) + " (" + d.text + ") is " +
                          std::to_string(given) + " where " + std::to_string(want) + " is needed" +
                          (from.empty() ? "" : " from " + from) + "; " + name(w.operand) + " is " +
                          shape_text(*ref(w.operand).shape));
  }

  // An output shares memory with no other operand, unless the declaration lets it be that operand in place.
  void aliasing() const {
    for (size_t i = 0; i < op_.operands.size(); ++i) {
      if (op_.operands[i].io == Io::in || !ref(int(i)).present) continue;
      for (size_t j = 0; j < op_.operands.size(); ++j) {
        if (j == i || !ref(int(j)).present || ref(int(j)).storage != ref(int(i)).storage) continue;
        const auto& mine = p_.operands[i].may_alias;
        const auto& theirs = p_.operands[j].may_alias;
        const bool allowed = std::count(mine.begin(), mine.end(), int(j)) || std::count(theirs.begin(), theirs.end(), int(i));
        if (!allowed)
          fail("ERR_INVALID_ARG", std::string(name(int(i))) + " must not share memory with " + name(int(j)));
        if (ref(int(i)).dtype != ref(int(j)).dtype)
          fail("ERR_INVALID_ARG", std::string(name(int(i))) + " may be " + name(int(j)) + " itself only with the same dtype");
      }
    }
  }

  const OpDecl& op_;
  const ParsedOp& p_;
  const OpInputs& in_;
  OpCall& call_;
  std::array<Binding, OpCall::kMaxSymbols> binding_;  // set where a symbol is bound
};

// ------------------------------------------------------------------------------------ declaration helpers

OperandDecl in(const char* n, const char* dt, const char* sh) { return {n, Io::in, false, dt, sh, ""}; }
OperandDecl in_opt(const char* n, const char* dt, const char* sh) { return {n, Io::in, true, dt, sh, ""}; }
OperandDecl out(const char* n, const char* dt, const char* sh, const char* alias = "") {
  return {n, Io::out, false, dt, sh, alias};
}
OperandDecl out_opt(const char* n, const char* dt, const char* sh) { return {n, Io::out, true, dt, sh, ""}; }
OperandDecl inout(const char* n, const char* dt, const char* sh) { return {n, Io::inout, false, dt, sh, ""}; }
OperandDecl inout_opt(const char* n, const char* dt, const char* sh) { return {n, Io::inout, true, dt, sh, ""}; }

AttrDecl int_req(const char* n, double min, double max) { return {n, AttrKind::integer, true, false, 0, min, max, "", 0}; }
AttrDecl int_def(const char* n, double def, double min, double max) {
  return {n, AttrKind::integer, false, true, def, min, max, "", 0};
}
AttrDecl int_opt(const char* n, double min, double max) { return {n, AttrKind::integer, false, false, 0, min, max, "", 0}; }
AttrDecl num_req(const char* n) { return {n, AttrKind::number, true, false, 0, -kInf, kInf, "", 0}; }
AttrDecl num_def(const char* n, double def) { return {n, AttrKind::number, false, true, def, -kInf, kInf, "", 0}; }
AttrDecl num_opt(const char* n) { return {n, AttrKind::number, false, false, 0, -kInf, kInf, "", 0}; }
AttrDecl flag_def(const char* n, bool def) { return {n, AttrKind::boolean, false, true, def ? 1.0 : 0.0, 0, 1, "", 0}; }
AttrDecl choice_def(const char* n, const char* choices, int def) {
  return {n, AttrKind::choice, false, true, double(def), 0, 0, choices, 0};
}
AttrDecl choice_req(const char* n, const char* choices) { return {n, AttrKind::choice, true, false, 0, 0, 0, choices, 0}; }
AttrDecl int_list(const char* n, int length, double min, double max) {
  return {n, AttrKind::int_list, true, false, 0, min, max, "", length};
}

void together(const OpCall& c, const char* a, const char* b) {
  if (c.has(a) != c.has(b)) c.fail("ERR_INVALID_ARG", std::string(a) + " and " + b + " go together");
}

int narrow(const OpCall& c, int64_t v, const char* what) {
  if (v > INT32_MAX) c.fail("ERR_SHAPE", std::string(what) + " " + std::to_string(v) + " must be below 2^31");
  return int(v);
}

// A per-image f32 vector: [B, C], or slot `slot` of a [B, S, C] table.
void row_vectors(const OpCall& c, const char* tensor, const char* slot, const char* slots_symbol, int channels,
                 const float** ptr, int64_t* stride) {
  if (!c.has(tensor)) {
    if (c.given(slot)) c.fail("ERR_INVALID_ARG", std::string(slot) + " needs " + tensor);
    return;
  }
  int64_t offset = 0;
  if (c.shape(tensor).size() == 3) {
    const int64_t slots = c.dim(slots_symbol);
    if (!c.given(slot)) c.fail("ERR_INVALID_ARG", std::string(slot) + " is required with a [batch, slots, channels] " + tensor);
    const int s = c.integer(slot);
    if (s >= slots)
      c.fail("ERR_SHAPE", std::string(slot) + " " + std::to_string(s) + " is outside [0, " + std::to_string(slots) + ")");
    offset = int64_t(s) * channels;
    *stride = slots * channels;
  } else {
    *stride = channels;
  }
  *ptr = c.data_as<const float>(tensor) + offset;
}

// ------------------------------------------------------------------------------------------- bind functions

// The paged history of attention / evictCompact / qkNormRope: a pool [pages, heads, pageTokens, headDim] read through
// the optional page table [rows, tablePages]; without a table the pool is the contiguous [rows, heads, capacity,
// headDim] (one page per row).
KvPages bind_kv_pages(const OpCall& c, const char* pool, int rows) {
  KvPages p;
  p.pages = narrow(c, c.dim("pages"), "pages");
  p.page_tokens = narrow(c, c.dim("pageTokens"), "pageTokens");
  if (c.has("pageTable")) {
    p.table = c.data_as<const int32_t>("pageTable");
    p.table_pages = narrow(c, c.dim("tablePages"), "tablePages");
    if (int64_t(p.table_pages) * p.page_tokens > kI32Max) c.fail("ERR_SHAPE", "pageTable covers more than 2^31 - 1 tokens");
  } else if (p.pages != rows) {
    c.fail("ERR_SHAPE", std::string(pool) + " has " + std::to_string(p.pages) + " pages but " + std::to_string(rows) +
                            " rows: without a pageTable each row is one page");
  }
  return p;
}

// The storage of the K/V operands `rows` (triples of K, V and their tokens' scale bytes): `plain`, in
// `plain_dtype` without scales, or an 8-bit format (kv_quant.h), u8 with one scale byte per token row.
KvFormat bind_kv_format(const OpCall& c, std::initializer_list<std::array<const char*, 3>> rows, DType plain_dtype) {
  const KvFormat f = KvFormat(c.choice("kvFormat"));
  for (const auto& [k, v, scales] : rows) {
    (void)v;
    if (!c.has(k)) {
      if (c.has(scales)) c.fail("ERR_INVALID_ARG", std::string(scales) + " needs " + k);
      continue;
    }
    if (f == KvFormat::plain) {
      if (c.has(scales)) c.fail("ERR_INVALID_ARG", std::string(scales) + " needs an 8-bit kvFormat");
      if (c.dtype(k) != plain_dtype)
        c.fail("ERR_DTYPE", std::string(k) + " must be " + dtype_name(plain_dtype) + (c.dtype(k) == DType::u8 ? " (u8 needs kvFormat 'int8' or 'fp8')" : "") +
                                ", got " + dtype_name(c.dtype(k)));
      continue;
    }
    if (c.dtype(k) != DType::u8)
      c.fail("ERR_DTYPE", std::string(k) + " must be u8 with kvFormat '" + (f == KvFormat::int8 ? "int8" : "fp8") + "', got " +
                              dtype_name(c.dtype(k)));
    if (!c.has(scales)) c.fail("ERR_INVALID_ARG", std::string("an 8-bit kvFormat needs ") + scales);
  }
  return f;
}

Launch bind_attention(const OpCall& c) {
  AttentionArgs a;
  a.rows = narrow(c, c.dim("rows"), "rows");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.lq = narrow(c, c.dim("Lq"), "Lq");
  a.head_dim = narrow(c, c.dim("headDim"), "headDim");
  a.dtype = c.dtype("q");
  if (a.head_dim <= 0 || a.head_dim % 8 != 0 || a.head_dim > 256)
    c.fail("ERR_SHAPE", "headDim must be a multiple of 8 in [8, 256], got " + std::to_string(a.head_dim));
  if (a.rows <= 0 || a.heads <= 0) c.fail("ERR_SHAPE", "q has an empty rows or heads axis");
  a.scale = float(c.number("scale"));
  together(c, "histK", "histV");
  together(c, "curK", "curV");
  if (c.has("histK")) {
    a.hist_pages = bind_kv_pages(c, "histK", a.rows);
    a.hist_cap = a.hist_pages.capacity();
    a.hist_len = c.given("histLen") ? c.integer("histLen") : a.hist_cap;
    if (a.hist_len > a.hist_cap)
      c.fail("ERR_SHAPE", "histLen " + std::to_string(a.hist_len) + " is outside [0, capacity " + std::to_string(a.hist_cap) + "]");
  } else if (c.given("histLen") || c.has("pageTable") || c.has("histScales")) {
    c.fail("ERR_INVALID_ARG", "histLen, pageTable and histScales need histK and histV");
  }
  if (c.has("gather")) {
    if (!c.has("histK")) c.fail("ERR_INVALID_ARG", "gather needs a history");
    a.n_gather = narrow(c, c.dim("nGather"), "nGather");
  }
  if (c.has("curK")) a.lc = narrow(c, c.dim("Lc"), "Lc");
  a.kv_format = bind_kv_format(c, {{"histK", "histV", "histScales"}, {"curK", "curV", "curScales"}}, a.dtype);
  const int64_t n_keys = int64_t(c.has("gather") ? a.n_gather : a.hist_len) + a.lc;
  if (n_keys <= 0) c.fail("ERR_SHAPE", "attention needs at least one key (history or current)");
  if (c.has("windowRows")) {
    if (!c.has("windowLogits")) c.fail("ERR_INVALID_ARG", "windowRows needs windowLogits");
    a.n_window = narrow(c, c.dim("nWindow"), "nWindow");
    if (c.shape("windowLogits")[3] != n_keys)
      c.fail("ERR_SHAPE", "windowLogits dim 3 (nKeys) is " + std::to_string(c.shape("windowLogits")[3]) + " where the call has " +
                              std::to_string(n_keys) + " keys");
  } else if (c.has("windowLogits") || c.has("windowLse")) {
    c.fail("ERR_INVALID_ARG", "windowLogits/windowLse need windowRows");
  }
  if (!c.has("out") && a.n_window == 0) c.fail("ERR_INVALID_ARG", "attention needs out, a window output, or both");
  a.q = c.data("q");
  a.hist_k = c.data("histK");
  a.hist_v = c.data("histV");
  a.hist_scales = c.data_as<const uint8_t>("histScales");
  a.gather = c.data_as<const int32_t>("gather");
  a.cur_k = c.data("curK");
  a.cur_v = c.data("curV");
  a.cur_scales = c.data_as<const uint8_t>("curScales");
  a.out = c.data("out");
  a.window_rows = c.data_as<const int32_t>("windowRows");
  a.window_logits = c.data_as<float>("windowLogits");
  a.window_lse = c.data_as<float>("windowLse");
  return [a](Backend& b) { b.attention(a); };
}

Launch bind_evict_compact(const OpCall& c) {
  EvictCompactArgs a;
  a.rows = narrow(c, c.dim("rows"), "rows");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.head_dim = narrow(c, c.dim("headDim"), "headDim");
  a.dtype = c.dtype("histK");
  a.kv_format = bind_kv_format(c, {{"histK", "histV", "histScales"}, {"curK", "curV", "curScales"}},
                               a.dtype == DType::u8 && c.choice("kvFormat") == 0 ? DType::f32 : a.dtype);
  a.hist_pages = bind_kv_pages(c, "histK", a.rows);
  a.hist_cap = a.hist_pages.capacity();
  a.hist_len = c.integer("histLen");
  if (a.hist_len > a.hist_cap)
    c.fail("ERR_SHAPE", "histLen " + std::to_string(a.hist_len) + " is outside [0, capacity " + std::to_string(a.hist_cap) + "]");
  together(c, "curK", "curV");
  if (c.has("curK")) a.lc = narrow(c, c.dim("Lc"), "Lc");
  a.n_keep = narrow(c, c.dim("nKeep"), "nKeep");
  if (a.n_keep > a.hist_cap)
    c.fail("ERR_SHAPE", "keep has " + std::to_string(a.n_keep) + " entries per (row, head) but the history holds " +
                            std::to_string(a.hist_cap));
  a.repeats = c.flag("repeats");
  a.hist_k = c.data("histK");
  a.hist_v = c.data("histV");
  a.hist_scales = c.data_as<uint8_t>("histScales");
  a.cur_k = c.data("curK");
  a.cur_v = c.data("curV");
  a.cur_scales = c.data_as<const uint8_t>("curScales");
  a.keep = c.data_as<const int32_t>("keep");
  return [a](Backend& b) { b.evict_compact(a); };
}

Launch bind_selection(const OpCall& c) {
  SelectionArgs a;
  a.rows = narrow(c, c.dim("rows"), "rows");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.n_window = narrow(c, c.dim("nWindow"), "nWindow");
  a.n_keys = narrow(c, c.dim("nKeys"), "nKeys");
  a.budget = c.integer("budget");
  if (a.budget < a.n_window || a.budget > a.n_keys)
    c.fail("ERR_BUDGET", "budget " + std::to_string(a.budget) + " must lie in [window " + std::to_string(a.n_window) +
                             ", keys " + std::to_string(a.n_keys) + "]");
  a.mode = c.choice("mode") == 0 ? ScoreMode::logits : ScoreMode::probs;
  a.pooling = Pooling(c.choice("pooling"));
  a.kernel = c.integer("kernel");
  if (a.kernel % 2 == 0) c.fail("ERR_INVALID_ARG", "kernel must be odd, got " + std::to_string(a.kernel));
  if (a.mode == ScoreMode::probs && !c.has("lse")) c.fail("ERR_INVALID_ARG", "mode 'probs' needs lse");
  a.logits = c.data_as<const float>("logits");
  a.lse = a.mode == ScoreMode::probs ? c.data_as<const float>("lse") : nullptr;
  a.window_keys = c.data_as<const int32_t>("windowKeys");
  a.out = c.data_as<int32_t>("out");
  a.pooled_scores = c.data_as<float>("pooledScores");
  return [a](Backend& b) { b.selection(a); };
}

// The operands of gemm and gemmResidual: M = the product of x's leading axes.
GemmArgs bind_gemm_operands(const OpCall& c) {
  if (c.dtype("x") == DType::bf16 && c.dtype("w") != DType::bf16)
    c.fail("ERR_DTYPE", "x/w must be f32/f32, bf16/bf16 or f32/bf16, not bf16 x with f32 w");
  GemmArgs a;
  int64_t m = 1;
  const auto& xs = c.shape("x");
  for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];
  a.m = narrow(c, m, "M (the product of x's leading axes)");
  a.n = narrow(c, c.dim("N"), "N");
  a.k = narrow(c, c.dim("K"), "K");
  a.epilogue = Epilogue(c.choice("epilogue"));
  a.x_dtype = c.dtype("x");
  a.w_dtype = c.dtype("w");
  a.y_dtype = c.dtype("y");
  if (c.has("bias")) a.bias_dtype = c.dtype("bias");
  a.x = c.data("x");
  a.w = c.data("w");
  a.bias = c.data("bias");
  a.y = c.data("y");
  return a;
}

Launch bind_gemm(const OpCall& c) {
  const GemmArgs a = bind_gemm_operands(c);
  return [a](Backend& b) { b.gemm(a); };
}

Launch bind_gemm_residual(const OpCall& c) {
  GemmArgs a = bind_gemm_operands(c);
  a.residual = true;
  a.tokens = narrow(c, c.dim("tokens"), "tokens");
  row_vectors(c, "gate", "gateSlot", "gateSlots", a.n, &a.gate, &a.gate_stride);
  if (a.m == 0 || a.n == 0) return [](Backend&) {};
  return [a](Backend& b) { b.gemm(a); };
}

Launch bind_layer_norm(const OpCall& c) {
  LayerNormArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.tokens = narrow(c, c.dim("tokens", 1), "tokens");
  a.channels = narrow(c, c.dim("channels"), "channels");
  if (a.channels <= 0) c.fail("ERR_SHAPE", "x has no channels");
  a.eps = float(c.number("eps"));
  together(c, "scale", "shift");
  together(c, "weight", "bias");
  if (c.has("scale") && c.has("weight")) c.fail("ERR_INVALID_ARG", "give scale/shift (AdaLN) or weight/bias, not both");
  row_vectors(c, "scale", "scaleSlot", "scaleSlots", a.channels, &a.scale, &a.scale_stride);
  row_vectors(c, "shift", "shiftSlot", "shiftSlots", a.channels, &a.shift, &a.shift_stride);
  a.mode = c.has("scale") ? NormMode::modulate : c.has("weight") ? NormMode::affine : NormMode::plain;
  a.x_dtype = c.dtype("x");
  a.y_dtype = c.dtype("y");
  a.x = c.data("x");
  a.y = c.data("y");
  a.weight = c.data_as<const float>("weight");
  a.bias = c.data_as<const float>("bias");
  return [a](Backend& b) { b.layer_norm(a); };
}

Launch bind_rms_norm(const OpCall& c) {
  RmsNormArgs a;
  a.channels = narrow(c, c.dim("C"), "C");
  if (a.channels <= 0) c.fail("ERR_SHAPE", "x has no channels");
  a.rows = c.numel("x") / a.channels;
  a.eps = float(c.number("eps"));
  if (!(a.eps > 0)) c.fail("ERR_INVALID_ARG", "eps must be positive");
  a.x_dtype = c.dtype("x");
  a.weight_dtype = c.dtype("weight");
  a.y_dtype = c.dtype("y");
  a.x = c.data("x");
  a.weight = c.data("weight");
  a.y = c.data("y");
  return [a](Backend& b) { b.rms_norm(a); };
}

Launch bind_gated_residual(const OpCall& c) {
  GatedResidualArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.tokens = narrow(c, c.dim("tokens", 1), "tokens");
  a.channels = narrow(c, c.dim("channels"), "channels");
  if (a.channels <= 0) c.fail("ERR_SHAPE", "x has no channels");
  row_vectors(c, "gate", "gateSlot", "gateSlots", a.channels, &a.gate, &a.gate_stride);
  a.x_dtype = c.dtype("x");
  a.y_dtype = c.dtype("y");
  a.x = c.data("x");
  a.y = c.data("y");
  return [a](Backend& b) { b.gated_residual(a); };
}

Launch bind_activation(const OpCall& c) {
  ActivationArgs a;
  a.count = c.numel("x");
  a.fn = c.choice("fn") == 0 ? Epilogue::silu : Epilogue::gelu_tanh;
  a.x_dtype = c.dtype("x");
  a.y_dtype = c.dtype("out");
  a.x = c.data("x");
  a.y = c.data("out");
  return [a](Backend& b) { b.activation(a); };
}

Launch bind_qk_norm_rope(const OpCall& c) {
  QkNormRopeArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.tokens = narrow(c, c.dim("tokens"), "tokens");
  a.head_dim = narrow(c, c.dim("headDim"), "headDim");
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > 256)
    c.fail("ERR_SHAPE", "headDim must be even and in [2, 256], got " + std::to_string(a.head_dim));
  together(c, "k", "v");
  if (c.has("k")) {
    a.kv_pages = bind_kv_pages(c, "k", a.batch);
    a.kv_cap = a.kv_pages.capacity();
    a.kv_offset = c.integer("kvOffset");
    if (int64_t(a.kv_offset) + a.tokens > a.kv_cap)
      c.fail("ERR_SHAPE", "kvOffset " + std::to_string(a.kv_offset) + " + tokens " + std::to_string(a.tokens) +
                              " exceeds the K/V capacity " + std::to_string(a.kv_cap));
  } else if (c.has("pageTable")) {
    c.fail("ERR_INVALID_ARG", "pageTable needs k and v");
  }
  a.kv_format = bind_kv_format(c, {{"k", "v", "scales"}}, c.has("k") && c.dtype("k") != DType::u8 ? c.dtype("k") : DType::f32);
  if (c.has("positions") && a.head_dim % 4 != 0)
    c.fail("ERR_SHAPE", "2-D RoPE needs headDim a multiple of 4, got " + std::to_string(a.head_dim));
  a.normalize = c.flag("normalize");
  if (!a.normalize && c.has("scaleMul")) c.fail("ERR_INVALID_ARG", "scaleMul applies only with normalize");
  if (!a.normalize && a.kv_format != KvFormat::plain)
    c.fail("ERR_INVALID_ARG", "an 8-bit kvFormat needs normalize: the scale byte holds a key scale for unit keys");
  a.qkv_dtype = c.dtype("qkv");
  a.q_dtype = c.dtype("q");
  a.kv_dtype = c.has("k") ? c.dtype("k") : a.q_dtype;
  a.qkv = c.data("qkv");
  a.q_bias = c.data_as<const float>("qBias");
  a.v_bias = c.data_as<const float>("vBias");
  a.scale_mul = c.data_as<const float>("scaleMul");
  a.positions = c.data_as<const int32_t>("positions");
  a.q = c.data("q");
  a.k = c.data("k");
  a.v = c.data("v");
  a.scales = c.data_as<uint8_t>("scales");
  return [a](Backend& b) { b.qk_norm_rope(a); };
}

Launch bind_gated_activation(const OpCall& c) {
  GatedActivationArgs a;
  a.features = narrow(c, c.dim("F"), "F");
  a.rows = a.features > 0 ? c.numel("out") / a.features : 0;
  a.fn = c.choice("fn") == 0 ? Epilogue::silu : Epilogue::gelu_tanh;
  a.x_dtype = c.dtype("x");
  a.y_dtype = c.dtype("out");
  a.x = c.data("x");
  a.y = c.data("out");
  return [a](Backend& b) { b.gated_activation(a); };
}
Launch bind_segment_attention(const OpCall& c) {
  SegmentAttentionArgs a;
  a.tokens = narrow(c, c.dim("tokens"), "tokens");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.head_dim = narrow(c, c.dim("headDim"), "headDim");
  a.segments = narrow(c, c.dim("segments"), "segments");
  if (a.head_dim <= 0 || a.head_dim > 256) c.fail("ERR_SHAPE", "headDim must be in [1, 256], got " + std::to_string(a.head_dim));
  if (a.heads > 65535 || a.segments > 65535) c.fail("ERR_SHAPE", "heads and segments must each be at most 65535");
  a.max_seqlen = c.given("maxSeqlen") ? int(c.integer("maxSeqlen")) : a.tokens;
  if (a.max_seqlen > a.tokens) c.fail("ERR_INVALID_ARG", "maxSeqlen " + std::to_string(a.max_seqlen) + " exceeds tokens " + std::to_string(a.tokens));
  if (c.has("relativeBias")) {
    a.span = narrow(c, c.dim("span"), "span");
    if (a.span % 2 == 0) c.fail("ERR_SHAPE", "relativeBias span must be odd (offsets -R..R), got " + std::to_string(a.span));
    a.relative_bias = c.data_as<const float>("relativeBias");
  }
  a.dtype = c.dtype("qkv");
  a.scale = float(c.number("scale"));
  a.qkv = c.data("qkv");
  a.cu_seqlens = c.data_as<const int32_t>("cuSeqlens");
  a.out = c.data("out");
  return [a](Backend& b) { b.segment_attention(a); };
}
Launch bind_cross_attention(const OpCall& c) {
  CrossAttentionArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.tokens = narrow(c, c.dim("tokens"), "tokens");
  a.heads = narrow(c, c.dim("heads"), "heads");
  a.head_dim = narrow(c, c.dim("headDim"), "headDim");
  a.dtype = c.dtype("q");
  if (a.head_dim <= 0 || a.head_dim > 256) c.fail("ERR_SHAPE", "headDim must be in [1, 256], got " + std::to_string(a.head_dim));
  together(c, "k", "v");
  if (c.has("kv") == c.has("k")) c.fail("ERR_INVALID_ARG", "give kv (fused) or k and v, one of the two");
  a.n_text = narrow(c, c.dim("nText"), "nText");
  a.kv_row_stride = int64_t(c.has("kv") ? 2 : 1) * a.heads * a.head_dim;
  a.scale = float(c.given("scale") ? c.number("scale") : 1.0 / std::sqrt(double(a.head_dim)));
  a.q = c.data("q");
  if (c.has("kv")) {
    a.k = c.data("kv");
    a.v = static_cast<const uint8_t*>(a.k) + size_t(a.heads) * a.head_dim * dtype_size(a.dtype);
  } else {
    a.k = c.data("k");
    a.v = c.data("v");
  }
  a.cu_seqlens = c.data_as<const int32_t>("cuSeqlens");
  a.kv_starts = c.data_as<const int32_t>("kvStarts");
  a.out = c.data("out");
  return [a](Backend& b) { b.cross_attention(a); };
}

Launch bind_cfg_tau(const OpCall& c) {
  CfgTauArgs a;
  const double cfg = c.number("cfg"), tau = c.number("tau");
  if (tau == 0.0) c.fail("ERR_INVALID_ARG", "tau must not be 0");
  const int64_t rows = c.dim("rowsIn"), batch = c.dim("batch");
  if (rows == 2 * batch) {
    a.mixed = true;
  } else if (rows == batch) {
    if (cfg != 1.0) c.fail("ERR_SHAPE", "cfg " + std::to_string(cfg) + " needs logits with 2 * batch rows (conditional first)");
    a.mixed = false;
  } else {
    c.fail("ERR_SHAPE", "logits must have batch or 2 * batch rows (out has " + std::to_string(batch) + "), got " + std::to_string(rows));
  }
  a.batch = narrow(c, batch, "batch");
  a.row_size = batch > 0 ? c.numel("out") / batch : 0;
  a.cfg = float(cfg);
  a.uncond_weight = float(1.0 - cfg);
  a.tau = float(tau);
  a.z = c.data_as<const float>("logits");
  a.out = c.data_as<float>("out");
  return [a](Backend& b) { b.cfg_tau(a); };
}

void top_k_top_p(const OpCall& c, int* top_k, double* top_p) {
  *top_k = c.integer("topK");
  *top_p = c.number("topP");
  if (*top_p >= 1.0) c.fail("ERR_INVALID_ARG", "topP must be below 1 (0 or less: off)");
}

Launch bind_topk_topp_mask(const OpCall& c) {
  TopkToppMaskArgs a;
  const int64_t vocab = c.dim("V");
  if (vocab <= 0) c.fail("ERR_SHAPE", "logits must be [..., V] with V >= 1");
  top_k_top_p(c, &a.top_k, &a.top_p);
  a.vocab = narrow(c, vocab, "V");
  a.rows = c.numel("logits") / vocab;
  a.logits = c.data_as<const float>("logits");
  a.out = c.data_as<float>("out");
  return [a](Backend& b) { b.topk_topp_mask(a); };
}

Launch bind_sample_bits(const OpCall& c) {
  SampleBitsArgs a;
  if (c.dim("vocab") % 2 != 0)
    c.fail("ERR_SHAPE", "logits must be [batch, ..., 2k] (pairs of bit logits), got a last axis of " + std::to_string(c.dim("vocab")));
  if (c.numel("out") * 2 != c.numel("logits"))
    c.fail("ERR_SHAPE", "out must have one entry per logit pair (" + std::to_string(c.numel("logits") / 2) + "), got " +
                            std::to_string(c.numel("out")));
  top_k_top_p(c, &a.top_k, &a.top_p);
  a.seed = uint64_t(c.number("seed"));
  a.scale_index = uint32_t(c.integer("scaleIndex"));
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.pairs = a.batch > 0 ? c.numel("logits") / 2 / a.batch : 0;
  a.out_dtype = c.dtype("out");
  a.logits = c.data_as<const float>("logits");
  a.out = c.data("out");
  return [a](Backend& b) { b.sample_bits(a); };
}

Launch bind_bits_to_codes(const OpCall& c) {
  BitsToCodesArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.height = narrow(c, c.dim("height"), "height");
  a.width = narrow(c, c.dim("width"), "width");
  a.dim = narrow(c, c.dim("dim"), "dim");
  a.bits_dtype = c.dtype("bits");
  a.value = float(c.number("value"));
  a.bits = c.data("bits");
  a.codes = c.data_as<float>("out");
  return [a](Backend& b) { b.bits_to_codes(a); };
}

Launch bind_resize_bilinear(const OpCall& c) {
  ResizeBilinearArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.channels = narrow(c, c.dim("channels"), "channels");
  a.in_h = narrow(c, c.dim("inH"), "inH");
  a.in_w = narrow(c, c.dim("inW"), "inW");
  a.out_h = narrow(c, c.dim("outH"), "outH");
  a.out_w = narrow(c, c.dim("outW"), "outW");
  if ((a.in_h == 0 && a.out_h > 0) || (a.in_w == 0 && a.out_w > 0))
    c.fail("ERR_SHAPE", "cannot resize an empty input to a non-empty out");
  a.accumulate = c.flag("accumulate");
  a.in = c.data_as<const float>("input");
  a.out = c.data_as<float>("out");
  return [a](Backend& b) { b.resize_bilinear(a); };
}

Launch bind_conv2d(const OpCall& c) {
  Conv2dArgs a;
  const int64_t k = c.dim("k");
  if (k != 1 && k != 3) c.fail("ERR_SHAPE", "weight must be [outChannels, inChannels, k, k] with k = 1 or 3, got k = " + std::to_string(k));
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.in_channels = narrow(c, c.dim("inChannels"), "inChannels");
  a.height = narrow(c, c.dim("height"), "height");
  a.width = narrow(c, c.dim("width"), "width");
  a.out_channels = narrow(c, c.dim("outChannels"), "outChannels");
  a.kernel = int(k);
  a.dtype = c.dtype("input");
  a.weight_dtype = c.dtype("weight");
  a.x = c.data("input");
  a.weight = c.data("weight");
  a.bias = c.data("bias");
  a.out = c.data("out");
  return [a](Backend& b) { b.conv2d(a); };
}

Launch bind_group_norm(const OpCall& c) {
  GroupNormArgs a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.channels = narrow(c, c.dim("channels"), "channels");
  a.groups = c.integer("groups");
  if (a.channels % a.groups != 0)
    c.fail("ERR_SHAPE", std::to_string(a.channels) + " channels do not split into " + std::to_string(a.groups) + " groups");
  a.eps = float(c.number("eps"));
  if (!(a.eps > 0)) c.fail("ERR_INVALID_ARG", "eps must be positive");
  a.swish = c.flag("swish");
  a.spatial = c.dim("height") * c.dim("width");
  a.dtype = c.dtype("input");
  a.param_dtype = c.dtype("weight");
  a.x = c.data("input");
  a.weight = c.data("weight");
  a.bias = c.data("bias");
  a.out = c.data("out");
  return [a](Backend& b) { b.group_norm(a); };
}

// The three layout moves share their arguments: the grid (batch, channels, height, width), dtype, in, out.
template <class Args>
Args layout_args(const OpCall& c) {
  Args a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.channels = narrow(c, c.dim("channels"), "channels");
  a.height = narrow(c, c.dim("height"), "height");
  a.width = narrow(c, c.dim("width"), "width");
  a.dtype = c.dtype("input");
  a.in = c.data("input");
  a.out = c.data("out");
  return a;
}

Launch bind_upsample_nearest2x(const OpCall& c) {
  const auto a = layout_args<UpsampleNearest2xArgs>(c);
  return [a](Backend& b) { b.upsample_nearest2x(a); };
}

Launch bind_pixel_shuffle2x(const OpCall& c) {
  const auto a = layout_args<PixelShuffle2xArgs>(c);
  return [a](Backend& b) { b.pixel_shuffle2x(a); };
}

Launch bind_pixel_unshuffle2x(const OpCall& c) {
  const auto a = layout_args<PixelUnshuffle2xArgs>(c);
  return [a](Backend& b) { b.pixel_unshuffle2x(a); };
}

Launch bind_add(const OpCall& c) {
  AddArgs a;
  a.count = c.numel("a");
  a.dtype = c.dtype("a");
  a.a = c.data("a");
  a.b = c.data("b");
  a.out = c.data("out");
  return [a](Backend& b) { b.add(a); };
}

Launch bind_cast(const OpCall& c) {
  CastArgs a;
  a.count = c.numel("input");
  a.in_dtype = c.dtype("input");
  a.out_dtype = c.dtype("out");
  a.in = c.data("input");
  a.out = c.data("out");
  return [a](Backend& b) { b.cast(a); };
}

Launch bind_transpose12(const OpCall& c) {
  Transpose12Args a;
  const auto& dims = c.list("dims");
  a.a = int64_t(dims[0]);
  a.b = int64_t(dims[1]);
  a.c = int64_t(dims[2]);
  a.d = int64_t(dims[3]);
  // Each entry is at most 2^40, so the product is taken in 128 bits before it is compared.
  const __int128 product = __int128(a.a) * a.b * a.c * a.d;
  a.in_offset = int64_t(c.number("inOffset"));
  // Without inOffset the dims must cover the whole input; with it, a slice of the input from there on.
  const bool sliced = c.given("inOffset");
  if (sliced ? a.in_offset + product > c.numel("input") : product != c.numel("input"))
    c.fail("ERR_SHAPE", (sliced ? "inOffset " + std::to_string(a.in_offset) + " + " : std::string()) + "dims hold " +
                            (product > INT64_MAX ? std::string("more than 2^63") : std::to_string(int64_t(product))) +
                            " elements, input has " + std::to_string(c.numel("input")));
  const int64_t numel = int64_t(product);
  a.out_offset = int64_t(c.number("outOffset"));
  if (a.out_offset + numel > c.numel("out"))
    c.fail("ERR_SHAPE", "outOffset " + std::to_string(a.out_offset) + " + " + std::to_string(numel) + " elements exceed out's " +
                            std::to_string(c.numel("out")));
  a.dtype = c.dtype("input");
  a.in = c.data("input");
  a.out = c.data("out");
  return [a](Backend& b) { b.transpose12(a); };
}

Launch bind_image_to_u8(const OpCall& c) {
  ImageToU8Args a;
  a.batch = narrow(c, c.dim("batch"), "batch");
  a.height = narrow(c, c.dim("height"), "height");
  a.width = narrow(c, c.dim("width"), "width");
  a.dtype = c.dtype("image");
  a.bgr = c.flag("bgr");
  a.image = c.data("image");
  a.out = c.data_as<uint8_t>("out");
  return [a](Backend& b) { b.image_to_u8(a); };
}

constexpr double kSafeInt = 9007199254740991.0;

std::vector<OpDecl> declarations() {
  const char* F = "f32|bf16";
  return {
      {"attention", "attention",
       "softmax(scale * q . key) . value over [history (or its gathered rows) ‖ current], optionally with the "
       "observation window's logits and log-sum-exp; the history is paged through pageTable, or contiguous, in q's "
       "dtype or 8-bit (kvFormat, history and current alike) with a scale byte per token",
       {in("q", F, "[rows, heads, Lq, headDim]"), in_opt("histK", "f32|bf16|u8", "[pages, heads, pageTokens, headDim]"),
        in_opt("histV", "=histK", "[pages, heads, pageTokens, headDim]"), in_opt("pageTable", "i32", "[rows, tablePages]"),
        in_opt("histScales", "u8", "[pages, heads, pageTokens]"),
        in_opt("gather", "i32", "[rows, heads, nGather]"),
        in_opt("curK", "=histK", "[rows, heads, Lc, headDim]"), in_opt("curV", "=curK", "[rows, heads, Lc, headDim]"),
        in_opt("curScales", "u8", "[rows, heads, Lc]"),
        out_opt("out", "=q", "=q"), in_opt("windowRows", "i32", "[nWindow]"),
        out_opt("windowLogits", "f32", "[rows, heads, nWindow, nKeys]"), out_opt("windowLse", "f32", "[rows, heads, nWindow]")},
       {int_opt("histLen", 0, kI32Max), num_req("scale"), choice_def("kvFormat", "plain|int8|fp8", 0)},
       bind_attention,
       "q histK histV gather curK curV out windowRows windowLogits windowLse | rows=2 heads=2 Lq=3 headDim=8 pages=2 "
       "pageTokens=6 nGather=3 Lc=3 nWindow=2 nKeys=6 | histLen=4 scale=0.35\n"
       "q histK histV pageTable curK curV out | rows=2 heads=2 Lq=2 headDim=16 pages=5 pageTokens=2 tablePages=3 Lc=2 | "
       "histLen=5 scale=0.25\n"
       "q histK histV out | rows=1 heads=2 Lq=2 headDim=16 pages=1 pageTokens=5 | scale=0.25\n"
       "q histK:u8 histV:u8 pageTable histScales curK:u8 curV:u8 curScales out | rows=2 heads=2 Lq=2 headDim=16 pages=5 "
       "pageTokens=2 tablePages=3 Lc=2 | histLen=5 scale=0.25 kvFormat=int8"},
      {"evictCompact", "evict_compact",
       "moves the kept rows of [history ‖ current] to the front of the history, in place, per (row, head); the "
       "history is paged through pageTable, or contiguous; 8-bit rows (kvFormat) move with their scale bytes",
       {inout("histK", "f32|bf16|u8", "[pages, heads, pageTokens, headDim]"), inout("histV", "=histK", "[pages, heads, pageTokens, headDim]"),
        in_opt("pageTable", "i32", "[rows, tablePages]"),
        inout_opt("histScales", "u8", "[pages, heads, pageTokens]"),
        in_opt("curK", "=histK", "[rows, heads, Lc, headDim]"), in_opt("curV", "=curK", "[rows, heads, Lc, headDim]"),
        in_opt("curScales", "u8", "[rows, heads, Lc]"),
        in("keep", "i32", "[rows, heads, nKeep]")},
       {int_req("histLen", 0, kI32Max), flag_def("repeats", false), choice_def("kvFormat", "plain|int8|fp8", 0)},
       bind_evict_compact,
       "histK histV curK curV keep | rows=2 heads=2 pages=2 pageTokens=6 headDim=4 Lc=3 nKeep=5 | histLen=4\n"
       "histK histV pageTable curK curV keep | rows=2 heads=2 pages=6 pageTokens=2 tablePages=3 headDim=4 Lc=3 nKeep=5 | "
       "histLen=4\n"
       "histK:u8 histV:u8 pageTable histScales curK:u8 curV:u8 curScales keep | rows=2 heads=2 pages=6 pageTokens=2 tablePages=3 "
       "headDim=4 Lc=3 nKeep=5 | histLen=4 kvFormat=fp8"},
      {"selection", "selection",
       "window scoring, pooling, top-k (ties to the lowest index) and union with the window, sorted",
       {in("logits", "f32", "[rows, heads, nWindow, nKeys]"), in_opt("lse", "f32", "[rows, heads, nWindow]"),
        in("windowKeys", "i32", "[nWindow]"), out("out", "i32", "[rows, heads, budget]"),
        out_opt("pooledScores", "f32", "[rows, heads, nKeys]")},
       {int_req("budget", 0, kI32Max), choice_def("mode", "logits|probs", 0), choice_def("pooling", "none|max|avg", 1),
        int_def("kernel", 1, 1, 63)},
       bind_selection,
       "logits lse windowKeys out pooledScores | rows=2 heads=2 nWindow=2 nKeys=7 | budget=4 mode=probs pooling=avg kernel=3"},
      {"gemm", "gemm", "y = epilogue(x . w^T + bias) over the last axis of x",
       {in("x", F, "[...M, K]"), in("w", F, "[N, K]"), in_opt("bias", F, "[N]"), out("y", F, "[...M, N]")},
       {choice_def("epilogue", "none|gelu_tanh|silu", 0)},
       bind_gemm,
       "x w bias y | M=3 K=5 N=4 | epilogue=silu"},
      {"gemmResidual", "gemm_residual",
       "y += gate * epilogue(x . w^T + bias), in place: a Linear that ends in the residual stream, gemm and "
       "gatedResidual in one kernel (the product is never stored)",
       {in("x", F, "[batch, tokens, K]"), in("w", F, "[N, K]"), in_opt("bias", F, "[N]"), inout("y", "f32", "[batch, tokens, N]"),
        in_opt("gate", "f32", "[batch, N] | [batch, gateSlots, N]")},
       {choice_def("epilogue", "none|gelu_tanh|silu", 0), int_opt("gateSlot", 0, kI32Max)},
       bind_gemm_residual,
       "x w bias y gate | batch=2 tokens=3 K=8 N=4 gateSlots=6 | gateSlot=1\n"
       "x w y | batch=1 tokens=5 K=16 N=8 | epilogue=gelu_tanh"},
      {"layerNorm", "layer_norm", "LayerNorm over the last axis: plain, AdaLN-modulated (scale/shift) or affine",
       {in("x", F, "[batch, tokens, channels] | [batch, channels]"), out("y", F, "=x", "x"),
        in_opt("scale", "f32", "[batch, channels] | [batch, scaleSlots, channels]"),
        in_opt("shift", "f32", "[batch, channels] | [batch, shiftSlots, channels]"), in_opt("weight", "f32", "[channels]"),
        in_opt("bias", "f32", "[channels]")},
       {num_def("eps", 1e-6), int_opt("scaleSlot", 0, kI32Max), int_opt("shiftSlot", 0, kI32Max)},
       bind_layer_norm,
       "x y scale shift | batch=2 tokens=3 channels=4 scaleSlots=6 shiftSlots=6 | scaleSlot=1 shiftSlot=0\n"
       "x y weight bias | batch=2 tokens=3 channels=4 |"},
      {"rmsNorm", "rms_norm", "T5LayerNorm over the last axis: y = weight * x * rsqrt(mean(x^2) + eps), statistics in f32",
       {in("x", F, "[...R, C]"), in("weight", F, "[C]"), out("y", F, "=x", "x")},
       {num_def("eps", 1e-6)},
       bind_rms_norm,
       "x weight y | R=2,3 C=8 | eps=0.001"},
      {"gatedActivation", "gated_activation", "out = fn(x[..., :F]) * x[..., F:] (GEGLU with gelu_tanh, SwiGLU with silu)",
       {in("x", F, "[...R, 2*F]"), out("out", F, "[...R, F]")},
       {choice_req("fn", "silu|gelu_tanh")},
       bind_gated_activation,
       "x out | R=2,3 F=4 | fn=gelu_tanh"},
      {"segmentAttention", "segment_attention",
       "varlen self-attention within each segment of packed tokens, with an optional relative-position bias (T5)",
       {in("qkv", F, "[tokens, 3, heads, headDim]"), in("cuSeqlens", "i32", "[segments+1]"),
        in_opt("relativeBias", "f32", "[heads, span]"), out("out", "=qkv", "[tokens, heads, headDim]")},
       {num_req("scale"), int_opt("maxSeqlen", 0, kI32Max)},
       bind_segment_attention,
       "qkv cuSeqlens relativeBias out | tokens=2 heads=2 headDim=4 segments=2 span=7 | scale=1 maxSeqlen=1\n"
       "qkv cuSeqlens out | tokens=3 heads=2 headDim=4 segments=3 | scale=0.5"},
      {"gatedResidual", "gated_residual", "x += gate * y, in place",
       {inout("x", F, "[batch, tokens, channels] | [batch, channels]"), in("y", F, "=x"),
        in_opt("gate", "f32", "[batch, channels] | [batch, gateSlots, channels]")},
       {int_opt("gateSlot", 0, kI32Max)},
       bind_gated_residual,
       "x y gate | batch=2 tokens=3 channels=4 gateSlots=6 | gateSlot=2"},
      {"activation", "activation", "out = fn(x) elementwise",
       {in("x", F, "[...S]"), out("out", F, "=x", "x")},
       {choice_req("fn", "silu|gelu_tanh")},
       bind_activation,
       "x out | S=2,3 | fn=gelu_tanh"},
      {"qkNormRope", "qk_norm_rope",
       "q/k/v from the fused projection: bias, L2-normalise and scale, 2-D RoPE; k and v written at kvOffset of a "
       "paged (pageTable) or contiguous history, in their dtype or quantised to 8 bits (kvFormat, with normalize) with a scale byte per token",
       {in("qkv", F, "[batch, tokens, 3*heads*headDim]"), in_opt("qBias", "f32", "[heads*headDim]"),
        in_opt("vBias", "f32", "[heads*headDim]"), in_opt("scaleMul", "f32", "[heads]"), in_opt("positions", "i32", "[tokens, 2]"),
        out("q", F, "[batch, heads, tokens, headDim]"), out_opt("k", "f32|bf16|u8", "[pages, heads, pageTokens, headDim]"),
        out_opt("v", "=k", "=k"), in_opt("pageTable", "i32", "[batch, tablePages]"),
        out_opt("scales", "u8", "[pages, heads, pageTokens]")},
       {flag_def("normalize", true), int_def("kvOffset", 0, 0, kI32Max), choice_def("kvFormat", "plain|int8|fp8", 0)},
       bind_qk_norm_rope,
       "qkv qBias vBias scaleMul positions q k v | batch=2 tokens=3 heads=2 headDim=8 pages=2 pageTokens=5 | kvOffset=2\n"
       "qkv q k v pageTable | batch=2 tokens=3 heads=2 headDim=8 pages=7 pageTokens=2 tablePages=3 | kvOffset=2\n"
       "qkv q k:u8 v:u8 pageTable scales | batch=2 tokens=3 heads=2 headDim=8 pages=7 pageTokens=2 tablePages=3 | "
       "kvOffset=2 kvFormat=int8"},
      {"crossAttention", "cross_attention", "varlen cross-attention of each image's tokens over its own text segment (a shared one through kvStarts)",
       {in("q", F, "[batch, tokens, heads, headDim]"), in_opt("kv", "=q", "[nText, 2, heads, headDim]"),
        in_opt("k", "=q", "[nText, heads, headDim]"), in_opt("v", "=q", "[nText, heads, headDim]"),
        in("cuSeqlens", "i32", "[batch+1]"), in_opt("kvStarts", "i32", "[batch]"), out("out", "=q", "=q")},
       {num_opt("scale")},
       bind_cross_attention,
       "q kv cuSeqlens out | batch=2 tokens=3 heads=2 headDim=4 nText=4 | scale=0.5\n"
       "q k v cuSeqlens out | batch=2 tokens=3 heads=2 headDim=4 nText=4 |\n"
       "q kv cuSeqlens kvStarts out | batch=2 tokens=3 heads=2 headDim=4 nText=3 |"},
      {"cfgTau", "cfg_tau", "out = cfg * z_cond / tau + (1 - cfg) * z_uncond / tau",
       {in("logits", "f32", "[rowsIn, ...T]"), out("out", "f32", "[batch, ...T]")},
       {num_def("cfg", 1.0), num_def("tau", 1.0)},
       bind_cfg_tau,
       "logits out | rowsIn=4 batch=2 T=3,2 | cfg=3 tau=0.5"},
      {"topkTopPMask", "topk_topp_mask", "top-k then top-p over the last axis: removed logits become -Infinity",
       {in("logits", "f32", "[...R, V]"), out("out", "f32", "=logits", "logits")},
       {int_def("topK", 0, -kI32Max, kI32Max), num_def("topP", 0.0)},
       bind_topk_topp_mask,
       "logits out | R=2 V=6 | topK=3 topP=0.9"},
      {"sampleBits", "sample_bits", "one bit per logit pair after top-k / top-p, Philox-keyed by seed, scale and position",
       {in("logits", "f32", "[batch, ...L, vocab]"), out("out", "u8|i32", "[batch, ...P]")},
       {int_def("topK", 0, -kI32Max, kI32Max), num_def("topP", 0.0), {"seed", AttrKind::integer, true, false, 0, 0, kSafeInt, "", 0},
        int_req("scaleIndex", 0, kI32Max)},
       bind_sample_bits,
       "logits out | batch=2 L=3 vocab=8 P=3,4 | seed=7 scaleIndex=1"},
      {"bitsToCodes", "bits_to_codes", "channels-last bits to channels-first +-value codes",
       {in("bits", "u8|i32", "[batch, height, width, dim]"), out("out", "f32", "[batch, dim, height, width]")},
       {num_req("value")},
       bind_bits_to_codes,
       "bits out | batch=2 height=2 width=3 dim=4 | value=0.5"},
      {"resizeBilinear", "resize_bilinear", "bilinear resize (align_corners=False), up or down, optionally accumulated",
       {in("input", "f32", "[batch, channels, inH, inW]"), out("out", "f32", "[batch, channels, outH, outW]")},
       {flag_def("accumulate", false)},
       bind_resize_bilinear,
       "input out | batch=1 channels=2 inH=2 inW=3 outH=4 outW=5 | accumulate=true"},
      {"conv2d", "conv2d", "2-D convolution, stride 1, zero padding (k-1)/2, k = 1 or 3",
       {in("input", F, "[batch, inChannels, height, width]"), in("weight", F, "[outChannels, inChannels, k, k]"),
        in_opt("bias", "=weight", "[outChannels]"), out("out", "=input", "[batch, outChannels, height, width]")},
       {},
       bind_conv2d,
       "input weight bias out | batch=1 inChannels=2 height=3 width=4 outChannels=3 k=3 |"},
      {"groupNorm", "group_norm", "GroupNorm with f32 statistics and an optional fused swish",
       {in("input", F, "[batch, channels, height, width]"), in("weight", F, "[channels]"), in("bias", "=weight", "[channels]"),
        out("out", "=input", "=input", "input")},
       {int_def("groups", 32, 1, kI32Max), num_def("eps", 1e-6), flag_def("swish", false)},
       bind_group_norm,
       "input weight bias out | batch=2 channels=4 height=2 width=3 | groups=2 swish=true"},
      {"upsampleNearest2x", "upsample_nearest2x", "nearest-neighbour x2 upsampling of NCHW",
       {in("input", "any", "[batch, channels, height, width]"), out("out", "=input", "[batch, channels, 2*height, 2*width]")},
       {},
       bind_upsample_nearest2x,
       "input out | batch=1 channels=2 height=2 width=3 |"},
      {"pixelShuffle2x", "pixel_shuffle2x", "[B, h, w, 4c] -> [B, 2h, 2w, c], channels-last",
       {in("input", "any", "[batch, height, width, 4*channels]"), out("out", "=input", "[batch, 2*height, 2*width, channels]")},
       {},
       bind_pixel_shuffle2x,
       "input out | batch=2 height=2 width=3 channels=2 |"},
      {"pixelUnshuffle2x", "pixel_unshuffle2x", "NCHW [B, c, 2h, 2w] -> tokens [B, h*w, 4c]",
       {in("input", "any", "[batch, channels, 2*height, 2*width]"), out("out", "=input", "[batch, height*width, 4*channels]")},
       {},
       bind_pixel_unshuffle2x,
       "input out | batch=2 channels=2 height=2 width=3 |"},
      {"add", "add", "out = a + b elementwise",
       {in("a", F, "[...S]"), in("b", "=a", "=a"), out("out", "=a", "=a", "a,b")},
       {},
       bind_add,
       "a b out | S=2,3 |"},
      {"cast", "cast", "out = input converted between f32 and bf16 (round to nearest even); equal dtypes copy",
       {in("input", F, "[...S]"), out("out", F, "=input")},
       {},
       bind_cast,
       "input out | S=2,3 |"},
      {"transpose12", "transpose12",
       "input from element inOffset on, viewed as [A, B, C, D], written to out viewed as [A, C, B, D] from element "
       "outOffset on",
       {in("input", "any", "[...In]"), out("out", "=input", "[...Out]")},
       {int_list("dims", 4, 0, 1099511627776.0), {"outOffset", AttrKind::integer, false, true, 0, 0, kSafeInt, "", 0},
        {"inOffset", AttrKind::integer, false, true, 0, 0, kSafeInt, "", 0}},
       bind_transpose12,
       "input out | In=12 Out=3,5 | dims=2,3,2,1 outOffset=2\n"
       "input out | In=20 Out=12 | dims=1,1,3,4 inOffset=7"},
      {"imageToU8", "image_to_u8", "image in [-1, 1] to 8-bit pixels: clamp, (x+1)/2*255, truncate",
       {in("image", F, "[batch, 3, height, width]"), out("out", "u8", "[batch, height, width, 3]")},
       {flag_def("bgr", false)},
       bind_image_to_u8,
       "image out | batch=2 height=2 width=3 | bgr=true"},
  };
}

}  // namespace

// ------------------------------------------------------------------------------------------------- OpCall

const TensorRef& OpCall::ref(const char* operand) const {
  // Bind functions mostly read operands in declaration order: start after the last one found.
  const size_t n = op_.operands.size();
  for (size_t k = 0, i = next_operand_; k < n; ++k, i = i + 1 == n ? 0 : i + 1)
    if (op_.operands[i].name == operand) {
      next_operand_ = i + 1 == n ? 0 : i + 1;
      return in_.operands[i];
    }
  for (size_t i = 0; i < op_.operands.size(); ++i)
    if (std::strcmp(op_.operands[i].name, operand) == 0) return in_.operands[i];
  throw std::logic_error(std::string(op_.name) + ": no operand " + operand);
}

int64_t OpCall::numel(const char* operand) const {
  int64_t n = 1;
  for (int64_t d : shape(operand)) n *= d;
  return n;
}

int64_t OpCall::dim(const char* symbol, int64_t fallback) const {
  const ParsedOp& p = *op_.parsed;
  const size_t used = std::min(p.symbol_keys_used.load(std::memory_order_acquire), p.symbol_keys.size());
  for (size_t k = 0; k < used; ++k)
    if (p.symbol_keys[k].key.load(std::memory_order_acquire) == symbol) {
      const int i = p.symbol_keys[k].index;
      return symbols[size_t(i)] >= 0 ? symbols[size_t(i)] : fallback;
    }
  for (size_t i = 0; i < p.symbols.size(); ++i)
    if (p.symbols[i] == symbol) {
      const size_t k = p.symbol_keys_used.fetch_add(1, std::memory_order_acq_rel);
      if (k < p.symbol_keys.size()) {
        p.symbol_keys[k].index = int(i);
        p.symbol_keys[k].key.store(symbol, std::memory_order_release);
      }
      return symbols[i] >= 0 ? symbols[i] : fallback;
    }
  throw std::logic_error(std::string(op_.name) + ": no symbol " + symbol);
}

bool OpCall::given(const char* attr) const {
  const int i = attr_index(op_, attr);
  if (i < 0) throw std::logic_error(std::string(op_.name) + ": no attribute " + attr);
  return !std::isnan(attr_values[size_t(i)]);
}

double OpCall::number(const char* attr) const {
  const int i = attr_index(op_, attr);
  if (i < 0) throw std::logic_error(std::string(op_.name) + ": no attribute " + attr);
  return attr_values[size_t(i)];
}

int OpCall::integer(const char* attr) const { return int(number(attr)); }
bool OpCall::flag(const char* attr) const { return number(attr) != 0; }
int OpCall::choice(const char* attr) const { return int(number(attr)); }

const std::vector<double>& OpCall::list(const char* attr) const {
  const int i = attr_index(op_, attr);
  if (i < 0) throw std::logic_error(std::string(op_.name) + ": no attribute " + attr);
  return in_.attrs[size_t(i)].items;
}

void OpCall::fail(const char* code, const std::string& message) const {
  throw OpError(code, std::string(op_.name) + ": " + message);
}

const std::vector<OpDecl>& op_table() {
  static const std::vector<OpDecl> table = [] {
    static std::deque<ParsedOp> parsed;
    std::vector<OpDecl> ops = declarations();
    for (OpDecl& op : ops) {
      parse_op(op, parsed.emplace_back());
      op.parsed = &parsed.back();
    }
    return ops;
  }();
  return table;
}

namespace {

std::string json_string(const char* s) {
  std::string out = "\"";
  for (const char* p = s; *p; ++p) {
    const unsigned char c = static_cast<unsigned char>(*p);
    if (c == '"' || c == '\\') out += '\\', out += char(c);
    else if (c == '\n') out += "\\n";
    else if (c < 0x20) out += "\\u00" + std::string(1, "0123456789abcdef"[c >> 4]) + "0123456789abcdef"[c & 15];
    else out += char(c);  // UTF-8 passes through
  }
  return out + "\"";
}

std::string json_number(double x) {
  if (std::isinf(x)) return x > 0 ? "1e999" : "-1e999";  // JSON.parse reads these as ±Infinity
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

}  // namespace

std::string op_table_json() {
  static const char* const io_names[] = {"in", "out", "inout"};
  static const char* const kind_names[] = {"integer", "number", "boolean", "choice", "intList"};
  std::string j = "[";
  for (const OpDecl& op : op_table()) {
    j += std::string(j.size() > 1 ? "," : "") + "{\"name\":" + json_string(op.name) + ",\"kernel\":" + json_string(op.kernel) +
         ",\"summary\":" + json_string(op.summary) + ",\"examples\":" + json_string(op.examples) + ",\"operands\":[";
    for (size_t i = 0; i < op.operands.size(); ++i) {
      const OperandDecl& x = op.operands[i];
      j += std::string(i ? "," : "") + "{\"name\":" + json_string(x.name) + ",\"io\":" + json_string(io_names[int(x.io)]) +
           ",\"optional\":" + (x.optional ? "true" : "false") + ",\"dtypes\":" + json_string(x.dtypes) +
           ",\"shape\":" + json_string(x.shape) + ",\"mayAlias\":" + json_string(x.may_alias) + "}";
    }
    j += "],\"attributes\":[";
    for (size_t i = 0; i < op.attrs.size(); ++i) {
      const AttrDecl& a = op.attrs[i];
      j += std::string(i ? "," : "") + "{\"name\":" + json_string(a.name) + ",\"kind\":" + json_string(kind_names[int(a.kind)]) +
           ",\"required\":" + (a.required ? "true" : "false");
      if (a.has_default) j += ",\"default\":" + json_number(a.fallback);
      if (a.kind == AttrKind::integer || a.kind == AttrKind::number || a.kind == AttrKind::int_list)
        j += ",\"min\":" + json_number(a.min) + ",\"max\":" + json_number(a.max);
      if (a.kind == AttrKind::choice) j += ",\"choices\":" + json_string(a.choices);
      if (a.kind == AttrKind::int_list) j += ",\"length\":" + std::to_string(a.length);
      j += "}";
    }
    j += "]}";
  }
  return j + "]";
}

Launch check_and_bind(const OpDecl& op, const OpInputs& in) {
  OpCall call(op, in);
  Checker(op, in, call).run();
  return op.bind(call);
}

}  // namespace scalekv
