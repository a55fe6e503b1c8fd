"""The FW solver (sparsefw/fw.py): LMO by hand, gradient vs autograd, incremental products, line
search, brute-force optimality on tiny problems, the alpha trick and the safeguard, CUDA = CPU."""
import itertools

import pytest
import torch

from sparsefw.errors import SparseFWError
from sparsefw.fw import (fw_solve, fw_update, gradient, gram_product, lmo, reconstruction_error,
                         relative_error, row_errors, split_fixed)
from sparsefw.masks import parse_pattern, prune_mask, wanda_scores


def correlated_problem(d_out=6, d_in=8, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, n, generator=g)
    X[1::2] += 1.5 * X[0::2]          # strongly correlated feature pairs: Wanda is not optimal
    X *= torch.rand(d_in, 1, generator=g) * 2 + 0.2
    W = torch.randn(d_out, d_in, generator=g)
    return W, X @ X.T, X


def brute_force_row(w, G, k):
    best, arg = float("inf"), None
    for keep in itertools.combinations(range(len(w)), k):
        mk = torch.zeros(len(w), dtype=torch.bool)
        mk[list(keep)] = True
        r = w * ~mk
        f = float(r @ G @ r)
        if f < best:
            best, arg = f, mk
    return best, arg


def test_objective_by_hand():
    # 1x4 weight, X = identity-like activations: G = diag(1, 4, 9, 16) -> f = sum of w_j^2 G_jj pruned
    W = torch.tensor([[1.0, -3.0, 2.0, 0.5]])
    G = torch.diag(torch.tensor([1.0, 4.0, 9.0, 16.0]))
    M = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert reconstruction_error(W, G, M) == pytest.approx(9 * 4 + 0.25 * 16)
    assert relative_error(W, G, M) == pytest.approx(40 / (1 + 36 + 36 + 4))


def test_gradient_matches_autograd():
    W, G, _ = correlated_problem()
    M = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    R = W * (1 - M)
    ((R @ G) * R).sum().backward()
    assert torch.allclose(gradient(W, G, M.detach()), M.grad, rtol=1e-4, atol=1e-3)


def test_lmo_by_hand():
    g = torch.tensor([[-3.0, 1.0, -2.0, 0.5]])
    free = torch.ones(1, 4, dtype=torch.bool)
    assert lmo(g, parse_pattern("unstructured", 0.5), free, 2).tolist() == [[True, False, True, False]]
    # fixed entry 0 is excluded; budget 1 -> the next most negative
    free[0, 0] = False
    assert lmo(g, parse_pattern("unstructured", 0.5), free, 1).tolist() == [[False, False, True, False]]
    # per-matrix takes only negative gradients even with a larger budget
    g2 = torch.tensor([[-3.0, 1.0, 2.0, 0.5]])
    assert lmo(g2, parse_pattern("per-matrix", 0.5), torch.ones(1, 4, dtype=torch.bool), 3).tolist() == \
        [[True, False, False, False]]
    # 2:4: the most negative of each group of 4
    g3 = torch.tensor([[0.0, -1.0, -2.0, 3.0, -5.0, 1.0, 2.0, -0.5]])
    assert lmo(g3, parse_pattern("2:4"), torch.ones(1, 8, dtype=torch.bool), None).tolist() == \
        [[False, True, True, False, True, False, False, True]]


def test_fw_update():
    Mx = torch.tensor([1.0, 0.0, 0.5])
    fw_update(Mx, torch.tensor([False, True, True]), 0.25)
    assert torch.allclose(Mx, torch.tensor([0.75, 0.25, 0.625]))
    with pytest.raises(SparseFWError):
        fw_update(Mx, Mx, 1.5)


