// Fused geometric-mixture sampler (DESIGN.md, "Sampling"): one pass over the last-position
// logits of the policy and the reference, [B, V] each, drawing
//   out[i] = argmax_j (m_ij + g_ij),  m = mix(z / T, r / T, c),  g = -log(-log u)  (Gumbel-max)
// without ever writing the [B, V] mixture. u comes from Philox4x32-10 (implemented in
// common.cuh; no curand) keyed by the int64 seed tensor, read on the device (no host sync), with
// counter (j / 4, i_lo, i_hi, salt) and word j % 4: a sample depends only on (seed, i, j), not on
// the launch plan, the memory layout or the dtype.
//
// A block owns one row, or one split of it when B rows cannot fill the device (the usual case:
// B = 64 rows on 132 SMs); each thread keeps its best (score, column), the row's max mixture
// logit and a NaN flag, reduced with warp shuffles and shared memory (ties: the smaller column,
// as torch.argmax). Split rows park per-split results in a workspace that a second kernel (one
// warp per row) reduces. A row with no mixture logit above -inf, or with a NaN, gives -1.
// At c == 0 (c == 1) the reference (policy) is not read at all.
#include "common.cuh"

namespace nk {
namespace {

constexpr uint32_t kSampleSalt = 0x6e6b736du;  // "nksm": the sampler's counter stream

struct SampleParams {
  const void* z;       // [B, V] policy logits (Tz), unit stride over V
  int64_t z_stride;    // elements between rows of z
  const void* r;       // [B, V] reference logits (Tr), unit stride over V
  int64_t r_stride;    // elements between rows of r
  const int64_t* seed;  // [1] Philox key
  int64_t* out;         // [B] out: sampled column or -1
  void* partials;       // [B, num_splits] SampleState workspace (num_splits > 1)
  int64_t B;            // rows
  int64_t V;            // vocabulary size (< 2^31)
  int64_t cols_per_split;
  int num_splits;
  int mix;              // kMixBlend, kMixPolicy (c == 0) or kMixRef (c == 1)
  MixCoef coef;         // (1 - c, c)
  float inv_temperature;  // 1 / T
};

struct SampleState {  // all 32-bit fields: shuffled word by word, stored as the split workspace
  float score;        // best m + g so far
  int32_t col;        // its column (the smallest among equal scores)
  float max_m;        // max mixture logit (NaN skipped)
  uint32_t nan;       // 1 if a mixture logit was NaN
};

NK_HD SampleState sample_identity() {
  SampleState s;
  s.score = -kInf;
  s.col = 0x7fffffff;
  s.max_m = -kInf;
  s.nan = 0u;
  return s;
}

struct SampleMerge {
  NK_HD void operator()(SampleState& s, const SampleState& o) const {
    if (o.score > s.score || (o.score == s.score && o.col < s.col)) {
      s.score = o.score;
      s.col = o.col;
    }
    s.max_m = fmaxf(s.max_m, o.max_m);
    s.nan |= o.nan;
  }
};

NK_HD int64_t sample_result(const SampleState& s) {
  return s.nan == 0u && s.max_m > -kInf ? static_cast<int64_t>(s.col) : -1;
}

// Columns per vector step: every tensor read advances by whole 16-byte vectors.
template <typename Tz, typename Tr>
NK_HD constexpr int sample_step() {
  return cmax(vec_elems<Tz>(), vec_elems<Tr>());
}

// The per-thread work on one row.
template <typename Tz, typename Tr>
struct SampleCols {
  static constexpr int S = sample_step<Tz, Tr>();
  const Tz* z;            // policy row (not read when mix == kMixRef)
  const Tr* r;            // reference row (not read when mix == kMixPolicy)
  int mix;                // MixMode
  MixCoef coef;           // mixture weights
  float inv_temperature;  // 1 / T
  uint32_t key0, key1;    // Philox key: the seed
  uint32_t row_lo, row_hi;  // Philox counter words 1 and 2: the row
  int64_t group;          // Philox block (column / 4) held in words[]
  uint32_t words[4];      // its output
  SampleState st;         // this thread's best

