// Shared pieces of the nashkern CUDA kernels: the launch configuration (every tuning constant),
// element types, 16-byte vector loads/stores, the fp32 math helpers, Philox4x32-10, the row
// walker and the block reductions (with their host emulations).
//
// Everything marked NK_HD is __host__ __device__: the kernels' per-thread work is written once
// and also runs on the host (the entry points with `launch.emulate` set), so that the arithmetic of the
// kernels is testable on machines without a GPU. Only the reductions across threads (warp
// shuffles, shared memory) have a device and a host version, the host one reproducing the device
// one's order of operations exactly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "nashkern_cuda.h"

#define NK_HD __host__ __device__ __forceinline__
#define NK_DEVICE __device__ __forceinline__

namespace nk {

// =============================================================================================
// Launch configuration: the one place for every tuning constant of the CUDA kernels.
// None is tuned yet (written without a GPU); "measured-later" notes say what to sweep
// (the nashkern-cuda rows of benchmarks/test_bench_token_stats.py and test_bench_mixture_sample.py).
// Python does not need any of them: the host code here
// plans launches and reports workspace sizes through the C interface.
// =============================================================================================
namespace cfg {
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block at most

// token_stats forward: one block per (row, vocabulary split); each thread walks 16-byte vectors.
// measured-later: 256 vs 512 threads and unroll 1/2/4 at [16384, 151936] bf16 with a reference.
constexpr int kFwdMaxThreads = 512;
constexpr int kFwdMinStepsPerThread = 4;  // short rows get fewer threads (>= 4 vector steps each)
constexpr int kFwdUnroll = 2;             // vector steps per tensor loaded before any is consumed
// Rows are split over several blocks (partials merged by a second kernel) while there are fewer
// than kFwdBlocksPerSm blocks per SM, in chunks of at least kFwdMinColsPerSplit columns.
// measured-later: the N below which splitting pays off (N = 1..1024 at V = 151936).
constexpr int kFwdBlocksPerSm = 4;
constexpr int64_t kFwdMinColsPerSplit = 4096;

// token_stats backward: grid (row, column chunk of kBwdThreads x kBwdStepsPerThread vector
// steps); no reduction. measured-later: 128/256 threads, 2/4/8 steps per thread.
constexpr int kBwdThreads = 256;
constexpr int kBwdStepsPerThread = 4;
constexpr int kBwdUnroll = 2;

// Mixture sampler: block per (row, split), splits until kSampleBlocksPerSm blocks per SM.
// measured-later: B = 1..256 at V = 151936 (latency, in microseconds).
constexpr int kSampleMaxThreads = 256;
constexpr int kSampleMinStepsPerThread = 4;
constexpr int kSampleUnroll = 2;
constexpr int kSampleBlocksPerSm = 4;
constexpr int64_t kSampleMinColsPerSplit = 4096;

// Split plans: at most this many splits per row; split boundaries are multiples of 8 columns so
// that a row whose start is 16-byte aligned keeps every split aligned.
constexpr int kMaxSplits = 1024;
constexpr int64_t kSplitAlign = 8;

// Merge kernels of the split paths: one warp per row.
constexpr int kMergeThreads = 256;
}  // namespace cfg

// Largest vocabulary: column indices are int32 in the sampler's argmax state.
constexpr int64_t kMaxVocab = 0x7fffffffLL;

// Rows of the packed statistics (nashkern/types.py).
enum StatRow : int { kLogprobs = 0, kEntropy = 1, kRefLogprobs = 2, kKl = 3, kMixtureLogprobs = 4 };
enum LseRow : int { kLsePolicy = 0, kLseRef = 1, kLseMixture = 2 };
constexpr int kNumStats = 5;
constexpr int kNumLse = 3;

// How the geometric mixture m = (1 - c) a + c b is formed. The end points are the policy / the
// reference themselves (never (1 - c) a + c b, which turns a column masked in the model of weight
// 0 into 0 * -inf = NaN): nashkern's one coef end-point rule (kernels/layout.py), here chosen
// once per launch; Triton applies it in-kernel (kernels/common.py: mix), PyTorch in
// nashkern/naive.py: mix_logits.
enum MixMode : int { kMixNone = 0, kMixBlend = 1, kMixPolicy = 2, kMixRef = 3 };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = INFINITY;

NK_HD constexpr int cmax(int a, int b) { return a > b ? a : b; }
NK_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// =============================================================================================
// Element types
// =============================================================================================
template <typename T>
struct Tag {
  using type = T;
};

// Elements per 16-byte vector.
template <typename T>
NK_HD constexpr int vec_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

NK_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

NK_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// One element to fp32 and back (round to nearest even, as torch's casts).
NK_HD float to_float(float x) { return x; }
NK_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
NK_HD float to_float(__half x) { return __half2float(x); }

template <typename T>
NK_HD T from_float(float x);
template <>
NK_HD float from_float<float>(float x) {
  return x;
}
template <>
NK_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
NK_HD __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// 16 bits of an element (bf16 / fp16) as an unsigned integer, and back.
NK_HD uint32_t half_bits(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }
NK_HD uint32_t half_bits(__half x) { return static_cast<__half_raw>(x).x; }
NK_HD float half_bits_to_float(Tag<__nv_bfloat16>, uint32_t b) { return bits_to_float(b << 16); }
NK_HD float half_bits_to_float(Tag<__half>, uint32_t b) {
  __half_raw r;
  r.x = static_cast<unsigned short>(b);
  return __half2float(__half(r));
}

// A 16-byte vector as four 32-bit words.
struct Raw16 {
  uint32_t w[4];
};

// Host emulation only: set when a 16-byte access is not 16-byte aligned (on the device that
// access would fault), so that the emulation checks the row walk's alignment logic too. The
// emulated calls (`launch.emulate`) clear it before running and report NASHKERN_EMISALIGNED after.
inline bool& emu_misaligned() {
  static thread_local bool flag = false;
  return flag;
}

// Loads 16 bytes from a 16-byte-aligned address. On the device: ld.global.cs (streaming, evict
// first: every logit is read exactly once per pass).
NK_HD Raw16 load16(const void* p) {
  Raw16 r;
#ifdef __CUDA_ARCH__
  const uint4 v = __ldcs(static_cast<const uint4*>(p));
  r.w[0] = v.x;
  r.w[1] = v.y;
  r.w[2] = v.z;
  r.w[3] = v.w;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16u != 0u) emu_misaligned() = true;
  std::memcpy(&r, p, 16);
#endif
  return r;
}

