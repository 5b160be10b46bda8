// Umbrella header of the mhc library: Manifold-Constrained Hyper-Connections for Eigen models.
#pragma once

#include <mhc/common.hpp>
#include <mhc/sinkhorn.hpp>
