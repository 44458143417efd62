// CPU implementation of the fused vocabulary pass (flm_rt::vocab_pass_argmax, flm_rt::vocab_pass_embed;
// contract in docs/KERNELS.md, reference in flm_rt/ops.py). The output projection logits = y W^T + b is computed
// one vocabulary chunk [R, chunk] at a time and reduced at once, so no [R, V] logits tensor ever exists:
//
//   argmax: optional soft-cap (in the logits dtype), the capability-dispatched argmax row kernel on the chunk,
//           then a merge into the running (index, value) with torch.max's rules (first NaN wins, ties -> lowest
//           index, hence "strictly greater" for later chunks); with `screen` (fp32, cap <= 0) the candidates
//           come from a bf16 product and a rigorous error bound and only their fp32 logits are computed
//           (screened_argmax_rows below);
//   embed:  soft-cap in float32, then an online softmax (running max m and sum l, as flash attention), the
//           unnormalised exp(chunk - m) multiplied into the running softmax @ E accumulator; with a cap <= 60
//           the shift is the cap itself (the capped logits are bounded), so no running max is needed.
//
// The GEMMs are ATen's: the oneDNN linear on weight chunks reordered once into oneDNN's blocked layout and
// cached here (when `prepacked` and torch has the mkldnn ops), else at::addmm / at::mm (MKL or oneDNN, as torch
// chooses). The chunk loop is in C++ so that one op call does the whole pass; threads come from the GEMMs and
// from ATen's element-wise ops (both at::parallel_for under the hood).
#include "../op_wrappers.h"
#include "../vocab_pass_checks.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace flm_rt {
namespace {

// ---------------------------------------------------------------------------------- prepacked weight chunks
// Reordered (oneDNN blocked) copies of row chunks of a weight, cached per weight tensor. An entry holds a weak
// reference to the weight's TensorImpl and its version counter and data pointer, so a freed, replaced or
// modified-in-place weight is never served from a stale entry; dead entries are dropped on the next insert.
// What a cached entry was made from: alive, at the same address, unmodified and cut in the same chunks.
using Version = decltype(std::declval<const at::Tensor&>()._version());  // uint32_t or int64_t, by torch version

// Inference tensors (made under torch.inference_mode) have no version counter: 0 for them. They can change in place
// only inside inference mode, which the cache cannot see (docs/KERNELS.md).
Version version_of(const at::Tensor& w) { return w.is_inference() ? Version{0} : w._version(); }

struct WeightKey {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const void* data;
  Version version;
  int64_t chunk;

