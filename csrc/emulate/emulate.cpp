// The fiber scheduler and the PTX primitives of the CPU emulation (see emulate.h for the model).
//
// Each primitive is written from the PTX ISA's description of the instruction (section "Warp Level
// Matrix Fragments for mma.m16n8k16" and "ldmatrix"); tests/test_primitives.cu checks them against
// an independent statement of the same layouts (CuTe's thread-value layouts) on random data.
#ifndef FASTATTN_EMULATE
#define FASTATTN_EMULATE 1
#endif
#include "emulate.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <memory>
#include <random>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FA_EMU_ASAN 1
#endif
#endif

#ifdef FA_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Fiber switching. On x86-64 a hand-written switch saves the callee-saved registers and the FP
// control words on the old stack and swaps stack pointers: no system call, unlike swapcontext(),
// which also saves the signal mask (two rt_sigprocmask calls per switch) and dominated the run
// time of mma-heavy kernels (33 switches per warp-wide mma). Elsewhere, ucontext.
#if defined(__x86_64__) && !defined(FA_EMU_USE_UCONTEXT)
#define FA_EMU_ASM_SWITCH 1
extern "C" void fa_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl fa_emu_switch
    .type fa_emu_switch,@function
fa_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fa_emu_switch,.-fa_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace fa_emu {
namespace {

// AddressSanitizer must be told about every stack switch, or it reports false stack errors.
inline void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#ifdef FA_EMU_ASAN
    __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
    (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
inline void asan_finish_switch(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#ifdef FA_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
    (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

enum class State { runnable, at_barrier, at_warp, done };
enum class Op { none, mma, ldmatrix, shfl, syncwarp };

const char* op_name(Op op) {
    switch (op) {
        case Op::mma: return "mma.m16n8k16";
        case Op::ldmatrix: return "ldmatrix";
        case Op::shfl: return "shfl.sync";
        case Op::syncwarp: return "__syncwarp";
        default: return "?";
    }
}

struct CpOp {
    void* dst;
    int bytes;
    unsigned char data[16];
};

// One fiber stack: mmap'ed, with a PROT_NONE guard page below it so an overflow faults.
struct Stack {
    void* map = nullptr;
    size_t map_size = 0;
    char* base = nullptr;  // lowest usable address
    size_t size = 0;
    Stack() = default;
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    explicit Stack(size_t usable) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        usable = (usable + page - 1) / page * page;
        map_size = usable + page;
        map = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (map == MAP_FAILED) throw std::runtime_error("fa_emu: cannot map a fiber stack");
        mprotect(map, page, PROT_NONE);
        base = static_cast<char*>(map) + page;
        size = usable;
    }
    ~Stack() {
        if (map) munmap(map, map_size);
    }
};

struct Fiber {
#ifdef FA_EMU_ASM_SWITCH
    void* sp = nullptr;  // saved stack pointer while not running
#else
    ucontext_t ctx;
#endif
    Stack* stack = nullptr;
    ThreadIds ids;
    int linear = 0, warp = 0, lane = 0;
    State state = State::runnable;
    std::vector<CpOp> open_group;
    std::deque<std::vector<CpOp>> committed;
};

struct LaneIn {
    uint32_t u[10];
    const void* p;
};

struct WarpStage {
    int size = 32;  // threads in this warp (the last warp of a block may be partial)
    int arrived = 0;
    Op op = Op::none;
    int num = 0;
    bool trans = false;
    Elem elem = Elem::f16;
    ShflMode mode = ShflMode::idx;
    LaneIn in[32];
    uint32_t out[32][4];
};

struct BlockRun {
    std::vector<Fiber> fibers;
    std::vector<WarpStage> warps;
    std::unique_ptr<unsigned char[]> smem;
    size_t smem_bytes = 0;
    const std::function<void()>* body = nullptr;
#ifdef FA_EMU_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
    std::string error;
    Order order = Order::forward;
    std::mt19937_64 rng;
    std::vector<int> priority;  // fiber indices, the first runnable one runs next
};

thread_local BlockRun* t_block = nullptr;
thread_local Fiber* t_fiber = nullptr;
thread_local bool t_order_set = false;
thread_local Order t_order = Order::forward;
thread_local uint64_t t_seed = 0;
thread_local std::vector<std::unique_ptr<Stack>> t_stacks;

Fiber& self(const char* what) {
    if (!t_fiber || !t_block) fail(std::string(what) + " called outside an emulated kernel");
    return *t_fiber;
}

std::string where(const Fiber& f) {
    char buf[128];
    snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", f.ids.block_idx.x,
             f.ids.block_idx.y, f.ids.block_idx.z, f.ids.thread_idx.x, f.ids.thread_idx.y,
             f.ids.thread_idx.z);
    return buf;
}

// Give control back to the scheduler with the given state; returns when resumed.
void yield(State s) {
    Fiber& f = *t_fiber;
    BlockRun& b = *t_block;
    f.state = s;
    void* fake = nullptr;
    asan_start_switch(&fake, b.sched_bottom, b.sched_size);
#ifdef FA_EMU_ASM_SWITCH
    fa_emu_switch(&f.sp, b.sched_sp);
#else
    swapcontext(&f.ctx, &b.sched);
#endif
    asan_finish_switch(fake, &b.sched_bottom, &b.sched_size);
}

void fiber_entry() {
    BlockRun& b = *t_block;
    Fiber& f = *t_fiber;
    asan_finish_switch(nullptr, &b.sched_bottom, &b.sched_size);
    try {
        (*b.body)();
    } catch (const std::exception& e) {
        if (b.error.empty()) b.error = where(f) + ": " + e.what();
    } catch (...) {
        if (b.error.empty()) b.error = where(f) + ": unknown exception";
    }
    f.state = State::done;
    asan_start_switch(nullptr, b.sched_bottom, b.sched_size);  // nullptr: this fiber ends
#ifdef FA_EMU_ASM_SWITCH
    fa_emu_switch(&f.sp, b.sched_sp);
    __builtin_trap();  // a finished fiber is never resumed
#else
    setcontext(&b.sched);
#endif
}

void resume(BlockRun& b, Fiber& f) {
    t_fiber = &f;
    void* fake = nullptr;
    asan_start_switch(&fake, f.stack->base, f.stack->size);
#ifdef FA_EMU_ASM_SWITCH
    fa_emu_switch(&b.sched_sp, f.sp);
#else
    swapcontext(&b.sched, &f.ctx);
#endif
    asan_finish_switch(fake, nullptr, nullptr);
    t_fiber = nullptr;
}

// The priority list: the scheduler always resumes the first runnable fiber in it, which runs until
// it blocks. forward = thread order, reversed = its reverse, random = a random permutation of the
// warps (lanes shuffled within each warp), drawn again at every __syncthreads. Warp-major
// priorities let one warp run as far ahead of the others as the program allows, which is what
// exposes a missing barrier; the random warp order varies which warp that is.
void reprioritize(BlockRun& b) {
    const int n = int(b.fibers.size());
    b.priority.resize(size_t(n));
    for (int i = 0; i < n; ++i) b.priority[size_t(i)] = i;
    if (b.order == Order::reversed) std::reverse(b.priority.begin(), b.priority.end());
    if (b.order == Order::random) {
        std::vector<int> warps(b.warps.size());
        for (size_t w = 0; w < warps.size(); ++w) warps[w] = int(w);
        std::shuffle(warps.begin(), warps.end(), b.rng);
        b.priority.clear();
        for (int w : warps) {
            std::vector<int> lanes;
            for (int l = 0; l < b.warps[size_t(w)].size; ++l) lanes.push_back(32 * w + l);
            std::shuffle(lanes.begin(), lanes.end(), b.rng);
            b.priority.insert(b.priority.end(), lanes.begin(), lanes.end());
        }
    }
}

int pick(BlockRun& b) {
    for (int i : b.priority)
        if (b.fibers[size_t(i)].state == State::runnable) return i;
    return -1;
}

// Runs one block to completion; returns an error message or "".
std::string run_block(BlockRun& b) {
    for (;;) {
        const int i = pick(b);
        if (i < 0) {
            int live = 0, at_barrier = 0, at_warp = 0;
            for (auto& f : b.fibers) {
                live += f.state != State::done;
                at_barrier += f.state == State::at_barrier;
                at_warp += f.state == State::at_warp;
            }
            if (live == 0) return "";
            if (at_barrier == live) {
                for (auto& f : b.fibers)
                    if (f.state == State::at_barrier) f.state = State::runnable;
                if (b.order == Order::random) reprioritize(b);
                continue;
            }
            const ThreadIds& id = b.fibers[0].ids;
            char buf[320];
            snprintf(buf, sizeof buf,
                     "fastattn emulator: deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp "
                     "collective, %d exited (a barrier or collective not reached by all threads)",
                     id.block_idx.x, id.block_idx.y, id.block_idx.z, at_barrier, at_warp,
                     int(b.fibers.size()) - live);
            return buf;
        }
        resume(b, b.fibers[size_t(i)]);
        if (!b.error.empty()) return b.error;
    }
}

// Separate from launch() so that getcontext's "returns twice" (ucontext path) cannot clobber
// launch's locals.
__attribute__((noinline)) void init_fiber(Fiber& f, size_t t, dim3 bid, dim3 block, dim3 grid) {
    f.stack = t_stacks[t].get();
#ifdef FA_EMU_ASAN
    __asan_unpoison_memory_region(f.stack->base, f.stack->size);
#endif
    f.linear = int(t);
    f.warp = int(t / 32);
    f.lane = int(t % 32);
    f.ids.thread_idx = dim3(unsigned(t % block.x), unsigned(t / block.x % block.y),
                            unsigned(t / (size_t(block.x) * block.y)));
    f.ids.block_idx = bid;
    f.ids.block_dim = block;
    f.ids.grid_dim = grid;
    f.state = State::runnable;
    f.open_group.clear();
    f.committed.clear();
#ifdef FA_EMU_ASM_SWITCH
    // The new stack, as fa_emu_switch leaves an old one: FP control words, six saved registers, then
    // the address its `ret` jumps to (fiber_entry), at a 16-byte boundary so that fiber_entry starts
    // with the stack alignment of a called function; above it a null return address ends unwinding.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack->base) + f.stack->size) & ~uintptr_t(15);
    void** slot = reinterpret_cast<void**>(top);
    *--slot = nullptr;                                    // fiber_entry's "return address"
    *--slot = reinterpret_cast<void*>(&fiber_entry);      // popped by fa_emu_switch's ret
    for (int r = 0; r < 6; ++r) *--slot = nullptr;        // rbp rbx r12 r13 r14 r15
    uint32_t fp_words[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(fp_words[0]), "=m"(fp_words[1]));
    --slot;
    memcpy(slot, fp_words, 8);                            // mxcsr, x87 control word
    f.sp = slot;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack->base;
    f.ctx.uc_stack.ss_size = f.stack->size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
}

Order env_order(uint64_t* seed) {
    *seed = 0x5eedULL;
    const char* s = getenv("FASTATTN_EMULATE_ORDER");
    if (!s || !*s || !strcmp(s, "forward")) return Order::forward;
    if (!strcmp(s, "reversed")) return Order::reversed;
    if (!strncmp(s, "random", 6)) {
        if (s[6] == ':') *seed = strtoull(s + 7, nullptr, 10);
        return Order::random;
    }
    fail(std::string("FASTATTN_EMULATE_ORDER must be forward, reversed, random or random:SEED; got '") +
         s + "'");
}

size_t stack_bytes() {
    const char* s = getenv("FASTATTN_EMULATE_STACK_KB");
    const size_t kb = s ? strtoull(s, nullptr, 10) : 0;
    return (kb ? kb : 256) * 1024;
}

// Arrive at a warp collective; the last lane runs compute(stage) for all lanes. The caller has
// written its operands to stage.in[lane] and reads its result from stage.out[lane] afterwards.
template <class Compute>
WarpStage& collective(Op op, int num, bool trans, Elem elem, ShflMode mode, Compute&& compute) {
    Fiber& f = *t_fiber;
    WarpStage& w = t_block->warps[size_t(f.warp)];
    if (w.arrived == 0) {
        w.op = op, w.num = num, w.trans = trans, w.elem = elem, w.mode = mode;
    } else if (w.op != op || w.num != num || w.trans != trans || w.elem != elem || w.mode != mode) {
        fail(std::string("warp divergence: lane ") + std::to_string(f.lane) + " executes " +
             op_name(op) + " while other lanes of its warp execute " + op_name(w.op) +
             " (or the same instruction with another shape)");
    }
    if (++w.arrived < w.size) {
        yield(State::at_warp);
    } else {
        compute(w);
        w.arrived = 0;
        const int first = f.warp * 32;
        for (int l = 0; l < w.size; ++l) {
            Fiber& o = t_block->fibers[size_t(first + l)];
            if (o.state == State::at_warp) o.state = State::runnable;
        }
        yield(State::runnable);  // let the scheduler's order decide who runs next
    }
    return w;
}

void require_full_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu)
        fail(std::string(what) + ": only the full mask 0xffffffff is emulated, got " +
             std::to_string(mask));
    if (t_block->warps[size_t(t_fiber->warp)].size != 32)
        fail(std::string(what) + ": the warp is partial (block size not a multiple of 32)");
}

inline float elem_to_f32(Elem e, uint16_t bits) {
    return e == Elem::f16 ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits);
}

}  // namespace

