// Test-only fake of the Metal subset in Metal/Metal.h, on GNUstep (manual retain/release).
//
// Kernels run on the CPU through the MSL emulator (tests/msl_emu): a "metallib" here is a text
// file listing emulator-built kernel libraries (.so), one path a line, and `#kernel NAME INDEX...`
// lines with the buffer indices each function declares; a function is the library's
// msl_launch_<name> launcher. Command buffers run in commit order on one worker thread,
// so two command buffers can be in flight while the host encodes the next one; completion
// handlers are called on that thread, as Metal calls them on one of its own.
//
// The fake enforces the documented rules the bridge must follow (a violation makes the command
// buffer complete with MTLCommandBufferStatusError and an error naming the rule; the first
// violation is also kept for fake_metal_violation()):
//   - a pipeline used by an ICB command was created with supportIndirectCommandBuffers = YES;
//   - an ICB command's buffer index < the ICB's maxKernelBufferBindCount, and no buffers are set
//     on an ICB that inherits them;
//   - every [[buffer(i)]] a function declares is bound when it runs (the metallib lists them);
//   - buffer offsets fit 32 bits (ICB offsets are 32-bit) and lie inside the buffer;
//   - every buffer an executed ICB command binds was made resident with useResource(s) on the
//     encoder that executes it;
//   - ICB commands have no setBytes (the command class does not implement it);
//   - private buffers have no CPU-visible contents (contents returns NULL);
//   - on an Apple7/Apple8 device (M1/M2, the default here), every pipeline an executed ICB uses
//     was dispatched directly on the same encoder before (pipelines referenced only from an ICB
//     are not made resident there).
// ICB commands run in order across barriers but in a seeded random order between them (and the
// emulator shuffles threadgroups and threads), so a missing setBarrier gives wrong results.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "msl_runtime.h"  // msl_rt::Launch, the emulator's launcher ABI

namespace {
constexpr NSUInteger MAX_BUFFERS = 31;  // Metal's buffer argument table
constexpr uint64_t STACK_SIZE = 64 * 1024;

std::mutex g_lock;
std::string g_violation;  // first rule violation since the last fake_metal_reset
uint64_t g_seed = 1;
MTLGPUFamily g_family = MTLGPUFamilyApple7;
// Since the last reset, per buffer label: buffers given it, blit copies into them (test hooks)
std::map<std::string, long> g_labeled, g_copies_into;
long g_pipelines;  // compute pipelines created since the last reset

void violation(std::string &pending, const std::string &message)
{
    std::lock_guard<std::mutex> hold(g_lock);
    if (g_violation.empty()) g_violation = message;
    if (pending.empty()) pending = message;
}

std::string str(NSString *s) { return s ? std::string([s UTF8String]) : std::string("(unnamed)"); }

// The fake's GPU timestamps: seconds of the host's monotonic clock (Metal's are mach time).
double host_seconds()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}
}  // namespace

typedef void (*LaunchFn)(const msl_rt::Launch *);

// ------------------------------------------------------------------------------------ resources
@interface FakeBuffer : NSObject <MTLBuffer> {
@public
    unsigned char *_mem;
    NSUInteger _length;
    BOOL _private;
    NSString *_label;
}
@end

@implementation FakeBuffer
- (void)dealloc { free(_mem); [_label release]; [super dealloc]; }
- (void *)contents { return _private ? NULL : _mem; }
- (NSUInteger)length { return _length; }
- (NSString *)label { return _label; }
- (void)setLabel:(NSString *)label
{
    [_label release];
    _label = [label copy];
    std::lock_guard<std::mutex> hold(g_lock);
    g_labeled[std::string([label UTF8String])]++;
}
@end

static std::string buffer_name(FakeBuffer *b)
{
    char tmp[64];
    snprintf(tmp, sizeof tmp, " (%lu bytes)", (unsigned long)b->_length);
    return "buffer \"" + str(b->_label) + "\"" + tmp;
}

@interface FakeFunction : NSObject <MTLFunction> {
@public
    NSString *_name;
    LaunchFn _launch;
    std::vector<NSUInteger> *_declared;  // [[buffer(i)]] indices of the function
}
@end

