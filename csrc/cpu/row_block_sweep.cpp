// The CPU op head_forward_backward: the forward and the gradients for per-row weights
// known before the forward (a mean or a sum of the row losses), in 3 GEMMs per chunk
// instead of the op pair's 4.
//
// Rows go in blocks whose cosines over every class fit the op's logits budget. Pass 1
// over the chunks: cos = x_block @ W_chunk^T into the block's stored cosines, folded into
// the block's log-sum-exp. Pass 2 over the chunks, from the stored cosines (no GEMM): the
// row kernel turns them into G = dL/dcos * inv_norm, then grad_x_block += G @ W_chunk and
// H_chunk (+)= G^T @ x_block. Where the rule of row_block_rows() says no, the op runs
// the op pair's sweeps one after the other (the same results).
#include "row_block_sweep.h"

#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <limits>

#include "class_sweep.h"
#include "gemm_16bit.h"

namespace margin_ext {
namespace cpu {
namespace {

// Rows per block, or 0 for the op pair's sweeps (see csrc/README.md, "The CPU sweep").
int64_t block_rows(const HeadInputs& in, int64_t logits_budget, int64_t min_row_block) {
  TORCH_CHECK(logits_budget >= 1, "margin_ext: logits_budget=", logits_budget,
              " is invalid: expected a positive number of bytes");
  TORCH_CHECK(min_row_block >= 1, "margin_ext: min_row_block=", min_row_block, " is invalid: expected >= 1");
  const int64_t rows = in.x_hat.size(0), classes = in.weight.size(0);
  // InterFace's forward kernel writes its logits over the cosines, and its dynamic phi
  // needs the class cosines too: it keeps the op pair's sweeps
  if (rows == 0 || classes == 0 || in.params.kind == kInterFace) return 0;
  // 16-bit centres on a CPU that multiplies them natively: the op pair's 16-bit products
  if (use_16bit_gemm(in.weight.scalar_type())) return 0;
  const int64_t block = logits_budget / (classes * int64_t(in.x_hat.element_size()));
  if (block >= rows) return rows;  // one block: every chunk's H is complete in its chunk
  // Several blocks sum H into grad_weight itself, which must then hold the compute dtype;
  // thin blocks would make the GEMMs thin and read-modify-write grad_weight too often.
  if (block < min_row_block || in.weight.scalar_type() != in.x_hat.scalar_type()) return 0;
  return block;
}

template <typename T>
struct RowBlockSweep : ClassSweep<T> {
  int64_t block;
  at::Tensor stored;  // (block * C) in T: chunk k's (count x n) cosines at offset count * start

  RowBlockSweep(const HeadInputs& inputs, int64_t block_rows)
      : ClassSweep<T>(inputs, block_rows), block(block_rows) {
    stored = at::empty({block * this->classes}, this->in.x_hat.options());
  }

