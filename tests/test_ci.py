"""Channel independence (chip.ci): fast CI vs the plain SVD definition, properties, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chip.ci import channel_independence, channel_independence_oracle, channel_rank
from chip.errors import ChipError

REL_TOL = 1e-6  # max |fast - oracle| <= REL_TOL * max CI


def _gauss(*shape):
    return torch.randn(*shape)


def _relu(*shape):
    return torch.randn(*shape).relu()


def _low_rank(n, c, length, rank):
    """Exactly rank-``rank`` C x L maps (float64 so the rank is exact)."""
    left = torch.randn(n, c, rank, dtype=torch.float64)
    return left @ torch.randn(n, rank, length, dtype=torch.float64)


def _duplicated(n, c, length):
    x = torch.randn(n, c, length).relu()
    return torch.cat([x, x[:, :2], x[:, 1:2]], dim=1)  # channel 0 twice, channel 1 three times


def _near_span(n, c, length, eps=1e-4):
    base = torch.randn(n, c, length, dtype=torch.float64)
    off = base[:, :3].sum(1, keepdim=True) + eps * torch.randn(n, 1, length, dtype=torch.float64)
    return torch.cat([base, off], dim=1)


# name -> fmaps factory, in the style of timm's parametrised model tests
CASES = {
    "gauss_4d": lambda: _gauss(2, 12, 5, 6),
    "relu_sparse_4d": lambda: _relu(3, 16, 6, 6),
    "relu_3d": lambda: _relu(2, 10, 25),
    "hw_lt_c": lambda: _relu(2, 24, 3, 3),
    "hw_lt_c_gauss": lambda: _gauss(2, 30, 2, 4),
    "low_rank": lambda: _low_rank(2, 20, 30, 3),
    "low_rank_hw_lt_c": lambda: _low_rank(2, 40, 12, 4),
    "low_rank_square": lambda: _low_rank(2, 16, 16, 5),
    "duplicated": lambda: _duplicated(2, 8, 20),
    "linear_input_nc": lambda: _relu(5, 12),
    "single_channel": lambda: _relu(3, 1, 4, 4),
    "single_channel_nc": lambda: _gauss(4, 1),
    "hw_1": lambda: _gauss(2, 6, 1, 1),
    "volume_5d": lambda: _relu(2, 8, 3, 4, 5),
    "identical_rows": lambda: torch.randn(1, 1, 20).expand(2, 30, 20).contiguous(),
    "scaled_rows": lambda: _gauss(2, 10, 30) * torch.logspace(-4, 0, 10)[None, :, None],
    # a row just off the span of three others: its null weight is tiny but resolved
    "near_span": lambda: _near_span(2, 12, 30),
    "near_span_hw_lt_c": lambda: _near_span(2, 12, 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle(case):
    fmaps = CASES[case]()
    fast = channel_independence(fmaps)
    ref = channel_independence_oracle(fmaps)
    assert fast.shape == ref.shape == fmaps.shape[:2]
    assert fast.dtype == torch.float64
    scale = ref.abs().max().item()
    assert scale > 0
    assert (fast - ref).abs().max().item() <= REL_TOL * scale


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle_to_roundoff(case):
    """The quadrature and its tail series are exact to float64 roundoff on well-posed maps."""
    fmaps = CASES[case]()
    ref = channel_independence_oracle(fmaps)
    fast = channel_independence(fmaps)
    assert (fast - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def test_float32_maps_cast_in_pieces_match_float64():
    """Float32 maps are cast to float64 a few samples at a time: same result as float64 maps."""
    fmaps = _relu(9, 8, 64, 64)  # 8 x 4096 positions: a 1 MiB float64 buffer holds 4 samples
    full = channel_independence(fmaps.double(), chunk_size=9)
    torch.testing.assert_close(
        channel_independence(fmaps, chunk_size=9), full, rtol=0, atol=1e-13 * full.max().item()
    )


def test_thread_pool_gives_the_sequential_result(monkeypatch):
    """Chunks spread over threads (also from inside inference_mode, as calibrate calls it)."""
    import chip.ci as ci

    fmaps = _relu(12, 10, 5, 5)
    monkeypatch.setattr(ci, "_workers", lambda x: 1)
    alone = channel_independence(fmaps, chunk_size=3)
    monkeypatch.setattr(ci, "_workers", lambda x: 3)
    with torch.inference_mode():
        maps = fmaps.double()
        pooled = channel_independence(maps, chunk_size=3)
    assert torch.equal(pooled, alone)


def test_single_position_closed_form_has_no_cancellation():
    """(N, C) maps: CI_i = a_i^2 / (||a|| + ||a_-i||), exact even when one channel dominates."""
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    a = torch.tensor([[1.0, 1e-9, 3e-9, 0.0, 2e-12]], dtype=torch.float64)
    out = channel_independence(a)[0]
    vals = [Decimal(v) for v in a[0].tolist()]
    total = sum(v * v for v in vals).sqrt()
    for i in range(len(vals)):
        rest = sum(u * u for j, u in enumerate(vals) if j != i).sqrt()
        want = float(total - rest)
        assert abs(out[i].item() - want) <= 1e-15 * abs(want) + 1e-300


def test_log_series_coefficients():
    from chip.ci import _log_series

    one = torch.ones(())
    # log(1 + x) = x - x^2/2 + x^3/3 - ...
    got = _log_series(one, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([1.0, -1 / 2, 1 / 3, -1 / 4]))
    # log(2 + 3x + x^2) = log 2 + log(1 + x) + log(1 + x/2)
    got = _log_series(2 * one, torch.tensor([3.0, 1.0, 0.0, 0.0]))
    want = torch.tensor([(-1.0) ** (n + 1) / n * (1 + 0.5**n) for n in range(1, 5)])
    torch.testing.assert_close(got, want)


def test_nodes_follow_the_spectrum():
    """Few nodes for well-conditioned maps; the grid reaches down to a small feature."""
    import chip.ci as ci

    def nodes(maps):
        lam, w, w0, norms = ci._spectral_weights(maps)
        live = norms > 0
        lam = lam / lam[:, -1:]
        kept = lam > 0
        p1 = w @ torch.where(kept, lam, 1.0).reciprocal().mul(kept)[..., None]
        null = w0 + (w @ (~kept).double()[..., None])[..., 0]
        return ci._u_grid(lam, null, p1[..., 0], live, maps.shape[1], maps.shape[2])

    plain = nodes(_relu(2, 16, 64).double())
    assert plain.numel() < 50 and plain[-1] == ci._U_HI
    deep = nodes(_near_span(1, 12, 30, eps=1e-5))  # smallest eigenvalue ~1e-10 of the largest
    assert deep.numel() > plain.numel() and deep[0] < plain[0] - 5


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunking_does_not_change_result(chunk_size):
    fmaps = _relu(5, 9, 4, 4)
    full = channel_independence(fmaps)
    torch.testing.assert_close(
        channel_independence(fmaps, chunk_size=chunk_size),
        full,
        rtol=0,
        atol=1e-12 * full.max().item(),
    )


def test_closed_forms():
    # orthogonal rows: singular values are the row norms, so CI_i = ||a_i||
    q, _ = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))
    norms = torch.arange(1.0, 7.0, dtype=torch.float64)
    ortho = (q.T * norms[:, None])[None]
    for fn in (channel_independence, channel_independence_oracle):
        torch.testing.assert_close(fn(ortho)[0], norms, rtol=1e-9, atol=0)
    # C identical rows b: CI = ||b|| (sqrt(C) - sqrt(C - 1))
    b = torch.randn(15, dtype=torch.float64)
    same = b.expand(1, 7, 15)
    want = torch.full((7,), b.norm().item() * (math.sqrt(7) - math.sqrt(6)), dtype=torch.float64)
    for fn in (channel_independence, channel_independence_oracle):
        torch.testing.assert_close(fn(same)[0], want, rtol=1e-9, atol=0)


def _few_live_rows(n, c, length, live):
    x = torch.zeros(n, c, length, dtype=torch.float64)
    x[:, 1 : 1 + live] = torch.randn(n, live, length, dtype=torch.float64).relu()
    return x


# HW < C cases; "essential" rows (outside the span of the others) are the hard case there
PATH_CASES = {
    "relu": lambda: _relu(2, 20, 6).double(),
    "live_rows_eq_hw": lambda: _few_live_rows(2, 12, 6, 6),
    "live_rows_lt_hw": lambda: _few_live_rows(2, 12, 6, 4),
    "low_rank": lambda: _low_rank(2, 15, 6, 3),
    "duplicated": lambda: _duplicated(2, 6, 5).double(),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_small_gram_path_matches_large_gram_path(case):
    """Appending zero pixels changes nothing but switches HW < C to the C x C Gram path."""
    fmaps = PATH_CASES[case]()
    assert fmaps.shape[2] < fmaps.shape[1]
    padded = torch.cat([fmaps, fmaps.new_zeros(*fmaps.shape[:2], fmaps.shape[1])], dim=-1)
    small, large = channel_independence(fmaps), channel_independence(padded)
    torch.testing.assert_close(small, large, rtol=0, atol=1e-11 * large.max().item())


def test_dtype_shape_and_device():
    fmaps = _relu(3, 5, 4, 4).requires_grad_()
    out = channel_independence(fmaps)
    assert out.dtype == torch.float64 and out.shape == (3, 5) and out.device == fmaps.device
    assert not out.requires_grad
    torch.testing.assert_close(out, channel_independence(fmaps.detach().double()))
    ints = torch.randint(0, 5, (2, 4, 9))
    torch.testing.assert_close(channel_independence(ints), channel_independence_oracle(ints))


def test_zero_channel_and_zero_sample_are_exactly_zero():
    fmaps = _relu(3, 6, 5, 5)
    fmaps[:, 2] = 0
    fmaps[1] = 0
    out = channel_independence(fmaps)
    assert torch.all(out[:, 2] == 0)
    assert torch.all(out[1] == 0)
    assert torch.all(out[0, [0, 1, 3, 4, 5]] > 0)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 3, 0, 3)])
def test_empty_shapes(shape):
    out = channel_independence(torch.zeros(shape))
    assert out.shape == shape[:2] and out.dtype == torch.float64 and torch.all(out == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    fmaps = _relu(2, 3, 4, 4)
    fmaps[1, 2, 0, 3] = bad
    with pytest.raises(ChipError, match="NaN or Inf"):
        channel_independence(fmaps)


@pytest.mark.parametrize("shape", [(5,), ()])
def test_wrong_ndim_raises(shape):
    with pytest.raises(ChipError, match=r"\(N, C, \*spatial\) .* or \(N, C\), got"):
        channel_independence(torch.zeros(shape))


def test_volumes_are_scored_on_their_flattened_maps():
    fmaps = _relu(2, 6, 3, 4, 5)  # (N, C, D, H, W): each channel's row has all D*H*W positions
    flat = fmaps.reshape(2, 6, 60)
    assert torch.equal(channel_independence(fmaps), channel_independence(flat))
    ref = channel_independence_oracle(flat)
    assert (channel_independence(fmaps) - ref).abs().max() <= REL_TOL * ref.abs().max()


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True, "2"])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ChipError, match="chunk_size"):
        channel_independence(_relu(2, 3, 4), chunk_size=chunk_size)


def test_complex_raises():
    with pytest.raises(ChipError, match="real"):
        channel_independence(torch.zeros(2, 3, 4, dtype=torch.complex64))


def test_duplicating_strictly_lowers_ci():
    fmaps = _relu(3, 8, 5, 5)
    before = channel_independence(fmaps)
    after = channel_independence(torch.cat([fmaps, fmaps[:, 3:4]], dim=1))
    assert torch.all(after[:, 3] < before[:, 3])
    torch.testing.assert_close(after[:, 3], after[:, 8])


# ---------------------------------------------------------------- property tests (hypothesis)


@st.composite
def _maps(draw, max_channels=6, max_length=7):
    """Small (1, C, L) float64 maps; some entries zeroed (ReLU-like sparsity)."""
    channels = draw(st.integers(1, max_channels))
    length = draw(st.integers(1, max_length))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(1, channels, length, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        x = x.relu()
    return x


def _atol(x):
    return 1e-9 * max(x.norm().item(), 1e-300)


PROPS = settings(max_examples=40, deadline=None)


@PROPS
@given(_maps())
def test_prop_bounds(x):
    ci = channel_independence(x)[0]
    row_norms = x[0].norm(dim=-1)
    assert torch.all(ci >= 0)
    assert torch.all(ci <= row_norms + _atol(x))


@PROPS
@given(_maps(), st.randoms(use_true_random=False))
def test_prop_permutation_equivariance(x, rnd):
    perm = list(range(x.shape[1]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    torch.testing.assert_close(
        channel_independence(x[:, perm]), channel_independence(x)[:, perm], rtol=0, atol=_atol(x)
    )


@PROPS
@given(_maps(), st.floats(1e-3, 1e3))
def test_prop_positive_homogeneity(x, t):
    torch.testing.assert_close(
        channel_independence(t * x), t * channel_independence(x), rtol=0, atol=t * _atol(x)
    )


@PROPS
@given(_maps(), st.data())
def test_prop_zero_channel_is_exactly_zero(x, data):
    pos = data.draw(st.integers(0, x.shape[1]))
    zero = torch.zeros(1, 1, x.shape[2], dtype=x.dtype)
    y = torch.cat([x[:, :pos], zero, x[:, pos:]], dim=1)
    ci = channel_independence(y)
    assert ci[0, pos].item() == 0.0
    keep = [i for i in range(y.shape[1]) if i != pos]
    torch.testing.assert_close(ci[:, keep], channel_independence(x), rtol=0, atol=_atol(x))


@PROPS
@given(_maps(), st.data())
def test_prop_duplicate_lowers_both_copies(x, data):
    i = data.draw(st.integers(0, x.shape[1] - 1))
    before = channel_independence(x)[0, i]
    after = channel_independence(torch.cat([x, x[:, i : i + 1]], dim=1))[0]
    assert after[i] <= before + _atol(x)
    assert after[-1] <= before + _atol(x)
    assert abs(after[i] - after[-1]) <= _atol(x)


@PROPS
@given(_maps(max_channels=5, max_length=6))
def test_prop_matches_oracle(x):
    fast = channel_independence(x)
    ref = channel_independence_oracle(x)
    assert (fast - ref).abs().max().item() <= REL_TOL * ref.max().item() + _atol(x)


# ---------------------------------------------------------------- channel_rank (HRank)


def _rank_loop(fmaps):
    out = torch.zeros(fmaps.shape[:2], dtype=torch.float64)
    for n in range(fmaps.shape[0]):
        for c in range(fmaps.shape[1]):
            out[n, c] = torch.linalg.matrix_rank(fmaps[n, c]).item()
    return out


RANK_CASES = {
    "relu_float32": lambda: _relu(3, 4, 6, 5),
    "low_rank_float64": lambda: _low_rank(6, 4, 5, 2).reshape(3, 2, 4, 5),
    "sparse": lambda: (torch.randn(2, 3, 7, 7) > 1.5).float(),
    "wide": lambda: _gauss(2, 3, 2, 9),
}


@pytest.mark.parametrize("case", sorted(RANK_CASES))
def test_channel_rank_matches_loop(case):
    fmaps = RANK_CASES[case]()
    out = channel_rank(fmaps)
    assert out.dtype == torch.float64 and out.shape == fmaps.shape[:2]
    torch.testing.assert_close(out, _rank_loop(fmaps), rtol=0, atol=0)
    torch.testing.assert_close(channel_rank(fmaps, chunk_size=1), out, rtol=0, atol=0)


def test_channel_rank_known_ranks():
    maps = torch.zeros(1, 5, 6, 6, dtype=torch.float64)
    for r in range(5):  # channel r has rank r
        for _ in range(r):
            maps[0, r] += torch.outer(
                torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
            )
    torch.testing.assert_close(channel_rank(maps)[0], torch.arange(5, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4)])
def test_channel_rank_wrong_ndim_raises(shape):
    with pytest.raises(ChipError, match=r"\(N, C, H, W\)"):
        channel_rank(torch.zeros(shape))


def test_channel_rank_non_finite_raises():
    maps = torch.zeros(1, 2, 3, 3)
    maps[0, 1, 1, 1] = float("nan")
    with pytest.raises(ChipError, match="NaN or Inf"):
        channel_rank(maps)


# ---------------------------------------------------------------- eigh routes (fake timings)


def test_choose_eigh_route_prefers_the_device_within_five_percent():
    from chip.ci import choose_eigh_route

    assert choose_eigh_route({"default": 1.0, "cusolver": 1.2, "cpu": 0.5}) == "cpu"
    assert choose_eigh_route({"default": 1.0, "cusolver": 1.2, "cpu": 0.97}) == "default"
    assert choose_eigh_route({"default": 1.0, "magma": 0.6, "cpu": 0.62}) == "magma"
    inf = float("inf")
    assert choose_eigh_route({"default": inf, "magma": inf, "cpu": 2.0}) == "cpu"


def test_eigh_router_measures_once_per_size_and_batch_bucket():
    from chip.ci import EighRouter

    # a GPU whose batched eigh falls off above n = 32: the CPU wins there
    def fake_timer(route, device, n, batch):
        calls.append((route, n, batch))
        gpu = 1e-3 if n <= 32 else 1e-3 * (n / 32) ** 3 * batch / 8
        return {"default": gpu, "cusolver": 1.5 * gpu, "magma": 2 * gpu, "cpu": 2e-4 * n}[route]

    calls = []
    router = EighRouter(timer=fake_timer)
    cuda = torch.device("cuda:0")
    assert router.route(cuda, 16, 100) == "default"
    assert router.route(cuda, 64, 100) == "cpu"
    assert len(calls) == 8 and {b for _, _, b in calls} == {128}  # batch rounded up to 2^k
    assert router.route(cuda, 64, 120) == "cpu" and len(calls) == 8  # same bucket: cached
    router.route(cuda, 64, 300)
    assert len(calls) == 12
    assert router.route(torch.device("cpu"), 64, 100) == "default" and len(calls) == 12


def test_eigh_routes_agree_on_cpu():
    from chip.ci import EIGH, EIGH_ROUTES

    a = torch.randn(5, 7, 9, dtype=torch.float64)
    gram = a @ a.mT
    lam, vecs = torch.linalg.eigh(gram)
    for fn in (EIGH, EIGH_ROUTES["cpu"], EIGH_ROUTES["default"]):
        got_lam, got_vecs = fn(gram)
        assert torch.equal(got_lam, lam) and torch.equal(got_vecs, vecs)


# ---------------------------------------------------------------- extremes (found by a newcomer)


@pytest.mark.parametrize("scale", [1e-170, 1e-160, 1e155])
@pytest.mark.parametrize("shape", [(2, 8, 16), (2, 16, 8), (2, 8)])
def test_extreme_float64_magnitudes_neither_underflow_nor_overflow(scale, shape):
    x = torch.randn(*shape, dtype=torch.float64) * scale
    ref = channel_independence_oracle(x)
    fast = channel_independence(x)
    assert (fast - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("length", [4, 16])
def test_scores_stay_within_zero_and_the_row_norm_over_twenty_decades(length):
    gen = torch.Generator().manual_seed(5)
    rows = torch.logspace(-10, 10, 8, dtype=torch.float64)[None, :, None]
    x = torch.randn(3, 8, length, generator=gen, dtype=torch.float64) * rows
    ci = channel_independence(x)
    assert torch.all(ci >= 0) and not torch.signbit(ci).any()
    assert torch.all(ci <= x.norm(dim=-1) * (1 + 1e-12))


def test_zero_maps_score_plus_zero_and_chunk_size_is_checked_on_every_path():
    for shape in [(2, 3, 4), (2, 3), (2, 3, 0)]:
        assert not torch.signbit(channel_independence(torch.zeros(shape))).any()
        with pytest.raises(ChipError, match="chunk_size"):
            channel_independence(torch.zeros(shape), chunk_size=0)
