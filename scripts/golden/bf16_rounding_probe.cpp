// Where does a bf16 forward of a Llama checkpoint leave the fp32 reference? A CPU harness (Llama only: RMSNorm,
// rotate_half RoPE, GQA causal attention, SwiGLU, tied or untied head) that rounds to bf16 at chosen points and
// reports top-1 agreement and mean |Δlogit| against the same forward with only the weights rounded (what
// FwdGpuModel.*MatchesCpuModel compares against). Used for issue 4's TinyStories head_dim-8 item; see
// docs/results.md "GPU forward".
//
//   g++ -O2 -std=c++20 scripts/golden/bf16_rounding_probe.cpp -o /tmp/probe
//   build/bin/oscar tokenize --model M --text "$(head -c 1200 TEXT)" > /tmp/ids.json
//   /tmp/probe M/model.safetensors M/config.json /tmp/ids.json
//
// Points: N normed GEMM inputs, Q q/k/v after RoPE, P softmax numerators in P·V (flash-style: unnormalised, then
// divided in fp32), O attention output, G gate/up outputs, A SwiGLU output, R residual stream after every add,
// J o_proj / down_proj outputs, S attention scores, L logits. The GPU forward rounds N Q P O G A; transformers
// bf16 (sdpa) rounds all of them except that its softmax is over bf16 scores (S) with probabilities normalised
// before P·V.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

using json = nlohmann::json;

static float bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) == 0x7f800000u) return x;
  b = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &b, 4);
  return x;
}

struct Weights {
  std::map<std::string, std::vector<float>> t;
  const std::vector<float>& operator[](const std::string& n) const {
    auto it = t.find(n);
    if (it == t.end()) {
      std::fprintf(stderr, "missing tensor %s\n", n.c_str());
      std::exit(1);
    }
    return it->second;
  }
};

static Weights load(const std::string& path, bool round_weights) {
  std::ifstream f(path, std::ios::binary);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  std::string hs(n, '\0');
  f.read(hs.data(), static_cast<std::streamsize>(n));
  const json h = json::parse(hs);
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  Weights w;
  for (auto& [name, v] : h.items()) {
    if (name == "__metadata__") continue;
    if (v["dtype"] != "F32") {
      std::fprintf(stderr, "%s: only F32 checkpoints\n", name.c_str());
      std::exit(1);
    }
    const size_t b = v["data_offsets"][0], e = v["data_offsets"][1];
    std::vector<float> x((e - b) / 4);
    std::memcpy(x.data(), data.data() + b, e - b);
    if (round_weights)
      for (float& y : x) y = bf16(y);
    w.t[name] = std::move(x);
  }
  return w;
}

struct Cfg {
  int H, I, L, nh, nkv, d, V;
  float eps, theta;
};

struct Points {
  bool N = false, Q = false, P = false, O = false, G = false, A = false, R = false, J = false, S = false, Lg = false;
};

static void maybe(std::vector<float>& v, bool on) {
  if (on)
    for (float& x : v) x = bf16(x);
}

// y[T, n] = x[T, k] · W[n, k]ᵀ, fp32 accumulation in double (order-independent)
static std::vector<float> linear(const std::vector<float>& x, int T, int k, const std::vector<float>& W, int n) {
  std::vector<float> y(static_cast<size_t>(T) * n);
  for (int t = 0; t < T; ++t)
    for (int o = 0; o < n; ++o) {
      double acc = 0;
      for (int i = 0; i < k; ++i) acc += double{x[t * k + i]} * W[static_cast<size_t>(o) * k + i];
      y[static_cast<size_t>(t) * n + o] = static_cast<float>(acc);
    }
  return y;
}

static std::vector<float> rmsnorm(const std::vector<float>& x, int T, int n, const std::vector<float>& w, float eps) {
  std::vector<float> y(x.size());
  for (int t = 0; t < T; ++t) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += double{x[t * n + i]} * x[t * n + i];
    const double r = 1.0 / std::sqrt(ss / n + eps);
    for (int i = 0; i < n; ++i) y[t * n + i] = static_cast<float>(x[t * n + i] * r) * w[i];
  }
  return y;
}