// Stores 16 bytes to a 16-byte-aligned address (st.global.cs on the device: written once).
NK_HD void store16(void* p, const Raw16& r) {
#ifdef __CUDA_ARCH__
  __stcs(static_cast<uint4*>(p), make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]));
#else
  if (reinterpret_cast<uintptr_t>(p) % 16u != 0u) emu_misaligned() = true;
  std::memcpy(p, &r, 16);
#endif
}

// 16 bytes <-> vec_elems<T>() floats, element 0 first (little endian).
NK_HD void unpack(Tag<float>, const Raw16& r, float* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = bits_to_float(r.w[i]);
}
template <typename T>
NK_HD void unpack(Tag<T> tag, const Raw16& r, float* out) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = half_bits_to_float(tag, r.w[i] & 0xffffu);
    out[2 * i + 1] = half_bits_to_float(tag, r.w[i] >> 16);
  }
}
NK_HD Raw16 pack(Tag<float>, const float* in) {
  Raw16 r;
#pragma unroll
  for (int i = 0; i < 4; ++i) r.w[i] = float_to_bits(in[i]);
  return r;
}
template <typename T>
NK_HD Raw16 pack(Tag<T>, const float* in) {
  Raw16 r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    r.w[i] = half_bits(from_float<T>(in[2 * i])) | (half_bits(from_float<T>(in[2 * i + 1])) << 16);
  }
  return r;
}

