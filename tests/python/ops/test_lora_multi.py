"""Many adapters in one batch at the op level (lora_segments, lora_multi_add on the CPU): each row equals lora_add of
that row with its adapter (rows without one keep the base output), heterogeneous ranks, the dropout mask of a row
the one lora_add draws for it, gradients equal to training each adapter on its rows alone, gradcheck, opcheck, and
errors that name the argument and the adapter."""

import pytest
import torch

import lorafuse

IN, OUT = 24, 20
RANKS = [2, 8, 4]


def adapters(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(r, IN, generator=g, dtype=torch.float64).to(dtype) * 0.3 for r in RANKS]
    b = [torch.randn(OUT, r, generator=g, dtype=torch.float64).to(dtype) * 0.3 for r in RANKS]
    return a, b, [0.5, 2.0, 1.25]


ROWS = torch.tensor([0, 2, -1, 1, 0, 1, -1, 2, 2, 0, 1])


def test_segments_group_rows_by_adapter_in_row_order():
    seg = lorafuse.lora_segments(ROWS, 3)
    assert seg.order.tolist() == [0, 4, 9, 3, 5, 10, 1, 7, 8, 2, 6]  # the base's rows last
    assert seg.offsets.tolist() == [0, 3, 6, 9]
    empty = lorafuse.lora_segments(torch.tensor([-1, -1, 1]), 4)  # adapters without rows: empty segments
    assert empty.order.tolist() == [2, 0, 1] and empty.offsets.tolist() == [0, 0, 1, 1, 1]


