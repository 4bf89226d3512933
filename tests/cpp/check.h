// A minimal test harness for the C++ tests, so that they need no framework to download or install (CI machines
// start bare and the build must not touch the network). FT_TEST(name) registers a test; FT_CHECK* record a
// failure with file:line and carry on; run_tests() runs the tests whose names contain a filter and returns the
// process exit status (0: all passed, 1: a check failed, 77: nothing ran, which ctest reports as skipped).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace ft_test {

struct TestCase {
  const char* name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Counters {
  long checks = 0;
  long failures = 0;
  int reported = 0;  // failures printed in the current test; the rest are only counted
};
inline Counters& counters() {
  static Counters c;
  return c;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

// Prints at most a few failures per test: a kernel that is wrong everywhere would otherwise print millions.
inline void record(bool ok, const char* file, int line, const std::string& what) {
  Counters& c = counters();
  ++c.checks;
  if (ok) return;
  ++c.failures;
  if (++c.reported <= 10) std::printf("  FAIL %s:%d: %s\n", file, line, what.c_str());
  if (c.reported == 10) std::printf("  (further failures of this test are counted, not printed)\n");
}

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream s;
  s.precision(17);
  (s << ... << args);
  return s.str();
}

// Runs every registered test whose name contains `filter` ("" runs all).
inline int run_tests(const std::string& filter) {
  int ran = 0;
  long failed_tests = 0;
  for (const TestCase& t : registry()) {
    if (!filter.empty() && std::string(t.name).find(filter) == std::string::npos) continue;
    ++ran;
    const long before = counters().failures;
    counters().reported = 0;
    try {
      t.body();
    } catch (const std::exception& e) {
      record(false, __FILE__, __LINE__, concat("unexpected exception: ", e.what()));
    }
    const bool ok = counters().failures == before;
    failed_tests += ok ? 0 : 1;
    std::printf("%s %s\n", ok ? "[ pass ]" : "[ FAIL ]", t.name);
  }
  std::printf("%d tests, %ld checks, %ld failed tests\n", ran, counters().checks, failed_tests);
  if (ran == 0) return 77;
  return failed_tests == 0 ? 0 : 1;
}

}  // namespace ft_test

#define FT_CONCAT_(a, b) a##b
#define FT_CONCAT(a, b) FT_CONCAT_(a, b)
#define FT_TEST(name)                                                                  \
  static void FT_CONCAT(ft_test_body_, name)();                                       \
  static const ::ft_test::Registrar FT_CONCAT(ft_test_registrar_, name){              \
      #name, &FT_CONCAT(ft_test_body_, name)};                                         \
  static void FT_CONCAT(ft_test_body_, name)()

#define FT_CHECK(cond) ::ft_test::record(static_cast<bool>(cond), __FILE__, __LINE__, #cond)

#define FT_CHECK_MSG(cond, ...) \
  ::ft_test::record(static_cast<bool>(cond), __FILE__, __LINE__, ::ft_test::concat(#cond, ": ", __VA_ARGS__))

// |actual - expected| <= atol + rtol·|expected|, with both values in the message.
#define FT_CHECK_CLOSE(actual, expected, rtol, atol)                                                              \
  do {                                                                                                            \
    const double ft_a_ = static_cast<double>(actual), ft_e_ = static_cast<double>(expected);                      \
    ::ft_test::record(std::fabs(ft_a_ - ft_e_) <= (atol) + (rtol) * std::fabs(ft_e_), __FILE__, __LINE__,        \
                      ::ft_test::concat(#actual, " = ", ft_a_, ", expected ", ft_e_, " (rtol ", (rtol), ", atol ", \
                                        (atol), ")"));                                                            \
  } while (0)

// Expects `stmt` to throw an exception whose message contains `needle`.
#define FT_CHECK_THROWS(stmt, needle)                                                                     \
  do {                                                                                                    \
    std::string ft_msg_;                                                                                  \
    bool ft_threw_ = false;                                                                               \
    try {                                                                                                 \
      stmt;                                                                                               \
    } catch (const std::exception& e) {                                                                   \
      ft_threw_ = true;                                                                                   \
      ft_msg_ = e.what();                                                                                 \
    }                                                                                                     \
    ::ft_test::record(ft_threw_ && ft_msg_.find(needle) != std::string::npos, __FILE__, __LINE__,         \
                      ::ft_test::concat(#stmt, " should throw \"", needle, "\"; ",                        \
                                        ft_threw_ ? "threw: " + ft_msg_.substr(0, 300) : "did not throw")); \
  } while (0)
