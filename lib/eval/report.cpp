#include "lib/eval/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <limits>
#include <set>

#include "formats/atomic_file.h"
#include "formats/error.h"

namespace oscar::eval {
namespace {

std::string num(double v, const char* spec = "{:.4g}") {
  if (!std::isfinite(v)) return "n/a";
  return ::fmt::format(::fmt::runtime(spec), v);
}
std::string pct(double v) { return std::isfinite(v) ? ::fmt::format("{:.1f}%", 100.0 * v) : "n/a"; }

nlohmann::json finite_or_null(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

nlohmann::json summary_json(const MetricSummary& s) {
  return {{"positions", s.positions},         {"nll_mean", finite_or_null(s.nll_mean)},
          {"perplexity", finite_or_null(s.perplexity)}, {"kl_mean", finite_or_null(s.kl_mean)},
          {"kl_p99", finite_or_null(s.kl_p99)},  {"top1_agreement", finite_or_null(s.top1_agreement)}};
}

std::string html_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// Modes in first-appearance order, so every rendering lists them as the run did.
std::vector<std::string> modes_in_order(const EvalReport& r) {
  std::vector<std::string> modes;
  for (const auto& m : r.results)
    if (std::find(modes.begin(), modes.end(), m.mode) == modes.end()) modes.push_back(m.mode);
  for (const auto& c : r.retrieval)
    if (std::find(modes.begin(), modes.end(), c.mode) == modes.end()) modes.push_back(c.mode);
  return modes;
}

// A fixed palette (Okabe-Ito, distinguishable with colour-blindness), indexed by the mode's position.
const char* mode_color(size_t i) {
  static const char* kPalette[] = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7",
                                   "#F0E442"};
  return kPalette[i % std::size(kPalette)];
}

// Line chart of one metric vs context per mode. x: log2(context) (contexts are usually powers of two apart);
// y: linear from 0 (KL) or from the smallest value (perplexity).
std::string line_chart_svg(const EvalReport& r, const std::string& title, bool from_zero,
                           double (*metric)(const ModeResult&)) {
  const double width = 640, height = 320, left = 70, right = 150, top = 30, bottom = 45;
  const auto modes = modes_in_order(r);
  std::set<int64_t> contexts;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& m : r.results) {
    contexts.insert(m.context);
    const double v = metric(m);
    if (std::isfinite(v)) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  std::string svg = ::fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{2}\" y=\"18\" font-size=\"14\">{3}</text>\n",
      width, height, left, html_escape(title));
  if (contexts.empty() || !std::isfinite(lo)) return svg + "<text x=\"70\" y=\"60\">no data</text>\n</svg>\n";
  if (from_zero) lo = std::min(lo, 0.0);
  if (hi <= lo) hi = lo + (lo == 0 ? 1.0 : std::fabs(lo) * 0.1);
  const double xmin = std::log2(static_cast<double>(*contexts.begin()));
  const double xmax = std::log2(static_cast<double>(*contexts.rbegin()));
  const double plot_w = width - left - right, plot_h = height - top - bottom;
  auto px = [&](int64_t ctx) {
    return xmax > xmin ? left + (std::log2(static_cast<double>(ctx)) - xmin) / (xmax - xmin) * plot_w
                       : left + plot_w / 2;
  };
  auto py = [&](double v) { return top + (1.0 - (v - lo) / (hi - lo)) * plot_h; };
  svg += ::fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n", left, top,
                       plot_w, plot_h);
  for (int i = 0; i <= 4; ++i) {
    const double v = lo + (hi - lo) * i / 4.0;
    svg += ::fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"#ddd\"/><text x=\"{3}\" y=\"{4:.1f}\" "
        "text-anchor=\"end\">{5}</text>\n",
        left, left + plot_w, py(v), left - 6, py(v) + 4, num(v, "{:.3g}"));
  }
  for (int64_t ctx : contexts)
    svg += ::fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(ctx),
                         top + plot_h + 18, ctx);
  svg += ::fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">context (tokens)</text>\n",
                       left + plot_w / 2, height - 6);
  for (size_t mi = 0; mi < modes.size(); ++mi) {
    std::vector<std::pair<int64_t, double>> points;
    for (const auto& m : r.results)
      if (m.mode == modes[mi] && std::isfinite(metric(m))) points.emplace_back(m.context, metric(m));
    std::sort(points.begin(), points.end());
    if (points.empty()) continue;
    std::string path;
    for (const auto& [ctx, v] : points) path += ::fmt::format("{:.1f},{:.1f} ", px(ctx), py(v));
    svg += ::fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>\n",
                         mode_color(mi), path);
    for (const auto& [ctx, v] : points)
      svg += ::fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\" fill=\"{}\"><title>{} @ {}: {}</title>"
                           "</circle>\n",
                           px(ctx), py(v), mode_color(mi), html_escape(modes[mi]), ctx, num(v));
    const double ly = top + 14 + 18 * static_cast<double>(mi);
    svg += ::fmt::format(
        "<line x1=\"{0}\" x2=\"{1}\" y1=\"{2:.1f}\" y2=\"{2:.1f}\" stroke=\"{3}\" stroke-width=\"2\"/><text x=\"{4}\" "
        "y=\"{5:.1f}\">{6}</text>\n",
        left + plot_w + 12, left + plot_w + 36, ly, mode_color(mi), left + plot_w + 42, ly + 4,
        html_escape(modes[mi]));
  }
  return svg + "</svg>\n";
}

