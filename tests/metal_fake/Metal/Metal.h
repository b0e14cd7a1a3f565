/* Test-only stand-in for Apple's <Metal/Metal.h>: exactly the subset objc/lattice_metal.mm uses on
 * Linux, declared from Apple's documented signatures (facts, not Apple's text). Each declaration
 * names the documentation page it was checked against, relative to
 * https://developer.apple.com/documentation/metal/ (checked 2026-11 through the docs corpus; enum
 * values cross-checked with metal-cpp's headers).
 *
 * Deliberate differences, all forced by GCC's Objective-C (no blocks, no @available):
 *   - MTLCommandBufferHandler is a block type on Apple. Here it is an object answering
 *     -commandBufferCompleted:, which the fake calls where Metal would call the block; the bridge
 *     passes that object here and wraps the same call in a block on Apple (see lattice_metal.mm).
 *   - MTLResidencySet (macOS 15) and newLibraryWithSource: are used by the bridge only under
 *     __APPLE__, so they are not declared here.
 * Everything else has Apple's selector, argument and return types.
 */
#ifndef LATTICE_FAKE_METAL_H
#define LATTICE_FAKE_METAL_H

#import <Foundation/Foundation.h>

/* CFTimeInterval: CoreFoundation's seconds as a double (GNUstep base has no CoreFoundation) */
typedef double CFTimeInterval;

/* mtlsize, mtlsizemake(_:_:_:) */
typedef struct { NSUInteger width, height, depth; } MTLSize;
static inline MTLSize MTLSizeMake(NSUInteger w, NSUInteger h, NSUInteger d) { MTLSize s = {w, h, d}; return s; }

/* mtlresourceoptions: storage mode in bits 4..7 (MTLResourceStorageModeShift = 4);
 * mtlstoragemode: shared 0, managed 1, private 2 */
typedef NSUInteger MTLResourceOptions;
enum {
    MTLResourceStorageModeShared = 0UL << 4,
    MTLResourceStorageModePrivate = 2UL << 4
};

/* mtlresourceusage: read 1, write 2 */
typedef NSUInteger MTLResourceUsage;
enum { MTLResourceUsageRead = 1, MTLResourceUsageWrite = 2 };

/* mtlindirectcommandtype: concurrentDispatch = 1 << 5 */
typedef NSUInteger MTLIndirectCommandType;
enum { MTLIndirectCommandTypeConcurrentDispatch = 1 << 5 };

/* mtlpipelineoption: none 0 */
typedef NSUInteger MTLPipelineOption;
enum { MTLPipelineOptionNone = 0 };

/* mtlgpufamily: apple7 1007 (M1), apple8 1008 (M2), apple9 1009 (M3) */
typedef NSInteger MTLGPUFamily;
enum { MTLGPUFamilyApple7 = 1007, MTLGPUFamilyApple8 = 1008, MTLGPUFamilyApple9 = 1009 };

/* mtlcommandbufferstatus: notEnqueued 0 ... completed 4, error 5 */
typedef NSUInteger MTLCommandBufferStatus;
enum {
    MTLCommandBufferStatusNotEnqueued = 0,
    MTLCommandBufferStatusEnqueued = 1,
    MTLCommandBufferStatusCommitted = 2,
    MTLCommandBufferStatusScheduled = 3,
    MTLCommandBufferStatusCompleted = 4,
    MTLCommandBufferStatusError = 5
};

@protocol MTLDevice, MTLCommandBuffer;
@class MTLComputePipelineReflection;  /* mtlcomputepipelinereflection (the bridge passes NULL) */

/* mtlresource: label (mtlresource/label) */
@protocol MTLResource <NSObject>
@property (copy) NSString *label;
@end

/* mtlbuffer: contents(), length */
@protocol MTLBuffer <MTLResource>
- (void *)contents;
@property (readonly) NSUInteger length;
@end

/* mtlfunction */
@protocol MTLFunction <NSObject>
@property (readonly) NSString *name;
@end

