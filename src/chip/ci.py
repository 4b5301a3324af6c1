"""Channel independence (CI): the per-channel score of CHIP, as plain tensor math.

For one sample, a layer's feature maps form a ``C x HW`` matrix ``A`` (one row per channel) and

    CI_i(A) = ||A||_* - ||A_{-i}||_*

where ``||.||_*`` is the nuclear norm and ``A_{-i}`` is ``A`` with row ``i`` set to zero.

:func:`channel_independence` computes all ``C`` scores of a sample from ONE Gram matrix and ONE
symmetric eigendecomposition (instead of ``C`` SVDs), using the identity (docs/method.md section 2)

    CI_i = (1/pi) int_0^inf -log d_i(t^2) dt,    d_i(s) = w0_i + sum_k w_ik s / (l_k + s),

where ``l_k`` are the eigenvalues of ``G = A A^T``, ``w_ik = U_ik^2`` the squared eigenvector
entries and ``w0_i`` the weight of channel ``i`` on the null space of ``G`` (``0 < d_i <= 1``).
It follows from ``sqrt(x) = (2/pi) int_0^inf x / (x + t^2) dt``: the nuclear norms become
``(2/pi) int -s d/ds log det(G + sI) dt``, deleting row ``i`` multiplies ``det(G + sI)`` by
``d_i(s) / s`` (the Schur complement ``[(G + sI)^-1]_ii``), and an integration by parts leaves
the log. The integrand is non-negative, so nothing cancels, and one kernel per node suffices.
When ``HW < C`` the smaller Gram ``A^T A = V diag(l) V^T`` is used instead: then
``w_ik = (a_i . v_k)^2 / l_k`` and ``w0_i = 1 - sum_k w_ik`` (the deleted row is a rank-one
downdate of ``A^T A``); where that difference cancels (rows outside the span of the others) it is
recomputed as a sum of squares (:func:`_refine_null_weights`).

The integral is evaluated by the trapezoidal rule in ``log t`` with step ``h = 0.3``; the
integrand is analytic in a strip of half-width ``pi/2`` around the real axis (its singularities
sit at ``t = +-i sqrt(l)``, ``l`` the eigenvalues with and without row ``i``), so the rule
converges geometrically (relative error ~``4 exp(-pi^2/h)``, about 2e-14). The nodes span only
where the integrand varies: from
``e^-3`` below the smallest feature of the chunk (its smallest kept eigenvalue, or the point
``s = w0_i / sum_k(w_ik / l_k)`` where a null weight takes over) to ``e^3`` above the largest
singular value. Beyond both ends the sum is closed in form from four terms of the integrand's
series (``log d_i`` in ``s`` below the first node, in ``1/s`` above the last; each end's error
~``exp(-2 * 3 * 5)``), so a well-conditioned sample needs ~30 nodes.
The remaining error is the float64 Gram matrix itself: singular values below ~``sqrt(max(C, HW)
* eps)`` (~5e-7 at HW = 1024) of the largest are not resolved, so channels more than ~1e6 times
weaker than the strongest score with an error up to ~5e-7 of the largest singular value.
Measured against the SVD oracle: ~1e-14 relative on random, ReLU-sparse, low-rank, HW < C and
duplicated-channel maps; ~1e-7 on maps with singular values spread over nine decades or on
low-rank HW < C maps with a tiny perturbation. Float64 maps beyond 1e+-100 are scaled by a power
of two first, so their squares neither overflow nor underflow.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import time
from collections.abc import Callable, Sequence

import torch

from chip.errors import ChipError

__all__ = ["channel_independence", "channel_independence_oracle", "channel_rank"]

# Trapezoidal step in u = log(t / sigma_max); quadrature error ~ 4 exp(-pi^2 / h).
_STEP = 0.3
# Last node sits at t = sigma_max * e^_U_HI; beyond it, _SERIES_TERMS terms in 1/s.
_U_HI = 3.0
# First node sits this far (in u) below the chunk's smallest feature; below it, terms in s.
_U_LO_MARGIN = 3.0
# Terms of the tail expansions; each end's error ~ exp(-2 margin (terms + 1)).
_SERIES_TERMS = 4
# ... but never below this far under the square root of the eigenvalue cut-off.
_U_FLOOR_MARGIN = 7.0
# Null weights 1 - leverage below this are recomputed from a sum of squares (no cancellation).
_REFINE_BELOW = 1e-6
# Working-set budget (bytes of float64 temporaries) used to pick a default chunk size.
_CHUNK_BYTES = 16 * 2**20
# Float64 copies of the maps are made this many bytes at a time (stays in the CPU's cache).
_CAST_BYTES = 2**20
_TINY = torch.finfo(torch.float64).tiny

_SHAPES_HELP = "(N, C, *spatial) such as (N, C, H, W) or (N, C, D, H, W), or (N, C)"


def _as_matrices(fmaps: torch.Tensor, name: str = "fmaps") -> torch.Tensor:
    """Validate ``fmaps``' type and shape and view it as ``(N, C, HW)``.

    Finiteness is checked later on the (much smaller) Gram matrices: a NaN or Inf in the maps
    always reaches them. Raises :class:`ChipError` if invalid.
    """
    if not isinstance(fmaps, torch.Tensor):
        raise ChipError(
            f"{name} must be a torch.Tensor of shape {_SHAPES_HELP}, got {type(fmaps).__name__}"
        )
    if fmaps.ndim < 2:
        raise ChipError(
            f"{name} must have shape {_SHAPES_HELP}, got {fmaps.ndim}-D shape {tuple(fmaps.shape)}"
        )
    if fmaps.is_complex() or fmaps.dtype == torch.bool:
        raise ChipError(f"{name} must be a real floating-point tensor, got dtype {fmaps.dtype}")
    return fmaps.detach().reshape(*fmaps.shape[:2], math.prod(fmaps.shape[2:]))


def _check_finite(values: torch.Tensor, name: str = "fmaps") -> None:
    """Raise :class:`ChipError` if ``values`` (maps, or Gram matrices made from them) has NaN/Inf."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ChipError(
            f"{name} contains NaN or Inf values; expected finite feature maps "
            f"(check the model and inputs for overflow)"
        )