void fail(const std::string& msg) { throw Fault("fastattn emulator: " + msg); }

const ThreadIds& ids() { return self("threadIdx/blockIdx").ids; }

void set_order(Order order, uint64_t seed) {
    t_order_set = true;
    t_order = order;
    t_seed = seed;
}
void clear_order() { t_order_set = false; }

void* dynamic_smem() {
    self("dynamic shared memory");
    return t_block->smem.get();
}

void syncthreads() {
    self("__syncthreads");
    yield(State::at_barrier);
}

void syncwarp(unsigned mask) {
    self("__syncwarp");
    require_full_mask(mask, "__syncwarp");
    collective(Op::syncwarp, 0, false, Elem::f16, ShflMode::idx, [](WarpStage&) {});
}

void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
    if (t_block) fail("kernel launch from inside a kernel is not emulated");
    const size_t nthreads = size_t(block.x) * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || block.z > 64)
        fail("invalid block size (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
             std::to_string(block.z) + "): 1 to 1024 threads, z <= 64");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        fail("invalid grid size");
    if (smem_bytes > 227 * 1024)
        fail("dynamic shared memory of " + std::to_string(smem_bytes) +
             " bytes exceeds the 227 KiB an H100 block may use");
    uint64_t seed = 0;
    Order order = Order::forward;
    if (t_order_set) {
        order = t_order;
        seed = t_seed;
    } else {
        order = env_order(&seed);
    }

    const size_t stack = stack_bytes();
    while (t_stacks.size() < nthreads) t_stacks.emplace_back(new Stack(stack));

    // Block order follows the fiber order, so inter-block dependencies also show up.
    std::vector<dim3> blocks;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
    std::mt19937_64 rng(seed);
    if (order == Order::reversed) std::reverse(blocks.begin(), blocks.end());
    if (order == Order::random) std::shuffle(blocks.begin(), blocks.end(), rng);

    BlockRun b;
    b.body = &body;
    b.order = order;
    b.rng.seed(seed ^ 0x9e3779b97f4a7c15ULL);
    b.fibers.resize(nthreads);
    b.warps.resize((nthreads + 31) / 32);
    for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].size = int(std::min<size_t>(32, nthreads - 32 * w));
    b.smem_bytes = smem_bytes;

    t_block = &b;
    std::string error;
    for (const dim3& bid : blocks) {
        if (smem_bytes) {
            b.smem.reset(new unsigned char[smem_bytes]);
            memset(b.smem.get(), 0xff, smem_bytes);
        }
        for (size_t t = 0; t < nthreads; ++t) init_fiber(b.fibers[t], t, bid, block, grid);
        for (auto& w : b.warps) w.arrived = 0;
        reprioritize(b);
        error = run_block(b);
        if (!error.empty()) break;
    }
    t_block = nullptr;
    t_fiber = nullptr;
    if (!error.empty()) {
        // The fibers of a failed block are abandoned mid-kernel; their stacks are reused as is.
        throw Fault(error);
    }
}

