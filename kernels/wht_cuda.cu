// Fused Walsh–Hadamard transform along the last dimension: y = x Tᵀ (or x T), T = (H_K ⊗ H_P) / √n, n = K·P.
//
// One thread block per row; the row lives in shared memory as fp32 between phases, global memory is read once and
// written once. With P = P2·P1, P1 = L·R (R elements per thread, L lanes per group), b = b2·P1 + b1:
//   phase 1  the H_{P1} factor along b1: log2 R butterfly stages in registers (R = 16 elements per thread, loaded
//            as 16-byte vectors), then log2 L stages across lanes with warp shuffles (__shfl_xor_sync);
//   phase 2  the H_{P2} factor along b2 (stride P1): each thread gathers one column of P2 ≤ 64 values from shared
//            memory into registers and butterflies it there;
//   phase 3  the K×K ±1 core (K > 1): y[a, b] = Σ_a' H_K[a, a'] x[a', b] (inverse: H_K[a', a]), the core as an fp32
//            table in shared memory, 8 outputs per thread so that each read of the row feeds 8 FMAs.
// Sylvester H_P = H_2 ⊗ ... ⊗ H_2 is symmetric and its factors act on distinct index bits, so the order of the
// butterfly stages does not matter, and the inverse only transposes the core. The last phase that runs writes to
// global memory, scaled by 1/√n and rounded once to the input dtype (fp16/bf16 are computed in fp32).
// Built by kernels/wht_cuda.py with torch.utils.cpp_extension.load; wht.py dispatches to it for CUDA inputs.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace {

constexpr int kThreads = 256;   // threads per block (a multiple of 32, so lane groups never straddle warps)
constexpr int kMaxLogP2 = 6;    // phase 2 holds at most 64 values per thread: P ≤ 64·P1 = 32768
constexpr int kMaxK = 172;
constexpr int kTileA = 8;       // phase 3: outputs per thread and pass (the core table is padded to a multiple)
// Resident blocks per SM asked of the compiler (it caps the registers per thread to fit them): 6 where phase 2
// holds ≤ 16 values per thread, so more blocks are resident and more loads in flight (faster than no cap: see
// docs/performance.md, "WHT kernel"); the 32- and 64-value columns would spill, so no cap there.
template <int LOG_P2> constexpr int min_blocks() { return LOG_P2 <= 4 ? 6 : 1; }

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

// R contiguous elements starting at p. With vec (p 16-byte aligned) as R·size/16 independent 16-byte loads issued
// back to back, so a thread keeps them all in flight at once: the kernel is bound by memory latency, and R = 16
// (32 or 64 bytes per thread) is what lets the 2-byte types approach the bandwidth.
template <typename scalar_t, int R>
__device__ __forceinline__ void load_r(const scalar_t* __restrict__ p, float (&v)[R], bool vec) {
  constexpr int E = 16 / static_cast<int>(sizeof(scalar_t));   // elements per 16-byte transaction
  if constexpr (R % E == 0) {
    if (vec) {
      uint4 raw[R / E];
#pragma unroll
      for (int c = 0; c < R / E; ++c) raw[c] = reinterpret_cast<const uint4*>(p)[c];
#pragma unroll
      for (int c = 0; c < R / E; ++c) {
        const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw[c]);
#pragma unroll
        for (int r = 0; r < E; ++r) v[c * E + r] = to_f(e[r]);
      }
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = to_f(p[r]);
}

template <typename scalar_t, int R>
__device__ __forceinline__ void store_r(scalar_t* __restrict__ p, const float (&v)[R], float scale, bool vec) {
  constexpr int E = 16 / static_cast<int>(sizeof(scalar_t));
  if constexpr (R % E == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < R / E; ++c) {
        uint4 raw;
        scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
        for (int r = 0; r < E; ++r) e[r] = from_f<scalar_t>(v[c * E + r] * scale);
        reinterpret_cast<uint4*>(p)[c] = raw;
      }
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) p[r] = from_f<scalar_t>(v[r] * scale);
}

