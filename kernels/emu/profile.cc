// The cost counters (emu_profile.h): the access hooks the instrumented kernels call, the grouping of lanes
// into warp instructions, and the sector / bank arithmetic.
#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include "profile_internal.h"

namespace skv_emu::profile {
namespace detail {

std::atomic<bool> g_any_counting{false};
std::atomic<pthread_t> g_counting_thread{};

namespace {

constexpr int kSectorBytes = 32, kBanks = 32, kWavefrontBytes = 128;
// Pending warp instructions per warp before they are finished as partial requests (bounds the memory of long
// loops without barriers, where one lane runs far ahead of the others or lanes diverge).
constexpr size_t kMaxPending = 4096;

enum Kind : uint8_t { global_load, global_store, shared_load, shared_store };

struct Pending {
  uint32_t lanes = 0;  // which lanes contributed
  uint8_t size = 0;
  uint64_t addr[32];
};

struct Key {
  uintptr_t site;  // call site * 4 + kind
  uint32_t seq;
  bool operator==(const Key& o) const { return site == o.site && seq == o.seq; }
};
struct KeyHash {
  size_t operator()(const Key& k) const { return std::hash<uintptr_t>()(k.site * 0x9e3779b97f4a7c15ull ^ k.seq); }
};

// Distinct sectors per 4 KiB page, for the compulsory DRAM traffic, kept per allocation: a sampled grid's
// footprint is scaled up allocation by allocation, and never past the allocation's size (blocks of a GEMM
// share their operand panels, so the sample's footprint does not grow linearly with the grid).
using Footprint = std::unordered_map<uint64_t, std::array<uint64_t, 2>>;
struct AllocationFootprint {
  size_t bytes = 0;
  Footprint reads, writes;
};

// g++ may split one CUDA vector access (a float4 load, a 64-bit store) into several scalar ones; nvcc keeps it
// whole. A thread's access that continues its previous one (same kind, the next bytes, within one aligned 16-byte
// window) is therefore merged into it before lanes are grouped.
struct OpenAccess {
  uintptr_t site = 0, addr = 0;
  Kind kind = global_load;
  int size = 0;  // 0: none open
};

struct State {
  std::mutex owner_mutex;
  uint64_t sample_blocks = 0;
  std::vector<Launch> done;
  Launch current;
  std::unordered_map<const void*, std::string> kernel_names;
  std::vector<std::unordered_map<Key, Pending, KeyHash>> warps;
  std::vector<std::unordered_map<uintptr_t, uint32_t>> lane_seq;
  std::vector<OpenAccess> open;  // per thread: its latest access, still growing
  std::unordered_map<uintptr_t, AllocationFootprint> footprints;  // by allocation start
  std::mutex globals_mutex;
  std::map<uintptr_t, size_t> globals;  // start -> bytes
};

State& state() {
  static State* s = new State;  // never destroyed: hooks may run during static destruction
  return *s;
}

// The device allocation holding address a: {start, bytes}, or {0, 0}.
std::pair<uintptr_t, size_t> allocation_of(uintptr_t a) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.globals_mutex);
  auto it = s.globals.upper_bound(a);
  if (it == s.globals.begin()) return {0, 0};
  --it;
  if (a - it->first >= it->second) return {0, 0};
  return {it->first, it->second};
}

void mark(Footprint& f, uint64_t first_sector, uint64_t last_sector) {
  for (uint64_t sec = first_sector; sec <= last_sector; ++sec) {
    auto& bits = f[sec >> 7];
    bits[(sec >> 6) & 1] |= uint64_t(1) << (sec & 63);
  }
}

double footprint_bytes(const Footprint& f) {
  uint64_t n = 0;
  for (const auto& [page, bits] : f) n += __builtin_popcountll(bits[0]) + __builtin_popcountll(bits[1]);
  return static_cast<double>(n * kSectorBytes);
}

void finish_global(const Pending& p, bool store) {
  State& s = state();
  Counters& c = s.current.counters;
  uint64_t sectors[64];
  int n = 0, lanes = 0;
  for (uint32_t m = p.lanes; m; m &= m - 1) {
    const uint64_t a = p.addr[__builtin_ctz(m)];
    const uint64_t first = a / kSectorBytes, last = (a + p.size - 1) / kSectorBytes;
    for (uint64_t sec = first; sec <= last && n < 64; ++sec) sectors[n++] = sec;
    ++lanes;
  }
  std::sort(sectors, sectors + n);
  const uint64_t distinct = static_cast<uint64_t>(std::unique(sectors, sectors + n) - sectors);
  (store ? c.global_store_requests : c.global_load_requests) += 1;
  (store ? c.global_store_sectors : c.global_load_sectors) += distinct;
  (store ? c.global_store_bytes : c.global_load_bytes) += static_cast<uint64_t>(lanes) * p.size;
}

// Wavefronts of one pass over the banks: the most distinct 4-byte words any bank must deliver (lanes reading the
// same word share it).
uint64_t bank_passes(const uint64_t* offsets, int count, int size) {
  uint32_t words[kBanks][32];
  int used[kBanks] = {};
  int worst = 0;
  for (int i = 0; i < count; ++i) {
    for (uint64_t w = offsets[i] / 4; w <= (offsets[i] + size - 1) / 4; ++w) {
      const int bank = static_cast<int>(w % kBanks);
      bool seen = false;
      for (int j = 0; j < used[bank] && !seen; ++j) seen = words[bank][j] == w;
      if (!seen && used[bank] < 32) words[bank][used[bank]++] = static_cast<uint32_t>(w);
      worst = std::max(worst, used[bank]);
    }
  }
  return static_cast<uint64_t>(std::max(worst, 1));
}

void finish_shared(const Pending& p, bool store, const unsigned char* smem) {
  Counters& c = state().current.counters;
  // Lanes are served in phases of 128 bytes: 32 lanes of <= 4 bytes, 16 of 8, 8 of 16.
  const int phase_lanes = p.size <= 4 ? 32 : std::max(1, kWavefrontBytes / p.size);
  uint64_t wavefronts = 0, ideal = 0;
  for (int phase = 0; phase * phase_lanes < 32; ++phase) {
    uint64_t offsets[32];
    int n = 0;
    for (int lane = phase * phase_lanes; lane < std::min(32, (phase + 1) * phase_lanes); ++lane)
      if (p.lanes >> lane & 1u) offsets[n++] = p.addr[lane] - reinterpret_cast<uintptr_t>(smem);
    if (n == 0) continue;
    wavefronts += bank_passes(offsets, n, p.size);
    ideal += 1;
  }
  (store ? c.shared_store_requests : c.shared_load_requests) += 1;
  (store ? c.shared_store_wavefronts : c.shared_load_wavefronts) += wavefronts;
  (store ? c.shared_store_ideal : c.shared_load_ideal) += ideal;
}

void finish(const Key& k, const Pending& p, const Block& b) {
  switch (static_cast<Kind>(k.site & 3)) {
    case global_load: finish_global(p, false); break;
    case global_store: finish_global(p, true); break;
    case shared_load: finish_shared(p, false, b.smem); break;
    case shared_store: finish_shared(p, true, b.smem); break;
  }
}

void record(const SimThread& t, uintptr_t site, Kind kind, uintptr_t addr, int size);

void close_access(const SimThread& t) {
  OpenAccess& o = state().open[t.linear];
  if (o.size == 0) return;
  const OpenAccess done = o;
  o.size = 0;
  record(t, done.site, done.kind, done.addr, done.size);
}

void flush(const Block& b) {
  State& s = state();
  for (const SimThread& t : b.threads) close_access(t);
  for (auto& warp : s.warps) {
    for (const auto& [key, pending] : warp) finish(key, pending, b);
    warp.clear();
  }
  for (auto& seq : s.lane_seq) seq.clear();
}

void record(const SimThread& t, uintptr_t site, Kind kind, uintptr_t addr, int size) {
  State& s = state();
  if (kind == global_load || kind == global_store) {
    const auto [start, bytes] = allocation_of(addr);
    AllocationFootprint& f = s.footprints[start];
    f.bytes = bytes;
    mark(kind == global_store ? f.writes : f.reads, addr / kSectorBytes, (addr + size - 1) / kSectorBytes);
  }
  const unsigned lane = t.linear % 32, warp_index = t.linear / 32;
  const uintptr_t tagged = site * 4 + kind;
  const Key key{tagged, s.lane_seq[t.linear][tagged]++};
  auto& warp = s.warps[warp_index];
  Pending& p = warp[key];
  p.lanes |= 1u << lane;
  p.size = static_cast<uint8_t>(size);
  p.addr[lane] = addr;
  const WarpState& ws = t.block->warps[warp_index];
  if (p.lanes == (ws.lanes & ~ws.exited)) {
    finish(key, p, *t.block);
    warp.erase(key);
  } else if (warp.size() > kMaxPending) {
    // Lanes that never reach these instructions before the next barrier (divergence) would hold them forever:
    // finish them as the partial requests they are.
    for (const auto& [k, pending] : warp) finish(k, pending, *t.block);
    warp.clear();
  }
}

// A thread's access: merged into its open one when it continues it, else the open one is recorded and this opens.
void note_access(const SimThread& t, uintptr_t site, Kind kind, uintptr_t addr, int size) {
  OpenAccess& o = state().open[t.linear];
  if (o.size > 0 && o.kind == kind && addr == o.addr + o.size && o.addr / 16 == (addr + size - 1) / 16) {
    o.size += size;
    return;
  }
  close_access(t);
  o = OpenAccess{site, addr, kind, size};
}

}  // namespace