// Success rate per (length, depth) of one task and mode: red (0) to green (1).
std::string heat_map_svg(const EvalReport& r, const std::string& task, const std::string& mode) {
  std::set<int64_t> lengths;
  std::set<double> depths;
  std::map<std::pair<int64_t, double>, const RetrievalCell*> cells;
  for (const auto& c : r.retrieval)
    if (c.task == task && c.mode == mode) {
      lengths.insert(c.length);
      depths.insert(c.depth);
      cells[{c.length, c.depth}] = &c;
    }
  const double cell_w = 56, cell_h = 28, left = 70, top = 30;
  const double width = left + cell_w * static_cast<double>(depths.size()) + 10;
  const double height = top + cell_h * static_cast<double>(lengths.size()) + 40;
  std::string svg = ::fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"4\" y=\"16\" font-size=\"13\">{2} / {3}</text>\n",
      width, height, html_escape(task), html_escape(mode));
  size_t row = 0;
  for (int64_t len : lengths) {
    const double y = top + cell_h * static_cast<double>(row++);
    svg += ::fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text>\n", left - 6, y + cell_h / 2 + 4, len);
    size_t col = 0;
    for (double depth : depths) {
      const double x = left + cell_w * static_cast<double>(col++);
      auto it = cells.find({len, depth});
      if (it == cells.end()) continue;
      const RetrievalCell& c = *it->second;
      const double rate = c.trials > 0 ? static_cast<double>(c.successes) / static_cast<double>(c.trials) : 0.0;
      const int red = static_cast<int>(std::lround(215 * (1 - rate) + 26 * rate));
      const int green = static_cast<int>(std::lround(48 * (1 - rate) + 150 * rate));
      const int blue = static_cast<int>(std::lround(39 * (1 - rate) + 65 * rate));
      svg += ::fmt::format(
          "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{}\" height=\"{}\" fill=\"rgb({},{},{})\" stroke=\"#fff\"/>"
          "<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" fill=\"#fff\">{}/{}</text>\n",
          x, y, cell_w, cell_h, red, green, blue, x + cell_w / 2, y + cell_h / 2 + 4, c.successes, c.trials);
    }
  }
  size_t col = 0;
  for (double depth : depths)
    svg += ::fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{:.0f}%</text>\n",
                         left + cell_w * (static_cast<double>(col++) + 0.5),
                         top + cell_h * static_cast<double>(lengths.size()) + 16, 100 * depth);
  svg += ::fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">needle depth (rows: length)</text>\n",
                       left + cell_w * static_cast<double>(depths.size()) / 2, height - 4);
  return svg + "</svg>\n";
}

std::vector<std::string> tasks_in_order(const EvalReport& r) {
  std::vector<std::string> tasks;
  for (const auto& c : r.retrieval)
    if (std::find(tasks.begin(), tasks.end(), c.task) == tasks.end()) tasks.push_back(c.task);
  return tasks;
}

// Success rate per mode and task over all cells.
std::map<std::pair<std::string, std::string>, std::pair<int64_t, int64_t>> retrieval_totals(const EvalReport& r) {
  std::map<std::pair<std::string, std::string>, std::pair<int64_t, int64_t>> totals;
  for (const auto& c : r.retrieval) {
    auto& t = totals[{c.mode, c.task}];
    t.first += c.successes;
    t.second += c.trials;
  }
  return totals;
}

