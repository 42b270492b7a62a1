// A CPU emulation of CUDA blocks and threads, so the lorafuse kernels (cuda/**/*.cuh) and their launch
// plans run and are checked on machines without a GPU. Each block's threads are cooperative fibers
// (ucontext) on one OS thread; __syncthreads and warp shuffles are real barriers among them, so a kernel
// that reads shared memory before the barrier that publishes it, or diverges around a barrier, fails here
// too (a deadlock is reported, not hung). What it cannot show: timing, the memory model of a real GPU,
// and anything about the cuBLAS calls. Include this header before any lorafuse CUDA header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace lorafuse_emu {

struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx{};
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
};

struct Block {
  ucontext_t scheduler{};
  std::vector<Fiber> fibers;
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> shuffle;
  std::vector<unsigned char> dynamic_smem;
  Fiber* current = nullptr;
  uint64_t events = 0;  // arrivals + releases + exits: a scheduler pass without any is a deadlock
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline uint3 g_thread_idx{0, 0, 0};
inline uint3 g_block_idx{0, 0, 0};
inline uint64_t g_launches = 0;

inline void yield_to_scheduler() { swapcontext(&g_block->current->ctx, &g_block->scheduler); }

inline void release(Barrier& b) {
  b.arrived = 0;
  ++b.generation;
  ++g_block->events;
}

inline void wait(Barrier& b) {
  const uint64_t gen = b.generation;
  ++g_block->events;
  if (++b.arrived == b.expected) {
    release(b);
    return;
  }
  while (b.generation == gen) yield_to_scheduler();
}

// An exited thread no longer counts at later barriers (as on sm_70+).
inline void drop(Barrier& b) {
  --b.expected;
  if (b.expected > 0 && b.arrived == b.expected) release(b);
}

inline void fiber_main() {
  Fiber* f = g_block->current;
  g_block->body();
  f->done = true;
  ++g_block->events;
  drop(g_block->all);
  drop(g_block->warps[f->tid / 32]);
}  // returns to the scheduler through uc_link

inline float* dynamic_smem() { return reinterpret_cast<float*>(g_block->dynamic_smem.data()); }

// Runs kernel(params) on every block of grid, block after block, `threads` fibers each.
template <typename P>
void launch(void (*kernel)(P), dim3 grid, unsigned threads, size_t smem_bytes, const P& params) {
  if (threads == 0 || threads % 32 != 0 || threads > 1024) throw std::invalid_argument("emulator: bad block size");
  ++g_launches;
  Block block;
  block.body = [&] { kernel(params); };
  block.fibers.resize(threads);
  for (auto& f : block.fibers) f.stack.resize(256 * 1024);
  g_block = &block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        block.all = Barrier{threads, 0, 0};
        block.warps.assign(threads / 32, Barrier{32, 0, 0});
        block.shuffle.assign(threads, 0.f);
        block.dynamic_smem.assign(smem_bytes, 0xFF);  // NaN pattern: reads before writes show up
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.tid = t;
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &block.scheduler;
          makecontext(&f.ctx, fiber_main, 0);
        }
        for (;;) {
          bool all_done = true;
          const uint64_t before = block.events;
          for (auto& f : block.fibers) {
            if (f.done) continue;
            all_done = false;
            block.current = &f;
            g_thread_idx = uint3{f.tid, 0, 0};
            swapcontext(&block.scheduler, &f.ctx);
          }
          if (all_done) break;
          if (block.events == before) {
            g_block = nullptr;
            throw std::runtime_error("emulator: deadlock in block (" + std::to_string(x) + "," + std::to_string(y) +
                                     "): threads wait at a barrier that others never reach");
          }
        }
      }
  g_block = nullptr;
}

// The Launcher of cuda/lora_linear/lora_linear_launch.cuh.
struct Launcher {
  template <typename P>
  void operator()(void (*kernel)(P), dim3 grid, unsigned threads, size_t smem, const P& params) const {
    launch(kernel, grid, threads, smem, params);
  }
};

}  // namespace lorafuse_emu

inline void __syncthreads() { lorafuse_emu::wait(lorafuse_emu::g_block->all); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  auto& b = *lorafuse_emu::g_block;
  const unsigned tid = lorafuse_emu::g_thread_idx.x;
  b.shuffle[tid] = v;
  lorafuse_emu::wait(b.warps[tid / 32]);
  const float r = b.shuffle[(tid & ~31u) | ((tid & 31u) ^ static_cast<unsigned>(lane_mask))];
  lorafuse_emu::wait(b.warps[tid / 32]);  // nobody overwrites the slots before all lanes read
  return r;
}

#define threadIdx (::lorafuse_emu::g_thread_idx)
#define blockIdx (::lorafuse_emu::g_block_idx)
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define LORAFUSE_DYNAMIC_SMEM(NAME) float* NAME = ::lorafuse_emu::dynamic_smem()