@implementation FakeFunction
- (void)dealloc { [_name release]; delete _declared; [super dealloc]; }
- (NSString *)name { return _name; }
@end

@interface FakeLibrary : NSObject <MTLLibrary> {
@public
    std::vector<void *> *_handles;
    std::map<std::string, std::vector<NSUInteger> > *_declared;
}
@end

@implementation FakeLibrary
- (void)dealloc { delete _handles; delete _declared; [super dealloc]; }  // handles stay loaded
- (id<MTLFunction>)newFunctionWithName:(NSString *)name
{
    std::string symbol = "msl_launch_" + str(name);
    for (void *h : *_handles) {
        void *fn = dlsym(h, symbol.c_str());
        if (fn) {
            FakeFunction *f = [[FakeFunction alloc] init];
            f->_name = [name copy];
            f->_launch = (LaunchFn)fn;
            f->_declared = new std::vector<NSUInteger>((*_declared)[str(name)]);
            return f;
        }
    }
    return nil;
}
@end

@interface FakePipeline : NSObject <MTLComputePipelineState> {
@public
    FakeFunction *_function;
    BOOL _icb;
}
@end

@implementation FakePipeline
- (void)dealloc { [_function release]; [super dealloc]; }
- (BOOL)supportIndirectCommandBuffers { return _icb; }
@end

@implementation MTLComputePipelineDescriptor
- (void)dealloc { [_computeFunction release]; [_label release]; [super dealloc]; }
- (id<MTLFunction>)computeFunction { return _computeFunction; }
- (void)setComputeFunction:(id<MTLFunction>)f { [f retain]; [_computeFunction release]; _computeFunction = f; }
- (BOOL)supportIndirectCommandBuffers { return _supportIndirectCommandBuffers; }
- (void)setSupportIndirectCommandBuffers:(BOOL)s { _supportIndirectCommandBuffers = s; }
- (NSString *)label { return _label; }
- (void)setLabel:(NSString *)label { [_label release]; _label = [label copy]; }
@end

@implementation MTLIndirectCommandBufferDescriptor
- (MTLIndirectCommandType)commandTypes { return _commandTypes; }
- (void)setCommandTypes:(MTLIndirectCommandType)t { _commandTypes = t; }
- (BOOL)inheritBuffers { return _inheritBuffers; }
- (void)setInheritBuffers:(BOOL)b { _inheritBuffers = b; }
- (BOOL)inheritPipelineState { return _inheritPipelineState; }
- (void)setInheritPipelineState:(BOOL)b { _inheritPipelineState = b; }
- (NSUInteger)maxKernelBufferBindCount { return _maxKernelBufferBindCount; }
- (void)setMaxKernelBufferBindCount:(NSUInteger)n { _maxKernelBufferBindCount = n; }
@end

// ------------------------------------------------------------------------------------ dispatches
// One kernel launch: what a direct dispatch or an ICB command holds (zero = empty; it lives in
// Objective-C ivars, which are zeroed and never constructed).
struct Launch {
    FakePipeline *pipeline;
    FakeBuffer *buffers[MAX_BUFFERS];
    NSUInteger offsets[MAX_BUFFERS];
    MTLSize grid, group;
    bool barrier;
};

// Runs a launch through the emulator; returns an error message or "".
static std::string run_launch(const Launch &l, uint64_t seed)
{
    for (NSUInteger i : *l.pipeline->_function->_declared)
        if (i >= MAX_BUFFERS || !l.buffers[i])
            return "kernel " + str(l.pipeline->_function->_name) + " declares [[buffer(" + std::to_string(i) +
                   ")]] but no buffer is bound at that index";
    void *ptrs[MAX_BUFFERS] = {};
    uint64_t lens[MAX_BUFFERS] = {};
    for (NSUInteger i = 0; i < MAX_BUFFERS; i++) {
        if (!l.buffers[i]) continue;
        ptrs[i] = l.buffers[i]->_mem + l.offsets[i];
        lens[i] = l.buffers[i]->_length - l.offsets[i];
    }
    char error[4096] = "";
    uint64_t no_tg = 0;
    msl_rt::Launch launch = {ptrs, lens, (msl_rt::u32)MAX_BUFFERS,
                             {(msl_rt::u32)l.grid.width, (msl_rt::u32)l.grid.height, (msl_rt::u32)l.grid.depth},
                             {(msl_rt::u32)l.group.width, (msl_rt::u32)l.group.height, (msl_rt::u32)l.group.depth},
                             &no_tg, 0, 1, seed, STACK_SIZE, error, sizeof error};
    l.pipeline->_function->_launch(&launch);
    if (!error[0]) return "";
    // the emulator appends "@@library+offset" frames for its Python front end: keep the message
    std::string message(error);
    return "kernel " + str(l.pipeline->_function->_name) + ": " + message.substr(0, message.find("\n@@"));
}

