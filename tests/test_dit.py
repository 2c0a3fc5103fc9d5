import pytest
import torch

from model.condition import TinyImageEncoder, decode_image, drop_condition
from model.dit import DiTConfig, SparseDiT, varlen_attention
from model.embeddings import position_embedding_3d
from model.sparse import SparseTensor


def _random_init(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _shapes(lengths, channels=16, grid=16):
    """Distinct random voxels of each shape, in random order, and their features."""
    g = torch.Generator().manual_seed(2)
    cells = [torch.randperm(grid ** 3, generator=g)[:n] for n in lengths]
    return ([torch.stack([c // grid ** 2, c // grid % grid, c % grid], 1) for c in cells],
            [torch.randn(n, channels, generator=g) for n in lengths])


def _packed(coords, feats):
    return SparseTensor.from_samples(coords, feats, ordered=False)


def test_varlen_gqa_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3]
    q = torch.randn(17, 4, 8, generator=g)
    k, v = torch.randn(17, 2, 8, generator=g), torch.randn(17, 2, 8, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = varlen_attention(q, k, v, cu, cu)
    for i in range(3):
        s = slice(int(cu[i]), int(cu[i + 1]))
        for h in range(4):
            kh, vh = k[s, h // 2], v[s, h // 2]  # query heads 0,1 share KV head 0
            ref = torch.softmax(q[s, h] @ kh.T / 8 ** 0.5, dim=-1) @ vh
            assert torch.allclose(out[s, h], ref, atol=1e-5)


def test_packed_batch_equals_shapes_alone():
    cfg = DiTConfig.named("debug")
    model = _random_init(SparseDiT(cfg)).eval()
    coords, feats = _shapes([12, 30, 7])
    x = _packed(coords, feats)
    t, cond = torch.rand(3), torch.randn(3, 5, cfg.cond_dim)
    out = model(x, t, cond)
    assert out.coords is x.coords and out.cache is x.cache  # the same tokens, the structure kept
    cu = x.cu_seqlens
    for i in range(3):
        alone = model(_packed(coords[i:i + 1], feats[i:i + 1]), t[i:i + 1], cond[i:i + 1])
        assert torch.allclose(out.feats[int(cu[i]):int(cu[i + 1])], alone.feats, atol=1e-5)


def test_adaln_zero_starts_at_zero_velocity_and_learns():
    cfg = DiTConfig.named("debug")
    model = SparseDiT(cfg)
    coords, feats = _shapes([20])
    out = model(_packed(coords, feats), torch.rand(1), torch.randn(1, 4, cfg.cond_dim)).feats
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert model.out_layer.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_gradients():
    coords, feats = _shapes([10, 14])
    x = _packed(coords, feats)
    t, cond = torch.rand(2), torch.randn(2, 3, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _random_init(SparseDiT(DiTConfig.named("debug", grad_checkpointing=ckpt)))
        model(x, t, cond).feats.pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_condition_changes_output():
    cfg = DiTConfig.named("debug")
    model = _random_init(SparseDiT(cfg)).eval()
    x = _packed(*_shapes([15]))
    t = torch.rand(1)
    a = model(x, t, torch.randn(1, 4, cfg.cond_dim)).feats
    b = model(x, t, torch.zeros(1, 4, cfg.cond_dim)).feats
    assert not torch.allclose(a, b)


def test_paper_config_size():
    cfg = DiTConfig.named("paper")
    assert (cfg.depth, cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim) == (24, 1024, 32, 2, 32)
    with torch.device("meta"):
        n = sum(p.numel() for p in SparseDiT(cfg).parameters())
    assert 4e8 < n < 6e8


def test_config_errors():
    with pytest.raises(ValueError, match="unknown DiTConfig key"):
        DiTConfig.named("debug", widht=3)
    with pytest.raises(ValueError, match="unknown DiT config"):
        DiTConfig.named("huge")
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        DiTConfig(heads=3, kv_heads=2)
    model = SparseDiT(DiTConfig.named("debug"))
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        SparseTensor.packed(torch.arange(15).view(5, 3), torch.randn(5, 16), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="duplicated"):
        SparseTensor.packed(torch.zeros(5, 3, dtype=torch.long), torch.randn(5, 16), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="SparseTensor"):
        model(torch.randn(5, 16), torch.rand(1), torch.randn(1, 2, 64))
    with pytest.raises(ValueError, match="expected t"):
        model(_packed(*_shapes([5])), torch.rand(2), torch.randn(1, 2, 64))


def test_position_embedding_distinguishes_coords():
    c = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    e = position_embedding_3d(c, 1024)
    assert e.shape == (4, 1024)
    assert torch.cdist(e, e).fill_diagonal_(1).min() > 0.1


def test_image_condition_helpers():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), 32)
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        decode_image(b"not a png", 32, name="broken.png")
    tokens = TinyImageEncoder()(img[None])
    assert tokens.shape == (1, 64, 64)
    cond = torch.ones(1000, 2, 3)
    dropped = drop_condition(cond, 0.3, torch.Generator().manual_seed(0))
    rate = float((dropped.sum(dim=(1, 2)) == 0).float().mean())
    assert 0.25 < rate < 0.35


@pytest.mark.parametrize("rank", [0, 8])
def test_grid_sparse_dit_reads_each_cell_and_the_image_per_cell(rank):
    # debug_grid16: a learned vector per cell of the 16³ latent grid, and the image's 64 tokens reach every
    # cell directly (the 64³ demo's SS-DiT over a two-level SS-VAE; docs/demo.md); rank 8: the image's
    # per-cell vector through 8 values and a shared linear
    cfg = DiTConfig.named("debug_grid16", attention="full", grid_condition_rank=rank, occupancy_subcells=0)
    assert cfg.grid_positions == 16 and cfg.grid_condition_tokens == 64
    model = _random_init(SparseDiT(cfg)).eval()
    last = model.grid_cond[-1].out_features
    assert last == 16 ** 3 * (rank or cfg.width) and (model.grid_cond_up is None) == (rank == 0)
    coords, feats = _shapes([20, 9])
    x = _packed(coords, feats)
    t, cond = torch.rand(2), torch.randn(2, 64, cfg.cond_dim)
    out = model(x, t, cond)
    cu = x.cu_seqlens
    for i in range(2):  # packed equals alone
        alone = model(_packed(coords[i:i + 1], feats[i:i + 1]), t[i:i + 1], cond[i:i + 1])
        assert torch.allclose(out.feats[int(cu[i]):int(cu[i + 1])], alone.feats, atol=1e-5)
    moved = [c.clone() for c in coords]
    moved[0][0] = (moved[0][0] + 1) % 16  # one token to another cell: its own output changes
    assert not torch.allclose(model(_packed(moved, feats), t, cond).feats[0], out.feats[0], atol=1e-4)
    other = cond.clone()
    other[:, 5] += 1.0  # one image token: every token's output changes through its cell's vector
    assert (model(x, t, other).feats - out.feats).abs().amax(1).gt(1e-6).all()
    with pytest.raises(ValueError, match="outside the 16³ grid"):
        model(_packed([torch.tensor([[16, 0, 0]])], [torch.randn(1, 16)]), t[:1], cond[:1])
    with pytest.raises(ValueError, match="64"):
        model(x, t, cond[:, :5])


@pytest.mark.gpu
def test_fused_gelu_mlp_matches_the_separate_ops(monkeypatch):
    """Inference on CUDA runs the MLP's bias + GELU(tanh) in the GEMM epilogue; training keeps the ops."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import model.sparse.attention as attention
    from model.sparse.attention import FeedForward

    monkeypatch.setattr(attention, "FUSED_GELU", True)

    torch.manual_seed(0)
    ff = FeedForward(256).cuda().to(torch.bfloat16)
    x = torch.randn(3000, 256, device="cuda", dtype=torch.bfloat16)
    want = ff.mlp(x).float()  # gradients on: the separate ops
    with torch.no_grad():
        got = ff(x).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