static std::vector<float> forward(const Weights& w, const Cfg& c, const std::vector<int>& ids, const Points& p) {
  const int T = static_cast<int>(ids.size()), H = c.H, d = c.d, qd = c.nh * d, kvd = c.nkv * d;
  const auto& E = w["model.embed_tokens.weight"];
  std::vector<float> x(static_cast<size_t>(T) * H);
  for (int t = 0; t < T; ++t) std::copy_n(&E[static_cast<size_t>(ids[t]) * H], H, &x[static_cast<size_t>(t) * H]);
  maybe(x, p.R);
  for (int l = 0; l < c.L; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    std::vector<float> h = rmsnorm(x, T, H, w[pre + "input_layernorm.weight"], c.eps);
    maybe(h, p.N);
    std::vector<float> q = linear(h, T, H, w[pre + "self_attn.q_proj.weight"], qd);
    std::vector<float> k = linear(h, T, H, w[pre + "self_attn.k_proj.weight"], kvd);
    std::vector<float> v = linear(h, T, H, w[pre + "self_attn.v_proj.weight"], kvd);
    maybe(q, p.J), maybe(k, p.J), maybe(v, p.J);  // transformers' projections come out in bf16
    auto rope = [&](std::vector<float>& a, int heads) {
      for (int t = 0; t < T; ++t)
        for (int hh = 0; hh < heads; ++hh)
          for (int i = 0; i < d / 2; ++i) {
            const double f = std::pow(static_cast<double>(c.theta), -2.0 * i / d);
            const float inv = static_cast<float>(f);
            const float ang = static_cast<float>(t) * inv;
            const float cs = std::cos(ang), sn = std::sin(ang);
            float* r = &a[(static_cast<size_t>(t) * heads + hh) * d];
            const float x0 = r[i], x1 = r[i + d / 2];
            r[i] = x0 * cs - x1 * sn;
            r[i + d / 2] = x1 * cs + x0 * sn;
          }
    };
    rope(q, c.nh);
    rope(k, c.nkv);
    maybe(q, p.Q), maybe(k, p.Q), maybe(v, p.Q);
    std::vector<float> att(static_cast<size_t>(T) * qd);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    std::vector<double> s(T);
    for (int hh = 0; hh < c.nh; ++hh) {
      const int g = hh / (c.nh / c.nkv);
      for (int i = 0; i < T; ++i) {
        double mx = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int e = 0; e < d; ++e) dot += double{q[(i * c.nh + hh) * d + e]} * k[(j * c.nkv + g) * d + e];
          s[j] = dot * scale;
          if (p.S) s[j] = bf16(static_cast<float>(s[j]));
          mx = std::max(mx, s[j]);
        }
        double den = 0;
        for (int j = 0; j <= i; ++j) den += (s[j] = std::exp(s[j] - mx));
        for (int e = 0; e < d; ++e) {
          double acc = 0;
          for (int j = 0; j <= i; ++j) {
            double pj = s[j];
            if (p.P) pj = bf16(static_cast<float>(pj));
            if (p.S) pj = bf16(static_cast<float>(s[j] / den)) * den;  // sdpa: normalised bf16 probabilities
            acc += pj * v[(j * c.nkv + g) * d + e];
          }
          att[(static_cast<size_t>(i) * c.nh + hh) * d + e] = static_cast<float>(acc / den);
        }
      }
    }
    maybe(att, p.O);
    std::vector<float> o = linear(att, T, qd, w[pre + "self_attn.o_proj.weight"], H);
    maybe(o, p.J);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    maybe(x, p.R);
    h = rmsnorm(x, T, H, w[pre + "post_attention_layernorm.weight"], c.eps);
    maybe(h, p.N);
    std::vector<float> gt = linear(h, T, H, w[pre + "mlp.gate_proj.weight"], c.I);
    std::vector<float> up = linear(h, T, H, w[pre + "mlp.up_proj.weight"], c.I);
    maybe(gt, p.G), maybe(up, p.G);
    std::vector<float> act(gt.size());
    for (size_t i = 0; i < act.size(); ++i) act[i] = gt[i] / (1.f + std::exp(-gt[i])) * up[i];
    maybe(act, p.A);
    std::vector<float> dn = linear(act, T, c.I, w[pre + "mlp.down_proj.weight"], H);
    maybe(dn, p.J);
    for (size_t i = 0; i < x.size(); ++i) x[i] += dn[i];
    maybe(x, p.R);
  }
  std::vector<float> h = rmsnorm(x, T, H, w["model.norm.weight"], c.eps);
  maybe(h, p.N);
  const auto& head = w.t.count("lm_head.weight") ? w["lm_head.weight"] : E;
  std::vector<float> logits = linear(h, T, H, head, c.V);
  maybe(logits, p.Lg);
  return logits;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s model.safetensors config.json ids.json\n", argv[0]);
    return 2;
  }
  const json cj = json::parse(std::ifstream(argv[2]));
  Cfg c{cj["hidden_size"], cj["intermediate_size"], cj["num_hidden_layers"], cj["num_attention_heads"],
        cj["num_key_value_heads"], cj.value("head_dim", 0), cj["vocab_size"], cj["rms_norm_eps"],
        cj.value("rope_theta", 10000.f)};
  if (c.d == 0) c.d = c.H / c.nh;
  std::vector<int> ids = json::parse(std::ifstream(argv[3])).get<std::vector<int>>();
  if (ids.size() > 256) ids.resize(256);
  const Weights w = load(argv[1], true);
  const std::vector<float> ref = forward(w, c, ids, Points{});
  struct Row {
    const char* name;
    Points p;
  };
  auto P = [](const char* s) {
    Points p;
    for (; *s; ++s) switch (*s) {
        case 'N': p.N = true; break;
        case 'Q': p.Q = true; break;
        case 'P': p.P = true; break;
        case 'O': p.O = true; break;
        case 'G': p.G = true; break;
        case 'A': p.A = true; break;
        case 'R': p.R = true; break;
        case 'J': p.J = true; break;
        case 'S': p.S = true; break;
        case 'L': p.Lg = true; break;
      }
    return p;
  };
  const std::vector<Row> rows = {{"N", P("N")},       {"Q", P("Q")},           {"P", P("P")},
                                 {"O", P("O")},       {"G+A", P("GA")},        {"R", P("R")},
                                 {"J", P("J")},       {"gpu: NQPOGA", P("NQPOGA")},
                                 {"gpu minus Q", P("NPOGA")}, {"gpu minus N", P("QPOGA")},
                                 {"hf-bf16: NQOGARJSL", P("NQOGARJSL")}};
  std::printf("%zu tokens; reference: fp32 activations, bf16-rounded weights\n", ids.size());
  std::printf("%-22s %8s %12s %12s\n", "bf16 at", "top-1", "mean|dlogit|", "max|dlogit|");
  std::vector<std::vector<float>> outs;
  for (const Row& r : rows) {
    const std::vector<float> got = forward(w, c, ids, r.p);
    int same = 0;
    double sum = 0, mx = 0;
    for (size_t t = 0; t < ids.size(); ++t) {
      const float* a = &got[t * c.V];
      const float* b = &ref[t * c.V];
      same += std::max_element(a, a + c.V) - a == std::max_element(b, b + c.V) - b;
      for (int i = 0; i < c.V; ++i) {
        sum += std::abs(double{a[i]} - b[i]);
        mx = std::max(mx, std::abs(double{a[i]} - b[i]));
      }
    }
    std::printf("%-22s %8.4f %12.5f %12.5f\n", r.name, static_cast<double>(same) / ids.size(),
                sum / (static_cast<double>(ids.size()) * c.V), mx);
    outs.push_back(got);
  }
  // The issue's bound compares the GPU with transformers bf16: emulated GPU vs emulated transformers.
  const std::vector<float>& g = outs[7];
  const std::vector<float>& hf = outs.back();
  int same = 0;
  double sum = 0;
  for (size_t t = 0; t < ids.size(); ++t) {
    const float* a = &g[t * c.V];
    const float* b = &hf[t * c.V];
    same += std::max_element(a, a + c.V) - a == std::max_element(b, b + c.V) - b;
    for (int i = 0; i < c.V; ++i) sum += std::abs(double{a[i]} - b[i]);
  }
  std::printf("%-22s %8.4f %12.5f   (emulated GPU vs emulated transformers bf16)\n", "gpu vs hf-bf16",
              static_cast<double>(same) / ids.size(), sum / (static_cast<double>(ids.size()) * c.V));
  return 0;
}
