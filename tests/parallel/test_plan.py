"""The planner: exact parameter shards, the analytic model against the compiled step (XLA:CPU here, a TPU topology
when libtpu is installed), pipeline ticks read from the compiled loop, the paper's Table 4 layouts, FP8 inference,
adapter runs (LoRA, QLoRA) term by term and compiled for one H100."""

import importlib.util
import json
import subprocess
import sys

import jax
import pytest
from conftest import env
from flax import traverse_util

from llama_jax import config, lora, optim, plan, sharding
from llama_jax.errors import ConfigError
from llama_jax.parallel import pipeline
from llama_jax.plan import aot, command, memory
from llama_jax.train import step

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu for TPU compile-only devices: pip install 'jax[tpu]==0.10.2'")
needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                       reason="needs jax's CUDA plugin for compile-only H100s: pip install "
                                              "'jax-cuda12-plugin==0.10.2'")
# The tiny model in float32 with an 8K vocabulary: the loss is as large as the layers, so both must be right.
TINY = config.get("tiny", vocab_size=8192)


def test_param_shards_are_exact():
    cfg = config.get("llama3.1-8b")
    sizes = sharding.parse_mesh("data=2,fsdp=8", 16)
    assert sum(memory.param_bytes(cfg, sizes)) == cfg.num_params() * 2 / 8  # every dim divides by 8
    big = config.get("llama3.1-405b", num_layers=128)
    layout = sharding.parse_mesh("pipeline=16,fsdp=64,tensor=8", 8192)  # the paper's TP8 x PP16 x DP64
    d, layers = big.dim, big.num_layers
    per_layer = (big.num_params() - 2 * big.vocab_size * d - d) / layers
    norms = 2 * d  # the two RMSNorm scales per layer: split by fsdp only, not by tensor
    want_layers = ((per_layer - norms) / 512 + norms / 64) * 2 * 8  # 8 layers per pipeline rank
    want_outer = 2 * big.vocab_size * d * 2 / 512 + d * 2 / 64  # embedding and LM head on every rank, final norm
    assert memory.param_bytes(big, layout) == pytest.approx((want_layers, want_outer), rel=1e-12)


def _check(cfg, mesh_spec, seq, batch, **pipe):
    result = plan.plan_train(cfg, mesh_spec, seq, batch, backend="cpu", pipeline=pipe or None, loss_chunk=8192,
                             compile_on=(None, 1))
    compiled, terms = result["compiled"], result["terms_gb"]
    assert compiled["device_kind"] == "cpu" and compiled["devices"] == 8
    assert compiled["argument_gb"] == pytest.approx(terms["params"] + terms["opt_state"], rel=0.01)  # state shards
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result
    return result


@needs8
@pytest.mark.parametrize("mesh_spec, remat", [
    pytest.param("data=2,fsdp=2,tensor=2", "none", marks=pytest.mark.slow),  # 3 s on 2 busy cores
    ("data=2,fsdp=2,tensor=2", "full"),
    pytest.param("fsdp=4,sequence=2", "none", marks=pytest.mark.slow),  # 6 s on 2 busy cores
    pytest.param("fsdp=4,sequence=2", "full", marks=pytest.mark.slow),  # 5 s on 2 busy cores
])
def test_analytic_within_10_percent_of_xla_cpu(remat, mesh_spec):
    _check(TINY.replace(remat=remat), mesh_spec, 512, 8)


@needs8
@pytest.mark.parametrize("schedule, remat", [("gpipe", "full"), ("circular", "none")])
@pytest.mark.slow  # 11 s on 2 busy cores
def test_pipeline_memory_and_ticks_from_the_compiled_step(schedule, remat):
    cfg = TINY.replace(num_layers=8, remat=remat)
    result = _check(cfg, "pipeline=4,fsdp=2", 256, 16, schedule=schedule, microbatches=4, circular_repeats=2)
    repeats = 2 if schedule == "circular" else 1
    assert result["compiled"]["pipeline_ticks"] == result["pipeline_ticks"] == 4 * repeats + 3
    assert result["compiled"]["bubble"] == pytest.approx(pipeline.bubble_fraction(4, 4, repeats))