  static WeightKey of(const at::Tensor& w, int64_t chunk) {
    return {c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(w.getIntrusivePtr()),
            w.const_data_ptr(), version_of(w), chunk};
  }
  bool fresh_for(const at::Tensor& w, int64_t chunk_) const {
    auto alive = owner.lock();
    return alive.get() == w.unsafeGetTensorImpl() && data == w.const_data_ptr() && version == version_of(w) &&
           chunk == chunk_;
  }
};

// Drops the entries of weights that no longer exist (key(entry) -> its WeightKey).
template <typename Map, typename Key>
void drop_dead(Map& cache, Key key) {
  for (auto e = cache.begin(); e != cache.end();) e = key(e->second).owner.expired() ? cache.erase(e) : std::next(e);
}

struct PackedEntry {
  WeightKey key;
  std::vector<at::Tensor> packed;
};

std::mutex g_pack_mutex;
std::unordered_map<const c10::TensorImpl*, PackedEntry>& pack_cache(bool transposed) {
  static std::unordered_map<const c10::TensorImpl*, PackedEntry> plain, trans;
  return transposed ? trans : plain;
}

struct MkldnnOps {
  std::optional<c10::OperatorHandle> reorder, linear;
};

const MkldnnOps& mkldnn_ops() {
  static const MkldnnOps ops = [] {
    MkldnnOps o;
    auto& d = c10::Dispatcher::singleton();
    o.reorder = d.findOp({"mkldnn::_reorder_linear_weight", ""});
    o.linear = d.findOp({"mkldnn::_linear_pointwise", ""});
    if (o.reorder && !o.reorder->hasKernelForDispatchKey(c10::DispatchKey::CPU)) o.reorder.reset();
    if (o.linear && !o.linear->hasKernelForDispatchKey(c10::DispatchKey::CPU)) o.linear.reset();
    return o;
  }();
  return ops;
}

bool can_prepack(const at::Tensor& w) {
  const auto& o = mkldnn_ops();
  return o.reorder && o.linear && !w.is_inference() && at::hasMKLDNN() &&
         (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16);
}

// The packed chunks, or nullptr where oneDNN refuses (e.g. bf16 weights on a CPU or ISA cap without AVX512-BW):
// the pass then runs on plain GEMMs.
const std::vector<at::Tensor>* try_packed_chunks(const at::Tensor& w, int64_t chunk, bool transposed);

at::Tensor reorder_linear_weight(const at::Tensor& w_out_in) {
  std::vector<c10::IValue> stack{w_out_in.contiguous(), c10::IValue()};
  mkldnn_ops().reorder->callBoxed(stack);
  return stack.at(0).toTensor();
}

// y [R, in] x packed [out, in] (+ bias [out]) -> [R, out]
at::Tensor packed_linear(const at::Tensor& y, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  std::vector<c10::IValue> stack{y, packed, bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                                 c10::IValue(std::string("none")), c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                 c10::IValue(std::string(""))};
  mkldnn_ops().linear->callBoxed(stack);
  return stack.at(0).toTensor();
}

// The chunks of `w` [V, D] (transposed=false: [chunk, D] pieces as linear weights [out, in]) or of `w` [V, De]
// used as x @ w (transposed=true: pieces [De, chunk] = w[v0:v1].T).
const std::vector<at::Tensor>& packed_chunks(const at::Tensor& w, int64_t chunk, bool transposed) {
  std::lock_guard<std::mutex> lock(g_pack_mutex);
  auto& cache = pack_cache(transposed);
  auto it = cache.find(w.unsafeGetTensorImpl());
  if (it != cache.end() && it->second.key.fresh_for(w, chunk)) return it->second.packed;
  drop_dead(cache, [](const PackedEntry& e) -> const WeightKey& { return e.key; });
  PackedEntry entry{WeightKey::of(w, chunk), {}};
  const int64_t V = w.size(0);
  at::NoGradGuard no_grad;
  for (int64_t v0 = 0; v0 < V; v0 += chunk) {
    const at::Tensor piece = w.narrow(0, v0, std::min(chunk, V - v0));
    entry.packed.push_back(reorder_linear_weight(transposed ? piece.t() : piece));
  }
  return cache.insert_or_assign(w.unsafeGetTensorImpl(), std::move(entry)).first->second.packed;
}

const std::vector<at::Tensor>* try_packed_chunks(const at::Tensor& w, int64_t chunk, bool transposed) {
  if (!can_prepack(w)) return nullptr;
  try {
    return &packed_chunks(w, chunk, transposed);
  } catch (const c10::Error&) {
    return nullptr;
  }
}

// ------------------------------------------------------------------------------------------- chunk GEMMs
struct ChunkedProjection {
  at::Tensor y2;  // [R, D] contiguous
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  int64_t V, chunk;
  const std::vector<at::Tensor>* packed = nullptr;

  ChunkedProjection(const at::Tensor& y, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t chunk_,
                    bool prepacked, const PassShape& s)
      : y2(y.reshape({s.rows, s.D}).contiguous()), weight(w), V(s.V), chunk(std::min(chunk_, s.V)) {
    if (b.has_value() && b->defined()) bias = b->contiguous();
    if (prepacked && s.D > 0) packed = try_packed_chunks(w, chunk, /*transposed=*/false);  // (oneDNN: no K = 0)
  }
  int64_t count() const { return (V + chunk - 1) / chunk; }
  int64_t begin(int64_t k) const { return k * chunk; }
  int64_t width(int64_t k) const { return std::min(chunk, V - k * chunk); }

