"""GR model: KV cache equals recomputation, causality, text padding, presets within 10% of GR-2's family."""

import pytest
import torch

from gr.config import PRESET_TARGETS, ClipSpec, GRModelConfig, TrunkConfig
from gr.model import GRModel


def tiny(num_history=2, **trunk):
    cfg = GRModelConfig(trunk=TrunkConfig(num_layers=2, num_heads=2, width=32, **trunk),
                        clip=ClipSpec(num_history=num_history, image_size=32), max_text_tokens=8)
    torch.manual_seed(0)
    return GRModel(cfg, codebook_size=16, grid_size=4, text_dim=12).eval()


def inputs(b=2):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(b, 8, 12, generator=g)
    mask = torch.ones(b, 8, dtype=torch.bool)
    mask[1, 5:] = False
    hist = torch.randint(0, 16, (b, 2, 4, 4), generator=g)
    fut = torch.randint(0, 16, (b, 4, 4), generator=g)
    return text, mask, hist, fut


def assert_incremental_equals_full(m):
    text, mask, hist, fut = inputs()
    full = m(text, mask, hist, fut)  # (B, n, V)
    prefix, valid = m.embed_prefix(text, mask, hist)
    shifted = m.shifted_future(fut)
    cache = m.new_cache(2, text.device)
    m.trunk(prefix, valid, cache)
    steps = []
    for j in range(16):
        h = m.trunk(m.embed_frame(shifted[:, j:j + 1], m.future_slot, start=j), None, cache)
        steps.append(m.frame_head(h))
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_incremental_equals_full_forward():
    assert_incremental_equals_full(tiny())


def test_cached_step_follows_weight_updates():
    """The decode step's prepared weights belong to one cache: a later generation sees updated weights, also when
    they were changed through `.data` (EMA, DeepSpeed's flat buffers), which no version counter records."""
    m = tiny()
    assert_incremental_equals_full(m)  # fills the copies
    with torch.no_grad():
        for p in m.trunk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert_incremental_equals_full(m)
    for p in m.trunk.parameters():
        p.data.mul_(1.5)
    assert_incremental_equals_full(m)