// In-register Sylvester butterfly over N = 2^LOGN values (natural order: (lo, hi) -> (lo + hi, lo - hi)).
template <int N>
__device__ __forceinline__ void butterfly(float (&v)[N]) {
#pragma unroll
  for (int h = 1; h < N; h <<= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
}

template <typename scalar_t, int R, int LOG_P2>
__global__ void __launch_bounds__(kThreads, min_blocks<LOG_P2>())
wht_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, const int8_t* __restrict__ core,
           int n, int K, int Kp, int P, int L, bool inverse, bool vec, float scale) {
  constexpr int P2 = 1 << LOG_P2;
  // n floats (the row), then (K > 1) the core as a float table tab[a2·Kp + a] = the weight of input a2 in output a
  extern __shared__ __align__(16) float smem[];
  float* tab = smem + n;                                  // n is a multiple of 4 when K > 1: 16-byte aligned
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * n;
  scalar_t* yr = y + row * n;
  const int tid = threadIdx.x, lane = tid & 31;
  const int P1 = L * R;
  const bool final1 = (K == 1 && P2 == 1), final2 = (K == 1);

  if (K > 1)
    for (int i = tid; i < K * Kp; i += blockDim.x) {
      const int a2 = i / Kp, a = i - a2 * Kp;
      tab[i] = a < K ? static_cast<float>(inverse ? core[a2 * K + a] : core[a * K + a2]) : 0.f;
    }

  // phase 1: H_{P1} along b1; virtual lane v holds elements [v·R, v·R + R); groups of L lanes share a P1 segment
  const int lanes = n / R;
  for (int base = 0; base < lanes; base += blockDim.x) {   // uniform trip count: every lane joins the shuffles
    const int v = base + tid;
    const bool active = v < lanes;
    float val[R];
    if (active) {
      load_r<scalar_t, R>(xr + (int64_t)v * R, val, vec);
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) val[r] = 0.f;
    }
    butterfly<R>(val);
    for (int s = 1; s < L; s <<= 1) {
      const bool hi = (lane & s) != 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float other = __shfl_xor_sync(0xffffffffu, val[r], s);
        val[r] = hi ? other - val[r] : val[r] + other;
      }
    }
    if (active) {
      if (final1) {
        store_r<scalar_t, R>(yr + (int64_t)v * R, val, scale, vec);
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) smem[v * R + r] = val[r];
      }
    }
  }
  if (final1) return;
  __syncthreads();

  // phase 2: H_{P2} along b2, one column (a, b1) per thread and iteration, P2 values in registers
  if constexpr (P2 > 1) {
    for (int c = tid; c < K * P1; c += blockDim.x) {
      const int a = c / P1, b1 = c - a * P1;
      const int off = a * P + b1;
      float col[P2];
#pragma unroll
      for (int j = 0; j < P2; ++j) col[j] = smem[off + j * P1];
      butterfly<P2>(col);
      if (final2) {
#pragma unroll
        for (int j = 0; j < P2; ++j) yr[off + j * P1] = from_f<scalar_t>(col[j] * scale);
      } else {
#pragma unroll
        for (int j = 0; j < P2; ++j) smem[off + j * P1] = col[j];
      }
    }
    if (final2) return;
    __syncthreads();
  }

  // phase 3: the K×K core. A thread takes one column b and kTileA outputs a0..a0+7: per input a2 one read of the
  // row and two 16-byte (warp-broadcast) reads of the table feed 8 FMAs; outputs written straight to global memory.
  const int tiles = Kp / kTileA;
  for (int it = tid; it < tiles * P; it += blockDim.x) {
    const int t = it / P, b = it - t * P;
    const int a0 = t * kTileA;
    float acc[kTileA];
#pragma unroll
    for (int j = 0; j < kTileA; ++j) acc[j] = 0.f;
    for (int a2 = 0; a2 < K; ++a2) {
      const float v = smem[a2 * P + b];
      const float4* h = reinterpret_cast<const float4*>(tab + a2 * Kp + a0);
      const float4 h0 = h[0], h1 = h[1];
      acc[0] += h0.x * v; acc[1] += h0.y * v; acc[2] += h0.z * v; acc[3] += h0.w * v;
      acc[4] += h1.x * v; acc[5] += h1.y * v; acc[6] += h1.z * v; acc[7] += h1.w * v;
    }
#pragma unroll
    for (int j = 0; j < kTileA; ++j)
      if (a0 + j < K) yr[(a0 + j) * P + b] = from_f<scalar_t>(acc[j] * scale);
  }
}

int ilog2(int v) { int l = 0; while ((1 << l) < v) ++l; return l; }

// dynamic shared memory of one block: the row as fp32, and the padded core table when K > 1
size_t shmem_bytes(int n, int K) {
  const int Kp = (K + kTileA - 1) / kTileA * kTileA;
  return sizeof(float) * (static_cast<size_t>(n) + (K > 1 ? static_cast<size_t>(K) * Kp : 0));
}