  // logits[:, v0:v0+width] in the dtype of y, contiguous [R, width]
  at::Tensor logits(int64_t k) const {
    const int64_t v0 = begin(k), n = width(k);
    std::optional<at::Tensor> b;
    if (bias) b = bias->narrow(0, v0, n);
    if (packed) return packed_linear(y2, (*packed)[k], b);
    const at::Tensor w = weight.narrow(0, v0, n);
    return b ? at::addmm(*b, y2, w.t()) : at::mm(y2, w.t());
  }
};

// ---------------------------------------------------------------------------------------------- argmax
// The exact pass over rows y2 [R, D] (contiguous): best_i / best_v [R] (values widened to float32).
void exact_argmax_rows(const at::Tensor& y2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       double cap, int64_t chunk, bool prepacked, int64_t* best_i, float* best_v) {
  const PassShape s{y2.size(0), y2.size(1), weight.size(0)};
  const ChunkedProjection proj(y2, weight, bias, chunk, prepacked, s);
  at::Tensor ci = at::empty({s.rows}, y2.options().dtype(at::kLong));
  at::Tensor cv = at::empty({s.rows}, y2.options());
  const at::Tensor cv_f = at::empty({s.rows}, y2.options().dtype(at::kFloat));
  for (int64_t c = 0; c < proj.count(); ++c) {
    at::Tensor lg = proj.logits(c);
    // The soft-cap: same ops, same rounding as flm_rt.model.softcap_logits. bf16 / fp16: inside the argmax
    // kernel, which caps only what can be the maximum (the same bits and ties); fp32: ATen's ops (its fp32
    // tanh is MKL's, whose bits the kernel's SLEEF tanh would not reproduce).
    const bool low = lg.scalar_type() != at::kFloat;
    if (cap > 0 && !low) lg.div_(cap).tanh_().mul_(cap);
    cpu::ArgmaxParams p{};
    if (cap > 0 && low) p.cap = static_cast<float>(cap);
    p.x = lg.const_data_ptr();
    p.kind = cpu::float_kind(lg.scalar_type());
    p.V = lg.size(1);
    p.indices = ci.mutable_data_ptr<int64_t>();
    p.values = cv.mutable_data_ptr();
    cpu::argmax_rows_parallel(p, s.rows);
    cv_f.copy_(cv);  // exact widening
    const int64_t* cip = ci.const_data_ptr<int64_t>();
    const float* cvp = cv_f.const_data_ptr<float>();
    const int64_t v0 = proj.begin(c);
    for (int64_t r = 0; r < s.rows; ++r) {
      // torch.max: the first NaN wins; otherwise the lowest index of the maximum (earlier chunks win ties).
      if (c == 0 || (!std::isnan(best_v[r]) && (std::isnan(cvp[r]) || cvp[r] > best_v[r]))) {
        best_v[r] = cvp[r];
        best_i[r] = v0 + cip[r];
      }
    }
  }
}

// ------------------------------------------------------------------------------ screened argmax (float32)
// The argmax of the fp32 logits l = y w^T + b found from a bf16 product: the screen s[r, v] = bf16(y_r) .
// bf16(w_v) (oneDNN, fp32 accumulation, bf16 output) + b_v in fp32, a rigorous bound e[r, v] >= |l^[r, v] - s|
// where l^ is the fp32 logit as exact_dot below computes it, the candidates of row r {v : s + e >= T_r} with
// T_r = max_v (s - e), and the exact fp32 logits of the candidates only. The winner argmax_v l^ is always a
// candidate: s + e >= l^_win >= l^_u >= s_u - e_u for every u. Derivation of e (docs/KERNELS.md, "Screened
// argmax"), u = 2^-8 (bf16), u32 = 2^-24, n = D + 32, g = n u32 / (1 - n u32), S = sum_k |y_k w_k| <= ||y|| ||w||:
//   screen:    bf16 rounding of y_k and w_k                          (2u + u^2) S
//              fp32 accumulation (any order / blocking)              g (1+u)^2 S
//              bf16 rounding of the GEMM output                      u (1+u)^2 (1+g) S
//              + b in fp32                                           u32 ((1+u)^3 (1+g) S + |b|)
//   recompute: fp32 dot product, + b                                 (g + u32 (1+g)) S + u32 |b|
//   the comparison's own roundings fl(s -+ e): e (1 - u32) >= |l^ - s| + u32 |s|, |s| <= (1+u32)((1+u)^3 (1+g) S + |b|)
// so e = kappa ||y|| ||w|| + beta |b| + tau_y + tau_w with kappa = (sum of the S terms) / (1 - u32) (1 + 2^-20),
// beta = 2^-22 (>= 3.0001 u32 / (1 - u32)); the 2^-20 also covers the 3 roundings of computing e (all terms
// >= 0). tau_y + tau_w = 2^-124 (sqrt(n) (||y|| + ||w||) + 2n) >= the absolute error of underflow (AMX flushes
// bf16 denormals to zero: |bf16(x) - x| <= u |x| + 2^-126, and every product / sum / conversion may lose 2^-126).
// Norms are computed in double and rounded up to float. Every case the bound does not cover goes to the exact
// pass: non-finite y rows, W or bias, non-finite screen scores or verified logits, more than kMaxCandidates
// candidates in a row, no bf16 packing.
constexpr int64_t kMaxCandidates = 1024;
// The screen's own chunk is min(chunk, kScreenChunk) (4096 measured fastest at 128 rows; its bf16 scores are half
// the size of the exact pass's fp32 logits) and its rows go kScreenRows at a time: a score block of <= 8 MiB.
constexpr int64_t kScreenChunk = 4096, kScreenRows = 1024;

struct ScreenBound {
  double kappa, beta, tau_scale, sqrt_n, n;
  explicit ScreenBound(int64_t D) {
    const double u = std::ldexp(1.0, -8), u32 = std::ldexp(1.0, -24);
    n = static_cast<double>(D + 32);
    const double g = n * u32 / (1 - n * u32);
    const double S = (2 * u + u * u) + g * (1 + u) * (1 + u) + u * (1 + u) * (1 + u) * (1 + g) +
                     u32 * std::pow(1 + u, 3) * (1 + g) +                       // screen
                     g + u32 * (1 + g) +                                        // recompute
                     u32 * (1 + u32) * std::pow(1 + u, 3) * (1 + g);            // comparison
    kappa = S / (1 - u32) * (1 + std::ldexp(1.0, -20));
    beta = std::ldexp(1.0, -22);
    tau_scale = std::ldexp(1.0, -124);
    sqrt_n = std::sqrt(n);
  }
  double tau(double norm) const { return tau_scale * (sqrt_n * norm + n); }
};

// x rounded up to a float (+inf when too large)
float round_up_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// ||row||_2 of each row of a float32 [R, D] matrix, in double, with a relative margin for the double rounding
// (NaN or inf for a row with a non-finite entry)
std::vector<double> row_norms(const float* x, int64_t R, int64_t D) {
  std::vector<double> out(R);
  const double margin = 1 + (D + 4) * std::ldexp(1.0, -52);
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0;
      const float* p = x + r * D;
      for (int64_t k = 0; k < D; ++k) acc += static_cast<double>(p[k]) * p[k];
      out[r] = std::sqrt(acc) * margin;
    }
  });
  return out;
}