void access(uintptr_t site, const void* ptr, int size, bool store) {
  const SimThread* t = t_sim;
  if (!t) return;  // host code (a launcher) touching memory
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t smem = reinterpret_cast<uintptr_t>(t->lane.smem);
  if (a - smem < t->lane.smem_bytes) note_access(*t, site, store ? shared_store : shared_load, a, size);
  else if (allocation_of(a).second) note_access(*t, site, store ? global_store : global_load, a, size);
}

void launch_begin(const LaunchSpec& spec) {
  State& s = state();
  s.current = Launch{};
  // The symbol lookup runs addr2line: once per kernel.
  auto named = s.kernel_names.find(spec.kernel_id);
  if (named == s.kernel_names.end()) {
    std::string name = kernel_function_name(spec.kernel_id);
    named = s.kernel_names.emplace(spec.kernel_id, name.empty() ? std::string(spec.kernel_name) : name).first;
  }
  s.current.kernel = named->second;
  s.current.grid[0] = spec.grid.x, s.current.grid[1] = spec.grid.y, s.current.grid[2] = spec.grid.z;
  s.current.block[0] = spec.block.x, s.current.block[1] = spec.block.y, s.current.block[2] = spec.block.z;
  s.current.smem_bytes = spec.smem_bytes;
  s.current.simt_flops = take_declared_simt_flops();
  s.footprints.clear();
}