static std::string check_buffer(FakeBuffer *b, NSUInteger offset, NSUInteger index, const char *what)
{
    char tmp[256];
    if ((uint64_t)offset > 0xFFFFFFFFull) {
        snprintf(tmp, sizeof tmp, "%s: offset %llu at index %lu does not fit 32 bits (ICB buffer offsets are 32-bit)",
                 what, (unsigned long long)offset, (unsigned long)index);
        return tmp;
    }
    if (b && offset > b->_length) {
        snprintf(tmp, sizeof tmp, "%s: offset %lu at index %lu lies past the end of ", what,
                 (unsigned long)offset, (unsigned long)index);
        return tmp + buffer_name(b);
    }
    return "";
}

// ------------------------------------------------------------------------------------ ICB
@class FakeICB;

@interface FakeICBCommand : NSObject <MTLIndirectComputeCommand> {
@public
    FakeICB *_icb;  // not retained: the ICB owns its commands
    NSUInteger _index;
    Launch _launch;
    bool _encoded;
}
@end

@interface FakeICB : NSObject <MTLIndirectCommandBuffer> {
@public
    NSUInteger _maxBind;
    BOOL _inheritBuffers, _inheritPipeline;
    NSMutableArray *_commands;
    NSString *_label;
    std::string *_pending;  // rule violations found while encoding
}
@end

@implementation FakeICBCommand
- (std::string &)pending { return *_icb->_pending; }
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state
{
    FakePipeline *p = (FakePipeline *)state;
    if (_icb->_inheritPipeline)
        violation([self pending], "ICB command: setComputePipelineState on an ICB created with inheritPipelineState = YES");
    if (!p->_icb)
        violation([self pending], "ICB command " + std::to_string(_index) + ": the pipeline of " + str(p->_function->_name) +
                  " was created without supportIndirectCommandBuffers = YES and cannot be used in an indirect command buffer");
    [p retain];
    [_launch.pipeline release];
    _launch.pipeline = p;
}
- (void)setKernelBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index
{
    std::string where = "ICB command " + std::to_string(_index);
    if (_icb->_inheritBuffers)
        violation([self pending], where + ": setKernelBuffer on an ICB created with inheritBuffers = YES");
    if (index >= _icb->_maxBind || index >= MAX_BUFFERS) {
        violation([self pending], where + ": buffer index " + std::to_string(index) + " >= maxKernelBufferBindCount " +
                  std::to_string(_icb->_maxBind));
        return;
    }
    std::string bad = check_buffer((FakeBuffer *)buffer, offset, index, where.c_str());
    if (!bad.empty()) {
        violation([self pending], bad);
        return;
    }
    [(FakeBuffer *)buffer retain];
    [_launch.buffers[index] release];
    _launch.buffers[index] = (FakeBuffer *)buffer;
    _launch.offsets[index] = offset;
}
- (void)concurrentDispatchThreadgroups:(MTLSize)grid threadsPerThreadgroup:(MTLSize)group
{
    _launch.grid = grid;
    _launch.group = group;
    _encoded = true;
}
- (void)setBarrier { _launch.barrier = true; }
- (void)dealloc
{
    [_launch.pipeline release];
    for (NSUInteger i = 0; i < MAX_BUFFERS; i++) [_launch.buffers[i] release];
    [super dealloc];
}
@end

