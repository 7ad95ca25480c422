// Failure reports. Every strictness violation ends the process with one line naming the kernel, block and
// thread; the test harness (and CI logs) match on it. Sanitizer reports get the same context line.
#include <dlfcn.h>
#include <signal.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "block_state.h"
#include "sanitizer_hooks.h"

namespace skv_emu {

__thread SimThread* t_sim = nullptr;
__thread const LaneContext* t_lane = nullptr;

static std::mutex& report_mutex() {
  static std::mutex m;
  return m;
}

void describe_thread(const SimThread& t, char* out, size_t n) {
  std::snprintf(out, n, "(%u,%u,%u)", t.lane.thread_idx.x, t.lane.thread_idx.y, t.lane.thread_idx.z);
}

// "ns::(anonymous namespace)::attention_kernel<64, 4>(Params)" -> "attention_kernel<64, 4>".
static std::string short_function_name(std::string s) {
  for (size_t p; (p = s.find("(anonymous namespace)::")) != std::string::npos;) s.erase(p, 23);
  int depth = 0;
  size_t start = 0, end = s.size();
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    else if (c == '>') --depth;
    else if (depth == 0 && c == '(') { end = i; break; }
    else if (depth == 0 && c == ' ') start = i + 1;  // after a return type
    else if (depth == 0 && c == ':' && i + 1 < s.size() && s[i + 1] == ':') start = i + 2;
  }
  return s.substr(start, end - start);
}

// The kernel's function name from the symbol table (launchers often pass a variable, e.g.
// `auto kernel = attention_kernel<64, 4>;`, so the text of SKV_LAUNCH's argument says little). Runs
// addr2line, so only on the way to an abort or when tracing.
std::string kernel_function_name(const void* kernel) {
  Dl_info info{};
  if (!dladdr(kernel, &info) || !info.dli_fname) return {};
  std::string file = info.dli_fname;
  if (file.empty() || file[0] != '/') {  // the main program: name it absolutely (addr2line runs elsewhere)
    char exe[1024];
    const ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) return {};
    file.assign(exe, static_cast<size_t>(len));
  }
  const uintptr_t addr = reinterpret_cast<uintptr_t>(kernel);
  for (uintptr_t a : {addr - reinterpret_cast<uintptr_t>(info.dli_fbase), addr}) {
    char cmd[1200];
    // -i lists the inlining chain innermost first; the last function named is the kernel itself.
    std::snprintf(cmd, sizeof cmd, "addr2line -f -i -C -e '%s' 0x%lx 2>/dev/null", file.c_str(),
                  static_cast<unsigned long>(a));
    FILE* p = popen(cmd, "r");
    if (!p) return {};
    std::string name;
    char line[1024];
    for (int i = 0; std::fgets(line, sizeof line, p); ++i)
      if (i % 2 == 0) name.assign(line, std::strcspn(line, "\n"));
    pclose(p);
    if (!name.empty() && name != "??") return short_function_name(name);
  }
  return {};
}

static std::string kernel_label(const LaunchSpec& spec) {
  const std::string fn = kernel_function_name(spec.kernel_id);
  if (fn.empty() || fn == spec.kernel_name) return std::string("'") + spec.kernel_name + "'";
  return "'" + fn + "' (SKV_LAUNCH(" + spec.kernel_name + ", ...))";
}

static int context_line(const SimThread* t, char* out, size_t n, bool symbolize) {
  const Block& b = *t->block;
  const std::string label =
      symbolize ? kernel_label(*b.spec) : std::string("'") + b.spec->kernel_name + "'";
  return std::snprintf(out, n, "skv_emu: kernel %s block (%u,%u,%u) thread (%u,%u,%u) (warp %u lane %u)",
                       label.c_str(), b.idx.x, b.idx.y, b.idx.z, t->lane.thread_idx.x, t->lane.thread_idx.y,
                       t->lane.thread_idx.z, t->linear / 32, t->linear % 32);
}

void fatal(const SimThread* t, const char* fmt, ...) {
  report_mutex().lock();  // never unlocked: the first report wins, the process ends
  char buf[2048];
  int n = context_line(t, buf, sizeof buf, true);
  n += std::snprintf(buf + n, sizeof buf - n, ": ");
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf + n, sizeof buf - n, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "%s\n", buf);
  std::fflush(stderr);
  std::abort();
}

void fatal_launch(const LaunchSpec& spec, const char* fmt, ...) {
  report_mutex().lock();
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "skv_emu: launch of kernel %s grid (%u,%u,%u) block (%u,%u,%u) smem %zu: %s\n",
               kernel_label(spec).c_str(), spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x, spec.block.y,
               spec.block.z,
               spec.smem_bytes, buf);
  std::fflush(stderr);
  std::abort();
}

void fatal_outside_kernel(const char* what) {
  std::fprintf(stderr, "skv_emu: %s was called outside a kernel launched with SKV_LAUNCH\n", what);
  std::abort();
}

SimThread& current(const char* what) {
  if (__builtin_expect(t_sim == nullptr, 0)) fatal_outside_kernel(what);
  return *t_sim;
}

void trap(const Site& site) { fatal(&current("__trap"), "__trap() at %s:%d", site.file, site.line); }

// Async-signal-safe context line for sanitizer reports and crashes.
static void write_context(const char* what) {
  if (!t_sim) return;
  char buf[512];
  int n = context_line(t_sim, buf, sizeof buf, false);
  n += std::snprintf(buf + n, sizeof buf - n, ": %s\n", what);
  if (write(2, buf, static_cast<size_t>(n)) < 0) return;
}

// SIGSEGV/SIGBUS without a sanitizer (a fiber stack overflow hits the guard page, or a wild pointer):
// name the thread, then let the default action end the process. Runs on the worker's alternate stack.
static void on_crash_signal(int sig) {
  write_context(sig == SIGSEGV ? "SIGSEGV (a fiber stack overflow, SKV_EMU_STACK_KB, or a wild pointer)"
                               : "SIGBUS");
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_crash_handler(Worker& w) {
  if (san::asan_active() || san::tsan_active()) return;  // the sanitizers report crashes themselves
  w.signal_stack.resize(64 * 1024);
  stack_t ss{};
  ss.ss_sp = w.signal_stack.data();
  ss.ss_size = w.signal_stack.size();
  sigaltstack(&ss, nullptr);
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = on_crash_signal;
    sa.sa_flags = SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  });
}

}  // namespace skv_emu

// AddressSanitizer calls this before printing a report: put the simulated thread's identity first.
extern "C" void __asan_on_error() { skv_emu::write_context("AddressSanitizer error follows"); }
