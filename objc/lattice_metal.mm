// The Metal bridge (objc/lattice_metal.h): the decode program is recorded once into an
// MTLIndirectCommandBuffer (ICB) and replayed K steps per command buffer.
//
// Manual retain/release (builds with Apple clang -fno-objc-arc and with GCC + GNUstep against the
// test-only fake in tests/metal_fake). Objects from new*/alloc are owned and released in
// lt_metal_free; everything else is autoreleased inside a pool per call.
//
// Steady throughput under GPU contention: Metal has no public API for command-queue or GPU
// priority (and private ones are off limits), so the bridge keeps the GPU's queue full instead:
// one command buffer per K steps (few submissions to be scheduled behind other processes' work),
// two in flight so the GPU never waits for the host, no host/GPU round trip between the steps of
// a command buffer, and weights kept resident (private storage, useResources, and a residency set
// on macOS 15+) so memory pressure from other processes does not page them out mid-run.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <deque>
#include <vector>

#include "lattice_metal.h"

#if defined(__APPLE__) && defined(__MAC_15_0)
#define LT_METAL_RESIDENCY_SET 1  // the SDK knows MTLResidencySet; used behind @available
#endif

#ifndef __has_feature
#define __has_feature(x) 0
#endif
#if __has_feature(objc_arc)
#error "lattice_metal.mm uses manual retain/release: build it with -fno-objc-arc"
#endif

static const char *const KERNEL_NAMES[LT_K_COUNT] = {
    NULL, "lt_embed", "lt_rmsnorm", "lt_gemv", "lt_rope_kv", "lt_attention",
    "lt_gdn", "lt_elementwise", "lt_lm_head", "lt_sample"};

// Bindings each kernel declares ([[buffer(2 + i)]] for i below this): the header's slot enums.
// lt_attention also declares its split-K workspace at slot 2 + LT_MAX_BIND (metal/attention.metal):
// zeros when it runs unsplit (grid.z = 1, the workspace is not touched), else the workspace.
static const uint32_t DECLARED_BINDINGS[LT_K_COUNT] = {
    0, LT_EMBED_B_WM + 1, LT_NORM_B_Z + 1, LT_GEMV_B_PARTIALS + 1, LT_ROPE_B_GATE_OUT + 1,
    LT_MAX_BIND + 1, LT_GDN_B_NORM_W + 1, LT_EW_B_OUT + 1, LT_GEMV_B_PARTIALS + 1,
    LT_SAMPLE_B_RING_LOGITS + 1};

static const char *const ARENA_LABELS[LT_N_ARENAS] = {
    "lattice weights", "lattice state", "lattice scratch", "lattice step args", "lattice output", "lattice consts"};

enum { SLOT_ARGS = 0, SLOT_STEP = 1, FIRST_BINDING_SLOT = 2, SLOT_WORKSPACE = 2 + LT_MAX_BIND };
static const char *const ATTENTION_REDUCE = "lt_attention_reduce";
static const NSUInteger ZEROS_BYTES = 256;  // >= every args struct and lt_step_args

struct InFlight {
    id<MTLCommandBuffer> cb;
    uint32_t first, count;  // steps [first, first + count) of this generate call
    bool done;
};

// One lt_metal_launch not yet waited for: its command buffer (commit number) and the OUTPUT bytes
// lt_metal_wait copies out.
struct Launch {
    uint64_t cb_number;
    size_t out_offset, out_n;
};

// One recorded program (decode, prefill, ...): its ICB and where its sampler writes tokens.
struct Program {
    id<MTLIndirectCommandBuffer> icb;
    uint32_t n_commands;
    bool has_sample;
    lt_dispatch sample;  // the program's SAMPLE dispatch (output ring bindings)
};

struct lt_metal;

// Receives command-buffer completions (the block on Apple forwards to it).
#if defined(__BLOCKS__)
@interface LTMetalCompletion : NSObject {
#else
@interface LTMetalCompletion : NSObject <LTFakeCompletedHandler> {
#endif
@public
    lt_metal *_m;
}
- (void)commandBufferCompleted:(id<MTLCommandBuffer>)cb;
@end

struct lt_metal {
    lt_metal *source;  // lt_metal_create_shared: weights, consts and pipelines come from it
    id<MTLDevice> device;
    id<MTLCommandQueue> queue;
    std::vector<id<MTLLibrary> > libraries;
    id<MTLComputePipelineState> pipelines[LT_K_COUNT];
    id<MTLComputePipelineState> reduce;  // lt_attention_reduce, once an attention is split
    uint32_t attention_splits;           // 0: automatic (see attention_splits)
    id<MTLBuffer> workspace;             // split-K partitions, shared by every split attention
    id<MTLBuffer> arenas[LT_N_ARENAS];
    size_t sizes[LT_N_ARENAS];
    id<MTLBuffer> zeros;  // unbound slots, and the arguments of warm-up dispatches
    std::vector<id<MTLResource> > resident;
    std::vector<Program> programs;
    bool warm_pipelines;  // M1/M2: dispatch each pipeline directly before the ICB
#ifdef LT_METAL_RESIDENCY_SET
    id residency_set;  // id<MTLResidencySet>, typed only inside @available checks
#endif
    LTMetalCompletion *completion;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    std::deque<InFlight> in_flight;
    uint64_t committed, completed;  // command buffers committed / drained, in commit order

    // launch()/wait(): at most two launches pending, waited for in launch order
    Launch launches[2];
    uint32_t n_launched, n_waited;

    // generate() state, read by the completion path under `lock`
    const lt_dispatch *sample;
    const uint32_t *stop_ids;
    uint32_t n_stop, max_out, n_out, n_consumed, first_step;
    uint32_t *tokens;
    float *logprobs;
    bool stopped;
    int failure;

