// Runs every registered self-test (or those whose name contains argv[1]) and reports failures.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "../../kernels/emu/sanitizer_hooks.h"
#include "selftest.h"

namespace selftest {

static int g_failures = 0;

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

bool add(const char* name, void (*fn)()) {
  registry().push_back({name, fn});
  return true;
}

void record_failure(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
  ++g_failures;
}

bool asan_active() { return skv_emu::san::asan_active(); }
bool tsan_active() { return skv_emu::san::tsan_active(); }
bool random_schedule() {
  const char* s = std::getenv("SKV_EMU_SCHEDULE");
  if (!s || !std::strcmp(s, "random")) return true;
  std::fprintf(stderr, "  skipped: SKV_EMU_SCHEDULE=%s\n", s);
  return false;
}

void expect_death(const std::function<void()>& body, const std::vector<std::string>& expected, const char* file,
                  int line) {
  int fds[2];
  if (pipe(fds) != 0) {
    record_failure(file, line, "pipe() failed");
    return;
  }
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    alarm(120);  // a hang is a failure too
    body();
    std::exit(0);  // not _exit: ThreadSanitizer turns its reports into exit code 66 in an exit handler
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  const bool died = WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0);
  bool matched = true;
  for (const std::string& e : expected) matched = matched && out.find(e) != std::string::npos;
  if (std::getenv("SELFTEST_VERBOSE")) std::fprintf(stderr, "  [child stderr] %s", out.c_str());
  if (!died || !matched) {
    std::string what = died ? "child died without the expected message" : "child did not die";
    for (const std::string& e : expected) what += "\n    expected: " + e;
    what += "\n    child stderr:\n" + out.substr(0, 4000);
    record_failure(file, line, what);
  }
}

}  // namespace selftest

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int run = 0;
  const auto start = std::chrono::steady_clock::now();
  for (const selftest::Case& c : selftest::registry()) {
    if (filter && !std::strstr(c.name, filter)) continue;
    const int before = selftest::g_failures;
    const auto t0 = std::chrono::steady_clock::now();
    c.fn();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "%s %s (%.0f ms)\n", selftest::g_failures == before ? "ok  " : "FAIL", c.name, ms);
    ++run;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%d test(s), %d failure(s), %.1f s%s%s\n", run, selftest::g_failures, s,
               selftest::asan_active() ? ", AddressSanitizer" : "", selftest::tsan_active() ? ", ThreadSanitizer" : "");
  return selftest::g_failures == 0 && run > 0 ? 0 : 1;
}
