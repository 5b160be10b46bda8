// Projects a matrix of logits onto the doubly stochastic matrices and prints the result with
// its row and column sums for a few iteration counts, then reports how many rounds an early
// stop at a column error of 1e-9 needs.
//
//   sinkhorn_projection [N] [SEED]    N x N logits drawn uniformly from [-3, 3] (default 4, 1)
//
// Exits with status 2 on invalid arguments. sinkhorn_projection --help lists their ranges.
#include <mhc/mhc.hpp>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

namespace {

const char* const kUsage =
    "usage: sinkhorn_projection [N] [SEED]\n"
    "Projects an N x N matrix of random logits onto the doubly stochastic matrices with\n"
    "Sinkhorn-Knopp and prints it after 1, 5, 20 and 100 rounds, with its row and column sums.\n"
    "  N           matrix size, 1 to 64 (default 4); every entry is printed, so N = 64 already\n"
    "              gives output lines of about 700 characters\n"
    "  SEED        seed of the logits, which are drawn uniformly from [-3, 3], 0 to 4294967295\n"
    "              (default 1)\n"
    "  -h, --help  print this help and exit\n";

// Every entry is printed, so a larger matrix gives lines too long to read.
constexpr int kMaxMatrixSize = 64;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "sinkhorn_projection: %s\nRun sinkhorn_projection --help for the arguments.\n",
               message.c_str());
  std::exit(2);
}

// Parses a decimal integer in [minimum, maximum], or exits with status 2 and a message that
// names the argument.
long long parse_integer(const char* text, const char* name, long long minimum, long long maximum) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || value < minimum || value > maximum) {
    fail(std::string("invalid ") + name + " '" + text + "': expected an integer from " + std::to_string(minimum) +
         " to " + std::to_string(maximum));
  }
  return value;
}

void print_matrix_with_sums(const mhc::RowMatrix<double>& matrix) {
  const Eigen::Index n = matrix.rows();
  for (Eigen::Index i = 0; i < n; ++i) {
    std::printf("  ");
    for (Eigen::Index j = 0; j < n; ++j) std::printf(" %8.5f", matrix(i, j));
    std::printf("   | row sum %.12f\n", matrix.row(i).sum());
  }
  std::printf("   column sums:");
  for (Eigen::Index j = 0; j < n; ++j) std::printf(" %.8f", matrix.col(j).sum());
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  for (int k = 1; k < argc; ++k) {
    if (std::strcmp(argv[k], "--help") == 0 || std::strcmp(argv[k], "-h") == 0) {
      std::fputs(kUsage, stdout);
      return 0;
    }
  }
  // An argument that starts with '-' and a letter, or with "--", is an option, not a negative number.
  for (int k = 1; k < argc; ++k) {
    const char* argument = argv[k];
    if (argument[0] == '-' && (argument[1] == '-' || std::isalpha(static_cast<unsigned char>(argument[1])))) {
      fail(std::string("unknown option '") + argument + "': expected -h, --help or the positional N and SEED");
    }
  }
  if (argc > 3) {
    fail(std::string("unexpected argument '") + argv[3] + "': expected at most 2 arguments, N and SEED, got " +
         std::to_string(argc - 1));
  }

  const int n = argc > 1 ? static_cast<int>(parse_integer(argv[1], "N", 1, kMaxMatrixSize)) : 4;
  const auto seed = argc > 2 ? static_cast<std::uint32_t>(parse_integer(argv[2], "SEED", 0, 4294967295LL)) : 1U;

  std::mt19937 generator(seed);
  std::uniform_real_distribution<double> uniform(-3.0, 3.0);
  mhc::RowMatrix<double> logits(n, n);
  for (Eigen::Index i = 0; i < logits.size(); ++i) logits.data()[i] = uniform(generator);

  std::printf("logits (%d x %d, seed %lu):\n", n, n, static_cast<unsigned long>(seed));
  for (Eigen::Index i = 0; i < n; ++i) {
    std::printf("  ");
    for (Eigen::Index j = 0; j < n; ++j) std::printf(" %8.4f", logits(i, j));
    std::printf("\n");
  }

  for (int iterations : {1, 5, 20, 100}) {
    mhc::SinkhornOptions options;
    options.iterations = iterations;
    const mhc::RowMatrix<double> projected = mhc::sinkhorn_knopp(logits, options);
    std::printf("\nafter %d round%s (doubly stochastic error %.3e):\n", iterations,
                iterations == 1 ? "" : "s", mhc::doubly_stochastic_error(projected));
    print_matrix_with_sums(projected);
  }

  mhc::SinkhornOptions early_stop;
  early_stop.iterations = 1000;
  early_stop.tolerance = 1e-9;
  mhc::SinkhornReport report;
  mhc::sinkhorn_knopp(logits, early_stop, report);
  std::printf("\nwith tolerance %.0e: stopped after %d of %d rounds, column error %.3e\n",
              early_stop.tolerance, report.iterations, early_stop.iterations, report.column_error);
  return 0;
}