    lt_metal_counters counters;
    char error[1024];
};

static void set_error(lt_metal *m, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m->error, sizeof m->error, fmt, ap);
    va_end(ap);
}

static const char *describe(NSError *e) { return e ? [[e localizedDescription] UTF8String] : "unknown error"; }

static void keep_resident(lt_metal *m, id<MTLBuffer> buffer);
static int check_range(lt_metal *m, uint32_t arena, size_t offset, size_t n);

// ------------------------------------------------------------------------------------ completion
static void drain_finished(lt_metal *m);

@implementation LTMetalCompletion
- (void)commandBufferCompleted:(id<MTLCommandBuffer>)cb
{
    lt_metal *m = _m;
    pthread_mutex_lock(&m->lock);
    for (size_t i = 0; i < m->in_flight.size(); i++)
        if (m->in_flight[i].cb == cb) m->in_flight[i].done = true;
    drain_finished(m);
    pthread_cond_broadcast(&m->cond);
    pthread_mutex_unlock(&m->lock);
}
@end

static bool is_stop(const lt_metal *m, uint32_t token)
{
    for (uint32_t i = 0; i < m->n_stop; i++)
        if (m->stop_ids[i] == token) return true;
    return false;
}

// Consumes finished command buffers in commit order (under m->lock): reads their tokens from the
// output ring, checks stop conditions, drops the overshoot.
static void drain_finished(lt_metal *m)
{
    while (!m->in_flight.empty() && m->in_flight.front().done) {
        InFlight f = m->in_flight.front();
        m->in_flight.pop_front();
        m->completed++;
        m->counters.steps += f.count;
        if ([f.cb status] == MTLCommandBufferStatusError) {
            if (!m->failure) {
                m->failure = LT_METAL_ERR_GPU;
                set_error(m, "command buffer failed: %s", describe([f.cb error]));
            }
        } else if (!m->stopped && !m->failure && m->tokens) {
            const lt_step_args *step = (const lt_step_args *)[m->arenas[LT_ARENA_STEP] contents];
            if (step->error) {  // sticky: the first kernel error of this or an earlier buffer
                m->failure = (int)step->error;
                set_error(m, "kernel error %u", step->error);
            } else {
                const unsigned char *out = (const unsigned char *)[m->arenas[LT_ARENA_OUTPUT] contents];
                const lt_binding *rt = &m->sample->bind[LT_SAMPLE_B_RING_TOKENS];
                const lt_binding *rl = &m->sample->bind[LT_SAMPLE_B_RING_LOGPROBS];
                const uint32_t *ring = (const uint32_t *)(out + rt->offset);
                const float *ring_lp = rl->arena == LT_ARENA_OUTPUT ? (const float *)(out + rl->offset) : NULL;
                for (uint32_t j = 0; j < f.count && !m->stopped; j++) {
                    uint32_t slot = (m->first_step + f.first + j) % step->ring_cap;
                    uint32_t token = ring[slot];
                    m->tokens[m->n_out] = token;
                    if (m->logprobs) m->logprobs[m->n_out] = ring_lp ? ring_lp[slot] : 0.0f;
                    m->n_out++;
                    m->n_consumed = f.first + j + 1;
                    if (is_stop(m, token) || m->n_out == m->max_out) m->stopped = true;
                }
            }
        }
        [f.cb release];
    }
}

// ------------------------------------------------------------------------------------ encoding
// Encodes and commits one command buffer of `count` steps; the caller holds no lock. Returns the
// buffer's commit number (m->completed reaches it when its completion has been drained).
static uint64_t commit_steps(lt_metal *m, const Program &p, uint32_t first, uint32_t count)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    lt_metal_counters *c = &m->counters;
    id<MTLCommandBuffer> cb = [m->queue commandBuffer];
    id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
    [enc useResources:m->resident.data() count:m->resident.size() usage:MTLResourceUsageRead | MTLResourceUsageWrite];
    c->api_calls += 3;
    if (m->warm_pipelines) {
        // M1/M2 make pipelines resident only when a direct dispatch uses them: one threadgroup of
        // one thread with every slot on zeros (step.n_tokens == 0: kernels do nothing)
        id<MTLBuffer> zeros[FIRST_BINDING_SLOT + LT_MAX_BIND + 1];
        NSUInteger offsets[FIRST_BINDING_SLOT + LT_MAX_BIND + 1];
        for (uint32_t s = 0; s < FIRST_BINDING_SLOT + LT_MAX_BIND + 1; s++) {
            zeros[s] = m->zeros;
            offsets[s] = 0;
        }
        for (uint32_t k = 1; k <= LT_K_COUNT; k++) {  // LT_K_COUNT: the attention reduce
            id<MTLComputePipelineState> pipeline = k < LT_K_COUNT ? m->pipelines[k] : m->reduce;
            if (!pipeline) continue;
            uint32_t slots = FIRST_BINDING_SLOT + DECLARED_BINDINGS[k < LT_K_COUNT ? k : LT_K_ATTENTION];
            [enc setComputePipelineState:pipeline];
            [enc setBuffers:zeros offsets:offsets withRange:NSMakeRange(0, slots)];
            [enc dispatchThreadgroups:MTLSizeMake(1, 1, 1) threadsPerThreadgroup:MTLSizeMake(1, 1, 1)];
            c->api_calls += 3;
        }
    }
    for (uint32_t s = 0; s < count; s++)
        [enc executeCommandsInBuffer:p.icb withRange:NSMakeRange(0, p.n_commands)];
    [enc endEncoding];
    c->api_calls += count + 1;