def test_segments_equal_a_stable_sort_and_have_static_shapes():
    g = torch.Generator().manual_seed(5)
    for n, t in [(1, 1), (3, 50), (7, 1000), (64, 257)]:
        rows = torch.randint(-1, n, (t,), generator=g)
        seg = lorafuse.lora_segments(rows, n)
        keys = torch.where(rows < 0, n, rows)
        assert torch.equal(seg.order, torch.sort(keys, stable=True).indices)
        counts = torch.bincount(keys, minlength=n + 1)[:n]
        assert torch.equal(seg.offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
        meta = torch.ops.lorafuse.lora_segments(rows.to("meta"), n)
        assert meta[0].shape == (t,) and meta[1].shape == (n + 1,)
    torch.library.opcheck(torch.ops.lorafuse.lora_segments.default, (ROWS, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_row_equals_lora_add_with_its_adapter(dtype):
    torch.manual_seed(1)
    x = torch.randn(ROWS.numel(), IN, dtype=dtype)
    base = torch.randn(ROWS.numel(), OUT, dtype=dtype)
    a, b, s = adapters(torch.float32 if dtype == torch.bfloat16 else dtype)
    y = lorafuse.lora_multi_add(base, x, a, b, s, lorafuse.lora_segments(ROWS, 3))
    assert y.dtype == dtype and y.shape == base.shape
    for t, i in enumerate(ROWS.tolist()):
        if i < 0:
            assert torch.equal(y[t], base[t])
            continue
        want = torch.ops.lorafuse.lora_add(base[t : t + 1], x[t : t + 1], a[i], b[i], s[i])[0]
        torch.testing.assert_close(y[t], want, rtol=1e-6, atol=1e-6)


def test_leading_dimensions_are_rows():
    torch.manual_seed(2)
    x, base = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    a, b, s = adapters()
    rows = torch.tensor([1, -1, 0, 2, 2, 1])
    y = lorafuse.lora_multi_add(base, x, a, b, s, lorafuse.lora_segments(rows, 3))
    flat = lorafuse.lora_multi_add(base.reshape(6, OUT), x.reshape(6, IN), a, b, s, lorafuse.lora_segments(rows, 3))
    assert y.shape == (2, 3, OUT) and torch.equal(y.reshape(6, OUT), flat)


def test_a_rows_dropout_mask_is_the_one_lora_add_draws_for_it():
    torch.manual_seed(3)
    x, base = torch.randn(ROWS.numel(), IN), torch.randn(ROWS.numel(), OUT)
    a, b, s = adapters()
    torch.manual_seed(7)
    y = lorafuse.lora_multi_add(base, x, a, b, s, lorafuse.lora_segments(ROWS, 3), dropout_p=0.4)
    for i in range(3):
        torch.manual_seed(7)  # the same seed: lora_add over the whole batch with adapter i
        whole = torch.ops.lorafuse.lora_add(base, x, a[i], b[i], s[i], 0.4)
        rows = (ROWS == i).nonzero().flatten()
        torch.testing.assert_close(y[rows], whole[rows], rtol=1e-6, atol=1e-6)
    torch.manual_seed(8)
    other = lorafuse.lora_multi_add(base, x, a, b, s, lorafuse.lora_segments(ROWS, 3), dropout_p=0.4)
    assert not torch.equal(other, y)  # another seed, other masks


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradients_equal_training_each_adapter_on_its_rows_alone(dropout_p):
    torch.manual_seed(4)
    x = torch.randn(ROWS.numel(), IN, dtype=torch.float64)
    base = torch.randn(ROWS.numel(), OUT, dtype=torch.float64)
    dy = torch.randn(ROWS.numel(), OUT, dtype=torch.float64)
    a, b, s = adapters(torch.float64)

    def leaves():
        return ([t.clone().requires_grad_() for t in (x, base)], [t.clone().requires_grad_() for t in a],
                [t.clone().requires_grad_() for t in b])

    (xm, bm), am, bmm = leaves()
    torch.manual_seed(9)
    y = lorafuse.lora_multi_add(bm, xm, am, bmm, s, lorafuse.lora_segments(ROWS, 3), dropout_p)
    (y * dy).sum().backward()

    (xs, bs), as_, bss = leaves()
    total = (bs * dy).sum()
    for i in range(3):  # each adapter alone over the whole batch (same seed: same masks), its rows kept
        rows = (ROWS == i).nonzero().flatten()
        torch.manual_seed(9)
        branch = torch.ops.lorafuse.lora_add(torch.zeros_like(bs), xs, as_[i], bss[i], s[i], dropout_p)
        total = total + (branch[rows] * dy[rows]).sum()
    total.backward()
    for got, want in [(xm, xs), (bm, bs)] + list(zip(am, as_)) + list(zip(bmm, bss)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    # an adapter without rows in the batch gets a zero gradient
    (xz, bz), az, bzz = leaves()
    lorafuse.lora_multi_add(bz, xz, az, bzz, s, lorafuse.lora_segments(torch.where(ROWS == 1, -1, ROWS), 3)).sum(
    ).backward()
    assert torch.count_nonzero(az[1].grad) == 0 and torch.count_nonzero(bzz[1].grad) == 0


def test_gradcheck_and_opcheck():
    torch.manual_seed(5)
    x = torch.randn(ROWS.numel(), IN, dtype=torch.float64, requires_grad=True)
    base = torch.randn(ROWS.numel(), OUT, dtype=torch.float64, requires_grad=True)
    a, b, s = adapters(torch.float64)
    a = [t.requires_grad_() for t in a]
    b = [t.requires_grad_() for t in b]
    seg = lorafuse.lora_segments(ROWS, 3)

    def f(x, base, *ab):
        return lorafuse.lora_multi_add(base, x, ab[:3], ab[3:], s, seg)

    assert torch.autograd.gradcheck(f, (x, base, *a, *b))
    torch.library.opcheck(
        torch.ops.lorafuse.lora_multi_add.default, (base, x, a, b, s, seg.order, seg.offsets, 0.0)
    )


def test_bad_input_is_named():
    x, base = torch.randn(4, IN), torch.randn(4, OUT)
    a, b, s = adapters()
    seg = lorafuse.lora_segments(torch.tensor([0, 1, 2, -1]), 3)
    with pytest.raises(ValueError, match=r"row_adapter: expected indices in \[-1, 3\).*found values from -1 to 3"):
        lorafuse.lora_segments(torch.tensor([0, 3, -1]), 3)
    with pytest.raises(ValueError, match=r"row_adapter: expected indices in \[-1, 3\).*from -2 to 0"):
        lorafuse.lora_segments(torch.tensor([0, -2]), 3)
    with pytest.raises(TypeError, match="row_adapter: expected int64"):
        lorafuse.lora_segments(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="lora_a, lora_b and scale: expected one entry per adapter, found 3, 2 and 3"):
        lorafuse.lora_multi_add(base, x, a, b[:2], s, seg)
    with pytest.raises(ValueError, match="lora_a: expected at least one adapter"):
        torch.ops.lorafuse.lora_multi_add(base, x, [], [], [], seg.order, seg.offsets, 0.0)
    bad_b = list(b)
    bad_b[1] = torch.randn(OUT + 1, RANKS[1])
    with pytest.raises(ValueError, match=r"lora_multi_add \(adapter 1\)"):
        lorafuse.lora_multi_add(base, x, a, bad_b, s, seg)
    with pytest.raises(ValueError, match="offsets: expected 4 entries"):
        torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, seg.order, seg.offsets[:3], 0.0)
    with pytest.raises(ValueError, match=r"order: expected row indices in \[0, 4\)"):
        torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, seg.order + 2, seg.offsets, 0.0)
    with pytest.raises(ValueError, match="order: a row is listed 2 times"):
        torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, torch.tensor([0, 0, 2]), seg.offsets, 0.0)
    with pytest.raises(ValueError, match="offsets: expected to run from 0 to at most order's length 4, found 0 to 5"):
        torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, seg.order, torch.tensor([0, 1, 2, 5]), 0.0)
    with pytest.raises(ValueError, match=r"order: expected at most one entry per row of x \(4 rows\), found 5"):
        torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, torch.tensor([0, 1, 2, 3, 0]), seg.offsets, 0.0)