def test_incremental_product_equals_dense():
    W, G, _ = correlated_problem(d_out=7, d_in=12)
    V = torch.rand(7, 12, generator=torch.Generator().manual_seed(3)) > 0.6   # variable count per row
    assert torch.allclose(gram_product(W * V, G), (W * V) @ G, rtol=1e-5, atol=1e-4)
    V2 = prune_mask(torch.rand(7, 12), parse_pattern("unstructured", 0.5))     # constant count per row
    assert torch.allclose(gram_product(W * V2, G), (W * V2) @ G, rtol=1e-5, atol=1e-4)


def test_gram_product_gather_and_gemm_agree_on_compact_columns():
    W, G, _ = correlated_problem(d_out=9, d_in=16, seed=12)
    g = torch.Generator().manual_seed(2)
    E = W * (torch.rand(W.shape, generator=g) > 0.8)                   # sparse change, full width
    ref = E @ G
    assert torch.allclose(gram_product(E, G, dense_above=1.0), ref, rtol=1e-5, atol=1e-4)   # gather
    assert torch.allclose(gram_product(E, G, dense_above=0.0), ref, rtol=1e-5, atol=1e-4)   # GEMM
    cols = torch.stack([torch.randperm(16, generator=g)[:6].sort().values for _ in range(9)])
    Ec = E.gather(1, cols)                                               # compact coordinates
    full = torch.zeros_like(E).scatter_(1, cols, Ec)
    for da in (0.0, 1.0):
        assert torch.allclose(gram_product(Ec, G, cols, dense_above=da), (full @ G).gather(1, cols),
                              rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("step", ["linesearch", "pairwise", "harmonic"])
@pytest.mark.parametrize("pattern,fix", [("unstructured", "row"), ("2:4", "group"), ("2:4", "row"),
                                         ("per-matrix", "row")])
def test_incremental_solver_equals_dense_recompute(pattern, fix, step):
    # the sparse-change product updates give the same iterates as recomputing (W ⊙ (Z - Z0)) G
    W, G, _ = correlated_problem(d_out=8, d_in=12, seed=4)
    p = parse_pattern(pattern, 0.5)
    sc = wanda_scores(W, G.diagonal().sqrt())
    a = fw_solve(W, G, sc, p, alpha=0.5, iterations=40, tol=0, fix=fix, step=step, swaps=0, incremental=True)
    b = fw_solve(W, G, sc, p, alpha=0.5, iterations=40, tol=0, fix=fix, step=step, swaps=0, incremental=False)
    assert torch.equal(a.mask, b.mask)
    assert a.relaxed_error == pytest.approx(b.relaxed_error, rel=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("pattern,fix", [("unstructured", "row"), ("2:4", "row"), ("2:4", "group")])
def test_candidate_errors_are_exact(pattern, fix, alpha):
    # the candidates' products are carried from one candidate to the next (the first one from the
    # vertex product of iteration 1): the reported error of the chosen mask, with and without the
    # swaps that start from that product, is its error recomputed from scratch, in every row
    W, G, _ = correlated_problem(d_out=24, d_in=16, n=256, seed=21)
    sc = wanda_scores(W, G.diagonal().sqrt())
    p = parse_pattern(pattern, 0.5)
    for swaps in (0, 50):
        r = fw_solve(W, G, sc, p, alpha=alpha, fix=fix, iterations=12, tol=0, swaps=swaps)
        assert r.error_final == pytest.approx(relative_error(W, G, r.mask), rel=1e-5)
        assert r.error_final <= r.error_warmstart * (1 + 1e-6)


@pytest.mark.parametrize("step", ["linesearch", "pairwise"])
def test_per_row_stop_and_cap(step):
    W, G, _ = correlated_problem(d_out=16, d_in=16, n=128, seed=13)
    sc = wanda_scores(W, G.diagonal().sqrt())
    p = parse_pattern("unstructured", 0.5)
    capped = fw_solve(W, G, sc, p, alpha=0.0, iterations=3, tol=0, step=step, swaps=0)
    assert capped.at_cap == 16 and (capped.row_iterations == 3).all()
    free = fw_solve(W, G, sc, p, alpha=0.0, iterations=2000, tol=1e-2, step=step, swaps=0)
    assert free.at_cap == 0 and free.fw_gap <= 1e-2                   # every row stopped at its own gap
    assert int(free.row_iterations.min()) < int(free.row_iterations.max())   # rows stop independently
    assert free.iterations == int(free.row_iterations.max())


def test_trivial_problems_and_bad_tol():
    W, G, _ = correlated_problem(seed=14)
    sc = wanda_scores(W, G.diagonal().sqrt())
    dense = fw_solve(W, G, sc, parse_pattern("unstructured", 0.0), alpha=1.0, iterations=20)  # nothing to choose
    assert dense.mask.all() and dense.error_final == 0.0 and dense.iterations == 0
    keep_warm = fw_solve(W, G, sc, parse_pattern("unstructured", 0.5), alpha=1.0, iterations=20, swaps=0)
    assert torch.equal(keep_warm.mask, prune_mask(sc, parse_pattern("unstructured", 0.5)))
    with pytest.raises(SparseFWError, match="tol"):
        fw_solve(W, G, sc, parse_pattern("unstructured", 0.5), tol=-1)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_swaps_refine_the_fw_mask(pattern):
    W, G, _ = correlated_problem(d_out=20, d_in=16, n=256, seed=15)
    sc = wanda_scores(W, G.diagonal().sqrt())
    p = parse_pattern(pattern, 0.5)
    a = fw_solve(W, G, sc, p, iterations=30, swaps=0)
    b = fw_solve(W, G, sc, p, iterations=30, swaps=50)
    assert b.error_before_swaps == pytest.approx(a.error_final, rel=1e-6)
    assert b.error_final < a.error_final and b.swaps > 0
    assert b.error_final == pytest.approx(relative_error(W, G, b.mask), rel=1e-4)
    assert (row_errors(W, G, b.mask) <= row_errors(W, G, a.mask) * (1 + 1e-5)).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "per-matrix"])
