"""SparseGPT (sparsefw/sparsegpt_sparsify.py): exact patterns, OBS update, quality vs Wanda, errors,
CUDA = CPU."""
import pytest
import torch

from sparsefw.errors import SparseFWError
from sparsefw.masks import parse_pattern, prune_mask, wanda_scores
from sparsefw.reconstruct import reconstruct_weights
from sparsefw.gram import damped_hessian
from sparsefw.sparsegpt_sparsify import sparsegpt_prune


def correlated_layer(d_out=24, d_in=64, n=512, seed=0):
    """W (d_out, d_in) float32 and G = X X^T float64 with strongly correlated input features."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    mix = torch.eye(d_in, dtype=torch.float64) + 1.5 * torch.randn(d_in, d_in, generator=g,
                                                                   dtype=torch.float64) / d_in ** 0.5
    scale = torch.exp(torch.randn(d_in, 1, generator=g, dtype=torch.float64))  # uneven feature norms
    X = scale * (mix @ Z)
    W = torch.randn(d_out, d_in, generator=g)
    return W, X @ X.T


def output_error(W, W_new, G):
    D = W.double() - W_new.double()
    return float(((D @ G.double()) * D).sum())


@pytest.mark.parametrize("pattern,sparsity,blocksize", [
    ("unstructured", 0.5, 16), ("unstructured", 0.3, 24), ("unstructured", 0.73, 64),
    ("per-matrix", 0.6, 16), ("per-matrix", 0.35, 40)])
def test_unstructured_and_per_matrix_budgets_are_exact(pattern, sparsity, blocksize):
    W, G = correlated_layer()
    p = parse_pattern(pattern, sparsity)
    W_new, mask = sparsegpt_prune(W, G, p, blocksize=blocksize)
    assert mask.dtype == torch.bool and mask.shape == W.shape and W_new.dtype == torch.float32
    if pattern == "unstructured":  # every row keeps exactly round((1-s) d_in), blocks uneven
        assert (mask.sum(1) == round((1 - sparsity) * 64)).all()
    else:
        assert int(mask.sum()) == round((1 - sparsity) * 24 * 64)
        assert mask.sum(1).unique().numel() > 1  # really chosen over the matrix, not per row
    assert (W_new[~mask] == 0).all()
    assert (W_new[mask] != 0).all()
    assert torch.isfinite(W_new).all()


def test_budget_is_spread_over_blocks_in_proportion():
    # d_in = 64, blocksize 24 -> blocks of 24, 24, 16 columns; 70% of 64 -> 45 pruned per row,
    # split 17 / 17 / 11 (round(45*24/64) = 17, round(45*48/64) - 17 = 17, 45 - 34 = 11)
    W, G = correlated_layer()
    _, mask = sparsegpt_prune(W, G, parse_pattern("unstructured", 0.7), blocksize=24)
    pruned = ~mask
    assert (pruned[:, :24].sum(1) == 17).all() and (pruned[:, 24:48].sum(1) == 17).all()
    assert (pruned[:, 48:].sum(1) == 11).all()
    # per-matrix: the whole block competes; round(0.7 * 24 * 64) = 1075 pruned -> 403/403/269
    _, mask = sparsegpt_prune(W, G, parse_pattern("per-matrix", 0.7), blocksize=24)
    pruned = ~mask
    assert [int(pruned[:, a:b].sum()) for a, b in ((0, 24), (24, 48), (48, 64))] == [403, 403, 269]


@pytest.mark.parametrize("nm,blocksize", [("2:4", 128), ("2:4", 8), ("4:8", 16), ("1:4", 4)])
def test_nm_pattern_is_exact(nm, blocksize):
    W, G = correlated_layer()
    p = parse_pattern(nm)
    W_new, mask = sparsegpt_prune(W, G, p, blocksize=blocksize)
    groups = mask.view(24, 64 // p.m, p.m).sum(-1)
    assert (groups == p.n).all()
    assert (W_new[~mask] == 0).all()


def test_obs_update_hand_computed_one_row():
    # H = [[2,1],[1,2]], w = [0.1, 1]: H^-1 = [[2,-1],[-1,2]]/3, saliencies w_j^2/[U_jj]^2 are
    # 0.01/(2/3) = 0.015 (column 0) and 1/(1/2) = 2 (column 1), so column 0 is pruned and the OBS
    # update is  delta = -w_0 H^-1[0,:] / H^-1[0,0] = -0.1 * [1, -0.5]  ->  w = [0, 1.05].
    W = torch.tensor([[0.1, 1.0]])
    G = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    W_new, mask = sparsegpt_prune(W, G, parse_pattern("unstructured", 0.5), blocksize=2,
                                  percdamp=1e-12)
    assert mask.tolist() == [[False, True]]
    assert torch.allclose(W_new, torch.tensor([[0.0, 1.05]]), atol=1e-6)


def test_one_removed_weight_equals_closed_form_obs_and_least_squares():
    # One row, one weight removed at column 0 (made tiny), blocksize = d_in: SparseGPT's update is
    # exactly the OBS update delta = -w_q H^-1[q,:] / H^-1[q,q], which is also the least-squares
    # optimum on the remaining support.
    W, G = correlated_layer(d_out=1, d_in=8, n=64, seed=3)
    W[0, 0] = 1e-4
    W_new, mask = sparsegpt_prune(W, G, parse_pattern("unstructured", 1 / 8), blocksize=8,
                                  percdamp=1e-10)
    assert mask[0].tolist() == [False] + [True] * 7
    Hinv = torch.linalg.inv(G)
    obs = W.double()[0] - W.double()[0, 0] * Hinv[0] / Hinv[0, 0]
    assert torch.allclose(W_new[0].double(), obs, rtol=1e-5, atol=1e-7)
    ls = reconstruct_weights(W, G, mask, percdamp=0.0, solver="cholesky")
    assert torch.allclose(W_new, ls, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.6),
                                              ("2:4", None), ("4:8", None)])
def test_error_below_wanda_on_correlated_inputs(pattern, sparsity):
    W, G = correlated_layer()
    p = parse_pattern(pattern, sparsity)
    W_new, _ = sparsegpt_prune(W, G, p)
    wanda = prune_mask(wanda_scores(W, torch.diagonal(G).sqrt()), p)
    e_wanda = output_error(W, W * wanda, G)
    e_sgpt = output_error(W, W_new, G)
    assert e_sgpt < 0.9 * e_wanda


def test_zero_sparsity_keeps_weights():
    W, G = correlated_layer()
    W_new, mask = sparsegpt_prune(W, G, parse_pattern("unstructured", 0.0))
    assert mask.all() and torch.equal(W_new, W)


def test_dead_inputs_are_zeroed_and_budget_still_exact():
    W, G = correlated_layer()
    G[5, :] = 0
    G[:, 5] = 0
    W_new, mask = sparsegpt_prune(W, G, parse_pattern("unstructured", 0.5), blocksize=16)
    assert (mask.sum(1) == 32).all()
    assert (W_new[:, 5] == 0).all() and torch.isfinite(W_new).all()
    H, dead, lam = damped_hessian(G, 0.01)
    assert dead.nonzero().flatten().tolist() == [5] and H[5, 5] == 1 + lam


def test_input_errors():
    W, G = correlated_layer(d_in=12)
    p = parse_pattern("unstructured", 0.5)
    with pytest.raises(SparseFWError, match="shape"):
        sparsegpt_prune(W, G[:10, :10], p)
    with pytest.raises(SparseFWError, match="NaN"):
        Wn = W.clone()
        Wn[0, 0] = float("nan")
        sparsegpt_prune(Wn, G, p)
    with pytest.raises(SparseFWError, match="multiple of 8"):
        sparsegpt_prune(W, G, parse_pattern("4:8"))
    with pytest.raises(SparseFWError, match="blocksize"):
        sparsegpt_prune(W, G, parse_pattern("2:4"), blocksize=6)
    with pytest.raises(SparseFWError, match="blocksize"):
        sparsegpt_prune(W, G, p, blocksize=0)
    with pytest.raises(SparseFWError, match="percdamp"):
        sparsegpt_prune(W, G, p, percdamp=-0.1)
    v = torch.ones(12, 1, dtype=torch.float64)
    with pytest.raises(SparseFWError, match="percdamp"):  # rank-1 Gram, no dampening
        sparsegpt_prune(W, v @ v.T, p, percdamp=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparsegpt_on_cuda_matches_cpu(layer_64x128):
    W, G = layer_64x128
    pat = parse_pattern("unstructured", 0.5)
    Wc, Mc = sparsegpt_prune(W, G, pat)
    Wg, Mg = sparsegpt_prune(W.cuda(), G.cuda(), pat)
    assert torch.allclose(Wg.cpu(), Wc, atol=1e-4) and torch.equal(Mg.cpu(), Mc)


def test_wide_layers_factor_in_float32(monkeypatch):
    # above FACTOR_FLOAT64_MAX_DIM, G is factored in float32 as in the reference SparseGPT: on a
    # well-conditioned layer the mask equals the float64 one and the weights agree to float32 precision
    import sparsefw.gram as gram

    W, G = correlated_layer()
    assert gram.factor_dtype(W.shape[1]) == torch.float64
    p = parse_pattern("unstructured", 0.5)
    W64, m64 = sparsegpt_prune(W, G, p, blocksize=16)
    monkeypatch.setattr(gram, "FACTOR_FLOAT64_MAX_DIM", W.shape[1] - 1)
    assert gram.factor_dtype(W.shape[1]) == torch.float32 and gram.factor_dtype(W.shape[1] - 1) == torch.float64
    W32, m32 = sparsegpt_prune(W, G.float(), p, blocksize=16)
    assert torch.equal(m32, m64) and (m32.sum(1) == 32).all()
    assert torch.allclose(W32, W64, rtol=1e-4, atol=1e-5) and not torch.equal(W32, W64)
    assert output_error(W, W32, G) == pytest.approx(output_error(W, W64, G), rel=1e-4)
