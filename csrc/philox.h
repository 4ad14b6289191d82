// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3",
// SC'11), shared by the CPU and CUDA kernels so both draw the same dropout mask from a seed.
// Torch-free and CUDA-free: included by .cpp and .cu files alike.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FT_HOST_DEVICE __host__ __device__ __forceinline__
#define FT_UNROLL _Pragma("unroll")
#else
#define FT_HOST_DEVICE inline
#define FT_UNROLL
#endif

namespace fasttransformer {

// Four 32-bit random words for the 64-bit counter `counter` under the 64-bit key `key`
// (counter words 2 and 3 are zero).
FT_HOST_DEVICE void philox4x32_10(uint64_t counter, uint64_t key, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
FT_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Dropout decision for flat element index e: element e uses word (e % 4) of the Philox block
// with counter e / 4, and is kept when its top 24 bits are >= threshold = round(p * 2^24).
FT_HOST_DEVICE bool dropout_keep(uint32_t random_word, uint32_t threshold) {
  return (random_word >> 8) >= threshold;
}

}  // namespace fasttransformer
