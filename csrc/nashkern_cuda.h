/* nashkern CUDA kernels: the C interface of nashkern/_nashkern_cuda.so (backend="cuda").
 *
 * The shared library is plain CUDA C++ (no torch headers); Python loads it with ctypes
 * (nashkern/backends/cuda/library.py), allocates every tensor with torch and passes one struct
 * per call: raw pointers, sizes, element strides, dtype codes, the scalars and a
 * NashkernLaunch (the torch stream as an integer, or host emulation).
 * The math and the packed layouts are those of DESIGN.md:
 *   stats [5, N] float32, rows LOGPROBS, ENTROPY, REF_LOGPROBS, KL, MIXTURE_LOGPROBS;
 *   lse   [3, N] float32, rows L_a, L_b, L_m.
 *
 * Conventions shared by every entry point
 *   - Return 0 on success; a positive value is a cudaError_t (from the launch), a negative value
 *     one of the NASHKERN_E* codes below. nashkern_error_string() names both. Kernels run
 *     asynchronously on `stream`: execution errors surface at the next synchronising call.
 *   - Logits are [G, R, V] views with unit stride over V: row n = g * R + r starts at element
 *     g * stride_g + r * stride_r of its tensor. Policy and reference may differ in dtype and
 *     strides. Rows whose start is not 16-byte aligned are handled (scalar prologue; a
 *     coalesced scalar path when the tensors of a row cannot be aligned together).
 *   - dtype codes: NASHKERN_DTYPE_*. Sizes and strides are int64 (long long), in elements.
 *   - Launch planning, device and stream: the NashkernLaunch of every argument struct. With
 *     `emulate` set, the same kernel code runs on the host, block by block and thread by thread
 *     (host pointers); it exists so that the kernels' arithmetic can be tested on machines
 *     without a GPU; it is slow and single-threaded.
 */
#ifndef NASHKERN_CUDA_H_
#define NASHKERN_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define NASHKERN_API __attribute__((visibility("default")))
#else
#define NASHKERN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or struct below changes; nashkern/backends/cuda/library.py
 * refuses a library of another version. */
#define NASHKERN_CUDA_ABI_VERSION 2

/* Element types of logits (and of their gradients). */
#define NASHKERN_DTYPE_FLOAT32 0
#define NASHKERN_DTYPE_BFLOAT16 1
#define NASHKERN_DTYPE_FLOAT16 2

/* Argument errors (negative, so that they never collide with a cudaError_t). */
#define NASHKERN_EINVAL_DTYPE (-1)     /* unknown dtype code */
#define NASHKERN_EINVAL_SIZE (-2)      /* a size out of range (N, V < 1, V >= 2^31, ...) */
#define NASHKERN_EINVAL_POINTER (-3)   /* a required pointer is NULL */
#define NASHKERN_EINVAL_PLAN (-4)      /* a bad threads_override / splits_override */
#define NASHKERN_EWORKSPACE (-5)       /* workspace missing or smaller than required */
#define NASHKERN_EINVAL_ARG (-6)       /* a scalar out of range (temperature <= 0, coef not in [0, 1]) */
#define NASHKERN_EMISALIGNED (-7)      /* emulation only: a 16-byte access was not 16-byte aligned
                                          (the device would fault): a kernel bug */

/* Library identity and diagnostics. */
NASHKERN_API int nashkern_abi_version(void);
/* Message for a return code of this library (a cudaError_t name and description, or an
 * argument error); never NULL, static storage. */
NASHKERN_API const char* nashkern_error_string(int code);
/* 0 when the kernels can run on `device` (the runtime initialises, the device exists and a
 * kernel image for its architecture is loadable), else the error code. Synchronous, cheap. */
NASHKERN_API int nashkern_device_check(int device);
/* Philox4x32-10 (Salmon et al., SC'11) of one counter block, computed on the host with the
 * same code as the sampler: out[4] = philox(ctr[4], key[2]). For known-answer tests. */
NASHKERN_API void nashkern_philox4x32_10(const uint32_t* ctr, const uint32_t* key, uint32_t* out);

/* Where and how a call runs: every kernel's argument struct holds one. */
typedef struct NashkernLaunch {
  int num_sms;                 /* streaming multiprocessors of the device (launch planning) */
  int threads_override;        /* 0 = planned; else forced (a multiple of 32, tests) */
  int splits_override;         /* 0 = planned; else forced (>= 1, tests) */
  int emulate;                 /* 1: run the kernel code on the host (host pointers; device and
                                  stream ignored): how the arithmetic is tested without a GPU */
  int device;                  /* CUDA device index of every pointer (made current first) */
  unsigned long long stream;   /* cudaStream_t as an integer (0 = legacy default stream) */
} NashkernLaunch;

