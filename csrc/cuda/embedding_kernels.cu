// CUDA kernels for token embedding + positional encoding (forward and backward).
// Torch-free on purpose: raw pointers, sizes and a stream, so CI compiles this file with nvcc
// for sm_80 and sm_90 on a machine whose torch has no CUDA headers. The glue is embedding_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>
#include <type_traits>

#include "embedding_cuda.h"
#include "../philox.h"

namespace fasttransformer {
namespace {

// Each thread handles this many consecutive tokens for its column: the per-token work (id,
// position, checks) and the per-column work (frequencies) are both amortised, and four
// independent 16-byte loads are in flight before the first use.
constexpr int kTokensPerThread = 4;
constexpr int kThreadsPerBlock = 256;
// Sorted tokens per chunk in the deterministic backward.
constexpr int kChunk = 32;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// sin/cos of 2*pi * pos * turns_per_pos (turns_per_pos = inv_freq / 2pi). The angle is
// formed in double and reduced to [-1/2, 1/2] turn exactly, so the result keeps float accuracy
// at any position (a float angle loses ~pos * 6e-8), and sincospi needs no slow range
// reduction (sincosf's Payne-Hanek path would put a stack frame in the kernel).
template <typename T>
__device__ __forceinline__ void sinusoid(int64_t pos, double turns_per_pos,
                                         typename AccType<T>::type& s,
                                         typename AccType<T>::type& c) {
  const double turns = static_cast<double>(pos) * turns_per_pos;
  const double half_turns = 2.0 * (turns - rint(turns));  // in [-1, 1]
  if constexpr (std::is_same<T, double>::value) {
    sincospi(half_turns, &s, &c);
  } else {
    sincospif(static_cast<float>(half_turns), &s, &c);
  }
}

// Random words for the VEC consecutive elements starting at flat index e0 (e0 % VEC == 0).
template <int VEC>
__device__ __forceinline__ void random_words(uint64_t seed, int64_t e0, uint32_t (&words)[VEC]) {
  if constexpr (VEC >= 4) {
#pragma unroll
    for (int g = 0; g < VEC / 4; ++g) {
      uint32_t block[4];
      philox4x32_10(static_cast<uint64_t>(e0 / 4 + g), seed, block);
#pragma unroll
      for (int u = 0; u < 4; ++u) words[4 * g + u] = block[u];
    }
  } else {
    uint32_t block[4];
    philox4x32_10(static_cast<uint64_t>(e0 / 4), seed, block);
    const int lane = static_cast<int>(e0 & 3);
    // Selects, not block[lane + u]: a run-time index would move block to local memory.
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      const int l = lane + u;
      words[u] = l == 0 ? block[0] : l == 1 ? block[1] : l == 2 ? block[2] : block[3];
    }
  }
}

__device__ __forceinline__ void report_error(const EmbeddingForwardParams& p, int slot,
                                             int64_t token) {
  if (p.trap_on_error) {
    // No host check is possible (e.g. during CUDA graph capture): fail loudly, never read.
    __assert_fail(slot == 0 ? "fasttransformer: input_ids value outside [0, num_embeddings)"
                            : "fasttransformer: position outside the position table",
                  __FILE__, __LINE__, __func__);
  } else {  // error_slots is null in trap mode
    atomicMin(p.error_slots + slot, static_cast<unsigned long long>(token));
  }
}

// At most 128 registers (2 blocks of 256 per SM): uncapped, bf16 with 16-byte vectors took
// 156 (ptxas -v), leaving 8 warps per SM to cover memory latency.
template <typename T, typename Index, int VEC, bool LEARNED, int TOKENS>
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
embedding_forward_kernel(const EmbeddingForwardParams p) {
  using acc_t = typename AccType<T>::type;
  const T* weight = static_cast<const T*>(p.weight);
  const T* pos_weight = static_cast<const T*>(p.pos_weight);
  const Index* ids = static_cast<const Index*>(p.input_ids);
  T* out = static_cast<T*>(p.out);
  constexpr bool learned = LEARNED;

  const int64_t first_token =
      (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * TOKENS;
  int64_t row[TOKENS];  // weight row, or -1: token absent or invalid
  int64_t pos[TOKENS];
#pragma unroll
  for (int k = 0; k < TOKENS; ++k) {
    const int64_t token = first_token + k;
    row[k] = -1;
    pos[k] = 0;
    if (token >= p.n_tokens) continue;
    const int64_t id = static_cast<int64_t>(ids[token]);
    const int64_t b = token / p.seq_len;
    const int64_t position =
        p.start_offset + (p.start_pos ? p.start_pos[b] : 0) + (token - b * p.seq_len);
    const bool bad_id = id < 0 || id >= p.vocab;
    const bool bad_pos = position < 0 || (learned && position >= p.max_positions);
    if (bad_id || bad_pos) {
      if (threadIdx.x == 0) report_error(p, bad_id ? 0 : 1, token);
      continue;
    }
    row[k] = id;
    pos[k] = position;
  }

  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t vecs_per_row = p.dim / VEC;
  for (int64_t col = threadIdx.x; col < vecs_per_row; col += blockDim.x) {
    const int64_t j0 = col * VEC;
    double turns_per_pos[VEC > 1 ? VEC / 2 : 1];
    if constexpr (!learned) {
#pragma unroll
      for (int u = 0; u < (VEC > 1 ? VEC / 2 : 1); ++u) {
        turns_per_pos[u] = exp2(-static_cast<double>((j0 >> 1) + u) * p.log2_base_over_half_dim) *
                           0.15915494309189535;  // 1 / (2 pi)
      }
    }
    Vec<T, VEC> w[TOKENS], pe[TOKENS];
#pragma unroll
    for (int k = 0; k < TOKENS; ++k) {
      if (row[k] < 0) continue;
      w[k] = *reinterpret_cast<const Vec<T, VEC>*>(weight + row[k] * p.dim + j0);
      if constexpr (learned) pe[k] = *reinterpret_cast<const Vec<T, VEC>*>(pos_weight + pos[k] * p.dim + j0);
    }
#pragma unroll
    for (int k = 0; k < TOKENS; ++k) {
      const int64_t token = first_token + k;
      if (token >= p.n_tokens) continue;
      Vec<T, VEC> result;
      if (row[k] < 0) {
#pragma unroll
        for (int u = 0; u < VEC; ++u) result.v[u] = from_acc<T>(acc_t(0));
      } else {
        acc_t value[VEC];
        if constexpr (learned) {
#pragma unroll
          for (int u = 0; u < VEC; ++u) value[u] = to_acc(pe[k].v[u]);
        } else if constexpr (VEC == 1) {
          acc_t s, c;
          sinusoid<T>(pos[k], turns_per_pos[0], s, c);
          value[0] = (j0 & 1) ? c : s;
        } else {
#pragma unroll
          for (int u = 0; u < VEC; u += 2) sinusoid<T>(pos[k], turns_per_pos[u / 2], value[u], value[u + 1]);
        }
#pragma unroll
        for (int u = 0; u < VEC; ++u) value[u] += to_acc(w[k].v[u]) * static_cast<acc_t>(p.scale);
        if (p.dropout) {
          uint32_t words[VEC];
          random_words<VEC>(seed, token * p.dim + j0, words);
#pragma unroll
          for (int u = 0; u < VEC; ++u) {
            value[u] *= dropout_keep(words[u], p.drop_threshold) ? static_cast<acc_t>(p.drop_scale)
                                                                 : acc_t(0);
          }
        }
#pragma unroll
        for (int u = 0; u < VEC; ++u) result.v[u] = from_acc<T>(value[u]);
      }
      *reinterpret_cast<Vec<T, VEC>*>(out + token * p.dim + j0) = result;
    }
  }
}

// grad_output[token, j0:j0+VEC] times the forward's dropout factor, in the accumulator type.
template <typename T, int VEC>
__device__ __forceinline__ void load_grad(const EmbeddingBackwardParams& p, uint64_t seed,
                                          int64_t token, int64_t j0,
                                          typename AccType<T>::type (&g)[VEC]) {
  using acc_t = typename AccType<T>::type;
  const Vec<T, VEC> v =
      *reinterpret_cast<const Vec<T, VEC>*>(static_cast<const T*>(p.grad_output) + token * p.dim + j0);
#pragma unroll
  for (int u = 0; u < VEC; ++u) g[u] = to_acc(v.v[u]);
  if (p.dropout) {
    uint32_t words[VEC];
    random_words<VEC>(seed, token * p.dim + j0, words);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      g[u] *= dropout_keep(words[u], p.drop_threshold) ? static_cast<acc_t>(p.drop_scale) : acc_t(0);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_grad_row(const EmbeddingBackwardParams& p, int64_t key,
                                               int64_t j0,
                                               const typename AccType<T>::type (&acc)[VEC]) {
  using acc_t = typename AccType<T>::type;
  Vec<T, VEC> v;
#pragma unroll
  for (int u = 0; u < VEC; ++u) v.v[u] = from_acc<T>(acc[u] * static_cast<acc_t>(p.multiplier));
  *reinterpret_cast<Vec<T, VEC>*>(static_cast<T*>(p.grad) + key * p.dim + j0) = v;
}

// Fast backward (float32/float64 tables): every token adds its row with atomics.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
embedding_backward_atomic_kernel(const EmbeddingBackwardParams p) {
  using acc_t = typename AccType<T>::type;
  T* grad = static_cast<T*>(p.grad);
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t first_token =
      (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kTokensPerThread;
  const int64_t vecs_per_row = p.dim / VEC;
#pragma unroll
  for (int k = 0; k < kTokensPerThread; ++k) {
    const int64_t token = first_token + k;
    if (token >= p.n_tokens) break;
    const int64_t key = p.keys[token];
    if (key == p.padding_idx || key < 0 || key >= p.num_rows) continue;
    for (int64_t col = threadIdx.x; col < vecs_per_row; col += blockDim.x) {
      acc_t g[VEC];
      load_grad<T, VEC>(p, seed, token, col * VEC, g);
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        atomicAdd(grad + key * p.dim + col * VEC + u, g[u] * static_cast<acc_t>(p.multiplier));
      }
    }
  }
}

// Deterministic backward, pass 1. Tokens are sorted by key and cut into chunks of kChunk; a
// thread sums, in sorted order, the run of equal keys inside its chunk for one column. A run
// that lies wholly inside the chunk is written to grad; a run that continues from the previous
// chunk goes to partial[head][chunk], one that continues into the next to partial[tail][chunk].
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
embedding_backward_chunks_kernel(const EmbeddingBackwardParams p) {
  using acc_t = typename AccType<T>::type;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t begin = chunk * kChunk;
  if (begin >= p.n_tokens) return;
  const int64_t end = begin + kChunk < p.n_tokens ? begin + kChunk : p.n_tokens;
  const int64_t num_chunks = (p.n_tokens + kChunk - 1) / kChunk;
  const int64_t key_before = begin > 0 ? p.sorted_keys[begin - 1] : -1;
  const int64_t key_after = end < p.n_tokens ? p.sorted_keys[end] : -1;
  acc_t* head = static_cast<acc_t*>(p.partial);
  acc_t* tail = head + num_chunks * p.dim;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= p.dim / VEC) return;
  const int64_t j0 = col * VEC;

  acc_t acc[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = acc_t(0);
  int64_t run_start = begin;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t key = p.sorted_keys[i];
    if (key != p.padding_idx) {
      acc_t g[VEC];
      load_grad<T, VEC>(p, seed, p.order[i], j0, g);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] += g[u];
    }
    if (i + 1 < end && p.sorted_keys[i + 1] == key) continue;
    const bool from_before = run_start == begin && key == key_before;
    const bool into_after = i + 1 == end && key == key_after;
    if (from_before || into_after) {
      acc_t* slot = (from_before ? head : tail) + chunk * p.dim + j0;
#pragma unroll
      for (int u = 0; u < VEC; ++u) slot[u] = acc[u];
    } else if (key != p.padding_idx && key >= 0 && key < p.num_rows) {
      store_grad_row<T, VEC>(p, key, j0, acc);
    }
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = acc_t(0);
    run_start = i + 1;
  }
}

// Deterministic backward, pass 2: the chunk in which a run spanning chunks starts adds its
// tail and the following chunks' heads, in order, and writes the row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
embedding_backward_combine_kernel(const EmbeddingBackwardParams p) {
  using acc_t = typename AccType<T>::type;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t begin = chunk * kChunk;
  if (begin >= p.n_tokens) return;
  const int64_t end = begin + kChunk < p.n_tokens ? begin + kChunk : p.n_tokens;
  if (end >= p.n_tokens) return;
  const int64_t key = p.sorted_keys[end - 1];
  if (p.sorted_keys[end] != key || key == p.padding_idx || key < 0 || key >= p.num_rows) return;
  if (begin > 0 && p.sorted_keys[begin] == key && p.sorted_keys[begin - 1] == key) return;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (col >= p.dim / VEC) return;
  const int64_t j0 = col * VEC;
  const int64_t num_chunks = (p.n_tokens + kChunk - 1) / kChunk;
  const acc_t* head = static_cast<const acc_t*>(p.partial);
  const acc_t* tail = head + num_chunks * p.dim;

  acc_t acc[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = tail[chunk * p.dim + j0 + u];
  for (int64_t next = chunk + 1; next < num_chunks; ++next) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] += head[next * p.dim + j0 + u];
    const int64_t next_end = (next + 1) * kChunk;
    if (next_end >= p.n_tokens || p.sorted_keys[next_end - 1] != key ||
        p.sorted_keys[next_end] != key) {
      break;
    }
  }
  store_grad_row<T, VEC>(p, key, j0, acc);
}

bool aligned(const void* ptr, int bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The widest vector (at most 16 bytes) that divides the row and suits every pointer.
template <typename T>
int pick_vec(int64_t dim, const void* a, const void* b, const void* c) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    const int bytes = vec * static_cast<int>(sizeof(T));
    if (dim % vec == 0 && aligned(a, bytes) && aligned(b, bytes) && aligned(c, bytes)) return vec;
  }
  return 1;
}