@implementation FakeICB
- (void)dealloc { [_commands release]; [_label release]; delete _pending; [super dealloc]; }
- (NSUInteger)size { return [_commands count]; }
- (id<MTLIndirectComputeCommand>)indirectComputeCommandAtIndex:(NSUInteger)i
{
    if (i >= [_commands count]) {
        violation(*_pending, "indirectComputeCommandAtIndex: " + std::to_string(i) + " >= maxCommandCount " +
                  std::to_string([_commands count]));
        return nil;
    }
    return [_commands objectAtIndex:i];
}
- (NSString *)label { return _label; }
- (void)setLabel:(NSString *)label { [_label release]; _label = [label copy]; }
@end

// ------------------------------------------------------------------------------------ encoding
// Everything a command buffer holds, replayed by the worker thread.
struct Op {
    enum Kind { COMPUTE_BEGIN, DIRECT, USE, EXECUTE, COPY, FILL } kind;
    Launch launch;                        // DIRECT
    std::vector<FakeBuffer *> resources;  // USE (not retained: the bridge keeps them alive)
    FakeICB *icb;                         // EXECUTE
    NSRange range;
    FakeBuffer *src, *dst;                // COPY, FILL (dst)
    NSUInteger src_off, dst_off, size;
    uint8_t value;
};

@interface FakeCommandBuffer : NSObject <MTLCommandBuffer> {
@public
    std::vector<Op> *_ops;
    std::string *_pending;
    NSMutableArray *_handlers;
    MTLCommandBufferStatus _status;
    NSError *_error;
    std::mutex *_done_lock;
    std::condition_variable *_done;
    double _gpu_start, _gpu_end;  // host seconds (CLOCK_MONOTONIC), set when it completes
}
- (void)execute;
@end

@interface FakeComputeEncoder : NSObject <MTLComputeCommandEncoder> {
@public
    FakeCommandBuffer *_cb;
    Launch _state;  // the direct-dispatch binding table
}
@end

@implementation FakeComputeEncoder
- (void)dealloc
{
    [_state.pipeline release];
    for (NSUInteger i = 0; i < MAX_BUFFERS; i++) [_state.buffers[i] release];
    [super dealloc];
}
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state
{
    [(FakePipeline *)state retain];
    [_state.pipeline release];
    _state.pipeline = (FakePipeline *)state;
}
- (void)setBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index
{
    if (index >= MAX_BUFFERS) {
        violation(*_cb->_pending, "setBuffer: index " + std::to_string(index) + " >= 31");
        return;
    }
    std::string bad = check_buffer((FakeBuffer *)buffer, offset, index, "setBuffer");
    if (!bad.empty() && offset > ((FakeBuffer *)buffer)->_length) {  // 64-bit offsets are fine here
        violation(*_cb->_pending, bad);
        return;
    }
    [(FakeBuffer *)buffer retain];
    [_state.buffers[index] release];
    _state.buffers[index] = (FakeBuffer *)buffer;
    _state.offsets[index] = offset;
}
- (void)setBuffers:(const id<MTLBuffer> *)buffers offsets:(const NSUInteger *)offsets withRange:(NSRange)range
{
    for (NSUInteger i = 0; i < range.length; i++)
        [self setBuffer:buffers[i] offset:offsets[i] atIndex:range.location + i];
}
- (void)dispatchThreadgroups:(MTLSize)grid threadsPerThreadgroup:(MTLSize)group
{
    Op op = Op();
    op.kind = Op::DIRECT;
    op.launch = _state;
    op.launch.grid = grid;
    op.launch.group = group;
    [op.launch.pipeline retain];
    for (NSUInteger i = 0; i < MAX_BUFFERS; i++) [op.launch.buffers[i] retain];
    _cb->_ops->push_back(op);
}
- (void)useResource:(id<MTLResource>)resource usage:(MTLResourceUsage)usage
{
    id<MTLResource> one[1] = {resource};
    [self useResources:one count:1 usage:usage];
}
- (void)useResources:(const id<MTLResource> *)resources count:(NSUInteger)count usage:(MTLResourceUsage)usage
{
    Op op = Op();
    op.kind = Op::USE;
    for (NSUInteger i = 0; i < count; i++) op.resources.push_back((FakeBuffer *)resources[i]);
    _cb->_ops->push_back(op);
}
- (void)executeCommandsInBuffer:(id<MTLIndirectCommandBuffer>)icb withRange:(NSRange)range
{
    FakeICB *f = (FakeICB *)icb;
    if (range.location + range.length > [f->_commands count]) {
        violation(*_cb->_pending, "executeCommandsInBuffer: range beyond the ICB's commands");
        return;
    }
    Op op = Op();
    op.kind = Op::EXECUTE;
    op.icb = [f retain];
    op.range = range;
    _cb->_ops->push_back(op);
}
- (void)endEncoding {}
@end

