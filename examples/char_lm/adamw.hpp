// AdamW: Adam with bias correction and decoupled weight decay, which shrinks the weights directly
// instead of adding to the gradient, plus optional clipping of the global gradient norm.
#pragma once

#include "model.hpp"

#include <cmath>
#include <string>
#include <vector>

namespace char_lm {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double epsilon = 1e-8;
  double weight_decay = 0.1;  // per step and times the learning rate, on tensors marked for decay only
  double clip_norm = 1.0;     // maximum global L2 norm of the gradient, or 0 for no clipping
};

// AdamW state for one model: first and second moment of every weight, in for_each_tensor order.
template <typename Scalar>
class AdamW {
 public:
  AdamW(Weights<Scalar>& weights, const AdamWOptions& options) : options_(options) {
    for_each_tensor(weights, [&](const std::string&, Scalar*, Eigen::Index size, bool) {
      first_moments_.push_back(Eigen::ArrayXd::Zero(size));
      second_moments_.push_back(Eigen::ArrayXd::Zero(size));
    });
  }

  // Updates `weights` with `gradient` at `learning_rate` and returns the gradient's global L2
  // norm before clipping.
  double step(Weights<Scalar>& weights, Weights<Scalar>& gradient, double learning_rate) {
    const double norm = global_norm(gradient);
    const double scale = options_.clip_norm > 0.0 && norm > options_.clip_norm ? options_.clip_norm / norm : 1.0;
    ++steps_;
    const double correction1 = 1.0 - std::pow(options_.beta1, steps_);
    const double correction2 = 1.0 - std::pow(options_.beta2, steps_);

    std::vector<Scalar*> gradients;
    for_each_tensor(gradient, [&](const std::string&, Scalar* data, Eigen::Index, bool) { gradients.push_back(data); });
    std::size_t index = 0;
    for_each_tensor(weights, [&](const std::string&, Scalar* data, Eigen::Index size, bool decay) {
      Eigen::Map<Eigen::Array<Scalar, Eigen::Dynamic, 1>> values(data, size);
      const Eigen::ArrayXd grad =
          Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(gradients[index], size).template cast<double>() *
          scale;
      Eigen::ArrayXd& m = first_moments_[index];
      Eigen::ArrayXd& v = second_moments_[index];
      m = options_.beta1 * m + (1.0 - options_.beta1) * grad;
      v = options_.beta2 * v + (1.0 - options_.beta2) * grad.square();
      const Eigen::ArrayXd update = (m / correction1) / ((v / correction2).sqrt() + options_.epsilon);
      const double decay_factor = decay ? 1.0 - learning_rate * options_.weight_decay : 1.0;
      values = (values.template cast<double>() * decay_factor - learning_rate * update).template cast<Scalar>();
      ++index;
    });
    return norm;
  }

  // Returns the L2 norm of all gradient values together.
  static double global_norm(Weights<Scalar>& gradient) {
    double sum = 0.0;
    for_each_tensor(gradient, [&](const std::string&, Scalar* data, Eigen::Index size, bool) {
      sum += Eigen::Map<const Eigen::Array<Scalar, Eigen::Dynamic, 1>>(data, size).template cast<double>().square().sum();
    });
    return std::sqrt(sum);
  }

 private:
  AdamWOptions options_;
  std::vector<Eigen::ArrayXd> first_moments_;
  std::vector<Eigen::ArrayXd> second_moments_;
  int steps_ = 0;
};

}  // namespace char_lm