// ---------------------------------------------------------------------------------------------
// mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type").
// groupID = lane >> 2, threadID_in_group = lane % 4.
//   A (16x16): a_i, i = 0..7, in register i/2:  row = groupID + 8 * ((i >> 1) & 1),
//              col = 2 * threadID_in_group + (i & 1) + 8 * (i >= 4)
//   B (16x8):  b_i, i = 0..3, in register i/2:  row = 2 * threadID_in_group + (i & 1) + 8 * (i >= 2),
//              col = groupID
//   C, D (16x8 fp32): c_i, i = 0..3:            row = groupID + 8 * (i >= 2),
//              col = 2 * threadID_in_group + (i & 1)
// The products of 16-bit inputs are exact in double; the sum of the 16 products and c is rounded
// once to fp32. (Tensor cores may round intermediate sums differently: agreement with hardware is
// to within a few fp32 ulps of the sum's magnitude, not bit-exact.)
// ---------------------------------------------------------------------------------------------
void mma_m16n8k16(Elem elem, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]) {
    Fiber& f = self("mma_m16n8k16");
    require_full_mask(0xffffffffu, "mma.sync");
    LaneIn& in = t_block->warps[size_t(f.warp)].in[f.lane];
    for (int i = 0; i < 4; ++i) in.u[i] = a[i];
    in.u[4] = b[0], in.u[5] = b[1];
    for (int i = 0; i < 4; ++i) in.u[6 + i] = f32_bits(c[i]);
    WarpStage& w = collective(Op::mma, 0, false, elem, ShflMode::idx, [](WarpStage& s) {
        double A[16][16], B[16][8], C[16][8];
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3;
            const uint32_t* r = s.in[lane].u;
            for (int i = 0; i < 8; ++i) {
                const uint16_t bits = uint16_t(r[i >> 1] >> (16 * (i & 1)));
                A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = elem_to_f32(s.elem, bits);
            }
            for (int i = 0; i < 4; ++i) {
                const uint16_t bits = uint16_t(r[4 + (i >> 1)] >> (16 * (i & 1)));
                B[2 * t + (i & 1) + 8 * (i >= 2)][g] = elem_to_f32(s.elem, bits);
            }
            for (int i = 0; i < 4; ++i) C[g + 8 * (i >= 2)][2 * t + (i & 1)] = bits_f32(r[6 + i]);
        }
        for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
                double acc = C[row][col];
                for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
                s.out[lane][i] = f32_bits(float(acc));
            }
        }
    });
    for (int i = 0; i < 4; ++i) d[i] = bits_f32(w.out[f.lane][i]);
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 (PTX ISA, "ldmatrix").
// Matrix j's row r is read from the address given by lane 8j + r. Lane l receives, in register j,
// the two elements (row l/4, cols 2(l%4) and 2(l%4)+1) of matrix j; with .trans, the elements
// (rows 2(l%4) and 2(l%4)+1, col l/4), i.e. the same positions of the transposed matrix.
// ---------------------------------------------------------------------------------------------
void ldmatrix(int num, bool trans, uint32_t* regs, const void* smem_row) {
    Fiber& f = self("ldmatrix");
    require_full_mask(0xffffffffu, "ldmatrix");
    if (num != 1 && num != 2 && num != 4) fail("ldmatrix: .num must be x1, x2 or x4");
    t_block->warps[size_t(f.warp)].in[f.lane].p = smem_row;
    WarpStage& w = collective(Op::ldmatrix, num, trans, Elem::f16, ShflMode::idx, [](WarpStage& s) {
        uint16_t M[4][8][8];
        for (int j = 0; j < s.num; ++j)
            for (int r = 0; r < 8; ++r) {
                const void* p = s.in[8 * j + r].p;
                if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
                    char buf[160];
                    snprintf(buf, sizeof buf,
                             "ldmatrix: lane %d gives row address %p, which is not 16-byte aligned",
                             8 * j + r, p);
                    fail(buf);
                }
                memcpy(M[j][r], p, 16);
            }
        for (int lane = 0; lane < 32; ++lane)
            for (int j = 0; j < s.num; ++j) {
                const int q = lane >> 2, e = 2 * (lane & 3);
                const uint16_t lo = s.trans ? M[j][e][q] : M[j][q][e];
                const uint16_t hi = s.trans ? M[j][e + 1][q] : M[j][q][e + 1];
                s.out[lane][j] = uint32_t(lo) | (uint32_t(hi) << 16);
            }
    });
    for (int j = 0; j < num; ++j) regs[j] = w.out[f.lane][j];
}