#if defined(__BLOCKS__)
    LTMetalCompletion *completion = m->completion;
    [cb addCompletedHandler:^(id<MTLCommandBuffer> done) { [completion commandBufferCompleted:done]; }];
#else  // GCC has no blocks: the test-only fake takes the handler object (tests/metal_fake/Metal/Metal.h)
    [cb addCompletedHandler:m->completion];
#endif
    InFlight f = {[cb retain], first, count, false};
    pthread_mutex_lock(&m->lock);
    m->in_flight.push_back(f);
    uint64_t number = ++m->committed;
    pthread_mutex_unlock(&m->lock);
    [cb commit];
    c->api_calls += 2;
    c->command_buffers++;
    [pool drain];
    return number;
}

static void wait_all(lt_metal *m)
{
    pthread_mutex_lock(&m->lock);
    while (!m->in_flight.empty()) pthread_cond_wait(&m->cond, &m->lock);
    pthread_mutex_unlock(&m->lock);
}

static bool check_program_id(lt_metal *m, int program)
{
    if (program < 0 || (size_t)program >= m->programs.size()) {
        set_error(m, "no program %d (%zu recorded)", program, m->programs.size());
        return false;
    }
    return true;
}

static bool check_no_launch_pending(lt_metal *m)
{
    if (m->n_launched != m->n_waited) {
        set_error(m, "%u launch(es) not waited for", m->n_launched - m->n_waited);
        return false;
    }
    return true;
}

static int kernel_error(lt_metal *m)
{
    const lt_step_args *step = (const lt_step_args *)[m->arenas[LT_ARENA_STEP] contents];
    if (step->error) set_error(m, "kernel error %u", step->error);
    return (int)step->error;
}

int lt_metal_launch(lt_metal *m, int program, uint32_t n_steps, size_t out_offset, size_t out_n)
{
    if (m->n_launched == m->n_waited) {  // a new sequence of launches: forget the last one's failure
        m->failure = 0;
        m->error[0] = 0;
        m->tokens = NULL;
    }
    if (!check_program_id(m, program)) return LT_METAL_ERR_ARGS;
    if (n_steps == 0 || m->n_launched - m->n_waited >= 2) {
        set_error(m, "launch needs n_steps >= 1 (got %u) and at most two launches pending (%u are)", n_steps,
                  m->n_launched - m->n_waited);
        return LT_METAL_ERR_ARGS;
    }
    int err = check_range(m, LT_ARENA_OUTPUT, out_offset, out_n);
    if (err) return err;
    Launch *l = &m->launches[m->n_launched % 2];
    l->out_offset = out_offset;
    l->out_n = out_n;
    l->cb_number = commit_steps(m, m->programs[program], 0, n_steps);
    m->n_launched++;
    return 0;
}

int lt_metal_wait(lt_metal *m, void *out)
{
    if (m->n_launched == m->n_waited) {
        set_error(m, "wait without a pending launch");
        return LT_METAL_ERR_ARGS;
    }
    const Launch *l = &m->launches[m->n_waited % 2];
    pthread_mutex_lock(&m->lock);
    while (m->completed < l->cb_number) pthread_cond_wait(&m->cond, &m->lock);
    pthread_mutex_unlock(&m->lock);
    m->n_waited++;
    if (m->failure) return m->failure;
    int err = kernel_error(m);
    m->counters.api_calls += l->out_n ? 2 : 1;  // contents
    // the ring slots of this launch: a later launch in flight writes other slots (ring_cap >= 2 K)
    if (!err && l->out_n) memcpy(out, (const unsigned char *)[m->arenas[LT_ARENA_OUTPUT] contents] + l->out_offset, l->out_n);
    return err;
}

int lt_metal_generate(lt_metal *m, int program, uint32_t max_steps, uint32_t steps_per_cb, const uint32_t *stop_ids,
                      uint32_t n_stop, uint32_t *tokens, float *logprobs, uint32_t *n_out, uint32_t *n_steps_run)
{
    *n_out = 0;
    *n_steps_run = 0;
    lt_step_args *step = (lt_step_args *)[m->arenas[LT_ARENA_STEP] contents];
    if (!check_program_id(m, program) || !check_no_launch_pending(m)) return LT_METAL_ERR_ARGS;
    const Program &p = m->programs[program];
    if (!p.has_sample) {
        set_error(m, "the program has no SAMPLE dispatch: nothing writes tokens to the output ring");
        return LT_METAL_ERR_PROGRAM;
    }
    if (steps_per_cb == 0 || (uint64_t)step->ring_cap < 2ull * steps_per_cb || step->n_tokens != 1) {
        set_error(m, "generate needs steps_per_cb >= 1, step.ring_cap >= 2 * steps_per_cb (ring_cap %u, "
                  "steps_per_cb %u) and step.n_tokens == 1 (got %u)", step->ring_cap, steps_per_cb, step->n_tokens);
        return LT_METAL_ERR_ARGS;
    }
    const lt_step_args start = *step;
    m->sample = &p.sample;
    m->stop_ids = stop_ids;
    m->n_stop = n_stop;
    m->max_out = max_steps;
    m->n_out = m->n_consumed = 0;
    m->first_step = start.step;
    m->tokens = tokens;
    m->logprobs = logprobs;
    m->stopped = max_steps == 0;
    m->failure = 0;
    m->error[0] = 0;

    uint32_t submitted = 0;
    pthread_mutex_lock(&m->lock);
    for (;;) {
        while (!m->stopped && !m->failure && submitted < max_steps && m->in_flight.size() < 2) {
            uint32_t count = max_steps - submitted < steps_per_cb ? max_steps - submitted : steps_per_cb;
            pthread_mutex_unlock(&m->lock);
            commit_steps(m, p, submitted, count);
            pthread_mutex_lock(&m->lock);
            submitted += count;
        }
        if (m->in_flight.empty()) break;
        pthread_cond_wait(&m->cond, &m->lock);
    }
    pthread_mutex_unlock(&m->lock);

    *n_out = m->n_out;
    *n_steps_run = submitted;
    m->counters.tokens += m->n_out;
    m->tokens = NULL;
    if (!m->failure && m->n_consumed < submitted) {
        // overshoot: steps after the stop ran; rewind what the host can (see lattice_metal.h)
        step->pos = start.pos + m->n_consumed;
        step->step = start.step + m->n_consumed;
        step->n_seen = start.n_seen + m->n_consumed;
        step->token = step->next_token = tokens[m->n_out - 1];
        if (logprobs) step->next_logprob = logprobs[m->n_out - 1];
    }
    return m->failure;
}

