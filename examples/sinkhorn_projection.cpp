// Projects a matrix of logits onto the doubly stochastic matrices and prints the result with
// its row and column sums for a few iteration counts, then reports how many rounds an early
// stop at a column error of 1e-9 needs.
//
//   sinkhorn_projection [N] [SEED]    N x N logits drawn uniformly from [-3, 3] (default 4, 1)
#include <mhc/mhc.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

namespace {

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

int parse_positive(const char* text, const char* name) {
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < 1 || value > 64) {
    std::fprintf(stderr, "sinkhorn_projection: invalid %s '%s': expected an integer in [1, 64]\n",
                 name, text);
    std::exit(2);
  }
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  const int n = argc > 1 ? parse_positive(argv[1], "N") : 4;
  const int seed = argc > 2 ? parse_positive(argv[2], "SEED") : 1;

  std::mt19937 generator(static_cast<unsigned>(seed));
  std::uniform_real_distribution<double> uniform(-3.0, 3.0);
  mhc::RowMatrix<double> logits(n, n);
  for (Eigen::Index i = 0; i < logits.size(); ++i) logits.data()[i] = uniform(generator);

  std::printf("logits (%d x %d, seed %d):\n", n, n, seed);
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