def test_linesearch_never_increases_f(pattern):
    W, G, _ = correlated_problem(d_out=8, d_in=12, seed=5)
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, parse_pattern(pattern, 0.5), alpha=0.0, iterations=150, tol=0,
                 record_at=set(range(1, 151)))
    errs = [r.error_warmstart] + [e for _, e, _ in r.history]
    assert len(errs) > 5
    assert all(b <= a * (1 + 1e-5) + 1e-9 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < errs[0]


def test_harmonic_first_step_discards_warmstart():
    # eta_0 = 2/(0+2) = 1: the first iterate is the LMO vertex itself (the paper's rule)
    W, G, _ = correlated_problem(seed=6)
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, parse_pattern("unstructured", 0.5), alpha=0.0, iterations=1, step="harmonic", tol=0,
                 record_at={1})
    assert r.iterations == 1 and r.history[0][1] != pytest.approx(r.error_warmstart)


@pytest.mark.parametrize("d_in,sparsity", [(8, 0.5), (10, 0.6), (12, 0.5), (12, 0.75)])
def test_fw_reaches_brute_force_optimum_in_most_rows(d_in, sparsity):
    W, G, _ = correlated_problem(d_out=30, d_in=d_in, n=256, seed=d_in)
    p = parse_pattern("unstructured", sparsity)
    k = p.kept_per_row(d_in)
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, p, alpha=0.0, iterations=500, tol=0)
    wanda = prune_mask(sc, p)
    fw_rows, wanda_rows = row_errors(W, G, r.mask), row_errors(W, G, wanda)
    fw_opt = wanda_opt = 0
    for i in range(W.shape[0]):
        best, _ = brute_force_row(W[i], G, k)
        assert float(fw_rows[i]) >= best * (1 - 1e-5)
        assert float(fw_rows[i]) <= float(wanda_rows[i]) * (1 + 1e-6)     # never worse than Wanda, per row
        fw_opt += float(fw_rows[i]) <= best * (1 + 1e-5)
        wanda_opt += float(wanda_rows[i]) <= best * (1 + 1e-5)
    assert (r.mask.sum(1) == k).all()
    assert fw_opt >= 0.6 * W.shape[0], f"only {fw_opt}/{W.shape[0]} rows optimal"
    assert fw_opt > wanda_opt