@needs_libtpu
@pytest.mark.slow  # 6 s on 2 busy cores
def test_compiles_for_a_tpu_topology_without_a_tpu():
    cfg = config.get("tiny", num_layers=8)
    mesh = aot.mesh_for("pipeline=4,fsdp=2", "v5p:2x2x2")
    report = aot.compile_train_step(cfg, mesh, 64, 16, schedule="circular", microbatches=4, loss_chunk=None)
    assert report.platform == "tpu" and report.device_kind == "TPU v5" and report.devices == 8
    assert report.capacity_bytes == 95e9 and report.total_bytes > report.argument_bytes > 0
    assert report.pipeline_ticks == 4 * 2 + 3  # read from the TPU program's loop


@needs_libtpu
def test_a_layout_the_tpu_compiler_refuses_reports_what_it_needs():
    # One 32K-token row per v5e chip: dense attention scores alone are ~17 GB, beyond its 16 GB.
    report = aot.compile_train_step(config.get("tiny"), aot.mesh_for("fsdp=4", "v5e:2x2"), 32768, 4, loss_chunk=None)
    assert report.refused and report.total_bytes > report.capacity_bytes == 16e9


@needs_libtpu
@pytest.mark.slow
def test_8b_on_64_v5p_chips_at_8k_within_10_percent_of_the_planner():
    cfg = config.get("llama3.1-8b", remat="full")
    result = plan.plan_train(cfg, "fsdp=64", 8192, 64, backend="tpu", compile_on=("v5p:4x4x4", 1))
    compiled = result["compiled"]
    assert compiled["devices"] == 64 and compiled["capacity_gb"] == 95 and compiled["fits"]
    assert compiled["argument_gb"] * plan.GB == pytest.approx(cfg.num_params() * 2 * 3 / 64, rel=0.01)
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result


@needs_cuda_plugin
def test_compiles_for_h100s_without_a_gpu():
    mesh = aot.mesh_for("fsdp=2,tensor=2", "h100:2", slices=2)  # two hosts of two GPUs
    report = aot.compile_train_step(config.get("tiny"), mesh, 64, 4, loss_chunk=None)
    assert report.platform == "gpu" and report.device_kind == "NVIDIA H100 80GB HBM3" and report.devices == 4
    assert report.capacity_bytes == 80e9 and report.total_bytes > report.argument_bytes > 0


def test_topology_names():
    assert aot.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
    assert aot.parse_topology("v6e:8x16") == ("v6e", (8, 16))
    assert aot.parse_topology("h100:8") == ("h100", (8,))
    with pytest.raises(ConfigError, match="2D torus"):
        aot.parse_topology("v5e:4x4x4")
    with pytest.raises(ConfigError, match="GPUs per host"):
        aot.parse_topology("h100:2x8")
    with pytest.raises(ConfigError, match="chip one of"):
        aot.parse_topology("a100:8")


def test_table4_layouts():
    rows = plan.table4_rows()
    cfg = config.get("llama3.1-405b", num_layers=plan.TABLE4_LAYERS)
    assert [(r["gpus"], r["tp"], r["cp"], r["pp"], r["dp"]) for r in rows] == [
        (8192, 8, 1, 16, 64), (16384, 8, 1, 16, 128), (16384, 8, 16, 16, 8)]
    for r in rows:
        assert r["tokens_per_batch"] == 16 * 2**20  # the paper's 16M tokens per batch
        assert r["model_flops_per_token"] == cfg.flops_per_token(r["seq"])
        assert r["mesh"]["pipeline"] * r["mesh"]["fsdp"] * r["mesh"]["tensor"] * r["mesh"]["sequence"] == r["gpus"]
        assert r["bubble"] == pipeline.bubble_fraction(16, 16, 8)
    assert rows[0]["fits_80gb"] and not rows[2]["fits_80gb"]  # 128K context with dense [T, S] scores does not fit
    assert rows[2]["flash_gb"] < 80  # ... and would with a fused attention kernel
    out = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--table4"], capture_output=True, text=True,
                         timeout=120)
    *table, last = out.stdout.strip().splitlines()
    assert out.returncode == 0 and json.loads(last)["table4"][2]["seq"] == 131072
    printed = [line.split() for line in table if line.lstrip().startswith(("8,192", "16,384"))]
    assert [(cells[5], cells[-4], cells[-3]) for cells in printed] == [
        ("8,192", "GB", "yes"), ("8,192", "GB", "yes"), ("131,072", "GB", "NO")]


