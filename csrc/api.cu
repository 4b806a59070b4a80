// Library identity and diagnostics of nashkern/_nashkern_cuda.so (nashkern_cuda.h).
#include <cstdio>

#include "common.cuh"

namespace nk {
int token_stats_probe();     // token_stats.cu
int mixture_sample_probe();  // mixture_sample.cu
}  // namespace nk

extern "C" {

int nashkern_abi_version(void) { return NASHKERN_CUDA_ABI_VERSION; }

const char* nashkern_error_string(int code) {
  switch (code) {
    case 0:
      return "success";
    case NASHKERN_EINVAL_DTYPE:
      return "nashkern: unknown dtype code (expected float32, bfloat16 or float16)";
    case NASHKERN_EINVAL_SIZE:
      return "nashkern: size out of range (rows and V must be >= 1, V < 2^31, rows < 2^31)";
    case NASHKERN_EINVAL_POINTER:
      return "nashkern: a required pointer is NULL";
    case NASHKERN_EINVAL_PLAN:
      return "nashkern: bad threads_override / splits_override";
    case NASHKERN_EWORKSPACE:
      return "nashkern: workspace missing or smaller than the *_workspace() size";
    case NASHKERN_EMISALIGNED:
      return "nashkern: the emulation made a misaligned 16-byte access (a device fault): a bug";
    case NASHKERN_EINVAL_ARG:
      return "nashkern: scalar argument out of range (temperature > 0, coef in [0, 1], softcap > 0)";
    default:
      break;
  }
  if (code > 0) {
    // cudaGetErrorName / cudaGetErrorString return static strings; join them once per code.
    static thread_local char buffer[512];
    const cudaError_t err = static_cast<cudaError_t>(code);
    std::snprintf(buffer, sizeof(buffer), "%s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    return buffer;
  }
  return "nashkern: unknown error code";
}

int nashkern_device_check(int device) {
  int err = nk::enter_device(device);
  if (err == 0) err = nk::token_stats_probe();
  if (err == 0) err = nk::mixture_sample_probe();
  (void)cudaGetLastError();  // leave no error behind for the next launch to report
  return err;
}

void nashkern_philox4x32_10(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
  nk::philox4x32_10(c, key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = c[i];
}

}  // extern "C"