  NK_HD uint32_t random_word(int64_t c) {
    const int64_t g = c >> 2;
    if (g != group) {
      words[0] = static_cast<uint32_t>(g);
      words[1] = row_lo;
      words[2] = row_hi;
      words[3] = kSampleSalt;
      philox4x32_10(words, key0, key1);
      group = g;
    }
    const int w = static_cast<int>(c & 3);  // selects, not a dynamically indexed array
    return w == 0 ? words[0] : (w == 1 ? words[1] : (w == 2 ? words[2] : words[3]));
  }

  NK_HD float mixture(float zf, float rf) const {
    const float a = zf * inv_temperature;
    const float b = rf * inv_temperature;
    return mix == kMixPolicy ? a : (mix == kMixRef ? b : nk::mix(a, b, coef));
  }

  // Column c with mixture logit m; columns come in increasing order, so `>` keeps the first.
  NK_HD void take(int64_t c, float m) {
    if (m != m) st.nan = 1u;
    st.max_m = fmaxf(st.max_m, m);
    const float score = m + gumbel_from_bits(random_word(c));
    if (score > st.score) {
      st.score = score;
      st.col = static_cast<int32_t>(c);
    }
  }

  NK_HD void scalar(int64_t c) {
    const float zf = mix != kMixRef ? to_float(z[c]) : 0.0f;
    const float rf = mix != kMixPolicy ? to_float(r[c]) : 0.0f;
    take(c, mixture(zf, rf));
  }

  template <int U>
  NK_HD void steps(const int64_t (&cols)[U]) {
    float zf[U][S];
    float rf[U][S];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (mix != kMixRef) {
        load_cols<Tz, S>(z + cols[u], zf[u]);
      } else {
#pragma unroll
        for (int k = 0; k < S; ++k) zf[u][k] = 0.0f;
      }
      if (mix != kMixPolicy) {
        load_cols<Tr, S>(r + cols[u], rf[u]);
      } else {
#pragma unroll
        for (int k = 0; k < S; ++k) rf[u][k] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < S; ++k) take(cols[u] + k, mixture(zf[u][k], rf[u][k]));
    }
  }
};

// Thread `tid` of `nthreads` scans columns [v0, v1) of row i.
template <typename Tz, typename Tr>
NK_HD SampleState sample_thread(const SampleParams& p, int64_t i, int64_t v0, int64_t v1, int tid,
                                int nthreads) {
  SampleCols<Tz, Tr> f;
  f.z = static_cast<const Tz*>(p.z) + i * p.z_stride;
  f.r = static_cast<const Tr*>(p.r) + i * p.r_stride;
  f.mix = p.mix;
  f.coef = p.coef;
  f.inv_temperature = p.inv_temperature;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  f.key0 = static_cast<uint32_t>(seed);
  f.key1 = static_cast<uint32_t>(seed >> 32);
  f.row_lo = static_cast<uint32_t>(static_cast<uint64_t>(i));
  f.row_hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  f.group = -1;
  f.words[0] = f.words[1] = f.words[2] = f.words[3] = 0u;
  f.st = sample_identity();
  // The tensors read must share the vector alignment (element size 0: a tensor not read).
  const void* ptrs[2] = {f.z + v0, f.r + v0};
  const int esize[2] = {p.mix != kMixRef ? static_cast<int>(sizeof(Tz)) : 0,
                        p.mix != kMixPolicy ? static_cast<int>(sizeof(Tr)) : 0};
  const int head = aligned_head(ptrs, esize, 2, SampleCols<Tz, Tr>::S);
  walk_row<SampleCols<Tz, Tr>::S, cfg::kSampleUnroll>(v0, v1, head, tid, nthreads, f);
  return f.st;
}

NK_HD void sample_block_result(const SampleParams& p, int64_t i, int split, const SampleState& st) {
  if (p.num_splits > 1) {
    static_cast<SampleState*>(p.partials)[i * p.num_splits + split] = st;
  } else {
    p.out[i] = sample_result(st);
  }
}

NK_HD SampleState sample_merge_lane(const SampleParams& p, int64_t i, int lane) {
  SampleState st = sample_identity();
  const SampleState* parts = static_cast<const SampleState*>(p.partials) + i * p.num_splits;
  for (int s = lane; s < p.num_splits; s += cfg::kWarpSize) SampleMerge{}(st, parts[s]);
  return st;
}

// Grid (B, num_splits), planned threads: block (i, split) scans split `split` of row i.
template <typename Tz, typename Tr>
__global__ void __launch_bounds__(cfg::kSampleMaxThreads)
    mixture_sample_kernel(const SampleParams p) {
  const int64_t i = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t v0 = split * p.cols_per_split;
  const int64_t v1 = v0 + p.cols_per_split < p.V ? v0 + p.cols_per_split : p.V;
  SampleState st = sample_thread<Tz, Tr>(p, i, v0, v1, static_cast<int>(threadIdx.x),
                                         static_cast<int>(blockDim.x));
  st = block_reduce(st, sample_identity(), SampleMerge{});
  if (threadIdx.x == 0) sample_block_result(p, i, split, st);
}

// Grid ceil(B / warps per block), one warp per row: reduces the row's split results.
__global__ void __launch_bounds__(cfg::kMergeThreads) mixture_sample_merge_kernel(const SampleParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cfg::kWarpSize) +
                    threadIdx.x / cfg::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % cfg::kWarpSize;
  if (i >= p.B) return;  // whole warps leave together
  const SampleState st = warp_reduce(sample_merge_lane(p, i, lane), SampleMerge{});
  if (lane == 0) p.out[i] = sample_result(st);
}

