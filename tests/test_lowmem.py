"""Memory strategies: stochastic rounding, the low-memory AdamW against torch's, bf16 training against the
fp32 reference, exact resume, and the planner's arithmetic and choices."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import micro_model, micro_train

from onebox.cli import main
from onebox.config import TrainConfig
from onebox.errors import OneboxError
from onebox.lowmem import Int8State, LowMemAdamW, _load, stochastic_round_bf16
from onebox.model import Transformer, build_model, cross_entropy_loss
from onebox.optim import build_optimizer
from onebox.plan import STRATEGIES, MachineMemory, fits, plan, predict, strategy
from onebox.presets import preset
from onebox.training import resume_configs, train
from onebox.training.recipe import build, choose_strategy

GB = 10**9
CPU = torch.device("cpu")


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    torch.manual_seed(0)
    lower = torch.tensor(1.0)
    step = 2.0**-7  # bf16's spacing at 1.0
    x = torch.full((200_000,), 1.0 + 0.3 * step)
    rounded = stochastic_round_bf16(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + step}
    assert abs(rounded.mean().item() - x[0].item()) < 0.02 * step  # round-to-nearest would give exactly 1.0
    assert x.to(torch.bfloat16).float().mean().item() == lower.item()
    negative = stochastic_round_bf16(-x).float()
    assert abs(negative.mean().item() + x[0].item()) < 0.02 * step
    exact = torch.randn(1000).to(torch.bfloat16).float()  # already bf16 values: unchanged
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)


def _batch(config, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (4, config.seq_len), generator=generator)
    return x, torch.randint(0, config.vocab_size, (4, config.seq_len), generator=generator)


@pytest.mark.parametrize("in_backward,clip", [(False, 0.05), (False, 0.0), (True, 0.0)])
def test_lowmem_adamw_in_fp32_matches_torch_adamw(in_backward, clip):
    config = micro_model()
    x, y = _batch(config)
    torch.manual_seed(0)
    reference, model = Transformer(config), Transformer(config)
    model.load_state_dict(reference.state_dict())
    train_config = TrainConfig(lr=1e-2, device="cpu", grad_clip=clip)
    expected = build_optimizer(reference, train_config)
    optimizer = LowMemAdamW(model, train_config, state_dtype=torch.float32, in_backward=in_backward)
    for _ in range(4):
        for m in (reference, model):
            cross_entropy_loss(m(x), y).backward()
        if in_backward:  # the hooks updated and freed every block gradient during backward
            assert all(p.grad is None for name, p in model.named_parameters() if name.startswith("layers."))
        expected.step(clip)
        optimizer.step(clip)
        expected.zero_grad()
        optimizer.zero_grad()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-6), name


@pytest.mark.parametrize("spike", [1.0, 50.0])
def test_clipped_updates_in_backward_measure_the_first_norm_then_estimate_each_steps_norm(spike):
    """No norm is known during the first backward: it only measures (nothing moves). The second step clips
    each block parameter with an estimate of its own step's norm: the squared norm so far times the first
    step's total over what had arrived by that parameter then (so a spike, here the second loss times 50,
    is clipped as it arrives), and the rest with its own step's exact norm: the weights then equal torch's
    AdamW stepped once on gradients clipped that way."""
    config = micro_model()
    torch.manual_seed(0)
    model, reference = Transformer(config), Transformer(config)
    reference.load_state_dict(model.state_dict())
    clip = 0.05
    train_config = TrainConfig(lr=1e-2, device="cpu", grad_clip=clip)
    optimizer = LowMemAdamW(model, train_config, state_dtype=torch.float32, in_backward=True)
    order = []  # the order backward completes the block gradients in (the hooks' order)
    for name, p in reference.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))

    def norm_and_grads(seed, scale=1.0):  # on the reference, whose weights the model keeps through the first step
        reference.zero_grad()
        order.clear()
        (scale * cross_entropy_loss(reference(_batch(config, seed)[0]), _batch(config, seed)[1])).backward()
        grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
        so_far, total = {}, 0.0
        for name in order:
            if name.startswith("layers."):
                total += float(grads[name].square().sum())
                so_far[name] = total
        return (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item(),
            grads,
            so_far,
        )

    first_norm, _, first_so_far = norm_and_grads(3)
    cross_entropy_loss(model(_batch(config, 3)[0]), _batch(config, 3)[1]).backward()
    optimizer.step(clip)
    optimizer.zero_grad()
    assert optimizer.steps == 0 and all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert all(float(v.abs().max()) == 0 for state in optimizer.state.values() for v in state.values())

    second_norm, grads, second_so_far = norm_and_grads(4, spike)
    (spike * cross_entropy_loss(model(_batch(config, 4)[0]), _batch(config, 4)[1])).backward()
    optimizer.step(clip)
    factor = {
        name: min(1.0, clip / ((second_so_far[name] * first_norm**2 / first_so_far[name]) ** 0.5 + 1e-6))
        for name in second_so_far
    }
    # The estimates differ from the exact norm (the batches differ) but follow its scale, spike or not.
    assert all(0.5 < f / (clip / second_norm) < 2 for f in factor.values()), (factor, clip / second_norm)
    expected = build_optimizer(reference, train_config)
    for name, p in reference.named_parameters():
        p.grad = grads[name] * factor.get(name, clip / (second_norm + 1e-6))
    expected.step(0.0)
    assert optimizer.steps == 1
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-6), name


def test_clipping_in_backward_is_exact_when_gradients_change_only_in_scale():
    """With the weights held still (lr 0) and one batch, each step's gradients are the first's times the
    loss's scale, which falls and jumps as a norm does early in training: after the measuring step, the
    moments equal torch's AdamW clipped with each step's exact norm. (Clipping with the previous step's
    norm, as onebox did before, fails this: each update would be scaled by the previous step's factor.)"""
    config = micro_model()
    torch.manual_seed(0)
    model, reference = Transformer(config), Transformer(config)
    reference.load_state_dict(model.state_dict())
    train_config = TrainConfig(lr=0.0, device="cpu", grad_clip=0.05)
    optimizer = LowMemAdamW(model, train_config, state_dtype=torch.float32, in_backward=True)
    expected = build_optimizer(reference, train_config)
    x, y = _batch(config)
    scales = [1.0, 8.0, 1.0, 0.25, 3.0]
    for i, scale in enumerate(scales):
        (scale * cross_entropy_loss(model(x), y)).backward()
        optimizer.step(0.05)
        optimizer.zero_grad()
        if i > 0:  # torch's AdamW sees the steps after the measuring one
            (scale * cross_entropy_loss(reference(x), y)).backward()
            expected.step(0.05)
            expected.zero_grad()
    torch_state = expected.optimizers[0].state
    for a, b in zip(reference.parameters(), model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(torch_state[a][key], optimizer.state[b][key], rtol=1e-4, atol=1e-12), key


def test_update_in_backward_refuses_gradient_accumulation():
    with pytest.raises(OneboxError, match="--grad-accum 1"):
        LowMemAdamW(Transformer(micro_model()), TrainConfig(grad_accum=2, device="cpu"))


def test_build_model_in_bf16_allocates_bf16_and_keeps_fp32_rope():
    model = build_model(micro_model(), "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == torch.float32 and torch.isfinite(model.rope_cos).all()
    assert 0.01 < model.layers[0].mlp.up_proj.weight.float().std().item() < 0.03  # initialised, not left empty


def test_bf16_strategy_keeps_norm_scales_and_their_moments_in_fp32():
    recipe = build(micro_model(), TrainConfig(device="cpu"), torch.device("cpu"), strategy("offload-int8"))
    model, optimizer = recipe.model, recipe.optimizer
    vectors = {name: p for name, p in model.named_parameters() if p.ndim == 1}
    assert vectors and all(p.dtype == torch.float32 for p in vectors.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.ndim == 2)
    norm = model.layers[0].input_layernorm.weight
    assert all(optimizer.state[norm][key].dtype == torch.float32 for key in ("exp_avg", "exp_avg_sq"))
    assert isinstance(optimizer.state[model.layers[0].mlp.up_proj.weight]["exp_avg"], Int8State)
    # From a checkpoint the vectors keep their exact fp32 values, not values rounded through bf16.
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["norm.weight"] = torch.full_like(state["norm.weight"], 1.0 + 2**-12)  # between two bf16 values
    resumed = build(micro_model(), TrainConfig(device="cpu"), torch.device("cpu"), strategy("bf16"), state=state).model
    assert torch.equal(resumed.norm.weight, state["norm.weight"])


def _losses(run_dir):
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.mark.parametrize("memory", ["bf16", "bf16-checkpointed"])
def test_bf16_strategies_track_the_fp32_reference(tmp_path, corpus_dir, memory):
    common = dict(max_steps=40, eval_every=0, ckpt_every=0, log_every=10)
    train(micro_model(), micro_train(tmp_path / "ref", corpus_dir, memory="standard", **common), show_progress=False)
    train(micro_model(), micro_train(tmp_path / "low", corpus_dir, memory=memory, **common), show_progress=False)
    ref, low = _losses(tmp_path / "ref"), _losses(tmp_path / "low")
    assert ref[40] < ref[10] - 0.5  # both learned
    assert all(abs(low[s] - ref[s]) / ref[s] < 0.02 for s in ref), (ref, low)  # the 2%
    state = torch.load(tmp_path / "low" / "ckpt_0000040.pt", weights_only=True)
    assert state["model"]["layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert state["model"]["layers.0.input_layernorm.weight"].dtype == torch.float32  # norm scales stay fp32


def test_bf16_strategy_resumes_exactly(tmp_path, corpus_dir):
    train(micro_model(), micro_train(tmp_path / "a", corpus_dir, memory="bf16"), show_progress=False)
    full = _losses(tmp_path / "a")
    model_cfg, train_cfg, path = resume_configs(
        str(tmp_path / "a" / "ckpt_0000006.pt"), {"out_dir": str(tmp_path / "b")}
    )
    train(model_cfg, train_cfg, resume=str(path), show_progress=False)
    resumed = _losses(tmp_path / "b")
    assert sorted(resumed) == list(range(7, 13)) and all(resumed[s] == full[s] for s in resumed), (resumed, full)


def test_predictions_follow_the_strategies_arithmetic():
    config = preset("1b-A")
    params = config.num_params()
    by_name = {s.name: predict(config, 4, s) for s in STRATEGIES}
    assert by_name["standard"].optimizer == 8 * params and by_name["bf16"].optimizer == 4 * params
    assert (
        by_name["bf16"].weights == 2 * params and by_name["standard"].weights == 6 * params
    )  # fp32 + autocast's bf16 copies
    assert by_name["checkpointed"].activations < by_name["standard"].activations / 5
    assert by_name["offload"].host == 4 * params and by_name["bf16-checkpointed"].host == 0
    assert by_name["offload"].gpu == by_name["bf16-checkpointed"].gpu - 4 * params
    assert (
        by_name["offload-int8"].host == 2 * params + 8 * -(-params // 256)
        and by_name["offload-int8"].gpu == by_name["offload"].gpu
    )
    gpus = [by_name[name].gpu for name in ("standard", "bf16", "bf16-checkpointed", "offload")]
    assert gpus == sorted(gpus, reverse=True)


def test_the_planner_picks_the_fastest_strategy_that_fits():
    h100 = MachineMemory(80 * GB, 128 * GB, "H100")
    assert plan(preset("600m-A"), 32, h100)[0].name == "standard"
    # 5b-C ran out of memory on the H100 at batch 4; checkpointing alone cannot help (the optimizer step holds 16 bytes/param)
    assert plan(preset("5b-C"), 4, h100)[0].name == "bf16"
    chosen, predictions = plan(preset("20b"), 1, h100)
    assert chosen.name == "offload" and [p.strategy.name for p in predictions if fits(p, h100)] == [
        "offload",
        "offload-int8",
    ]
    assert plan(preset("20b"), 1, MachineMemory(141 * GB, 128 * GB, "H200"))[0].name == "bf16-checkpointed"
    assert (
        plan(preset("30b"), 1, h100)[0].name == "offload-int8"
    )  # bf16 moments (116 GB) would exceed 80% of 128 GB; 8-bit ones fit
    assert plan(preset("50b"), 1, h100)[0] is None  # its bf16 weights alone exceed the GPU
    cpu = MachineMemory(None, 24 * GB, "CPU")
    assert all(not p.strategy.state_on_host for p in plan(preset("1b-A"), 1, cpu)[1])
    assert all(not p.strategy.bf16_weights for p in plan(preset("1b-A"), 1, h100, optimizer="muon")[1])


def test_named_strategies_are_checked():
    with pytest.raises(OneboxError, match="unknown memory strategy 'tiny'.*offload"):
        strategy("tiny")
    with pytest.raises(OneboxError, match="offload needs a GPU"):
        choose_strategy(micro_model(), TrainConfig(memory="offload", batch_size=1), CPU)
    with pytest.raises(OneboxError, match="--optimizer adamw"):
        choose_strategy(micro_model(), TrainConfig(memory="bf16", batch_size=1, optimizer="muon"), CPU)
    assert choose_strategy(micro_model(), TrainConfig(batch_size=1), CPU).name == "standard"


def test_plan_command_prints_every_strategy_and_the_choice(capsys):
    assert main(["plan", "--preset", "20b", "--gpu-memory", "80", "--host-memory", "128"]) == 0
    out = capsys.readouterr().out
    assert all(s.name in out for s in STRATEGIES) and "planned: offload" in out
    assert main(["plan", "--preset", "50b", "--gpu-memory", "80", "--host-memory", "128"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan", "--ladder", "--gpu-memory", "80", "--host-memory", "128"]) == 0
    out = capsys.readouterr().out
    assert "predicted training ceiling: 30b" in out and "offload-int8" in out  # 30b fits with 8-bit moments only
    assert main(["plan", "--ladder", "--gpu-memory", "24", "--host-memory", "128"]) == 0
    assert "predicted training ceiling: 10b" in capsys.readouterr().out
    assert main(["plan"]) == 1
    assert math.isfinite(predict(preset("tiny"), 1, STRATEGIES[0]).gpu)


def test_ceiling_climbs_until_a_rung_does_not_fit(tmp_path, capsys):
    from onebox.bench.ceiling import run_ceiling
    from onebox.bench.schema import seal, validate_document

    doc = run_ceiling(["tiny", "30b", "tiny"], torch.device("cpu"), print, batch=2, steps=4)
    statuses = [e["result"]["status"] for e in doc["entries"]]
    assert statuses == ["ok", "does not fit"]  # the climb stops at the first rung that does not fit
    first = doc["entries"][0]
    assert first["strategy"] == "standard" and first["result"]["loss_end"] < first["result"]["loss_start"]
    assert first["result"]["host_peak_bytes"] > 0 and first["predicted"]["gpu_bytes"] > 0
    assert validate_document(seal(doc)) == []
    assert "does not fit" in capsys.readouterr().out
    from onebox.bench.report import build_report

    md, _ = build_report([seal(doc)], tmp_path / "report")
    assert "## Training ceiling" in md.read_text() and "| 30b |" in md.read_text()


def test_ceiling_records_out_of_memory_and_stops(monkeypatch):
    import onebox.bench.ceiling as ceiling
    from onebox.bench.schema import seal, validate_document

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ceiling, "build", no_memory)
    doc = ceiling.run_ceiling(["tiny", "tiny"], torch.device("cpu"), lambda message: None, steps=2, memory="bf16")
    assert [e["result"]["status"] for e in doc["entries"]] == ["oom"] and doc["entries"][0]["strategy"] == "bf16"
    assert validate_document(seal(doc)) == []


def test_ceiling_falls_back_to_a_leaner_strategy_when_the_planned_one_runs_out(monkeypatch):
    import onebox.bench.ceiling as ceiling
    from onebox.bench.schema import seal, validate_document

    real = ceiling.build
    planned = ceiling.plan(preset("tiny"), 1, ceiling.machine_memory(torch.device("cpu")), False, mixed=False)[0]

    def planned_runs_out(config, train_config, device, strategy, *args, **kwargs):
        if strategy is planned:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(config, train_config, device, strategy, *args, **kwargs)

    monkeypatch.setattr(ceiling, "build", planned_runs_out)
    doc = ceiling.run_ceiling(["tiny"], torch.device("cpu"), lambda message: None, steps=3)
    entry = doc["entries"][0]
    assert entry["attempts"][0] == {"strategy": planned.name, "status": "oom"} and entry["result"]["status"] == "ok"
    assert entry["strategy"] != planned.name and entry["attempts"][-1]["strategy"] == entry["strategy"]
    assert validate_document(seal(doc)) == []


def test_ceiling_within_a_gpu_memory_limit_plans_and_trains_for_the_smaller_card(monkeypatch):
    import onebox.bench.ceiling as ceiling

    h200 = MachineMemory(141 * GB, 128 * GB, "H200")
    monkeypatch.setattr(ceiling, "machine_memory", lambda device: h200)
    real_document = ceiling.new_document
    monkeypatch.setattr(
        ceiling, "new_document", lambda kind, device, params: real_document(kind, torch.device("cpu"), params)
    )  # no CUDA here
    limits = []

    def climbed(config, chosen, device, batch, steps, lr, gpu_limit=None):
        limits.append(gpu_limit)
        return {
            "status": "ok",
            "ms_per_step": 1.0,
            "tokens_per_second": 1.0,
            "peak_memory_bytes": 1,
            "host_peak_bytes": 1,
            "loss_start": 2.0,
            "loss_end": 1.0,
        }

    monkeypatch.setattr(ceiling, "climb_isolated", climbed)
    whole = ceiling.run_ceiling(["20b"], torch.device("cuda"), lambda message: None)
    limited = ceiling.run_ceiling(["20b", "30b", "50b"], torch.device("cuda"), lambda message: None, gpu_limit=80 * GB)
    assert whole["entries"][0]["strategy"] == "bf16-checkpointed"  # 141 GB holds 20b's moments on the GPU
    assert [e["strategy"] for e in limited["entries"]] == [
        "offload",
        "offload-int8",
        "offload-int8",
    ]  # as on an 80 GB H100
    assert limited["entries"][-1]["result"]["status"] == "does not fit" and limits == [None, 80 * GB, 80 * GB]
    assert limited["settings"]["gpu_memory_limit_bytes"] == 80 * GB
    with pytest.raises(OneboxError, match="more than this GPU has"):
        ceiling.run_ceiling(["20b"], torch.device("cuda"), lambda message: None, gpu_limit=200 * GB)
    monkeypatch.undo()
    with pytest.raises(OneboxError, match="limits each GPU"):
        ceiling.run_ceiling(["tiny"], torch.device("cpu"), lambda message: None, gpu_limit=80 * GB)


def test_the_60b_rung_is_twice_the_one_gpu_ceiling_and_fits_two_80_gb_gpus_only():
    one, two = preset("30b").num_params(), preset("60b").num_params()
    assert two >= 2 * one
    machine = MachineMemory(80 * GB, 256 * GB, "2 x H100")
    assert plan(preset("60b"), 1, machine)[0] is None
    assert plan(preset("60b"), 1, machine, shards=2)[0].name == "offload-int8"


def test_bench_ceiling_command_writes_a_valid_document(tmp_path):
    from onebox.bench.schema import read_document, validate_document

    out = tmp_path / "ceiling.json"
    assert (
        main(
            ["bench", "ceiling", "--ladder", "tiny", "--steps", "3", "--memory", "bf16-checkpointed", "--out", str(out)]
        )
        == 0
    )
    doc = read_document(out)
    assert (
        doc["benchmark"] == "ceiling"
        and doc["entries"][0]["strategy"] == "bf16-checkpointed"
        and validate_document(doc) == []
    )
    assert main(["bench", "ceiling", "--ladder", "tiny", "--steps", "1"]) == 1
    assert main(["bench", "ceiling", "--ladder", "tiny", "--gpu-memory", "0"]) == 1  # a limit must be positive
    assert (
        main(["bench", "ceiling", "--ladder", "tiny", "--gpu-memory", "80", "--device", "cpu"]) == 1
    )  # and limits a GPU


def test_bench_validate_runs_the_named_memory_strategy(tmp_path):
    from onebox.bench.schema import read_document, validate_document

    out = tmp_path / "v.json"
    assert (
        main(
            [
                "bench",
                "validate",
                "--preset",
                "tiny",
                "--batch",
                "2",
                "--steps",
                "4",
                "--timed-steps",
                "2",
                "--memory",
                "bf16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = read_document(out)
    result = doc["entries"][0]["result"]
    assert result["memory_strategy"] == "bf16" and doc["settings"]["memory"] == "bf16" and validate_document(doc) == []
    with pytest.raises(SystemExit) as refused:  # not one of --memory's choices
        main(["bench", "validate", "--preset", "tiny", "--memory", "huge"])
    assert refused.value.code == 2


@pytest.mark.parametrize("signed", [True, False])
def test_int8_moments_round_trip_and_are_unbiased(signed):

    torch.manual_seed(0)
    x = torch.randn(5000) * torch.logspace(-4, 0, 5000)  # values over four orders of magnitude, as moments are
    x = x if signed else x.square()
    state = Int8State(x.shape, "cpu", signed, pin=False)
    state.store(x)
    assert ((state.load("cpu") - x).norm() / x.norm()).item() < 0.03
    mean = torch.stack([(state.store(x), state.load("cpu"))[1] for _ in range(200)]).mean(0)
    assert ((mean - x).norm() / x.norm()).item() < 0.005  # stochastic rounding: right on average
    saved = state.state()
    other = Int8State(x.shape, "cpu", signed, pin=False)
    other.load_state(saved)
    assert torch.equal(other.load("cpu"), state.load("cpu"))


def test_an_int8_second_moment_never_rounds_a_positive_entry_to_zero():
    values = torch.full((512,), 1e-12)
    values[0] = 1.0  # one entry sets the block's scale: the rest lie far below its first level
    state = Int8State(values.shape, "cpu", signed=False, pin=False)
    for _ in range(5):
        state.store(values)
        assert bool((state.load("cpu") > 0).all())  # m / sqrt(v) stays bounded: no division by eps alone


def test_int8_moments_track_fp32_moments(corpus_dir):
    from onebox.data import BatchLoader

    shards = sorted(corpus_dir.glob("train_*.bin"))
    final = {}
    for moments in (torch.float32, "int8"):
        torch.manual_seed(0)
        model = Transformer(micro_model())
        optimizer = LowMemAdamW(model, TrainConfig(lr=3e-3, device="cpu"), moments, in_backward=True)
        loader = BatchLoader(shards, 8, 64, seed=1)
        losses = []
        for _ in range(60):
            x, y = loader.next_batch()
            loss = cross_entropy_loss(model(x), y)
            loss.backward()
            optimizer.step(1.0)
            optimizer.zero_grad()
            losses.append(loss.item())
        final[str(moments)] = sum(losses[-10:]) / 10
        assert losses[-1] < losses[0] - 1.0
    assert abs(final["int8"] - final["torch.float32"]) / final["torch.float32"] < 0.02


def test_bf16_weights_under_autocast_compute_what_fp32_weights_of_the_same_values_do():
    """The low-memory strategies change where weights live, not the forward: under autocast a bf16-weight
    model's loss equals, bit for bit, an fp32 model's whose weights hold the same (bf16) values (the residual
    stream is fp32 in both), and its gradients differ by bf16 rounding only."""
    from onebox.model import build_model

    torch.manual_seed(0)
    low = build_model(micro_model(), "cpu", torch.bfloat16)
    high = build_model(micro_model(), "cpu", torch.float32)
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    losses = []
    for model in (low, high):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float().view(-1, 512), y.view(-1))
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(
        low.named_parameters(), high.parameters()
    ):  # gradients: bf16 storage's rounding only (2^-8 relative)
        assert (a.grad.float() - b.grad).norm() <= 1e-2 * b.grad.norm(), name


@pytest.mark.parametrize("dim", [256, 64])
def test_moments_survive_a_sharded_checkpoint(tmp_path, dim):
    """What a multi-process run writes through torch.distributed.checkpoint, read back (here in one
    process). At dim 256 the 8-bit moments are stored as their codes and scales laid out like the rows
    (exact); at 64 (rows not whole blocks of 256) as values, quantised again on load (within a level)."""
    from onebox.distributed import load_sharded, save_sharded

    config = micro_model(dim=dim, heads=dim // 16, kv_heads=dim // 32)
    x, y = _batch(config)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = LowMemAdamW(model, TrainConfig(device="cpu", lr=1e-2), "int8", in_backward=True)
    for _ in range(3):
        cross_entropy_loss(model(x), y).backward()
        optimizer.step(1.0)
        optimizer.zero_grad()
    save_sharded(tmp_path / "ckpt", model, optimizer)
    torch.manual_seed(1)
    again = Transformer(config)
    restored = LowMemAdamW(again, TrainConfig(device="cpu", lr=1e-2), "int8", in_backward=True)
    load_sharded(tmp_path / "ckpt", again, restored)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert (
        restored.steps == optimizer.steps == 2 and not restored._measured
    )  # the first step only measured; resumed, it measures again
    up = model.layers[0].mlp.up_proj.weight
    for p, q in zip(model.parameters(), again.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            saved, loaded = optimizer.state[p][key], restored.state[q][key]
            if isinstance(saved, Int8State) and p.ndim == 2 and p.shape[1] % 256 == 0:  # whole blocks per row
                assert torch.equal(saved.q, loaded.q) and torch.equal(saved.scale, loaded.scale)
            else:
                a, b = _load(saved, "cpu"), _load(loaded, "cpu")
                level = a.abs().max() / 127 if key == "exp_avg" else a.sqrt().max() ** 2 / 255 * 2
                assert torch.allclose(a, b, atol=float(level) + 1e-12), (key, p.shape)
    assert float(optimizer.state[up]["exp_avg_sq"].scale.abs().max()) > 0  # the moments were not all zero
    exact = [p for p in model.parameters() if p.ndim == 2 and p.shape[1] % 256 == 0]
    assert bool(exact) == (dim == 256)  # both layouts were exercised
