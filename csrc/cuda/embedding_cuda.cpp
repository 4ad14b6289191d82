// CUDA implementations of the embedding ops: torch glue around the torch-free kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../embedding.h"
#include "embedding_cuda.h"

namespace fasttransformer {
namespace {

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? std::optional<at::Tensor>(tensor->contiguous()) : std::nullopt;
}

at::Tensor token_positional_embedding_cuda(const at::Tensor& input_ids, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& pos_weight,
                                           const std::optional<at::Tensor>& start_pos,
                                           int64_t start_offset, double scale, double dropout_p,
                                           const std::optional<at::Tensor>& seed,
                                           std::optional<int64_t> padding_idx, bool check_ids) {
  (void)padding_idx;  // affects only the backward
  at::Tensor out = embedding_forward_prepare(input_ids, weight, pos_weight, start_pos,
                                             start_offset, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor ids = input_ids.contiguous(), table = weight.contiguous();
  const std::optional<at::Tensor> positions = contiguous(pos_weight), starts = contiguous(start_pos);
  EmbeddingForwardParams p = embedding_forward_params(ids, table, positions, starts, start_offset,
                                                      scale, dropout_p, seed, out);
  if (p.n_tokens == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Raising a Python error needs the slots on the host: a synchronisation, impossible while a
  // CUDA graph is being captured and skipped with check_ids=False. Then the kernel asserts on
  // the device instead (as torch's embedding does); it never reads out of bounds either way.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool host_check = check_ids && capture == cudaStreamCaptureStatusNone;
  at::Tensor slots;  // only read back when checking on the host: no allocation otherwise
  p.trap_on_error = !host_check;
  if (host_check) {
    slots = at::empty({2}, weight.options().dtype(at::kLong));
    p.error_slots = reinterpret_cast<unsigned long long*>(slots.data_ptr());
    C10_CUDA_CHECK(cudaMemsetAsync(p.error_slots, 0xFF, 2 * sizeof(int64_t), stream));
  }
  C10_CUDA_CHECK(embedding_forward_cuda(p, stream));
  if (host_check) {
    const at::Tensor host = slots.cpu();
    const auto* host_slots = reinterpret_cast<const unsigned long long*>(host.data_ptr());
    raise_token_errors(host_slots, p, ids, starts);
  }
  return out;
}

at::Tensor token_positional_embedding_backward_cuda(const at::Tensor& grad_output,
                                                    const at::Tensor& index,
                                                    c10::SymInt num_rows, double multiplier,
                                                    double dropout_p,
                                                    const std::optional<at::Tensor>& seed,
                                                    std::optional<int64_t> padding_idx,
                                                    bool deterministic) {
  const int64_t rows = num_rows.expect_int();
  embedding_backward_check(grad_output, index, rows, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor keys = index.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor grad = at::zeros({rows, g.size(2)}, g.options());
  EmbeddingBackwardParams p =
      embedding_backward_params(g, keys, grad, multiplier, dropout_p, seed, padding_idx);
  if (p.n_tokens == 0 || p.dim == 0) return grad;
  const bool full_precision = g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble;
  const bool sorted = deterministic || !full_precision;
  at::Tensor sorted_keys, order, partial;
  if (sorted) {
    std::tie(sorted_keys, order) = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    p.sorted_keys = sorted_keys.data_ptr<int64_t>();
    p.order = order.data_ptr<int64_t>();
    partial = at::empty({embedding_backward_workspace_elements(p.n_tokens, p.dim)},
                        g.options().dtype(g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    p.partial = partial.data_ptr();
  }
  C10_CUDA_CHECK(embedding_backward_cuda(p, sorted, c10::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttransformer, CUDA, m) {
  m.impl("token_positional_embedding", &token_positional_embedding_cuda);
  m.impl("token_positional_embedding_backward", &token_positional_embedding_backward_cuda);
}

}  // namespace fasttransformer
