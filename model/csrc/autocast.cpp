// libtorch's automatic mixed precision switches for the CPU and CUDA (tch reaches only
// CUDA's, through a deprecated call). The state is thread-local, like PyTorch's
// `torch.autocast` context.
#include <ATen/autocast_mode.h>

namespace {
at::DeviceType device(int cuda) { return cuda != 0 ? at::kCUDA : at::kCPU; }
}  // namespace

extern "C" int upcycle_autocast_enabled(int cuda) {
  return at::autocast::is_autocast_enabled(device(cuda)) ? 1 : 0;
}

// Turns autocast for the device type on (to bfloat16) or off; returns whether it was on.
extern "C" int upcycle_autocast_set(int cuda, int enabled) {
  at::DeviceType d = device(cuda);
  bool was = at::autocast::is_autocast_enabled(d);
  if (enabled != 0) at::autocast::set_autocast_dtype(d, at::kBFloat16);
  at::autocast::set_autocast_enabled(d, enabled != 0);
  return was ? 1 : 0;
}

// Entering and leaving an autocast region: the cast weights are cached inside the
// outermost one and dropped when it ends (as torch.autocast's __exit__ does).
extern "C" void upcycle_autocast_enter() { at::autocast::increment_nesting(); }

extern "C" void upcycle_autocast_exit() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
}