# ---- the per-token variant (decode): lora_token_add


def test_token_add_equals_the_segmented_op_and_lora_add_per_row():
    torch.manual_seed(6)
    x, base = torch.randn(2, ROWS.numel(), IN), torch.randn(2, ROWS.numel(), OUT)
    a, b, s = adapters()
    rows = ROWS.repeat(2)
    y = lorafuse.lora_token_add(base, x, a, b, s, rows)
    seg = lorafuse.lora_multi_add(base, x, a, b, s, lorafuse.lora_segments(rows, 3))
    assert torch.equal(y, seg)
    flat_x, flat_base = x.reshape(-1, IN), base.reshape(-1, OUT)
    for t, i in enumerate(rows.tolist()):
        want = flat_base[t] if i < 0 else torch.ops.lorafuse.lora_add(
            flat_base[t : t + 1], flat_x[t : t + 1], a[i], b[i], s[i])[0]
        torch.testing.assert_close(y.reshape(-1, OUT)[t], want, rtol=1e-6, atol=1e-6)


def test_token_add_gradients_gradcheck_and_opcheck():
    torch.manual_seed(7)
    x = torch.randn(ROWS.numel(), IN, dtype=torch.float64, requires_grad=True)
    base = torch.randn(ROWS.numel(), OUT, dtype=torch.float64, requires_grad=True)
    a, b, s = adapters(torch.float64)
    a = [t.requires_grad_() for t in a]
    b = [t.requires_grad_() for t in b]

    def f(x, base, *ab):
        return lorafuse.lora_token_add(base, x, ab[:3], ab[3:], s, ROWS)

    assert torch.autograd.gradcheck(f, (x, base, *a, *b))
    # the same gradients as the segmented op
    dy = torch.randn(ROWS.numel(), OUT, dtype=torch.float64)
    grads = torch.autograd.grad((f(x, base, *a, *b) * dy).sum(), (x, base, *a, *b))
    seg = lorafuse.lora_segments(ROWS, 3)
    want = torch.autograd.grad((lorafuse.lora_multi_add(base, x, a, b, s, seg) * dy).sum(), (x, base, *a, *b))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.lorafuse.lora_token_add.default, (base, x, a, b, s, ROWS))