int lt_metal_run(lt_metal *m, int program, uint32_t n_steps)
{
    m->failure = 0;
    m->tokens = NULL;
    m->error[0] = 0;
    if (!check_program_id(m, program) || !check_no_launch_pending(m)) return LT_METAL_ERR_ARGS;
    if (n_steps == 0) return 0;
    commit_steps(m, m->programs[program], 0, n_steps);
    wait_all(m);
    return m->failure ? m->failure : kernel_error(m);
}

// ------------------------------------------------------------------------------------ arenas
static int check_range(lt_metal *m, uint32_t arena, size_t offset, size_t n)
{
    if (arena >= LT_N_ARENAS || offset > m->sizes[arena] || n > m->sizes[arena] - offset) {
        set_error(m, "arena %u: range [%zu, %zu) outside its %zu bytes", arena, offset, offset + n,
                  arena < LT_N_ARENAS ? m->sizes[arena] : (size_t)0);
        return LT_METAL_ERR_ARGS;
    }
    return 0;
}

// One blit, waited for: a copy, or (src nil) zeroes over dst's range.
static int blit(lt_metal *m, id<MTLBuffer> src, size_t src_off, id<MTLBuffer> dst, size_t dst_off, size_t n)
{
    id<MTLCommandBuffer> cb = [m->queue commandBuffer];
    id<MTLBlitCommandEncoder> enc = [cb blitCommandEncoder];
    if (src)
        [enc copyFromBuffer:src sourceOffset:src_off toBuffer:dst destinationOffset:dst_off size:n];
    else
        [enc fillBuffer:dst range:NSMakeRange(dst_off, n) value:0];
    [enc endEncoding];
    [cb commit];
    [cb waitUntilCompleted];
    if ([cb status] == MTLCommandBufferStatusError) {
        set_error(m, "blit failed: %s", describe([cb error]));
        return LT_METAL_ERR_GPU;
    }
    return 0;
}

static bool is_private(uint32_t arena)
{
    return arena == LT_ARENA_WEIGHTS || arena == LT_ARENA_STATE || arena == LT_ARENA_SCRATCH;
}

// Copies between host memory and a private arena through one shared staging buffer of at most
// LT_METAL_STAGING_BYTES (weights of several GB go up in pieces, without a second full copy; the
// Linux tests build with a small value so that every upload takes several pieces).
#ifndef LT_METAL_STAGING_BYTES
#define LT_METAL_STAGING_BYTES (64u << 20)
#endif
static const size_t STAGING_BYTES = LT_METAL_STAGING_BYTES;

static int staged_copy(lt_metal *m, uint32_t arena, size_t offset, void *host, size_t n, bool upload)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    size_t chunk = n < STAGING_BYTES ? n : STAGING_BYTES;
    id<MTLBuffer> staging = [m->device newBufferWithLength:chunk options:MTLResourceStorageModeShared];
    int err = 0;
    if (!staging) {
        set_error(m, "no memory for a %zu-byte staging buffer", chunk);
        err = LT_METAL_ERR_DEVICE;
    }
    for (size_t done = 0; done < n && !err; done += chunk) {
        size_t len = n - done < chunk ? n - done : chunk;
        unsigned char *h = (unsigned char *)host + done;
        if (upload) {
            memcpy([staging contents], h, len);
            err = blit(m, staging, 0, m->arenas[arena], offset + done, len);
        } else {
            err = blit(m, m->arenas[arena], offset + done, staging, 0, len);
            if (!err) memcpy(h, [staging contents], len);
        }
    }
    [staging release];
    [pool drain];
    return err;
}

int lt_metal_write(lt_metal *m, uint32_t arena, size_t offset, const void *src, size_t n)
{
    int err = check_range(m, arena, offset, n);
    if (err || n == 0) return err;
    if (is_private(arena)) return staged_copy(m, arena, offset, (void *)src, n, true);
    memcpy((unsigned char *)[m->arenas[arena] contents] + offset, src, n);
    return 0;
}

int lt_metal_read(lt_metal *m, uint32_t arena, size_t offset, void *dst, size_t n)
{
    int err = check_range(m, arena, offset, n);
    if (err || n == 0) return err;
    if (is_private(arena)) return staged_copy(m, arena, offset, dst, n, false);
    memcpy(dst, (const unsigned char *)[m->arenas[arena] contents] + offset, n);
    return 0;
}

// Blit offsets and sizes are multiples of 4 on macOS (copyFromBuffer, fillBuffer); the runtime's
// state regions are f32 and 64-byte aligned.
static int check_blit_range(lt_metal *m, uint32_t arena, size_t offset, size_t n)
{
    int err = check_range(m, arena, offset, n);
    if (!err && (offset % 4 || n % 4)) {
        set_error(m, "arena %u: range [%zu, %zu) does not start and end at multiples of 4", arena, offset,
                  offset + n);
        err = LT_METAL_ERR_ARGS;
    }
    return err;
}