// ---- host side -----------------------------------------------------------------------------
int sample_plan(long long B, long long V, int step, int num_sms, int threads_override,
                int splits_override, RowPlan* plan) {
  return plan_rows(B, V, step, num_sms, cfg::kSampleBlocksPerSm, cfg::kSampleMinColsPerSplit,
                   cfg::kSampleMaxThreads, cfg::kSampleMinStepsPerThread, threads_override,
                   splits_override, plan);
}

long long sample_workspace_bytes(const RowPlan& plan, long long B) {
  return plan.splits > 1 ? static_cast<long long>(sizeof(SampleState)) * B * plan.splits : 0;
}

template <typename Tz, typename Tr>
int launch_sample(const SampleParams& p, const RowPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B), static_cast<unsigned>(plan.splits));
  mixture_sample_kernel<Tz, Tr><<<grid, plan.threads, 0, stream>>>(p);
  if (plan.splits > 1) {
    const int rows_per_block = cfg::kMergeThreads / cfg::kWarpSize;
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.B, rows_per_block));
    mixture_sample_merge_kernel<<<blocks, cfg::kMergeThreads, 0, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Tz, typename Tr>
int emulate_sample(const SampleParams& p, const RowPlan& plan) {
  std::vector<SampleState> threads(plan.threads);
  for (int64_t i = 0; i < p.B; ++i) {
    for (int split = 0; split < plan.splits; ++split) {
      const int64_t v0 = split * p.cols_per_split;
      const int64_t v1 = v0 + p.cols_per_split < p.V ? v0 + p.cols_per_split : p.V;
      for (int t = 0; t < plan.threads; ++t) {
        threads[t] = sample_thread<Tz, Tr>(p, i, v0, v1, t, plan.threads);
      }
      sample_block_result(p, i, split, emu_block_reduce(threads, sample_identity(), SampleMerge{}));
    }
  }
  if (plan.splits > 1) {
    for (int64_t i = 0; i < p.B; ++i) {
      std::vector<SampleState> lanes(cfg::kWarpSize);
      for (int lane = 0; lane < cfg::kWarpSize; ++lane) lanes[lane] = sample_merge_lane(p, i, lane);
      p.out[i] = sample_result(emu_warp_reduce(lanes, SampleMerge{}));
    }
  }
  return 0;
}