const std::vector<std::string> kTableHeader = {"mode",     "context", "bits/el", "KV B/tok", "PPL",    "PPL>win",
                                               "KL mean",  "KL p99",  "KL>win",  "top1",     "top1>win", "greedy"};

std::vector<std::string> table_row(const ModeResult& m) {
  return {m.mode,
          std::to_string(m.context),
          num(m.footprint.bits_per_element, "{:.3f}"),
          num(m.footprint.bytes_per_token, "{:.0f}"),
          num(m.all.perplexity, "{:.3f}"),
          num(m.beyond.perplexity, "{:.3f}"),
          num(m.all.kl_mean, "{:.2e}"),
          num(m.all.kl_p99, "{:.2e}"),
          num(m.beyond.kl_mean, "{:.2e}"),
          pct(m.all.top1_agreement),
          pct(m.beyond.top1_agreement),
          m.greedy_prompts > 0 ? ::fmt::format("{:.1f}/{}", m.greedy_mean_agreement, m.greedy_tokens) : "n/a"};
}

}  // namespace

std::string format_table(const EvalReport& r) {
  std::vector<std::vector<std::string>> rows = {kTableHeader};
  for (const auto& m : r.results) rows.push_back(table_row(m));
  std::vector<size_t> widths(kTableHeader.size(), 0);
  for (const auto& row : rows)
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  std::string out;
  for (size_t ri = 0; ri < rows.size(); ++ri) {
    for (size_t i = 0; i < rows[ri].size(); ++i)
      out += i == 0 ? ::fmt::format("{:<{}}", rows[ri][i], widths[i]) : ::fmt::format("  {:>{}}", rows[ri][i], widths[i]);
    out += '\n';
    if (ri == 0) {
      size_t total = 0;
      for (size_t w : widths) total += w + 2;
      out += std::string(total - 2, '-') + '\n';
    }
  }
  for (const auto& [key, t] : retrieval_totals(r))
    out += ::fmt::format("{} {}: {}/{} retrieved\n", key.second, key.first, t.first, t.second);
  return out;
}

std::string to_json_text(const EvalReport& r) {
  nlohmann::ordered_json j;
  j["model"] = r.model;
  j["bundle"] = r.bundle.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(r.bundle);
  if (!r.generated_at.empty()) j["generated_at"] = r.generated_at;
  nlohmann::ordered_json settings = nlohmann::ordered_json::object();
  for (const auto& [k, v] : r.settings) settings[k] = v;
  j["settings"] = settings;
  j["data_files"] = nlohmann::ordered_json::array();
  for (const auto& [path, sha] : r.data_files) j["data_files"].push_back({{"path", path}, {"sha256", sha}});
  j["results"] = nlohmann::ordered_json::array();
  for (const auto& m : r.results) {
    j["results"].push_back({{"mode", m.mode},
                            {"context", m.context},
                            {"sequences", m.sequences},
                            {"all_positions", summary_json(m.all)},
                            {"beyond_windows", summary_json(m.beyond)},
                            {"greedy", {{"prompts", m.greedy_prompts},
                                        {"new_tokens", m.greedy_tokens},
                                        {"mean_tokens_until_divergence", finite_or_null(m.greedy_mean_agreement)},
                                        {"full_matches", m.greedy_full_matches}}},
                            {"footprint", {{"bits_per_element", m.footprint.bits_per_element},
                                           {"kv_bytes_per_token", m.footprint.bytes_per_token},
                                           {"quantized_fraction", m.footprint.quantized_fraction}}}});
  }
  j["retrieval"] = nlohmann::ordered_json::array();
  for (const auto& c : r.retrieval)
    j["retrieval"].push_back({{"mode", c.mode},
                              {"task", c.task},
                              {"length", c.length},
                              {"depth", c.depth},
                              {"trials", c.trials},
                              {"successes", c.successes}});
  j["warnings"] = r.warnings;
  return j.dump(2) + "\n";
}

