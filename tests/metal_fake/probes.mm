// Client code that breaks one documented Metal rule at a time, to show that the fake catches it
// (tests/test_metal_bridge.py). Each scenario records one ICB command running lt_elementwise
// (COPY of 64 floats, a -> out) and runs it; "ok" follows every rule.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <string.h>

#include "../../metal/lattice_shared.h"

static const uint32_t N = 64;

extern "C" const char *fake_metal_violation(void);

// Returns 0 if the command ran and copied a to out, 1 if it did not (the fake's message in msg),
// -1 on a setup failure.
extern "C" int fake_probe(const char *scenario, const char *metallib, char *msg, size_t cap)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    bool no_icb_flag = !strcmp(scenario, "no_icb_support"), bind_index = !strcmp(scenario, "bind_index");
    bool not_resident = !strcmp(scenario, "not_resident"), offset_64 = !strcmp(scenario, "offset_64bit");
    bool no_warmup = !strcmp(scenario, "no_warmup"), unbound = !strcmp(scenario, "unbound_buffer");
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    id<MTLCommandQueue> queue = [device newCommandQueue];
    id<MTLLibrary> lib = [device newLibraryWithURL:[NSURL fileURLWithPath:[NSString stringWithUTF8String:metallib]] error:NULL];
    id<MTLFunction> fn = [lib newFunctionWithName:@"lt_elementwise"];
    if (!fn) {
        snprintf(msg, cap, "setup: no lt_elementwise in %s", metallib);
        [pool drain];
        return -1;
    }
    MTLComputePipelineDescriptor *pd = [[[MTLComputePipelineDescriptor alloc] init] autorelease];
    [pd setComputeFunction:fn];
    [pd setSupportIndirectCommandBuffers:!no_icb_flag];
    id<MTLComputePipelineState> pipeline = [device newComputePipelineStateWithDescriptor:pd options:MTLPipelineOptionNone
                                                                              reflection:NULL error:NULL];
    id<MTLBuffer> args = [device newBufferWithLength:sizeof(lt_elementwise_args) options:MTLResourceStorageModeShared];
    id<MTLBuffer> step = [device newBufferWithLength:sizeof(lt_step_args) options:MTLResourceStorageModeShared];
    id<MTLBuffer> a = [device newBufferWithLength:N * 4 options:MTLResourceStorageModeShared];
    id<MTLBuffer> out = [device newBufferWithLength:N * 4 options:MTLResourceStorageModeShared];
    [out setLabel:@"out"];
    lt_elementwise_args ea = {LT_EW_COPY, N, N, N, N, {0, 0, 0}};
    memcpy([args contents], &ea, sizeof ea);
    memset([step contents], 0, sizeof(lt_step_args));
    ((lt_step_args *)[step contents])->n_tokens = 1;
    for (uint32_t i = 0; i < N; i++) ((float *)[a contents])[i] = (float)i;
    memset([out contents], 0, N * 4);

    MTLIndirectCommandBufferDescriptor *d = [[[MTLIndirectCommandBufferDescriptor alloc] init] autorelease];
    [d setCommandTypes:MTLIndirectCommandTypeConcurrentDispatch];
    [d setInheritBuffers:NO];
    [d setInheritPipelineState:NO];
    [d setMaxKernelBufferBindCount:bind_index ? 4 : 5];  // lt_elementwise uses slots 0..4
    id<MTLIndirectCommandBuffer> icb = [device newIndirectCommandBufferWithDescriptor:d maxCommandCount:1 options:0];
    id<MTLIndirectComputeCommand> cmd = [icb indirectComputeCommandAtIndex:0];
    [cmd setComputePipelineState:pipeline];
    [cmd setKernelBuffer:args offset:0 atIndex:0];
    [cmd setKernelBuffer:step offset:0 atIndex:1];
    [cmd setKernelBuffer:a offset:0 atIndex:2];
    if (!unbound) [cmd setKernelBuffer:a offset:0 atIndex:3];
    [cmd setKernelBuffer:out offset:offset_64 ? (NSUInteger)1 << 32 : 0 atIndex:4];
    [cmd concurrentDispatchThreadgroups:MTLSizeMake(1, 1, 1) threadsPerThreadgroup:MTLSizeMake(32, 1, 1)];

    id<MTLCommandBuffer> cb = [queue commandBuffer];
    id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
    id<MTLResource> all[4] = {args, step, a, out};
    [enc useResources:all count:not_resident ? 3 : 4 usage:MTLResourceUsageRead | MTLResourceUsageWrite];
    if (!no_warmup) {  // M1/M2: a direct dispatch makes the pipeline resident (n_tokens = 0: no-op)
        id<MTLBuffer> zeros = [device newBufferWithLength:256 options:MTLResourceStorageModeShared];
        memset([zeros contents], 0, 256);
        [enc setComputePipelineState:pipeline];
        for (NSUInteger s = 0; s < 5; s++) [enc setBuffer:zeros offset:0 atIndex:s];
        [enc dispatchThreadgroups:MTLSizeMake(1, 1, 1) threadsPerThreadgroup:MTLSizeMake(1, 1, 1)];
        [zeros release];
    }
    [enc executeCommandsInBuffer:icb withRange:NSMakeRange(0, 1)];
    [enc endEncoding];
    [cb commit];
    [cb waitUntilCompleted];

    int result = 0;
    if ([cb status] == MTLCommandBufferStatusError) {
        snprintf(msg, cap, "%s", [[[cb error] localizedDescription] UTF8String]);
        result = 1;
    } else {
        for (uint32_t i = 0; i < N; i++)
            if (((float *)[out contents])[i] != (float)i) result = 1;
        snprintf(msg, cap, "%s", result ? "wrong output" : "");
    }
    [icb release];
    [args release];
    [step release];
    [a release];
    [out release];
    [pipeline release];
    [fn release];
    [lib release];
    [queue release];
    [pool drain];
    return result;
}