// Threads along x cover a row's vectors, along y tokens (or chunks).
dim3 block_shape(int64_t vecs_per_row) {
  int x = 1;
  while (x < vecs_per_row && x < kThreadsPerBlock) x *= 2;
  return dim3(x, kThreadsPerBlock / x);
}

template <typename T, typename Index, int VEC>
cudaError_t launch_forward(const EmbeddingForwardParams& p, cudaStream_t stream) {
  // Learned positions with 16-byte vectors hold two vectors per token: 2 tokens per thread
  // keep them in 128 registers (at 4 tokens ptxas spilled 4 bytes).
  constexpr int kLearnedTokens = VEC * sizeof(T) == 16 ? 2 : kTokensPerThread;
  const bool learned = p.pos_weight != nullptr;
  const dim3 block = block_shape(p.dim / VEC);
  const int64_t tokens_per_block =
      static_cast<int64_t>(block.y) * (learned ? kLearnedTokens : kTokensPerThread);
  const int64_t blocks = (p.n_tokens + tokens_per_block - 1) / tokens_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (learned) {
    embedding_forward_kernel<T, Index, VEC, true, kLearnedTokens><<<grid, block, 0, stream>>>(p);
  } else {
    embedding_forward_kernel<T, Index, VEC, false, kTokensPerThread><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, typename Index>
cudaError_t forward_for_type(const EmbeddingForwardParams& p, cudaStream_t stream) {
  switch (pick_vec<T>(p.dim, p.weight, p.pos_weight, p.out)) {
    case 8: if constexpr (sizeof(T) <= 2) return launch_forward<T, Index, 8>(p, stream); break;
    case 4: if constexpr (sizeof(T) <= 4) return launch_forward<T, Index, 4>(p, stream); break;
    case 2: return launch_forward<T, Index, 2>(p, stream);
    default: break;
  }
  return launch_forward<T, Index, 1>(p, stream);
}

template <typename T, int VEC>
cudaError_t launch_backward(const EmbeddingBackwardParams& p, bool deterministic,
                            cudaStream_t stream) {
  const dim3 block = block_shape(p.dim / VEC);
  if constexpr (sizeof(T) >= 4 && VEC == 1) if (!deterministic) {
    const int64_t tokens_per_block = static_cast<int64_t>(block.y) * kTokensPerThread;
    const int64_t blocks = (p.n_tokens + tokens_per_block - 1) / tokens_per_block;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    embedding_backward_atomic_kernel<T, VEC><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int64_t num_chunks = (p.n_tokens + kChunk - 1) / kChunk;
  const int64_t col_blocks = (p.dim / VEC + block.x - 1) / block.x;
  const int64_t row_blocks = (num_chunks + block.y - 1) / block.y;
  if (row_blocks > 0x7fffffff || col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  embedding_backward_chunks_kernel<T, VEC><<<grid, block, 0, stream>>>(p);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  embedding_backward_combine_kernel<T, VEC><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_for_type(const EmbeddingBackwardParams& p, bool deterministic,
                              cudaStream_t stream) {
  // Atomics add scalars: vectorising them buys nothing, so the fast path stays at VEC 1.
  if constexpr (sizeof(T) >= 4) {
    if (!deterministic) return launch_backward<T, 1>(p, false, stream);
  }
  switch (pick_vec<T>(p.dim, p.grad_output, p.grad, nullptr)) {
    case 8: if constexpr (sizeof(T) <= 2) return launch_backward<T, 8>(p, true, stream); break;
    case 4: if constexpr (sizeof(T) <= 4) return launch_backward<T, 4>(p, true, stream); break;
    case 2: return launch_backward<T, 2>(p, true, stream);
    default: break;
  }
  return launch_backward<T, 1>(p, true, stream);
}

}  // namespace

cudaError_t embedding_forward_cuda(const EmbeddingForwardParams& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return cudaSuccess;  // dim == 0 still launches: ids are checked
  switch (p.dtype) {
    case ScalarKind::Float32:
      return p.ids_int64 ? forward_for_type<float, int64_t>(p, stream)
                         : forward_for_type<float, int32_t>(p, stream);
    case ScalarKind::Float16:
      return p.ids_int64 ? forward_for_type<__half, int64_t>(p, stream)
                         : forward_for_type<__half, int32_t>(p, stream);
    case ScalarKind::BFloat16:
      return p.ids_int64 ? forward_for_type<__nv_bfloat16, int64_t>(p, stream)
                         : forward_for_type<__nv_bfloat16, int32_t>(p, stream);
    case ScalarKind::Float64:
      return p.ids_int64 ? forward_for_type<double, int64_t>(p, stream)
                         : forward_for_type<double, int32_t>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t embedding_backward_cuda(const EmbeddingBackwardParams& p, bool deterministic,
                                    cudaStream_t stream) {
  if (p.n_tokens == 0 || p.dim == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarKind::Float32: return backward_for_type<float>(p, deterministic, stream);
    case ScalarKind::Float64: return backward_for_type<double>(p, deterministic, stream);
    // Half tables always take the sorted path: it accumulates in float32 and writes each row
    // once, where atomics would round every addition to half precision.
    case ScalarKind::Float16: return backward_for_type<__half>(p, true, stream);
    case ScalarKind::BFloat16: return backward_for_type<__nv_bfloat16>(p, true, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t embedding_backward_workspace_elements(int64_t n_tokens, int64_t dim) {
  return 2 * ((n_tokens + kChunk - 1) / kChunk) * dim;
}

}  // namespace fasttransformer
