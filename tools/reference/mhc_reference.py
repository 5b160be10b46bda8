"""Float64 PyTorch reference of one mHC layer (Manifold-Constrained Hyper-Connections).

Written directly from the equations, independently of the C++ code, so that the golden
data in tests/data can check the library. Gradients come from autograd, so they are
the exact derivatives of the same truncated computation.

Layout of the residual state of T tokens with n streams of C channels: a T x (n*C)
matrix, and token t, stream i, channel c sits at column i*C + c.

Run with /usr/bin/python3: it has Debian's python3-torch. The python3 found first on
PATH may be a build without torch.
"""

import math

import torch


def sinkhorn(logits, iterations):
    """Project exp(logits) towards the doubly stochastic matrices.

    Each of the `iterations` rounds divides every column by its sum, then every row by
    its sum, so row sums are exact and the truncation error sits in the column sums.
    `logits` is n x n or a batch ... x n x n. The loop is unrolled for autograd, which
    therefore returns the exact gradient of the truncated iteration. exp is taken
    without shifting, so logits must stay below about 700.
    """
    matrix = torch.exp(logits)
    for _ in range(iterations):
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)  # column sums
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)  # row sums
    return matrix


def streams_from_coefficient_count(count):
    """Return n such that count == n*n + 2*n, or raise ValueError."""
    streams = math.isqrt(count + 1) - 1
    if streams < 1 or streams * streams + 2 * streams != count:
        raise ValueError(f"invalid coefficient count: expected n*n + 2*n, got {count}")
    return streams


def coefficients(x, phi, bias, alpha_pre, alpha_post, alpha_res, rms_epsilon, iterations):
    """Compute H_pre, H_post and H_res of every token.

    x is T x (n*C). phi is (n*C) x (n*n + 2*n) and bias has n*n + 2*n entries, both
    ordered [pre (n) | post (n) | res (n*n)], where column 2n + i*n + j is H_res~[i][j].
    Per token:
        p = vec(x) phi,  r = sqrt(mean(vec(x)^2) + rms_epsilon)
        pre  = sigmoid(alpha_pre * p[pre] / r + bias[pre])
        post = 2 * sigmoid(alpha_post * p[post] / r + bias[post])
        res  = sinkhorn(alpha_res * p[res] / r + bias[res], reshaped n x n row-major)
    Returns (pre, post, res) of shapes T x n, T x n and T x n x n.
    """
    n = streams_from_coefficient_count(phi.shape[1])
    tokens = x.shape[0]

    projection = x @ phi  # T x (n*n + 2n), row t is vec(x_t) phi
    rms = torch.sqrt(torch.mean(x * x, dim=1, keepdim=True) + rms_epsilon)  # T x 1
    normalised = projection / rms

    pre_logits = alpha_pre * normalised[:, :n] + bias[:n]
    post_logits = alpha_post * normalised[:, n:2 * n] + bias[n:2 * n]
    res_logits = alpha_res * normalised[:, 2 * n:] + bias[2 * n:]

    pre = torch.sigmoid(pre_logits)
    post = 2.0 * torch.sigmoid(post_logits)
    res = sinkhorn(res_logits.reshape(tokens, n, n), iterations)
    return pre, post, res


def mlp_branch(h_in, w1, b1, w2):
    """Return tanh(h_in w1 + b1) w2: the T x C branch output for the T x C input.

    w1 is C x H, b1 has H entries, w2 is H x C. The C++ tests build the same branch.
    """
    return torch.tanh(h_in @ w1 + b1) @ w2


def aggregate(pre, x):
    """Return h_in[t] = sum_i pre[t, i] * x[t, stream i], a T x C matrix."""
    tokens, n = pre.shape
    streams = x.reshape(tokens, n, x.shape[1] // n)
    return torch.einsum("ti,tic->tc", pre, streams)


def merge(res, post, x, h_out):
    """Return x_next[t, stream i] = sum_j res[t, i, j] x[t, stream j] + post[t, i] h_out[t].

    res[t, i, j] weights input stream j into output stream i. The result is T x (n*C).
    """
    tokens, n = post.shape
    streams = x.reshape(tokens, n, x.shape[1] // n)
    mixed = torch.einsum("tij,tjc->tic", res, streams)
    expanded = post[:, :, None] * h_out[:, None, :]
    return (mixed + expanded).reshape(x.shape)


def layer_forward(x, phi, bias, alpha_pre, alpha_post, alpha_res, rms_epsilon, iterations,
                  branch):
    """Run one mHC layer: x_next = H_res x + H_post^T branch(H_pre x), token by token.

    Returns a dict with pre, post, res (T x n x n), h_in, h_out and x_next, so that a
    caller can retain gradients of the intermediate values.
    """
    pre, post, res = coefficients(x, phi, bias, alpha_pre, alpha_post, alpha_res,
                                  rms_epsilon, iterations)
    h_in = aggregate(pre, x)
    h_out = branch(h_in)
    x_next = merge(res, post, x, h_out)
    return {"pre": pre, "post": post, "res": res, "h_in": h_in, "h_out": h_out,
            "x_next": x_next}
