// AdamW as libtorch's fused kernel (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// calls): one pass over each parameter, its gradient and both moments, instead of the ten
// element-wise operations and temporaries an update built from tch's operators takes.
// tch does not bind `_fused_adamw_`, so it is reached here. Tensors cross as at::Tensor*
// (tch's C_tensor), borrowed: nothing is freed here.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {
std::vector<at::Tensor> gather(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

// Updates params[i], exp_avgs[i], exp_avg_sqs[i] in place at optimizer step `step`
// (counting from 1). Returns 0, or 1 with the reason in `err` (NUL-terminated).
extern "C" int upcycle_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                                   at::Tensor** exp_avg_sqs, int64_t n, double step, double lr,
                                   double beta1, double beta2, double weight_decay, double eps,
                                   char* err, size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    // The kernel reads (does not advance) the step; one tensor serves every parameter.
    at::Tensor steps_one = at::full({}, step, p.empty() ? at::TensorOptions().dtype(at::kFloat)
                                                          : p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(n, steps_one);
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}