// ---------------------------------------------------------------------------------------------
// cp.async.cg.shared.global [dst], [src], cp_bytes, src_bytes: the bytes past src_bytes are zeros.
// The destination holds 0xFF bytes from issue until the cp_async_wait that completes its group.
// ---------------------------------------------------------------------------------------------
void cp_async(void* dst, const void* src, int cp_bytes, int src_bytes) {
    Fiber& f = self("cp.async");
    if (cp_bytes != 4 && cp_bytes != 8 && cp_bytes != 16) fail("cp.async: size must be 4, 8 or 16");
    if (src_bytes < 0 || src_bytes > cp_bytes) fail("cp.async: src-size must be in [0, cp-size]");
    if (reinterpret_cast<uintptr_t>(dst) % unsigned(cp_bytes) ||
        (src_bytes && reinterpret_cast<uintptr_t>(src) % unsigned(cp_bytes))) {
        char buf[160];
        snprintf(buf, sizeof buf, "cp.async: addresses dst=%p src=%p are not %d-byte aligned", dst, src,
                 cp_bytes);
        fail(buf);
    }
    CpOp op;
    op.dst = dst;
    op.bytes = cp_bytes;
    memset(op.data, 0, sizeof op.data);
    if (src_bytes) memcpy(op.data, src, size_t(src_bytes));
    memset(dst, 0xff, size_t(cp_bytes));
    f.open_group.push_back(op);
}

