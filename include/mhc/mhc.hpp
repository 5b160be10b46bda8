// Umbrella header of the mhc library: Manifold-Constrained Hyper-Connections for Eigen models.
#pragma once

#include <mhc/backward.hpp>
#include <mhc/common.hpp>
#include <mhc/deepseek.hpp>
#include <mhc/diagnostics.hpp>
#include <mhc/layer.hpp>
#include <mhc/layer_backward.hpp>
#include <mhc/sinkhorn.hpp>
#include <mhc/streams.hpp>
#include <mhc/variants.hpp>