uint64_t sample_blocks() { return state().sample_blocks; }

void launch_end(uint64_t blocks_run) {
  State& s = state();
  Counters& c = s.current.counters;
  s.current.blocks_run = blocks_run;
  const uint64_t grid = uint64_t(s.current.grid[0]) * s.current.grid[1] * s.current.grid[2];
  const double scale_up = static_cast<double>(grid) / static_cast<double>(blocks_run);
  for (const auto& [start, f] : s.footprints) {
    const double cap = static_cast<double>((f.bytes + kSectorBytes - 1) / kSectorBytes * kSectorBytes);
    c.dram_read_bytes += static_cast<uint64_t>(std::min(cap, footprint_bytes(f.reads) * scale_up));
    c.dram_write_bytes += static_cast<uint64_t>(std::min(cap, footprint_bytes(f.writes) * scale_up));
  }
  s.footprints.clear();
  if (blocks_run < grid) {  // a sample: scale every count to the whole grid
    const auto scale = [&](uint64_t& v) { v = static_cast<uint64_t>(static_cast<double>(v) * grid / blocks_run + 0.5); };
    for (uint64_t* v : {&c.global_load_requests, &c.global_load_sectors, &c.global_load_bytes, &c.global_store_requests,
                        &c.global_store_sectors, &c.global_store_bytes,
                        &c.shared_load_requests, &c.shared_load_wavefronts, &c.shared_load_ideal,
                        &c.shared_store_requests, &c.shared_store_wavefronts, &c.shared_store_ideal, &c.tensor_flops,
                        &c.barriers, &c.blocks})
      scale(*v);
  }
  s.done.push_back(std::move(s.current));
}

void block_begin(const Block& b) {
  State& s = state();
  s.warps.assign(b.warps.size(), {});
  s.lane_seq.assign(b.nthreads, {});
  s.open.assign(b.nthreads, {});
  s.current.counters.blocks += 1;
}

void barrier_done(const Block& b) {
  flush(b);
  state().current.counters.barriers += 1;
}

void block_end(const Block& b) { flush(b); }

void mma() { state().current.counters.tensor_flops += 2 * 16 * 8 * 16; }

