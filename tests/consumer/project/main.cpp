// Projects a fixed matrix through the installed or embedded library and checks the result.
#include <mhc/mhc.hpp>

#include <cstdio>

int main() {
  Eigen::Matrix3d logits;
  logits << 0.5, -1.0, 2.0,
            1.5, 0.0, -0.5,
            -2.0, 1.0, 0.25;
  mhc::SinkhornOptions options;
  options.iterations = 200;
  const Eigen::Matrix3d projected = mhc::sinkhorn_knopp(logits, options);
  const double error = mhc::doubly_stochastic_error(projected);
  std::printf("doubly stochastic error after %d iterations: %.3e\n", options.iterations, error);
  return error < 1e-9 ? 0 : 1;
}