int lt_metal_copy(lt_metal *m, uint32_t arena, size_t dst, size_t src, size_t n)
{
    int err = check_blit_range(m, arena, dst, n);
    if (!err) err = check_blit_range(m, arena, src, n);
    if (!err && dst < src + n && src < dst + n) {  // overlapping copies within a buffer are undefined
        set_error(m, "arena %u: copy [%zu, %zu) onto [%zu, %zu) overlaps", arena, src, src + n, dst, dst + n);
        err = LT_METAL_ERR_ARGS;
    }
    if (err || n == 0) return err;
    if (is_private(arena)) return blit(m, m->arenas[arena], src, m->arenas[arena], dst, n);
    unsigned char *base = (unsigned char *)[m->arenas[arena] contents];
    memcpy(base + dst, base + src, n);
    return 0;
}

int lt_metal_zero(lt_metal *m, uint32_t arena, size_t offset, size_t n)
{
    int err = check_blit_range(m, arena, offset, n);
    if (err || n == 0) return err;
    if (is_private(arena)) return blit(m, nil, 0, m->arenas[arena], offset, n);
    memset((unsigned char *)[m->arenas[arena] contents] + offset, 0, n);
    return 0;
}

// ------------------------------------------------------------------------------------ creation
static int check_program(lt_metal *m, const lt_dispatch *prog, uint32_t n, size_t n_consts)
{
    if (n == 0) {
        set_error(m, "empty program");
        return LT_METAL_ERR_PROGRAM;
    }
    for (uint32_t i = 0; i < n; i++) {
        const lt_dispatch *d = &prog[i];
        if (d->kernel == LT_K_NONE || d->kernel >= LT_K_COUNT) {
            set_error(m, "dispatch %u: unknown kernel id %u", i, d->kernel);
            return LT_METAL_ERR_PROGRAM;
        }
        if (d->n_bind > LT_MAX_BIND || (uint64_t)d->args_offset + 16 > n_consts || d->args_offset % LT_ARGS_ALIGN) {
            set_error(m, "dispatch %u (%s): n_bind %u or args_offset %u invalid (%zu const bytes)", i,
                      KERNEL_NAMES[d->kernel], d->n_bind, d->args_offset, n_consts);
            return LT_METAL_ERR_PROGRAM;
        }
        uint64_t threads = (uint64_t)d->group[0] * d->group[1] * d->group[2];
        if (!d->grid[0] || !d->grid[1] || !d->grid[2] || threads == 0 || threads > 1024) {
            set_error(m, "dispatch %u (%s): launch shape grid (%u, %u, %u) group (%u, %u, %u) invalid", i,
                      KERNEL_NAMES[d->kernel], d->grid[0], d->grid[1], d->grid[2], d->group[0], d->group[1], d->group[2]);
            return LT_METAL_ERR_PROGRAM;
        }
        for (uint32_t b = 0; b < d->n_bind; b++) {
            const lt_binding *bd = &d->bind[b];
            if (bd->arena == LT_ARENA_NONE) continue;
            if (bd->arena >= LT_N_ARENAS || bd->offset >= m->sizes[bd->arena]) {
                set_error(m, "dispatch %u (%s): binding %u (arena %u, offset %u) outside its arena", i,
                          KERNEL_NAMES[d->kernel], b, bd->arena, bd->offset);
                return LT_METAL_ERR_PROGRAM;
            }
        }
    }
    return 0;
}

static id<MTLLibrary> compile_source_dir(lt_metal *m, NSString *dir, NSString *file);

static int load_libraries(lt_metal *m, const char *path)
{
    NSString *p = [NSString stringWithUTF8String:path];
    if ([[p pathExtension] isEqualToString:@"metallib"]) {
        NSError *e = nil;
        id<MTLLibrary> lib = [m->device newLibraryWithURL:[NSURL fileURLWithPath:p] error:&e];
        if (!lib) {
            set_error(m, "cannot load %s: %s", path, describe(e));
            return LT_METAL_ERR_LIBRARY;
        }
        m->libraries.push_back(lib);
        return 0;
    }
    // fallback: every .metal file of a directory compiled at run time, one library each (files
    // may define static helpers with the same names)
    NSArray *files = [[[NSFileManager defaultManager] contentsOfDirectoryAtPath:p error:NULL]
        sortedArrayUsingSelector:@selector(compare:)];
    for (NSUInteger i = 0; i < [files count]; i++) {  // no fast enumeration in GCC's Objective-C++
        NSString *f = [files objectAtIndex:i];
        if (![[f pathExtension] isEqualToString:@"metal"]) continue;
        id<MTLLibrary> lib = compile_source_dir(m, p, f);
        if (!lib) return LT_METAL_ERR_LIBRARY;
        m->libraries.push_back(lib);
    }
    if (m->libraries.empty()) {
        set_error(m, "%s is neither a .metallib nor a directory of .metal sources", path);
        return LT_METAL_ERR_LIBRARY;
    }
    return 0;
}

