// flm_rt_run: load a TorchScript generate graph (flm-rt export --format torchscript) and print token ids.
//
//   flm_rt_run MODEL.pt [--noise FILE.raw] [--seed N] [--batch B] [--draws S --length L --vocab V]
//
// Shapes (draws S, length L, vocabulary V) are read from the sidecar MODEL.pt.json written by the exporter
// unless given on the command line. Noise: --noise FILE.raw holds S*B*L*V little-endian float32 values in
// [S, B, L, V] order (e.g. numpy's arr.astype('<f4').tofile()); otherwise it is drawn with torch::randn after
// torch::manual_seed(seed) (deterministic for a given libtorch build). Output: one line of space-separated token
// ids per sample on stdout; timings on stderr. Exit status 2 with a one-line message on bad arguments or files
// (non-numeric or out-of-range numbers, a noise request too large, a missing model), 1 on other errors.
#include <torch/script.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string model;
  std::string noise_file;
  int64_t seed = 0;
  int64_t batch = -1;
  int64_t draws = -1, length = -1, vocab = -1;
};

constexpr int64_t kMaxBatch = 65536;
constexpr int64_t kMaxNoiseElements = int64_t{1} << 33;  // 32 GiB of float32: refuse larger requests up front

[[noreturn]] void usage(const std::string& why, int status = 2) {
  std::cerr << "flm_rt_run: " << why << "\n"
            << "usage: flm_rt_run MODEL.pt [--noise FILE.raw] [--seed N] [--batch B] [--draws S] [--length L] "
               "[--vocab V]\n";
  std::exit(status);
}

// A whole-string decimal integer in [lo, hi], or a usage error naming the option (never an uncaught exception).
int64_t parse_int(const std::string& opt, const std::string& text, int64_t lo, int64_t hi) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < lo || v > hi)
    usage(opt + " takes an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + text + "'");
  return v;
}

// The sidecar is flat JSON written by flm_rt; only a few integer fields at its top level are needed here.
int64_t json_int(const std::string& text, const std::string& key, int64_t fallback) {
  const std::string needle = "\"" + key + "\":";
  size_t pos = text.find(needle);
  if (pos == std::string::npos) return fallback;
  pos += needle.size();
  while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\n')) ++pos;
  if (text.compare(pos, 4, "null") == 0) return fallback;
  try {
    return std::stoll(text.substr(pos, 32));
  } catch (const std::exception&) {
    return fallback;
  }
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + a);
      return argv[++i];
    };
    const int64_t big = std::numeric_limits<int32_t>::max();
    if (a == "--noise") o.noise_file = value();
    else if (a == "--seed") o.seed = parse_int(a, value(), 0, std::numeric_limits<int64_t>::max());
    else if (a == "--batch") o.batch = parse_int(a, value(), 1, kMaxBatch);
    else if (a == "--draws") o.draws = parse_int(a, value(), 1, big);
    else if (a == "--length") o.length = parse_int(a, value(), 1, big);
    else if (a == "--vocab") o.vocab = parse_int(a, value(), 1, big);
    else if (a == "-h" || a == "--help") usage("help", 0);
    else if (!a.empty() && a[0] == '-') usage("unknown option " + a);
    else if (o.model.empty()) o.model = a;
    else usage("more than one model given");
  }
  if (o.model.empty()) usage("no model given");
  std::ifstream side(o.model + ".json");
  if (side) {
    std::stringstream ss;
    ss << side.rdbuf();
    const std::string text = ss.str();
    if (o.draws < 0) o.draws = json_int(text, "draws", -1);
    if (o.length < 0) o.length = json_int(text, "length", -1);
    if (o.vocab < 0) o.vocab = json_int(text, "vocab_size", -1);
    if (o.batch < 0) o.batch = json_int(text, "batch", -1);
  }
  if (o.batch < 0) o.batch = 1;
  if (o.draws < 1 || o.length < 1 || o.vocab < 1 || o.batch > kMaxBatch)
    usage("shapes unknown or invalid: no sidecar " + o.model + ".json and no --draws/--length/--vocab");
  // S * B * L * V without overflow: each factor is below 2^31, so check step by step against the limit
  int64_t n = 1;
  for (int64_t f : {o.draws, o.batch, o.length, o.vocab}) {
    if (n > kMaxNoiseElements / f)
      usage("the noise [S, B, L, V] = [" + std::to_string(o.draws) + ", " + std::to_string(o.batch) + ", " +
            std::to_string(o.length) + ", " + std::to_string(o.vocab) + "] is too large; use a smaller --batch");
    n *= f;
  }
  if (!std::ifstream(o.model)) usage("cannot open model file " + o.model);
  return o;
}

torch::Tensor make_noise(const Options& o) {
  const std::vector<int64_t> shape = {o.draws, o.batch, o.length, o.vocab};
  const int64_t n = o.draws * o.batch * o.length * o.vocab;
  if (o.noise_file.empty()) {
    torch::manual_seed(static_cast<uint64_t>(o.seed));
    return torch::randn(shape, torch::kFloat32);
  }
  std::ifstream f(o.noise_file, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot open noise file " + o.noise_file);
  const int64_t bytes = static_cast<int64_t>(f.tellg());
  if (bytes < n * 4)
    throw std::runtime_error("noise file " + o.noise_file + " holds " + std::to_string(bytes / 4) +
                             " floats; [S, B, L, V] needs " + std::to_string(n));
  f.seekg(0);
  torch::Tensor t = torch::empty(shape, torch::kFloat32);
  f.read(reinterpret_cast<char*>(t.data_ptr<float>()), n * 4);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    torch::jit::script::Module module = torch::jit::load(o.model);
    module.eval();
    torch::NoGradGuard no_grad;
    torch::Tensor noise = make_noise(o);
    auto t0 = std::chrono::steady_clock::now();
    torch::Tensor ids = module.forward({noise}).toTensor().to(torch::kInt64).contiguous();
    auto t1 = std::chrono::steady_clock::now();
    if (ids.dim() != 2) throw std::runtime_error("the graph returned a " + std::to_string(ids.dim()) + "-d tensor");
    const int64_t* p = ids.data_ptr<int64_t>();
    for (int64_t b = 0; b < ids.size(0); ++b) {
      for (int64_t l = 0; l < ids.size(1); ++l) std::cout << (l ? " " : "") << p[b * ids.size(1) + l];
      std::cout << "\n";
    }
    std::cerr << "[" << ids.size(0) << " x " << ids.size(1) << " tokens: "
              << std::chrono::duration<double, std::milli>(t1 - t0).count() << " ms]\n";
  } catch (const c10::Error& e) {
    // TorchScript errors carry the graph's traceback; its last line is the message
    std::string msg = e.what_without_backtrace();
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    const size_t nl = msg.rfind('\n');
    std::cerr << "flm_rt_run: " << (nl == std::string::npos ? msg : msg.substr(nl + 1)) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "flm_rt_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