def _check_chunk(chunk_size: int | None) -> int | None:
    """Validate a user-given ``chunk_size`` (a positive int or ``None``)."""
    valid = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
    if chunk_size is not None and not valid:
        raise ChipError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def _default_chunk(channels: int, length: int) -> int:
    """Samples per chunk so that the float64 temporaries stay near ``_CHUNK_BYTES``.

    Large enough to amortise the ~60 small tensor operations per chunk, small enough that the
    weights and node sums stay in cache (measured on ResNet shapes: bigger is slower).
    """
    k = min(channels, length)
    maps = channels * length if length < channels else 0  # HW < C keeps a float64 copy
    per_sample = 8 * (2 * channels * k + 32 * channels + 3 * k * k + maps)
    return max(1, _CHUNK_BYTES // per_sample)


def _rel_cutoff(channels: int, length: int) -> float:
    """Eigenvalues of the Gram matrix below this fraction of the largest are treated as 0."""
    return max(channels, length) * torch.finfo(torch.float64).eps


class EighRouter:
    """Where a batch of symmetric matrices is diagonalised, chosen per size by measurement.

    On CPU it is always ``torch.linalg.eigh``. On CUDA, batched ``eigh`` has been slow for some
    sizes and releases (a per-matrix loop above n = 32 in some cuSOLVER paths), so the first call
    at each (device, n, batch size rounded up to a power of two) times every route in
    :data:`EIGH_ROUTES` on random matrices of that shape and keeps the fastest (the device's own
    routes win ties within 5 %). The choice is kept for the process.

    ``timer(route, device, n, batch)`` returns seconds; the default times 3 runs after a warm-up.
    """

    def __init__(self, timer: Callable[[str, torch.device, int, int], float] | None = None):
        self.timer = timer or time_eigh_route
        self.choices: dict[tuple[str, int, int], str] = {}

    def route(self, device: torch.device, n: int, batch: int) -> str:
        """The route for ``batch`` matrices of size ``n x n`` on ``device``."""
        device = torch.device(device)
        if device.type != "cuda":
            return "default"
        key = (str(device), n, 1 << max(0, batch - 1).bit_length())
        if key not in self.choices:
            timings = {name: self.timer(name, device, n, key[2]) for name in CUDA_EIGH_ROUTES}
            self.choices[key] = choose_eigh_route(timings)
        return self.choices[key]

    def __call__(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return EIGH_ROUTES[self.route(gram.device, gram.shape[-1], gram.shape[0])](gram)


def choose_eigh_route(timings: dict[str, float]) -> str:
    """The fastest route of ``{route: seconds}``; a device route within 5 % of it wins."""
    fastest = min(timings.values())
    on_device = [r for r in timings if r != "cpu" and timings[r] <= 1.05 * fastest]
    return min(on_device, key=timings.__getitem__) if on_device else "cpu"


def _eigh_with(library: str):
    def run(gram: torch.Tensor):
        previous = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library(library)
        try:
            return torch.linalg.eigh(gram)
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)

    return run


def _eigh_on_cpu(gram: torch.Tensor):
    lam, vecs = torch.linalg.eigh(gram.cpu())
    return lam.to(gram.device, non_blocking=True), vecs.to(gram.device, non_blocking=True)


# route name -> eigh(gram) -> (eigenvalues, eigenvectors)
EIGH_ROUTES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "default": torch.linalg.eigh,
    "cusolver": _eigh_with("cusolver"),
    "magma": _eigh_with("magma"),
    "cpu": _eigh_on_cpu,
}
CUDA_EIGH_ROUTES = ("default", "cusolver", "magma", "cpu")