#ifdef __APPLE__
// A .metal file with its `#include "lattice_shared.h"` inlined (run-time compiles have no
// include path).
static id<MTLLibrary> compile_source_dir(lt_metal *m, NSString *dir, NSString *file)
{
    NSString *source = [NSString stringWithContentsOfFile:[dir stringByAppendingPathComponent:file]
                                                 encoding:NSUTF8StringEncoding error:NULL];
    NSString *shared = [NSString stringWithContentsOfFile:[dir stringByAppendingPathComponent:@"lattice_shared.h"]
                                                 encoding:NSUTF8StringEncoding error:NULL];
    if (!source || !shared) {
        set_error(m, "cannot read %s or lattice_shared.h in %s", [file UTF8String], [dir UTF8String]);
        return nil;
    }
    source = [source stringByReplacingOccurrencesOfString:@"#include \"lattice_shared.h\"" withString:shared];
    MTLCompileOptions *options = [[[MTLCompileOptions alloc] init] autorelease];
    NSError *e = nil;
    id<MTLLibrary> lib = [m->device newLibraryWithSource:source options:options error:&e];
    if (!lib) set_error(m, "%s does not compile: %s", [file UTF8String], describe(e));
    return lib;
}
#else
static id<MTLLibrary> compile_source_dir(lt_metal *m, NSString *dir, NSString *file)
{
    set_error(m, "%s: compiling Metal sources at run time needs Apple's Metal framework; pass a .metallib",
              [[dir stringByAppendingPathComponent:file] UTF8String]);
    return nil;
}
#endif

static id<MTLComputePipelineState> make_pipeline(lt_metal *m, const char *function, uint32_t kernel, int *err)
{
    NSString *name = [NSString stringWithUTF8String:function];
    id<MTLFunction> fn = nil;
    for (size_t i = 0; i < m->libraries.size() && !fn; i++) fn = [m->libraries[i] newFunctionWithName:name];
    if (!fn) {
        set_error(m, "the Metal library has no kernel function %s (kernel id %u)", function, kernel);
        *err = LT_METAL_ERR_LIBRARY;
        return nil;
    }
    MTLComputePipelineDescriptor *desc = [[[MTLComputePipelineDescriptor alloc] init] autorelease];
    [desc setComputeFunction:fn];
    [desc setSupportIndirectCommandBuffers:YES];
    [desc setLabel:name];
    NSError *e = nil;
    id<MTLComputePipelineState> pipeline = [m->device newComputePipelineStateWithDescriptor:desc
        options:MTLPipelineOptionNone reflection:NULL error:&e];
    [fn release];
    if (!pipeline) {
        set_error(m, "pipeline %s: %s", function, describe(e));
        *err = LT_METAL_ERR_LIBRARY;
    }
    return pipeline;
}

// Threadgroup ranges (grid.z) of an attention dispatch. Decode-sized launches (few heads x
// tokens) leave most of the GPU idle on long contexts, so their keys are split until there are
// about 64 threadgroups, at most one split per 512 cache positions. A first guess, to be tuned on
// hardware; lt_metal_set_attention_splits overrides it.
static uint32_t attention_splits(const lt_metal *m, const lt_dispatch *d)
{
    const lt_attention_args *a =
        (const lt_attention_args *)((const unsigned char *)[m->arenas[LT_ARENA_CONST] contents] + d->args_offset);
    uint32_t groups = d->grid[0] * d->grid[1];
    uint32_t splits = m->attention_splits ? m->attention_splits : (64 + groups - 1) / groups;
    uint32_t most = (a->ctx_cap + 511) / 512;
    if (!m->attention_splits && splits > most) splits = most;
    return splits > 1 && d->grid[2] == 1 ? splits : 1;
}

// Bytes of the split workspace of one attention dispatch: a header, then [rows][heads][splits][D + 2].
static size_t workspace_bytes(const lt_metal *m, const lt_dispatch *d, uint32_t splits)
{
    const lt_attention_args *a =
        (const lt_attention_args *)((const unsigned char *)[m->arenas[LT_ARENA_CONST] contents] + d->args_offset);
    return 16 + (size_t)d->grid[1] * a->n_heads * splits * (a->head_dim + 2) * sizeof(float);
}

static bool from_source(const lt_metal *m, uint32_t arena)
{
    return m->source && (arena == LT_ARENA_WEIGHTS || arena == LT_ARENA_CONST);
}

static int make_arenas(lt_metal *m, const uint8_t *consts, size_t n_consts)
{
    id<MTLCommandBuffer> cb = [m->queue commandBuffer];
    id<MTLBlitCommandEncoder> enc = [cb blitCommandEncoder];
    for (uint32_t a = 0; a < LT_N_ARENAS; a++) {
        if (from_source(m, a)) {
            m->arenas[a] = [m->source->arenas[a] retain];
            keep_resident(m, m->arenas[a]);
            continue;
        }
        // Metal rejects zero-length buffers; fills need multiples of 4 on macOS
        size_t n = m->sizes[a] ? (m->sizes[a] + 15) / 16 * 16 : 16;
        MTLResourceOptions opt = is_private(a) ? MTLResourceStorageModePrivate : MTLResourceStorageModeShared;
        m->arenas[a] = [m->device newBufferWithLength:n options:opt];
        if (!m->arenas[a]) {
            [enc endEncoding];
            set_error(m, "cannot allocate %zu bytes for %s", n, ARENA_LABELS[a]);
            return LT_METAL_ERR_DEVICE;
        }
        [m->arenas[a] setLabel:[NSString stringWithUTF8String:ARENA_LABELS[a]]];
        if (is_private(a)) [enc fillBuffer:m->arenas[a] range:NSMakeRange(0, n) value:0];
        else memset([m->arenas[a] contents], 0, n);
        keep_resident(m, m->arenas[a]);
    }
    [enc endEncoding];
    [cb commit];
    [cb waitUntilCompleted];
    if (n_consts && !m->source) memcpy([m->arenas[LT_ARENA_CONST] contents], consts, n_consts);
    m->zeros = [m->device newBufferWithLength:ZEROS_BYTES options:MTLResourceStorageModeShared];
    if (!m->zeros) {
        set_error(m, "cannot allocate the zero buffer");
        return LT_METAL_ERR_DEVICE;
    }
    [m->zeros setLabel:@"lattice zeros"];
    memset([m->zeros contents], 0, ZEROS_BYTES);
    keep_resident(m, m->zeros);
    if ([cb status] == MTLCommandBufferStatusError) {
        set_error(m, "clearing the arenas failed: %s", describe([cb error]));
        return LT_METAL_ERR_GPU;
    }
    return 0;
}