def brute_force_nm_row(w, G, n, m):
    best = float("inf")
    groups = [list(itertools.combinations(range(g, g + m), n)) for g in range(0, len(w), m)]
    for choice in itertools.product(*groups):
        mk = torch.zeros(len(w), dtype=torch.bool)
        mk[[j for c in choice for j in c]] = True
        rr = w * ~mk
        best = min(best, float(rr @ G @ rr))
    return best


@pytest.mark.parametrize("fix", ["row", "group"])
def test_two_four_brute_force_and_pattern(fix):
    W, G, _ = correlated_problem(d_out=30, d_in=8, n=256, seed=11)
    p = parse_pattern("2:4")
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, p, alpha=0.0, iterations=300, tol=0, fix=fix)
    assert (r.mask.view(30, 2, 4).sum(-1) == 2).all()
    fw_rows, wanda_rows = row_errors(W, G, r.mask), row_errors(W, G, prune_mask(sc, p))
    best = [brute_force_nm_row(W[i], G, 2, 4) for i in range(30)]
    fw_opt = sum(float(fw_rows[i]) <= best[i] * (1 + 1e-5) for i in range(30))
    wanda_opt = sum(float(wanda_rows[i]) <= best[i] * (1 + 1e-5) for i in range(30))
    assert (fw_rows <= wanda_rows * (1 + 1e-6)).all()
    assert fw_opt >= 0.6 * 30 and fw_opt > wanda_opt


def test_alpha_one_returns_warmstart_and_alpha_fixing():
    W, G, _ = correlated_problem(d_out=4, d_in=8, seed=7)
    p = parse_pattern("unstructured", 0.5)
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, p, alpha=1.0, iterations=50)
    assert torch.equal(r.mask, prune_mask(sc, p))
    warm = prune_mask(sc, p)
    fixed, budget = split_fixed(warm, sc, p, 0.5)
    assert (fixed.sum(1) == 2).all() and budget == 2          # round(0.5 * 4) fixed per row
    assert (fixed & ~warm).sum() == 0                          # only warmstart-kept entries are fixed
    # the fixed ones are the highest-scoring kept ones
    for i in range(4):
        assert sc[i][fixed[i]].min() >= sc[i][warm[i] & ~fixed[i]].max()
    r2 = fw_solve(W, G, sc, p, alpha=0.5, iterations=100)
    assert (r2.mask & fixed).sum() == fixed.sum()              # fixed entries stay kept
    # 2:4 group fixing: floor(0.9 * 2) = 1 per group
    p24 = parse_pattern("2:4")
    w24 = prune_mask(sc, p24)
    fx, b = split_fixed(w24, sc, p24, 0.9, fix="group")
    assert (fx.view(4, 2, 4).sum(-1) == 1).all() and b == 1


def test_safeguard_keeps_the_better_mask():
    W, G, _ = correlated_problem(d_out=8, d_in=12, seed=8)
    sc = wanda_scores(W, G.diagonal().sqrt())
    for step in ("harmonic", "linesearch"):
        for it in (1, 3, 50):
            p = parse_pattern("unstructured", 0.5)
            r = fw_solve(W, G, sc, p, alpha=0.0, iterations=it, step=step, tol=0)
            assert r.error_final <= min(r.error_rounded, r.error_warmstart) * (1 + 1e-6)
            assert (row_errors(W, G, r.mask) <= row_errors(W, G, prune_mask(sc, p)) * (1 + 1e-6)).all()