def time_eigh_route(route: str, device: torch.device, n: int, batch: int) -> float:
    """Median seconds of 3 runs of ``route`` on ``batch`` random SPD ``n x n`` float64 matrices."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, n, n + 4, generator=gen, dtype=torch.float64)
    gram = (a @ a.mT).to(device)
    fn = EIGH_ROUTES[route]
    try:
        fn(gram)  # warm-up (handles, workspaces)
    except RuntimeError:  # a library this build lacks
        return math.inf
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        fn(gram)
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


EIGH = EighRouter()


def _gram_float64(x: torch.Tensor) -> torch.Tensor:
    """``A A^T`` of every sample of ``x`` (B, C, M) with ``C <= M``, in float64.

    Float32 maps are cast a few samples at a time into one reused buffer, so the copy stays in
    cache and never costs a full-size float64 copy of the chunk.
    """
    batch, channels, length = x.shape
    if x.dtype == torch.float64 or x.device.type != "cpu":
        a = x.to(torch.float64)
        return a @ a.mT
    out = torch.empty((batch, channels, channels), dtype=torch.float64)
    step = max(1, _CAST_BYTES // (8 * channels * length))
    buf = torch.empty((min(step, batch), channels, length), dtype=torch.float64)
    for start in range(0, batch, step):
        a = buf[: x[start : start + step].shape[0]].copy_(x[start : start + step])
        torch.matmul(a, a.mT, out=out[start : start + a.shape[0]])
    return out


def _spectral_weights(x: torch.Tensor):
    """Spectrum of ``A A^T`` and each channel's weights on it, for a chunk ``x`` (B, C, M).

    Returns ``(lam, w, w0, norms)``: eigenvalues ``lam`` (B, K) with values below the cut-off set
    to 0, weights ``w`` (B, C, K) with ``sum_k w[b, i, k] + w0[b, i] = 1`` (weights on the zeroed
    eigenvalues count as null weight), null weight ``w0`` (B, C), and ``norms`` (B, C), each
    channel's squared norm ``||a_i||^2`` (0 for all-zero channels). Uses the smaller of the two Gram matrices, ``K = min(C, M)``.
    """
    channels, length = x.shape[1], x.shape[2]
    if channels <= length:
        gram = _gram_float64(x)
    else:
        a = x.to(torch.float64)  # read twice (Gram, weights): cast once
        gram = a.mT @ a
    # every map entry reaches the diagonal (a sum of squares): NaN/Inf anywhere shows there
    _check_finite(gram.diagonal(dim1=-2, dim2=-1).sum(-1))
    lam, vecs = EIGH(gram)
    cutoff = lam[:, -1:].clamp(min=0) * _rel_cutoff(channels, length)
    kept = lam > cutoff
    lam = torch.where(kept, lam, torch.zeros_like(lam))
    if channels <= length:
        # w_ik = U_ik^2; the weights on the zeroed eigenvalues act as the null weight
        norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0)
        return lam, vecs.mul_(vecs), torch.zeros_like(lam), norms
    # HW < C: A = Z diag(sqrt(l)) V^T, so w_ik = Z_ik^2 with Z = A V diag(l)^(-1/2) (kept k only)
    # and w0_i = 1 - ||Z_i||^2 (one minus the leverage of row i; a rank-one downdate of A^T A).
    basis = vecs * torch.where(kept, lam, 1.0).rsqrt().mul_(kept)[:, None, :]
    w = torch.matmul(a, basis)
    w.mul_(w)  # Z squared in place; the few samples that need Z again recompute it
    lev = w.sum(-1)
    w0 = (1.0 - lev).clamp_(min=0.0)
    _refine_null_weights(a, basis, lev, w0)
    return lam, w, w0, torch.linalg.vector_norm(a, dim=-1).square_()


def _refine_null_weights(
    a: torch.Tensor, basis: torch.Tensor, lev: torch.Tensor, w0: torch.Tensor
) -> None:
    """Recompute small null weights ``w0 = 1 - lev`` without cancellation (in place).

    ``a`` (B, C, M) are the float64 maps and ``basis`` (B, M, K) is ``V diag(l)^(-1/2)``.
    ``P = Z Z^T`` projects onto the column space of ``A``, so ``P_ii - P_ii^2 = sum_{j!=i} P_ij^2``
    and ``1 - P_ii = sum_{j!=i} P_ij^2 / P_ii``: a sum of squares, exact to roundoff even where
    row ``i`` is (nearly) outside the span of the other rows and ``1 - P_ii`` would cancel.
    Only rows with ``w0 < _REFINE_BELOW`` are refined (there ``1 - P_ii`` has lost most of its
    digits); at most ``rank(A)`` rows qualify, so this costs at most one ``C x M x M`` product
    per sample and nothing at all for generic maps.
    """
    small = (w0 < _REFINE_BELOW) & (lev > 0)
    for b in torch.nonzero(small.any(-1)).flatten().tolist():
        rows = torch.nonzero(small[b]).flatten()
        z = a[b] @ basis[b]  # (C, K): Z = A V diag(l)^(-1/2) of this sample
        hat = z[rows] @ z.mT  # (R, C)
        hat[torch.arange(rows.numel(), device=z.device), rows] = 0.0
        w0[b, rows] = hat.square().sum(-1) / lev[b, rows]


def _tail_ratio(j: int) -> float:
    """``sum_{m>=1} exp(-j m h)``: a tail term decaying as ``t^j`` (or ``t^-j``) per node."""
    return math.exp(-j * _STEP) / -math.expm1(-j * _STEP)


def _log_series(a0: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Coefficients ``c_1..c_J`` (J, ...) of ``log(a0 + sum_n a_n x^n) - log(a0)``, elementwise.

    ``a0`` (...) > 0, ``coeffs`` (J, ...) holds ``a_1..a_J``. The recurrence
    ``n a0 c_n = n a_n - sum_{k<n} k c_k a_{n-k}`` (differentiate the log).
    """
    out = torch.empty_like(coeffs)
    for n in range(1, coeffs.shape[0] + 1):
        acc = n * coeffs[n - 1]
        if n > 1:
            k = torch.arange(1, n, dtype=coeffs.dtype, device=coeffs.device)
            k = k.reshape(-1, *([1] * (coeffs.dim() - 1)))
            acc = acc - (k * out[: n - 1] * coeffs[: n - 1].flip(0)).sum(0)
        out[n - 1] = acc / (n * a0)
    return out


