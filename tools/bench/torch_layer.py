#!/usr/bin/python3
"""Time an eager PyTorch implementation of one mHC layer on the CPU.

Runs the same layer as bench/layer_bench.cpp (coefficients with RMS scaling, 20 Sinkhorn-Knopp
rounds, aggregation h_in = H_pre x, merge x_next = H_res x + H_post^T h_out) on the same shapes
and thread count, and prints tokens/s per kernel, so that the speed-up of the fused C++ kernels
is a ratio of two measurements on one machine. "forward_backward" runs the forward pass with
autograd recording, then the backward pass to x, h_out, phi, the bias and the three alphas from
given gradients of x_next and h_in, as the C++ forward + backward benchmark does.

Needs PyTorch; on Debian 12 that is python3-torch 1.13 for /usr/bin/python3.

Example:
    /usr/bin/python3 tools/bench/torch_layer.py --streams 4 --channels 2048 --tokens 4096 --threads 2
"""

import argparse
import statistics
import time

import torch


def make_inputs(streams, channels, tokens, dtype):
    """Return x, h_out and the layer parameters, with phi scaled as in the C++ benchmark."""
    generator = torch.Generator().manual_seed(1)
    width = streams * channels
    count = streams * streams + 2 * streams
    x = (torch.rand(tokens, width, generator=generator) * 2 - 1).to(dtype)
    branch_output = (torch.rand(tokens, channels, generator=generator) * 2 - 1).to(dtype)
    phi = (torch.rand(width, count, generator=generator) * 2 - 1) / width ** 0.5
    bias = torch.zeros(count)
    bias[:streams] = -3.0
    bias[0] = 3.0
    bias[2 * streams:] = (6.0 * torch.eye(streams) - 3.0).reshape(-1)
    return x, branch_output, phi, bias


def prepare_branch(x, phi, bias, streams, iterations=20, rms_epsilon=1e-6, alpha=(0.01, 0.01, 0.01)):
    """Return H_pre, H_post, H_res and h_in for every token of x (T x n*C).

    alpha contains alpha_pre, alpha_post and alpha_res, as numbers or as tensors that need gradients.
    """
    tokens, width = x.shape
    channels = width // streams
    x32 = x.float() if x.dtype != torch.float64 else x
    projection = (x32 @ phi) * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + rms_epsilon)
    pre = torch.sigmoid(alpha[0] * projection[:, :streams] + bias[:streams])
    post = 2 * torch.sigmoid(alpha[1] * projection[:, streams:2 * streams] + bias[streams:2 * streams])
    logits = alpha[2] * projection + bias
    res = logits[:, 2 * streams:].reshape(tokens, streams, streams)
    mixing = torch.exp(res - res.amax(dim=1, keepdim=True))
    for _ in range(iterations):
        mixing = mixing / mixing.sum(dim=1, keepdim=True)
        mixing = mixing / mixing.sum(dim=2, keepdim=True)
    branch_input = torch.bmm(pre.unsqueeze(1), x32.view(tokens, streams, channels)).squeeze(1)
    return pre, post, mixing, branch_input.to(x.dtype)


def merge_streams(post, mixing, x, branch_output, streams):
    """Return x_next = H_res x + H_post^T h_out (T x n*C)."""
    tokens, width = x.shape
    channels = width // streams
    state = (x.float() if x.dtype != torch.float64 else x).view(tokens, streams, channels)
    output = branch_output.float() if branch_output.dtype != torch.float64 else branch_output
    mixed = torch.bmm(mixing, state) + post.unsqueeze(2) * output.unsqueeze(1)
    return mixed.reshape(tokens, width).to(x.dtype)


def forward_backward(x, branch_output, phi, bias, streams, grad_next, grad_input):
    """Run the layer with autograd and backpropagate grad_next (dL/dx_next) and grad_input (dL/dh_in).

    Returns the gradients of x, h_out, phi, the bias and the alphas.
    """
    x = x.detach().requires_grad_()
    branch_output = branch_output.detach().requires_grad_()
    phi = phi.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    alphas = torch.full((3,), 0.01, dtype=phi.dtype, requires_grad=True)
    _, post, mixing, branch_input = prepare_branch(x, phi, bias, streams, alpha=alphas)
    x_next = merge_streams(post, mixing, x, branch_output, streams)
    torch.autograd.backward([x_next, branch_input], [grad_next, grad_input])
    return x.grad, branch_output.grad, phi.grad, bias.grad, alphas.grad


def median_seconds(function, repetitions):
    function()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4, help="n, the number of residual streams")
    parser.add_argument("--channels", type=int, default=2048, help="C, the branch width")
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per call")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32",
                        help="storage type of x, h_in, h_out and x_next")
    parser.add_argument("--repetitions", type=int, default=5, help="timed runs per kernel; the median is printed")
    arguments = parser.parse_args()

    torch.set_num_threads(arguments.threads)
    dtype = getattr(torch, arguments.dtype)
    x, branch_output, phi, bias = make_inputs(arguments.streams, arguments.channels, arguments.tokens, dtype)
    if dtype == torch.float64:
        phi, bias = phi.double(), bias.double()
    n = arguments.streams

    # As in the C++ benchmark, x_next serves as dL/dx_next and h_out as dL/dh_in.
    with torch.no_grad():
        pre, post, mixing, _ = prepare_branch(x, phi, bias, n)
        grad_next = merge_streams(post, mixing, x, branch_output, n)
    kernels = {
        "prepare": lambda: prepare_branch(x, phi, bias, n),
        "merge": lambda: merge_streams(post, mixing, x, branch_output, n),
        "forward": lambda: merge_streams(*prepare_branch(x, phi, bias, n)[1:3], x, branch_output, n),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {arguments.dtype}, "
          f"n {n}, C {arguments.channels}, T {arguments.tokens}")
    for name, function in kernels.items():
        with torch.no_grad():
            seconds = median_seconds(function, arguments.repetitions)
        print(f"torch_{name}: {seconds * 1e3:.2f} ms, {arguments.tokens / seconds:.4g} tokens/s")
    seconds = median_seconds(lambda: forward_backward(x, branch_output, phi, bias, n, grad_next, branch_output),
                             arguments.repetitions)
    print(f"torch_forward_backward: {seconds * 1e3:.2f} ms, {arguments.tokens / seconds:.4g} tokens/s")


if __name__ == "__main__":
    main()