/* mtllibrary/makefunction(name:) = newFunctionWithName: */
@protocol MTLLibrary <NSObject>
- (id<MTLFunction>)newFunctionWithName:(NSString *)functionName;
@end

/* mtlcomputepipelinestate: supportIndirectCommandBuffers (read-only, macOS 11) */
@protocol MTLComputePipelineState <NSObject>
@property (readonly) BOOL supportIndirectCommandBuffers;
@end

/* mtlcomputepipelinedescriptor: computeFunction, supportIndirectCommandBuffers, label */
@interface MTLComputePipelineDescriptor : NSObject {
    id<MTLFunction> _computeFunction;
    BOOL _supportIndirectCommandBuffers;
    NSString *_label;
}
- (id<MTLFunction>)computeFunction;
- (void)setComputeFunction:(id<MTLFunction>)function;
- (BOOL)supportIndirectCommandBuffers;
- (void)setSupportIndirectCommandBuffers:(BOOL)support;
- (NSString *)label;
- (void)setLabel:(NSString *)label;
@end

/* mtlindirectcommandbufferdescriptor: commandTypes, inheritBuffers, inheritPipelineState,
 * maxKernelBufferBindCount */
@interface MTLIndirectCommandBufferDescriptor : NSObject {
    MTLIndirectCommandType _commandTypes;
    BOOL _inheritBuffers, _inheritPipelineState;
    NSUInteger _maxKernelBufferBindCount;
}
- (MTLIndirectCommandType)commandTypes;
- (void)setCommandTypes:(MTLIndirectCommandType)types;
- (BOOL)inheritBuffers;
- (void)setInheritBuffers:(BOOL)inherit;
- (BOOL)inheritPipelineState;
- (void)setInheritPipelineState:(BOOL)inherit;
- (NSUInteger)maxKernelBufferBindCount;
- (void)setMaxKernelBufferBindCount:(NSUInteger)count;
@end

/* mtlindirectcomputecommand: setComputePipelineState(_:), setKernelBuffer(_:offset:at:),
 * concurrentDispatchThreadgroups(_:threadsPerThreadgroup:),
 * setBarrier(). It has no setBytes (documented: ICB commands take arguments from buffers only). */
@protocol MTLIndirectComputeCommand <NSObject>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)pipelineState;
- (void)setKernelBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)concurrentDispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
- (void)setBarrier;
@end

/* mtlindirectcommandbuffer: size, indirectComputeCommandAtIndex: (indirectcomputecommand(at:)) */
@protocol MTLIndirectCommandBuffer <MTLResource>
@property (readonly) NSUInteger size;
- (id<MTLIndirectComputeCommand>)indirectComputeCommandAtIndex:(NSUInteger)commandIndex;
@end

/* mtlcommandencoder: endEncoding() */
@protocol MTLCommandEncoder <NSObject>
- (void)endEncoding;
@end

/* mtlcomputecommandencoder: setComputePipelineState(_:), setBuffer(_:offset:index:),
 * setBuffers:offsets:withRange: (C arrays + an NSRange of indices), dispatchThreadgroups(_:threadsPerThreadgroup:), useResource(_:usage:),
 * useResources:count:usage: (an `id<MTLResource> const[]`), executeCommandsInBuffer:withRange:
 * (an NSRange; at most 16384 commands on Mac2-family GPUs) */
@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setBuffers:(const id<MTLBuffer> *)buffers offsets:(const NSUInteger *)offsets withRange:(NSRange)range;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
- (void)useResource:(id<MTLResource>)resource usage:(MTLResourceUsage)usage;
- (void)useResources:(const id<MTLResource> *)resources count:(NSUInteger)count usage:(MTLResourceUsage)usage;
- (void)executeCommandsInBuffer:(id<MTLIndirectCommandBuffer>)indirectCommandBuffer
                      withRange:(NSRange)executionRange;
@end

/* mtlblitcommandencoder: copy(from:sourceOffset:to:destinationOffset:size:) =
 * copyFromBuffer:sourceOffset:toBuffer:destinationOffset:size:, fill(buffer:range:value:) =
 * fillBuffer:range:value: (on macOS the copy's offsets and size, and the fill range's start and
 * length, are multiples of 4; a copy within one buffer must not overlap) */