def _u_grid(lam, null, p1, live, channels: int, length: int) -> torch.Tensor:
    """Nodes ``u_j = log(t_j / sigma_max)`` of the trapezoidal rule for one chunk.

    ``lam`` is normalised (largest eigenvalue 1 per sample). The first node lies
    ``_U_LO_MARGIN`` below the smallest feature of any sample of the chunk: its smallest kept
    eigenvalue, or ``s = w0_i / p1_i`` where a channel's null weight takes over; never lower
    than ``_U_FLOOR_MARGIN`` below the eigenvalue cut-off (features there weigh < 1e-9 of the
    scale). Both ends keep the tail expansions' ratio ``e^(-2 margin)`` per term.
    """
    smallest = torch.where(lam > 0, lam, math.inf).amin()
    feature = torch.where((null > 0) & (p1 > 0) & live, null / p1.clamp(min=_TINY), math.inf)
    feature = torch.minimum(smallest, feature.amin()).item()
    u_lo = 0.5 * math.log(_rel_cutoff(channels, length)) - _U_FLOOR_MARGIN
    if 0 < feature < math.inf:
        u_lo = max(u_lo, 0.5 * math.log(feature) - _U_LO_MARGIN)
    u_lo = min(u_lo, -_U_LO_MARGIN)
    count = math.ceil((_U_HI - u_lo) / _STEP) + 1
    return _U_HI - _STEP * torch.arange(count - 1, -1, -1, dtype=torch.float64, device=lam.device)