// Whether an ICB command answers setBytes:length:atIndex: (it must not: ICB commands take their
// arguments from buffers only).
extern "C" int fake_icb_command_has_set_bytes(void)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    MTLIndirectCommandBufferDescriptor *d = [[[MTLIndirectCommandBufferDescriptor alloc] init] autorelease];
    [d setCommandTypes:MTLIndirectCommandTypeConcurrentDispatch];
    [d setMaxKernelBufferBindCount:4];
    id<MTLIndirectCommandBuffer> icb = [device newIndirectCommandBufferWithDescriptor:d maxCommandCount:1 options:0];
    int has = [[icb indirectComputeCommandAtIndex:0] respondsToSelector:@selector(setBytes:length:atIndex:)] ? 1 : 0;
    [icb release];
    [pool drain];
    return has;
}

// One blit command buffer over a new buffer of `length` bytes on a fresh device, committed and
// waited for: a fill of the whole buffer with 7 (copy NULL), or a copy within it (copy: source
// offset, destination offset, size). times (if not NULL): GPUStartTime / GPUEndTime read before
// commit (times[0], times[1]) and after waitUntilCompleted (times[2], times[3]). Returns the
// command buffer's final status (a rule the fake enforces: in fake_metal_violation()).
static long probe_blit(NSUInteger length, MTLResourceOptions storage, const unsigned long *copy, double *times)
{
    NSAutoreleasePool *pool = [[NSAutoreleasePool alloc] init];
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    id<MTLCommandQueue> queue = [device newCommandQueue];
    id<MTLBuffer> buffer = [device newBufferWithLength:length options:storage];
    id<MTLCommandBuffer> cb = [queue commandBuffer];
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    if (copy)
        [blit copyFromBuffer:buffer sourceOffset:copy[0] toBuffer:buffer destinationOffset:copy[1] size:copy[2]];
    else
        [blit fillBuffer:buffer range:NSMakeRange(0, length) value:7];
    [blit endEncoding];
    if (times) {
        times[0] = [cb GPUStartTime];
        times[1] = [cb GPUEndTime];
    }
    [cb commit];
    [cb waitUntilCompleted];
    if (times) {
        times[2] = [cb GPUStartTime];
        times[3] = [cb GPUEndTime];
    }
    long status = (long)[cb status];
    [buffer release];
    [queue release];
    [device release];
    [pool drain];
    return status;
}

// The GPU timestamps' rule: one blit fill of 1 MiB, its times before commit and after completion.
extern "C" long fake_probe_gpu_times(double out[4])
{
    return probe_blit(1 << 20, MTLResourceStorageModeShared, NULL, out);
}

// The blit copy rules: one copy within a 256-byte private buffer.
extern "C" long fake_probe_blit_copy(unsigned long src_off, unsigned long dst_off, unsigned long size)
{
    const unsigned long copy[3] = {src_off, dst_off, size};
    return probe_blit(256, MTLResourceStorageModePrivate, copy, NULL);
}