def test_token_add_bad_input_is_named():
    x, base = torch.randn(4, IN), torch.randn(4, OUT)
    a, b, s = adapters()
    with pytest.raises(ValueError, match=r"row_adapter: expected one adapter index per row of x \(4 rows\), found 3"):
        lorafuse.lora_token_add(base, x, a, b, s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"row_adapter: expected indices in \[-1, 3\).*from 0 to 5"):
        lorafuse.lora_token_add(base, x, a, b, s, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(TypeError, match="row_adapter: expected int64"):
        lorafuse.lora_token_add(base, x, a, b, s, torch.tensor([0, 1, 2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lora_token_add \(adapter 2\)"):
        lorafuse.lora_token_add(base, x, a, b[:2] + [torch.randn(OUT, 5)], s, torch.tensor([0, 1, 2, 2]))
    empty = lorafuse.lora_token_add(base[:0], x[:0], a, b, s, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, OUT)


# ---- CUDA (cuda/lora_multi/: segmented and per-token kernels; the CPU op is the reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cuda_kernels_match_the_cpu_op(dtype, dropout_p):
    from conftest import cuda_skip_reason

    if cuda_skip_reason() is not None:
        pytest.skip(cuda_skip_reason())
    torch.manual_seed(8)
    rows = torch.randint(-1, 4, (300,))
    ranks = [1, 16, 40, 96]
    x = torch.randn(300, 256, dtype=dtype)
    base = torch.randn(300, 200, dtype=dtype)
    a = [torch.randn(r, 256) * 0.1 for r in ranks]
    b = [torch.randn(200, r) * 0.1 for r in ranks]
    s = [0.5, 1.0, 2.0, 0.25]
    seg_cpu = lorafuse.lora_segments(rows, 4)
    seg_gpu = lorafuse.lora_segments(rows.cuda(), 4)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    xg, bg = x.cuda(), base.cuda()
    ag, bbg = [t.cuda() for t in a], [t.cuda() for t in b]
    if dropout_p == 0.0:
        want = lorafuse.lora_multi_add(base, x, a, b, s, seg_cpu)
        got = lorafuse.lora_multi_add(bg, xg, ag, bbg, s, seg_gpu)
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
        token = lorafuse.lora_token_add(bg, xg, ag, bbg, s, rows.cuda())
        torch.testing.assert_close(token.cpu(), want, rtol=tol, atol=tol)
        none = rows < 0
        assert torch.equal(got.cpu()[none], base[none])
        torch.library.opcheck(torch.ops.lorafuse.lora_token_add.default, (bg, xg, ag, bbg, s, rows.cuda()))
        return
    # dropout: the same generator state gives the same masks; the backward regenerates the forward's masks, checked by
    # linearity: the branch is linear in x and in each A, so <dA_i, A_i> and <dx, x> over adapter i's rows equal
    # <dy, y - base_out> there (any other mask in backward breaks these identities)
    xg.requires_grad_()
    ag = [t.requires_grad_() for t in ag]
    torch.cuda.manual_seed(3)
    y1 = lorafuse.lora_multi_add(bg, xg, ag, bbg, s, seg_gpu, dropout_p)
    torch.cuda.manual_seed(3)
    y2 = lorafuse.lora_multi_add(bg, xg, ag, bbg, s, seg_gpu, dropout_p)
    assert torch.equal(y1, y2)
    torch.cuda.manual_seed(4)
    assert not torch.equal(lorafuse.lora_multi_add(bg, xg, ag, bbg, s, seg_gpu, dropout_p), y1)
    dy = torch.randn(300, 200, device="cuda", dtype=torch.float64)
    (y1.double() * dy).sum().backward()
    branch = (y1.double() - bg.double()) * dy
    for i in range(4):
        mine = (rows == i).cuda()
        want = branch[mine].sum()
        torch.testing.assert_close((ag[i].grad.double() * ag[i].double()).sum(), want, rtol=5 * tol, atol=5 * tol)
        got_x = (xg.grad.double()[mine] * xg.double()[mine]).sum()
        torch.testing.assert_close(got_x, want, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_strided_segments_and_x_without_columns(device):
    """Index tensors that are views with strides read as their values (not their storage); x with no columns adds 0."""
    from conftest import cuda_skip_reason

    if device == "cuda" and cuda_skip_reason() is not None:
        pytest.skip(cuda_skip_reason())
    torch.manual_seed(9)
    x, base = torch.randn(ROWS.numel(), IN, device=device), torch.randn(ROWS.numel(), OUT, device=device)
    a, b, s = adapters()
    a, b = [t.to(device) for t in a], [t.to(device) for t in b]
    seg = lorafuse.lora_segments(ROWS.to(device), 3)
    want = lorafuse.lora_multi_add(base, x, a, b, s, seg)
    order = torch.stack([seg.order, seg.order.flip(0)], 1)[:, 0]  # the same values, stride 2
    offsets = torch.stack([seg.offsets, seg.offsets * 0 + 99], 1)[:, 0]
    assert not order.is_contiguous() and not offsets.is_contiguous()
    got = torch.ops.lorafuse.lora_multi_add(base, x, a, b, s, order, offsets, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    empty_a = [torch.randn(r, 0, device=device) for r in RANKS]
    y = torch.ops.lorafuse.lora_multi_add(base, x[:, :0], empty_a, b, s, seg.order, seg.offsets, 0.0)
    assert torch.equal(y, base)