void ldmatrix(const unsigned char* const rows[], int matrices) {
  const SimThread* t = t_sim;
  Counters& c = state().current.counters;
  c.shared_load_requests += 1;
  c.shared_load_ideal += static_cast<uint64_t>(matrices);
  for (int m = 0; m < matrices; ++m) {
    uint64_t offsets[8];
    for (int r = 0; r < 8; ++r) offsets[r] = rows[m * 8 + r] - t->lane.smem;
    c.shared_load_wavefronts += bank_passes(offsets, 8, 16);
  }
}

void cp_async(const void* site, const void* smem_dst, const void* gmem_src, int src_bytes) {
  const SimThread& t = *t_sim;
  const uintptr_t s = reinterpret_cast<uintptr_t>(site);
  if (src_bytes > 0 && allocation_of(reinterpret_cast<uintptr_t>(gmem_src)).second)
    record(t, s, global_load, reinterpret_cast<uintptr_t>(gmem_src), src_bytes);
  record(t, s, shared_store, reinterpret_cast<uintptr_t>(smem_dst), 16);
}

}  // namespace detail

bool available() {
#if defined(SKV_EMU_PROFILE)
  return true;
#else
  return false;
#endif
}

bool start(uint64_t sample_blocks) {
  detail::State& s = detail::state();
  std::lock_guard<std::mutex> lock(s.owner_mutex);
  if (detail::g_any_counting.load() && !pthread_equal(detail::g_counting_thread.load(), pthread_self())) return false;
  s.sample_blocks = sample_blocks == 1 ? 2 : sample_blocks;  // the first and the last block at least
  detail::g_counting_thread.store(pthread_self());
  detail::g_any_counting.store(true);
  return true;
}

void stop() {
  detail::State& s = detail::state();
  std::lock_guard<std::mutex> lock(s.owner_mutex);
  detail::g_any_counting.store(false);
}

std::vector<Launch> take() {
  std::vector<Launch> out;
  out.swap(detail::state().done);
  return out;
}

void register_global(const void* ptr, size_t bytes) {
  detail::State& s = detail::state();
  std::lock_guard<std::mutex> lock(s.globals_mutex);
  s.globals[reinterpret_cast<uintptr_t>(ptr)] = bytes;
}

void unregister_global(const void* ptr) {
  detail::State& s = detail::state();
  std::lock_guard<std::mutex> lock(s.globals_mutex);
  s.globals.erase(reinterpret_cast<uintptr_t>(ptr));
}

}  // namespace skv_emu::profile

#if defined(SKV_EMU_PROFILE)
// The instrumentation's callbacks (GCC -fsanitize=kernel-address with
// --param asan-instrumentation-with-call-threshold=0): one per load and store of the kernels.
#define SKV_EMU_ACCESS_HOOK(name, size, store)                                                               \
  extern "C" void name(void* p) {                                                                            \
    if (skv_emu::profile::detail::counting())                                                                \
      skv_emu::profile::detail::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p, size, store); \
  }
SKV_EMU_ACCESS_HOOK(__asan_load1_noabort, 1, false)
SKV_EMU_ACCESS_HOOK(__asan_load2_noabort, 2, false)
SKV_EMU_ACCESS_HOOK(__asan_load4_noabort, 4, false)
SKV_EMU_ACCESS_HOOK(__asan_load8_noabort, 8, false)
SKV_EMU_ACCESS_HOOK(__asan_load16_noabort, 16, false)
SKV_EMU_ACCESS_HOOK(__asan_store1_noabort, 1, true)
SKV_EMU_ACCESS_HOOK(__asan_store2_noabort, 2, true)
SKV_EMU_ACCESS_HOOK(__asan_store4_noabort, 4, true)
SKV_EMU_ACCESS_HOOK(__asan_store8_noabort, 8, true)
SKV_EMU_ACCESS_HOOK(__asan_store16_noabort, 16, true)
#undef SKV_EMU_ACCESS_HOOK
extern "C" void __asan_loadN_noabort(void* p, size_t size) {
  if (skv_emu::profile::detail::counting())
    skv_emu::profile::detail::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p,
                                     static_cast<int>(std::min<size_t>(size, 128)), false);
}
extern "C" void __asan_storeN_noabort(void* p, size_t size) {
  if (skv_emu::profile::detail::counting())
    skv_emu::profile::detail::access(reinterpret_cast<uintptr_t>(__builtin_return_address(0)), p,
                                     static_cast<int>(std::min<size_t>(size, 128)), true);
}
// The rest of the instrumentation's interface has nothing to do here.
extern "C" void __asan_handle_no_return() {}
extern "C" void __asan_before_dynamic_init(const char*) {}
extern "C" void __asan_after_dynamic_init() {}
#endif
