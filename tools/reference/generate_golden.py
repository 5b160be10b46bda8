"""Generate the golden data files in tests/data from the float64 PyTorch reference.

Usage, from the repository root:

    /usr/bin/python3 tools/reference/generate_golden.py [--output DIR]

Run it with /usr/bin/python3, which has Debian's python3-torch. The python3 found first
on PATH may be a build without torch.

DIR defaults to tests/data of the repository that contains this script. Every case
uses a fixed seed, so a rerun with the same PyTorch build rewrites identical files. The
format is described in tools/reference/README.md. Before writing a layer case, the
script checks that the case can tell a correct layer from common mistakes (a
transposed H_res, a missing factor 2 in H_post, no mixing at all) and raises
AssertionError if it cannot.
"""

import argparse
import math
import os
import sys

import torch

import mhc_reference as ref

torch.set_default_dtype(torch.float64)

FORMAT_HEADER = (
    "# mhc golden data. Each array is a line 'name rows cols' followed by rows lines\n"
    "# of cols numbers (row-major, shortest round-trip decimal form of a double).\n"
    "# Lines starting with '#' are comments. Written by tools/reference/generate_golden.py.\n"
)

# A wrong layer must move x_next by at least this much (absolute, on values of order 1)
# for a case to count as discriminating. The C++ tests compare float results with
# tolerances below 1e-3, so every mistake checked here fails them.
MIN_MISTAKE_EFFECT = 0.05

# Random layer cases: (file stem, n, C, T, Sinkhorn iterations, seed).
LAYER_CASES = [
    ("layer_n1_c5_t3", 1, 5, 3, 20, 101),
    ("layer_n2_c3_t1", 2, 3, 1, 20, 102),
    ("layer_n2_c7_t5", 2, 7, 5, 20, 103),
    ("layer_n3_c5_t3", 3, 5, 3, 20, 104),
    ("layer_n3_c12_t1", 3, 12, 1, 20, 111),
    ("layer_n4_c7_t5", 4, 7, 5, 20, 106),
    ("layer_n4_c12_t3", 4, 12, 3, 20, 107),
    ("layer_n4_c5_t3_iter5", 4, 5, 3, 5, 108),
    ("layer_n8_c3_t3", 8, 3, 3, 20, 109),
    ("layer_n4_c3_t0", 4, 3, 0, 20, 110),
]

# Sinkhorn cases: every n with every logit scale and iteration count.
SINKHORN_STREAMS = [1, 2, 3, 4, 8]
SINKHORN_SCALES = [1, 4]
SINKHORN_ITERATIONS = [1, 5, 20]
SINKHORN_SEED = 200


def format_number(value):
    """Return the shortest decimal string that reads back as exactly `value`."""
    if not math.isfinite(value):
        raise ValueError(f"invalid golden value: expected a finite number, got {value}")
    return repr(float(value))


def write_arrays(path, description, arrays):
    """Write the named 2-D tensors of `arrays` (a list of (name, tensor)) to `path`."""
    with open(path, "w", encoding="ascii") as file:
        file.write(FORMAT_HEADER)
        file.write(f"# {description}\n")
        for name, tensor in arrays:
            matrix = torch.as_tensor(tensor, dtype=torch.float64).detach()
            if matrix.dim() != 2:
                raise ValueError(f"array {name}: expected 2 dimensions, got {matrix.dim()}")
            rows, cols = matrix.shape
            file.write(f"{name} {rows} {cols}\n")
            for row in matrix.tolist():
                file.write(" ".join(format_number(value) for value in row) + "\n")


def scalar(value):
    """Return `value` as a 1 x 1 tensor, the golden format's scalar."""
    return torch.tensor([[float(value)]])