def test_command_prints_a_table_compiles_and_names_every_term(tmp_path):
    on_4_devices = env(devices=4)
    out = subprocess.run(
        [sys.executable, "-m", "llama_jax.plan", "--model", "tiny", "--mesh", "fsdp=2,tensor=2", "--seq", "128",
         "--batch", "4", "--remat", "full", "--aot"], env=on_4_devices, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    *table, last = out.stdout.strip().splitlines()
    result = json.loads(last)  # the CLI convention: the result as JSON on the last line
    assert result["backend"] == "cpu" and result["compiled"]["devices"] == 4 and result["remat"] == "full"
    assert set(result["terms_gb"]) >= {"params", "opt_state", "grads", "saved_activations", "gathered_weights"}
    assert result["analytic_gb"] == pytest.approx(sum(result["terms_gb"].values()))
    # ... and above it, the table a person reads: the layout with its remat, sizes with units, the answer, and the
    # compiled FLOPs next to their caveat.
    text = "\n".join(table)
    assert table[0].startswith("train step: seq 128 x 4 rows") and "remat full, mesh fsdp=2, tensor=2" in table[0]
    total = next(line for line in table if line.split()[0] == "total")
    assert total.split()[1:4] == [f"{result['analytic_gb']:,.1f}", "GB", "fits"]
    assert "compiled for 4 x cpu" in text and f"analytic / compiled = {result['analytic_over_compiled']:.2f}" in text
    flops = next(line for line in table if "compiled FLOPs" in line)
    assert "caveat: cost_analysis counts each loop body once" in flops and "flops_per_token" in flops
    assert result["compiled"]["flops_caveat"] == plan.FLOPS_CAVEAT
    inference = [sys.executable, "-m", "llama_jax.plan", "--model", "llama3.1-405b", "--inference"]
    only_json = subprocess.run([*inference, "--weight-dtype", "fp8", "--json"], env=on_4_devices, capture_output=True,
                               text=True, timeout=120)
    assert json.loads(only_json.stdout)["fits_80gb"] and len(only_json.stdout.strip().splitlines()) == 1
    assert json.loads(only_json.stdout)["weight_dtype"] == "fp8" and only_json.stderr == ""
    # The old spelling works for one release and says so.
    old = subprocess.run([*inference, "--weights", "fp8", "--json"], env=on_4_devices, capture_output=True, text=True,
                         timeout=120)
    assert old.returncode == 0 and old.stdout == only_json.stdout
    assert old.stderr == "deprecated: --weights fp8 -> use --weight-dtype fp8\n"
    bad = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--aot", "--topology", "v9:2x2"], env=on_4_devices,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: topology 'v9:2x2'")


def test_405b_inference_fits_one_node_in_fp8_not_bf16():
    cfg = config.get("llama3.1-405b")
    bf16 = plan.inference_budget(cfg, tensor=8, batch=1, context=8192)
    fp8 = plan.inference_budget(cfg, tensor=8, batch=1, context=8192, weight_dtype="fp8")
    assert bf16.weights == cfg.num_params() * 2 / 8
    assert bf16.total > plan.H100_BYTES > fp8.total
    d, f = cfg.dim, cfg.ffn_dim
    quantized_kernels = 124 * 3 * d * f  # first and last layers stay bf16
    scales = 124 * (2 * f + d) * 4
    assert fp8.weights * 8 == cfg.num_params() * 2 - quantized_kernels + scales
    assert bf16.kv_cache == 2 * 126 * 8192 * 1 * 128 * 2  # k and v, 8 kv heads / 8 devices, bf16


