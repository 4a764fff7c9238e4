// The all-to-all as an autograd node, so that one loss.backward() carries gradients
// across ranks: forward exchanges rows through a Rust callback; the backward node calls
// the same callback with the splits swapped (the adjoint of an all-to-all is the
// all-to-all in the other direction). Tensors cross the boundary as at::Tensor*, tch's
// C_tensor: a pointer handed over is owned by the receiver (tch's from_ptr / at_free).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

extern "C" {
// Exchanges `t` (owned by the callee); backward != 0 swaps the splits. Returns a new
// tensor owned by the caller.
typedef at::Tensor* (*upcycle_exchange_fn)(void* handle, at::Tensor* t, int backward);
// Releases `handle` (called once, when the autograd node or the forward is done with it).
typedef void (*upcycle_drop_fn)(void* handle);
}

namespace {

struct AllToAllBackward : public torch::autograd::Node {
  void* handle = nullptr;
  upcycle_exchange_fn exchange = nullptr;
  upcycle_drop_fn drop = nullptr;
  std::vector<int64_t> out_sizes;
  at::TensorOptions out_options;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // Every rank must take part, even when this output got no gradient.
    at::Tensor g = grads[0].defined() ? grads[0].contiguous()
                                      : at::zeros(out_sizes, out_options);
    at::Tensor* back = exchange(handle, new at::Tensor(g), 1);
    at::Tensor result = std::move(*back);
    delete back;
    return {result};
  }

  std::string name() const override { return "UpcycleAllToAllBackward"; }

  ~AllToAllBackward() override {
    if (drop != nullptr) drop(handle);
  }
};

}  // namespace

extern "C" at::Tensor* upcycle_all_to_all(at::Tensor* x, void* handle,
                                          upcycle_exchange_fn exchange,
                                          upcycle_drop_fn drop) {
  at::Tensor input = *x;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    at::Tensor* got = exchange(handle, new at::Tensor(input.detach()), 0);
    out = std::move(*got);
    delete got;
  }
  if (input.requires_grad() && at::GradMode::is_enabled()) {
    auto node = std::shared_ptr<AllToAllBackward>(new AllToAllBackward(),
                                                  torch::autograd::deleteNode);
    node->handle = handle;
    node->exchange = exchange;
    node->drop = drop;
    node->out_sizes = out.sizes().vec();
    node->out_options = out.options();
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    torch::autograd::set_history(out, node);
  } else {
    drop(handle);
  }
  return new at::Tensor(out);
}
