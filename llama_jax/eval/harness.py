"""An lm-evaluation-harness model: any llama_jax checkpoint (run, step, HF or Meta directory) on the user's tasks.

    python -m llama_jax.eval.harness --model llama_jax --model_args checkpoint=runs/8b,mesh=fsdp=8 \\
        --tasks hellaswag,arc_easy --batch_size 8 --output_path results/

is ``lm_eval`` itself (same flags) with the model registered as ``llama_jax``: lm-eval 0.4 finds models only in
its own registry, which this module fills when imported; from Python, ``import llama_jax.eval.harness`` and then
``lm_eval.simple_evaluate(model="llama_jax", model_args="checkpoint=...", tasks=[...])``. Needs ``pip install
"llama_jax[eval]"``.

Model arguments: ``checkpoint`` (required), ``tokenizer`` (default: the checkpoint's), ``mesh`` (e.g. ``fsdp=8``;
default every device on fsdp), ``max_length`` (default: the model's max_seq_len), ``max_gen_toks`` (256),
``add_bos`` (true: requests start with <|begin_of_text|>, as Llama 3 was trained; false for models trained
without it), ``adapter`` (low-rank adapters run unmerged over the checkpoint: a llama_jax run trained with
``config.lora`` or a PEFT adapter directory, as ``generate --adapter`` takes them). One process (lm-eval's own
data parallelism across processes is not used).

The three requests of lm-eval's ``LM`` interface:
- ``loglikelihood(context, continuation)``: split into ids by lm-eval's own code, as its ``hf`` model does
  (whitespace that ends the context moves to the continuation; both are encoded together and split where the
  context's own ids end; an empty context is <|begin_of_text|> alone), then <|begin_of_text|> + both, cut to the
  last ``max_length + 1`` tokens, go through the model once; the result is the continuation's summed log
  probability and whether greedy decoding would have produced every one of its tokens.
- ``loglikelihood_rolling(text)``: the text's summed log probability after <|begin_of_text|>, in windows of
  ``max_length`` tokens that each see as much earlier text as fits (lm-eval's rolling windows).
- ``generate_until(context, {"until": [...], "max_gen_toks": n, "temperature": t})``: sampling with the KV cache
  (greedy by default) up to a stop token or ``max_gen_toks``, cut before the first ``until`` string.
Rows of one batch are left-padded to a length rounded up to 64 (fewer compilations); padding is its own segment,
so no scored position attends to it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llama_jax import generate, model, sharding
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.losses import chunked_cross_entropy

NAME = "llama_jax"
_LENGTH_BUCKET = 64


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


@register_model(NAME)
class LlamaJaxLM(TemplateLM):
    """lm-eval's ``LM`` over a llama_jax checkpoint (see the module docstring for the arguments)."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, mesh: str = "", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos: bool | str = True,
                 adapter: str | None = None, **harness_options):
        del harness_options  # lm-eval's device / max_batch_size: the mesh places the work here
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size 'auto' is not supported by the llama_jax model; give a number")
        self.params, self.cfg, self.tokenizer = generate.load_model(checkpoint, tokenizer, adapter)
        self.mesh = sharding.make_mesh(mesh or None)
        self.params = jax.device_put(self.params, generate.param_shardings(self.params, self.cfg, self.mesh))
        self.batch_size = int(batch_size)
        self.data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.rows = -(-self.batch_size // self.data_parallel) * self.data_parallel  # rows split evenly over the mesh
        self.max_length = int(max_length or self.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos = _bool(add_bos)
        self._score = jax.jit(self._target_scores, static_argnames="window")

    # --- scoring ---------------------------------------------------------------------------------------

    def _target_scores(self, params, batch, window: int):
        """[B, T] batch -> (log p(target) [B, T], and for the last ``window`` positions whether the target is the
        argmax [B, window]). Full-vocabulary logits exist only for those last positions."""
        hidden = model.Llama(self.cfg).apply({"params": params}, batch["tokens"], batch["positions"],
                                             batch["segment_ids"], output="hidden")  # [B, T, D]
        head = model.lm_head_kernel(params, self.cfg).astype(jnp.dtype(self.cfg.dtype))  # [D, V]
        precision = self.cfg.resolved_matmul_precision
        nll, _ = chunked_cross_entropy(hidden, head, batch["targets"], precision=precision)  # [B, T]
        last = jnp.einsum("BWD,DV->BWV", hidden[:, -window:], head, preferred_element_type=jnp.float32,
                          precision=precision)
        return -nll, jnp.argmax(last, axis=-1) == batch["targets"][:, -window:]

    def _score_requests(self, pairs: Sequence[tuple[list[int], list[int]]], with_greedy: bool
                        ) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (summed log probability of the continuation, all of it greedy?).

        Requests are batched longest first (less padding), rows left-padded (segment 0, never attended to) so that
        every row ends at the batch's last position and every continuation occupies its row's last positions."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            chunk = [pairs[i] for i in indices]
            rows = [(context + continuation)[-(self.max_length + 1):] for context, continuation in chunk]
            scored = [min(len(continuation), len(row) - 1) for row, (_, continuation) in zip(rows, chunk)]
            length = -(-max(len(row) - 1 for row in rows) // _LENGTH_BUCKET) * _LENGTH_BUCKET
            batch = {k: np.zeros((self.rows, length), np.int32) for k in ("tokens", "targets", "positions",
                                                                           "segment_ids")}
            for i, row in enumerate(rows):
                n = len(row) - 1
                batch["tokens"][i, length - n:], batch["targets"][i, length - n:] = row[:-1], row[1:]
                batch["positions"][i, length - n:] = np.arange(n)
                batch["segment_ids"][i, length - n:] = 1
            window = max(min(-(-max(scored) // 8) * 8, length), 1) if with_greedy else 1  # few shapes to compile
            with sharding.activate(self.mesh):
                log_probs, greedy = self._score(self.params, sharding.shard_batch(batch, self.mesh), window=window)
            log_probs, greedy = np.asarray(log_probs, np.float64), np.asarray(greedy)
            for row, (index, n) in enumerate(zip(indices, scored)):
                total = float(log_probs[row, length - n:].sum())
                results[index] = (total, bool(greedy[row, window - n:].all()) if with_greedy else False)
        return [results[i] for i in range(len(pairs))]

    # --- lm-eval's interface ---------------------------------------------------------------------------

    # lm-eval's TemplateLM turns loglikelihood requests into ids with these (its hf model's rules: <|begin_of_text|>
    # first, an empty context becomes the prefix token), then calls _loglikelihood_tokens.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # Without <|begin_of_text|>, an empty context still needs a token to predict the first one from.
        return self.tokenizer.bos_id if self.add_bos else self.tokenizer.eos_id

    def _prefix(self) -> list[int]:
        return [self.tokenizer.bos_id] if self.add_bos else []

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return (self._prefix() if add_special_tokens is not False else []) + self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        results = self._score_requests([(context, continuation) for _, context, continuation in requests],
                                       with_greedy=True)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            windows = [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
                token_list=self.tokenizer.encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(score for score, _ in self._score_requests([(list(c), list(t)) for c, t in windows],
                                                                   with_greedy=False))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            kwargs = dict(chunk[0].args[1])  # one batch, one setting: lm-eval groups requests by their kwargs
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if _bool(kwargs.get("do_sample", False)) else 0.0
            room = self.max_length - new_tokens
            prompts = [(self._prefix() + self.tokenizer.encode(request.args[0]))[-room:] for request in chunk]
            filler = prompts[:1] * (-len(prompts) % self.data_parallel)  # rows the mesh splits evenly, dropped after
            outputs = generate.generate(self.params, self.cfg, prompts + filler, new_tokens, temperature=temperature,
                                        stop_ids=self.tokenizer.stop_ids, mesh=self.mesh,
                                        vocab_size=self.tokenizer.vocab_size)
            for request, ids in zip(chunk, outputs):
                ids = [i for i in ids if i not in self.tokenizer.stop_ids]
                text = self.tokenizer.decode(ids)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                self.cache_hook.add_partial("generate_until", request.args, text)
                results.append(text)
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """``lm_eval``'s command line with the llama_jax model registered."""
    from lm_eval.__main__ import cli_evaluate  # the command itself: only when run as one

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