@interface FakeBlitEncoder : NSObject <MTLBlitCommandEncoder> {
@public
    FakeCommandBuffer *_cb;
}
@end

@implementation FakeBlitEncoder
- (void)copyFromBuffer:(id<MTLBuffer>)src sourceOffset:(NSUInteger)so toBuffer:(id<MTLBuffer>)dst
     destinationOffset:(NSUInteger)dof size:(NSUInteger)size
{
    FakeBuffer *s = (FakeBuffer *)src, *d = (FakeBuffer *)dst;
    if (so + size > s->_length || dof + size > d->_length) {
        violation(*_cb->_pending, "copyFromBuffer: range outside " + buffer_name(so + size > s->_length ? s : d));
        return;
    }
    if (so % 4 || dof % 4 || size % 4) {  // macOS's rule for both offsets and the size
        violation(*_cb->_pending, "copyFromBuffer: offsets and size must be multiples of 4");
        return;
    }
    if (s == d && so < dof + size && dof < so + size) {  // undefined results in Metal
        violation(*_cb->_pending, "copyFromBuffer: overlapping ranges of " + buffer_name(d));
        return;
    }
    Op op = Op();
    op.kind = Op::COPY;
    op.src = [s retain];
    op.dst = [d retain];
    op.src_off = so;
    op.dst_off = dof;
    op.size = size;
    _cb->_ops->push_back(op);
    if (d->_label) {
        std::lock_guard<std::mutex> hold(g_lock);
        g_copies_into[std::string([d->_label UTF8String])]++;
    }
}
- (void)fillBuffer:(id<MTLBuffer>)buffer range:(NSRange)range value:(uint8_t)value
{
    FakeBuffer *d = (FakeBuffer *)buffer;
    if (range.location + range.length > d->_length || range.length == 0 || range.location % 4 || range.length % 4) {
        violation(*_cb->_pending, "fillBuffer: range must be non-empty, inside " + buffer_name(d) +
                  " and start and end at multiples of 4");
        return;
    }
    Op op = Op();
    op.kind = Op::FILL;
    op.dst = [d retain];
    op.dst_off = range.location;
    op.size = range.length;
    op.value = value;
    _cb->_ops->push_back(op);
}
- (void)endEncoding {}
@end

// ------------------------------------------------------------------------------------ queue
// One worker thread per process runs committed command buffers in order. Its queue is never
// destroyed: a static condition variable's destructor would block exit while the worker waits.
static std::mutex &q_lock = *new std::mutex;
static std::condition_variable &q_ready = *new std::condition_variable;
static std::deque<FakeCommandBuffer *> &q_items = *new std::deque<FakeCommandBuffer *>;
static bool q_started;

static void worker()
{
    GSRegisterCurrentThread();
    for (;;) {
        FakeCommandBuffer *cb;
        {
            std::unique_lock<std::mutex> hold(q_lock);
            while (q_items.empty()) q_ready.wait(hold);
            cb = q_items.front();
            q_items.pop_front();
        }
        NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
        [cb execute];
        [pool drain];
        [cb release];
    }
}