std::string to_markdown(const EvalReport& r) {
  std::string md = "# oscar eval\n\n";
  md += ::fmt::format("- model: `{}`\n- bundle: {}\n", r.model, r.bundle.empty() ? "none" : "`" + r.bundle + "`");
  if (!r.generated_at.empty()) md += ::fmt::format("- generated: {}\n", r.generated_at);
  for (const auto& [path, sha] : r.data_files) md += ::fmt::format("- data: `{}` (sha256 {})\n", path, sha);
  for (const auto& [k, v] : r.settings) md += ::fmt::format("- {}: {}\n", k, v);
  for (const auto& w : r.warnings) md += ::fmt::format("- **warning**: {}\n", w);
  md += "\nKL is KL(BF16 ‖ mode) per next-token distribution, in nats. \">win\": positions whose query reads "
        "quantized K/V (t >= sink + recent). greedy: mean tokens until the first divergence from BF16.\n\n";
  md += "|";
  for (const auto& h : kTableHeader) md += " " + h + " |";
  md += "\n|";
  for (size_t i = 0; i < kTableHeader.size(); ++i) md += i == 0 ? "---|" : "---:|";
  md += "\n";
  for (const auto& m : r.results) {
    md += "|";
    for (const auto& cell : table_row(m)) md += " " + cell + " |";
    md += "\n";
  }
  if (!r.retrieval.empty()) {
    md += "\n## Retrieval (success / trials)\n\n| mode | task | length | depth | success |\n|---|---|---:|---:|---:|\n";
    for (const auto& c : r.retrieval)
      md += ::fmt::format("| {} | {} | {} | {:.0f}% | {}/{} |\n", c.mode, c.task, c.length, 100 * c.depth,
                          c.successes, c.trials);
  }
  return md;
}

std::string to_html(const EvalReport& r) {
  std::string h =
      "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>oscar eval</title>\n<style>\n"
      "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
      "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
      "th{background:#f3f3f3}.warn{color:#b00}\n</style>\n</head>\n<body>\n<h1>oscar eval</h1>\n<ul>\n";
  h += ::fmt::format("<li>model: <code>{}</code></li>\n<li>bundle: {}</li>\n", html_escape(r.model),
                     r.bundle.empty() ? "none" : "<code>" + html_escape(r.bundle) + "</code>");
  if (!r.generated_at.empty()) h += ::fmt::format("<li>generated: {}</li>\n", html_escape(r.generated_at));
  for (const auto& [path, sha] : r.data_files)
    h += ::fmt::format("<li>data: <code>{}</code> (sha256 {})</li>\n", html_escape(path), html_escape(sha));
  for (const auto& [k, v] : r.settings) h += ::fmt::format("<li>{}: {}</li>\n", html_escape(k), html_escape(v));
  for (const auto& w : r.warnings) h += ::fmt::format("<li class=\"warn\">warning: {}</li>\n", html_escape(w));
  h += "</ul>\n<p>KL is KL(BF16 &#8214; mode) per next-token distribution, in nats. &quot;&gt;win&quot;: positions "
       "whose query reads quantized K/V (t &ge; sink + recent). greedy: mean tokens until the first divergence from "
       "BF16.</p>\n<table>\n<tr>";
  for (const auto& col : kTableHeader) h += "<th>" + html_escape(col) + "</th>";
  h += "</tr>\n";
  for (const auto& m : r.results) {
    h += "<tr>";
    for (const auto& cell : table_row(m)) h += "<td>" + html_escape(cell) + "</td>";
    h += "</tr>\n";
  }
  h += "</table>\n<h2>Accuracy vs context</h2>\n";
  h += line_chart_svg(r, "KL(BF16 ‖ mode), mean over all positions [nats]", true,
                      [](const ModeResult& m) { return m.all.kl_mean; });
  h += line_chart_svg(r, "Perplexity, all positions", false, [](const ModeResult& m) { return m.all.perplexity; });
  if (!r.retrieval.empty()) {
    h += "<h2>Retrieval</h2>\n";
    for (const auto& task : tasks_in_order(r))
      for (const auto& mode : modes_in_order(r)) h += heat_map_svg(r, task, mode);
  }
  return h + "</body>\n</html>\n";
}

void write_report(const std::filesystem::path& dir, const EvalReport& report) {
  if (!std::filesystem::is_directory(dir)) throw Error(dir.string(), "output directory does not exist");
  fmt::write_file_atomic(dir / "report.json", to_json_text(report));
  fmt::write_file_atomic(dir / "report.md", to_markdown(report));
  fmt::write_file_atomic(dir / "report.html", to_html(report));
}

}  // namespace oscar::eval
