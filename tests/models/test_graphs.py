"""models.graphs.CapturedStep: one fixed-shape training step recorded as a CUDA graph and replayed.

On the CPU the step runs eagerly (the same semantics a training loop sees); the CUDA tests (marker gpu) check
that replaying the recording trains exactly like the eager loop, under each checkpointing mode, and that it
takes less host time.
"""

from __future__ import annotations

import time

import pytest
import torch

from raytune_llm.models import attention
from raytune_llm.models.graphs import CapturedStep, make_capturable
from raytune_llm.models.load import load_model
from raytune_llm.models.settings import set_gradient_checkpointing
from tests.models.conftest import VOCAB, sync_and_randomise_lora


def _model(tiny_paths, device, dtype=torch.float32, dropout=0.0, mode="on"):
    torch.manual_seed(0)  # the same LoRA A in every load
    model = load_model(
        tiny_paths["llama"],
        lora=dict(r=4, alpha=8, dropout=dropout),
        dtype=dtype,
        device=device,
        gradient_checkpointing=mode,
    )
    sync_and_randomise_lora(model, model)
    return model


def _batches(n, device, batch=2, seq=16):
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(i)).to(device)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _eager(model, opt, batches, clip=None):
    losses = []
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cpu_step_trains_like_the_plain_loop(tiny_paths):
    batches = _batches(4, "cpu")
    ref = _model(tiny_paths, "cpu")
    ref_losses = _eager(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2), batches, 1.0)
    model = _model(tiny_paths, "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = CapturedStep(model, opt, max_grad_norm=1.0)
    assert not step.graphed
    losses = []
    for b in batches:
        out = step(**b)
        assert out.grad_norm is not None and out.grad_norm > 0
        losses.append(float(out.loss))
    assert not step.captured  # no CUDA: every call ran eagerly
    assert losses == ref_losses
    want, got = _trainable(ref), _trainable(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert all(float(g.abs().sum()) == 0 for g in step.grads)  # zeroed in place by the step


def test_without_an_optimizer_gradients_accumulate_until_zero_grad(tiny_paths):
    model = _model(tiny_paths, "cpu")
    b = _batches(1, "cpu")[0]
    step = CapturedStep(model, loss_scale=0.5)
    step(**b)
    once = [g.clone() for g in step.grads]
    out = step(**b)
    assert out.grad_norm is None
    for g, g1 in zip(step.grads, once):
        torch.testing.assert_close(g, 2 * g1)
    # The scaled backward, the unscaled loss: half of the plain gradient.
    model.zero_grad(set_to_none=False)
    model(**b).loss.backward()
    for g, g1 in zip(step.grads, once):
        torch.testing.assert_close(g1, 0.5 * g)
    step.zero_grad()
    assert all(float(g.abs().sum()) == 0 for g in step.grads)


def test_bad_use_is_a_clear_error(tiny_paths):
    model = _model(tiny_paths, "cpu")
    b = _batches(1, "cpu", seq=16)[0]
    with pytest.raises(ValueError, match="CUDA device"):
        CapturedStep(model, graph=True)
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(model, warmup=0)
    with pytest.raises(ValueError, match="needs the optimizer"):
        CapturedStep(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="dropout"):
        CapturedStep(_model(tiny_paths, "cpu", dropout=0.1))
    attn_dropout = _model(tiny_paths, "cpu")
    attn_dropout.get_base_model().config.attention_dropout = 0.1  # HF attention's own dropout, not a module
    with pytest.raises(ValueError, match="dropout 0.1"):
        CapturedStep(attn_dropout)
    step = CapturedStep(model)
    step(**b)
    with pytest.raises(ValueError, match="one fixed shape"):
        step(**_batches(1, "cpu", seq=12)[0])
    with pytest.raises(TypeError, match="tensors only"):
        step(**b, position_ids=None)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="set_to_none"):
        step(**b)


def test_make_capturable_moves_steps_and_keeps_schedules_working():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    make_capturable(opt, torch.device("cpu"))
    group = opt.param_groups[0]
    assert group["capturable"] is True
    assert isinstance(group["lr"], torch.Tensor)
    lr_tensor = group["lr"]
    sched.step()
    # The scheduler writes into the same tensor, which a recording reads on every replay.
    assert group["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(0.1 * 0.25)
    with pytest.raises(ValueError, match="no capturable form"):
        make_capturable(torch.optim.SGD([p], lr=0.1), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["off", "on", "offload"])
def test_replayed_graph_trains_like_the_eager_loop(tiny_paths, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batches = _batches(6, "cuda", seq=32)
    ref = _model(tiny_paths, "cuda", dtype=torch.float32, mode=mode)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, capturable=True)
    ref_losses = _eager(ref, ref_opt, batches, clip=1.0)
    model = _model(tiny_paths, "cuda", dtype=torch.float32, mode=mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = CapturedStep(model, opt, max_grad_norm=1.0, warmup=2)
    losses = []
    for b in batches:
        losses.append(float(step(**b).loss))
        sched.step()
    assert step.captured
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    want, got = _trainable(ref), _trainable(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
def test_replay_takes_less_host_time_than_the_eager_step(tiny_paths):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model(tiny_paths, "cuda", dtype=torch.bfloat16)
    set_gradient_checkpointing(model, "on")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    b = _batches(1, "cuda", seq=64)[0]

    def timed(fn, n=20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    def eager():
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(3):
        eager()
    t_eager = timed(eager)
    step = CapturedStep(model, opt, warmup=1)
    for _ in range(3):
        step(**b)
    t_graph = timed(lambda: step(**b))
    assert t_graph < 0.5 * t_eager, (t_graph, t_eager)


def _packed_positions(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in rows])


def test_static_document_bounds_match_the_exact_ones():
    from raytune_llm.models.attention import build_attn_meta, cu_seqlens
    from raytune_llm.models.graphs import documents, longest_document

    pos = _packed_positions([[5, 3, 8], [16]])
    pos[1] += 4  # a row that continues an earlier document still opens one
    assert documents(pos) == 4
    exact, longest = cu_seqlens(build_attn_meta(pos, None, 2, 16, "cpu"))
    static, bound = cu_seqlens(build_attn_meta(pos, None, 2, 16, "cpu", static_docs=8))
    assert exact.tolist() == [0, 5, 8, 16, 32] and longest == 16
    # The real bounds, then empty documents at the end; the row length as the longest.
    assert static.tolist() == [0, 5, 8, 16, 32, 32, 32, 32, 32] and bound == 16
    # With the longest document bounded (models.graphs.CapturedStep sets it), that bound instead.
    meta = build_attn_meta(pos, None, 2, 16, "cpu", static_docs=8)
    meta.static_longest = 8
    assert cu_seqlens(meta)[1] == 8
    assert longest_document(pos) == 16 and longest_document(_packed_positions([[5, 3, 8], [2, 6, 8]])) == 8
    with pytest.raises(ValueError, match="attention_mask"):
        build_attn_meta(pos, torch.ones(2, 16), 2, 16, "cpu", static_docs=8)


def _packed_run(tiny_paths, rows: list[list[list[int]]]):
    """Batches of 2 x 32 packed rows with these document lengths, the eager loop's losses over them, and a fresh
    model with its CapturedStep (2 eager warm-up steps) to run them."""
    batches = []
    for lens in rows:
        b = _batches(1, "cpu", batch=2, seq=32)[0]
        b["position_ids"] = _packed_positions(lens)
        batches.append(b)
    ref = _model(tiny_paths, "cuda", dtype=torch.bfloat16, mode="on")
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    ref_losses = _eager(ref, ref_opt, [{k: v.cuda() for k, v in b.items()} for b in batches])
    model = _model(tiny_paths, "cuda", dtype=torch.bfloat16, mode="on")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return batches, ref_losses, model, CapturedStep(model, opt, warmup=2)


@pytest.mark.gpu
def test_packed_rows_replay_like_eager_and_overflow_runs_eagerly(tiny_paths):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows = [[[10, 22], [32]], [[7, 7, 18], [20, 12]], [[32], [16, 16]], [[8, 24], [30, 2]], [[12, 20], [32]]]
    many = [[2] * 16, [4] * 8]  # 24 documents: over the capacity the warm-up batches set (2 x 5 -> 16)
    batches, ref_losses, model, step = _packed_run(tiny_paths, rows + [many])
    losses = [float(step(**b).loss) for b in batches]
    assert step.captured and step.doc_capacity == 16 and step.eager_steps == 1
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="on the CPU"):
        step(**{k: v.cuda() for k, v in batches[0].items()})


@pytest.mark.gpu
def test_a_document_longer_than_the_recorded_bound_runs_eagerly(tiny_paths):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # warm-up documents of at most 6 tokens: the recording tells attention 16 (2 x 6 -> a power of two) at seq 32
    rows = [[[6, 6, 6, 6, 4, 4], [4] * 8], [[5] * 6 + [2], [6] * 5 + [2]], [[6, 4] * 3 + [2], [4] * 8]]
    rows += [[[16, 16], [8] * 4], [[24, 8], [32]], [[6, 4] * 3 + [2], [4] * 8]]  # the 2nd over it: eager
    batches, ref_losses, model, step = _packed_run(tiny_paths, rows)
    told = []  # what attention is told as the longest document while the step is recorded
    exact = attention.cu_seqlens

    def spy(meta):
        out = exact(meta)
        if torch.cuda.is_current_stream_capturing():
            told.append(out[1])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "cu_seqlens", spy)
        losses = [float(step(**b).loss) for b in batches]
    assert told and set(told) == {16}
    assert step.captured and step.doc_longest == 16 and step.eager_steps == 1
    assert model.raytune_patch_report.capture_longest == 16
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=2e-3)
