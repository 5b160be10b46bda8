// Trains a small byte-level language model with a plain residual, static or dynamic
// hyper-connection, mHC or mHC-lite connection around each MLP layer, and compares their loss
// curves and mixing gains. Run `char_lm --help` for the options.
//
//   char_lm --connection all --steps 1000 --csv run.csv --svg run.svg --sample 300
//   char_lm --data input.txt --connection mhc
#include "char_lm/command_line.hpp"
#include "char_lm/corpus.hpp"
#include "char_lm/model.hpp"
#include "char_lm/svg_plot.hpp"
#include "char_lm/training.hpp"

#include <Eigen/Core>

#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

using Scalar = float;

// Formats a duration in seconds as "1m05s" or "42s".
std::string format_duration(double seconds) {
  const long total = static_cast<long>(seconds + 0.5);
  char buffer[32];
  if (total >= 60) {
    std::snprintf(buffer, sizeof buffer, "%ldm%02lds", total / 60, total % 60);
  } else {
    std::snprintf(buffer, sizeof buffer, "%lds", total);
  }
  return buffer;
}

// Replaces bytes that could garble a terminal with '?': control characters other than newline
// and tab, DEL (127), and bytes from 128 up, which may be parts of UTF-8 sequences.
std::string printable(const std::string& text) {
  std::string result = text;
  for (char& c : result) {
    const auto byte = static_cast<unsigned char>(c);
    if ((byte < 32 && c != '\n' && c != '\t') || byte >= 127) c = '?';
  }
  return result;
}

void write_csv_header(std::ostream& csv, int layers) {
  csv << "connection,step,train_loss,validation_loss";
  for (int l = 1; l <= layers; ++l) {
    csv << ",layer" << l << "_forward_gain,layer" << l << "_backward_gain,layer" << l
        << "_composite_forward_gain,layer" << l << "_composite_backward_gain";
  }
  csv << '\n';
}

// One CSV row: the gains are the Amax gains (largest absolute row sum for forward, column sum
// for backward) of H_res(l) and of the composites H_res(l)...H_res(1) and H_res(L)...H_res(l).
void write_csv_row(std::ostream& csv, const char* connection, const char_lm::Evaluation& evaluation) {
  csv << connection << ',' << evaluation.step << ',' << evaluation.train_loss << ',' << evaluation.validation_loss;
  for (const mhc::LayerGain& gain : evaluation.gains) {
    csv << ',' << gain.layer.forward_max << ',' << gain.layer.backward_max << ','
        << gain.forward_composite.forward_max << ',' << gain.backward_composite.backward_max;
  }
  csv << '\n';
}

const char* curve_color(mhc::Connection connection) {
  switch (connection) {
    case mhc::Connection::residual: return "#7f7f7f";
    case mhc::Connection::static_hc: return "#2ca02c";
    case mhc::Connection::dynamic_hc: return "#d62728";
    case mhc::Connection::mhc: return "#1f77b4";
    case mhc::Connection::mhc_lite: return "#9467bd";
  }
  return "#000000";
}

// Opens `path` for writing or throws std::runtime_error naming it.
std::ofstream open_output(const std::string& path) {
  std::ofstream file(path);
  if (!file) throw std::runtime_error("cannot open '" + path + "' for writing: check that the folder exists");
  return file;
}

