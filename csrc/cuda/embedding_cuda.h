// Launchers of the CUDA embedding kernels. Torch-free: included by the .cu and the CUDA glue.
#pragma once
#include <cuda_runtime_api.h>

#include "../embedding_params.h"

namespace fasttransformer {

cudaError_t embedding_forward_cuda(const EmbeddingForwardParams& params, cudaStream_t stream);

// deterministic: sorted, chunked reduction (bitwise reproducible); otherwise atomics for
// float32/float64 tables (half tables always take the sorted path).
cudaError_t embedding_backward_cuda(const EmbeddingBackwardParams& params, bool deterministic,
                                    cudaStream_t stream);

// Accumulator elements (float32, or float64 for float64 tables) the sorted path needs.
int64_t embedding_backward_workspace_elements(int64_t n_tokens, int64_t dim);

}  // namespace fasttransformer
