"""Triton kernels of the fused SRNN scan: one program per tile of BLOCK_B batch rows
loops over all T steps with W_rec held on chip (loaded once, before the loop).

The per-element math mirrors csrc/srnn_neuron.h expression by expression (same order of
operations, no FMA contraction: the launcher passes enable_fp_fusion=False), so float64
spikes match the reference exactly. Scalars (b0, beta, ...) and the inexact constants of
the surrogate come from a small tensor in the state dtype, because Triton would type
Python floats as float32 and round them before a float64 computation.
"""
import triton
import triton.language as tl

# Layout of the scalar parameter tensor (state dtype) shared by both kernels; constexpr,
# since compiled kernels may read only constexpr globals.
P_B0, P_BETA, P_DT, P_RM, P_SIGMA, P_GAMMA, P_C115, P_C015, P_INV_SQRT_2PI = (tl.constexpr(i) for i in range(9))
# Sizes and strides vary from call to call; specializing on them (e.g. "divisible by 16")
# would compile a new kernel for many batch sizes and sequence lengths.
_RUNTIME_INTS = ["T", "B", "H", "NW"]


@triton.jit
def _normal_pdf(x, mu, sigma, inv_sqrt_2pi):
    z = x - mu
    return tl.exp(-(z * z) / (2 * sigma * sigma)) * (inv_sqrt_2pi / sigma)


@triton.jit
def _spike_grad(v, prm_ptr, BINARY: tl.constexpr, SURROGATE: tl.constexpr):
    """d s_t / d v_t at v = u_t - theta_t: the surrogate (binary) or the relu step."""
    if BINARY:
        sigma = tl.load(prm_ptr + P_SIGMA)
        gamma = tl.load(prm_ptr + P_GAMMA)
        inv = tl.load(prm_ptr + P_INV_SQRT_2PI)
        if SURROGATE == 0:
            g = gamma * _normal_pdf(v, 0, sigma, inv)
        else:
            wide = 6 * sigma
            g = gamma * (tl.load(prm_ptr + P_C115) * _normal_pdf(v, 0, sigma, inv)
                         - tl.load(prm_ptr + P_C015) * _normal_pdf(v, sigma, wide, inv)
                         - tl.load(prm_ptr + P_C015) * _normal_pdf(v, -sigma, wide, inv))
    else:
        g = tl.where(v > 0, 1, 0).to(v.dtype)
    return g


@triton.jit
def _load_decay(alpha_ptr, rho_ptr, prm_ptr, cols, col_ok):
    """Per-neuron decays ([1, BLOCK_H]) and the scan's scalars, as csrc/srnn_neuron.h's Decay."""
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)[None, :]
    rho = tl.load(rho_ptr + cols, mask=col_ok, other=0.0)[None, :]
    r_m = tl.load(prm_ptr + P_RM)
    return (alpha, rho, tl.load(prm_ptr + P_B0), tl.load(prm_ptr + P_BETA), tl.load(prm_ptr + P_DT), r_m,
            (1 - alpha) * r_m, 1 - rho)


