"""The δ-mem recurrence: reads and state updates over a run of tokens.

Per state head and per state row i (rows index value dimensions, columns key dimensions):

    read_t = S_{t-1} q_t
    s_i   <- keep_i · s_i − erase_i · (s_i·k_t) k_t + write_i · v_i k_t

Within one row this is a gated delta rule with scalar coefficients, so a run of tokens is
processed chunk by chunk in closed form (the "WY"/UT form of delta-rule attention): each row's
write amounts u_t solve a unit lower-triangular system per chunk, chunks are chained by an
associative scan over their affine state maps, and nothing loops over tokens in Python.

Shapes (float32): q, k, v [B, H, T, r]; keep, erase, write [B, H, T, g] with g = r (one
coefficient per row) or g = 1 (one per head); states [B, H, r, r].
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 16
_TINY = 1e-30  # floor for log(keep): keeps ratios of products finite when a gate saturates


def scan(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    keep: mx.array,
    erase: mx.array,
    write: mx.array,
    state: mx.array,
    *,
    all_states: bool = False,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """Reads for every token, and the final state (or, with all_states, the state after each token)."""
    B, H, T, r = q.shape
    g = keep.shape[-1]
    C = min(chunk, _next_power_of_two(T))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        q, k, v = (_pad_time(x, pad, 0.0) for x in (q, k, v))
        keep = _pad_time(keep, pad, 1.0)
        erase, write = _pad_time(erase, pad, 0.0), _pad_time(write, pad, 0.0)

    q, k, v = (x.reshape(B, H, n, C, r) for x in (q, k, v))
    # Coefficients with the row axis before time: [B, H, n, g, C].
    a, e, w = (x.reshape(B, H, n, C, g).swapaxes(-1, -2) for x in (keep, erase, write))

    log_a = mx.log(mx.maximum(a, _TINY))
    G = mx.cumsum(log_a, axis=-1)  # log of the product of keeps up to and including t
    G_prev = G - log_a  # ... up to t-1
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)
    inclusive = strict | mx.eye(C, dtype=mx.bool_)
    # Pairwise decays come from segment sums, not differences of G: with saturated gates
    # G grows large and G[t] - G[j] would lose the digits that matter.
    segments = _segment_sums(log_a, strict)  # [..., t, j] = sum of log_a over (j, t]
    decay_incl = _masked_exp(segments, inclusive)  # product of keeps over (j, t]
    decay_prev = _masked_exp(_shift_rows(segments), strict)  # ... over (j, t-1]

    kk = (k @ k.swapaxes(-1, -2))[:, :, :, None]  # [B, H, n, 1, C, C]
    system = e[..., :, None] * decay_prev * kk  # strictly lower
    inverse = unit_lower_inverse(system)

    k_rows = k[:, :, :, None]  # [B, H, n, 1, C, r]
    wv = w * v.swapaxes(-1, -2)  # [B, H, n, r, C]
    u_free = (inverse @ wv[..., None])[..., 0]  # write amounts from a zero start state
    u_from_state = inverse @ ((e * mx.exp(G_prev))[..., None] * k_rows)  # [B,H,n,g,C,r]

    # Each chunk maps its start state s to s @ M + b (row by row).
    G_last = G[..., -1:]
    decay_to_end = decay_incl[..., -1, :]  # [B, H, n, g, C]
    eye = mx.eye(r, dtype=mx.float32)
    M = mx.exp(G_last)[..., None] * eye - u_from_state.swapaxes(-1, -2) @ (
        decay_to_end[..., None] * k_rows
    )  # [B, H, n, g, r, r]
    b = ((decay_to_end * u_free)[..., None, :] @ k_rows)[..., 0, :]  # [B, H, n, r, r]
    starts, final = _chain_chunks(M, b, state)  # starts [B, H, n, r, r]

    u = u_free - (u_from_state @ starts[..., None])[..., 0]  # [B, H, n, r, C]
    qk = (q @ k.swapaxes(-1, -2))[:, :, :, None]  # [B, H, n, 1, C, C]
    reads = mx.exp(G_prev) * (starts @ q.swapaxes(-1, -2)) + (
        (decay_prev * qk) @ u[..., None]
    )[..., 0]  # [B, H, n, r, C]
    reads = reads.swapaxes(-1, -2).reshape(B, H, n * C, r)[:, :, :T]

    if not all_states:
        return reads, final
    states = mx.exp(G)[..., None] * starts[..., None, :] + decay_incl @ (
        u[..., None] * k_rows
    )  # [B, H, n, r, C, r]: row, time, column
    states = states.swapaxes(-3, -2).reshape(B, H, n * C, r, r)[:, :, :T]
    return reads, states


def unit_lower_inverse(strict_lower: mx.array) -> mx.array:
    """Inverse of I + L for strictly lower-triangular L [..., C, C], C a power of two.

    Doubles the size of the inverted diagonal blocks each round:
    inv([[A, 0], [X, D]]) = [[A⁻¹, 0], [−D⁻¹ X A⁻¹, D⁻¹]].
    """
    *batch, C, _ = strict_lower.shape
    blocks = mx.ones((*batch, C, 1, 1), dtype=strict_lower.dtype)
    size = 1
    while size < C:
        pairs = C // (2 * size)
        tiled = strict_lower.reshape(*batch, pairs, 2 * size, pairs, 2 * size)
        diagonal = mx.moveaxis(mx.diagonal(tiled, axis1=-4, axis2=-2), -1, -3)
        lower_left = diagonal[..., size:, :size]  # [..., pairs, size, size]
        upper_inv, lower_inv = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        corner = -(lower_inv @ lower_left @ upper_inv)
        top = mx.concatenate([upper_inv, mx.zeros_like(upper_inv)], axis=-1)
        bottom = mx.concatenate([corner, lower_inv], axis=-1)
        blocks = mx.concatenate([top, bottom], axis=-2)
        size *= 2
    return blocks[..., 0, :, :]


def _chain_chunks(M: mx.array, b: mx.array, state: mx.array) -> tuple[mx.array, mx.array]:
    """Start state of every chunk and the final state, by an inclusive scan of the chunk maps."""
    n = b.shape[2]
    P, c = M, b[..., None, :]  # per row: s -> s @ P + c; c as [.., r, 1, r] row vectors
    shift = 1
    while shift < n:
        P_prev, c_prev = P[:, :, :-shift], c[:, :, :-shift]
        P_cur, c_cur = P[:, :, shift:], c[:, :, shift:]
        P = mx.concatenate([P[:, :, :shift], P_prev @ P_cur], axis=2)
        c = mx.concatenate([c[:, :, :shift], c_prev @ P_cur + c_cur], axis=2)
        shift *= 2
    # Row i of the state is the row vector state[..., i, :].
    after = (state[:, :, None, :, None, :] @ P)[..., 0, :] + c[..., 0, :]  # [B, H, n, r, r]
    starts = mx.concatenate([state[:, :, None], after[:, :, :-1]], axis=2)
    return starts, after[:, :, -1]


def _segment_sums(x: mx.array, strict: mx.array) -> mx.array:
    # out[..., t, j] = sum of x[m] for j < m <= t, accumulated term by term.
    C = x.shape[-1]
    terms = mx.where(strict, mx.broadcast_to(x[..., :, None], (*x.shape, C)), 0.0)
    return mx.cumsum(terms, axis=-2)


def _shift_rows(x: mx.array) -> mx.array:
    # Row t takes row t-1; row 0 becomes zeros (it is masked out by the caller).
    return mx.concatenate([mx.zeros_like(x[..., :1, :]), x[..., :-1, :]], axis=-2)


def _masked_exp(x: mx.array, mask: mx.array) -> mx.array:
    # Mask before exp: entries above the diagonal are positive and would overflow.
    return mx.where(mask, mx.exp(mx.where(mask, x, 0.0)), 0.0)


def _pad_time(x: mx.array, pad: int, value: float) -> mx.array:
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, pad)
    return mx.pad(x, widths, constant_values=value)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
