// CPU implementation of the fused vocabulary pass (flm_rt::vocab_pass_argmax, flm_rt::vocab_pass_embed;
// contract in docs/KERNELS.md, reference in flm_rt/ops.py). The output projection logits = y W^T + b is computed
// one vocabulary chunk [R, chunk] at a time and reduced at once, so no [R, V] logits tensor ever exists:
//
//   argmax: optional soft-cap (in the logits dtype), the capability-dispatched argmax row kernel on the chunk,
//           then a merge into the running (index, value) with torch.max's rules (first NaN wins, ties -> lowest
//           index, hence "strictly greater" for later chunks);
//   embed:  soft-cap in float32, then an online softmax (running max m and sum l, as flash attention), the
//           unnormalised exp(chunk - m) multiplied into the running softmax @ E accumulator; with a cap <= 60
//           the shift is the cap itself (the capped logits are bounded), so no running max is needed.
//
// The GEMMs are ATen's: the oneDNN linear on weight chunks reordered once into oneDNN's blocked layout and
// cached here (when `prepacked` and torch has the mkldnn ops), else at::addmm / at::mm (MKL or oneDNN, as torch
// chooses). The chunk loop is in C++ so that one op call does the whole pass; threads come from the GEMMs and
// from ATen's element-wise ops (both at::parallel_for under the hood).
#include "../op_wrappers.h"
#include "dispatch.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace flm_rt {
namespace {

// ------------------------------------------------------------------------------------------ input validation
struct PassShape {
  int64_t rows, D, V;
};

PassShape check_pass_inputs(const char* op, const at::Tensor& y, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t chunk) {
  TORCH_CHECK(y.defined() && weight.defined(), op, ": y and weight must be defined tensors");
  TORCH_CHECK(y.device().is_cpu() && weight.device().is_cpu(), op, ": expected CPU tensors, got y on ", y.device(),
              " and weight on ", weight.device());
  TORCH_CHECK(is_supported_logits_dtype(y.scalar_type()), op, ": y must be float32, bfloat16 or float16, got ",
              y.scalar_type());
  TORCH_CHECK(weight.scalar_type() == y.scalar_type(), op, ": weight must have the dtype of y (", y.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(y.dim() >= 1, op, ": y must have at least one dimension [..., D], got a 0-dim tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, D], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == y.size(-1), op, ": weight is [V, D] = ", weight.sizes(), " but y has D = ",
              y.size(-1));
  const int64_t V = weight.size(0);
  TORCH_CHECK(V > 0, op, ": the vocabulary (weight.shape[0]) must be non-empty, got weight ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be on the CPU, got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == y.scalar_type(), op, ": bias must have the dtype of y (", y.scalar_type(),
                "), got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": bias must be [V] = [", V, "], got ", bias->sizes());
  }
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  const int64_t D = y.size(-1);
  return {D > 0 ? y.numel() / D : 0, D, V};
}

// ---------------------------------------------------------------------------------- prepacked weight chunks
// Reordered (oneDNN blocked) copies of row chunks of a weight, cached per weight tensor. An entry holds a weak
// reference to the weight's TensorImpl and its version counter and data pointer, so a freed, replaced or
// modified-in-place weight is never served from a stale entry; dead entries are dropped on the next insert.
struct PackedEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const void* data;
  uint32_t version;
  int64_t chunk;
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
  const uint32_t version = w._version();
  std::lock_guard<std::mutex> lock(g_pack_mutex);
  auto& cache = pack_cache(transposed);
  auto it = cache.find(w.unsafeGetTensorImpl());
  if (it != cache.end()) {
    auto owner = it->second.owner.lock();
    if (owner.get() == w.unsafeGetTensorImpl() && it->second.data == w.const_data_ptr() &&
        it->second.version == version && it->second.chunk == chunk)
      return it->second.packed;
  }
  for (auto e = cache.begin(); e != cache.end();) e = e->second.owner.expired() ? cache.erase(e) : std::next(e);
  PackedEntry entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(w.getIntrusivePtr()),
                    w.const_data_ptr(), version, chunk, {}};
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
    if (prepacked) packed = try_packed_chunks(w, chunk, /*transposed=*/false);
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

// lg.div_(cap).tanh_().mul_(cap) (lg contiguous): in one vectorised pass for bf16 / fp16 (the same bits: each op
// rounded to the dtype, SLEEF's tanh as ATen's); float32 keeps ATen's ops (its fp32 tanh is MKL's, not SLEEF's).
void soft_cap_(at::Tensor& lg, double cap) {
  if (lg.scalar_type() == at::kFloat) {
    lg.div_(cap).tanh_().mul_(cap);
  } else {
    cpu::soft_cap_(lg.data_ptr(), cpu::float_kind(lg.scalar_type()), lg.numel(), static_cast<float>(cap));
  }
}

std::vector<int64_t> row_sizes(const at::Tensor& y) {
  auto s = y.sizes().vec();
  s.pop_back();
  return s;
}

// ---------------------------------------------------------------------------------------------- argmax
std::tuple<at::Tensor, at::Tensor> vocab_pass_argmax_cpu(const at::Tensor& y, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias, double cap,
                                                         int64_t chunk, bool prepacked) {
  const PassShape s = check_pass_inputs("flm_rt::vocab_pass_argmax", y, weight, bias, chunk);
  auto [idx, val] = empty_argmax_outputs(y);
  if (s.rows == 0) return {idx, val};
  at::NoGradGuard no_grad;
  const ChunkedProjection proj(y, weight, bias, chunk, prepacked, s);

  int64_t* best_i = idx.mutable_data_ptr<int64_t>();
  std::vector<float> best_v(s.rows);
  at::Tensor ci = at::empty({s.rows}, y.options().dtype(at::kLong));
  at::Tensor cv = at::empty({s.rows}, y.options());
  const at::Tensor cv_f = at::empty({s.rows}, y.options().dtype(at::kFloat));
  for (int64_t c = 0; c < proj.count(); ++c) {
    at::Tensor lg = proj.logits(c);
    if (cap > 0) soft_cap_(lg, cap);  // same ops, same rounding as flm_rt.model.softcap_logits
    cpu::ArgmaxParams p{};
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
  val.copy_(at::from_blob(best_v.data(), val.sizes(), at::TensorOptions().dtype(at::kFloat)));  // exact narrowing
  return {idx, val};
}

// ------------------------------------------------------------------------------- online softmax @ E
at::Tensor vocab_pass_embed_cpu(const at::Tensor& y, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& embed, double cap, int64_t chunk, bool prepacked) {
  const char* op = "flm_rt::vocab_pass_embed";
  const PassShape s = check_pass_inputs(op, y, weight, bias, chunk);
  TORCH_CHECK(embed.defined() && embed.device().is_cpu(), op, ": embed must be a CPU tensor");
  TORCH_CHECK(embed.scalar_type() == at::kFloat, op, ": embed must be float32, got ", embed.scalar_type());
  TORCH_CHECK(embed.dim() == 2 && embed.size(0) == s.V, op, ": embed must be [V, De] with V = ", s.V, ", got ",
              embed.sizes());
  const int64_t De = embed.size(1);
  auto out_sizes = row_sizes(y);
  out_sizes.push_back(De);
  if (s.rows == 0) return at::empty(out_sizes, y.options().dtype(at::kFloat));
  at::NoGradGuard no_grad;
  const ChunkedProjection proj(y, weight, bias, chunk, prepacked, s);
  const at::Tensor E = embed.contiguous();
  const std::vector<at::Tensor>* e_packed =
      prepacked ? try_packed_chunks(embed, proj.chunk, /*transposed=*/true) : nullptr;

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

TORCH_LIBRARY_IMPL(flm_rt, CPU, m) {
  m.impl("vocab_pass_argmax", &vocab_pass_argmax_cpu);
  m.impl("vocab_pass_embed", &vocab_pass_embed_cpu);
}

}  // namespace flm_rt