@triton.jit
def _load_spikes(spk_ptr, k, rows, cols, mask, B, H, NW, BINARY: tl.constexpr, dtype: tl.constexpr):
    """s at step index k as [BLOCK_B, BLOCK_H] in ``dtype``: unpacked from the int32 bit
    words (binary) or read from the saved relu activations."""
    k64 = tl.cast(k, tl.int64)
    if BINARY:
        words = tl.load(spk_ptr + k64 * B * NW + rows[:, None] * NW + (cols // 32)[None, :], mask=mask, other=0)
        s = ((words >> (cols % 32)[None, :]) & 1).to(dtype)
    else:
        s = tl.load(spk_ptr + k64 * B * H + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(dtype)
    return s


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["xs_t", "xs_b", "xs_h"])
def scan_fwd_kernel(x_ptr, xs_t, xs_b, xs_h,  # x_proj [T, B, H], any strides, state or low-precision dtype
                    w_ptr, alpha_ptr, rho_ptr,  # [H, H], [H], [H]
                    u0_ptr, eta0_ptr, s0_ptr,  # [B, H] contiguous
                    prm_ptr,  # [9] scalars, state dtype
                    s_ptr, uT_ptr, etaT_ptr,  # out: [T, B, H], [B, H], [B, H]
                    useq_ptr, bits_ptr,  # out if SAVE: [T, B, H]; [T, B, NW] int32 (BINARY)
                    T, B, H, NW,
                    BINARY: tl.constexpr, SAVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    dtype = w_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]
    row_ok = rows < B
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]  # [BLOCK_B, BLOCK_H]
    bh = rows[:, None] * H + cols[None, :]  # offsets into a contiguous [B, H]
    BH = B * H

    # W^T [BLOCK_H, BLOCK_H]: I_t = x_t + s_{t-1} @ W^T. Zero padding keeps the tail silent.
    wt = tl.load(w_ptr + cols[None, :] * H + cols[:, None], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    alpha, rho, b0, beta, dt, r_m, in_gain, one_m_rho = _load_decay(alpha_ptr, rho_ptr, prm_ptr, cols, col_ok)

    u = tl.load(u0_ptr + bh, mask=mask, other=0.0)
    eta = tl.load(eta0_ptr + bh, mask=mask, other=0.0)
    s = tl.load(s0_ptr + bh, mask=mask, other=0.0)
    x_off = rows.to(tl.int64)[:, None] * xs_b + cols.to(tl.int64)[None, :] * xs_h
    if SAVE and BINARY:
        lane = (cols % 32)[None, :]
        word_of = (cols // 32)[None, :]
    for t in range(T):
        t64 = tl.cast(t, tl.int64)
        x = tl.load(x_ptr + t64 * xs_t + x_off, mask=mask, other=0.0).to(dtype)
        # s_{t-1} @ W^T, then + x_t as the reference adds them. The where keeps the compiler
        # from folding x_t into the dot's accumulator, which (measured with ptxas for sm_90,
        # fp32, H = 128) spills the whole program to local memory.
        current = tl.where(mask, tl.dot(s, wt, input_precision=DOT_PRECISION), 0) + x
        eta = rho * eta + one_m_rho * s
        theta = b0 + beta * eta
        u = alpha * u + in_gain * current - theta * s * dt
        v = u - theta
        if BINARY:
            s = tl.where(v > 0, 1, 0).to(dtype)
        else:
            s = tl.where(v > 0, v, 0)
        s = tl.where(mask, s, 0)  # padding rows/columns stay silent whatever b0 is
        tl.store(s_ptr + t64 * BH + bh, s, mask=mask)
        if SAVE:
            tl.store(useq_ptr + t64 * BH + bh, u, mask=mask)
            if BINARY:
                # Neuron j -> bit j % 32 of word j // 32: distinct powers of two, so the sum
                # is the bitwise or (bit 31 wraps to the sign bit as intended).
                bits = (s != 0).to(tl.int32) << lane  # [BLOCK_B, BLOCK_H]
                for w in tl.static_range(BLOCK_H // 32):
                    word = tl.sum(tl.where(word_of == w, bits, 0), axis=1)  # [BLOCK_B]
                    word_ok = tl.full([BLOCK_B], w, tl.int32) < NW  # a tensor mask (w may be a Python int)
                    tl.store(bits_ptr + t64 * B * NW + rows * NW + w, word, mask=row_ok & word_ok)
    tl.store(uT_ptr + bh, u, mask=mask)
    tl.store(etaT_ptr + bh, eta, mask=mask)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def scan_bwd_kernel(gs_ptr, guT_ptr, getaT_ptr,  # [T, B, H], [B, H], [B, H] contiguous
                    w_ptr, alpha_ptr, rho_ptr, u0_ptr, eta0_ptr, s0_ptr,
                    useq_ptr, spk_ptr,  # [T, B, H]; [T, B, NW] int32 bits (BINARY) or [T, B, H] activations
                    prm_ptr,
                    eta_ptr,  # scratch [T, B, H]: eta_t recomputed by phase 1
                    gx_ptr,  # out: dL/dI_t [T, B, H]
                    galpha_ptr, grho_ptr,  # out: per-program partial sums [num_programs, H]
                    gu0_ptr, geta0_ptr, gs0_ptr,  # out: [B, H]
                    T, B, H, NW,
                    BINARY: tl.constexpr, SURROGATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    dtype = w_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < B
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    bh = rows[:, None] * H + cols[None, :]
    BH = B * H

    # W [BLOCK_H, BLOCK_H]: dL/ds_{t-1} gets dI_t @ W.
    w = tl.load(w_ptr + cols[:, None] * H + cols[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    alpha, rho, b0, beta, dt, r_m, in_gain, one_m_rho = _load_decay(alpha_ptr, rho_ptr, prm_ptr, cols, col_ok)

    # Phase 1: eta_t forward, exactly as the forward kernel rounds it.
    eta = tl.load(eta0_ptr + bh, mask=mask, other=0.0)
    s_prev = tl.load(s0_ptr + bh, mask=mask, other=0.0)
    for t in range(T):
        eta = rho * eta + one_m_rho * s_prev
        tl.store(eta_ptr + tl.cast(t, tl.int64) * BH + bh, eta, mask=mask)
        s_prev = _load_spikes(spk_ptr, t, rows, cols, mask, B, H, NW, BINARY, dtype)
    tl.debug_barrier()  # phase 2 reads what other threads of this program stored

    # Phase 2: t = T..1 (array index k = t - 1), carrying dL/du, dL/deta and dL/ds, and the
    # forward's u_t and eta_t: step t's u_{t-1} is step t-1's u_t, so each is loaded once.
    du = tl.load(guT_ptr + bh, mask=mask, other=0.0)
    deta = tl.load(getaT_ptr + bh, mask=mask, other=0.0)
    ds = tl.zeros([BLOCK_B, BLOCK_H], dtype=dtype)
    acc_alpha = tl.zeros([BLOCK_B, BLOCK_H], dtype=dtype)
    acc_rho = tl.zeros([BLOCK_B, BLOCK_H], dtype=dtype)
    last = tl.cast(T - 1, tl.int64) * BH + bh
    u = tl.load(useq_ptr + last, mask=mask, other=0.0)
    eta = tl.load(eta_ptr + last, mask=mask, other=0.0)
    for i in range(T):
        k = T - 1 - i
        k64 = tl.cast(k, tl.int64)
        if k > 0:  # u, eta, s at step t-1 from the saved sequence; at t = 1 the initial state
            u_prev = tl.load(useq_ptr + (k64 - 1) * BH + bh, mask=mask, other=0.0)
            eta_prev = tl.load(eta_ptr + (k64 - 1) * BH + bh, mask=mask, other=0.0)
            s_prev = _load_spikes(spk_ptr, k - 1, rows, cols, mask, B, H, NW, BINARY, dtype)
        else:
            u_prev = tl.load(u0_ptr + bh, mask=mask, other=0.0)
            eta_prev = tl.load(eta0_ptr + bh, mask=mask, other=0.0)
            s_prev = tl.load(s0_ptr + bh, mask=mask, other=0.0)
        g_s = tl.load(gs_ptr + k64 * BH + bh, mask=mask, other=0.0) + ds

        theta = b0 + beta * eta
        dv = g_s * _spike_grad(u - theta, prm_ptr, BINARY, SURROGATE)
        du_t = du + dv
        dtheta = -dv - du_t * s_prev * dt
        deta_t = deta + beta * dtheta
        d_current = du_t * in_gain
        tl.store(gx_ptr + k64 * BH + bh, d_current, mask=mask)
        ds_prev = one_m_rho * deta_t - theta * dt * du_t
        # dL/dalpha times (1 - alpha); the launcher divides the sum once.
        acc_alpha += tl.where(mask, du_t * (u_prev - u - theta * s_prev * dt), 0)
        acc_rho += tl.where(mask, deta_t * (eta_prev - s_prev), 0)
        du = alpha * du_t
        deta = rho * deta_t
        u = u_prev
        eta = eta_prev
        ds = ds_prev + tl.dot(tl.where(mask, d_current, 0), w, input_precision=DOT_PRECISION)

    tl.store(gu0_ptr + bh, du, mask=mask)
    tl.store(geta0_ptr + bh, deta, mask=mask)
    tl.store(gs0_ptr + bh, ds, mask=mask)
    tl.store(galpha_ptr + pid * H + cols, tl.sum(acc_alpha, axis=0), mask=col_ok)
    tl.store(grho_ptr + pid * H + cols, tl.sum(acc_rho, axis=0), mask=col_ok)