@implementation FakeCommandBuffer
- (id)init
{
    self = [super init];
    _ops = new std::vector<Op>();
    _pending = new std::string();
    _handlers = [[NSMutableArray alloc] init];
    _done_lock = new std::mutex();
    _done = new std::condition_variable();
    return self;
}
- (void)dealloc
{
    for (Op &op : *_ops) {
        [op.launch.pipeline release];
        for (NSUInteger i = 0; i < MAX_BUFFERS; i++) [op.launch.buffers[i] release];
        [op.icb release];
        [op.src release];
        [op.dst release];
    }
    delete _ops;
    delete _pending;
    delete _done_lock;
    delete _done;
    [_handlers release];
    [_error release];
    [super dealloc];
}
- (id<MTLComputeCommandEncoder>)computeCommandEncoder
{
    FakeComputeEncoder *e = [[[FakeComputeEncoder alloc] init] autorelease];
    e->_cb = self;
    Op op = Op();
    op.kind = Op::COMPUTE_BEGIN;
    _ops->push_back(op);
    return e;
}
- (id<MTLBlitCommandEncoder>)blitCommandEncoder
{
    FakeBlitEncoder *e = [[[FakeBlitEncoder alloc] init] autorelease];
    e->_cb = self;
    return e;
}
- (void)addCompletedHandler:(MTLCommandBufferHandler)handler { [_handlers addObject:handler]; }
- (void)commit
{
    _status = MTLCommandBufferStatusCommitted;
    [self retain];  // released by the worker
    std::lock_guard<std::mutex> hold(q_lock);
    if (!q_started) {
        std::thread(worker).detach();
        q_started = true;
    }
    q_items.push_back(self);
    q_ready.notify_one();
}
- (void)waitUntilCompleted
{
    std::unique_lock<std::mutex> hold(*_done_lock);
    while (_status < MTLCommandBufferStatusCompleted) _done->wait(hold);  // (no ivars in lambdas: GCC)
}
- (MTLCommandBufferStatus)status { return _status; }
- (NSError *)error { return _error; }
// Documented: both stay 0.0 until the GPU finished the command buffer.
- (CFTimeInterval)GPUStartTime
{
    std::lock_guard<std::mutex> hold(*_done_lock);
    return _status >= MTLCommandBufferStatusCompleted ? _gpu_start : 0.0;
}
- (CFTimeInterval)GPUEndTime
{
    std::lock_guard<std::mutex> hold(*_done_lock);
    return _status >= MTLCommandBufferStatusCompleted ? _gpu_end : 0.0;
}

// Runs an ICB range: in order across barriers, shuffled between them; returns an error or "".
- (std::string)runICB:(const Op &)op resident:(const std::set<FakeBuffer *> &)resident
              warmed:(const std::set<FakePipeline *> &)warmed rng:(std::mt19937_64 &)rng
{
    if (!op.icb->_pending->empty()) return *op.icb->_pending;  // broken while it was encoded
    std::vector<FakeICBCommand *> cmds;
    for (NSUInteger i = op.range.location; i < op.range.location + op.range.length; i++) {
        FakeICBCommand *c = [op.icb->_commands objectAtIndex:i];
        std::string where = "ICB command " + std::to_string(i);
        if (!c->_encoded || !c->_launch.pipeline) return where + ": executed but never encoded (no pipeline or dispatch)";
        if (g_family < MTLGPUFamilyApple9 && !warmed.count(c->_launch.pipeline))
            return where + ": pipeline of " + str(c->_launch.pipeline->_function->_name) + " is used only from the ICB on " +
                   "an M1/M2-class GPU: dispatch it directly on this encoder first so it is resident";
        for (NSUInteger b = 0; b < MAX_BUFFERS; b++) {
            FakeBuffer *buf = c->_launch.buffers[b];
            if (buf && !resident.count(buf))
                return where + " (" + str(c->_launch.pipeline->_function->_name) + "): " + buffer_name(buf) + " bound at index " +
                       std::to_string(b) + " was not made resident with useResource(s) on this encoder";
        }
        cmds.push_back(c);
    }
    size_t start = 0;
    while (start < cmds.size()) {
        size_t end = start + 1;
        while (end < cmds.size() && !cmds[end]->_launch.barrier) end++;
        std::shuffle(cmds.begin() + start, cmds.begin() + end, rng);
        for (size_t i = start; i < end; i++) {
            std::string e = run_launch(cmds[i]->_launch, rng());
            if (!e.empty()) return "ICB command " + std::to_string(cmds[i]->_index) + ": " + e;
        }
        start = end;
    }
    return "";
}