def test_bad_input():
    cfg = config.get("tiny")
    with pytest.raises(ConfigError, match="do not divide"):
        memory.train_budget(cfg, "data=2,fsdp=4", 256, 4)
    with pytest.raises(ConfigError, match="unknown axis"):
        memory.train_budget(cfg, "model=4", 256, 4)
    with pytest.raises(ConfigError, match="pipeline=4: give a pipeline schedule"):
        memory.train_budget(cfg, "pipeline=4", 256, 4)
    with pytest.raises(ConfigError, match="cannot parse 'fsdp'"):
        memory.train_budget(cfg, "fsdp", 256, 4)
    with pytest.raises(ConfigError, match="fp8"):
        plan.inference_budget(cfg, tensor=1, batch=1, context=16, weight_dtype="int4")


def test_the_answer_states_remat_and_says_when_it_does_not_fit(capsys):
    # The 405B preset trains without remat; the paper's layouts assume it. The plan says which it used, and why a
    # layout does not fit.
    flags = ["--model", "llama3.1-405b", "--mesh", "tensor=8,fsdp=1024", "--seq", "8192", "--batch", "1024"]
    without = command.run(command.parser.parse_args(flags))
    text = capsys.readouterr().out
    assert without["remat"] == "none" and "remat none" in text.splitlines()[0]
    assert "does NOT fit in an H100's 80 GB" in text and "use --remat full" in text
    with_remat = command.run(command.parser.parse_args([*flags, "--remat", "full"]))
    text = capsys.readouterr().out
    assert with_remat["analytic_gb"] < 80 < without["analytic_gb"]
    assert "fits in an H100's 80 GB" in text and "--remat full" not in text


# --- Adapters (LoRA, QLoRA) -------------------------------------------------------------------------------

EIGHT_B = config.get("llama3.1-8b", remat="full")  # bfloat16 parameters
ONE_DEVICE = sharding.parse_mesh("fsdp=1", 1)


