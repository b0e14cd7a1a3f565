// Apple GPU load for lattice-bench (objc/lattice_load.h): short compute dispatches of
// metal/load.metal's busy loop, timed by the GPU's own timestamps.
//
// Manual retain/release like lattice_metal.mm (Apple clang -fno-objc-arc; GCC + GNUstep against
// tests/metal_fake on Linux). Objects from new*/alloc are released in lt_load_free; the command
// buffer and encoder of a burst are autoreleased inside the burst's pool.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <stdio.h>
#include <string.h>

#include <string>

#include "lattice_load.h"

struct lt_load {
    id<MTLDevice> device;
    id<MTLCommandQueue> queue;
    id<MTLLibrary> library;
    id<MTLComputePipelineState> pipeline;
    id<MTLBuffer> iterations;  // the kernel's constant (shared storage: written by the host per burst)
    id<MTLBuffer> out;         // one float per thread
    uint32_t threadgroups, threads;
    std::string error;
};

static const char *describe_error(NSError *e) { return e ? [[e localizedDescription] UTF8String] : "unknown error"; }

extern "C" lt_load *lt_load_create(const char *metallib, uint32_t threadgroups, uint32_t threads_per_threadgroup,
                                   char *err_msg, size_t err_cap)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    lt_load *l = new lt_load();
    l->threadgroups = threadgroups;
    l->threads = threads_per_threadgroup;
    std::string why;
    NSError *e = nil;
    id<MTLFunction> fn = nil;
    if (!threadgroups || !threads_per_threadgroup) {
        why = "threadgroups and threads per threadgroup must be positive";
    } else if (!(l->device = MTLCreateSystemDefaultDevice())) {
        why = "no Metal device";
    } else if (!(l->library = [l->device newLibraryWithURL:[NSURL fileURLWithPath:[NSString stringWithUTF8String:metallib]]
                                                    error:&e])) {
        why = std::string("cannot load ") + metallib + ": " + describe_error(e);
    } else if (!(fn = [l->library newFunctionWithName:@"lt_load_spin"])) {
        why = std::string(metallib) + " has no kernel function lt_load_spin (metal/load.metal)";
    } else {
        MTLComputePipelineDescriptor *desc = [[[MTLComputePipelineDescriptor alloc] init] autorelease];
        [desc setComputeFunction:fn];
        [desc setLabel:@"lt_load_spin"];
        l->pipeline = [l->device newComputePipelineStateWithDescriptor:desc options:MTLPipelineOptionNone
                                                            reflection:NULL error:&e];
        l->queue = [l->device newCommandQueue];
        l->iterations = [l->device newBufferWithLength:sizeof(uint32_t) options:MTLResourceStorageModeShared];
        l->out = [l->device newBufferWithLength:(NSUInteger)threadgroups * threads_per_threadgroup * sizeof(float)
                                        options:MTLResourceStorageModeShared];
        if (!l->pipeline) why = std::string("pipeline lt_load_spin: ") + describe_error(e);
        else if (!l->queue || !l->iterations || !l->out) why = "cannot create the command queue or buffers";
    }
    [fn release];
    [pool drain];
    if (!why.empty()) {
        snprintf(err_msg, err_cap, "Metal load: %s", why.c_str());
        lt_load_free(l);
        return NULL;
    }
    return l;
}

extern "C" int lt_load_burst(lt_load *l, uint32_t iterations, double *gpu_seconds)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    *(uint32_t *)[l->iterations contents] = iterations;
    id<MTLCommandBuffer> cb = [l->queue commandBuffer];
    id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
    [enc setComputePipelineState:l->pipeline];
    [enc setBuffer:l->iterations offset:0 atIndex:0];
    [enc setBuffer:l->out offset:0 atIndex:1];
    [enc dispatchThreadgroups:MTLSizeMake(l->threadgroups, 1, 1) threadsPerThreadgroup:MTLSizeMake(l->threads, 1, 1)];
    [enc endEncoding];
    [cb commit];
    [cb waitUntilCompleted];
    int rc = 0;
    // GPUStartTime / GPUEndTime are host times in seconds, 0.0 until the command buffer completed
    double start = [cb GPUStartTime], end = [cb GPUEndTime];
    if ([cb status] != MTLCommandBufferStatusCompleted) {
        l->error = std::string("the load's command buffer failed: ") + describe_error([cb error]);
        rc = -1;
    } else if (!(start > 0.0 && end >= start)) {
        char tmp[160];
        snprintf(tmp, sizeof tmp, "the load's command buffer reported no GPU time (GPUStartTime %.9f, GPUEndTime %.9f)",
                 start, end);
        l->error = tmp;
        rc = -1;
    } else {
        *gpu_seconds = end - start;
    }
    [pool drain];
    return rc;
}

extern "C" const char *lt_load_error(const lt_load *l) { return l->error.c_str(); }

extern "C" void lt_load_free(lt_load *l)
{
    if (!l) return;
    [l->out release];
    [l->iterations release];
    [l->pipeline release];
    [l->queue release];
    [l->library release];
    [l->device release];
    delete l;
}