def random_layer_inputs(n, channels, tokens, iterations, seed):
    """Draw the inputs of one random layer case from a generator seeded with `seed`.

    phi is scaled by 2 / sqrt(n*C), so with alphas in [0.3, 1) the logits are of order 1
    and phi moves them as much as the bias does. Each token is scaled by its own factor,
    so a RMS taken over all tokens instead of per token gives different coefficients.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    def uniform(low, high):
        return low + (high - low) * torch.rand(1, generator=generator).item()

    width = n * channels
    coefficient_count = n * n + 2 * n
    hidden = 2 * channels
    token_scales = torch.exp(normal(tokens, 1, scale=0.5))
    return {
        "iterations": iterations,
        "rms_epsilon": 1e-6,
        "alpha_pre": uniform(0.3, 1.0),
        "alpha_post": uniform(0.3, 1.0),
        "alpha_res": uniform(0.3, 1.0),
        "x": normal(tokens, width) * token_scales,
        "phi": normal(width, coefficient_count, scale=2.0 / math.sqrt(width)),
        "bias": normal(coefficient_count),
        "w1": normal(channels, hidden, scale=1.0 / math.sqrt(channels)),
        "b1": normal(hidden, scale=0.5),
        "w2": normal(hidden, channels, scale=1.0 / math.sqrt(hidden)),
        "grad_x_next": normal(tokens, width),
    }


def evaluate_layer(inputs):
    """Run the reference forward and backward pass of one layer case.

    The loss is sum(grad_x_next * x_next), so every gradient is the backward pass for
    the upstream gradient grad_x_next. Returns the named output arrays.
    """
    n = ref.streams_from_coefficient_count(inputs["phi"].shape[1])
    tokens = inputs["x"].shape[0]
    leaves = {name: torch.as_tensor(inputs[name]).clone().requires_grad_(True)
              for name in ("x", "phi", "bias", "alpha_pre", "alpha_post", "alpha_res")}
    w1, b1, w2 = inputs["w1"], inputs["b1"], inputs["w2"]

    values = ref.layer_forward(
        leaves["x"], leaves["phi"], leaves["bias"], leaves["alpha_pre"],
        leaves["alpha_post"], leaves["alpha_res"], inputs["rms_epsilon"],
        inputs["iterations"], lambda h_in: ref.mlp_branch(h_in, w1, b1, w2))
    for name in ("pre", "post", "res", "h_in", "h_out"):
        values[name].retain_grad()
    grad_x_next = inputs["grad_x_next"]
    (grad_x_next * values["x_next"]).sum().backward()

    res = values["res"].detach()
    width = grad_x_next.shape[1]
    streams_grad = grad_x_next.reshape(tokens, n, width // n)
    # The merge alone, with the coefficients held constant: d x[t, stream j] =
    # sum_i res[t, i, j] * G[t, stream i], that is H_res^T G per token.
    grad_x_merge = torch.einsum("tij,tic->tjc", res, streams_grad).reshape(tokens, width)
    # The aggregation alone: d x[t, stream i] = pre[t, i] * d h_in[t].
    grad_x_aggregate = (values["pre"].detach()[:, :, None]
                        * values["h_in"].grad[:, None, :]).reshape(tokens, width)
    grad_x_coefficients = coefficient_path_gradient(inputs, values)

    total = grad_x_merge + grad_x_aggregate + grad_x_coefficients
    assert torch.allclose(total, leaves["x"].grad, rtol=1e-12, atol=1e-12), \
        "the three paths of d x do not add up to the autograd total"

    return {
        "pre": values["pre"].detach(),
        "post": values["post"].detach(),
        "res": res.reshape(tokens, n * n),
        "h_in": values["h_in"].detach(),
        "h_out": values["h_out"].detach(),
        "x_next": values["x_next"].detach(),
        "grad_x": leaves["x"].grad,
        "grad_phi": leaves["phi"].grad,
        "grad_bias": leaves["bias"].grad.reshape(1, -1),
        "grad_alpha_pre": scalar(leaves["alpha_pre"].grad),
        "grad_alpha_post": scalar(leaves["alpha_post"].grad),
        "grad_alpha_res": scalar(leaves["alpha_res"].grad),
        "grad_pre": values["pre"].grad,
        "grad_post": values["post"].grad,
        "grad_res": values["res"].grad.reshape(tokens, n * n),
        "grad_h_out": values["h_out"].grad,
        "grad_h_in": values["h_in"].grad,
        "grad_x_merge": grad_x_merge,
        "grad_x_aggregate": grad_x_aggregate,
        "grad_x_coefficients": grad_x_coefficients,
    }


def coefficient_path_gradient(inputs, values):
    """Return d x through the coefficients alone, for the coefficient gradients in `values`."""
    x = inputs["x"].clone().requires_grad_(True)
    pre, post, res = ref.coefficients(
        x, inputs["phi"], inputs["bias"], inputs["alpha_pre"], inputs["alpha_post"],
        inputs["alpha_res"], inputs["rms_epsilon"], inputs["iterations"])
    loss = ((values["pre"].grad * pre).sum() + (values["post"].grad * post).sum()
            + (values["res"].grad * res).sum())
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    loss.backward()
    return x.grad


def mistake_effects(inputs, outputs):
    """Return how far x_next moves under each common mistake, as {mistake: max |change|}.

    Every 2 x 2 doubly stochastic matrix is symmetric, so a transposed H_res only shows
    from n = 3 on. With n = 1, H_res is 1 and mixing cannot be tested.
    """
    tokens, n = outputs["pre"].shape
    if tokens == 0:
        return {}
    x = inputs["x"]
    res = outputs["res"].reshape(tokens, n, n)
    post, h_out, x_next = outputs["post"], outputs["h_out"], outputs["x_next"]

    def change(mistaken_x_next):
        return (mistaken_x_next - x_next).abs().max().item()

    effects = {"post without factor 2": change(ref.merge(res, post / 2, x, h_out))}
    if n >= 2:
        identity = torch.eye(n).expand(tokens, n, n)
        effects["H_res not applied"] = change(ref.merge(identity, post, x, h_out))
    if n >= 3:
        effects["H_res transposed"] = change(ref.merge(res.transpose(1, 2), post, x, h_out))
    return effects


def layer_arrays(inputs, outputs):
    """Return the (name, tensor) list of a layer case in file order."""
    n = ref.streams_from_coefficient_count(inputs["phi"].shape[1])
    channels = inputs["x"].shape[1] // n
    arrays = [
        ("streams", scalar(n)),
        ("channels", scalar(channels)),
        ("hidden", scalar(inputs["w1"].shape[1])),
        ("iterations", scalar(inputs["iterations"])),
        ("rms_epsilon", scalar(inputs["rms_epsilon"])),
        ("alpha_pre", scalar(inputs["alpha_pre"])),
        ("alpha_post", scalar(inputs["alpha_post"])),
        ("alpha_res", scalar(inputs["alpha_res"])),
        ("x", inputs["x"]),
        ("phi", inputs["phi"]),
        ("bias", inputs["bias"].reshape(1, -1)),
        ("w1", inputs["w1"]),
        ("b1", inputs["b1"].reshape(1, -1)),
        ("w2", inputs["w2"]),
        ("grad_x_next", inputs["grad_x_next"]),
    ]
    return arrays + list(outputs.items())


def write_layer_case(directory, stem, description, inputs, required_mistakes):
    """Evaluate, check and write one layer case, and print its one-line summary.

    `required_mistakes` names the mistakes of mistake_effects that this case must detect.
    """
    outputs = evaluate_layer(inputs)
    effects = mistake_effects(inputs, outputs)
    for mistake in required_mistakes:
        assert effects[mistake] >= MIN_MISTAKE_EFFECT, \
            f"{stem}: '{mistake}' moves x_next by only {effects[mistake]:.3g}"

    path = os.path.join(directory, stem + ".txt")
    write_arrays(path, description, layer_arrays(inputs, outputs))
    effect_text = ", ".join(f"{name} {value:.2g}" for name, value in effects.items())
    print(f"{path}: {description}; {os.path.getsize(path)} bytes; "
          f"x_next moves by {effect_text or 'nothing (T = 0)'}")


def write_random_layer_cases(directory):
    for stem, n, channels, tokens, iterations, seed in LAYER_CASES:
        inputs = random_layer_inputs(n, channels, tokens, iterations, seed)
        required = [name for name, minimum_n in
                    (("post without factor 2", 1), ("H_res not applied", 2),
                     ("H_res transposed", 3))
                    if n >= minimum_n and tokens > 0]
        description = (f"random layer: n={n} C={channels} T={tokens} "
                       f"iterations={iterations} seed={seed}")
        write_layer_case(directory, stem, description, inputs, required)


def permutation_inputs(n, channels, tokens, targets, seed):
    """Return inputs with phi = 0 and H_res close to the permutation i -> targets[i].

    Bias 10 on entry (i, targets[i]) and 0 elsewhere makes output stream i copy input
    stream targets[i] up to about exp(-10).
    """
    inputs = random_layer_inputs(n, channels, tokens, 20, seed)
    inputs["phi"] = torch.zeros_like(inputs["phi"])
    res_bias = torch.zeros(n, n)
    for i, j in enumerate(targets):
        res_bias[i, j] = 10.0
    inputs["bias"][2 * n:] = res_bias.reshape(-1)
    return inputs


def write_regression_cases(directory):
    swap = permutation_inputs(2, 5, 3, [1, 0], seed=301)
    write_layer_case(directory, "regression_swap_n2",
                     "regression: phi = 0, H_res swaps the two streams", swap,
                     ["H_res not applied", "post without factor 2"])

    cycle = permutation_inputs(4, 3, 3, [1, 2, 3, 0], seed=302)
    write_layer_case(directory, "regression_cycle_n4",
                     "regression: phi = 0, output stream i copies input stream (i+1) mod 4",
                     cycle, ["H_res transposed", "H_res not applied", "post without factor 2"])

    # H_post = 2 * sigmoid(4), about 1.96, on every stream and H_res close to the
    # identity, so x_next = x + 1.96 h_out while a missing factor 2 gives x + 0.98 h_out.
    post_factor = random_layer_inputs(4, 5, 3, 20, seed=303)
    post_factor["phi"] = torch.zeros_like(post_factor["phi"])
    post_factor["bias"][4:8] = 4.0
    post_factor["bias"][8:] = (6.0 * torch.eye(4) - 3.0).reshape(-1)
    write_layer_case(directory, "regression_post_factor_n4",
                     "regression: phi = 0, H_post about 1.96, H_res about the identity",
                     post_factor, ["post without factor 2"])

    write_small_token_case(directory)


def write_small_token_case(directory):
    """Write a case whose tokens are tiny, zero and ordinary, where rms_epsilon matters.

    Token 0 has an RMS of 1e-3, so mean(x^2) equals rms_epsilon = 1e-6 and r is off by
    a factor sqrt(2) if the epsilon is dropped or added outside the square root.
    Token 1 is all zeros, where r = sqrt(rms_epsilon) keeps the coefficients finite.
    """
    inputs = random_layer_inputs(3, 4, 3, 20, seed=304)
    token = inputs["x"][0]
    inputs["x"][0] = token / token.pow(2).mean().sqrt() * 1e-3
    inputs["x"][1] = 0.0

    def token0_coefficients(rms_epsilon):
        pre, post, res = ref.coefficients(
            inputs["x"][:1], inputs["phi"], inputs["bias"], inputs["alpha_pre"],
            inputs["alpha_post"], inputs["alpha_res"], rms_epsilon, inputs["iterations"])
        return torch.cat([pre.reshape(-1), post.reshape(-1), res.reshape(-1)])

    # Without the epsilon inside the root, r is sqrt(mean(x^2)) to within 1e-6 / 1e-3.
    change = (token0_coefficients(0.0) - token0_coefficients(inputs["rms_epsilon"])).abs().max()
    assert change >= MIN_MISTAKE_EFFECT, \
        f"regression_small_tokens_n3: dropping rms_epsilon moves a coefficient by only {change:.3g}"

    write_layer_case(directory, "regression_small_tokens_n3",
                     "regression: token 0 of RMS 1e-3, token 1 all zeros, token 2 random",
                     inputs, ["post without factor 2", "H_res transposed"])


def write_sinkhorn_cases(directory):
    """Write every Sinkhorn case to sinkhorn.txt, with arrays named n{n}_scale{s}_iter{k}.*"""
    generator = torch.Generator().manual_seed(SINKHORN_SEED)
    arrays = []
    for n in SINKHORN_STREAMS:
        for scale in SINKHORN_SCALES:
            logits = scale * torch.randn(n, n, generator=generator)
            grad_output = torch.randn(n, n, generator=generator)
            for iterations in SINKHORN_ITERATIONS:
                leaf = logits.clone().requires_grad_(True)
                output = ref.sinkhorn(leaf, iterations)
                (grad_output * output).sum().backward()
                if n >= 2:
                    distance = (output - 1.0 / n).abs().max().item()
                    assert distance >= MIN_MISTAKE_EFFECT, \
                        f"sinkhorn n={n} scale={scale}: output is nearly uniform"
                prefix = f"n{n}_scale{scale}_iter{iterations}"
                arrays += [(prefix + ".logits", logits),
                           (prefix + ".output", output),
                           (prefix + ".grad_output", grad_output),
                           (prefix + ".grad_logits", leaf.grad)]
    path = os.path.join(directory, "sinkhorn.txt")
    description = (f"Sinkhorn-Knopp: n in {SINKHORN_STREAMS}, logits N(0, scale^2) with scale "
                   f"in {SINKHORN_SCALES}, iterations in {SINKHORN_ITERATIONS}, "
                   f"seed={SINKHORN_SEED}")
    write_arrays(path, description, arrays)
    print(f"{path}: {len(arrays) // 4} cases; {os.path.getsize(path)} bytes")


def check_reference_gradients():
    """Compare autograd with finite differences on a small layer, as a self-test."""
    inputs = random_layer_inputs(3, 2, 2, 5, seed=400)
    w1, b1, w2 = inputs["w1"], inputs["b1"], inputs["w2"]

    def layer(x, phi, bias):
        return ref.layer_forward(x, phi, bias, inputs["alpha_pre"], inputs["alpha_post"],
                                 inputs["alpha_res"], inputs["rms_epsilon"],
                                 inputs["iterations"],
                                 lambda h_in: ref.mlp_branch(h_in, w1, b1, w2))["x_next"]

    arguments = tuple(inputs[name].clone().requires_grad_(True) for name in ("x", "phi", "bias"))
    assert torch.autograd.gradcheck(layer, arguments), "autograd disagrees with finite differences"


def main():
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = argparse.ArgumentParser(
        description="Write the mhc golden data files. Run with /usr/bin/python3, which has "
                    "Debian's python3-torch.")
    parser.add_argument("--output", default=os.path.join(repository, "tests", "data"),
                        help="directory for the .txt files (default: %(default)s)")
    arguments = parser.parse_args()

    os.makedirs(arguments.output, exist_ok=True)
    check_reference_gradients()
    write_random_layer_cases(arguments.output)
    write_regression_cases(arguments.output)
    write_sinkhorn_cases(arguments.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