- (void)execute
{
    double started = host_seconds();
    std::string failure = *_pending;
    uint64_t seed;
    {
        std::lock_guard<std::mutex> hold(g_lock);
        seed = g_seed++;
    }
    std::mt19937_64 rng(seed);
    std::set<FakeBuffer *> resident;
    std::set<FakePipeline *> warmed;
    for (const Op &op : *_ops) {
        if (!failure.empty()) break;
        switch (op.kind) {
        case Op::COMPUTE_BEGIN:  // residency and warmed pipelines hold per encoder
            resident.clear();
            warmed.clear();
            break;
        case Op::USE:
            resident.insert(op.resources.begin(), op.resources.end());
            break;
        case Op::DIRECT:
            if (!op.launch.pipeline) { failure = "dispatchThreadgroups without a pipeline"; break; }
            warmed.insert(op.launch.pipeline);
            failure = run_launch(op.launch, rng());
            break;
        case Op::EXECUTE:
            failure = [self runICB:op resident:resident warmed:warmed rng:rng];
            break;
        case Op::COPY:
            memmove(op.dst->_mem + op.dst_off, op.src->_mem + op.src_off, op.size);
            break;
        case Op::FILL:
            memset(op.dst->_mem + op.dst_off, op.value, op.size);
            break;
        }
    }
    if (!failure.empty()) {
        {
            std::lock_guard<std::mutex> hold(g_lock);
            if (g_violation.empty()) g_violation = failure;
        }
        NSDictionary *info = [NSDictionary dictionaryWithObject:[NSString stringWithUTF8String:failure.c_str()]
                                                         forKey:NSLocalizedDescriptionKey];
        _error = [[NSError alloc] initWithDomain:@"FakeMetal" code:1 userInfo:info];
    }
    {
        std::lock_guard<std::mutex> hold(*_done_lock);
        _gpu_start = started;
        _gpu_end = host_seconds();
        _status = failure.empty() ? MTLCommandBufferStatusCompleted : MTLCommandBufferStatusError;
    }
    for (NSUInteger i = 0; i < [_handlers count]; i++) [[_handlers objectAtIndex:i] commandBufferCompleted:self];
    _done->notify_all();
}
@end

@interface FakeQueue : NSObject <MTLCommandQueue>
@end

@implementation FakeQueue
- (id<MTLCommandBuffer>)commandBuffer { return [[[FakeCommandBuffer alloc] init] autorelease]; }
@end

// ------------------------------------------------------------------------------------ device
@interface FakeDevice : NSObject <MTLDevice>
@end