// bf16 packed chunks of a float32 weight with its per-entry bound columns, cached per weight as the fp32 chunks
struct ScreenEntry {
  WeightKey key;
  bool usable;                      // packed, and every ||w_v|| bound finite
  std::vector<at::Tensor> packed;   // bf16 [chunk, D] pieces, oneDNN layout
  std::vector<float> colA, tau_w;   // kappa ||w_v||, tau(||w_v||), rounded up
};

std::mutex g_screen_mutex;
std::unordered_map<const c10::TensorImpl*, std::shared_ptr<const ScreenEntry>> g_screen_cache;

// (a shared_ptr: a concurrent call that replaces the entry does not free it under this one)
std::shared_ptr<const ScreenEntry> screen_weight(const at::Tensor& w, int64_t chunk) {
  if (!can_prepack(w) || w.scalar_type() != at::kFloat) return nullptr;
  std::lock_guard<std::mutex> lock(g_screen_mutex);
  auto it = g_screen_cache.find(w.unsafeGetTensorImpl());
  if (it != g_screen_cache.end() && it->second->key.fresh_for(w, chunk)) return it->second;
  drop_dead(g_screen_cache, [](const std::shared_ptr<const ScreenEntry>& e) -> const WeightKey& { return e->key; });
  ScreenEntry entry{WeightKey::of(w, chunk), true, {}, {}, {}};
  at::NoGradGuard no_grad;
  const at::Tensor wc = w.contiguous();
  const int64_t V = w.size(0), D = w.size(1);
  const ScreenBound bound(D);
  const std::vector<double> nw = row_norms(wc.const_data_ptr<float>(), V, D);
  entry.colA.resize(V);
  entry.tau_w.resize(V);
  for (int64_t v = 0; v < V && entry.usable; ++v) {
    entry.colA[v] = round_up_float(bound.kappa * nw[v]);
    entry.tau_w[v] = round_up_float(bound.tau(nw[v]));
    entry.usable = std::isfinite(entry.colA[v]) && std::isfinite(entry.tau_w[v]);
  }
  if (entry.usable) {
    try {
      const at::Tensor wb = wc.to(at::kBFloat16);
      for (int64_t v0 = 0; v0 < V; v0 += chunk)
        entry.packed.push_back(reorder_linear_weight(wb.narrow(0, v0, std::min(chunk, V - v0))));
    } catch (const c10::Error&) {  // oneDNN refuses bf16 weights on this CPU / ISA cap
      entry.usable = false;
      entry.packed.clear();
    }
  }
  if (!entry.usable) {  // keep only the verdict
    entry.colA = {};
    entry.tau_w = {};
  }
  auto shared = std::make_shared<const ScreenEntry>(std::move(entry));
  g_screen_cache.insert_or_assign(w.unsafeGetTensorImpl(), shared);
  return shared;
}