/* ---- token statistics over logits ------------------------------------------------------ */

/* The arguments of nashkern_token_stats_forward / _backward (one struct, both directions).
 *   logits, logits_dtype, logits_stride_g, logits_stride_r: policy logits z, [G, R, V]
 *   ref, ref_dtype, ref_stride_g, ref_stride_r: reference logits r (ref NULL: no reference;
 *       ref_logprobs, kl and the mixture are 0)
 *   targets: int64 [N] in [0, V) or == ignore_index, or NULL (log-prob fields are 0)
 *   R, N, V: rows per group, rows (N = G * R) and vocabulary size
 *   has_coef, coef: the mixture weight of the reference, c in [0, 1] (mixture log-probs need
 *       ref and targets; c == 0 / 1 give exactly the policy / reference values)
 *   temperature: T > 0; has_softcap, softcap: s > 0; ignore_index: see targets
 *   stats [5, N], lse [3, N]: float32, contiguous; the forward's outputs (written in full:
 *       fields not computed and rows whose target is ignore_index hold 0), the backward's inputs
 *   workspace / workspace_bytes: forward only, see nashkern_token_stats_forward_workspace
 *   grad_stats: backward only, float32 [5, N] upstream gradients
 *   grad_logits: backward output, [N, V] contiguous, dtype of logits, or NULL (not needed)
 *   grad_ref: backward output, [N, V] contiguous, dtype of ref, or NULL (not needed) */
typedef struct NashkernTokenStatsArgs {
  const void* logits;
  int logits_dtype;
  long long logits_stride_g, logits_stride_r;
  const void* ref;
  int ref_dtype;
  long long ref_stride_g, ref_stride_r;
  const int64_t* targets;
  long long R, N, V;
  int has_coef;
  double coef, temperature;
  int has_softcap;
  double softcap;
  long long ignore_index;
  float* stats;
  float* lse;
  void* workspace;
  long long workspace_bytes;
  const float* grad_stats;
  void* grad_logits;
  void* grad_ref;
  NashkernLaunch launch;
} NashkernTokenStatsArgs;

/* Bytes of device workspace nashkern_token_stats_forward needs for this shape and plan
 * (0 when every row is handled by one block). */
NASHKERN_API long long nashkern_token_stats_forward_workspace(
    long long N, long long V, int num_sms, int splits_override);

/* Forward: stats and lse of the logits. */
NASHKERN_API int nashkern_token_stats_forward(const NashkernTokenStatsArgs* args);

/* Backward: gradients of sum(grad_stats * stats) w.r.t. the logits (DESIGN.md), written once
 * into grad_logits / grad_ref, from the forward's stats and lse. */
NASHKERN_API int nashkern_token_stats_backward(const NashkernTokenStatsArgs* args);

/* ---- fused geometric-mixture sampler --------------------------------------------------- */

/* The arguments of nashkern_mixture_sample.
 *   logits, ref: [B, V] with unit stride over V and row strides logits_stride / ref_stride
 *   seed: int64 [1]; out: int64 [B]; coef in [0, 1]; temperature > 0
 *   workspace / workspace_bytes: see nashkern_mixture_sample_workspace */
typedef struct NashkernMixtureSampleArgs {
  const void* logits;
  int logits_dtype;
  long long logits_stride;
  const void* ref;
  int ref_dtype;
  long long ref_stride;
  const int64_t* seed;
  int64_t* out;
  void* workspace;
  long long workspace_bytes;
  long long B, V;
  double coef, temperature;
  NashkernLaunch launch;
} NashkernMixtureSampleArgs;

/* Bytes of device workspace nashkern_mixture_sample needs (0 when one block per row). */
NASHKERN_API long long nashkern_mixture_sample_workspace(
    long long B, long long V, int num_sms, int splits_override);

/* out[i] = argmax_j (m_ij + g_ij), m = mix(z / T, r / T, coef) (exact at coef 0 and 1; the
 * unused model is not read), g_ij = -log(-log u_ij) Gumbel noise from Philox4x32-10 keyed by
 * *seed (int64, read on the device) with counter (j / 4, i, 0x6e6b736d) — so a sample depends
 * only on (seed, row, column), never on the launch plan or the memory layout. Ties go to the
 * smaller index. out[i] = -1 when row i has no mixture logit above -inf, or has a NaN. The
 * [B, V] mixture is never written. */
NASHKERN_API int nashkern_mixture_sample(const NashkernMixtureSampleArgs* args);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* NASHKERN_CUDA_H_ */
