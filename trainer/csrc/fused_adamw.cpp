// AdamW as libtorch's fused kernel (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// calls): one pass over each parameter, its gradient and both moments, instead of the ten
// element-wise operations and temporaries an update built from tch's operators takes.
// tch does not bind `_fused_adamw_`, so it is reached here. Tensors cross as at::Tensor*
// (tch's C_tensor), borrowed: nothing is freed here.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

namespace {
std::vector<at::Tensor> gather(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

// Updates params[i], exp_avgs[i], exp_avg_sqs[i] in place, each at its own optimizer step
// steps[i] (counting from 1). Returns 0, or 1 with the reason in `err` (NUL-terminated).
extern "C" int upcycle_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                                   at::Tensor** exp_avg_sqs, int64_t n, const double* steps,
                                   double lr, double beta1, double beta2, double weight_decay,
                                   double eps, char* err, size_t err_len) {
  try {
    c10::AutoGradMode no_grad(false);
    auto p = gather(params, n);
    auto g = gather(grads, n);
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    // The kernel reads (does not advance) the steps. Parameters at the same step on the
    // same device share one tensor: few distinct values, so few tiny allocations.
    std::vector<at::Tensor> step_tensors;
    step_tensors.reserve(n);
    std::vector<std::pair<double, at::Tensor>> made;
    for (int64_t i = 0; i < n; ++i) {
      auto same = [&](const std::pair<double, at::Tensor>& s) {
        return s.first == steps[i] && s.second.device() == p[i].device();
      };
      auto it = std::find_if(made.begin(), made.end(), same);
      if (it == made.end()) {
        made.emplace_back(steps[i], at::full({}, steps[i], p[i].options().dtype(at::kFloat)));
        it = made.end() - 1;
      }
      step_tensors.push_back(it->second);
    }
    at::_fused_adamw_(p, g, m, v, {}, step_tensors, lr, beta1, beta2, weight_decay, eps,
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