def test_gap_stop():
    W, G, _ = correlated_problem(d_out=8, d_in=12, seed=9)
    sc = wanda_scores(W, G.diagonal().sqrt())
    r = fw_solve(W, G, sc, parse_pattern("unstructured", 0.5), alpha=0.5, iterations=5000, tol=1e-3)
    assert r.iterations < 5000 and r.fw_gap <= 1e-3


def test_bad_inputs():
    W, G, _ = correlated_problem()
    sc = wanda_scores(W, G.diagonal().sqrt())
    p = parse_pattern("unstructured", 0.5)
    with pytest.raises(SparseFWError, match="step"):
        fw_solve(W, G, sc, p, step="constant")
    with pytest.raises(SparseFWError, match="alpha"):
        fw_solve(W, G, sc, p, alpha=1.5)
    with pytest.raises(SparseFWError, match="shape"):
        fw_solve(W, G[:4, :4], sc, p)
    G2 = G.clone()
    G2[0, 0] = float("nan")
    with pytest.raises(SparseFWError, match="NaN"):
        fw_solve(W, G2, sc, p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fw_solve_on_cuda_matches_cpu(layer_64x128):
    W, G = layer_64x128
    pat = parse_pattern("unstructured", 0.5)
    scores = wanda_scores(W, torch.diagonal(G).sqrt().float())
    cpu = fw_solve(W, G.float(), scores, pat, iterations=50)
    gpu = fw_solve(W.cuda(), G.float().cuda(), scores.cuda(), pat, iterations=50)
    assert gpu.mask.device.type == "cuda"
    assert (gpu.mask.cpu() == cpu.mask).float().mean() > 0.99
    assert gpu.error_final == pytest.approx(cpu.error_final, rel=1e-2)


@pytest.mark.parametrize("pattern_s,kw", [
    ("0.5", {}), ("0.6", {"iterations": 30, "tol": 0.0}), ("2:4", {}), ("2:4", {"fix": "group"}),
    ("0.5", {"iterations": 0}), ("0.6", {"step": "pairwise", "iterations": 20}), ("0.5", {"swaps": 0})])
def test_row_blocks_give_the_same_mask(pattern_s, kw):
    """fw_solve_rows on blocks of 64 or 128 rows (the last block 5 rows) returns exactly the mask
    of the whole layer, and the summed errors agree; 197 rows, heavy-tailed inputs."""
    from sparsefw.fw import fw_solve_rows

    g = torch.Generator().manual_seed(3)
    W = torch.randn(197, 96, generator=g)
    X = torch.randn(96, 400, generator=g) * torch.rand(96, 1, generator=g) ** 3
    X[::17] *= 20.0                                          # a few outlier input channels
    G = (X @ X.T).float()
    scores = W.abs() * torch.diagonal(G).sqrt()
    pattern = parse_pattern("2:4" if ":" in pattern_s else "unstructured", float(pattern_s) if ":" not in pattern_s else 0.5)
    whole = fw_solve_rows(W, G, scores, pattern, None, **kw)
    for rows in (64, 128):
        part = fw_solve_rows(W, G, scores, pattern, rows, **kw)
        assert torch.equal(part.mask, whole.mask), rows
        assert torch.equal(part.row_iterations, whole.row_iterations)
        assert part.error_final == pytest.approx(whole.error_final, rel=1e-9)
    assert whole.error_final < whole.error_warmstart


def test_rows_per_block():
    from sparsefw.fw import SOLVER_BYTES_PER_ENTRY, rows_per_block

    assert rows_per_block((576, 1536), 4.0) == 576                        # fits: all rows
    per_gib = 2 ** 30 // (SOLVER_BYTES_PER_ENTRY * 28672)                 # 70B down_proj: 374 rows per GiB
    assert rows_per_block((8192, 28672), 4.0) == (4 * per_gib) // 64 * 64
    assert rows_per_block((8192, 28672), 0.01) == 64                      # at least one tile
    with pytest.raises(SparseFWError, match="positive number of GiB"):
        rows_per_block((8, 8), 0)
