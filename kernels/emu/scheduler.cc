// Runs one block: every simulated thread is a fiber that runs until it blocks (barrier, warp collective,
// exit). The ready set is drained in a seeded random order by default, so that a thread reading what another
// wrote without a barrier in between usually runs first and sees the 0xFF poison. Barriers and collectives
// check that the threads they wait for arrive at the same call site; anything else aborts with both sites.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "block_state.h"
#include "profile_internal.h"
#include "sanitizer_hooks.h"

namespace skv_emu {

static Schedule schedule_from_env() {
  const char* s = std::getenv("SKV_EMU_SCHEDULE");
  if (!s || !std::strcmp(s, "random")) return Schedule::random;
  if (!std::strcmp(s, "forward")) return Schedule::forward;
  if (!std::strcmp(s, "reverse")) return Schedule::reverse;
  std::fprintf(stderr, "skv_emu: SKV_EMU_SCHEDULE must be random, forward or reverse (got '%s')\n", s);
  std::abort();
}

bool scheduling_is_random() {
  static const bool random = schedule_from_env() == Schedule::random;
  return random;
}

static uint64_t seed_from_env() {
  const char* s = std::getenv("SKV_EMU_SEED");
  return s ? std::strtoull(s, nullptr, 0) : 0x5eed;
}

static uint64_t next_random(uint64_t& x) {  // xorshift64*
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  return x * 0x2545f4914f6cdd1dull;
}

static uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

static unsigned pick_ready(Block& b) {
  unsigned i;
  switch (b.schedule) {
    case Schedule::forward: i = b.ready[b.ready_head++]; break;
    case Schedule::reverse: i = b.ready.back(); b.ready.pop_back(); break;
    default: {
      const unsigned __int128 n = b.ready.size() - b.ready_head;
      const size_t k = b.ready_head + static_cast<size_t>((next_random(b.rng) * n) >> 64);  // uniform in [0, n)
      i = b.ready[k];
      b.ready[k] = b.ready.back();
      b.ready.pop_back();
    }
  }
  if (b.ready_head == b.ready.size()) {
    b.ready.clear();
    b.ready_head = 0;
  }
  return i;
}

static SimThread& thread_in_warp(Block& b, const SimThread& t, int lane) {
  return b.threads[(t.linear & ~31u) + static_cast<unsigned>(lane)];
}

static void describe_wait(const SimThread& o, char* out, size_t n) {
  switch (o.wait) {
    case Wait::barrier: std::snprintf(out, n, "waits at __syncthreads (%s:%d)", o.site.file, o.site.line); break;
    case Wait::warp:
      std::snprintf(out, n, "waits in %s (%s:%d) with mask 0x%08x", o.op, o.site.file, o.site.line, o.mask);
      break;
    case Wait::exited: std::snprintf(out, n, "has exited"); break;
    default: std::snprintf(out, n, "is running"); break;
  }
}

// A lane of t's warp waiting in a collective whose mask names t can never be released if t goes to `op` at
// `site` instead. `ignore`: lanes already checked to wait at the very collective t is entering.
static void check_no_lane_waits_for(const SimThread& t, const char* op, const Site* site, unsigned ignore = 0) {
  Block& b = *t.block;
  const WarpState& w = b.warps[t.linear / 32];
  const unsigned bit = 1u << (t.linear % 32);
  for (unsigned m = w.waiting & ~ignore; m; m &= m - 1) {
    const SimThread& o = thread_in_warp(b, t, __builtin_ctz(m));
    if (o.mask & bit) {
      char id[32], what[256];
      describe_thread(o, id, sizeof id);
      describe_wait(o, what, sizeof what);
      if (site)
        fatal(&t, "%s at %s:%d while lane %u, thread %s, %s naming this lane: warp divergence", op, site->file,
              site->line, o.linear % 32, id, what);
      fatal(&t, "%s while lane %u, thread %s, %s naming this lane: warp divergence", op, o.linear % 32, id, what);
    }
  }
}

void syncthreads(const Site& site) {
  SimThread& t = current("__syncthreads");
  Block& b = *t.block;
  if (b.exited > 0) {
    for (const SimThread& o : b.threads) {
      if (o.wait != Wait::exited) continue;
      char id[32];
      describe_thread(o, id, sizeof id);
      fatal(&t, "__syncthreads at %s:%d, but thread %s has already exited: barrier divergence", site.file,
            site.line, id);
    }
  }
  if (b.at_barrier > 0 && !same_site(site, b.barrier_site)) {
    char id[32];
    describe_thread(b.threads[b.barrier_first], id, sizeof id);
    fatal(&t, "__syncthreads at %s:%d, but thread %s waits at __syncthreads at %s:%d: barrier divergence",
          site.file, site.line, id, b.barrier_site.file, b.barrier_site.line);
  }
  check_no_lane_waits_for(t, "__syncthreads", &site);
  t.wait = Wait::barrier;
  t.site = site;
  b.warps[t.linear / 32].at_barrier |= 1u << (t.linear % 32);
  if (b.at_barrier++ == 0) {
    b.barrier_site = site;
    b.barrier_first = t.linear;
  }
  san::release(&b.barrier_sync);
  t.fiber->yield();
  san::acquire(&b.barrier_sync);
}

void check_shfl_width(const Site& site, const char* op, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fatal(&current(op), "%s at %s:%d: width %d is not a power of two in [1, 32]", op, site.file, site.line, width);
}

void vote_combine(void* const records[32], unsigned mask) {
  unsigned ballot = 0;
  for (unsigned m = mask; m; m &= m - 1) {
    const int lane = __builtin_ctz(m);
    if (static_cast<VoteRecord*>(records[lane])->pred) ballot |= 1u << lane;
  }
  for (unsigned m = mask; m; m &= m - 1) static_cast<VoteRecord*>(records[__builtin_ctz(m)])->ballot = ballot;
}

[[noreturn]] static void report_divergence(const SimThread& t, const Site& site, const char* op, unsigned mask,
                                          const SimThread& o) {
  char id[32], what[256];
  describe_thread(o, id, sizeof id);
  describe_wait(o, what, sizeof what);
  fatal(&t, "%s at %s:%d with mask 0x%08x, but lane %u, thread %s, %s: warp divergence", op, site.file, site.line,
        mask, o.linear % 32, id, what);
}

static void check_collective_mask(SimThread& t, const Site& site, const char* op, unsigned mask) {
  Block& b = *t.block;
  const WarpState& w = b.warps[t.linear / 32];
  const unsigned lane = t.linear % 32;
  if (!(mask >> lane & 1u))
    fatal(&t, "%s at %s:%d: mask 0x%08x does not include the calling lane %u", op, site.file, site.line, mask, lane);
  if (mask & ~w.lanes)
    fatal(&t, "%s at %s:%d: mask 0x%08x names lane %d, which does not exist (the block has %u threads)", op,
          site.file, site.line, mask, __builtin_ctz(mask & ~w.lanes), b.nthreads);
  if (mask & w.exited)
    fatal(&t, "%s at %s:%d: mask 0x%08x names lane %d, which has exited", op, site.file, site.line, mask,
          __builtin_ctz(mask & w.exited));
  // Lanes of the mask are running (they will come), or waiting here; waiting lanes were checked against
  // each other on arrival, so comparing with one of them suffices. Lanes at a barrier can never come.
  const unsigned waiting = mask & w.waiting;
  const unsigned stuck = mask & w.at_barrier;
  if (waiting) {
    const SimThread& o = thread_in_warp(b, t, __builtin_ctz(waiting));
    if (!(o.op == op && o.mask == mask && same_site(o.site, site))) report_divergence(t, site, op, mask, o);
  }
  if (stuck) report_divergence(t, site, op, mask, thread_in_warp(b, t, __builtin_ctz(stuck)));
}

void warp_collective(const Site& site, const char* op, unsigned mask, void* record, CombineFn combine) {
  SimThread& t = current(op);
  Block& b = *t.block;
  WarpState& w = b.warps[t.linear / 32];
  check_collective_mask(t, site, op, mask);
  check_no_lane_waits_for(t, op, &site, mask);  // a lane outside `mask` waiting for this one elsewhere
  t.wait = Wait::warp;
  t.site = site;
  t.op = op;
  t.mask = mask;
  t.record = record;
  t.combine = combine;
  w.waiting |= 1u << (t.linear % 32);
  san::release(&w.sync);
  if ((w.waiting & mask) == mask) {  // the last lane to arrive does the exchange for all
    san::acquire(&w.sync);
    void* records[32] = {};
    for (unsigned m = mask; m; m &= m - 1) {
      const SimThread& o = thread_in_warp(b, t, __builtin_ctz(m));
      // Records of another collective have another layout: never combine them.
      if (!(o.op == op && o.mask == mask && same_site(o.site, site))) report_divergence(t, site, op, mask, o);
      records[__builtin_ctz(m)] = o.record;
    }
    combine(records, mask);
    san::release(&w.sync);
    w.waiting &= ~mask;
    for (unsigned m = mask; m; m &= m - 1) {
      SimThread& o = thread_in_warp(b, t, __builtin_ctz(m));
      o.wait = Wait::running;
      b.ready.push_back(o.linear);
    }
  }
  t.fiber->yield();
  san::acquire(&w.sync);
}

static void thread_exit(SimThread& t) {
  Block& b = *t.block;
  if (b.at_barrier > 0) {
    char id[32];
    describe_thread(b.threads[b.barrier_first], id, sizeof id);
    fatal(&t, "thread exited while %u thread(s), e.g. %s, wait at __syncthreads (%s:%d): barrier divergence",
          b.at_barrier, id, b.barrier_site.file, b.barrier_site.line);
  }
  check_no_lane_waits_for(t, "thread exited", nullptr);
  t.wait = Wait::exited;
  t.cp_pending.clear();
  ++b.exited;
  b.warps[t.linear / 32].exited |= 1u << (t.linear % 32);
  san::release(&b.end_sync);
  t.fiber->yield();
}

// Each fiber runs kernel bodies forever: the scheduler points t_sim at the thread it plays next.
static void fiber_main(void*) {
  for (;;) {
    SimThread& t = *t_sim;
    san::acquire(&t.block->start_sync);
    t.block->spec->invoke(t.block->spec->bound);
    thread_exit(t);
  }
}

Worker& this_worker() {
  thread_local Worker worker;
  thread_local bool ready = false;
  if (!ready) {
    ready = true;
    install_crash_handler(worker);
  }
  return worker;
}

static void setup_block(Worker& w, Block& b, const LaunchSpec& spec, uint64_t linear_idx) {
  b.spec = &spec;
  b.linear_idx = linear_idx;
  b.idx = {static_cast<unsigned>(linear_idx % spec.grid.x),
           static_cast<unsigned>(linear_idx / spec.grid.x % spec.grid.y),
           static_cast<unsigned>(linear_idx / (uint64_t(spec.grid.x) * spec.grid.y))};
  b.nthreads = spec.block.x * spec.block.y * spec.block.z;
  while (w.fibers.size() < b.nthreads)
    w.fibers.push_back(std::make_unique<Fiber>(Fiber::default_stack_bytes(), &fiber_main, nullptr));

  // Exactly the requested size, so AddressSanitizer flags the first byte past the end.
  void* smem = nullptr;
  if (posix_memalign(&smem, 128, spec.smem_bytes ? spec.smem_bytes : 1) != 0)
    fatal_launch(spec, "cannot allocate %zu bytes of shared memory", spec.smem_bytes);
  b.smem = static_cast<unsigned char*>(smem);
  std::memset(b.smem, 0xff, spec.smem_bytes);

  b.threads.resize(b.nthreads);
  b.warps.assign((b.nthreads + 31) / 32, WarpState{});
  for (unsigned i = 0; i < b.nthreads; ++i) {
    SimThread& t = b.threads[i];
    t.lane = LaneContext{{i % spec.block.x, i / spec.block.x % spec.block.y, i / (spec.block.x * spec.block.y)},
                         b.idx, spec.block, spec.grid, b.smem, spec.smem_bytes};
    t.block = &b;
    t.fiber = w.fibers[i].get();
    t.linear = i;
    t.wait = Wait::running;
    t.op = nullptr;
    t.mask = 0;
    t.cp_pending.clear();
    t.cp_committed = 0;
    b.warps[i / 32].lanes |= 1u << (i % 32);
    if (san::tsan_active()) {
      std::snprintf(t.name, sizeof t.name, "block (%u,%u,%u) thread (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z,
                    t.lane.thread_idx.x, t.lane.thread_idx.y, t.lane.thread_idx.z);
      t.fiber->set_name(t.name);
    }
  }
  static const Schedule schedule = schedule_from_env();
  static const uint64_t seed = seed_from_env();
  b.schedule = schedule;
  b.rng = mix(mix(seed, linear_idx), b.nthreads) | 1;
  b.ready.clear();
  b.ready_head = 0;
  for (unsigned i = 0; i < b.nthreads; ++i) b.ready.push_back(i);
  b.at_barrier = 0;
  b.exited = 0;
}

static void report_stall(Block& b) {
  // Nothing can run, yet not everyone exited and no barrier is complete: name a blocked thread and whom
  // it waits for.
  for (SimThread& t : b.threads) {
    if (t.wait != Wait::warp) continue;
    for (unsigned m = t.mask; m; m &= m - 1) {
      const SimThread& o = thread_in_warp(b, t, __builtin_ctz(m));
      if (o.wait == Wait::warp && o.op == t.op && same_site(o.site, t.site)) continue;
      char id[32], what[256];
      describe_thread(o, id, sizeof id);
      describe_wait(o, what, sizeof what);
      fatal(&t, "deadlock: waits in %s (%s:%d) with mask 0x%08x, but lane %u, thread %s, %s", t.op, t.site.file,
            t.site.line, t.mask, o.linear % 32, id, what);
    }
  }
  fatal(&b.threads[0], "deadlock: %u thread(s) at __syncthreads, %u exited, of %u", b.at_barrier, b.exited,
        b.nthreads);
}

void run_block(Worker& w, const LaunchSpec& spec, uint64_t linear_idx) {
  Block& b = w.block;
  setup_block(w, b, spec, linear_idx);
  const bool counting = profile::detail::counting();
  if (counting) profile::detail::block_begin(b);
  san::release(&b.start_sync);
  for (;;) {
    while (b.ready_head < b.ready.size()) {
      SimThread& t = b.threads[pick_ready(b)];
      t_sim = &t;
      t_lane = &t.lane;
      t.fiber->resume();
    }
    t_sim = nullptr;
    t_lane = nullptr;
    if (b.exited == b.nthreads) break;
    if (b.at_barrier != b.nthreads) report_stall(b);
    if (counting) profile::detail::barrier_done(b);
    b.at_barrier = 0;
    for (WarpState& w : b.warps) w.at_barrier = 0;
    for (SimThread& t : b.threads) {
      t.wait = Wait::running;
      b.ready.push_back(t.linear);
    }
  }
  san::acquire(&b.end_sync);
  if (counting) profile::detail::block_end(b);
  std::free(b.smem);
  b.smem = nullptr;
}

}  // namespace skv_emu