void cp_async_commit() {
    Fiber& f = self("cp.async.commit_group");
    f.committed.push_back(std::move(f.open_group));
    f.open_group.clear();
}

void cp_async_wait(int pending_allowed) {
    Fiber& f = self("cp.async.wait_group");
    while (f.committed.size() > size_t(pending_allowed < 0 ? 0 : pending_allowed)) {
        for (const CpOp& op : f.committed.front()) memcpy(op.dst, op.data, size_t(op.bytes));
        f.committed.pop_front();
    }
}

// ---------------------------------------------------------------------------------------------
// shfl.sync.mode.b32 d, a, b, c, membermask (PTX ISA pseudocode, per lane):
//   segmask = c[12:8]; maxLane = (lane & segmask) | (c[4:0] & ~segmask); minLane = lane & segmask
//   up: j = lane - b, ok = j >= maxLane   down: j = lane + b, ok = j <= maxLane
//   bfly: j = lane ^ b, ok = j <= maxLane  idx: j = minLane | (b[4:0] & ~segmask), ok = j <= maxLane
//   d = ok ? a[j] : a[lane]
// ---------------------------------------------------------------------------------------------
uint32_t shfl(ShflMode mode, unsigned mask, uint32_t value, int b, int c) {
    Fiber& f = self("shfl.sync");
    require_full_mask(mask, "shfl.sync");
    LaneIn& in = t_block->warps[size_t(f.warp)].in[f.lane];
    in.u[0] = value;
    in.u[1] = uint32_t(b);
    in.u[2] = uint32_t(c);
    WarpStage& w = collective(Op::shfl, 0, false, Elem::f16, mode, [](WarpStage& s) {
        for (int lane = 0; lane < 32; ++lane) {
            const int bval = int(s.in[lane].u[1]), cval = int(s.in[lane].u[2]);
            const int segmask = (cval >> 8) & 0x1f;
            const int max_lane = (lane & segmask) | (cval & 0x1f & ~segmask);
            const int min_lane = lane & segmask;
            int j = lane;
            bool ok = false;
            switch (s.mode) {
                case ShflMode::up: j = lane - bval, ok = j >= max_lane; break;
                case ShflMode::down: j = lane + bval, ok = j <= max_lane; break;
                case ShflMode::bfly: j = lane ^ (bval & 0x1f), ok = j <= max_lane; break;
                case ShflMode::idx: j = min_lane | (bval & 0x1f & ~segmask), ok = j <= max_lane; break;
            }
            if (!ok || j < 0 || j > 31) j = lane;
            s.out[lane][0] = s.in[j].u[0];
        }
    });
    return w.out[f.lane][0];
}

}  // namespace fa_emu