// S consecutive columns starting at a 16-byte-aligned element p (S a multiple of vec_elems<T>).
template <typename T, int S>
NK_HD void load_cols(const T* p, float* out) {
  constexpr int kVec = vec_elems<T>();
  static_assert(S % kVec == 0, "a step covers whole vectors");
#pragma unroll
  for (int v = 0; v < S / kVec; ++v) unpack(Tag<T>{}, load16(p + v * kVec), out + v * kVec);
}
template <typename T, int S>
NK_HD void store_cols(T* p, const float* in) {
  constexpr int kVec = vec_elems<T>();
  static_assert(S % kVec == 0, "a step covers whole vectors");
#pragma unroll
  for (int v = 0; v < S / kVec; ++v) store16(p + v * kVec, pack(Tag<T>{}, in + v * kVec));
}

// =============================================================================================
// fp32 math
// =============================================================================================
// e^x as exp2(x * log2 e): one MUFU.EX2 on the device (2 ulp) after one rounding of the product,
// whose relative effect on the result is |x| * 6e-8 (exact enough where e^x matters: x near 0).
NK_HD float fast_exp(float x) { return exp2f(x * kLog2e); }

// 1 / x, correctly rounded.
NK_HD float recip(float x) {
#ifdef __CUDA_ARCH__
  return __frcp_rn(x);
#else
  return 1.0f / x;
#endif
}

// Natural log for the Gumbel noise only (x in [1e-10, 17]; 2^-22 absolute error is harmless
// there): MUFU.LG2 on the device.
NK_HD float noise_log(float x) {
#ifdef __CUDA_ARCH__
  return __logf(x);
#else
  return logf(x);
#endif
}

// The shift online sums are taken relative to: the running max, or 0 while it is -inf (so that
// masked columns give exp(-inf) = 0 and never exp(-inf - -inf) = NaN).
NK_HD float finite_shift(float running_max) { return running_max == -kInf ? 0.0f : running_max; }
// log of the factor that rescales sums taken relative to old_max to new_shift; 0 while old_max
// is -inf (those sums are exactly 0 and must not meet exp(+large)).
NK_HD float shift_step(float old_max, float new_shift) {
  return old_max == -kInf ? 0.0f : old_max - new_shift;
}

// tanh(y) and sech^2(y) = 1 - tanh(y)^2 from one exponential, a few ulp each, NaN-propagating,
// exact at +-inf; sech^2 without the cancellation of 1 - t*t. |y| < 0.625 uses the Cephes tanhf
// polynomial (relative error < 1e-7 there), where (1 - e) / (1 + e) would lose digits.
NK_HD float tanh_sech2(float y, float* sech2) {
  const float ay = fabsf(y);
  const float e = fast_exp(-2.0f * ay);  // in [0, 1]
  const float r = recip(1.0f + e);
  const float big = (1.0f - e) * r;
  const float y2 = y * y;
  const float small =
      ((((-5.70498872745e-3f * y2 + 2.06390887954e-2f) * y2 - 5.37397155531e-2f) * y2 +
        1.33314422036e-1f) * y2 - 3.33332819422e-1f) * y2 * y + y;
  *sech2 = 4.0f * e * r * r;
  return ay < 0.625f ? small : copysignf(big, y);
}

// cap(x) / T (DESIGN.md): x / T, or s * tanh(x / s) / T with -inf kept as -inf.
struct Scale {
  float inv_temperature;  // 1 / T
  float softcap;          // s (when has_softcap)
  float inv_softcap;      // 1 / s
  int has_softcap;        // 0: no softcap
};

NK_HD float scaled(float x, const Scale& s) {
  if (!s.has_softcap) return x * s.inv_temperature;
  if (x == -kInf) return x;
  float sech2;
  const float t = tanh_sech2(x * s.inv_softcap, &sech2);
  return (s.softcap * t) * s.inv_temperature;
}