std::atomic<int64_t> g_stat_calls{0}, g_stat_rows{0}, g_stat_exact_rows{0}, g_stat_candidates{0};

// The screened pass over y2 [R, D] float32 contiguous into best_i / best_v; false (nothing written) when the whole
// op must take the exact pass. Rows the screen cannot settle are done by the exact pass here.
bool screened_argmax_rows(const at::Tensor& y2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t chunk, int64_t* best_i, float* best_v) {
  const int64_t R = y2.size(0), D = y2.size(1), V = weight.size(0);
  if (D == 0 || V > std::numeric_limits<int32_t>::max()) return false;  // (candidates are int32)
  const int64_t exact_chunk = chunk;
  chunk = std::min({chunk, V, kScreenChunk});
  const std::shared_ptr<const ScreenEntry> ent = screen_weight(weight, chunk);
  if (ent == nullptr || !ent->usable) return false;
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    if (!at::isfinite(*b).all().item<bool>()) return false;
  }
  const ScreenBound bound(D);
  std::vector<float> colB(V);  // beta |b_v| + tau_w(v), rounded up
  const float* bp = b ? b->const_data_ptr<float>() : nullptr;
  for (int64_t v = 0; v < V; ++v)
    colB[v] = bp ? round_up_float(bound.beta * std::fabs(static_cast<double>(bp[v])) + ent->tau_w[v])
                 : ent->tau_w[v];

  const float* yp = y2.const_data_ptr<float>();
  const at::Tensor wc = weight.contiguous();  // (no copy for the usual contiguous weight)
  const float* wp = wc.const_data_ptr<float>();
  const std::vector<double> ny_d = row_norms(yp, R, D);
  std::vector<float> ny(R), tau_y(R), T(R, -std::numeric_limits<float>::infinity());
  std::vector<uint8_t> exact(R, 0);  // 1: this row takes the exact pass
  for (int64_t r = 0; r < R; ++r) {
    ny[r] = round_up_float(ny_d[r]);
    tau_y[r] = round_up_float(bound.tau(ny_d[r]));
    exact[r] = !(std::isfinite(ny[r]) && std::isfinite(tau_y[r]));
  }
  const std::unique_ptr<int32_t[]> cand_i(new int32_t[R * kMaxCandidates]);  // (uninitialised: count says)
  const std::unique_ptr<float[]> cand_hi(new float[R * kMaxCandidates]);
  std::vector<int64_t> count(R, 0);
  const auto& k = cpu::kernels();
  const at::Tensor yb_all = y2.to(at::kBFloat16);
  // rows [q0, q1) against chunk c (entries [v0, v0 + n))
  const auto scan = [&](int64_t q0, int64_t q1, int64_t c, int64_t v0, int64_t n) {
    at::Tensor g;
    {
      RECORD_FUNCTION("flm_rt::screen_gemm", std::vector<c10::IValue>());
      g = packed_linear(yb_all.narrow(0, q0, q1 - q0), ent->packed[c], std::nullopt).contiguous();
    }
    RECORD_FUNCTION("flm_rt::screen_scan", std::vector<c10::IValue>());
    TORCH_CHECK(g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kFloat,
                "flm_rt::vocab_pass_argmax: unexpected screen GEMM output dtype ", g.scalar_type());
    const char* gp = static_cast<const char*>(g.const_data_ptr());
    const int64_t g_ld = g.size(1) * g.element_size();
    at::parallel_for(q0, q1, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> block_hi((n + cpu::kScreenBlock - 1) / cpu::kScreenBlock);
      for (int64_t r = r0; r < r1; ++r) {
        if (exact[r]) continue;
        cpu::ScreenRow row{gp + (r - q0) * g_ld, cpu::float_kind(g.scalar_type()), n, bp ? bp + v0 : nullptr,
                           ent->colA.data() + v0, colB.data() + v0, ny[r], tau_y[r]};
        float lo = 0;
        if (!k.screen_max(row, &lo, block_hi.data())) {
          exact[r] = 1;
          continue;
        }
        T[r] = std::max(T[r], lo);
        int32_t* ci = cand_i.get() + r * kMaxCandidates;
        float* ch = cand_hi.get() + r * kMaxCandidates;
        if (count[r] > kMaxCandidates / 2) {  // drop earlier candidates that the risen threshold rejects
          int64_t m = 0;
          for (int64_t j = 0; j < count[r]; ++j)
            if (ch[j] >= T[r]) ci[m] = ci[j], ch[m++] = ch[j];
          count[r] = m;
        }
        count[r] = k.screen_collect(row, T[r], block_hi.data(), v0, ci, ch, count[r], kMaxCandidates);
        if (count[r] < 0) exact[r] = 1;
      }
    });
  };
  for (int64_t q0 = 0; q0 < R; q0 += kScreenRows) {
    const int64_t q1 = std::min(R, q0 + kScreenRows);
    for (int64_t c = 0, v0 = 0; v0 < V; ++c, v0 += chunk) scan(q0, q1, c, v0, std::min(chunk, V - v0));
  }
  // verification: the fp32 logits of the final candidates, torch.argmax's rules (candidates are ascending)
  std::atomic<int64_t> n_cand{0};
  RECORD_FUNCTION("flm_rt::screen_verify", std::vector<c10::IValue>());
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    int64_t local = 0;
    for (int64_t r = r0; r < r1; ++r) {
      if (exact[r]) continue;
      const int32_t* ci = cand_i.get() + r * kMaxCandidates;
      const float* ch = cand_hi.get() + r * kMaxCandidates;
      int64_t best = -1;
      float bv = 0;
      for (int64_t j = 0; j < count[r]; ++j) {
        if (!(ch[j] >= T[r])) continue;
        const int64_t v = ci[j];
        float l = k.dot_f32(yp + r * D, wp + v * D, D);
        if (bp) l = l + bp[v];
        ++local;
        if (!std::isfinite(l)) {
          best = -2;
          break;
        }
        if (best < 0 || l > bv) best = v, bv = l;
      }
      if (best < 0) {  // a non-finite logit (or, impossibly, no candidate): the exact pass decides
        exact[r] = 1;
        continue;
      }
      best_i[r] = best;
      best_v[r] = bv;
    }
    n_cand += local;
  });
  std::vector<int64_t> redo;
  for (int64_t r = 0; r < R; ++r)
    if (exact[r]) redo.push_back(r);
  if (!redo.empty()) {
    const at::Tensor rows = at::from_blob(redo.data(), {static_cast<int64_t>(redo.size())}, at::kLong).clone();
    std::vector<int64_t> ei(redo.size());
    std::vector<float> ev(redo.size());
    exact_argmax_rows(y2.index_select(0, rows), weight, b, 0.0, exact_chunk, true, ei.data(), ev.data());
    for (size_t j = 0; j < redo.size(); ++j) best_i[redo[j]] = ei[j], best_v[redo[j]] = ev[j];
  }
  g_stat_calls += 1;
  g_stat_rows += R;
  g_stat_exact_rows += static_cast<int64_t>(redo.size());
  g_stat_candidates += n_cand.load();
  return true;
}