def _ci_chunk(x: torch.Tensor) -> torch.Tensor:
    """CI of every channel of a chunk ``x`` (B, C, M), computed in float64.

    Works in units of each sample's largest eigenvalue (``l_max = 1``, ``t = e^u``), so the
    nodes are shared by the chunk; the result is scaled back by ``sigma_max``.
    """
    channels, length = x.shape[1], x.shape[2]
    lam, w, w0, norms = _spectral_weights(x)
    live = norms > 0
    top = lam[:, -1:]
    top = torch.where(top > 0, top, torch.ones_like(top))
    lam = lam / top
    kept = lam > 0
    terms = _SERIES_TERMS
    inv = torch.where(kept, lam, 1.0).reciprocal_().mul_(kept)
    columns = [
        (~kept).to(lam.dtype)[..., None],
        inv[..., None].expand(*inv.shape, terms + 1).cumprod(-1),  # l^-1 .. l^-(J+1)
        lam[..., None].expand(*lam.shape, terms).cumprod(-1),  # l^1 .. l^J
    ]
    # (2J + 2, B, C): each moment contiguous (strided elementwise math is several times slower)
    moments = (w @ torch.cat(columns, dim=-1)).movedim(-1, 0).contiguous()
    null = w0 + moments[0]  # null weight, including the zeroed eigenvalues' weights
    # moments[j] = p_j = sum_k w_k / l_k^j (kept k, j = 1..J+1), then m_j = sum_k w_k l_k^j
    p1 = moments[1]

    u = _u_grid(lam, null, p1, live, channels, length)
    t = u.exp()  # (Q,)
    s = t.square()
    # below sigma_max: d = w0 + sum w s/(l+s); above: d - 1 = -sum w l/(l+s) (keeps its digits)
    split = int((u <= 0).sum())
    numer = torch.cat(
        [
            s[None, None, :split].expand(*lam.shape, split),
            lam[:, :, None].neg().expand(*lam.shape, u.numel() - split),
        ],
        dim=-1,
    )
    kernel = numer.div_(lam[:, :, None] + s)
    sums = w @ kernel  # (B, C, Q)
    sums[..., :split].add_(w0[:, :, None] + _TINY).log_()  # log d (zeroed eigenvalues: kernel 1)
    sums[..., split:].log1p_()  # log d
    h = _STEP
    body = sums @ t  # int log d dt = h sum_j t_j log d(t_j)

    # The tails: log d as series in s/s0 below the first node and in s_hi/s above the last.
    # Below, with a null weight w0 > 0 that the nodes resolve: d = w0 + sum_j (-1)^(j+1) p_j s^j;
    # otherwise d = s (p_1 - p_2 s + p_3 s^2 - ...), so log d = log s + log p_1 + series.
    # Above: d = 1 - sum_j (-1)^(j+1) m_j / s^j. The three series are summed at once.
    s0, t0, inv_hi = float(s[0]), float(t[0]), 1.0 / float(s[-1])
    safe_null, safe_p1 = null.clamp(min=_TINY), p1.clamp(min=_TINY)
    powers = [[-((-s0) ** n), (-s0) ** n, (-inv_hi) ** n] for n in range(1, terms + 1)]
    coeffs = torch.stack(
        [moments[1 : terms + 1], moments[2 : terms + 2], moments[terms + 2 :]], dim=1
    ).mul_(moments.new_tensor(powers)[..., None, None])  # (J, 3, B, C)
    series = _log_series(torch.stack([safe_null, safe_p1, torch.ones_like(null)]), coeffs)
    ratios = [[_tail_ratio(2 * n + 1)] * 2 + [_tail_ratio(2 * n - 1)] for n in range(1, terms + 1)]
    tails = (series * series.new_tensor(ratios)[..., None, None]).sum(0)  # (3, B, C)
    with_null = torch.log(safe_null) * _tail_ratio(1) + tails[0]
    log_steps = math.exp(-h) / math.expm1(-h) ** 2  # sum_m m e^{-mh}
    full = (torch.log(safe_p1) + math.log(s0)) * _tail_ratio(1) - 2 * h * log_steps + tails[1]
    left = t0 * torch.where((null > 0) & (p1 * s0 < null), with_null, full)
    right = float(t[-1]) * tails[2]

    scale = top.sqrt() * (-h / math.pi)
    ci = (body + left + right) * scale
    # 0 <= CI_i <= ||a_i||: roundoff at either end stays inside the bounds
    ci = torch.minimum(ci, norms.sqrt())
    return torch.where(live & (ci > 0), ci, torch.zeros_like(ci))