// cap(x) / T and its derivative cap'(x) / T (0 at -inf).
NK_HD float scaled_grad(float x, const Scale& s, float* d) {
  if (!s.has_softcap) {
    *d = s.inv_temperature;
    return x * s.inv_temperature;
  }
  if (x == -kInf) {
    *d = 0.0f;
    return x;
  }
  float sech2;
  const float t = tanh_sech2(x * s.inv_softcap, &sech2);
  *d = sech2 * s.inv_temperature;
  return (s.softcap * t) * s.inv_temperature;
}

// (1 - c) a + c b with the products pinned (the same rounding wherever it is evaluated).
struct MixCoef {
  float one_minus_coef;  // 1 - c, rounded once from the double
  float coef;            // c
};
NK_HD float mix(float a, float b, const MixCoef& c) { return fmaf(c.one_minus_coef, a, c.coef * b); }

// =============================================================================================
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), as in Random123: 10 rounds, the key bumped before every round but the first.
// =============================================================================================
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

NK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

// In place: c[4] <- philox4x32_10(c, {k0, k1}).
NK_HD void philox4x32_10(uint32_t* c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c[0], &hi0, &lo0);
    mulhilo32(kPhiloxM1, c[2], &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0;
    const uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// Standard Gumbel noise -log(-log u) from 32 random bits, u = (bits + 1/2) / 2^32 in (0, 1).
// -log u is computed as -log1p(-w) from w = 1 - u = (~bits + 1/2) / 2^32, which is exact for
// u near 1: the large values of the noise (the ones that decide an argmax) keep their full
// 32-bit resolution, up to -log(2^-33) = 22.9.
NK_HD float gumbel_from_bits(uint32_t bits) {
  float w = (static_cast<float>(~bits) + 0.5f) * 2.3283064365386963e-10f;  // 2^-32
  w = fminf(w, 0.99999994f);  // the float rounding of ~bits may reach 1
  const float e = -log1pf(-w);  // Exp(1), > 0
  return -noise_log(e);
}

// =============================================================================================
// Rows and columns
// =============================================================================================
// Element offset of row n of a [G, R, V] view (unit stride over V).
NK_HD int64_t row_offset(int64_t n, int64_t R, int64_t stride_g, int64_t stride_r) {
  return (n / R) * stride_g + (n % R) * stride_r;
}

// The number h in [0, step) of leading columns after which every one of the `count` streams
// (ptrs[i]: address of the first column, esize[i]: bytes per element, 0 for a stream that is not
// used) is 16-byte aligned, or -1 when there is none (their misalignments differ). step: columns per vector step, a multiple of
// every stream's elements per vector, so that alignment is periodic with period step.
NK_HD int aligned_head(const void* const* ptrs, const int* esize, int count, int step) {
  for (int h = 0; h < step; ++h) {
    bool ok = true;
    for (int i = 0; i < count; ++i) {
      ok = ok && ((reinterpret_cast<uintptr_t>(ptrs[i]) +
                   static_cast<uintptr_t>(h) * static_cast<uintptr_t>(esize[i])) % 16u == 0u);
    }
    if (ok) return h;
  }
  return -1;
}

// Walks columns [v0, v1) of one row as thread `tid` of `nthreads`, consecutive threads taking
// consecutive columns (coalesced). With head >= 0: columns [v0, v0 + head) one by one
// (f.scalar(c)), then S-column steps at which every stream is 16-byte aligned, U steps at a time
// (f.steps<U>(cols): all loads of the U steps are issued before any is consumed) and the rest one
// step at a time, then the tail one by one. With head < 0: every column one by one (the fallback
// for rows whose tensors cannot be aligned together). Each thread sees its columns in
// increasing order.
template <int S, int U, class F>
NK_HD void walk_row(int64_t v0, int64_t v1, int head, int tid, int nthreads, F& f) {
  if (head < 0) {
    for (int64_t c = v0 + tid; c < v1; c += nthreads) f.scalar(c);
    return;
  }
  const int64_t body = v0 + head < v1 ? v0 + head : v1;
  for (int64_t c = v0 + tid; c < body; c += nthreads) f.scalar(c);
  const int64_t nsteps = (v1 - body) / S;
  int64_t s = tid;
  if (U > 1) {
    for (; s + static_cast<int64_t>(U - 1) * nthreads < nsteps;
         s += static_cast<int64_t>(U) * nthreads) {
      int64_t cols[U];
#pragma unroll
      for (int u = 0; u < U; ++u) cols[u] = body + (s + static_cast<int64_t>(u) * nthreads) * S;
      f.template steps<U>(cols);
    }
  }
  for (; s < nsteps; s += nthreads) {
    const int64_t cols[1] = {body + s * S};
    f.template steps<1>(cols);
  }
  for (int64_t c = body + nsteps * S + tid; c < v1; c += nthreads) f.scalar(c);
}

// =============================================================================================
// Reductions across threads. State: a struct of 32-bit fields; Merge: merge(State& s,
// const State& other). The result is meaningful in thread 0 (lane 0 for the warp version).
// =============================================================================================
template <class State>
NK_DEVICE State shfl_xor_state(const State& s, int mask) {
  static_assert(sizeof(State) % 4 == 0, "states are made of 32-bit fields");
  constexpr int kWords = sizeof(State) / 4;
  uint32_t w[kWords];
  memcpy(w, &s, sizeof(State));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], mask);
  State o;
  memcpy(&o, w, sizeof(State));
  return o;
}