std::tuple<at::Tensor, at::Tensor> vocab_pass_argmax_cpu(const at::Tensor& y, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias, double cap,
                                                         int64_t chunk, bool prepacked, bool screen) {
  const PassShape s = check_pass_inputs("flm_rt::vocab_pass_argmax", y, weight, bias, chunk, c10::DeviceType::CPU);
  auto [idx, val] = empty_argmax_outputs(y);
  if (s.rows == 0) return {idx, val};
  at::NoGradGuard no_grad;
  const at::Tensor y2 = y.reshape({s.rows, s.D}).contiguous();
  int64_t* best_i = idx.mutable_data_ptr<int64_t>();
  std::vector<float> best_v(s.rows);
  const bool screened = screen && prepacked && cap <= 0 && y.scalar_type() == at::kFloat &&
                        screened_argmax_rows(y2, weight, bias, chunk, best_i, best_v.data());
  if (!screened) exact_argmax_rows(y2, weight, bias, cap, chunk, prepacked, best_i, best_v.data());
  val.copy_(at::from_blob(best_v.data(), val.sizes(), at::TensorOptions().dtype(at::kFloat)));  // exact narrowing
  return {idx, val};
}

// ------------------------------------------------------------------------------- online softmax @ E
at::Tensor vocab_pass_embed_cpu(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& embed, double cap, int64_t chunk, bool prepacked) {
  const char* op = "flm_rt::vocab_pass_embed";
  const PassShape s = check_pass_inputs(op, y, weight, bias, chunk, c10::DeviceType::CPU);
  const int64_t De = check_pass_embed(op, y, embed, s);
  auto out_sizes = pass_row_sizes(y);
  out_sizes.push_back(De);
  if (s.rows == 0) return at::empty(out_sizes, y.options().dtype(at::kFloat));
  at::NoGradGuard no_grad;
  const ChunkedProjection proj(y, weight, bias, chunk, prepacked, s);
  const at::Tensor E = embed.contiguous();
  const std::vector<at::Tensor>* e_packed =
      prepacked && De > 0 ? try_packed_chunks(embed, proj.chunk, /*transposed=*/true) : nullptr;

  const auto f32 = y.options().dtype(at::kFloat);
  at::Tensor m = at::full({s.rows}, -std::numeric_limits<float>::infinity(), f32);  // running max
  at::Tensor l = at::zeros({s.rows}, f32);                                          // running sum of exp(x - m)
  at::Tensor acc = at::zeros({s.rows, De}, f32);                                    // running sum of exp(x - m) E
  const at::Tensor one = at::ones({}, f32), zero = at::zeros({}, f32);
  // With 0 < cap <= 60 the capped logits lie in [-cap, cap], so exp(x - cap) in [e^-120, 1] needs no running max
  // (for the cap of 30: >= e^-60 ~ 8.8e-27, a normal float), as in flow_map_step: fewer passes per chunk.
  const bool fixed_shift = cap > 0 && cap <= kFixedShiftMaxCap;
  for (int64_t c = 0; c < proj.count(); ++c) {
    at::Tensor x = proj.logits(c);
    x = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    if (cap > 0) x.div_(cap).tanh_().mul_(cap);
    if (fixed_shift) {
      x.sub_(cap).exp_();  // NaN logits stay NaN and make the row NaN, as torch.softmax
      l.add_(x.sum(1));
      if (e_packed) {
        acc.add_(packed_linear(x, (*e_packed)[c], std::nullopt));
      } else {
        acc.addmm_(x, E.narrow(0, proj.begin(c), proj.width(c)));
      }
      continue;
    }
    const at::Tensor m_new = at::maximum(m, at::amax(x, {1}));  // NaN propagates
    // rescale of the old terms: 1 where the max did not move (also -inf -> -inf), NaN stays NaN
    const at::Tensor scale = at::where(m == m_new, one, at::exp(m - m_new));
    // a row that is all -inf so far: exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN
    const at::Tensor shift = at::where(at::isneginf(m_new), zero, m_new);
    x.sub_(shift.unsqueeze(1)).exp_();
    l.mul_(scale).add_(x.sum(1));
    acc.mul_(scale.unsqueeze(1));
    if (e_packed) {
      acc.add_(packed_linear(x, (*e_packed)[c], std::nullopt));
    } else {
      acc.addmm_(x, E.narrow(0, proj.begin(c), proj.width(c)));
    }
    m = m_new;
  }
  // an all -inf row without a cap: 0 / 0 = NaN, as torch.softmax
  return acc.div_(l.unsqueeze(1)).reshape(out_sizes);
}

}  // namespace

// [calls, rows, rows that took the exact pass, verified candidates] of the screened argmax since load
std::vector<int64_t> vocab_screen_stats() {
  return {g_stat_calls.load(), g_stat_rows.load(), g_stat_exact_rows.load(), g_stat_candidates.load()};
}

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("vocab_pass_argmax", &vocab_pass_argmax_cpu);
  m.impl("vocab_pass_embed", &vocab_pass_embed_cpu);
}

}  // namespace flm_rt