def _ci_single_position(a: torch.Tensor) -> torch.Tensor:
    """CI of (N, C) vectors (one position per channel, ``A`` is a column), in closed form.

    ``||A||_* = ||a||``, so ``CI_i = ||a|| - ||a_{-i}|| = a_i^2 / (||a|| + ||a_{-i}||)``, with
    ``||a_{-i}||^2`` summed from exclusive prefix and suffix sums of squares (no cancellation).
    """
    sq = a.to(torch.float64).square()
    rest = torch.zeros_like(sq)
    rest[:, 1:] = sq[:, :-1].cumsum(1)
    rest[:, :-1] += sq[:, 1:].flip(1).cumsum(1).flip(1)
    rest.sqrt_()
    total = sq.sum(1, keepdim=True).sqrt_()
    _check_finite(total)
    denom = total + rest
    return torch.where(sq > 0, sq / denom.clamp(min=_TINY), torch.zeros_like(sq))


@torch.no_grad()
def channel_independence(fmaps: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Per-sample channel independence ``CI_i = ||A||_* - ||A_{-i}||_*``.

    Args:
        fmaps: feature maps of shape (N, C, H, W), (N, C, L), (N, C, D, H, W) or any
            (N, C, *spatial) (each channel's map is flattened: the row ``A[n, i]`` has all its
            spatial positions), or (N, C) (a linear layer's input, i.e. ``HW = 1``); any real
            dtype, on any device with float64 support.
        chunk_size: samples processed at once (bounds memory); ``None`` picks one from the shape.

    Returns:
        (N, C) float64 tensor on ``fmaps``' device; ``0 <= CI[n, i] <= ||A[n, i]||_2`` and an
        all-zero channel scores exactly 0. Cost per sample: one ``K x K`` Gram product and
        eigendecomposition (``K = min(C, HW)``), plus one ``C x K x ~30`` product (and, when
        ``HW < C``, one ``C x HW x K`` product for the weights). On CPU the chunks are spread
        over ``torch.get_num_threads()`` threads (results do not depend on the thread count
        beyond float64 roundoff, ~1e-15 of the largest score).

    Raises:
        ChipError: wrong number of dimensions, complex/bool dtype, or NaN/Inf values.
    """
    x = _as_matrices(fmaps)
    n, channels, length = x.shape
    step = _check_chunk(chunk_size)
    out = torch.zeros((n, channels), dtype=torch.float64, device=x.device)
    if out.numel() == 0 or length == 0:
        return out
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if x.dtype == torch.float64:
        # squares of float64 maps can over- or underflow (lower precisions cannot): scale by a
        # power of two (exact), score, and scale back (CI is positively homogeneous)
        top = float(x.abs().amax())
        if math.isfinite(top) and top > 0 and not 1e-100 < top < 1e100:
            scale = math.ldexp(1.0, -math.frexp(top)[1])
            return channel_independence(x * scale, chunk_size=chunk_size) / scale
    if length == 1:
        return _ci_single_position(x[..., 0])
    workers = _workers(x)
    step = step or min(_default_chunk(channels, length), -(-n // workers))
    starts = range(0, n, step)
    if workers > 1 and len(starts) > 1:
        # LAPACK's batched eigh runs one matrix at a time: spread the chunks over torch's
        # intra-op thread count (torch ops release the GIL)
        inference = torch.is_inference_mode_enabled()

        def run(start: int) -> torch.Tensor:
            with torch.inference_mode(inference), torch.no_grad():
                return _ci_chunk(x[start : start + step])

        for start, scores in zip(starts, _pool(workers).map(run, starts)):
            out[start : start + step] = scores
        return out
    for start in starts:
        out[start : start + step] = _ci_chunk(x[start : start + step])
    return out


def _workers(x: torch.Tensor) -> int:
    """Chunks computed at once: torch's thread count on CPU (``torch.set_num_threads``), else 1."""
    return max(1, torch.get_num_threads()) if x.device.type == "cpu" and x.shape[0] > 1 else 1


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """One thread pool per worker count, made on first use (like torch's own pools)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="chip-ci")


@torch.no_grad()
def channel_independence_oracle(
    fmaps: torch.Tensor, channels: Sequence[int] | None = None
) -> torch.Tensor:
    """CI by its plain definition: one float64 SVD of the masked matrix per (sample, channel).

    Slow (``N * C`` SVDs); for tests and benchmarks. ``channels`` restricts the evaluation to
    those channel indices (the result then has one column per listed channel).
    """
    x = _as_matrices(fmaps).to(torch.float64)
    idx = list(range(x.shape[1])) if channels is None else [int(c) for c in channels]
    out = torch.zeros((x.shape[0], len(idx)), dtype=torch.float64, device=x.device)
    for n, a in enumerate(x):
        full = torch.linalg.svdvals(a).sum()
        for col, i in enumerate(idx):
            masked = a.clone()
            masked[i] = 0
            out[n, col] = full - torch.linalg.svdvals(masked).sum()
    return out


@torch.no_grad()
def channel_rank(fmaps: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """HRank's criterion: the matrix rank of each channel's H x W feature map.

    Args:
        fmaps: (N, C, H, W) feature maps. float32/float64 maps are ranked in their own precision
            (HRank ranks float32 maps; torch's default tolerance ``sigma_max * max(H, W) * eps``),
            other real dtypes in float64.
        chunk_size: samples processed at once; ``None`` picks one from the shape.

    Returns:
        (N, C) float64 tensor of ranks on ``fmaps``' device.
    """
    if not isinstance(fmaps, torch.Tensor) or fmaps.ndim != 4:
        shape = tuple(fmaps.shape) if isinstance(fmaps, torch.Tensor) else type(fmaps).__name__
        raise ChipError(f"fmaps must have shape (N, C, H, W) for channel_rank, got {shape}")
    _check_finite(_as_matrices(fmaps))
    maps = fmaps.detach()
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.to(torch.float64)
    n, channels, height, width = maps.shape
    out = torch.zeros((n, channels), dtype=torch.float64, device=maps.device)
    if out.numel() == 0 or height * width == 0:
        return out
    step = _check_chunk(chunk_size) or max(1, _CHUNK_BYTES // (24 * channels * height * width))
    for start in range(0, n, step):
        out[start : start + step] = torch.linalg.matrix_rank(maps[start : start + step]).double()
    return out
