// The op schemas, defined once for every device, and the Python module that loads them.
//
// The implementations register per device: ops_cpu.cpp (CPU), ops_cuda.cpp (CUDA, built
// only with a CUDA torch). Fake implementations and autograd live in
// margin_ext/backends/extension.py.
#include <Python.h>
#include <torch/library.h>

// `import margin_ext._C` runs the static registrations below; the module has no
// Python functions of its own (the ops are torch.ops.margin_ext.*).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The arguments every op starts with (margin_ext.backends.extension.op_args): row_terms
// is (5, B): the scale s_i, the target logit t_i, its derivative d_i = dt_i/dcos_y and the
// non-target kind's row value and coefficient (InterFace: theta_y; CurricularFace: the
// threshold cos(theta_y + m) and t); the non-target margin is a kind and its packed
// constant coefficients, and the weight's rows per class (k sub-centres: a class's
// cosine is the max over its k adjacent rows) (margins.NonTargetParams); target_centre
// only for InterFace.
#define MX_ROW_ARGS                                                                      \
  "Tensor x_hat, Tensor weight, Tensor labels, Tensor row_terms, Tensor? target_centre, " \
  "int nontarget_kind, float[] nontarget_coeffs, int subcenters"
#define MX_HEAD_ARGS MX_ROW_ARGS ", int chunk_size"

TORCH_LIBRARY(margin_ext, m) {
  m.set_python_module("margin_ext.backends.extension");
  // (B,) log-sum-exp of the margin logits and target logit (0 where the target is not in weight)
  m.def("head_forward(" MX_HEAD_ARGS ") -> (Tensor lse, Tensor target_logit)",
        {at::Tag::pt2_compliant_tag});
  // gradients w.r.t. x_hat (compute dtype), weight (its dtype) and the non-target logits'
  // scale, from the saved lse
  m.def("head_backward(" MX_HEAD_ARGS ", Tensor lse, Tensor grad_lse, Tensor grad_target) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_scale)",
        {at::Tag::pt2_compliant_tag});
  // Both at once, for per-row weights known before the forward (grad_lse, grad_target:
  // a mean or a sum of the row losses); the stored cosines take at most logits_budget
  // bytes (cpu/row_block_sweep.cpp). CPU only.
  m.def("head_forward_backward(" MX_HEAD_ARGS ", Tensor grad_lse, Tensor grad_target, int logits_budget, "
        "int min_row_block) -> (Tensor lse, Tensor target_logit, Tensor grad_x, Tensor grad_weight, "
        "Tensor grad_scale)",
        {at::Tag::pt2_compliant_tag});
  // Rows per block head_forward_backward takes for these inputs (0: the op pair's sweeps).
  m.def("row_block_rows(Tensor x_hat, Tensor weight, int nontarget_kind, int logits_budget, int min_row_block) "
        "-> int");
  // The fused CUDA kernels' tile loop run on the CPU (cpu/tile_reference.cpp), products
  // as plain dot products: the same outputs as head_forward / head_backward, computed
  // tile by tile with the given tile sizes, class splits (forward) and classes per
  // backward chunk (0: the CUDA kernels' choice), and with tf32 every product operand
  // rounded as the TF32 kernels round it (float32 weights only). For tests.
  // tiles: (tile_m, tile_n, class splits) forward, (tile_m, tile_n, chunk_cols) backward.
  m.def("tile_forward(" MX_ROW_ARGS ", int[] tiles, bool tf32) -> (Tensor lse, Tensor target_logit)");
  m.def("tile_backward(" MX_ROW_ARGS ", int[] tiles, bool tf32, Tensor lse, Tensor grad_lse, Tensor grad_target) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_scale)");
}