static uint32_t slots_of(const lt_dispatch *d)
{
    uint32_t bindings = d->n_bind > DECLARED_BINDINGS[d->kernel] ? d->n_bind : DECLARED_BINDINGS[d->kernel];
    return FIRST_BINDING_SLOT + bindings;
}

// Records the program into a new ICB, once. A split attention becomes two commands: lt_attention
// over grid.z = splits writing partitions to the workspace, then lt_attention_reduce behind a
// barrier (same bindings) merging them.
static int record(lt_metal *m, const lt_dispatch *prog, uint32_t n, Program *p)
{
    uint32_t max_slots = 0, n_commands = n;
    for (uint32_t i = 0; i < n; i++) {
        if (slots_of(&prog[i]) > max_slots) max_slots = slots_of(&prog[i]);
        if (prog[i].kernel == LT_K_ATTENTION && attention_splits(m, &prog[i]) > 1) n_commands++;
    }
    MTLIndirectCommandBufferDescriptor *desc = [[[MTLIndirectCommandBufferDescriptor alloc] init] autorelease];
    [desc setCommandTypes:MTLIndirectCommandTypeConcurrentDispatch];
    [desc setInheritBuffers:NO];
    [desc setInheritPipelineState:NO];
    [desc setMaxKernelBufferBindCount:max_slots];
    p->icb = [m->device newIndirectCommandBufferWithDescriptor:desc maxCommandCount:n_commands options:0];
    if (!p->icb) {
        set_error(m, "cannot create an indirect command buffer of %u commands", n_commands);
        return LT_METAL_ERR_DEVICE;
    }
    p->n_commands = n_commands;
    uint32_t c = 0;
    for (uint32_t i = 0; i < n; i++) {
        const lt_dispatch *d = &prog[i];
        uint32_t splits = d->kernel == LT_K_ATTENTION ? attention_splits(m, d) : 1;
        for (uint32_t part = 0; part < (splits > 1 ? 2u : 1u); part++) {
            id<MTLIndirectComputeCommand> cmd = [p->icb indirectComputeCommandAtIndex:c++];
            [cmd setComputePipelineState:part ? m->reduce : m->pipelines[d->kernel]];
            [cmd setKernelBuffer:m->arenas[LT_ARENA_CONST] offset:d->args_offset atIndex:SLOT_ARGS];
            [cmd setKernelBuffer:m->arenas[LT_ARENA_STEP] offset:0 atIndex:SLOT_STEP];
            uint32_t slots = slots_of(d);
            for (uint32_t s = FIRST_BINDING_SLOT; s < slots; s++) {
                uint32_t b = s - FIRST_BINDING_SLOT;
                if (b < d->n_bind && d->bind[b].arena != LT_ARENA_NONE)
                    [cmd setKernelBuffer:m->arenas[d->bind[b].arena] offset:d->bind[b].offset atIndex:s];
                else if (s == SLOT_WORKSPACE && splits > 1)
                    [cmd setKernelBuffer:m->workspace offset:0 atIndex:s];
                else
                    [cmd setKernelBuffer:m->zeros offset:0 atIndex:s];
            }
            MTLSize grid = MTLSizeMake(d->grid[0], d->grid[1], part ? 1 : (splits > 1 ? splits : d->grid[2]));
            [cmd concurrentDispatchThreadgroups:grid
                          threadsPerThreadgroup:MTLSizeMake(d->group[0], d->group[1], d->group[2])];
            if (part || (d->flags & LT_DISPATCH_BARRIER)) [cmd setBarrier];
        }
    }
    return 0;
}

// The split-K workspace (private), grown to the largest split attention of the program, and the
// reduce pipeline.
static int prepare_splits(lt_metal *m, const lt_dispatch *prog, uint32_t n)
{
    size_t need = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t splits = prog[i].kernel == LT_K_ATTENTION ? attention_splits(m, &prog[i]) : 1;
        if (splits > 1 && workspace_bytes(m, &prog[i], splits) > need) need = workspace_bytes(m, &prog[i], splits);
    }
    if (need == 0) return 0;
    int err = 0;
    if (!m->reduce) m->reduce = make_pipeline(m, ATTENTION_REDUCE, LT_K_ATTENTION, &err);
    if (err) return err;
    if (m->workspace && [m->workspace length] >= need) return 0;
    if (!m->programs.empty() && m->workspace) {
        set_error(m, "a later program needs a larger attention workspace (%zu bytes): add the program with the "
                  "largest split attention first", need);
        return LT_METAL_ERR_ARGS;
    }
    m->workspace = [m->device newBufferWithLength:(need + 15) / 16 * 16 options:MTLResourceStorageModePrivate];
    if (!m->workspace) {
        set_error(m, "cannot allocate %zu bytes of attention workspace", need);
        return LT_METAL_ERR_DEVICE;
    }
    [m->workspace setLabel:@"lattice attention workspace"];
    keep_resident(m, m->workspace);
    return 0;
}