@protocol MTLBlitCommandEncoder <MTLCommandEncoder>
- (void)fillBuffer:(id<MTLBuffer>)buffer range:(NSRange)range value:(uint8_t)value;
- (void)copyFromBuffer:(id<MTLBuffer>)sourceBuffer sourceOffset:(NSUInteger)sourceOffset
              toBuffer:(id<MTLBuffer>)destinationBuffer destinationOffset:(NSUInteger)destinationOffset
                  size:(NSUInteger)size;
@end

/* mtlcommandbufferhandler: `void (^)(id<MTLCommandBuffer>)`. GCC has no blocks, so there the fake
 * takes an object and sends it -commandBufferCompleted: (see the file comment); with blocks (clang
 * -fblocks: a syntax check of the bridge's Apple branch) it is Apple's block type. */
@protocol LTFakeCompletedHandler <NSObject>
- (void)commandBufferCompleted:(id<MTLCommandBuffer>)commandBuffer;
@end
#if defined(__BLOCKS__)
typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);
#else
typedef id<LTFakeCompletedHandler> MTLCommandBufferHandler;
#endif

/* mtlcommandbuffer: computeCommandEncoder(), blitCommandEncoder(), addCompletedHandler(_:),
 * commit(), waitUntilCompleted(), status, error, gpuStartTime / gpuEndTime (Objective-C
 * GPUStartTime / GPUEndTime, macOS 10.15: host times in seconds, relative to mach time, that stay
 * 0.0 until the GPU finished the command buffer) */
@protocol MTLCommandBuffer <NSObject>
- (id<MTLComputeCommandEncoder>)computeCommandEncoder;
- (id<MTLBlitCommandEncoder>)blitCommandEncoder;
- (void)addCompletedHandler:(MTLCommandBufferHandler)block;
- (void)commit;
- (void)waitUntilCompleted;
@property (readonly) MTLCommandBufferStatus status;
@property (readonly) NSError *error;
@property (readonly) CFTimeInterval GPUStartTime;
@property (readonly) CFTimeInterval GPUEndTime;
@end

/* mtlcommandqueue: makeCommandBuffer() = commandBuffer */
@protocol MTLCommandQueue <NSObject>
- (id<MTLCommandBuffer>)commandBuffer;
@end

/* mtldevice: name, newCommandQueue (makeCommandQueue()), newBufferWithLength:options:
 * (makeBuffer(length:options:)), newLibraryWithURL:error: (makeLibrary(URL:)),
 * newComputePipelineStateWithDescriptor:options:reflection:error:
 * (makeComputePipelineState(descriptor:options:reflection:)),
 * newIndirectCommandBufferWithDescriptor:maxCommandCount:options:
 * (makeIndirectCommandBuffer(descriptor:maxCommandCount:options:)), supportsFamily: */
@protocol MTLDevice <NSObject>
@property (readonly) NSString *name;
- (id<MTLCommandQueue>)newCommandQueue;
- (id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options;
- (id<MTLLibrary>)newLibraryWithURL:(NSURL *)url error:(NSError **)error;
- (id<MTLComputePipelineState>)newComputePipelineStateWithDescriptor:(MTLComputePipelineDescriptor *)descriptor
                                                             options:(MTLPipelineOption)options
                                                          reflection:(MTLComputePipelineReflection **)reflection
                                                               error:(NSError **)error;
- (id<MTLIndirectCommandBuffer>)newIndirectCommandBufferWithDescriptor:(MTLIndirectCommandBufferDescriptor *)descriptor
                                                       maxCommandCount:(NSUInteger)maxCount
                                                               options:(MTLResourceOptions)options;
- (BOOL)supportsFamily:(MTLGPUFamily)gpuFamily;
@end

/* mtlcreatesystemdefaultdevice() */
#ifdef __cplusplus
extern "C"
#endif
id<MTLDevice> MTLCreateSystemDefaultDevice(void);

#endif /* LATTICE_FAKE_METAL_H */
