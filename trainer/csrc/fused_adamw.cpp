// AdamW as libtorch's fused kernel (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// calls): one pass over each parameter, its gradient and both moments, instead of the ten
// element-wise operations and temporaries an update built from tch's operators takes.
// tch does not bind `_fused_adamw_`, so it is reached here. Tensors cross as at::Tensor*
// (tch's C_tensor), borrowed: nothing is freed here.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {
std::vector<at::Tensor> gather(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

// Updates params[i], exp_avgs[i], exp_avg_sqs[i] in place, each at its own optimizer step:
// steps[i] (float32 scalars on the parameters' device) advance by one, as
// `torch.optim.AdamW(fused=True)` does, unless `found_inf` (a float32 scalar, or null) is 1:
// then the kernel leaves everything as it was and the steps go back. Nothing is read on the
// host. Returns 0, or 1 with the reason in `err` (NUL-terminated).
extern "C" int upcycle_fused_adamw_device_steps(at::Tensor** params, at::Tensor** grads,
                                                at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                                                at::Tensor** steps, int64_t n, double lr,
                                                double beta1, double beta2, double weight_decay,
                                                double eps, at::Tensor* found_inf, char* err,
                                                size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    auto s = gather(steps, n);
    std::optional<at::Tensor> inf;
    if (found_inf != nullptr) inf = *found_inf;
    at::_foreach_add_(s, 1);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/{}, inf);
    if (inf) at::_foreach_add_(s, *inf, /*alpha=*/-1);
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}
