// flm_rt_run_op: runs the flm_rt operators from C++ through the PyTorch dispatcher (no Python) and checks
// them against plain ATen. Prints the build facts, one line per check, then OK (exit 0) or FAIL (exit 1).
#include "build_info.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <iostream>
#include <limits>
#include <optional>
#include <tuple>

namespace {

using StepFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const std::optional<at::Tensor>&, double);
using ArgmaxFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);

at::Tensor reference_step(const at::Tensor& z, const at::Tensor& logits, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& c, const at::Tensor& eps, double cap) {
  at::Tensor y = logits.to(at::kFloat);
  if (cap > 0) y = at::tanh(y / cap) * cap;
  const auto rows_shape = z.sizes().slice(0, z.dim() - 1).vec();
  auto col = [&](const at::Tensor& t) {
    return t.numel() == 1 ? t.reshape({}) : t.reshape(rows_shape).unsqueeze(-1);
  };
  return col(a) * z + col(b) * at::softmax(y, -1) + col(c) * eps;
}

}  // namespace

int main() {
  for (const auto& kv : flm_rt::build_info_entries()) std::cout << kv.first << ": " << kv.second << "\n";

  auto& dispatcher = c10::Dispatcher::singleton();
  auto step = dispatcher.findSchemaOrThrow("flm_rt::flow_map_step", "").typed<StepFn>();
  auto argmax = dispatcher.findSchemaOrThrow("flm_rt::vocab_argmax", "").typed<ArgmaxFn>();

  at::manual_seed(0);
  bool ok = true;
  auto report = [&](const char* what, bool good, double err) {
    std::printf("%-44s %s (max abs err %.3g)\n", what, good ? "ok" : "MISMATCH", err);
    ok = ok && good;
  };

  const int64_t B = 4, L = 7, V = 1001;
  const at::Tensor z = at::randn({B, L, V});
  const at::Tensor eps = at::randn({B, L, V});
  const at::Tensor a = at::rand({B * L}), b = at::rand({B * L}), c = at::rand({1});
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const at::Tensor logits = (at::randn({B, L, V}) * 4).to(dtype);
    for (double cap : {30.0, 0.0}) {
      const at::Tensor out = step.call(z, logits, a, b, c, eps, cap);
      const at::Tensor ref = reference_step(z, logits, a, b, c, eps, cap);
      const bool good = out.sizes() == ref.sizes() && at::allclose(out, ref, 1e-5, 1e-6);
      std::string what = std::string("flow_map_step ") + c10::toString(dtype) + " cap=" + std::to_string(int(cap));
      report(what.c_str(), good, (out - ref).abs().max().item<double>());
    }
    at::Tensor x = (at::randn({B, L, V}) * 4).to(dtype);
    x.index_put_({0, 0, 5}, std::numeric_limits<float>::quiet_NaN());
    x.index_put_({1, 2}, 1.0);  // constant row: ties -> index 0
    const auto [idx, val] = argmax.call(x);
    const auto [rv, ri] = at::max(x, -1);
    const bool good = at::equal(idx, ri) && at::equal(at::nan_to_num(val, 0.0), at::nan_to_num(rv, 0.0)) &&
                      at::equal(at::isnan(val), at::isnan(rv));
    std::string what = std::string("vocab_argmax ") + c10::toString(dtype);
    report(what.c_str(), good, static_cast<double>((idx != ri).sum().item<int64_t>()));
  }

  std::cout << (ok ? "OK" : "FAIL") << std::endl;
  return ok ? 0 : 1;
}