def _projection_shapes(cfg):
    """(inputs, outputs) of each projection of one layer, from the config's dimensions."""
    d, f, q, kv = cfg.dim, cfg.ffn_dim, cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    return {"query": (d, q), "key": (d, kv), "value": (d, kv), "out": (q, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}


def test_adapter_terms_by_hand():
    cfg = EIGHT_B.replace(lora=config.LoRA(rank=16, targets=("query", "value", "down")))
    shapes = _projection_shapes(cfg)
    layers, bf16 = cfg.num_layers, 2
    adapters = layers * 16 * sum(shapes[t][0] + shapes[t][1] for t in ("query", "value", "down")) * bf16
    b = memory.train_budget(cfg, ONE_DEVICE, 8192, 1, backend="gpu", stage="sft")
    assert b.terms["params"] == adapters == 16 * (8192 + 5120 + 18432) * 32 * 2
    assert b.terms["opt_state"] == 2 * adapters and b.terms["grads"] == adapters  # moments of the adapters alone
    assert b.terms["frozen"] == EIGHT_B.num_params() * bf16  # the base once, at its param_dtype
    assert b.terms["grad_accumulator"] == 0 and b.terms["table_copies"] == 0
    # QLoRA: the projections in NF4 (4 bits, an 8-bit scale per 64, a float32 scale per 256 scales: 4.127 bits
    # a parameter, QLoRA's figure); the embedding, LM head and norms at bfloat16.
    projections = layers * sum(i * o for i, o in shapes.values())
    rest = EIGHT_B.num_params() - projections
    nf4 = memory.train_budget(cfg, ONE_DEVICE, 8192, 1, backend="gpu", base_dtype="nf4")
    assert nf4.terms["frozen"] == pytest.approx(projections * 4.127 / 8 + rest * bf16, rel=1e-5)
    int8 = memory.train_budget(cfg, ONE_DEVICE, 8192, 1, backend="gpu", base_dtype="int8")
    channels = layers * sum(o for _, o in shapes.values())  # a float32 scale per output channel
    assert int8.terms["frozen"] == projections + 4 * channels + rest * bf16
    # Activations: with remat "none" each adapted projection keeps its rank-r x A ([tokens, 16], bfloat16).
    plain = memory.train_budget(EIGHT_B, ONE_DEVICE, 1024, 1, remat="none", backend="gpu")
    adapted = memory.train_budget(cfg, ONE_DEVICE, 1024, 1, remat="none", backend="gpu")
    assert adapted.terms["saved_activations"] - plain.terms["saved_activations"] == layers * 1024 * 3 * 16 * bf16


def test_adapter_optimizer_memory_scales_with_rank_and_the_base_does_not():
    budgets = {r: memory.train_budget(EIGHT_B.replace(lora=config.LoRA(rank=r)), ONE_DEVICE, 4096, 1, backend="gpu")
               for r in (8, 16, 64)}
    assert budgets[16].opt_state == 2 * budgets[8].opt_state and budgets[64].opt_state == 8 * budgets[8].opt_state
    assert len({b.terms["frozen"] for b in budgets.values()}) == 1
    full = memory.train_budget(EIGHT_B, ONE_DEVICE, 4096, 1, backend="gpu")
    assert budgets[64].opt_state < full.opt_state / 40  # rank 64 on every projection: 2.1% of the parameters


def test_dpo_with_adapters_keeps_no_reference_copy():
    cfg = EIGHT_B.replace(lora=config.LoRA(rank=16))
    sft = memory.train_budget(cfg, ONE_DEVICE, 4096, 1, backend="gpu", stage="sft")
    dpo = memory.train_budget(cfg, ONE_DEVICE, 4096, 1, backend="gpu", stage="dpo")
    full_dpo = memory.train_budget(EIGHT_B, ONE_DEVICE, 4096, 1, backend="gpu", stage="dpo")
    assert dpo.terms["frozen"] == sft.terms["frozen"] == EIGHT_B.num_params() * 2  # the base, once
    assert full_dpo.terms["frozen"] == full_dpo.params == EIGHT_B.num_params() * 2  # the reference: a second copy
    assert dpo.terms["saved_activations"] == 2 * sft.terms["saved_activations"]  # a pair: two rows through the model
    # ... and so does the state the real DPO step trains with (what the compiled step takes as arguments).
    tiny = TINY.replace(lora=config.LoRA(rank=4))
    for stage in ("sft", "dpo"):
        state = step.abstract_state(tiny, optim.adamw(1e-4), sharding.make_mesh("fsdp=1", jax.devices()[:1]),
                                    aot._stage(tiny, stage, True, None, "param")[0])
        assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.frozen)) == TINY.num_params() * 4
        assert all(lora.is_adapter(k) for k in traverse_util.flatten_dict(state.params, sep="/"))


def test_a_quantized_base_needs_adapters_and_is_priced_at_its_storage_width(capsys):
    with pytest.raises(ConfigError, match="nf4 base needs adapters"):
        memory.train_budget(TINY, ONE_DEVICE, 128, 1, base_dtype="nf4")
    flags = ["--model", "llama3.1-70b", "--mesh", "fsdp=1", "--seq", "4096", "--batch", "1", "--remat", "full",
             "--stage", "sft", "--lora-rank", "16", "--base-dtype", "nf4"]
    result = command.run(command.parser.parse_args(flags))
    text = capsys.readouterr().out
    assert "adapters: rank 16 on query" in text
    # The acceptance: the 70B QLoRA step at 4K tokens per row fits one 80 GB H100.
    assert result["fits_80gb"] and 35 < result["terms_gb"]["frozen"] < 45


def test_command_reads_adapters_from_the_config(capsys):
    flags = ["--config", "configs/sft/tiny.py", "--config.lora.rank=8", "--config.lora.targets=['query','value']",
             "--mesh", "fsdp=1", "--seq", "128", "--batch", "2", "--json"]
    assert command.main(flags) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "sft" and result["lora"] == {"rank": 8, "targets": ["query", "value"],
                                                           "base_dtype": "param"}
    assert command.main([*flags, "--lora-rank", "4"]) == 2
    assert "--lora-rank is the flag without --config; with it, set --config.lora.rank" in capsys.readouterr().err


