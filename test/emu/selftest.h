// A tiny test harness for the emulator's self-tests: EMU_TEST registers a test, CHECK records a failure and
// goes on, expect_death runs code in a forked child and requires it to die with a given message.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "../../kernels/cuda/portable.cuh"

namespace selftest {

struct Case {
  const char* name;
  void (*fn)();
};
std::vector<Case>& registry();
bool add(const char* name, void (*fn)());
void record_failure(const char* file, int line, const std::string& what);

// Runs `body` in a forked child; passes when the child ends abnormally (signal or non-zero exit) and its
// stderr contains every string in `expected`.
void expect_death(const std::function<void()>& body, const std::vector<std::string>& expected, const char* file,
                  int line);

bool asan_active();
bool tsan_active();
// The tests that expect a missing barrier to show as a wrong result rely on the default random schedule
// (forward or reverse each hide one direction); they skip themselves under SKV_EMU_SCHEDULE=forward/reverse.
bool random_schedule();

}  // namespace selftest

#define EMU_TEST(name)                                                   \
  static void name();                                                    \
  static const bool name##_registered = ::selftest::add(#name, &name);   \
  static void name()

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) ::selftest::record_failure(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define EXPECT_DEATH(body, ...) ::selftest::expect_death([&] { body; }, {__VA_ARGS__}, __FILE__, __LINE__)