template <typename scalar_t, int R, int LOG_P2>
void launch_one(const at::Tensor& x, at::Tensor& y, const at::Tensor& core, int n, int K, int P, int L, bool inverse,
                bool vec) {
  const size_t shmem = shmem_bytes(n, K);
  const int Kp = (K + kTileA - 1) / kTileA * kTileA;
  auto kernel = wht_kernel<scalar_t, R, LOG_P2>;
  if (shmem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem));
  }
  const int64_t rows = x.size(0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(n));
  kernel<<<static_cast<unsigned>(rows), kThreads, shmem, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), core.data_ptr<int8_t>(), n, K, Kp, P, L, inverse, vec, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_r(const at::Tensor& x, at::Tensor& y, const at::Tensor& core, int n, int K, int P, int R, int L, int logp2,
              bool vec, bool inverse) {
  if (R == 16) {
    switch (logp2) {
      case 0: launch_one<scalar_t, 16, 0>(x, y, core, n, K, P, L, inverse, vec); break;
      case 1: launch_one<scalar_t, 16, 1>(x, y, core, n, K, P, L, inverse, vec); break;
      case 2: launch_one<scalar_t, 16, 2>(x, y, core, n, K, P, L, inverse, vec); break;
      case 3: launch_one<scalar_t, 16, 3>(x, y, core, n, K, P, L, inverse, vec); break;
      case 4: launch_one<scalar_t, 16, 4>(x, y, core, n, K, P, L, inverse, vec); break;
      case 5: launch_one<scalar_t, 16, 5>(x, y, core, n, K, P, L, inverse, vec); break;
      case 6: launch_one<scalar_t, 16, 6>(x, y, core, n, K, P, L, inverse, vec); break;
      default: TORCH_CHECK(false, "wht_cuda: P2 = 2^", logp2, " exceeds 2^", kMaxLogP2);
    }
    return;
  }
  switch (R) {   // R < 16 means P < 16: L = 1 and P2 = 1
    case 8: launch_one<scalar_t, 8, 0>(x, y, core, n, K, P, L, inverse, vec); break;
    case 4: launch_one<scalar_t, 4, 0>(x, y, core, n, K, P, L, inverse, vec); break;
    case 2: launch_one<scalar_t, 2, 0>(x, y, core, n, K, P, L, inverse, vec); break;
    default: launch_one<scalar_t, 1, 0>(x, y, core, n, K, P, L, inverse, vec); break;
  }
}

}  // namespace

// x (rows, n) contiguous fp32/fp16/bf16 on CUDA; core (K, K) int8 ±1 on the same device; n = K·P, P a power of two.
// Returns y (rows, n), same dtype: x Tᵀ, or x T when inverse.
at::Tensor wht_forward(const at::Tensor& x, const at::Tensor& core, int64_t P, bool inverse) {
  TORCH_CHECK(x.is_cuda() && core.is_cuda(), "wht_cuda: x and core must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "wht_cuda: x must be a contiguous (rows, n) tensor");
  TORCH_CHECK(core.scalar_type() == at::kChar && core.dim() == 2 && core.size(0) == core.size(1) && core.is_contiguous(),
              "wht_cuda: core must be a contiguous (K, K) int8 tensor");
  TORCH_CHECK(x.get_device() == core.get_device(), "wht_cuda: x and core on different devices");
  const int64_t n64 = x.size(1), K64 = core.size(0);
  TORCH_CHECK(P >= 1 && (P & (P - 1)) == 0 && K64 * P == n64, "wht_cuda: n = ", n64, " is not K·P with K = ", K64,
              " and P = ", P, " a power of two");
  TORCH_CHECK(K64 <= kMaxK, "wht_cuda: core order ", K64, " > ", kMaxK);
  TORCH_CHECK(x.size(0) <= 2147483647LL, "wht_cuda: too many rows for one grid");
  const int n = static_cast<int>(n64), K = static_cast<int>(K64), Pi = static_cast<int>(P);
  const int R = Pi >= 16 ? 16 : Pi;                      // elements per thread in phase 1
  const int L = (Pi / R) >= 32 ? 32 : Pi / R;            // lanes per group
  const int logp2 = ilog2(Pi / (L * R));
  TORCH_CHECK(logp2 <= kMaxLogP2, "wht_cuda: P = ", P, " > ", (16 * 32) << kMaxLogP2, " is not supported");
  int dev_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  TORCH_CHECK(shmem_bytes(n, K) <= static_cast<size_t>(dev_smem), "wht_cuda: n = ", n, " needs ",
              shmem_bytes(n, K), " bytes of shared memory per block, the device has ", dev_smem);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr()) | reinterpret_cast<uintptr_t>(y.data_ptr());
  const bool vec = addr % 16 == 0 && (n * x.element_size()) % 16 == 0;   // every row start 16-byte aligned
  switch (x.scalar_type()) {
    case at::kFloat: launch_r<float>(x, y, core, n, K, Pi, R, L, logp2, vec, inverse); break;
    case at::kHalf: launch_r<at::Half>(x, y, core, n, K, Pi, R, L, logp2, vec, inverse); break;
    case at::kBFloat16: launch_r<at::BFloat16>(x, y, core, n, K, Pi, R, L, logp2, vec, inverse); break;
    default: TORCH_CHECK(false, "wht_cuda: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wht_forward", &wht_forward, "x Tᵀ (inverse: x T) along the last dim, T = (H_K ⊗ H_P)/√n (CUDA)");
}
