// The CPU thread pool and the engine queue under concurrency, for ThreadSanitizer (npm run test:tsan builds it with
// -fsanitize=thread and runs it; `npm test` runs it plain). Every check is also a correctness check, so the plain
// run can fail too:
// - ThreadPool::parallel_for: many rounds of every (n, grain) shape writing disjoint slots, a chunk that throws
//   (rethrown once, after all chunks), and a pool driven by two threads in turn.
// - EngineCore: the JS thread's part (allocate, enqueue, release tensors, trim the cache, completions, markers)
//   against the queue thread running ops that read and write those buffers, with blocks recycled while queued work
//   still holds them; shutdown with work queued.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "../../csrc/engine_core.h"
#include "../../kernels/cpu/thread_pool.h"

using namespace scalekv;

namespace {

using skv_check::checks;
using skv_check::expect;
using skv_check::failures;

void thread_pool_rounds(std::mt19937& rng) {
  cpu::ThreadPool pool(4);
  for (int round = 0; round < 300; ++round) {
    const int64_t n = std::uniform_int_distribution<int64_t>(0, 5000)(rng);
    const int64_t grain = std::uniform_int_distribution<int64_t>(1, 64)(rng);
    std::vector<int> hits(size_t(n), 0);
    pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[size_t(i)] += 1;
    });
    bool once = true;
    for (int h : hits) once = once && h == 1;
    expect(once, "parallel_for round " + std::to_string(round) + ": every index once (n " + std::to_string(n) + ")");
  }
  // A throwing chunk: its exception comes back, the chunks not yet started are skipped, and none is still running
  // (or starts) once parallel_for has returned; no index runs twice.
  std::vector<std::atomic<int>> visits(1000);
  bool caught = false;
  try {
    pool.parallel_for(1000, 10, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) visits[size_t(i)].fetch_add(1);
      if (b <= 500 && 500 < e) throw std::runtime_error("index 500");
    });
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "index 500";
  }
  auto total = [&] {
    int sum = 0, most = 0;
    for (auto& v : visits) sum += v.load(), most = std::max(most, v.load());
    return std::make_pair(sum, most);
  };
  const auto at_return = total();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  expect(caught && at_return.second == 1 && visits[500].load() == 1 && total() == at_return,
         "a throwing chunk is rethrown; nothing runs twice or after the return");
  // Driven from two threads in turn (the engine queue thread and a JS thread never overlap on one pool).
  std::mutex turn;
  std::vector<int64_t> sums(2, 0);
  auto driver = [&](int who) {
    for (int r = 0; r < 50; ++r) {
      std::lock_guard<std::mutex> lock(turn);
      std::atomic<int64_t> sum{0};
      pool.parallel_for(777, 7, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) sum.fetch_add(i);
      });
      sums[size_t(who)] += sum.load();
    }
  };
  std::thread a(driver, 0), b(driver, 1);
  a.join();
  b.join();
  expect(sums[0] == 50 * 776 * 777 / 2 && sums[1] == sums[0], "two threads taking turns on one pool");
}

void engine_queue(std::mt19937& rng) {
  auto core = EngineCore::create(make_cpu_backend(2));
  // Live buffers: each holds one int64 counter that queued ops increment; the JS-side mirror says what it must hold.
  struct Live {
    std::shared_ptr<Buffer> buffer;
    int64_t expected;
  };
  std::vector<Live> live;
  std::atomic<int> markers{0}, completions{0};
  std::atomic<int> wrong{0};
  for (int step = 0; step < 3000; ++step) {
    const int action = std::uniform_int_distribution<int>(0, 9)(rng);
    if (action < 3 || live.empty()) {
      const size_t bytes = size_t(std::uniform_int_distribution<int>(8, 4096)(rng)) / 8 * 8;
      auto buffer = core->allocate(bytes, Category::scratch);
      core->enqueue([buffer](Backend& b) { b.fill_u8(buffer->data(), 0, buffer->bytes()); }, {buffer}, "fill");
      live.push_back({buffer, 0});
    } else if (action < 7) {
      Live& l = live[size_t(std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng))];
      auto buffer = l.buffer;
      core->enqueue([buffer](Backend&) { ++*static_cast<int64_t*>(buffer->data()); }, {buffer}, "increment");
      ++l.expected;
    } else if (action < 9) {
      // Released while an increment may still be queued: the block must not be reused before that has run.
      const size_t i = std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng);
      auto buffer = live[i].buffer;
      const int64_t expected = live[i].expected;
      core->enqueue([buffer, expected, &wrong](Backend&) {
        if (*static_cast<int64_t*>(buffer->data()) != expected) wrong.fetch_add(1);
      }, {buffer}, "check");
      buffer->release();  // as the JS dispose does: the block is cached at once, reused in queue order
      live.erase(live.begin() + std::ptrdiff_t(i));
      if (step % 7 == 0) core->trim_cache();
    } else if (step % 2) {
      core->enqueue_marker([&markers] { markers.fetch_add(1); });
    } else {
      std::promise<void> done;
      core->enqueue_completion([] {}, [&](std::optional<QueuedError> e) {
        if (!e) completions.fetch_add(1);
        done.set_value();
      });
      done.get_future().wait();
    }
  }
  std::promise<void> drained;
  core->enqueue_completion([] {}, [&](std::optional<QueuedError>) { drained.set_value(); });
  drained.get_future().wait();
  expect(wrong.load() == 0, "every buffer held its own count when released (" + std::to_string(wrong.load()) + " wrong)");
  expect(completions.load() > 0 && markers.load() > 0, "completions and markers ran");
  // Shut down with work queued: it drains, nothing runs after the backend is gone.
  for (int i = 0; i < 200; ++i) {
    auto buffer = core->allocate(64, Category::scratch);
    core->enqueue([buffer](Backend& b) { b.fill_u8(buffer->data(), 1, 64); }, {buffer}, "late");
  }
  live.clear();
  core->shutdown();
  core.reset();
  expect(true, "shutdown with 200 ops queued");
}

}  // namespace

int main() {
  skv_check::program = "concurrency_check";
  const unsigned seed = std::random_device{}();
  std::mt19937 rng(seed);
  thread_pool_rounds(rng);
  engine_queue(rng);
  if (failures) {
    std::fprintf(stderr, "concurrency_check: %d of %d checks failed (seed %u)\n", failures, checks, seed);
    return 1;
  }
  std::printf("concurrency_check: %d checks passed (seed %u)\n", checks, seed);
  return 0;
}
