// copylora._C: the op library. Importing the module registers the copylora:: ops with the
// dispatcher; the kernels live in cpu/ and cuda/. The Python module itself is empty, so it is
// built against the stable Python ABI (one wheel for every Python >= 3.9).
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "copylora's C++/CUDA merge engine; the ops are in torch.ops.copylora",
      -1,    // m_size
      nullptr,
  };
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(copylora, m) {
  // Merges B same-shaped LoRA modules (see copylora/engine/ops.py for the full contract):
  // up (B, out, K) and down (B, K, in) in out_dtype (float32 when None), S (B, m) float32.
  m.def(
      "merge_group(Tensor[] ups, Tensor[] downs, Tensor scales, int[] ranks, float clamp_quantile, "
      "bool sqrt_split, ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  // One batch's W = P Q decomposed as merge_group does it (CPU and CUDA): U (B, out, k), S (B, m),
  // Vh (B, k, in) and each module's route (0 dense, 1 Gram, 2 Cholesky-QR, 3 Householder). method
  // 'gram', 'qr' or 'householder' forces a route where W is not dense. For tests and benchmarks.
  m.def("factored_svd(Tensor p, Tensor q, int kept, str method='auto') -> (Tensor, Tensor, Tensor, Tensor)");
}