@implementation FakeDevice
- (NSString *)name { return @"Lattice fake Metal (MSL emulator)"; }
- (id<MTLCommandQueue>)newCommandQueue { return [[FakeQueue alloc] init]; }
- (id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options
{
    FakeBuffer *b = [[FakeBuffer alloc] init];
    // Metal does not promise zeroed memory: poison, so code relying on it fails
    b->_mem = (unsigned char *)malloc(length ? length : 1);
    memset(b->_mem, 0xA5, length);
    b->_length = length;
    b->_private = (options & (0xF << 4)) == MTLResourceStorageModePrivate;
    return b;
}
- (id<MTLLibrary>)newLibraryWithURL:(NSURL *)url error:(NSError **)error
{
    std::ifstream in([[url path] UTF8String]);
    std::string line, problem;
    std::vector<void *> handles;
    std::map<std::string, std::vector<NSUInteger> > declared;
    if (!in) problem = "cannot read " + str([url path]);
    while (problem.empty() && std::getline(in, line)) {
        if (line.empty()) continue;
        if (line.compare(0, 8, "#kernel ") == 0) {  // "#kernel NAME INDEX..."
            std::istringstream fields(line.substr(8));
            std::string name;
            NSUInteger index;
            fields >> name;
            while (fields >> index) declared[name].push_back(index);
            continue;
        }
        void *h = dlopen(line.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) problem = std::string("cannot load kernel library: ") + dlerror();
        else handles.push_back(h);
    }
    if (!problem.empty()) {
        if (error) {
            NSDictionary *info = [NSDictionary dictionaryWithObject:[NSString stringWithUTF8String:problem.c_str()]
                                                             forKey:NSLocalizedDescriptionKey];
            *error = [NSError errorWithDomain:@"FakeMetal" code:2 userInfo:info];
        }
        return nil;
    }
    FakeLibrary *lib = [[FakeLibrary alloc] init];
    lib->_handles = new std::vector<void *>(handles);
    lib->_declared = new std::map<std::string, std::vector<NSUInteger> >(declared);
    return lib;
}
- (id<MTLComputePipelineState>)newComputePipelineStateWithDescriptor:(MTLComputePipelineDescriptor *)d
                                                             options:(MTLPipelineOption)options
                                                          reflection:(MTLComputePipelineReflection **)reflection
                                                               error:(NSError **)error
{
    FakePipeline *p = [[FakePipeline alloc] init];
    p->_function = (FakeFunction *)[[d computeFunction] retain];
    {
        std::lock_guard<std::mutex> hold(g_lock);
        g_pipelines++;
    }
    p->_icb = [d supportIndirectCommandBuffers];
    return p;
}
- (id<MTLIndirectCommandBuffer>)newIndirectCommandBufferWithDescriptor:(MTLIndirectCommandBufferDescriptor *)d
                                                       maxCommandCount:(NSUInteger)n
                                                               options:(MTLResourceOptions)options
{
    FakeICB *icb = [[FakeICB alloc] init];
    icb->_pending = new std::string();
    if ([d commandTypes] != MTLIndirectCommandTypeConcurrentDispatch)
        violation(*icb->_pending, "ICB descriptor: commandTypes must be concurrent dispatch for compute commands");
    icb->_maxBind = [d maxKernelBufferBindCount];
    icb->_inheritBuffers = [d inheritBuffers];
    icb->_inheritPipeline = [d inheritPipelineState];
    icb->_commands = [[NSMutableArray alloc] initWithCapacity:n];
    for (NSUInteger i = 0; i < n; i++) {
        FakeICBCommand *c = [[FakeICBCommand alloc] init];
        c->_icb = icb;
        c->_index = i;
        [icb->_commands addObject:c];
        [c release];
    }
    return icb;
}
- (BOOL)supportsFamily:(MTLGPUFamily)family { return family <= g_family; }
@end

id<MTLDevice> MTLCreateSystemDefaultDevice(void)
{
    static FakeDevice *device;
    std::lock_guard<std::mutex> hold(g_lock);
    if (!device) device = [[FakeDevice alloc] init];
    return [device retain];  // a Create function: the caller owns the result
}

// ------------------------------------------------------------------------------------ test hooks
extern "C" {
// The first rule violation since the last reset ("" if none).
const char *fake_metal_violation(void)
{
    static std::string copy;
    std::lock_guard<std::mutex> hold(g_lock);
    copy = g_violation;
    return copy.c_str();
}

// Buffers labeled `label` since the last reset (the bridge labels each arena it allocates), and
// blit copies encoded into buffers with that label (uploads to private arenas).
long fake_metal_buffers_labeled(const char *label)
{
    std::lock_guard<std::mutex> hold(g_lock);
    return g_labeled[label];
}

long fake_metal_pipelines_created(void)
{
    std::lock_guard<std::mutex> hold(g_lock);
    return g_pipelines;
}

long fake_metal_copies_into(const char *label)
{
    std::lock_guard<std::mutex> hold(g_lock);
    return g_copies_into[label];
}

// Clears the violation and the counters, seeds the ICB shuffle, and picks the GPU family the device reports
// (1007 = Apple7 / M1 ... 1009 = Apple9 / M3).
void fake_metal_reset(uint64_t seed, int64_t family)
{
    std::lock_guard<std::mutex> hold(g_lock);
    g_violation.clear();
    g_labeled.clear();
    g_copies_into.clear();
    g_pipelines = 0;
    g_seed = seed;
    g_family = (MTLGPUFamily)family;
}
}
