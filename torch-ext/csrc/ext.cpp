// Fused and multi-tensor ("foreach") operations that tch 0.24 does not bind.
#include "common.h"

extern "C" {

void sp_free_error(char* e) { std::free(e); }

int sp_built_with_cuda() {
#ifdef SP_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// torch.optim.AdamW(fused=True)'s kernel: one call updates every parameter (CPU and CUDA).
// `steps` are one-element f32 tensors holding each parameter's step count, already counting
// this update (the caller increments them, as torch.optim does).
char* sp_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                     at::Tensor** exp_avg_sqs, at::Tensor** steps, size_t n, double lr,
                     double beta1, double beta2, double weight_decay, double eps) {
  SP_TRY
  auto p = sp::tensors(params, n), g = sp::tensors(grads, n), m = sp::tensors(exp_avgs, n),
       v = sp::tensors(exp_avg_sqs, n), s = sp::tensors(steps, n);
  std::vector<at::Tensor> none;
  at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps,
                    /*amsgrad=*/false, /*maximize=*/false);
  SP_CATCH
}

// Each tensor's L2 norm, accumulated in f32, as one tensor [n].
char* sp_foreach_norm_f32(at::Tensor** ts, size_t n, at::Tensor** out) {
  SP_TRY
  auto norms = at::_foreach_norm(sp::tensors(ts, n), 2, at::kFloat);
  *out = new at::Tensor(at::stack(norms));
  SP_CATCH
}

// ts[i] *= scale (a one-element tensor, on the tensors' device or the CPU).
char* sp_foreach_mul_tensor_(at::Tensor** ts, size_t n, at::Tensor* scale) {
  SP_TRY
  at::_foreach_mul_(sp::tensors(ts, n), *scale);
  SP_CATCH
}

char* sp_foreach_zero_(at::Tensor** ts, size_t n) {
  SP_TRY
  at::_foreach_zero_(sp::tensors(ts, n));
  SP_CATCH
}

// dst[i].copy_(src[i]) with dtype conversion.
char* sp_foreach_copy_(at::Tensor** dst, at::Tensor** src, size_t n) {
  SP_TRY
  at::_foreach_copy_(sp::tensors(dst, n), sp::tensors(src, n));
  SP_CATCH
}

}  // extern "C"