def test_cache_mixes_single_and_multi_token_calls():
    """Decode steps reuse one key-validity bias; a later multi-token call that writes padding must replace it."""
    m = tiny()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, 32, generator=g)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 3:6] = False
    valid[1, 16:18] = False  # inside the second multi-token chunk, after decode steps made the bias
    with torch.no_grad():
        full = m.trunk(x, valid)
        cache = m.new_cache(2, x.device)
        outs = [m.trunk(x[:, :10], valid[:, :10], cache)]
        outs += [m.trunk(x[:, t:t + 1], None, cache) for t in range(10, 14)]
        outs.append(m.trunk(x[:, 14:20], valid[:, 14:20], cache))
        outs += [m.trunk(x[:, t:t + 1], None, cache) for t in range(20, 30)]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_linear_row_blocks_equal_linear(batch):
    """The decode step's weight-bandwidth path (row blocks as one batched product) equals nn.Linear, and at batch 1
    returns a plain row-major matrix (unit strides in both dims would send the next product to a slow path)."""
    from gr.model.decode import StepLinear

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for lin in (torch.nn.Linear(24, 36), torch.nn.Linear(36, 24, bias=False), torch.nn.Linear(24, 7)):
            dec = StepLinear(lin)
            assert dec.k == (4 if lin.out_features % 4 == 0 else 1)
            h = torch.randn(batch, lin.in_features)
            with torch.no_grad():
                y = dec(h)
                assert torch.allclose(y, lin(h), atol=1e-6)
            if batch == 1:
                assert y.stride() == (lin.out_features, 1)
        strided = torch.nn.Linear(24, 36)
        strided.weight = torch.nn.Parameter(torch.randn(24, 36).t())  # a transposed view: no block view exists
        dec = StepLinear(strided)
        assert dec.k == 1
        h = torch.randn(batch, 24)
        with torch.no_grad():
            assert torch.allclose(dec(h), strided(h), atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("user_setting", [True, False])
def test_decode_steps_restore_onednn_flag_across_threads(user_setting):
    """Decode steps switch oneDNN off (a process-wide flag). Threads generating at once must leave the user's
    setting as it was, also when a step raises."""
    import threading

    m = tiny()
    text, mask, hist, _ = inputs()
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = user_setting
    try:
        def work():
            for _ in range(15):
                m.generate_future_frame(text, mask, hist)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.backends.mkldnn.enabled is user_setting
        cache = m.new_cache(2, text.device)
        with pytest.raises(RuntimeError):
            m.trunk(torch.randn(2, 1, 31), None, cache)  # wrong width: fails inside the step
        assert torch.backends.mkldnn.enabled is user_setting
    finally:
        torch.backends.mkldnn.enabled = previous


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_cached_equals_uncached(temperature):
    m = tiny()
    text, mask, hist, _ = inputs()
    a = m.generate_future_frame(text, mask, hist, temperature, top_k=5, generator=torch.Generator().manual_seed(3))
    b = m.generate_future_frame(text, mask, hist, temperature, top_k=5, generator=torch.Generator().manual_seed(3),
                                use_cache=False)
    assert a.shape == (2, 4, 4) and torch.equal(a, b)


def test_future_tokens_are_causal():
    m = tiny()
    text, mask, hist, fut = inputs()
    base = m(text, mask, hist, fut)
    changed = fut.clone().reshape(2, -1)
    changed[:, 9] = (changed[:, 9] + 1) % 16
    out = m(text, mask, hist, changed.reshape(2, 4, 4))
    # Logits at future slot j predict f_j from f_<j: changing f_9 may only affect slots 10..15.
    assert torch.equal(out[:, :10], base[:, :10])
    assert not torch.allclose(out[:, 10:], base[:, 10:])


def test_padded_text_tokens_are_ignored():
    m = tiny()
    text, mask, hist, fut = inputs()
    noisy = text.clone()
    noisy[1, 5:] += 100.0  # only padding positions of sample 1
    assert torch.allclose(m(noisy, mask, hist, fut), m(text, mask, hist, fut), atol=1e-6)


def test_text_conditions_the_prediction():
    m = tiny()
    text, mask, hist, fut = inputs()
    assert not torch.allclose(m(text + 1.0, mask, hist, fut), m(text, mask, hist, fut))


def test_activation_checkpointing_same_gradients():
    text, mask, hist, fut = inputs()
    grads = []
    for ckpt in (False, True):
        m = tiny(activation_checkpointing=ckpt).train()
        m(text, mask, hist, fut).logsumexp(-1).mean().backward()
        grads.append(m.trunk.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_trunk_num_outputs_equals_the_tail_of_the_full_pass(padded, ckpt):
    from gr.model.gpt import GPTTrunk

    torch.manual_seed(0)
    trunk = GPTTrunk(TrunkConfig(num_layers=3, num_heads=2, width=32, activation_checkpointing=ckpt)).train()
    x = torch.randn(2, 11, 32, requires_grad=True)
    valid = torch.ones(2, 11, dtype=torch.bool)
    if padded:
        valid[0, 1:3] = False  # padded text keys
    full = trunk(x, valid if padded else None)
    tail = trunk(x, valid if padded else None, num_outputs=4)
    assert tail.shape == (2, 4, 32)
    torch.testing.assert_close(tail, full[:, -4:], rtol=1e-5, atol=1e-6)
    g_full = torch.autograd.grad(full[:, -4:].square().sum(), [x, *trunk.parameters()])
    g_tail = torch.autograd.grad(tail.square().sum(), [x, *trunk.parameters()])
    for a, b in zip(g_tail, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_wrong_history_shape_is_a_clear_error():
    m = tiny()
    text, mask, hist, fut = inputs()
    with pytest.raises(ValueError, match="num_history"):
        m(text, mask, hist[:, :1], fut)


@pytest.mark.parametrize("preset", list(PRESET_TARGETS))
def test_presets_match_gr2_family(preset):
    with torch.device("meta"):  # count without allocating (XL is 0.7B parameters)
        m = GRModel(GRModelConfig(trunk=TrunkConfig(preset=preset), clip=ClipSpec(image_size=256)), 1024, 16, 512)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert abs(n / PRESET_TARGETS[preset] - 1.0) <= 0.10, (preset, n)


def test_xformers_requested_but_missing():
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="xformers"):
        tiny(attention="xformers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
def test_xformers_matches_sdpa_on_gpu():
    pytest.importorskip("xformers")
    text, mask, hist, fut = [t.cuda() for t in inputs()]
    a = tiny().cuda()(text, mask, hist, fut)
    b = tiny(attention="xformers").cuda()(text, mask, hist, fut)
    assert torch.allclose(a, b, atol=1e-4)