// Butterfly over the 32 lanes of a warp (every lane must take part).
template <class State, class Merge>
NK_DEVICE State warp_reduce(State s, const Merge& merge) {
#pragma unroll
  for (int offset = cfg::kWarpSize / 2; offset > 0; offset >>= 1) {
    merge(s, shfl_xor_state(s, offset));
  }
  return s;
}

// Whole block (blockDim.x a multiple of 32): warps reduce, lane 0 of each parks its result in
// shared memory, warp 0 reduces those (identity where a warp does not exist).
template <class State, class Merge>
NK_DEVICE State block_reduce(State s, const State& identity, const Merge& merge) {
  __shared__ State warp_results[cfg::kMaxWarps];
  s = warp_reduce(s, merge);
  const int nwarps = static_cast<int>(blockDim.x) / cfg::kWarpSize;
  if (nwarps == 1) return s;
  const int warp = static_cast<int>(threadIdx.x) / cfg::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % cfg::kWarpSize;
  if (lane == 0) warp_results[warp] = s;
  __syncthreads();
  if (warp == 0) s = warp_reduce(lane < nwarps ? warp_results[lane] : identity, merge);
  return s;
}

// Host emulations of the two, in the device's order of operations (lane i merges lane i ^ offset
// at each step of the butterfly; the result is lane 0's).
template <class State, class Merge>
State emu_warp_reduce(std::vector<State> lanes, const Merge& merge) {
  for (int offset = cfg::kWarpSize / 2; offset > 0; offset >>= 1) {
    const std::vector<State> before = lanes;
    for (int i = 0; i < cfg::kWarpSize; ++i) merge(lanes[i], before[i ^ offset]);
  }
  return lanes[0];
}

template <class State, class Merge>
State emu_block_reduce(const std::vector<State>& threads, const State& identity,
                       const Merge& merge) {
  const int nwarps = static_cast<int>(threads.size()) / cfg::kWarpSize;
  std::vector<State> warp_results(nwarps);
  for (int w = 0; w < nwarps; ++w) {
    warp_results[w] = emu_warp_reduce(
        std::vector<State>(threads.begin() + w * cfg::kWarpSize,
                           threads.begin() + (w + 1) * cfg::kWarpSize),
        merge);
  }
  if (nwarps == 1) return warp_results[0];
  std::vector<State> lanes(cfg::kWarpSize, identity);
  for (int w = 0; w < nwarps; ++w) lanes[w] = warp_results[w];
  return emu_warp_reduce(lanes, merge);
}