int run(const char_lm::Settings& settings) {
  Eigen::setNbThreads(settings.threads);
  if (Eigen::nbThreads() < settings.threads) {
    std::cerr << "note: Eigen was built without OpenMP, so --threads " << settings.threads
              << " has no effect; running on 1 thread\n";
  }

  std::string text;
  if (settings.data_path.empty()) {
    text = char_lm::generate_corpus(settings.corpus_bytes, 12345);
    std::cout << "data: generated corpus of " << text.size() << " bytes\n";
  } else {
    text = char_lm::read_text_file(settings.data_path);
    std::cout << "data: " << settings.data_path << ", " << text.size() << " bytes\n";
  }
  const char_lm::Corpus corpus = char_lm::split_corpus(text, settings.validation_fraction, settings.model.window);
  std::cout << "split: " << corpus.train.size() << " bytes for training, " << corpus.validation.size()
            << " for validation\n";

  std::ofstream csv;
  if (!settings.csv_path.empty()) {
    csv = open_output(settings.csv_path);
    write_csv_header(csv, settings.model.layers);
  }
  char_lm::Panel loss_panel{"Character model: loss per byte", "training step", "cross-entropy (nats per byte)",
                            "solid: validation; dashed: training, averaged over the steps since the previous point",
                            false, {}};
  // The first evaluations (about 6 nats at step 0) would compress the differences between
  // connections at the end, so this panel starts a quarter of the way into the run.
  const int zoom_start = settings.training.steps / 4;
  char_lm::Panel zoom_panel{"Validation loss from step " + std::to_string(zoom_start), "training step",
                            "cross-entropy (nats per byte)", "same runs as above, validation only", false, {}};
  char_lm::Panel gain_panel{"Gradient gain through the stream mixing", "training step", "Amax gain (log scale)",
                            "largest over layers l of the max absolute column sum of H_res(L) ... H_res(l), "
                            "mean over validation tokens",
                            true, {}};

  for (mhc::Connection connection : settings.connections) {
    char_lm::ModelConfig config = settings.model;
    config.connection = connection;
    const char* name = mhc::to_string(connection);
    char_lm::Model<Scalar> model(config, settings.training.seed);
    std::cout << "\n== " << name << ": " << config.effective_streams() << " stream(s), " << config.layers
              << " layers, width " << config.channels << ", window " << config.window << ", "
              << settings.training.steps << " steps\n";

    char_lm::Curve train_curve{std::string(name) + " training", curve_color(connection), true, {}};
    char_lm::Curve validation_curve{std::string(name) + " validation", curve_color(connection), false, {}};
    char_lm::Curve gain_curve{name, curve_color(connection), false, {}};
    char_lm::train(model, corpus, settings.training, [&](const char_lm::Evaluation& evaluation) {
      double largest_gain = 0.0;
      for (const mhc::LayerGain& gain : evaluation.gains) {
        largest_gain = std::max(largest_gain, gain.backward_composite.backward_max);
      }
      std::printf("step %5d  train %.4f  validation %.4f  %7.0f tokens/s  elapsed %s  remaining %s\n",
                  evaluation.step, evaluation.train_loss, evaluation.validation_loss, evaluation.tokens_per_second,
                  format_duration(evaluation.elapsed_seconds).c_str(),
                  format_duration(evaluation.remaining_seconds).c_str());
      std::fflush(stdout);
      train_curve.points.emplace_back(evaluation.step, evaluation.train_loss);
      validation_curve.points.emplace_back(evaluation.step, evaluation.validation_loss);
      gain_curve.points.emplace_back(evaluation.step, largest_gain);
      if (csv.is_open()) write_csv_row(csv, name, evaluation);
    });
    loss_panel.curves.push_back(validation_curve);
    loss_panel.curves.push_back(train_curve);
    char_lm::Curve zoom_curve{name, curve_color(connection), false, {}};
    for (const auto& point : validation_curve.points) {
      if (point.first >= zoom_start) zoom_curve.points.push_back(point);
    }
    zoom_panel.curves.push_back(zoom_curve);
    gain_panel.curves.push_back(gain_curve);

    if (settings.sample_bytes > 0) {
      const std::string prompt = corpus.validation.substr(0, static_cast<std::size_t>(config.window));
      const std::string sample = char_lm::sample_text(model, prompt, settings.sample_bytes, settings.temperature,
                                                      settings.training.seed);
      std::cout << "sample (prompt in brackets, temperature " << settings.temperature << "):\n["
                << printable(prompt) << "]" << printable(sample) << "\n";
    }
  }

  if (!settings.csv_path.empty()) std::cout << "\nwrote " << settings.csv_path << '\n';
  if (!settings.svg_path.empty()) {
    std::ofstream svg = open_output(settings.svg_path);
    svg << char_lm::render_svg({loss_panel, zoom_panel, gain_panel});
    std::cout << "wrote " << settings.svg_path << '\n';
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  char_lm::Settings settings;
  try {
    settings = char_lm::parse_command_line(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const char_lm::UsageError& error) {
    std::cerr << "char_lm: " << error.what() << "\nRun 'char_lm --help' for the list of options.\n";
    return 2;
  }
  if (settings.help) {
    std::cout << char_lm::usage_text();
    return 0;
  }
  try {
    return run(settings);
  } catch (const std::exception& error) {
    std::cerr << "char_lm: error: " << error.what() << '\n';
    return 1;
  }
}