int mixture_sample(bool emulate, const void* logits, int logits_dtype, long long logits_stride,
                   const void* ref, int ref_dtype, long long ref_stride, const int64_t* seed,
                   int64_t* out, void* workspace, long long workspace_bytes, long long B,
                   long long V, double coef, double temperature, int num_sms,
                   int threads_override, int splits_override, int device,
                   unsigned long long stream) {
  if (logits == nullptr || ref == nullptr || seed == nullptr || out == nullptr) {
    return NASHKERN_EINVAL_POINTER;
  }
  if (B < 1 || V < 1 || V > kMaxVocab || B > 0x7fffffffLL) return NASHKERN_EINVAL_SIZE;
  if (!(temperature > 0.0) || !(coef >= 0.0 && coef <= 1.0)) return NASHKERN_EINVAL_ARG;
  SampleParams p = SampleParams{};
  p.z = logits;
  p.z_stride = logits_stride;
  p.r = ref;
  p.r_stride = ref_stride;
  p.seed = seed;
  p.out = out;
  p.B = B;
  p.V = V;
  p.mix = coef == 0.0 ? kMixPolicy : (coef == 1.0 ? kMixRef : kMixBlend);
  p.coef.one_minus_coef = static_cast<float>(1.0 - coef);
  p.coef.coef = static_cast<float>(coef);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  int err = 0;
  if (!emulate && (err = enter_device(device)) != 0) return err;
  return dispatch_dtype(logits_dtype, [&](auto tz) {
    return dispatch_dtype(ref_dtype, [&](auto tr) {
      using Tz = typename decltype(tz)::type;
      using Tr = typename decltype(tr)::type;
      RowPlan plan;
      const int e = sample_plan(B, V, sample_step<Tz, Tr>(), num_sms, threads_override,
                                splits_override, &plan);
      if (e != 0) return e;
      if (plan.splits > 1 &&
          (workspace == nullptr || workspace_bytes < sample_workspace_bytes(plan, B))) {
        return NASHKERN_EWORKSPACE;
      }
      SampleParams q = p;
      q.partials = workspace;
      q.num_splits = plan.splits;
      q.cols_per_split = plan.cols_per_split;
      return emulate ? emulated(emulate_sample<Tz, Tr>, q, plan)
                     : launch_sample<Tz, Tr>(q, plan, as_stream(stream));
    });
  });
}

}  // namespace

// Used by nashkern_device_check (api.cu).
int mixture_sample_probe() {
  cudaFuncAttributes attr;
  return static_cast<int>(
      cudaFuncGetAttributes(&attr, mixture_sample_kernel<__nv_bfloat16, __nv_bfloat16>));
}

}  // namespace nk

// ---- C interface (nashkern_cuda.h) -----------------------------------------------------------
extern "C" {

long long nashkern_mixture_sample_workspace(long long B, long long V, int num_sms,
                                            int splits_override) {
  nk::RowPlan plan;
  if (B < 1 || V < 1) return 0;
  if (nk::sample_plan(B, V, 8, num_sms, 0, splits_override, &plan) != 0) return 0;
  return nk::sample_workspace_bytes(plan, B);
}

int nashkern_mixture_sample(const NashkernMixtureSampleArgs* a) {
  if (a == nullptr) return NASHKERN_EINVAL_POINTER;
  const NashkernLaunch& l = a->launch;
  return nk::mixture_sample(l.emulate != 0, a->logits, a->logits_dtype, a->logits_stride, a->ref,
                            a->ref_dtype, a->ref_stride, a->seed, a->out, a->workspace,
                            a->workspace_bytes, a->B, a->V, a->coef, a->temperature, l.num_sms,
                            l.threads_override, l.splits_override, l.device, l.stream);
}

}  // extern "C"
