"""Logits of llama_jax against transformers' PyTorch Llama on this machine's device, per compute dtype and matmul
precision: the max |logit difference| and the mean KL divergence per token.

    python benchmarks/parity.py                    # CPU or one GPU (torch runs on CUDA when jax and torch see one)
    python benchmarks/parity.py --torch-device cpu # the float32 reference on the CPU instead

The shape is the parity tests' hardest combination (tests/model/test_model_parity.py), made larger: grouped-query
attention with group 5 (10 query heads, 2 key/value heads), head_dim 64 != dim / heads, Llama 3.1 RoPE scaling with an
original context of 64 evaluated at 256 positions, tied embeddings; random weights as the tests make them
(the model's init with norm scales jittered around 1) but embeddings of std 0.2, so the logits (std ~4) give a
softmax neither flat nor one-hot and the KL means something. Both libraries get the same weights
(``formats.hf.params_to_hf``) and the same tokens. Rows:

    float32            ours, float32, matmul_precision "auto" (= "highest")   vs transformers float32
    float32 default    ours, float32, matmul_precision "default" (the backend's: TF32 on NVIDIA GPUs, one bfloat16
                       pass on TPUs, full float32 on CPUs)                    vs transformers float32
    bfloat16           ours, bfloat16 weights and compute ("auto" = the backend's default)
                                                                              vs transformers bfloat16
    bfloat16 vs f32    ours bfloat16 and transformers bfloat16, each          vs transformers float32
    float32 vs f64     ours float32 and transformers float32, each            vs transformers float64: the float32
                       rounding floor, so a float32 row is judged against what float32 itself can do

transformers keeps torch's defaults (``torch.backends.cuda.matmul.allow_tf32`` False: full float32 matmuls).
KL is KL(reference || ours) in nats, averaged over tokens; top-1 is the share of positions whose argmax agrees.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

# jax shares the GPU with torch in this process: allocate on demand instead of taking 75% of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llama_jax import config, model  # noqa: E402
from llama_jax.config import ModelConfig, RopeScaling  # noqa: E402
from llama_jax.formats.hf import params_to_hf  # noqa: E402

CFG = ModelConfig(vocab_size=1000, dim=320, num_layers=4, num_heads=10, num_kv_heads=2, head_dim=64, ffn_dim=864,
                  rope_scaling=RopeScaling(original_max_position=64), tie_embeddings=True, max_seq_len=512)
SEQ_LEN, BATCH = 256, 2
EMBEDDING_STD = 0.2  # tied: the LM head too; logits of std ~4


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """The model's init with embeddings of std EMBEDDING_STD and norm scales jittered around 1 (as in the tests)."""
    params = jax.device_get(jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    params["embedding"] = EMBEDDING_STD * rng.standard_normal(params["embedding"].shape).astype(np.float32)

    def jitter_norms(path, x):
        return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32) if "scale" in str(path) else x

    return jax.tree_util.tree_map_with_path(jitter_norms, params)


def ours(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    params = jax.tree.map(lambda x: np.asarray(x).astype(cfg.param_dtype), params)
    forward = jax.jit(lambda p, t: model.Llama(cfg).apply({"params": p}, t))
    return np.asarray(forward(params, tokens), np.float64)


def theirs(cfg: ModelConfig, params: dict, tokens: np.ndarray, device: str, dtype: torch.dtype) -> np.ndarray:
    hf_config = transformers.LlamaConfig(**{**config.to_hf(cfg), "bos_token_id": None, "eos_token_id": None})
    net = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in params_to_hf(params, cfg).items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    net.tie_weights()
    net = net.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(tokens).long().to(device)).logits
    return logits.float().cpu().numpy().astype(np.float64)


def compare(got: np.ndarray, reference: np.ndarray) -> dict:
    """Max |difference|, mean KL(reference || got) per token, top-1 agreement."""
    log_p = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    log_q = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"max_abs_diff": float(np.abs(got - reference).max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((got.argmax(-1) == reference.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where transformers runs (auto: CUDA when jax runs on a GPU and torch sees one)")
    args = parser.parse_args()
    device = args.torch_device
    if device == "auto":
        device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    params = random_params(CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (BATCH, SEQ_LEN), dtype=np.int32)

    f32, bf16 = CFG, CFG.replace(param_dtype="bfloat16", dtype="bfloat16")
    hf_f32 = theirs(CFG, params, tokens, device, torch.float32)
    hf_bf16 = theirs(CFG, params, tokens, device, torch.bfloat16)
    hf_f64 = theirs(CFG, params, tokens, device, torch.float64)
    ours_f32 = ours(f32, params, tokens)
    ours_bf16 = ours(bf16, params, tokens)
    rows = [
        ("float32", f32, ours_f32, "transformers float32", hf_f32),
        ("float32 default", f32.replace(matmul_precision="default"),
         ours(f32.replace(matmul_precision="default"), params, tokens), "transformers float32", hf_f32),
        ("bfloat16", bf16, ours_bf16, "transformers bfloat16", hf_bf16),
        ("bfloat16 vs f32", bf16, ours_bf16, "transformers float32", hf_f32),
        ("transformers bfloat16 vs f32", None, hf_bf16, "transformers float32", hf_f32),
        ("float32 vs f64", f32, ours_f32, "transformers float64", hf_f64),
        ("transformers float32 vs f64", None, hf_f32, "transformers float64", hf_f64),
    ]
    results = []
    for name, cfg, got, reference_name, reference in rows:
        row = {"row": name, "ours": None if cfg is None else {
            "dtype": cfg.dtype, "matmul_precision": cfg.matmul_precision,
            "resolved_matmul_precision": cfg.resolved_matmul_precision or "default"},
            "reference": reference_name, **compare(got, reference)}
        results.append(row)
        print(f"{name:>30}: max |logit diff| {row['max_abs_diff']:.3g}, mean KL {row['mean_kl']:.3g} nats/token, "
              f"top-1 agreement {row['top1_agreement']:.4f}  (vs {reference_name})")
    scale = {"max_abs": float(np.abs(hf_f32).max()), "std": float(hf_f32.std())}
    print(f"transformers float32 logits: max |x| {scale['max_abs']:.1f}, std {scale['std']:.2f}")
    print(json.dumps({
        "benchmark": "parity", "rows": results, "reference_logits": scale,
        "jax": harness.jax_device(), "torch": {**harness.torch_device()[1], "ran_on": device,
                                               "transformers": transformers.__version__},
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "config": {**CFG.to_dict(), "batch": BATCH, "seq": SEQ_LEN},
    }))


if __name__ == "__main__":
    main()