  at::Tensor stored_chunk(RowRange r, int64_t start, int64_t n) {
    return stored.narrow(0, r.count * start, r.count * n).view({r.count, n});
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& grad_lse,
                                                                             const at::Tensor& grad_target) {
    const auto opts = this->in.x_hat.options();
    const int64_t rows = this->rows, classes = this->classes, dim = this->dim, chunk = this->chunk;
    const bool one_block = block >= rows;
    at::Tensor run_max = at::full({rows}, -std::numeric_limits<double>::infinity(), opts);
    at::Tensor run_sum = at::zeros({rows}, opts);
    at::Tensor target_logit = at::zeros({rows}, opts);
    at::Tensor lse = at::empty({rows}, opts);
    at::Tensor scratch_a = at::empty({rows}, opts), scratch_b = at::empty({rows}, opts);
    at::Tensor grad_x = at::zeros({rows, dim}, opts);
    at::Tensor grad_w = at::empty(this->in.weight.sizes(), this->in.weight.options());
    at::Tensor grad_scale = at::zeros({rows}, opts);
    at::Tensor h = one_block ? at::empty({chunk * dim}, opts) : at::Tensor();
    T *rm = run_max.template data_ptr<T>(), *rs = run_sum.template data_ptr<T>();
    T *tl = target_logit.template data_ptr<T>(), *l = lse.template data_ptr<T>();
    T *sa = scratch_a.template data_ptr<T>(), *sb = scratch_b.template data_ptr<T>();
    const T *gl = grad_lse.template data_ptr<T>(), *gt = grad_target.template data_ptr<T>();
    T* gs = grad_scale.template data_ptr<T>();

    for (int64_t first = 0; first < rows; first += block) {
      const RowRange r{first, std::min(block, rows - first)};
      const at::Tensor x_block = this->in.x_hat.narrow(0, r.first, r.count);
      at::Tensor grad_x_block = grad_x.narrow(0, r.first, r.count);
      // pass 1: the cosines, stored, and the block's log-sum-exp
      for (int64_t start = 0; start < classes; start += chunk) {
        const int64_t n = std::min(chunk, classes - start);
        at::Tensor c = stored_chunk(r, start, n);
        at::mm_out(c, x_block, this->centres(start, n).t());
        this->forward_rows(this->row_chunk(c.template data_ptr<T>(), nullptr, r, start, n), r, rm, rs, tl, sa, sb);
      }
      lse.narrow(0, r.first, r.count).copy_(run_sum.narrow(0, r.first, r.count).log().add_(run_max.narrow(0, r.first, r.count)));
      // pass 2: G from the stored cosines, then the gradient products
      for (int64_t start = 0; start < classes; start += chunk) {
        const int64_t n = std::min(chunk, classes - start);
        at::Tensor g = stored_chunk(r, start, n);
        const RowChunk<T> rc = this->row_chunk(g.template data_ptr<T>(), nullptr, r, start, n);
        this->backward_rows(rc, r, l, gl, gt, gs, sa);
        this->gradient_to_subcenters(rc, g.template data_ptr<T>(), r, start, n);
        const at::Tensor w = this->centres(start, n);
        if (one_block) {
          this->chunk_gradients(g, w, start, n, grad_x, h, grad_w);
          continue;
        }
        grad_x_block.addmm_(g, w);
        at::Tensor h_sum = grad_w.narrow(0, start, n);  // H of the chunk, summed over the blocks
        if (r.first == 0) {
          at::mm_out(h_sum, g.t(), x_block);
        } else {
          h_sum.addmm_(g.t(), x_block);
        }
      }
    }
    if (!one_block) {
      // H complete: the normalization backward over every class, in place (same dtype)
      at::Tensor all = grad_w.view({classes, dim});
      this->weight_grad(all, this->in.weight, 0, classes, all);
    }
    return {lse, target_logit, grad_x, grad_w, grad_scale};
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_backward(
    const HeadInputs& in, const at::Tensor& grad_lse, const at::Tensor& grad_target, int64_t block) {
  if (block > 0) return RowBlockSweep<T>(in, block).run(grad_lse, grad_target);
  auto [lse, target_logit] = sweep_forward(in);
  auto [grad_x, grad_w, grad_scale] = sweep_backward(in, RowStatistics{lse, grad_lse, grad_target});
  return {lse, target_logit, grad_x, grad_w, grad_scale};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_forward_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& row_terms,
    const c10::optional<at::Tensor>& target_centre, int64_t nontarget_kind, c10::ArrayRef<double> nontarget_coeffs,
    int64_t subcenters, int64_t chunk_size, const at::Tensor& grad_lse, const at::Tensor& grad_target, int64_t logits_budget,
    int64_t min_row_block) {
  check_device_type(x_hat, c10::DeviceType::CPU);
  const HeadInputs in = check_inputs(x_hat, weight, labels, row_terms, target_centre, nontarget_kind,
                                     nontarget_coeffs, subcenters, chunk_size);
  const int64_t b = in.x_hat.size(0);
  check_vector(grad_lse, "grad_lse", b, in.x_hat);
  check_vector(grad_target, "grad_target", b, in.x_hat);
  const auto acc = in.x_hat.scalar_type();
  const at::Tensor gl = grad_lse.to(acc).contiguous(), gt = grad_target.to(acc).contiguous();
  const int64_t block = block_rows(in, logits_budget, min_row_block);
  if (acc == at::kDouble) return forward_backward<double>(in, gl, gt, block);
  return forward_backward<float>(in, gl, gt, block);
}

int64_t row_block_rows(const at::Tensor& x_hat, const at::Tensor& weight, int64_t nontarget_kind,
                       int64_t logits_budget, int64_t min_row_block) {
  TORCH_CHECK(x_hat.dim() == 2 && weight.dim() == 2, "margin_ext: x_hat and weight must be 2-D, got shapes ",
              x_hat.sizes(), " and ", weight.sizes());
  HeadInputs in;
  in.x_hat = x_hat;
  in.weight = weight;
  in.params.kind = static_cast<int>(nontarget_kind);
  return block_rows(in, logits_budget, min_row_block);
}

}  // namespace cpu
}  // namespace margin_ext