@needs8
def test_adapter_step_within_10_percent_of_xla_cpu():
    cfg = TINY.replace(remat="full", lora=config.LoRA(rank=8))
    result = plan.plan_train(cfg, "data=2,fsdp=2,tensor=2", 512, 8, backend="cpu", stage="sft", compile_on=(None, 1))
    terms = result["terms_gb"]
    assert result["compiled"]["argument_gb"] == pytest.approx(terms["params"] + terms["frozen"] + terms["opt_state"],
                                                              rel=0.01)
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result


@needs_cuda_plugin
@pytest.mark.parametrize("stage", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])  # dpo: 13 s on 2 busy cores
def test_adapter_step_compiles_for_one_h100(stage):
    cfg = config.get("tiny", remat="full", lora=config.LoRA(rank=8))
    result = plan.plan_train(cfg, "fsdp=1", 512, 2, backend="gpu", stage=stage, compile_on=("h100:1", 1))
    compiled, terms = result["compiled"], result["terms_gb"]
    assert compiled["device_kind"] == "NVIDIA H100 80GB HBM3" and compiled["fits"]
    batch = (5 if stage == "sft" else 2 * 6) * 2 * 512 * 4  # int32 [2, 512] arrays: packed rows, or both replies
    state = (terms["params"] + terms["frozen"] + terms["opt_state"]) * plan.GB  # the base once, no reference copy
    assert compiled["argument_gb"] * plan.GB - batch == pytest.approx(state, rel=1e-3)
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result


@needs_cuda_plugin
@pytest.mark.slow  # 11 s on 2 busy cores (the compile: 10 s)
def test_8b_lora_sft_at_8k_fits_one_h100_compiled():
    cfg = EIGHT_B.replace(lora=config.LoRA(rank=16))
    result = plan.plan_train(cfg, "fsdp=1", 8192, 1, backend="gpu", stage="sft", compile_on=("h100:1", 1))
    compiled = result["compiled"]
    assert result["analytic_gb"] < 80 and compiled["fits"] and compiled["total_gb"] < 80
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result


@pytest.mark.parametrize("base_dtype", ["nf4", "int8"])
def test_a_quantized_base_is_compiled_at_its_priced_width(base_dtype):
    """The compiled step's arguments (trained adapters, their moments, the frozen base as stored) against the
    analytic terms: the base's bytes come from the quantized arrays the step really holds (on data-parallel devices:
    the quantized base is replicated, as the analytic model prices it there)."""
    cfg = config.get("tiny", remat="full", lora=config.LoRA(rank=8))
    result = plan.plan_train(cfg, "data=8", 512, 8, backend="cpu", stage="sft", compile_on=(None, 1),
                             base_dtype=base_dtype)
    terms = result["terms_gb"]
    batch = 5 * 1 * 512 * 4  # five int32 [1, 512] arrays of packed rows on each device
    state = (terms["params"] + terms["frozen"] + terms["opt_state"]) * plan.GB
    assert result["compiled"]["argument_gb"] * plan.GB - batch == pytest.approx(state, rel=0.01)
    float_base = plan.plan_train(cfg, "data=8", 512, 8, backend="cpu", stage="sft")["terms_gb"]["frozen"]
    assert terms["frozen"] < 0.4 * float_base


@needs_cuda_plugin
@pytest.mark.slow  # 8 s on 2 busy cores (the compile: 6 s)
def test_70b_qlora_sft_at_4k_fits_one_h100_compiled():
    cfg = config.get("llama3.1-70b", remat="full", lora=config.LoRA(rank=16))
    result = plan.plan_train(cfg, "fsdp=1", 4096, 1, backend="gpu", stage="sft", compile_on=("h100:1", 1),
                             base_dtype="nf4")
    compiled = result["compiled"]
    assert result["analytic_gb"] < 80 and compiled["fits"] and compiled["total_gb"] < 80
    assert 35 < result["terms_gb"]["frozen"] < 45  # 70B in NF4: 4.127 bits a projection weight
    assert 0.9 <= result["analytic_over_compiled"] <= 1.1, result
