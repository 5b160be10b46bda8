// A hand-written SVG line chart: panels of curves with axes, ticks, labels and a legend, readable
// in any browser without a plotting library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace char_lm {

// One curve: points (x, y) drawn in `color`, solid or dashed.
struct Curve {
  std::string label;
  std::string color;  // any SVG color, for example "#1f77b4"
  bool dashed = false;
  std::vector<std::pair<double, double>> points;
};

// One chart: its curves and axis titles. Points with non-finite coordinates are skipped, and so
// are points with y <= 0 on a logarithmic y axis.
struct Panel {
  std::string title;
  std::string x_label;
  std::string y_label;
  std::string note;  // one line under the title, for example what the line styles mean
  bool log_y = false;
  std::vector<Curve> curves;
};

namespace detail {

inline std::string format_number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}

inline std::string escape_xml(const std::string& text) {
  std::string escaped;
  for (char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

// Returns a tick spacing of 1, 2 or 5 times a power of ten that gives about `target` intervals
// over [low, high].
inline double tick_spacing(double low, double high, int target) {
  const double raw = (high - low) / target;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double factor : {1.0, 2.0, 5.0}) {
    if (factor * power >= raw) return factor * power;
  }
  return 10.0 * power;
}

// Draws one panel into a box of width x height at (left, top), with the legend on the right.
inline void draw_panel(std::ostringstream& svg, const Panel& panel, double left, double top, double width,
                       double height) {
  const double plot_left = left + 70, plot_top = top + 52;
  const double plot_width = width - 70 - 190, plot_height = height - 52 - 55;
  const auto transform_y = [&](double y) { return panel.log_y ? std::log10(y) : y; };
  const auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!panel.log_y || y > 0); };

  double x_min = std::numeric_limits<double>::infinity(), x_max = -x_min, y_min = x_min, y_max = -x_min;
  for (const Curve& curve : panel.curves) {
    for (const auto& [x, y] : curve.points) {
      if (!usable(x, y)) continue;
      x_min = std::min(x_min, x), x_max = std::max(x_max, x);
      y_min = std::min(y_min, transform_y(y)), y_max = std::max(y_max, transform_y(y));
    }
  }
  if (!(x_min <= x_max)) x_min = 0, x_max = 1, y_min = 0, y_max = 1;  // no usable points
  if (x_max == x_min) x_max = x_min + 1;
  if (y_max - y_min < 1e-9) y_min -= 0.5, y_max += 0.5;
  const double y_pad = 0.05 * (y_max - y_min);
  y_min -= y_pad, y_max += y_pad;
  const auto px = [&](double x) { return plot_left + (x - x_min) / (x_max - x_min) * plot_width; };
  const auto py = [&](double y) { return plot_top + (y_max - transform_y(y)) / (y_max - y_min) * plot_height; };

  svg << "<text x=\"" << plot_left + plot_width / 2 << "\" y=\"" << top + 24
      << "\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">" << escape_xml(panel.title) << "</text>\n";
  svg << "<text x=\"" << plot_left + plot_width / 2 << "\" y=\"" << top + 40
      << "\" text-anchor=\"middle\" font-size=\"12\" fill=\"#555\">" << escape_xml(panel.note) << "</text>\n";
  svg << "<rect x=\"" << plot_left << "\" y=\"" << plot_top << "\" width=\"" << plot_width << "\" height=\""
      << plot_height << "\" fill=\"none\" stroke=\"#444\"/>\n";

  // Grid lines and tick labels. A logarithmic axis puts ticks at 1, 2 and 5 times powers of ten.
  const double x_step = tick_spacing(x_min, x_max, 8);
  for (double x = std::ceil(x_min / x_step) * x_step; x <= x_max + 1e-9; x += x_step) {
    svg << "<line x1=\"" << px(x) << "\" y1=\"" << plot_top << "\" x2=\"" << px(x) << "\" y2=\""
        << plot_top + plot_height << "\" stroke=\"#ddd\"/>\n";
    svg << "<text x=\"" << px(x) << "\" y=\"" << plot_top + plot_height + 18
        << "\" text-anchor=\"middle\" font-size=\"12\">" << format_number(x) << "</text>\n";
  }
  std::vector<double> y_ticks;
  if (panel.log_y) {
    for (double decade = std::floor(y_min); decade <= y_max; decade += 1.0) {
      for (double factor : {1.0, 2.0, 5.0}) {
        const double value = factor * std::pow(10.0, decade);
        if (std::log10(value) >= y_min && std::log10(value) <= y_max) y_ticks.push_back(value);
      }
    }
  }
  if (y_ticks.size() < 3) {
    // A linear axis, or a logarithmic one spanning too little for 1-2-5 ticks: evenly spaced
    // values, placed on the logarithmic scale where there is one.
    y_ticks.clear();
    const double low = panel.log_y ? std::pow(10.0, y_min) : y_min;
    const double high = panel.log_y ? std::pow(10.0, y_max) : y_max;
    const double y_step = tick_spacing(low, high, 6);
    for (double y = std::ceil(low / y_step) * y_step; y <= high + 1e-9 * y_step; y += y_step) y_ticks.push_back(y);
  }
  for (double y : y_ticks) {
    svg << "<line x1=\"" << plot_left << "\" y1=\"" << py(y) << "\" x2=\"" << plot_left + plot_width << "\" y2=\""
        << py(y) << "\" stroke=\"#ddd\"/>\n";
    svg << "<text x=\"" << plot_left - 6 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\" font-size=\"12\">"
        << format_number(std::abs(y) < 1e-12 ? 0.0 : y) << "</text>\n";
  }
  svg << "<text x=\"" << plot_left + plot_width / 2 << "\" y=\"" << plot_top + plot_height + 42
      << "\" text-anchor=\"middle\" font-size=\"13\">" << escape_xml(panel.x_label) << "</text>\n";
  svg << "<text transform=\"translate(" << left + 18 << " " << plot_top + plot_height / 2
      << ") rotate(-90)\" text-anchor=\"middle\" font-size=\"13\">" << escape_xml(panel.y_label) << "</text>\n";

  // Curves, then the legend in the same order.
  for (const Curve& curve : panel.curves) {
    std::ostringstream points;
    for (const auto& [x, y] : curve.points) {
      if (usable(x, y)) points << px(x) << ',' << py(y) << ' ';
    }
    svg << "<polyline fill=\"none\" stroke=\"" << curve.color << "\" stroke-width=\"" << (curve.dashed ? 1.5 : 2.5)
        << "\"" << (curve.dashed ? " stroke-dasharray=\"6 4\"" : "") << " points=\"" << points.str() << "\"/>\n";
  }
  const double legend_left = plot_left + plot_width + 15;
  for (std::size_t i = 0; i < panel.curves.size(); ++i) {
    const Curve& curve = panel.curves[i];
    const double y = plot_top + 12 + 20.0 * static_cast<double>(i);
    svg << "<line x1=\"" << legend_left << "\" y1=\"" << y << "\" x2=\"" << legend_left + 28 << "\" y2=\"" << y
        << "\" stroke=\"" << curve.color << "\" stroke-width=\"" << (curve.dashed ? 1.5 : 2.5) << "\""
        << (curve.dashed ? " stroke-dasharray=\"6 4\"" : "") << "/>\n";
    svg << "<text x=\"" << legend_left + 34 << "\" y=\"" << y + 4 << "\" font-size=\"12\">"
        << escape_xml(curve.label) << "</text>\n";
  }
}

}  // namespace detail

// Returns an SVG document with the panels stacked vertically, each 960 x 420 pixels.
inline std::string render_svg(const std::vector<Panel>& panels) {
  const double width = 960, panel_height = 420;
  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\""
      << panel_height * static_cast<double>(panels.size()) << "\" font-family=\"sans-serif\">\n";
  svg << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  for (std::size_t i = 0; i < panels.size(); ++i) {
    detail::draw_panel(svg, panels[i], 0, panel_height * static_cast<double>(i), width, panel_height);
  }
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace char_lm
