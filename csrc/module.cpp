// The extension module fasttransformer._C: one registration block for every native op, and a
// few constants describing the build (read by `python -m fasttransformer info`).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fasttransformer, m) {
  // out[b, t] = dropout(weight[input_ids[b, t]] * scale + P[start_offset + start_pos[b] + t]);
  // P = pos_weight, or the sinusoid when pos_weight is None. padding_idx is used by the backward.
  m.def(
      "token_positional_embedding(Tensor input_ids, Tensor weight, Tensor? pos_weight, "
      "Tensor? start_pos, SymInt start_offset, float scale, float dropout_p, Tensor? seed, "
      "int? padding_idx, bool check_ids) -> Tensor");
  // grad[index[b, t]] += multiplier * dropout(grad_output[b, t]); rows == padding_idx stay zero.
  m.def(
      "token_positional_embedding_backward(Tensor grad_output, Tensor index, SymInt num_rows, "
      "float multiplier, float dropout_p, Tensor? seed, int? padding_idx, bool deterministic) "
      "-> Tensor");
}

#define FT_STRINGIFY_(...) #__VA_ARGS__
#define FT_STRINGIFY(...) FT_STRINGIFY_(__VA_ARGS__)
#ifdef FT_CUDA_ARCHS
#define FT_CUDA_ARCHS_STRING FT_STRINGIFY(FT_CUDA_ARCHS)
#else
#define FT_CUDA_ARCHS_STRING ""
#endif

extern "C" PyObject* PyInit__C(void) {
  // every field given (m_methods, m_slots, m_traverse, m_clear, m_free): -Wextra asks for them
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fasttransformer native ops",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(module, "WITH_OPENMP", 1);
#else
  PyModule_AddIntConstant(module, "WITH_OPENMP", 0);
#endif
  PyModule_AddStringConstant(module, "CUDA_ARCHS", FT_CUDA_ARCHS_STRING);
  return module;
}