// =============================================================================================
// Launch planning (host)
// =============================================================================================
struct RowPlan {
  int threads;             // per block, a multiple of 32
  int splits;              // blocks per row
  int64_t cols_per_split;  // a multiple of cfg::kSplitAlign (the last split may be shorter)
};

inline int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

// Blocks per row and threads per block for `rows` rows of V columns walked in `step`-column
// vector steps: rows are split while there are fewer than blocks_per_sm x num_sms blocks (never
// below min_cols_per_split columns per split); threads cover >= min_steps vector steps each, up to
// max_threads. Overrides (> 0) replace the planned values. Returns 0 or NASHKERN_EINVAL_PLAN.
inline int plan_rows(int64_t rows, int64_t V, int step, int num_sms, int blocks_per_sm,
                     int64_t min_cols_per_split, int max_threads, int min_steps,
                     int threads_override, int splits_override, RowPlan* plan) {
  int64_t splits = 1;
  if (splits_override > 0) {
    if (splits_override > cfg::kMaxSplits) return NASHKERN_EINVAL_PLAN;
    splits = splits_override;
  } else if (splits_override < 0) {
    return NASHKERN_EINVAL_PLAN;
  } else {
    const int64_t target_blocks = static_cast<int64_t>(blocks_per_sm) * (num_sms > 0 ? num_sms : 1);
    if (rows < target_blocks) {
      splits = ceil_div(target_blocks, rows);
      const int64_t by_width = ceil_div(V, min_cols_per_split);
      if (splits > by_width) splits = by_width;
      if (splits > cfg::kMaxSplits) splits = cfg::kMaxSplits;
      if (splits < 1) splits = 1;
    }
  }
  int64_t cols = ceil_div(ceil_div(V, splits), cfg::kSplitAlign) * cfg::kSplitAlign;
  plan->splits = static_cast<int>(ceil_div(V, cols));  // no empty split
  plan->cols_per_split = cols;
  if (threads_override != 0) {
    if (threads_override < cfg::kWarpSize || threads_override > max_threads ||
        threads_override % cfg::kWarpSize != 0) {
      return NASHKERN_EINVAL_PLAN;
    }
    plan->threads = threads_override;
  } else {
    int t = pow2_ceil(ceil_div(ceil_div(cols, step), min_steps));
    if (t < cfg::kWarpSize) t = cfg::kWarpSize;
    if (t > max_threads) t = max_threads;
    plan->threads = t;
  }
  return 0;
}

// Calls f(Tag<T>{}) for the element type of a dtype code; NASHKERN_EINVAL_DTYPE for others.
template <class F>
int dispatch_dtype(int code, F&& f) {
  switch (code) {
    case NASHKERN_DTYPE_FLOAT32:
      return f(Tag<float>{});
    case NASHKERN_DTYPE_BFLOAT16:
      return f(Tag<__nv_bfloat16>{});
    case NASHKERN_DTYPE_FLOAT16:
      return f(Tag<__half>{});
    default:
      return NASHKERN_EINVAL_DTYPE;
  }
}

// Makes `device` current for this library's runtime (the same primary context torch uses) and
// clears a stale non-sticky error, so that the code returned after a launch is the launch's own.
inline int enter_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return static_cast<int>(err);
  (void)cudaGetLastError();
  return 0;
}

// Runs a host emulation and reports a misaligned vector access as NASHKERN_EMISALIGNED.
template <class F, class... Args>
int emulated(F&& f, Args&&... args) {
  emu_misaligned() = false;
  const int err = f(args...);
  if (err == 0 && emu_misaligned()) return NASHKERN_EMISALIGNED;
  return err;
}

inline cudaStream_t as_stream(unsigned long long stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
}

}  // namespace nk