// Every buffer a command buffer uses goes to useResources; on macOS 15+ also into a residency set
// attached to the queue, which keeps it resident across command buffers and under memory pressure.
static void keep_resident(lt_metal *m, id<MTLBuffer> buffer)
{
    m->resident.push_back(buffer);
#ifdef LT_METAL_RESIDENCY_SET
    if (@available(macOS 15.0, *)) {
        if (!m->residency_set) {
            MTLResidencySetDescriptor *desc = [[[MTLResidencySetDescriptor alloc] init] autorelease];
            [desc setInitialCapacity:LT_N_ARENAS + 2];
            m->residency_set = [m->device newResidencySetWithDescriptor:desc error:NULL];
            if (!m->residency_set) return;  // useResources still covers every command buffer
            [m->queue addResidencySet:m->residency_set];
        }
        [m->residency_set addAllocation:buffer];
        [m->residency_set commit];
        [m->residency_set requestResidency];
    }
#endif
}

lt_metal *lt_metal_create_shared(lt_metal *source, const size_t sizes[LT_N_ARENAS], int *err, char *err_msg,
                                 size_t err_cap)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    lt_metal *m = new lt_metal();
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->cond, NULL);
    m->source = source;
    for (uint32_t a = 0; a < LT_N_ARENAS; a++) m->sizes[a] = from_source(m, a) ? source->sizes[a] : sizes[a];
    m->device = [source->device retain];
    for (size_t i = 0; i < source->libraries.size(); i++) m->libraries.push_back([source->libraries[i] retain]);
    m->attention_splits = source->attention_splits;
    m->warm_pipelines = source->warm_pipelines;
    m->queue = [m->device newCommandQueue];
    int e = 0;
    if (!m->queue) {
        set_error(m, "cannot create a command queue");
        e = LT_METAL_ERR_DEVICE;
    }
    if (!e) e = make_arenas(m, NULL, 0);
    if (!e) {
        m->completion = [[LTMetalCompletion alloc] init];
        m->completion->_m = m;
    }
    *err = e;
    if (err_msg && err_cap) snprintf(err_msg, err_cap, "%s", m->error);
    [pool drain];
    if (e) {
        lt_metal_free(m);
        return NULL;
    }
    return m;
}

lt_metal *lt_metal_create(const size_t sizes[LT_N_ARENAS], const uint8_t *consts, size_t n_consts,
                          const char *library, int *err, char *err_msg, size_t err_cap)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    lt_metal *m = new lt_metal();
    pthread_mutex_init(&m->lock, NULL);
    pthread_cond_init(&m->cond, NULL);
    for (uint32_t a = 0; a < LT_N_ARENAS; a++) m->sizes[a] = a == LT_ARENA_CONST ? n_consts : sizes[a];
    int e = 0;
    m->device = [MTLCreateSystemDefaultDevice() retain];
    m->queue = [m->device newCommandQueue];
    if (!m->device || !m->queue) {
        set_error(m, "no Metal device");
        e = LT_METAL_ERR_DEVICE;
    }
    if (!e) e = load_libraries(m, library);
    if (!e) e = make_arenas(m, consts, n_consts);
    if (!e) {
        m->warm_pipelines = ![m->device supportsFamily:MTLGPUFamilyApple9];
        m->completion = [[LTMetalCompletion alloc] init];
        m->completion->_m = m;
    }
    *err = e;
    if (err_msg && err_cap) snprintf(err_msg, err_cap, "%s", m->error);
    [pool drain];
    if (e) {
        lt_metal_free(m);
        return NULL;
    }
    return m;
}

int lt_metal_add_program(lt_metal *m, const lt_dispatch *prog, uint32_t n)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    m->error[0] = 0;
    int e = check_program(m, prog, n, m->sizes[LT_ARENA_CONST]);
    for (uint32_t i = 0; i < n && !e; i++) {
        uint32_t k = prog[i].kernel;
        if (m->pipelines[k]) continue;
        if (m->source && m->source->pipelines[k]) {
            m->pipelines[k] = [m->source->pipelines[k] retain];
            continue;
        }
        m->pipelines[k] = make_pipeline(m, KERNEL_NAMES[k], k, &e);
        if (m->pipelines[k] && m->source) m->source->pipelines[k] = [m->pipelines[k] retain];  // for the next session
    }
    if (!e) e = prepare_splits(m, prog, n);
    Program p = Program();
    if (!e) e = record(m, prog, n, &p);
    [pool drain];
    if (e) {
        [p.icb release];
        return -e;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (prog[i].kernel == LT_K_SAMPLE) {
            p.sample = prog[i];
            p.has_sample = true;
        }
    }
    m->programs.push_back(p);
    if (m->programs.size() == 1) m->counters.dispatches_per_step = p.n_commands;  // the runtime adds decode first
    return (int)m->programs.size() - 1;
}

void lt_metal_set_attention_splits(lt_metal *m, uint32_t splits) { m->attention_splits = splits; }

void lt_metal_counters_get(const lt_metal *m, lt_metal_counters *out) { *out = m->counters; }

const char *lt_metal_error(const lt_metal *m) { return m->error; }

const char *lt_metal_kernel_name(uint32_t kernel) { return kernel < LT_K_COUNT ? KERNEL_NAMES[kernel] : NULL; }

void lt_metal_free(lt_metal *m)
{
    if (!m) return;
    wait_all(m);
    [m->completion release];
    for (size_t i = 0; i < m->programs.size(); i++) [m->programs[i].icb release];
    for (uint32_t k = 0; k < LT_K_COUNT; k++) [m->pipelines[k] release];
    [m->reduce release];
    [m->workspace release];
    for (size_t i = 0; i < m->libraries.size(); i++) [m->libraries[i] release];
    for (uint32_t a = 0; a < LT_N_ARENAS; a++) [m->arenas[a] release];
    [m->zeros release];
#ifdef LT_METAL_RESIDENCY_SET
    if (m->residency_set) {
        if (@available(macOS 15.0, *)) [m->queue removeResidencySet:m->residency_set];
        [m->residency_set release];
    }
#endif
    [m->queue release];
    [m->device release];
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->cond);
    delete m;
}
