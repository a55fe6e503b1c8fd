"""Least-squares reconstruction (sparsefw/reconstruct.py): closed-form optimum with every solver,
never worse, CG stopped early finished by Cholesky, errors."""
import pytest
import torch

from sparsefw.errors import SparseFWError
from sparsefw.fw import reconstruction_error
from sparsefw.masks import parse_pattern, prune_mask, wanda_scores
from sparsefw.reconstruct import reconstruct_layer, reconstruct_weights
from sparsefw.sparsegpt_sparsify import sparsegpt_prune


def layer_with_inputs(d_out=10, d_in=16, n=80, seed=0):
    """W (d_out, d_in) float32 and explicit X (d_in, n) float64 with correlated features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    X[1] = X[0] + 0.05 * X[1]          # nearly collinear pair
    X[2:6] += 2.0 * X[6]               # a shared component
    W = torch.randn(d_out, d_in, generator=g)
    return W, X


def output_error(W, W_new, G):
    D = W.double() - W_new.double()
    return float(((D @ G) * D).sum())


def random_mask(shape, keep, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < keep


@pytest.mark.parametrize("solver", ["cg", "cg64", "cholesky"])
def test_hand_computed_two_inputs(solver):
    # G = [[2,1],[1,2]], w = [0.1, 1], keep input 1: w_hat_1 = w_1 + G_10 w_0 / G_11 = 1.05.
    W = torch.tensor([[0.1, 1.0]])
    G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    out = reconstruct_weights(W, G, torch.tensor([[False, True]]), percdamp=0.0, solver=solver)
    assert torch.allclose(out, torch.tensor([[0.0, 1.05]]), atol=1e-7)
    # with dampening lambda = percdamp * mean(diag) = 0.5: (2.5) w1 = 2.5 * 1 + 1 * 0.1 -> 1.04
    out = reconstruct_weights(W, G, torch.tensor([[False, True]]), percdamp=0.25, solver=solver)
    assert torch.allclose(out, torch.tensor([[0.0, 1.04]]), atol=1e-7)


@pytest.mark.parametrize("solver", ["cg", "cg64", "cholesky"])
def test_equals_lstsq_on_explicit_inputs(solver):
    W, X = layer_with_inputs()
    G = X @ X.T
    mask = random_mask(W.shape, 0.5, seed=1)
    mask[3] = False                     # an empty row
    mask[4] = True                      # a full row
    out = reconstruct_weights(W, G, mask, percdamp=0.0, solver=solver, tol=1e-10)
    Y = W.double() @ X
    resid = 0.0
    for i in range(W.shape[0]):
        S = mask[i].nonzero().flatten()
        expect = torch.zeros(W.shape[1], dtype=torch.float64)
        if S.numel():
            expect[S] = torch.linalg.lstsq(X[S].T, Y[i].unsqueeze(1), driver="gelsd").solution.flatten()
        assert torch.allclose(out[i].double(), expect, rtol=1e-5, atol=1e-6), i
        resid += float((Y[i] - expect @ X).square().sum())
    assert (out[~mask] == 0).all()
    assert torch.equal(out[4], W[4]) and (out[3] == 0).all()
    # the error is the least-squares residual
    assert output_error(W, out, G) == pytest.approx(resid, rel=1e-6)


@pytest.mark.parametrize("percdamp", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("solver,maxiter", [("cholesky", 1000), ("cg", 1000), ("cg64", 1000), ("cg", 2), ("cg", 0)])
def test_brute_force_normal_equations_with_chunking(percdamp, solver, maxiter):
    # rows with different support sizes, forced into many Cholesky chunks; CG capped at 0 or 2
    # iterations hands its unconverged rows to Cholesky
    W, X = layer_with_inputs(d_out=12, d_in=10, n=40, seed=2)
    G = X @ X.T
    mask = prune_mask(W.abs(), parse_pattern("per-matrix", 0.55))
    assert mask.sum(1).unique().numel() > 2
    res = reconstruct_layer(W, G, mask, percdamp=percdamp, chunk_bytes=1, solver=solver,
                            tol=1e-10, maxiter=maxiter)
    out = res.weight
    if solver == "cg" and maxiter < 3:
        assert res.info["cg_unconverged"] > 0
    A = G + percdamp * float(torch.diagonal(G).mean()) * torch.eye(10, dtype=torch.float64)
    for i in range(12):
        S = mask[i].nonzero().flatten()
        expect = torch.zeros(10, dtype=torch.float64)
        if S.numel():
            expect[S] = torch.linalg.solve(A[S][:, S], (A @ W[i].double())[S])
        assert torch.allclose(out[i].double(), expect, rtol=1e-5, atol=1e-6), i


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.8),
                                              ("per-matrix", 0.6), ("2:4", None), ("4:8", None)])
@pytest.mark.parametrize("percdamp", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("solver", ["cg", "cg64", "cholesky"])
def test_never_above_unreconstructed_error(pattern, sparsity, percdamp, solver):
    W, X = layer_with_inputs(d_out=16, d_in=32, n=200, seed=4)
    G = X @ X.T
    p = parse_pattern(pattern, sparsity)
    mask = prune_mask(wanda_scores(W, torch.diagonal(G).sqrt()), p)
    out = reconstruct_weights(W, G, mask, percdamp=percdamp, solver=solver)
    before = output_error(W, W * mask, G)
    after = output_error(W, out, G)
    assert after <= before * (1 + 1e-9)
    assert after < 0.95 * before        # correlated inputs: reconstruction really helps
    assert (out[~mask] == 0).all()


def test_exact_optimum_beats_perturbations_and_sparsegpt():
    W, X = layer_with_inputs(d_out=8, d_in=32, n=200, seed=5)
    G = X @ X.T
    W_sgpt, mask = sparsegpt_prune(W, G, parse_pattern("2:4"))
    out = reconstruct_weights(W, G, mask, percdamp=0.0, solver="cholesky")
    best = output_error(W, out, G)
    assert best <= output_error(W, W_sgpt, G) * (1 + 1e-9)   # same support, SparseGPT's weights
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pert = out + 1e-3 * torch.randn(out.shape, generator=g) * mask
        assert output_error(W, pert, G) > best


def test_layer_report_matches_engine_errors():
    W, X = layer_with_inputs(seed=6)
    G = X @ X.T
    mask = random_mask(W.shape, 0.4, seed=7)
    res = reconstruct_layer(W, G, mask)
    assert res.error_before == pytest.approx(reconstruction_error(W, G, mask), rel=1e-6)
    assert res.error_before == pytest.approx(output_error(W, W * mask, G), rel=1e-4)
    assert res.error_after == pytest.approx(output_error(W, res.weight, G), rel=1e-4)
    assert res.relative_after < res.relative_before < 1
    assert res.seconds >= 0


def test_float_mask_and_dead_inputs():
    W, X = layer_with_inputs(seed=8)
    X[7] = 0                                           # a dead input feature
    G = X @ X.T
    mask = random_mask(W.shape, 0.5, seed=9)
    mask[:, 7] = True
    out = reconstruct_weights(W, G, mask.float(), percdamp=0.0)
    assert torch.allclose(out[:, 7], W[:, 7])          # irrelevant weight: left as it was
    assert torch.isfinite(out).all()
    ref = reconstruct_weights(W, G, mask, percdamp=0.0)
    assert torch.equal(out, ref)


def test_input_errors():
    W, X = layer_with_inputs()
    G = X @ X.T
    mask = random_mask(W.shape, 0.5, seed=1)
    with pytest.raises(SparseFWError, match="mask"):
        reconstruct_weights(W, G, mask[:, :8])
    with pytest.raises(SparseFWError, match="0/1"):
        reconstruct_weights(W, G, mask.float() * 0.5)
    with pytest.raises(SparseFWError, match="shape"):
        reconstruct_weights(W, G[:8, :8], mask)
    with pytest.raises(SparseFWError, match="NaN"):
        Gb = G.clone()
        Gb[0, 1] = float("inf")
        reconstruct_weights(W, Gb, mask)
    with pytest.raises(SparseFWError, match="percdamp"):
        reconstruct_weights(W, G, mask, percdamp=float("nan"))
    Xr = X[:, :3]                                      # rank-3 Gram, supports of size ~8
    with pytest.raises(SparseFWError, match="percdamp"):
        reconstruct_weights(W, Xr @ Xr.T, mask, percdamp=0.0, solver="cholesky")
    with pytest.raises(SparseFWError, match="solver"):
        reconstruct_weights(W, G, mask, solver="lu")
    with pytest.raises(SparseFWError, match="tol"):
        reconstruct_weights(W, G, mask, tol=0.0)


def test_cg_unconverged_rows_are_finished_by_cholesky_and_beat_the_warm_start():
    # CG capped at 1 or 3 iterations (tol 1e-14: no row converges): every row is handed to the exact
    # Cholesky finish, so the weights are Cholesky's, below the warm start W ⊙ M in the damped objective
    W, X = layer_with_inputs(d_out=6, d_in=32, n=200, seed=11)
    G = X @ X.T
    mask = random_mask(W.shape, 0.5, seed=12)
    A = G + 0.01 * float(torch.diagonal(G).mean()) * torch.eye(32, dtype=torch.float64)
    Wd = W.double()
    exact = reconstruct_weights(W, G, mask, percdamp=0.01, solver="cholesky")
    for iters in (1, 3):
        res = reconstruct_layer(W, G, mask, percdamp=0.01, solver="cg", tol=1e-14, maxiter=iters)
        assert res.info["cg_unconverged"] == 6 and res.info["cg_iterations"] == iters
        assert torch.allclose(res.weight, exact, rtol=1e-5, atol=1e-6)
        for i in range(6):  # damped objective (w - x)^T A (w - x) decreases from W ⊙ M
            d0, d1 = Wd[i] * ~mask[i], Wd[i] - res.weight[i].double()
            assert float(d1 @ A @ d1) < float(d0 @ A @ d0)


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_row_chunks_and_float32_for_wide_layers(monkeypatch, solver):
    # rows are solved in chunks of ROW_CHUNK_BYTES (here 3 rows): the same weights as one chunk;
    # above FACTOR_FLOAT64_MAX_DIM the system is float32: the same optimum to float32 precision
    import sparsefw.gram as gram
    import sparsefw.reconstruct as rec

    W, X = layer_with_inputs(d_out=12, d_in=32, n=200, seed=5)
    G = X @ X.T
    mask = prune_mask(wanda_scores(W, torch.diagonal(G).sqrt()), parse_pattern("unstructured", 0.5))
    whole = reconstruct_weights(W, G, mask, solver=solver, tol=1e-8)
    monkeypatch.setattr(rec, "ROW_CHUNK_BYTES", 3 * 16 * 32 * 8)
    chunked = reconstruct_weights(W, G, mask, solver=solver, tol=1e-8)
    assert torch.equal(chunked != 0, whole != 0)
    assert torch.allclose(chunked, whole, rtol=1e-5, atol=1e-5)       # CG stops per row at tol: float32 digits
    monkeypatch.setattr(gram, "FACTOR_FLOAT64_MAX_DIM", 16)
    narrow = reconstruct_weights(W, G.float(), mask, solver=solver, tol=1e-5)
    assert torch.equal(narrow != 0, whole != 0)
    assert output_error(W, narrow, G) == pytest.approx(output_error(W, whole, G), rel=1e-4)
    assert output_error(W, narrow, G) < 0.9 * output_error(W, W * mask, G)
